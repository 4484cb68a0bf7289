"""The server interceptor every service runs: request ids, the caller's
deadline (see `deadlines`), metrics, the caps on concurrent calls and streams,
and the one mapping from exceptions to gRPC statuses. Auth will slot in beside it.

The caps are ours, not grpc's `maximum_concurrent_rpcs`: grpc's limiter also
counts health and reflection calls, so a loaded server would fail its probes,
and it answers before any interceptor runs (no metric, no request id).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import prometheus_client
from google.protobuf.message import DecodeError

from converge.runtime import deadlines, errors
from converge.runtime.logs import request_id_var
from converge.runtime.metrics import GRPC_SERVER_HANDLED, GRPC_SERVER_HANDLING_SECONDS

logger = logging.getLogger(__name__)

REQUEST_ID_METADATA_KEY = "x-request-id"

CALLS_IN_FLIGHT = prometheus_client.Gauge(
    "converge_grpc_server_calls_in_flight",
    "Calls counted against the server's caps, open now: unary calls and streams.",
    ["kind"],
)
CALLS_REFUSED = prometheus_client.Counter(
    "converge_grpc_server_calls_refused_total",
    "Calls answered RESOURCE_EXHAUSTED at once because the server's cap of their kind was full.",
    ["kind"],
)

# Calls that are part of the server itself, not of a service: probes and
# tools must still get through when the services' calls are at their cap.
_UNCAPPED_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

Deserializer = Callable[[bytes], Any]


def _split_method(full_method: str) -> tuple[str, str]:
    # "/converge.v1.IdentityService/Resolve" -> ("converge.v1.IdentityService", "Resolve")
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def _incoming_request_id(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_METADATA_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


def _message_name(deserializer: Deserializer) -> str:
    message_class = getattr(deserializer, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    return str(getattr(descriptor, "full_name", "message"))


def _undecodable(message_name: str) -> errors.InvalidArgument:
    # The field is the request itself; the parser's words stay out of it.
    return errors.InvalidArgument(
        [errors.FieldViolation("request", f"the bytes received are not a valid {message_name}")]
    )


class _Undecodable:
    """Stands in for a unary request whose bytes did not decode: gRPC decodes
    it before any handler runs, so the handler is where it is refused."""

    def __init__(self, message_name: str) -> None:
        self.message_name = message_name


def _guarded_deserializer(
    deserializer: Deserializer | None, *, streamed: bool
) -> Deserializer | None:
    """Wraps a request deserializer so undecodable bytes become INVALID_ARGUMENT.

    A unary request is decoded before any handler runs, so it decodes to an
    `_Undecodable` the handler wrapper refuses; a streamed request is decoded
    as the handler reads it, inside the call, so the error is raised there and
    reaches the handler's wrapper like any other."""
    if deserializer is None:
        return None
    name = _message_name(deserializer)

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError:
            if streamed:
                raise _undecodable(name) from None
            return _Undecodable(name)

    return deserialize


class _Call:
    """Book-keeping of one RPC: its request id, its timing, and its outcome."""

    def __init__(self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext) -> None:
        self.service, self.method = _split_method(details.method)
        self.request_id = _incoming_request_id(details)
        self.context = context
        self.started = time.perf_counter()
        # Set, never reset through a token: each call runs in its own task and
        # so its own context, which the value dies with. A token would have to
        # be reset in the context that set it, and a stream the client
        # abandons is closed later by the garbage collector from another one.
        request_id_var.set(self.request_id)
        deadlines.start_call(context.time_remaining())
        context.set_trailing_metadata(((REQUEST_ID_METADATA_KEY, self.request_id),))

    async def fail(self, exc: BaseException) -> None:
        """Aborts the call with the status the exception maps to."""
        error = errors.translate(exc)
        if error is None:
            logger.exception("unexpected error in %s/%s", self.service, self.method, exc_info=exc)
            error = errors.InternalError(f"internal error (request id {self.request_id})")
        elif isinstance(error, errors.Unavailable):
            logger.warning("%s/%s unavailable: %r", self.service, self.method, exc)
        status = error.to_status(self.request_id)
        trailing = (*status.trailing_metadata, (REQUEST_ID_METADATA_KEY, self.request_id))
        await self.context.abort(status.code, status.details, trailing)

    def finish(self, code: grpc.StatusCode) -> None:
        elapsed = time.perf_counter() - self.started
        name = code.name
        GRPC_SERVER_HANDLED.labels(self.service, self.method, name).inc()
        GRPC_SERVER_HANDLING_SECONDS.labels(self.service, self.method, name).observe(elapsed)

    def code_after_abort(self) -> grpc.StatusCode:
        code = self.context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


class _Places:
    """A cap on calls of one kind open at once on the server: a call beyond it
    is refused at once, never queued. One for unary calls, one for streams."""

    def __init__(self, kind: str, limit: int) -> None:
        self.kind = kind
        self.limit = limit
        self.open = 0
        self._in_flight = CALLS_IN_FLIGHT.labels(kind)
        self._refused = CALLS_REFUSED.labels(kind)

    def take(self, context: grpc.aio.ServicerContext) -> Callable[[], None]:
        """Counts one more open call, or refuses it beyond the cap; returns
        what gives the place back."""
        if self.open >= self.limit:
            self._refused.inc()
            raise errors.ResourceExhausted(
                f"too many concurrent {self.kind} on this server (at most {self.limit}); "
                "retry later or on another replica"
            )
        self.open += 1
        self._in_flight.inc()
        released = False

        def release(*_: object) -> None:
            nonlocal released
            if not released:
                released = True
                self.open -= 1
                self._in_flight.dec()

        # Also when the call ends: a stream the client abandons may be closed
        # only later, by the garbage collector, and must not hold its place.
        # (grpc-stubs types the callback as a class grpc does not export.)
        context.add_done_callback(release)  # type: ignore[arg-type]
        return release


class RuntimeInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler, whatever its streaming shape.

    Unary calls count against `max_concurrent_calls`; calls that stream in
    either direction (they stay open far longer) against
    `max_concurrent_streams`. Health and reflection count against neither."""

    def __init__(
        self, *, max_concurrent_calls: int = 1000, max_concurrent_streams: int = 2000
    ) -> None:
        self.calls = _Places("calls", max_concurrent_calls)
        self.streams = _Places("streams", max_concurrent_streams)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        details = handler_call_details
        capped = _split_method(details.method)[0] not in _UNCAPPED_SERVICES
        calls = self.calls if capped else None
        streams = self.streams if capped else None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary_response(handler.unary_unary, details, calls),
                request_deserializer=_guarded_deserializer(
                    handler.request_deserializer, streamed=False
                ),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary_response(handler.stream_unary, details, streams),
                request_deserializer=_guarded_deserializer(
                    handler.request_deserializer, streamed=True
                ),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream_response(handler.unary_stream, details, streams),
                request_deserializer=_guarded_deserializer(
                    handler.request_deserializer, streamed=False
                ),
                response_serializer=handler.response_serializer,
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream_response(handler.stream_stream, details, streams),
            request_deserializer=_guarded_deserializer(handler.request_deserializer, streamed=True),
            response_serializer=handler.response_serializer,
        )

    @staticmethod
    def _wrap_unary_response(
        behavior: Callable[..., Any], details: grpc.HandlerCallDetails, places: _Places | None
    ) -> Callable[..., Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(details, context)
            code = grpc.StatusCode.OK
            release = _no_release
            try:
                if isinstance(request, _Undecodable):
                    raise _undecodable(request.message_name)
                if places is not None:
                    release = places.take(context)
                return await behavior(request, context)
            except grpc.aio.AbortError:
                code = call.code_after_abort()
                raise
            except BaseException as exc:
                code = _code_of(exc)
                if isinstance(exc, Exception):
                    await call.fail(exc)
                raise
            finally:
                release()
                call.finish(code)

        return handle

    @classmethod
    def _wrap_stream_response(
        cls, behavior: Callable[..., Any], details: grpc.HandlerCallDetails, places: _Places | None
    ) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            # A handler that writes with `context.write()` (the stock health
            # Watch does) rather than yielding.
            return cls._wrap_unary_response(behavior, details, places)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(details, context)
            code = grpc.StatusCode.OK
            release = _no_release
            try:
                if isinstance(request, _Undecodable):
                    raise _undecodable(request.message_name)
                if places is not None:
                    release = places.take(context)
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                code = call.code_after_abort()
                raise
            except GeneratorExit:
                # gRPC stopped reading the stream: the client went away, and
                # the abandoned stream is being closed (perhaps much later, by
                # the garbage collector).
                code = grpc.StatusCode.CANCELLED
                raise
            except BaseException as exc:
                code = _code_of(exc)
                if isinstance(exc, Exception):
                    await call.fail(exc)
                raise
            finally:
                release()
                call.finish(code)

        return handle


def _no_release() -> None:
    pass


def _code_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, errors.ConvergeError):
        return exc.code
    translated = errors.translate(exc) if isinstance(exc, Exception) else None
    if translated is not None:
        return translated.code
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL

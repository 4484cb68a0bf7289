"""The server interceptor every service runs: request ids, metrics and the one
mapping from exceptions to gRPC statuses. Auth will slot in beside it."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from converge.runtime import errors
from converge.runtime.logs import request_id_var
from converge.runtime.metrics import GRPC_SERVER_HANDLED, GRPC_SERVER_HANDLING_SECONDS

logger = logging.getLogger(__name__)

REQUEST_ID_METADATA_KEY = "x-request-id"


def _split_method(full_method: str) -> tuple[str, str]:
    # "/converge.v1.IdentityService/Resolve" -> ("converge.v1.IdentityService", "Resolve")
    service, _, method = full_method.lstrip("/").partition("/")
    return service, method


def _incoming_request_id(details: grpc.HandlerCallDetails) -> str:
    for key, value in details.invocation_metadata or ():
        if key == REQUEST_ID_METADATA_KEY and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return uuid.uuid4().hex


class _Call:
    """Book-keeping of one RPC: its request id, its timing, and its outcome."""

    def __init__(self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext) -> None:
        self.service, self.method = _split_method(details.method)
        self.request_id = _incoming_request_id(details)
        self.context = context
        self.started = time.perf_counter()
        self.token = request_id_var.set(self.request_id)
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
        request_id_var.reset(self.token)

    def code_after_abort(self) -> grpc.StatusCode:
        code = self.context.code()
        return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


class RuntimeInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every handler, whatever its streaming shape."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary_response(handler.unary_unary, handler_call_details),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary_response(handler.stream_unary, handler_call_details),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream_response(handler.unary_stream, handler_call_details),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream_response(handler.stream_stream, handler_call_details),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    @staticmethod
    def _wrap_unary_response(
        behavior: Callable[..., Any], details: grpc.HandlerCallDetails
    ) -> Callable[..., Awaitable[Any]]:
        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = _Call(details, context)
            code = grpc.StatusCode.OK
            try:
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
                call.finish(code)

        return handle

    @staticmethod
    def _wrap_stream_response(
        behavior: Callable[..., Any], details: grpc.HandlerCallDetails
    ) -> Callable[..., Any]:
        if not inspect.isasyncgenfunction(behavior):
            # A handler that writes with `context.write()` (the stock health
            # Watch does) rather than yielding.
            return RuntimeInterceptor._wrap_unary_response(behavior, details)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call = _Call(details, context)
            code = grpc.StatusCode.OK
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                code = call.code_after_abort()
                raise
            except BaseException as exc:
                code = _code_of(exc)
                if isinstance(exc, Exception):
                    await call.fail(exc)
                raise
            finally:
                call.finish(code)

        return handle


def _code_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, errors.ConvergeError):
        return exc.code
    translated = errors.translate(exc) if isinstance(exc, Exception) else None
    if translated is not None:
        return translated.code
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.INTERNAL

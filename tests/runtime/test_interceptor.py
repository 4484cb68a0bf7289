"""The runtime's interceptor over real gRPC: calls a client abandons, request
bytes that do not decode, and the cap on concurrent streams."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import prometheus_client
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from converge.identity.app import SPEC as IDENTITY
from converge.identity.settings import IdentitySettings
from converge.interactions.app import SPEC as INTERACTIONS
from converge.interactions.settings import InteractionsSettings
from converge.runtime.server import ServiceRuntime
from converge.v1 import identity_pb2, interactions_pb2, interactions_pb2_grpc, privacy_pb2
from tests.interactions.builders import email_ref, interaction
from tests.waiting import until

REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
INTERACTIONS_SERVICE = "converge.v1.InteractionsService"


def handled(service: str, method: str, code: str) -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "grpc_server_handled_total",
        {"grpc_service": service, "grpc_method": method, "grpc_code": code},
    )
    return value or 0.0


def handled_by_code(service: str, method: str) -> dict[str, float]:
    return {code.name: handled(service, method, code.name) for code in grpc.StatusCode}


async def until_collected(condition: Callable[[], bool], what: str) -> None:
    """`until`, asking the garbage collector to finalise calls left suspended
    (that is how an abandoned call ends) whenever a look finds the condition
    not yet holding. Only then: a full collection walks the whole session's
    heap (0.2 s at the start of the suite, seconds by its end), so collecting
    before every look cost this module 44 s of the suite."""

    def holds_or_collected_then(c: Callable[[], bool] = condition) -> bool:
        if c():
            return True
        gc.collect()
        return c()

    await until(holds_or_collected_then, what)


@dataclass
class Services:
    identity: ServiceRuntime
    interactions: ServiceRuntime


@pytest.fixture
async def services(database: str) -> AsyncIterator[Services]:
    identity = ServiceRuntime(IDENTITY, IdentitySettings(database_url=database, port=0))
    await identity.start()
    interactions = ServiceRuntime(
        INTERACTIONS,
        InteractionsSettings(
            database_url=database,
            port=0,
            identity_address=identity.address,
            max_concurrent_streams=2,
        ),
    )
    await interactions.start()
    yield Services(identity, interactions)
    await interactions.stop(grace=1)
    await identity.stop(grace=1)


def _reflection_requests(count: int) -> list[reflection_pb2.ServerReflectionRequest]:
    # Each answer carries whole file descriptors, so a few hundred of them fill
    # the HTTP/2 window and the server is caught mid-stream when the client goes.
    return [
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=INTERACTIONS_SERVICE)
        for _ in range(count)
    ]


async def test_client_cancelling_streams_mid_way_counts_cancelled_not_internal(
    services: Services, caplog: pytest.LogCaptureFixture
) -> None:
    address = services.interactions.address
    async with grpc.aio.insecure_channel(address) as channel:
        stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
        ingest = stub.IngestInteractions()
        for i in range(600):
            item = interaction(email_ref(f"c{i % 7}@example.com"), days_ago=1 + i / 1000)
            await ingest.write(
                interactions_pb2.IngestInteractionsRequest(interaction=item, idempotency_key=str(i))
            )
        await ingest.done_writing()
        await ingest

    before_reflection = handled_by_code(REFLECTION, "ServerReflectionInfo")
    before_stream = handled_by_code(INTERACTIONS_SERVICE, "StreamInteractions")
    rounds = 5

    def finished(service: str, method: str, before: dict[str, float], calls: int) -> bool:
        after = handled_by_code(service, method)
        return sum(after.values()) - sum(before.values()) >= calls

    with caplog.at_level(logging.DEBUG):
        for done in range(1, rounds + 1):
            async with grpc.aio.insecure_channel(address) as channel:
                reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
                call = reflection.ServerReflectionInfo(iter(_reflection_requests(1000)))
                await call.read()  # the server is streaming its answers
                call.cancel()
                stream = interactions_pb2_grpc.InteractionsServiceStub(channel).StreamInteractions(
                    interactions_pb2.StreamInteractionsRequest(follow=True)
                )
                await stream.read()
                stream.cancel()
            # Each round's calls have ended on the server before the next
            # (the service runs at most two streams at once).
            await until_collected(
                lambda n=done: (
                    finished(REFLECTION, "ServerReflectionInfo", before_reflection, n)
                    and finished(INTERACTIONS_SERVICE, "StreamInteractions", before_stream, n)
                ),
                "the cancelled calls to be counted",
            )

    for service, method, before in (
        (REFLECTION, "ServerReflectionInfo", before_reflection),
        (INTERACTIONS_SERVICE, "StreamInteractions", before_stream),
    ):
        after = handled_by_code(service, method)
        delta = {code: after[code] - before[code] for code in after if after[code] != before[code]}
        # A call may still have ended before the client's cancel reached it.
        assert set(delta) <= {"CANCELLED", "OK"}, (service, method, delta)
        assert delta.get("CANCELLED", 0) >= 1, (service, method, delta)
    logged = "\n".join(
        record.getMessage() + (repr(record.exc_info[1]) if record.exc_info else "")
        for record in caplog.records
    )
    assert "ValueError" not in logged
    assert "different Context" not in logged


# Bytes no protobuf message decodes: a length-delimited field 1 announcing five
# bytes where two follow.
GARBAGE = b"\x0a\x05ab"


def _methods() -> list[tuple[str, str, bool, bool]]:
    found = []
    for descriptor, service in (
        (identity_pb2.DESCRIPTOR, "IdentityService"),
        (interactions_pb2.DESCRIPTOR, "InteractionsService"),
        (privacy_pb2.DESCRIPTOR, "DataSubjectService"),
    ):
        for method in descriptor.services_by_name[service].methods:
            found.append(
                (
                    descriptor.services_by_name[service].full_name,
                    method.name,
                    method.client_streaming,
                    method.server_streaming,
                )
            )
    return found


async def _send_garbage(
    channel: grpc.aio.Channel, path: str, client_streaming: bool, server_streaming: bool
) -> grpc.aio.AioRpcError:
    raw = {"request_serializer": None, "response_deserializer": None}
    try:
        if not client_streaming and not server_streaming:
            await channel.unary_unary(path, **raw)(GARBAGE, timeout=30)
        elif not client_streaming:
            async for _ in channel.unary_stream(path, **raw)(GARBAGE, timeout=30):
                pass
        elif not server_streaming:
            await channel.stream_unary(path, **raw)(iter([GARBAGE]), timeout=30)
        else:
            async for _ in channel.stream_stream(path, **raw)(iter([GARBAGE]), timeout=30):
                pass
    except grpc.aio.AioRpcError as error:
        return error
    raise AssertionError(f"{path} accepted undecodable bytes")


async def test_undecodable_request_bytes_are_invalid_argument_on_every_rpc(
    services: Services,
) -> None:
    methods = _methods()
    before = {(s, m): handled(s, m, "INVALID_ARGUMENT") for s, m, _, _ in methods}
    for service, method, client_streaming, server_streaming in methods:
        runtime = (
            services.identity if service.endswith("IdentityService") else services.interactions
        )
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            error = await _send_garbage(
                channel, f"/{service}/{method}", client_streaming, server_streaming
            )
        where = f"{service}/{method}"
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (where, error)
        details = error.details() or ""
        for internal in ("class", "DecodeError", "Unexpected", "Traceback", "Error parsing"):
            assert internal not in details, (where, details)
        status = rpc_status.from_call(error)
        assert status is not None, where
        bad = error_details_pb2.BadRequest()
        next(d for d in status.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
        assert [v.field for v in bad.field_violations] == ["request"], where
        # (Counted once the server's side of the call ended, maybe just after
        # the client saw the status. The call was answered, not abandoned:
        # nothing waits on the garbage collector.)
        await until(
            lambda s=service, m=method: handled(s, m, "INVALID_ARGUMENT") - before[(s, m)] == 1,
            f"{service}/{method} to be counted as INVALID_ARGUMENT",
        )


async def test_streams_beyond_the_cap_are_resource_exhausted(services: Services) -> None:
    async with grpc.aio.insecure_channel(services.interactions.address) as channel:
        stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
        await stub.RecordInteraction(
            interactions_pb2.RecordInteractionRequest(
                interaction=interaction(email_ref("cap@example.com")),
                idempotency_key=uuid.uuid4().hex,
            )
        )
        follow = interactions_pb2.StreamInteractionsRequest(follow=True)
        first, second = stub.StreamInteractions(follow), stub.StreamInteractions(follow)
        await first.read()  # both streams are running: each delivered the interaction
        await second.read()

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            # (The deadline only ends the test if the cap is missing.)
            async for _ in stub.StreamInteractions(follow, timeout=30):
                pass
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "concurrent streams" in (refused.value.details() or "")

        # Health Watch and reflection are not counted against the cap.
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        assert (await reflection.read()).HasField("list_services_response")
        watch.cancel()
        reflection.cancel()

        # A stream that ends frees its place.
        first.cancel()
        third = stub.StreamInteractions(follow)
        deadline = time.monotonic() + 60
        while True:
            try:
                await third.read()
                break
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the cancelled stream's place was never freed"
                gc.collect()
                await asyncio.sleep(0.02)
                third = stub.StreamInteractions(follow)
        third.cancel()
        second.cancel()

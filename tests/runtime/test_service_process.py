"""The runtime as an operator sees it: a real process on a real TCP port,
health, reflection, metrics, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from converge.v1 import common_pb2, identity_pb2, identity_pb2_grpc
from tests.service_process import ServiceProcess, start_service, stop_process
from tests.waiting import wait_until


@pytest.fixture
async def identity_process(database: str, tmp_path: Path) -> AsyncIterator[ServiceProcess]:
    service = await start_service("identity", database, tmp_path, grace_period_s="8")
    yield service
    stop_process(service)


def _resolve(email: str) -> identity_pb2.ResolveRequest:
    return identity_pb2.ResolveRequest(
        identifiers=[common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=email)]
    )


async def test_health_check_over_tcp_reports_serving(identity_process: ServiceProcess) -> None:
    async with grpc.aio.insecure_channel(identity_process.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "converge.v1.IdentityService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_the_service(identity_process: ServiceProcess) -> None:
    async with grpc.aio.insecure_channel(identity_process.address) as channel:
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = set()
        async for response in responses:
            names |= {s.name for s in response.list_services_response.service}
    assert {"converge.v1.IdentityService", "grpc.health.v1.Health"} <= names


async def test_metrics_count_calls_by_method_and_code(identity_process: ServiceProcess) -> None:
    async with grpc.aio.insecure_channel(identity_process.address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        await stub.Resolve(_resolve("metrics@example.com"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Resolve(_resolve("not-an-email"))
    url = f"http://127.0.0.1:{identity_process.metrics_port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    ok = 'grpc_server_handled_total{grpc_code="OK",grpc_method="Resolve",grpc_service="converge.v1.IdentityService"} 1.0'
    bad = 'grpc_server_handled_total{grpc_code="INVALID_ARGUMENT",grpc_method="Resolve",grpc_service="converge.v1.IdentityService"} 1.0'
    assert ok in text
    assert bad in text
    assert 'grpc_server_handling_seconds_count{grpc_code="OK",grpc_method="Resolve"' in text


async def test_logs_are_json_lines_carrying_the_request_id(
    identity_process: ServiceProcess,
) -> None:
    async with grpc.aio.insecure_channel(identity_process.address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        call = stub.Resolve(_resolve("logs@example.com"), metadata=(("x-request-id", "req-123"),))
        await call
        trailing = dict(await call.trailing_metadata())
    assert trailing["x-request-id"] == "req-123"
    lines = [json.loads(line) for line in identity_process.log_text().splitlines() if line]
    assert any(line.get("message", "").startswith("identity serving on") for line in lines)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)


async def test_sigterm_lets_in_flight_calls_finish_refuses_new_ones_and_exits_zero(
    identity_process: ServiceProcess,
) -> None:
    async with grpc.aio.insecure_channel(identity_process.address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        bulk = stub.BulkResolve()
        for i in range(5):
            await bulk.write(
                identity_pb2.BulkResolveRequest(
                    row_ref=str(i), resolve=_resolve(f"in-flight-{i}@example.com")
                )
            )
        # A call on the same connection answered after the writes above means
        # the server has read them: HTTP/2 frames of one connection are read
        # in order, so the bulk call is in flight from here.
        health = health_pb2_grpc.HealthStub(channel)
        await health.Check(health_pb2.HealthCheckRequest())

        identity_process.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()

        async def accepts_new_calls() -> bool:
            async with grpc.aio.insecure_channel(identity_process.address) as fresh:
                try:
                    await health_pb2_grpc.HealthStub(fresh).Check(
                        health_pb2.HealthCheckRequest(), timeout=2
                    )
                except grpc.aio.AioRpcError:
                    return False
                return True

        await wait_until(accepts_new_calls, lambda accepts: not accepts, what="new calls refused")

        # A new call on a new connection is refused...
        async with grpc.aio.insecure_channel(identity_process.address) as fresh:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await identity_pb2_grpc.IdentityServiceStub(fresh).Resolve(
                    _resolve("too-late@example.com"), timeout=2
                )
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        # ...while the call in flight goes on and completes.
        for i in range(5, 10):
            await bulk.write(
                identity_pb2.BulkResolveRequest(
                    row_ref=str(i), resolve=_resolve(f"in-flight-{i}@example.com")
                )
            )
        await bulk.done_writing()
        summary = await bulk
        assert (summary.received, summary.created, summary.rejected) == (10, 10, 0)

    exit_code = await asyncio.to_thread(identity_process.process.wait, 15)
    assert exit_code == 0
    assert time.monotonic() - signalled < 8 + 2  # the grace period, plus start-up slack

"""The shared client channel spreads calls over every address of a target.

Three servers run on loopback; one channel from `converge.runtime.channels`
reaches them through a target listing all three (what DNS gives for a
headless Service in a cluster: no resolver here can hold names for three
loopback ports, so the `ipv4:` scheme lists them). The servers are the
shared runtime's own (interceptors, health) with a small counting service.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from importlib.resources import files

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from converge.runtime import channels
from converge.runtime.server import ServiceContext, ServiceRuntime, ServiceSpec
from converge.runtime.settings import ServiceSettings
from tests.waiting import wait_until

SERVICE = "converge.test.v1.Counted"


def counting_spec(index: int, calls: Counter[int]) -> ServiceSpec:
    async def answer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        calls[index] += 1
        return str(index).encode()

    async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
        handler = grpc.unary_unary_rpc_method_handler(answer)
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {"Which": handler})]
        )
        return [SERVICE]

    return ServiceSpec(f"counted{index}", files("tests.runtime") / "empty_migrations", register)


@pytest.fixture
async def three_replicas(database: str) -> AsyncIterator[tuple[list[ServiceRuntime], Counter[int]]]:
    calls: Counter[int] = Counter()
    replicas = [
        ServiceRuntime(counting_spec(i, calls), ServiceSettings(database_url=database, port=0))
        for i in range(3)
    ]
    for replica in replicas:
        await replica.start()
    yield replicas, calls
    for replica in replicas:
        await replica.stop(grace=0)


async def test_one_channel_spreads_calls_round_robin_over_every_address(
    three_replicas: tuple[list[ServiceRuntime], Counter[int]],
) -> None:
    replicas, calls = three_replicas
    target = "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)
    async with channels.aio_channel(target) as channel:
        which = channel.unary_unary(f"/{SERVICE}/Which")

        # round_robin uses an address once its connection is up: wait until
        # all three have answered (pick_first, gRPC's default, never gets there).
        async def answered_by() -> int:
            await which(b"", timeout=10, wait_for_ready=True)
            return len(calls)

        await wait_until(answered_by, lambda n: n == 3, what="a call on every replica")
        calls.clear()
        for _ in range(90):
            await which(b"", timeout=10, wait_for_ready=True)
    # Each address in turn: 30 calls each, through one channel.
    assert sorted(calls) == [0, 1, 2]
    assert set(calls.values()) == {30}


async def test_a_plain_address_gets_a_dns_target_and_works(
    three_replicas: tuple[list[ServiceRuntime], Counter[int]],
) -> None:
    replicas, _ = three_replicas
    address = f"localhost:{replicas[0].port}"
    assert channels.target(address) == f"dns:///{address}"
    assert channels.target("ipv4:127.0.0.1:1") == "ipv4:127.0.0.1:1"
    async with channels.aio_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(
            health_pb2.HealthCheckRequest(service="liveness"), timeout=10, wait_for_ready=True
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_service_config_asks_for_round_robin() -> None:
    options = dict(channels.CHANNEL_OPTIONS)
    assert '"round_robin"' in options["grpc.service_config"]
    server = dict(channels.SERVER_OPTIONS)
    # Servers accept the channels' keepalive pings rather than answer too_many_pings.
    assert server["grpc.http2.min_ping_interval_without_data_ms"] <= channels.KEEPALIVE_TIME_MS

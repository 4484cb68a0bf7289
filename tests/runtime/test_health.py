"""Health follows a service's own checks, through a real server and the stock
grpc.health.v1 service. (How it follows the database: tests/test_database_outage.py.)"""

from __future__ import annotations

from importlib.resources import files

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from converge.runtime.server import ServiceContext, ServiceRuntime, ServiceSpec
from converge.runtime.settings import ServiceSettings
from tests.waiting import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Follower:
    """Stands for something a service runs beside its calls, such as a follower."""

    def __init__(self) -> None:
        self.healthy = True


async def _wait_for_status(stub: health_pb2_grpc.HealthStub, status: int, service: str) -> None:
    await wait_until(
        lambda: stub.Check(health_pb2.HealthCheckRequest(service=service)),
        lambda reply: reply.status == status,
        what=f"health of {service!r} {status}",
    )


async def test_a_failing_service_check_makes_health_not_serving_until_it_passes(
    database: str,
) -> None:
    follower = Follower()

    async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
        context.add_health_check("follower", lambda: follower.healthy)
        return ["converge.v1.Checked"]

    spec = ServiceSpec("checked", files("tests.runtime") / "empty_migrations", register)
    settings = ServiceSettings(database_url=database, port=0, health_check_interval_s=0.02)
    runtime = ServiceRuntime(spec, settings)
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for service in ("", "converge.v1.Checked"):
                await _wait_for_status(stub, SERVING, service)
            follower.healthy = False
            for service in ("", "converge.v1.Checked"):
                await _wait_for_status(stub, NOT_SERVING, service)
            follower.healthy = True
            for service in ("", "converge.v1.Checked"):
                await _wait_for_status(stub, SERVING, service)
    finally:
        await runtime.stop(grace=1)

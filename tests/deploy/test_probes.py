"""What the chart's native gRPC probes ask: readiness follows the server's
health (""), liveness asks "liveness", which a failing dependency never turns
NOT_SERVING, so an outage takes replicas out of the endpoints without the
kubelet restarting every pod."""

from __future__ import annotations

from importlib.resources import files

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from converge.runtime.server import LIVENESS_SERVICE, ServiceContext, ServiceRuntime, ServiceSpec
from converge.runtime.settings import ServiceSettings
from tests.waiting import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_liveness_stays_serving_while_readiness_follows_a_failing_check(
    database: str,
) -> None:
    dependency_up = True

    async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
        context.add_health_check("dependency", lambda: dependency_up)
        return ["converge.v1.Probed"]

    spec = ServiceSpec("probed", files("tests.runtime") / "empty_migrations", register)
    settings = ServiceSettings(database_url=database, port=0, health_check_interval_s=0.02)
    runtime = ServiceRuntime(spec, settings)
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)

            async def status(service: str) -> int:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
                return int(reply.status)

            await wait_until(lambda: status(""), lambda s: s == SERVING, what="readiness")
            assert await status(LIVENESS_SERVICE) == SERVING
            dependency_up = False
            await wait_until(lambda: status(""), lambda s: s == NOT_SERVING, what="not ready")
            assert await status(LIVENESS_SERVICE) == SERVING
    finally:
        await runtime.stop(grace=1)

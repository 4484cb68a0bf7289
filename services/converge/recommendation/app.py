"""The recommendation service's object graph, built in one place: settings ->
peers (identity, interactions, scoring) -> each area (policy, decisions and
contact rules, outcomes, alerts, webhooks) -> the router servicer and the
DataSubjectService; and `SPEC`, what the shared runtime runs (`python -m
converge.recommendation`, the tests).

`build_spec(clock=..., policy=...)` is how tests drive time (every area takes
`clock`) and, before the policy area is wired, fix the policy; `SPEC` is
`build_spec()` with the wall clock and the stored policies."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.resources import files

import grpc

from converge.recommendation.policy.model import PolicySource
from converge.recommendation.servicer import RecommendationServicer
from converge.recommendation.settings import RecommendationSettings
from converge.runtime.server import Register, ServiceContext, ServiceSpec
from converge.v1 import recommendation_pb2, recommendation_pb2_grpc

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


async def register(
    server: grpc.aio.Server,
    context: ServiceContext,
    *,
    clock: Clock = utc_now,
    policy: PolicySource | None = None,
) -> list[str]:
    """`clock`: every time-dependent rule reads it; `policy`: a fixed policy
    (tests) instead of the stored, activated versions."""
    settings = context.settings
    assert isinstance(settings, RecommendationSettings)

    # -- Policy (policy/).

    # -- Decisions and contact rules (decisions/, contact/).

    # -- Outcomes and control groups (outcomes/).

    # -- Alerts (alerts/).

    # -- Webhooks (webhooks/).
    from converge.recommendation.webhooks.wiring import start_webhooks

    webhooks = await start_webhooks(context, settings, clock)

    recommendation_pb2_grpc.add_RecommendationServiceServicer_to_server(
        RecommendationServicer(webhooks=webhooks.rpcs), server
    )
    return [
        recommendation_pb2.DESCRIPTOR.services_by_name["RecommendationService"].full_name,
    ]


def build_spec(*, clock: Clock = utc_now, policy: PolicySource | None = None) -> ServiceSpec:
    async def registered(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
        return await register(server, context, clock=clock, policy=policy)

    bound: Register = registered
    return ServiceSpec(
        name="recommendation",
        migrations=files("converge.recommendation") / "migrations",
        register=bound,
    )


SPEC = build_spec()

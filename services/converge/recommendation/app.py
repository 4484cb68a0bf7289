"""The recommendation service's object graph, built in one place: settings ->
peers (identity, interactions, scoring) -> each area (policy, decisions and
contact rules, outcomes, alerts, webhooks) -> the router servicer and the
DataSubjectService; and `SPEC`, what the shared runtime runs (`python -m
converge.recommendation`, the tests)."""

from __future__ import annotations

import logging
from importlib.resources import files

import grpc

from converge.recommendation.servicer import RecommendationServicer
from converge.recommendation.settings import RecommendationSettings
from converge.runtime.server import ServiceContext, ServiceSpec
from converge.v1 import recommendation_pb2, recommendation_pb2_grpc

logger = logging.getLogger(__name__)


async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
    settings = context.settings
    assert isinstance(settings, RecommendationSettings)

    # -- Policy (policy/).

    # -- Decisions and contact rules (decisions/, contact/).

    # -- Outcomes and control groups (outcomes/).

    # -- Alerts (alerts/).

    # -- Webhooks (webhooks/).

    recommendation_pb2_grpc.add_RecommendationServiceServicer_to_server(
        RecommendationServicer(), server
    )
    return [
        recommendation_pb2.DESCRIPTOR.services_by_name["RecommendationService"].full_name,
    ]


SPEC = ServiceSpec(
    name="recommendation",
    migrations=files("converge.recommendation") / "migrations",
    register=register,
)

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
from datetime import UTC, datetime, timedelta
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
    from converge.recommendation.alerts.convert import event_body as alert_event_body
    from converge.recommendation.alerts.feed import AlertFeed
    from converge.recommendation.alerts.follower import AlertFollower, FollowerSettings
    from converge.recommendation.alerts.service import Alerts
    from converge.recommendation.alerts.servicer import AlertRpcs
    from converge.recommendation.alerts.store import AlertStore
    from converge.recommendation.decisions.service import FixedPolicy as AlertsFixedPolicy
    from converge.recommendation.decisions.store import DecisionStore as AlertDecisions
    from converge.recommendation.peers import Peers as AlertPeers
    from converge.recommendation.policy.service import default_policy as alerts_default
    from converge.recommendation.webhooks.store import WebhookStore

    # TODO(policy): the policy area's book when no policy is fixed.
    alerts_policy: PolicySource = policy or AlertsFixedPolicy(alerts_default())
    alert_store = AlertStore(context.pool)
    # The transactional outbox: webhook deliveries written with each event.
    alert_store.enqueue = WebhookStore.enqueue
    alert_store.event_body = lambda event: alert_event_body(
        event, alerts_policy.active().policy.currency
    )
    # Every alert backed by a logged decision (the decisions area's log).
    alert_store.record_decision = AlertDecisions(context.pool).insert
    alert_feed = AlertFeed(alert_store)
    alerts = AlertRpcs(
        Alerts(alert_store, alert_feed, clock), lambda: alerts_policy.active().policy.currency
    )
    # Its own peers' channels, so re-scoring batches do not queue behind Recommend calls.
    alert_peers = AlertPeers(
        identity_address=settings.identity_address,
        scoring_address=settings.scoring_address,
        interactions_address=settings.interactions_address,
        timeout_s=settings.peer_timeout_s,
    )
    alert_follower = AlertFollower(
        store=alert_store,
        peers=alert_peers,
        interactions_address=settings.interactions_address,
        policy=alerts_policy,
        clock=clock,
        settings=FollowerSettings(
            batch_size=settings.alerts_batch_size,
            standby_retry_s=settings.alerts_standby_retry_s,
            max_retry_s=settings.alerts_max_retry_s,
            due_work_interval_s=settings.alerts_due_work_interval_s,
            retention=timedelta(days=settings.alerts_retention_days),
        ),
    )
    if settings.alerts_follow:
        alert_follower.start()

    async def close_alerts() -> None:
        await alert_follower.close()
        await alert_feed.close()
        await alert_peers.close()

    context.on_shutdown(close_alerts)

    # -- Webhooks (webhooks/).
    from converge.recommendation.webhooks.wiring import start_webhooks

    webhooks = await start_webhooks(context, settings, clock)

    recommendation_pb2_grpc.add_RecommendationServiceServicer_to_server(
        RecommendationServicer(alerts=alerts, webhooks=webhooks.rpcs), server
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

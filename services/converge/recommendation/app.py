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

from converge.recommendation.data_subjects import CustomerData
from converge.recommendation.peers import Peers
from converge.recommendation.policy.model import PolicySource
from converge.recommendation.servicer import RecommendationServicer
from converge.recommendation.settings import RecommendationSettings
from converge.runtime.server import Register, ServiceContext, ServiceSpec
from converge.v1 import (
    privacy_pb2,
    privacy_pb2_grpc,
    recommendation_pb2,
    recommendation_pb2_grpc,
)

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
    # The book follows activations on every replica; a fixed `policy` (tests)
    # replaces it as what the other areas read, the RPCs still store versions.
    from converge.recommendation.policy.service import PolicyBook, PolicyService
    from converge.recommendation.policy.servicer import PolicyRpcs
    from converge.recommendation.policy.store import PolicyStore
    from converge.recommendation.policy.validation import check_policy_text

    policy_store = PolicyStore(context.pool)
    policy_book = PolicyBook(policy_store, poll_interval_s=settings.policy_poll_interval_s)
    await policy_book.start()
    context.on_shutdown(policy_book.stop)
    policy_rpcs = PolicyRpcs(
        PolicyService(
            policy_store,
            policy_book,
            clock=clock,
            check=lambda text: context.executor.run(check_policy_text, text),
        )
    )
    policy = policy if policy is not None else policy_book

    # -- Decisions and contact rules (decisions/, contact/).
    from converge.recommendation.contact.service import ContactGate, ContactRetention
    from converge.recommendation.contact.store import ContactLedger
    from converge.recommendation.data_subjects import RecommendationDataSubjects
    from converge.recommendation.decisions.convert import decision_body, decision_json
    from converge.recommendation.decisions.service import DecisionService, RetentionPurge
    from converge.recommendation.decisions.servicer import DecisionRpcs
    from converge.recommendation.decisions.store import DecisionStore

    # One client of each peer, for every area that calls them.
    peers = Peers(
        identity_address=settings.identity_address,
        scoring_address=settings.scoring_address,
        interactions_address=settings.interactions_address,
        timeout_s=settings.peer_timeout_s,
    )
    context.on_shutdown(peers.close)
    decision_store = DecisionStore(context.pool, render=decision_json)
    contact_ledger = ContactLedger(context.pool)
    decisions = DecisionRpcs(
        DecisionService(
            peers=peers,
            policies=policy,
            store=decision_store,
            contact=ContactGate(contact_ledger),
            pool=context.pool,
            encode=decision_body,
            clock=clock,
        ),
        decision_store,
    )
    decision_retention = RetentionPurge(
        decision_store,
        timedelta(days=settings.decision_retention_days),
        settings.decision_purge_interval_s,
        clock,
    )
    decision_retention.start()
    context.on_shutdown(decision_retention.close)
    # The ledger keeps what the active policy can still count, at least the floor.
    contact_retention = ContactRetention(
        contact_ledger,
        policy,
        timedelta(days=settings.contact_retention_days),
        settings.contact_purge_interval_s,
        clock,
    )
    contact_retention.start()
    context.on_shutdown(contact_retention.close)
    # Every area's customer data (each area adds its store here, one line).
    customer_data: list[CustomerData] = [decision_store, contact_ledger]

    # -- Outcomes and control groups (outcomes/).
    # The decisions area's peers and log; the contact ledger is told of each
    # outcome inside the outcome's own transaction; outcomes by alert read the
    # alert (its decision, its suggested action) from the alerts area's store.
    from converge.recommendation.alerts.store import AlertStore as AlertReader
    from converge.recommendation.outcomes.convert import LoggedDecisions, OutcomeInteractions
    from converge.recommendation.outcomes.service import OutcomeService, alert_lookup
    from converge.recommendation.outcomes.servicer import OutcomeRpcs
    from converge.recommendation.outcomes.store import OutcomeStore

    outcome_store = OutcomeStore(context.pool, contact_ledger)
    outcomes = OutcomeRpcs(
        OutcomeService(
            outcome_store,
            LoggedDecisions(decision_store),
            OutcomeInteractions(peers),
            clock,
            alerts=alert_lookup(AlertReader(context.pool)),
        )
    )
    customer_data.append(outcome_store)

    # -- Alerts (alerts/).
    from converge.recommendation.alerts.convert import event_body as alert_event_body
    from converge.recommendation.alerts.feed import AlertFeed
    from converge.recommendation.alerts.follower import AlertFollower, FollowerSettings
    from converge.recommendation.alerts.service import Alerts
    from converge.recommendation.alerts.servicer import AlertRpcs
    from converge.recommendation.alerts.store import AlertStore
    from converge.recommendation.decisions.service import FixedPolicy as AlertsFixedPolicy
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
    alert_store.record_decision = decision_store.insert
    alert_feed = AlertFeed(alert_store)
    alerts = AlertRpcs(
        Alerts(alert_store, alert_feed, clock), lambda: alerts_policy.active().policy.currency
    )
    # Its own channels to the peers (connections apart from the decisions area's;
    # whether sharing them would cost Recommend latency was not measured).
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
    # Alerts and their events take part in ForgetCustomer and ExportCustomer.
    customer_data.append(alert_store)

    # -- Webhooks (webhooks/).
    from converge.recommendation.webhooks.wiring import start_webhooks

    webhooks = await start_webhooks(context, settings, clock)
    customer_data.append(webhooks.store)

    privacy_pb2_grpc.add_DataSubjectServiceServicer_to_server(
        RecommendationDataSubjects(
            context.pool, customer_data, max_page_bytes=settings.max_page_bytes, clock=clock
        ),
        server,
    )
    recommendation_pb2_grpc.add_RecommendationServiceServicer_to_server(
        RecommendationServicer(
            policy=policy_rpcs,
            alerts=alerts,
            outcomes=outcomes,
            webhooks=webhooks.rpcs,
            decisions=decisions,
        ),
        server,
    )
    return [
        recommendation_pb2.DESCRIPTOR.services_by_name["RecommendationService"].full_name,
        privacy_pb2.DESCRIPTOR.services_by_name["DataSubjectService"].full_name,
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

"""Nothing of an erased customer survives in the recommendation service's
schema, and a retention purge of decisions leaves none of their children.

The sweep fills every area for two customers through the product's RPCs
(Recommend: decisions and contacts; RecordOutcome: outcomes and their keys;
the alert follower: alerts, their events and decisions; an alert lifecycle
call: its key; a webhook: deliveries and dead letters), erases one through
DataSubjectService, then reads every column of every table of the schema
(tests/erasure_sweep.py) for the erased customer's id."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from converge.recommendation.decisions.service import FixedPolicy
from converge.recommendation.policy.model import ActivePolicy, Policy
from converge.v1 import common_pb2, privacy_pb2
from converge.v1 import recommendation_pb2 as pb
from tests.conftest import Platform
from tests.erasure_sweep import rows_naming, survivors, tables_with_column
from tests.recommendation.conftest import (
    ManualClock,
    Recommendation,
    StartRecommendation,
    make_customer,
)
from tests.recommendation.test_alerts import caught_up
from tests.recommendation.test_data_subjects import export_all
from tests.recommendation.test_recommend import small_policy
from tests.recommendation.test_webhooks import new_secret
from tests.recommendation.webhook_receiver import Receiver, Reply
from tests.waiting import wait_until

# The only tables allowed to name an erased customer, and why.
TOMBSTONES = {
    "decision_erased_customers": "a decision in flight is refused for an erased customer",
    "contact_erased_customers": "a contact in flight is dropped for an erased customer",
    "alert_erased_customers": "the alert follower never raises an alert for them again",
}


def sweep_policy() -> FixedPolicy:
    """small_policy's actions, and an escalation alert for every open ticket
    (threshold 0) sent to the support team."""
    document: dict[str, Any] = small_policy().active().policy.model_dump(mode="json")
    document["teams"] = [{"name": "support"}, {"name": "support-leads"}]
    document["alerts"] = [
        {
            "kind": "escalation_risk",
            "prediction": "escalation",
            "threshold": 0.0,
            "default_team": "support",
        }
    ]
    return FixedPolicy(ActivePolicy("sweep-1", Policy.model_validate(document)))


@pytest.fixture
def clock() -> ManualClock:
    """The service's clock, 40 days behind the real one: the retention test
    moves it 31 days on and still records outcomes, which the interactions
    service (on the real clock) refuses from the future."""
    return ManualClock(datetime.now(UTC) - timedelta(days=40))


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    receiver.default = Reply(500)  # every delivery becomes a dead letter at once
    await receiver.start()
    yield receiver
    await receiver.close()


async def fill_every_area(service: Recommendation, customer: Any, tag: str) -> None:
    answer = await service.stub.Recommend(
        pb.RecommendRequest(customer=customer.ref, channel=common_pb2.CHANNEL_WEB)
    )
    assert answer.actions, "a decision that proposes something (a contact)"
    await service.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=answer.decision_id,
            action_id=answer.actions[0].action_id,
            outcome=pb.ACTION_OUTCOME_ACCEPTED,
            idempotency_key=f"outcome-{tag}",
        )
    )
    alerts = await wait_until(
        lambda: service.stub.ListAlerts(pb.ListAlertsRequest(team="support")),
        lambda listed: any(a.customer_id == customer.customer_id for a in listed.alerts),
        what=f"an alert for {tag}",
    )
    [alert] = [a for a in alerts.alerts if a.customer_id == customer.customer_id]
    await service.stub.AcknowledgeAlert(
        pb.AcknowledgeAlertRequest(
            alert_id=alert.alert_id,
            actor=common_pb2.Actor(name="ana", reason="on shift"),
            idempotency_key=f"ack-{tag}",
        )
    )


async def deliveries_settled(service: Recommendation) -> None:
    """Waits until every alert event has its delivery and none is pending
    (the receiver refuses each, no retries: each ends a dead letter)."""

    async def counts() -> tuple[int, int, int]:
        async with service.runtime.pool.acquire() as conn:
            events = await conn.fetchval("SELECT count(*) FROM alert_events")
            deliveries = await conn.fetchval("SELECT count(*) FROM webhook_deliveries")
            pending = await conn.fetchval(
                "SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'"
            )
        return events, deliveries, pending

    await wait_until(
        counts,
        lambda c: c[0] > 0 and c[0] == c[1] and c[2] == 0,
        what="every alert event delivered or dead",
    )


async def test_nothing_of_an_erased_customer_survives_in_any_table(
    platform: Platform, start_recommendation: StartRecommendation, receiver: Receiver
) -> None:
    service = await start_recommendation(
        policy=sweep_policy(),
        webhook_secrets={"crm": [new_secret()]},
        webhook_allow_http=True,
        webhook_retry_schedule_s=[],
    )
    await service.stub.CreateWebhook(
        pb.CreateWebhookRequest(team="support", url=receiver.url(), secret_id="crm")
    )
    gone = await make_customer(platform, "sweep-gone", at_risk=True, wants_human=True)
    kept = await make_customer(platform, "sweep-kept", at_risk=True, wants_human=True)
    for customer, tag in ((gone, "gone"), (kept, "kept")):
        await fill_every_area(service, customer, tag)
    await caught_up(service)
    await deliveries_settled(service)

    async with service.runtime.pool.acquire() as conn:
        holders = await tables_with_column(conn, "customer_id") - TOMBSTONES.keys()
        gone_before = await rows_naming(conn, [gone.customer_id])
        kept_before = await rows_naming(conn, [kept.customer_id])
    # The fill reached every table that holds customers (else the sweep proves little).
    assert holders <= gone_before.keys(), f"not filled: {holders - gone_before.keys()}"
    assert holders <= kept_before.keys(), f"not filled: {holders - kept_before.keys()}"
    exported = await export_all(service, gone.customer_id)

    erased = await service.privacy.EraseCustomerData(
        privacy_pb2.EraseCustomerDataRequest(customer_ids=[gone.customer_id], erasure_id="sweep")
    )

    async with service.runtime.pool.acquire() as conn:
        gone_after = await rows_naming(conn, [gone.customer_id])
        kept_after = await rows_naming(conn, [kept.customer_id])
    assert survivors(gone_after, TOMBSTONES) == {}
    assert set(gone_after) == TOMBSTONES.keys()  # each tombstone written, once
    assert all(rows == 1 for rows in gone_after.values())
    assert kept_after == kept_before
    # Export and erasure cover the same kinds: whatever is erased was exported.
    erased_kinds = {kind for kind, rows in erased.erased_counts.items() if rows}
    assert erased_kinds <= {kind for kind, records in exported.items() if records}


async def test_the_retention_purge_leaves_no_outcome_or_outcome_key_of_a_purged_decision(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    service = await start_recommendation(
        policy=small_policy(), decision_retention_days=30, decision_purge_interval_s=0.05
    )
    customer = await make_customer(platform, "retained")

    async def decide_with_outcome(key: str) -> str:
        answer = await service.stub.Recommend(
            pb.RecommendRequest(customer=customer.ref, channel=common_pb2.CHANNEL_WEB)
        )
        await service.stub.RecordOutcome(
            pb.RecordOutcomeRequest(
                decision_id=answer.decision_id,
                action_id=answer.actions[0].action_id,
                outcome=pb.ACTION_OUTCOME_ACCEPTED,
                idempotency_key=key,
            )
        )
        return answer.decision_id

    old = await decide_with_outcome("old-outcome")
    service.clock.advance(timedelta(days=20))
    recent = await decide_with_outcome("recent-outcome")
    service.clock.advance(timedelta(days=11))  # the first is now 31 days old, the second 11

    async def old_decision() -> grpc.StatusCode:
        try:
            await service.stub.GetDecision(pb.GetDecisionRequest(decision_id=old))
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    await wait_until(
        old_decision, lambda code: code == grpc.StatusCode.NOT_FOUND, what="the old decision purged"
    )

    async def left() -> dict[str, list[str]]:
        async with service.runtime.pool.acquire() as conn:
            outcomes = await conn.fetch("SELECT decision_id::text AS id FROM decision_outcomes")
            keys = await conn.fetch("SELECT idempotency_key FROM outcome_requests")
        return {
            "outcomes": sorted(r["id"] for r in outcomes),
            "keys": sorted(r["idempotency_key"] for r in keys),
        }

    # The purge's transaction took the old decision's outcome and key with it.
    assert await left() == {"outcomes": [str(uuid.UUID(recent))], "keys": ["recent-outcome"]}
    kept = await service.stub.GetDecision(pb.GetDecisionRequest(decision_id=recent))
    assert [o.outcome for o in kept.decision.outcomes] == [pb.ACTION_OUTCOME_ACCEPTED]

"""Predicted alerts over real gRPC and PostgreSQL, with identity, interactions
and scoring running (scoring on its rule fallback: deterministic, and an
escalated ticket moves its escalation score, so a threshold between the
before and after scores is crossed by one interaction)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import grpc
import pytest

from converge.recommendation.policy.model import ActivePolicy, Policy
from converge.v1 import (
    common_pb2,
    interactions_pb2,
    recommendation_pb2,
    scoring_pb2,
)
from tests.conftest import Platform
from tests.interactions.builders import interaction, record
from tests.recommendation.conftest import (
    Customer,
    Recommendation,
    Scoring,
    StartRecommendation,
    make_customer,
)
from tests.waiting import until, wait_until

pb = recommendation_pb2
ESCALATION = pb.ALERT_KIND_ESCALATION_RISK
CHURN = pb.ALERT_KIND_CHURN_RISK
CROSS_SELL = pb.ALERT_KIND_CROSS_SELL_MOMENT


class FixedPolicy:
    def __init__(self, policy: Policy, version: str = "test-1") -> None:
        self.policy = ActivePolicy(version, policy)

    def active(self) -> ActivePolicy:
        return self.policy


def policy(**parts: Any) -> FixedPolicy:
    document: dict[str, Any] = {
        "actions": [],
        "catalogue": {
            "products": [
                {"id": "tv", "value": 100, "cost": 1},
                {"id": "router", "value": 50, "cost": 1},
            ]
        },
    }
    document.update(parts)
    return FixedPolicy(Policy.model_validate(document))


@dataclass
class Subscriber:
    """A SubscribeAlerts stream read in the background into `events`."""

    events: list[pb.AlertEvent] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    call: Any = None

    @property
    def cursors(self) -> list[str]:
        return [e.cursor for e in self.events]


@contextlib.asynccontextmanager
async def subscribed(
    rec: Recommendation, team: str, from_cursor: str = "", **request: Any
) -> AsyncIterator[Subscriber]:
    subscriber = Subscriber()
    subscriber.call = rec.stub.SubscribeAlerts(
        pb.SubscribeAlertsRequest(team=team, from_cursor=from_cursor, **request)
    )

    async def read() -> None:
        async for answer in subscriber.call:
            subscriber.events.append(answer.event)

    subscriber.task = asyncio.create_task(read())
    # The headers come once the server fixed where the stream starts.
    await subscriber.call.initial_metadata()
    try:
        yield subscriber
    finally:
        subscriber.call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
            await subscriber.task


async def stream_end(platform: Platform) -> str:
    """The cursor of the last interaction on the change stream now."""
    last = ""
    async for item in platform.interactions.StreamInteractions(
        interactions_pb2.StreamInteractionsRequest(follow=False)
    ):
        last = item.cursor
    return last


async def caught_up(rec: Recommendation) -> None:
    """Waits until the follower has applied everything on the stream now."""
    end = await stream_end(rec.platform)

    async def saved() -> str:
        async with rec.runtime.pool.acquire() as conn:
            return str(await conn.fetchval("SELECT cursor FROM alert_stream_cursor") or "")

    await wait_until(saved, lambda cursor: cursor == end, what=f"follower at {end}")


async def escalation_scores(scoring: Scoring, customer: Customer) -> tuple[float, float]:
    """The ticket's escalation probability now, and after one escalation."""

    async def score(context: dict[str, float]) -> float:
        answer = await scoring.stub.Score(
            scoring_pb2.ScoreRequest(
                customer=customer.ref,
                ticket_id=customer.ticket_id,
                predictions=[2],  # ESCALATION
                context_features=context,
            )
        )
        return answer.predictions[0].probability

    return await score({}), await score({"escalations_90d": 1.0})


def escalated(customer: Customer) -> interactions_pb2.RecordInteractionRequest:
    return record(
        interaction(customer.ref, "ticket.escalated", days_ago=0.01, ticket_id=customer.ticket_id),
        key=f"escalated-{customer.customer_id}",
    )


def escalation_policy(threshold: float, **team: Any) -> FixedPolicy:
    return policy(
        teams=[{"name": "support", **team}, {"name": "support-leads"}],
        alerts=[
            {
                "kind": "escalation_risk",
                "prediction": "escalation",
                "threshold": threshold,
                "default_team": "support",
            }
        ],
    )


async def start_with_crossing(
    platform: Platform,
    scoring: Scoring,
    start_recommendation: StartRecommendation,
    tag: str,
    **team: Any,
) -> tuple[Recommendation, Customer, float]:
    customer = await make_customer(platform, tag, at_risk=True)
    before, after = await escalation_scores(scoring, customer)
    assert after > before, "an escalation must raise the escalation score"
    threshold = (before + after) / 2
    rec = await start_recommendation(
        policy=escalation_policy(threshold, **team), alerts_due_work_interval_s=0.05
    )
    await caught_up(rec)
    return rec, customer, threshold


async def test_one_interaction_over_the_threshold_raises_exactly_one_support_alert(
    platform: Platform, scoring: Scoring, start_recommendation: StartRecommendation
) -> None:
    rec, customer, threshold = await start_with_crossing(
        platform, scoring, start_recommendation, "crossing"
    )
    async with subscribed(rec, "support") as support:
        # The history alone stays below the threshold: nothing yet.
        listed = await rec.stub.ListAlerts(pb.ListAlertsRequest(team="support"))
        assert list(listed.alerts) == []

        await platform.interactions.RecordInteraction(escalated(customer))
        await until(lambda: len(support.events) >= 1, "the support alert")
        [event] = support.events
        assert event.type == pb.ALERT_EVENT_TYPE_CREATED
        alert = event.alert
        assert alert.kind == ESCALATION
        assert alert.team == "support"
        assert alert.customer_id == customer.customer_id
        assert alert.ticket_id == customer.ticket_id
        assert alert.probability >= threshold
        assert alert.dedup_key == f"escalation_risk:{customer.customer_id}:{customer.ticket_id}"
        assert alert.occurrences == 1
        assert alert.decision_id
        assert alert.status == pb.ALERT_STATUS_OPEN
        assert event.cursor and alert.cursor == event.cursor

        # The same interaction sent again is a duplicate: no second alert, no event.
        again = await platform.interactions.RecordInteraction(escalated(customer))
        assert again.duplicate
        quiet = await make_customer(platform, "crossing-marker")
        del quiet
        await caught_up(rec)
        assert len(support.events) == 1
        listed = await rec.stub.ListAlerts(pb.ListAlertsRequest(team="support"))
        assert [a.alert_id for a in listed.alerts] == [alert.alert_id]
        assert listed.alerts[0].occurrences == 1

        got = await rec.stub.GetAlert(pb.GetAlertRequest(alert_id=alert.alert_id))
        assert got.alert.dedup_key == alert.dedup_key

    # Backed by a logged decision: the interaction that led to it, the scores, the alert.
    async with rec.runtime.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT trigger, body FROM decisions WHERE decision_id = $1::uuid", alert.decision_id
        )
    assert row is not None and row["trigger"] == "interaction"
    decision = pb.Decision.FromString(bytes(row["body"]))
    assert list(decision.alert_ids) == [alert.alert_id]
    assert decision.trigger == pb.DECISION_TRIGGER_INTERACTION
    assert decision.ticket_id == customer.ticket_id
    assert decision.interaction_id
    assert any(p.probability == alert.probability for p in decision.predictions)


async def test_a_replayed_stream_folds_into_the_live_alert_instead_of_raising_another(
    platform: Platform,
    scoring: Scoring,
    start_recommendation: StartRecommendation,
    database: str,
) -> None:
    rec, customer, threshold = await start_with_crossing(
        platform, scoring, start_recommendation, "replay"
    )
    await platform.interactions.RecordInteraction(escalated(customer))
    await caught_up(rec)
    await rec.runtime.stop(grace=1)
    # As if the cursor had been lost: the whole stream is read again.
    conn = await asyncpg.connect(database)
    try:
        await conn.execute("UPDATE recommendation.alert_stream_cursor SET cursor = ''")
    finally:
        await conn.close()
    again = await start_recommendation(policy=escalation_policy(threshold))
    await caught_up(again)
    listed = await again.stub.ListAlerts(pb.ListAlertsRequest(team="support"))
    assert len(listed.alerts) == 1
    assert listed.alerts[0].occurrences == 2  # the replayed re-score folded in


async def support_events(rec: Recommendation) -> int:
    async with rec.runtime.pool.acquire() as conn:
        return int(
            await conn.fetchval("SELECT count(*) FROM alert_events WHERE 'support' = ANY(teams)")
        )


async def test_a_subscriber_resuming_from_its_cursor_gets_every_later_event_once(
    platform: Platform, scoring: Scoring, start_recommendation: StartRecommendation
) -> None:
    rec = await start_recommendation(policy=escalation_policy(0.0))
    customers = [await make_customer(platform, f"resume-{i}", at_risk=True) for i in range(3)]
    await caught_up(rec)
    stored = await support_events(rec)
    assert stored >= 3
    async with subscribed(rec, "support") as everything:
        await until(lambda: len(everything.events) >= stored, "every stored event")
    middle = stored // 2
    async with subscribed(rec, "support", from_cursor=everything.cursors[middle]) as resumed:
        await platform.interactions.RecordInteraction(escalated(customers[0]))
        await caught_up(rec)
        now_stored = await support_events(rec)
        assert now_stored > stored
        await until(lambda: len(resumed.events) >= now_stored - middle - 1, "the later events")
    async with subscribed(rec, "support") as again:
        await until(lambda: len(again.events) >= now_stored, "every event")
    # Each event after the cursor once, in the stream's order, then the new ones.
    assert resumed.cursors == again.cursors[middle + 1 :]
    assert again.cursors[:stored] == everything.cursors
    assert len(set(again.cursors)) == now_stored
    last = again.events[-1]
    assert last.type == pb.ALERT_EVENT_TYPE_UPDATED
    assert last.alert.customer_id == customers[0].customer_id

    async with subscribed(rec, "support", from_now=True) as live:
        await platform.interactions.RecordInteraction(
            record(interaction(customers[1].ref, "ticket.escalated", days_ago=0.01,
                               ticket_id=customers[1].ticket_id))
        )  # fmt: skip
        await until(lambda: len(live.events) >= 1, "a live event")
    assert live.events[0].alert.customer_id == customers[1].customer_id


async def test_routing_sends_churn_to_the_owner_team_or_the_segment_route_and_spends_capacity(
    platform: Platform, scoring: Scoring, start_recommendation: StartRecommendation
) -> None:
    rec = await start_recommendation(
        policy=policy(
            teams=[
                {"name": "accounts", "daily_capacity": 1},
                {"name": "enterprise-accounts"},
                {"name": "retention"},
            ],
            alerts=[
                {
                    "kind": "churn_risk",
                    "prediction": "churn",
                    "threshold": 0.0,
                    "default_team": "retention",
                }
            ],
            routing=[{"team": "enterprise-accounts", "segments": ["enterprise"]}],
        ),
        alerts_due_work_interval_s=0.05,
    )
    big = await make_customer(platform, "route-big", segment="enterprise")
    small = [await make_customer(platform, f"route-small-{i}", at_risk=True) for i in range(2)]
    await caught_up(rec)
    enterprise = await rec.stub.ListAlerts(pb.ListAlertsRequest(team="enterprise-accounts"))
    assert [a.customer_id for a in enterprise.alerts] == [big.customer_id]
    assert enterprise.alerts[0].kind == CHURN
    # The owner team (profile owner_team "accounts") takes one a day: the other waits.
    accounts = await rec.stub.ListAlerts(pb.ListAlertsRequest(team="accounts"))
    assert len(accounts.alerts) == 1
    assert accounts.alerts[0].customer_id in {c.customer_id for c in small}
    retention = await rec.stub.ListAlerts(pb.ListAlertsRequest(team="retention"))
    assert list(retention.alerts) == []

    [waiting] = [c.customer_id for c in small if c.customer_id != accounts.alerts[0].customer_id]
    async with subscribed(rec, "accounts", from_now=True) as team:
        rec.clock.advance(days=1)  # a new day: room for the waiting one
        await until(
            lambda: any(e.alert.customer_id == waiting for e in team.events),
            "the waiting alert announced",
        )
    [announced] = [e for e in team.events if e.alert.customer_id == waiting]
    assert announced.type == pb.ALERT_EVENT_TYPE_CREATED
    accounts = await rec.stub.ListAlerts(pb.ListAlertsRequest(team="accounts"))
    assert {a.customer_id for a in accounts.alerts} == {c.customer_id for c in small}


async def test_an_unacknowledged_alert_escalates_to_the_lead_team_past_its_deadline(
    platform: Platform, scoring: Scoring, start_recommendation: StartRecommendation
) -> None:
    rec, customer, _ = await start_with_crossing(
        platform,
        scoring,
        start_recommendation,
        "late",
        ack_deadline="PT30M",
        lead_team="support-leads",
    )
    await platform.interactions.RecordInteraction(escalated(customer))
    await caught_up(rec)
    [alert] = (await rec.stub.ListAlerts(pb.ListAlertsRequest(team="support"))).alerts
    assert alert.due_by.ToDatetime() > rec.clock().replace(tzinfo=None)
    async with subscribed(rec, "support-leads") as leads:
        assert leads.events == []
        rec.clock.advance(minutes=31)
        await until(lambda: len(leads.events) >= 1, "the escalation")
    event = leads.events[0]
    assert event.type == pb.ALERT_EVENT_TYPE_STATUS_CHANGED
    assert event.alert.status == pb.ALERT_STATUS_ESCALATED
    assert event.alert.escalated_to_team == "support-leads"
    # The lead team now sees it too; it can still be acknowledged.
    leads_list = await rec.stub.ListAlerts(pb.ListAlertsRequest(team="support-leads"))
    assert [a.alert_id for a in leads_list.alerts] == [alert.alert_id]
    acked = await rec.stub.AcknowledgeAlert(pb.AcknowledgeAlertRequest(alert_id=alert.alert_id))
    assert acked.alert.status == pb.ALERT_STATUS_ACKNOWLEDGED


async def test_no_cross_sell_alert_while_a_serious_escalation_is_open(
    platform: Platform, scoring: Scoring, start_recommendation: StartRecommendation
) -> None:
    rec = await start_recommendation(
        policy=policy(
            teams=[{"name": "support"}, {"name": "sales"}],
            arbitration={"serious_escalation_probability": 0.05},
            alerts=[
                {
                    "kind": "escalation_risk",
                    "prediction": "escalation",
                    "threshold": 0.0,
                    "default_team": "support",
                },
                {
                    "kind": "cross_sell_moment",
                    "prediction": "cross_sell",
                    "threshold": 0.0,
                    "default_team": "sales",
                },
            ],
        )
    )
    troubled = await make_customer(platform, "xsell-troubled", at_risk=True)
    happy = await make_customer(platform, "xsell-happy")
    await caught_up(rec)
    sales = await rec.stub.ListAlerts(
        pb.ListAlertsRequest(team="sales", statuses=[pb.ALERT_STATUS_OPEN])
    )
    assert {a.customer_id for a in sales.alerts} == {happy.customer_id}
    assert {a.product_id for a in sales.alerts} == {"tv", "router"}
    assert all(a.kind == CROSS_SELL for a in sales.alerts)
    # Raised before the ticket came along the stream, then withdrawn when it did.
    withheld = await rec.stub.ListAlerts(
        pb.ListAlertsRequest(team="sales", customer_id=troubled.customer_id)
    )
    for alert in withheld.alerts:
        assert alert.status == pb.ALERT_STATUS_DISMISSED
        assert alert.dismiss_reason == pb.ALERT_DISMISS_REASON_NOT_ACTIONABLE
    support = await rec.stub.ListAlerts(pb.ListAlertsRequest(team="support"))
    assert {a.customer_id for a in support.alerts} == {troubled.customer_id}


async def test_the_lifecycle_records_who_and_why_and_refuses_changes_to_final_alerts(
    platform: Platform, scoring: Scoring, start_recommendation: StartRecommendation
) -> None:
    rec = await start_recommendation(policy=escalation_policy(0.0))
    await make_customer(platform, "life", at_risk=True)
    await caught_up(rec)
    [alert] = (await rec.stub.ListAlerts(pb.ListAlertsRequest(team="support"))).alerts
    actor = common_pb2.Actor(name="ana", reason="on shift")
    other_team = (("converge-team", "sales"),)
    with pytest.raises(grpc.aio.AioRpcError) as hidden:
        await rec.stub.GetAlert(pb.GetAlertRequest(alert_id=alert.alert_id), metadata=other_team)
    assert hidden.value.code() == grpc.StatusCode.NOT_FOUND
    own = (("converge-team", "support"),)
    await rec.stub.GetAlert(pb.GetAlertRequest(alert_id=alert.alert_id), metadata=own)

    acked = await rec.stub.AcknowledgeAlert(
        pb.AcknowledgeAlertRequest(alert_id=alert.alert_id, actor=actor, idempotency_key="a1")
    )
    assert acked.alert.status == pb.ALERT_STATUS_ACKNOWLEDGED
    assigned = await rec.stub.AssignAlert(
        pb.AssignAlertRequest(alert_id=alert.alert_id, assignee="ana", idempotency_key="a2")
    )
    assert assigned.alert.status == pb.ALERT_STATUS_ASSIGNED
    assert assigned.alert.assignee == "ana"
    resolved = await rec.stub.ResolveAlert(
        pb.ResolveAlertRequest(alert_id=alert.alert_id, note="called back", idempotency_key="a3")
    )
    assert resolved.alert.status == pb.ALERT_STATUS_RESOLVED
    assert resolved.alert.status_note == "called back"
    # A repeat of a key changes nothing and answers the alert as it is.
    repeat = await rec.stub.AcknowledgeAlert(
        pb.AcknowledgeAlertRequest(alert_id=alert.alert_id, actor=actor, idempotency_key="a1")
    )
    assert repeat.alert.status == pb.ALERT_STATUS_RESOLVED
    with pytest.raises(grpc.aio.AioRpcError) as final:
        await rec.stub.DismissAlert(
            pb.DismissAlertRequest(
                alert_id=alert.alert_id, dismiss_reason=pb.ALERT_DISMISS_REASON_FALSE_POSITIVE
            )
        )
    assert final.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    async with subscribed(rec, "support") as history:
        await until(lambda: len(history.events) >= 4, "the lifecycle's events")
    changes = [e for e in history.events if e.type == pb.ALERT_EVENT_TYPE_STATUS_CHANGED]
    assert [e.alert.status for e in changes] == [
        pb.ALERT_STATUS_ACKNOWLEDGED,
        pb.ALERT_STATUS_ASSIGNED,
        pb.ALERT_STATUS_RESOLVED,
    ]
    assert changes[0].actor.name == "ana" and changes[0].actor.reason == "on shift"


async def test_bad_requests_are_invalid_argument_naming_the_field(
    recommendation: Recommendation,
) -> None:
    stub = recommendation.stub
    cases: list[tuple[Any, str]] = [
        (stub.ListAlerts(pb.ListAlertsRequest()), "team"),
        (stub.GetAlert(pb.GetAlertRequest(alert_id="nope")), "alert_id"),
        (
            stub.DismissAlert(
                pb.DismissAlertRequest(alert_id="8d4f1c9e-0000-4000-8000-000000000000")
            ),
            "dismiss_reason",
        ),
        (
            stub.AssignAlert(
                pb.AssignAlertRequest(alert_id="8d4f1c9e-0000-4000-8000-000000000000")
            ),
            "assignee",
        ),
    ]
    for call, field_name in cases:
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await call
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field_name in str(bad.value.details()) or field_name in str(
            bad.value.trailing_metadata()
        )
    stream = stub.SubscribeAlerts(pb.SubscribeAlertsRequest(team="support", from_cursor="x.y"))
    with pytest.raises(grpc.aio.AioRpcError) as malformed:
        async for _ in stream:
            pass
    assert malformed.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_the_command_line_tails_a_team_and_acknowledges_an_alert(
    platform: Platform, scoring: Scoring, start_recommendation: StartRecommendation
) -> None:
    import json
    import os
    import sys

    from converge.cli import main

    rec, customer, _ = await start_with_crossing(platform, scoring, start_recommendation, "cli")
    tail = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "converge.cli", "alerts", "tail", "--team", "support", "--json",
        "--recommendation", rec.runtime.address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=dict(os.environ),
    )  # fmt: skip
    try:
        assert tail.stdout is not None and tail.stderr is not None
        # It says so once it follows (from now on): then the alert is raised.
        following = await asyncio.wait_for(tail.stderr.readline(), 60)
        assert b"following the alerts of team support" in following
        await platform.interactions.RecordInteraction(escalated(customer))
        line = await asyncio.wait_for(tail.stdout.readline(), 60)
        event = json.loads(line)
        assert event["type"] == "ALERT_EVENT_TYPE_CREATED"
        assert event["alert"]["ticketId"] == customer.ticket_id
    finally:
        tail.kill()
        await tail.wait()
    alert_id = event["alert"]["alertId"]
    args = ["alerts", "ack", alert_id, "--by", "ana", "--recommendation", rec.runtime.address]
    assert await asyncio.to_thread(main, args) == 0
    got = await rec.stub.GetAlert(pb.GetAlertRequest(alert_id=alert_id))
    assert got.alert.status == pb.ALERT_STATUS_ACKNOWLEDGED
    assert await asyncio.to_thread(main, [*args, "--team", "sales"]) == 4


async def test_an_erased_customer_loses_their_alerts_and_never_gets_one_again(
    platform: Platform, scoring: Scoring, start_recommendation: StartRecommendation
) -> None:
    from converge.v1 import privacy_pb2
    from tests.recommendation.test_data_subjects import export_all

    rec = await start_recommendation(policy=escalation_policy(0.0))
    gone = await make_customer(platform, "erased", at_risk=True)
    await caught_up(rec)
    exported = await export_all(rec, gone.customer_id)
    assert [a["customer_id"] for a in exported["alerts"]] == [gone.customer_id]
    assert exported["alert_events"]
    erased = await rec.privacy.EraseCustomerData(
        privacy_pb2.EraseCustomerDataRequest(customer_ids=[gone.customer_id], erasure_id="e-1")
    )
    assert erased.erased_counts["alerts"] == 1
    assert erased.erased_counts["alert_events"] >= 1
    # An interaction of theirs read after the erasure raises nothing (the tombstone).
    await platform.interactions.RecordInteraction(escalated(gone))
    await caught_up(rec)
    listed = await rec.stub.ListAlerts(pb.ListAlertsRequest(team="support"))
    assert [a for a in listed.alerts if a.customer_id == gone.customer_id] == []
    after = await export_all(rec, gone.customer_id)
    assert not after.get("alerts") and not after.get("alert_events")


def _lifecycle_request(method: str, alert_id: str, **changed: Any) -> Any:
    actor = common_pb2.Actor(name="ana", reason=changed.pop("reason", "on shift"))
    if method == "AcknowledgeAlert":
        return pb.AcknowledgeAlertRequest(alert_id=alert_id, actor=actor, **changed)
    if method == "AssignAlert":
        return pb.AssignAlertRequest(
            alert_id=alert_id, actor=actor, assignee=changed.pop("assignee", "ana"), **changed
        )
    if method == "ResolveAlert":
        return pb.ResolveAlertRequest(
            alert_id=alert_id, actor=actor, note=changed.pop("note", "called back"), **changed
        )
    return pb.DismissAlertRequest(
        alert_id=alert_id,
        actor=actor,
        note=changed.pop("note", "not a risk"),
        dismiss_reason=pb.ALERT_DISMISS_REASON_FALSE_POSITIVE,
        **changed,
    )


# One field of each lifecycle request changed: another request.
_ANOTHER_REQUEST: dict[str, dict[str, str]] = {
    "AcknowledgeAlert": {"reason": "someone else's shift"},
    "AssignAlert": {"assignee": "bob"},
    "ResolveAlert": {"note": "never called"},
    "DismissAlert": {"note": "a duplicate"},
}


@pytest.mark.parametrize("method", sorted(_ANOTHER_REQUEST))
async def test_a_lifecycle_key_is_bound_to_its_request(
    platform: Platform, scoring: Scoring, start_recommendation: StartRecommendation, method: str
) -> None:
    rec = await start_recommendation(policy=escalation_policy(0.0))
    await make_customer(platform, "keyed", at_risk=True)
    await caught_up(rec)
    [alert] = (await rec.stub.ListAlerts(pb.ListAlertsRequest(team="support"))).alerts
    call = getattr(rec.stub, method)

    first = await call(_lifecycle_request(method, alert.alert_id, idempotency_key="k"))
    repeat = await call(_lifecycle_request(method, alert.alert_id, idempotency_key="k"))
    assert repeat.alert == first.alert, "the same request under its key: the first answer"

    another = _lifecycle_request(
        method, alert.alert_id, idempotency_key="k", **_ANOTHER_REQUEST[method]
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call(another)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in (refused.value.details() or "")
    # Another RPC under the same key is another request too.
    with pytest.raises(grpc.aio.AioRpcError) as other_rpc:
        await rec.stub.AcknowledgeAlert(
            pb.AcknowledgeAlertRequest(alert_id=alert.alert_id, idempotency_key="k")
        )
    assert other_rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = (await rec.stub.GetAlert(pb.GetAlertRequest(alert_id=alert.alert_id))).alert
    assert after == first.alert, "a refused request changes nothing"


async def test_concurrent_requests_under_one_key_apply_one_and_refuse_the_others(
    platform: Platform, scoring: Scoring, start_recommendation: StartRecommendation
) -> None:
    rec = await start_recommendation(policy=escalation_policy(0.0))
    await make_customer(platform, "raced", at_risk=True)
    await caught_up(rec)
    [alert] = (await rec.stub.ListAlerts(pb.ListAlertsRequest(team="support"))).alerts
    assignees = ["ana", "bob", "cy", "dee"]
    answers = await asyncio.gather(
        *(
            rec.stub.AssignAlert(
                pb.AssignAlertRequest(alert_id=alert.alert_id, assignee=name, idempotency_key="k")
            )
            for name in assignees
        ),
        return_exceptions=True,
    )
    applied = [a for a in answers if isinstance(a, pb.AssignAlertResponse)]
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(applied) == 1 and len(refused) == len(assignees) - 1, answers
    assert {e.code() for e in refused} == {grpc.StatusCode.INVALID_ARGUMENT}
    after = (await rec.stub.GetAlert(pb.GetAlertRequest(alert_id=alert.alert_id))).alert
    assert after.assignee == applied[0].alert.assignee

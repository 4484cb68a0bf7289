"""RecordOutcome over real gRPC and PostgreSQL with identity and interactions
running: the "action.outcome" interaction written, the outcome attached to
the decision, the contact ledger told, control-group outcomes recorded
against the held-out action, idempotency, and the request's checks.

Decisions are written straight into the decision log (DecisionStore.insert,
the decisions area's own writer) so each test fixes exactly which actions
were proposed and which held out; test_outcomes_recommend.py records
outcomes of real Recommend answers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from converge.recommendation.contact.store import ContactLedger, ContactRecord
from converge.recommendation.decisions.service import FixedPolicy
from converge.recommendation.decisions.store import DecisionRecord, DecisionStore
from converge.recommendation.policy.model import ActivePolicy, Policy
from converge.runtime.values import timestamp
from converge.v1 import common_pb2, interactions_pb2, privacy_pb2
from converge.v1 import recommendation_pb2 as pb
from tests.conftest import Platform
from tests.recommendation.conftest import Recommendation, StartRecommendation, make_customer
from tests.waiting import wait_until

pytestmark = pytest.mark.slow


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields


@pytest.fixture
async def log(database: str, recommendation: Recommendation) -> AsyncIterator[asyncpg.Pool]:
    """A pool on the recommendation schema (migrated by the running service)."""
    pool = await asyncpg.create_pool(
        database, min_size=1, max_size=2, server_settings={"search_path": "recommendation"}
    )
    assert pool is not None
    yield pool
    await pool.close()


def a_decision(customer_id: str, decided_at: datetime, **fields: Any) -> pb.Decision:
    """A logged decision: a retention offer by email (a1, top-ranked), a
    cross-sell of "tv" (a2), and the support call held out for its control
    group."""
    decision = pb.Decision(
        decision_id=str(uuid.uuid4()),
        trigger=pb.DECISION_TRIGGER_RECOMMEND,
        customer_id=customer_id,
        channel=common_pb2.CHANNEL_WEB,
        policy_version="default",
        actions=[
            pb.RecommendedAction(
                action_id="a1",
                rank=1,
                kind=pb.ACTION_KIND_RETENTION_OFFER,
                action_name="retention_discount",
                contact_channel=common_pb2.CONTACT_CHANNEL_EMAIL,
            ),
            pb.RecommendedAction(
                action_id="a2",
                rank=2,
                kind=pb.ACTION_KIND_CROSS_SELL_OFFER,
                action_name="cross_sell",
                product_id="tv",
            ),
        ],
        suppressed=[
            pb.SuppressedAction(
                kind=pb.ACTION_KIND_PROACTIVE_SUPPORT_CALL,
                action_name="support_call",
                reasons=[pb.SUPPRESSION_REASON_CONTROL_GROUP],
            ),
            pb.SuppressedAction(
                kind=pb.ACTION_KIND_ESCALATE_TO_SENIOR_AGENT,
                action_name="senior_agent",
                reasons=[pb.SUPPRESSION_REASON_ARBITRATION],
            ),
        ],
        decided_at=timestamp(decided_at),
    )
    for name, value in fields.items():
        setattr(decision, name, value)
    return decision


async def log_decision(pool: asyncpg.Pool, decision: pb.Decision) -> None:
    async with pool.acquire() as conn, conn.transaction():
        written = await DecisionStore(pool).insert(
            conn,
            DecisionRecord(
                decision_id=decision.decision_id,
                customer_id=decision.customer_id,
                decided_at=decision.decided_at.ToDatetime(tzinfo=UTC),
                trigger="recommend",
                policy_version=decision.policy_version,
                body=decision.SerializeToString(),
            ),
        )
        assert written
        await ContactLedger(pool).record(
            conn,
            [
                ContactRecord(
                    customer_id=decision.customer_id,
                    decision_id=decision.decision_id,
                    action_id="a1",
                    action_name="retention_discount",
                    action_kind="retention_offer",
                    channel="email",
                    proposed_at=decision.decided_at.ToDatetime(tzinfo=UTC),
                )
            ],
        )


async def outcome_rows(pool: asyncpg.Pool, decision_id: str) -> Sequence[asyncpg.Record]:
    async with pool.acquire() as conn:
        return await conn.fetch(
            "SELECT * FROM decision_outcomes WHERE decision_id = $1 ORDER BY occurred_at, action_id",
            decision_id,
        )


@pytest.fixture
async def decision(recommendation: Recommendation, log: asyncpg.Pool) -> pb.Decision:
    customer = await make_customer(recommendation.platform, f"o{uuid.uuid4().hex[:8]}")
    logged = a_decision(customer.customer_id, recommendation.clock())
    await log_decision(log, logged)
    return logged


async def test_outcome_of_the_top_action_is_an_interaction_and_attached_to_the_decision(
    recommendation: Recommendation, log: asyncpg.Pool, decision: pb.Decision
) -> None:
    recommendation.clock.advance(hours=2)
    answer = await recommendation.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=decision.decision_id,
            outcome=pb.ACTION_OUTCOME_CONVERTED,
            value=common_pb2.Money(currency_code="EUR", units=120, nanos=500_000_000),
            attributes={"offer_code": common_pb2.AttributeValue(string_value="SAVE20")},
            actor=common_pb2.Actor(name="agent-7"),
        )
    )
    assert answer.interaction_id and not answer.duplicate

    stored = await recommendation.platform.interactions.GetInteraction(
        interactions_pb2.GetInteractionRequest(interaction_id=answer.interaction_id)
    )
    interaction = stored.interaction
    assert interaction.type == "action.outcome"
    assert interaction.customer_id == decision.customer_id
    assert interaction.channel == common_pb2.CHANNEL_WEB  # the decision's channel
    assert interaction.source == "recommendation"
    assert interaction.amount.units == 120 and interaction.amount.nanos == 500_000_000
    attributes = {k: v.string_value for k, v in interaction.attributes.items()}
    assert attributes == {
        "decision_id": decision.decision_id,
        "action_id": "a1",
        "action_kind": "retention_offer",
        "outcome": "converted",
    }
    assert interaction.occurred_at.ToDatetime(tzinfo=recommendation.clock().tzinfo) == (
        recommendation.clock()
    )

    rows = await outcome_rows(log, decision.decision_id)
    assert [(r["action_id"], r["arm"], r["outcome"]) for r in rows] == [
        ("a1", "treatment", "converted")
    ]
    assert rows[0]["interaction_id"] == answer.interaction_id
    assert str(rows[0]["value"]) == "120.5000" and rows[0]["currency"] == "EUR"
    assert rows[0]["actor"] == "agent-7"
    # (this pool has no jsonb codec: the text as stored)
    assert json.loads(rows[0]["attributes"]) == {"offer_code": {"s": "SAVE20"}}
    # The decisions store reads them for Decision.outcomes.
    replayed = await DecisionStore(log).get(decision.decision_id)
    assert replayed is not None
    assert [(o.action_id, o.outcome) for o in replayed.outcomes] == [("a1", "converted")]


async def test_a_named_action_and_a_declined_outcome_reach_the_contact_ledger(
    recommendation: Recommendation, log: asyncpg.Pool, decision: pb.Decision
) -> None:
    ledger = ContactLedger(log)
    since = recommendation.clock() - timedelta(days=1)
    async with log.acquire() as conn:
        before = await ledger.history(conn, decision.customer_id, since)
    assert [e.declined_at for e in before] == [None]

    recommendation.clock.advance(minutes=30)
    await recommendation.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=decision.decision_id,
            action_id="a1",
            outcome=pb.ACTION_OUTCOME_DECLINED,
            channel=common_pb2.CHANNEL_PHONE,
        )
    )
    async with log.acquire() as conn:
        after = await ledger.history(conn, decision.customer_id, since)
    # The rejection starts the cool-down from when it happened.
    assert [e.declined_at for e in after] == [recommendation.clock()]

    await recommendation.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=decision.decision_id, action_id="a2", outcome=pb.ACTION_OUTCOME_ACCEPTED
        )
    )
    rows = await outcome_rows(log, decision.decision_id)
    assert [(r["action_id"], r["action_name"], r["product_id"], r["outcome"]) for r in rows] == [
        ("a1", "retention_discount", "", "declined"),
        ("a2", "cross_sell", "tv", "accepted"),
    ]


async def test_control_group_outcome_is_recorded_against_the_held_out_action(
    recommendation: Recommendation, log: asyncpg.Pool, decision: pb.Decision
) -> None:
    answer = await recommendation.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=decision.decision_id,
            action_id="support_call",
            outcome=pb.ACTION_OUTCOME_CONVERTED,
        )
    )
    rows = await outcome_rows(log, decision.decision_id)
    assert [(r["action_id"], r["action_kind"], r["arm"], r["outcome"]) for r in rows] == [
        ("support_call", "proactive_support_call", "control", "converted")
    ]
    stored = await recommendation.platform.interactions.GetInteraction(
        interactions_pb2.GetInteractionRequest(interaction_id=answer.interaction_id)
    )
    assert stored.interaction.attributes["action_id"].string_value == "support_call"
    # An action withheld for another reason is not a control: it has no outcome.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await recommendation.stub.RecordOutcome(
            pb.RecordOutcomeRequest(
                decision_id=decision.decision_id,
                action_id="senior_agent",
                outcome=pb.ACTION_OUTCOME_CONVERTED,
            )
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND


async def test_same_key_has_no_second_effect_and_another_request_is_refused(
    recommendation: Recommendation, log: asyncpg.Pool, decision: pb.Decision
) -> None:
    request = pb.RecordOutcomeRequest(
        decision_id=decision.decision_id,
        outcome=pb.ACTION_OUTCOME_ACCEPTED,
        idempotency_key="agent-7:click-1",
    )
    first = await recommendation.stub.RecordOutcome(request)
    again = await recommendation.stub.RecordOutcome(request)
    assert not first.duplicate and again.duplicate
    assert again.interaction_id == first.interaction_id
    assert len(await outcome_rows(log, decision.decision_id)) == 1

    other = pb.RecordOutcomeRequest()
    other.CopyFrom(request)
    other.outcome = pb.ACTION_OUTCOME_DECLINED
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await recommendation.stub.RecordOutcome(other)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(refused.value) == ["idempotency_key"]
    assert len(await outcome_rows(log, decision.decision_id)) == 1


async def test_concurrent_requests_with_one_key_record_once(
    recommendation: Recommendation, log: asyncpg.Pool, decision: pb.Decision
) -> None:
    request = pb.RecordOutcomeRequest(
        decision_id=decision.decision_id,
        outcome=pb.ACTION_OUTCOME_PRESENTED,
        idempotency_key="race",
    )
    answers = await asyncio.gather(*(recommendation.stub.RecordOutcome(request) for _ in range(6)))
    assert len({a.interaction_id for a in answers}) == 1
    assert sum(not a.duplicate for a in answers) == 1
    assert len(await outcome_rows(log, decision.decision_id)) == 1


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, ["subject", "outcome"]),
        ({"decision_id": "", "outcome": pb.ACTION_OUTCOME_ACCEPTED}, ["decision_id"]),
        ({"decision_id": "d", "outcome": 99}, ["outcome"]),
        ({"decision_id": "d", "outcome": pb.ACTION_OUTCOME_ACCEPTED, "channel": 99}, ["channel"]),
        (
            {
                "decision_id": "d",
                "outcome": pb.ACTION_OUTCOME_ACCEPTED,
                "value": common_pb2.Money(currency_code="EUR", units=5),
            },
            ["value"],
        ),
        (
            {
                "decision_id": "d",
                "outcome": pb.ACTION_OUTCOME_CONVERTED,
                "value": common_pb2.Money(currency_code="euro", units=-5),
            },
            ["value", "value.currency_code"],
        ),
        (
            {
                "decision_id": "d",
                "outcome": pb.ACTION_OUTCOME_ACCEPTED,
                "attributes": {
                    "outcome": common_pb2.AttributeValue(string_value="x"),
                    "Bad-Name": common_pb2.AttributeValue(number_value=1),
                    "empty": common_pb2.AttributeValue(),
                },
            },
            ["attributes[Bad-Name]", "attributes[empty]", "attributes[outcome]"],
        ),
        (
            {"decision_id": "d", "outcome": 2, "idempotency_key": "k" * 300},
            ["idempotency_key"],
        ),
    ],
)
async def test_bad_requests_name_their_fields(
    recommendation: Recommendation, fields: dict[str, Any], expected: list[str]
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await recommendation.stub.RecordOutcome(pb.RecordOutcomeRequest(**fields))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(bad_fields(refused.value)) == sorted(expected)


async def test_times_are_checked_against_the_decision_and_the_clock(
    recommendation: Recommendation, decision: pb.Decision
) -> None:
    for when, field in [
        (recommendation.clock() - timedelta(minutes=1), "occurred_at"),
        (recommendation.clock() + timedelta(minutes=6), "occurred_at"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await recommendation.stub.RecordOutcome(
                pb.RecordOutcomeRequest(
                    decision_id=decision.decision_id,
                    outcome=pb.ACTION_OUTCOME_ACCEPTED,
                    occurred_at=timestamp(when),
                )
            )
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad_fields(refused.value) == [field]


async def test_unknown_decision_action_and_alert_are_not_found(
    recommendation: Recommendation, decision: pb.Decision
) -> None:
    requests = [
        pb.RecordOutcomeRequest(decision_id=str(uuid.uuid4()), outcome=2),
        pb.RecordOutcomeRequest(decision_id="not-a-uuid", outcome=2),
        pb.RecordOutcomeRequest(decision_id=decision.decision_id, action_id="a9", outcome=2),
        pb.RecordOutcomeRequest(alert_id=str(uuid.uuid4()), outcome=2),
    ]
    for request in requests:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await recommendation.stub.RecordOutcome(request)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND, request


async def test_outcome_of_an_alert_is_recorded_against_the_decision_behind_it(
    start_recommendation: StartRecommendation, platform: Platform, database: str
) -> None:
    # Every escalation score raises a support alert suggesting the call.
    policy = FixedPolicy(
        ActivePolicy(
            "alerts-1",
            Policy.model_validate(
                {
                    "actions": [
                        {
                            "name": "support_call",
                            "kind": "proactive_support_call",
                            "prediction": "escalation",
                            "value": 80,
                            "cost": 15,
                        }
                    ],
                    "teams": [{"name": "support"}],
                    "alerts": [
                        {
                            "kind": "escalation_risk",
                            "prediction": "escalation",
                            "threshold": 0.0,
                            "default_team": "support",
                            "action": "support_call",
                        }
                    ],
                }
            ),
        )
    )
    await make_customer(platform, f"alert{uuid.uuid4().hex[:6]}", at_risk=True)
    service = await start_recommendation(policy=policy)

    async def alerts() -> list[pb.Alert]:
        listed = await service.stub.ListAlerts(pb.ListAlertsRequest(team="support"))
        return list(listed.alerts)

    [alert] = await wait_until(alerts, lambda found: len(found) > 0, what="a support alert")
    service.clock.advance(hours=1)
    answer = await service.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            alert_id=alert.alert_id,
            outcome=pb.ACTION_OUTCOME_ACCEPTED,
            channel=common_pb2.CHANNEL_PHONE,
        )
    )
    stored = await platform.interactions.GetInteraction(
        interactions_pb2.GetInteractionRequest(interaction_id=answer.interaction_id)
    )
    attributes = {k: v.string_value for k, v in stored.interaction.attributes.items()}
    assert attributes == {
        "alert_id": alert.alert_id,
        "decision_id": alert.decision_id,
        "action_id": "support_call",
        "action_kind": "escalation_risk",
        "outcome": "accepted",
    }
    async with service.runtime.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT alert_id, action_name, arm FROM decision_outcomes WHERE decision_id = $1",
            alert.decision_id,
        )
    assert [tuple(r) for r in rows] == [(alert.alert_id, "support_call", "treatment")]

    # The alert's decision names no channel: the outcome must.
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await service.stub.RecordOutcome(
            pb.RecordOutcomeRequest(alert_id=alert.alert_id, outcome=pb.ACTION_OUTCOME_CONVERTED)
        )
    assert bad_fields(refused.value) == ["channel"]
    # Another action than the alert's suggestion is not found.
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await service.stub.RecordOutcome(
            pb.RecordOutcomeRequest(
                alert_id=alert.alert_id,
                action_id="retention_offer",
                outcome=pb.ACTION_OUTCOME_CONVERTED,
                channel=common_pb2.CHANNEL_PHONE,
            )
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_outcomes_are_exported_and_erased_with_the_customer(
    recommendation: Recommendation, log: asyncpg.Pool, decision: pb.Decision
) -> None:
    await recommendation.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=decision.decision_id,
            outcome=pb.ACTION_OUTCOME_ACCEPTED,
            idempotency_key="export-me",
            attributes={"note_code": common_pb2.AttributeValue(string_value="n1")},
        )
    )
    exported = await recommendation.privacy.ExportCustomerData(
        privacy_pb2.ExportCustomerDataRequest(customer_ids=[decision.customer_id])
    )
    [section] = [s for s in exported.sections if s.kind == "outcomes"]
    [record] = section.records
    assert record["decision_id"] == decision.decision_id
    assert record["outcome"] == "accepted"
    assert record["attributes"]["note_code"]["s"] == "n1"

    erased = await recommendation.privacy.EraseCustomerData(
        privacy_pb2.EraseCustomerDataRequest(customer_ids=[decision.customer_id], erasure_id="e")
    )
    assert erased.erased_counts["outcomes"] == 1
    assert erased.erased_counts["outcome_requests"] == 1
    assert await outcome_rows(log, decision.decision_id) == []
    # The decision went with it: a later outcome is refused, nothing comes back.
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await recommendation.stub.RecordOutcome(
            pb.RecordOutcomeRequest(decision_id=decision.decision_id, outcome=2)
        )
    assert late.value.code() == grpc.StatusCode.NOT_FOUND


async def test_an_outcome_whose_decision_left_the_log_meanwhile_is_not_written(
    recommendation: Recommendation, log: asyncpg.Pool, decision: pb.Decision
) -> None:
    # RecordOutcome read the decision, then an erasure deleted it before the
    # outcome's transaction: the store refuses rather than keep an outcome
    # of an erased customer.
    from converge.recommendation.outcomes.store import DecisionGone, NewOutcome, OutcomeStore

    async with log.acquire() as conn:
        await conn.execute(
            "DELETE FROM decisions WHERE decision_id = $1", uuid.UUID(decision.decision_id)
        )
    now = recommendation.clock()
    with pytest.raises(DecisionGone):
        await OutcomeStore(log).record(
            NewOutcome(
                outcome_id=uuid.uuid4(),
                decision_id=decision.decision_id,
                alert_id="",
                customer_id=uuid.UUID(decision.customer_id),
                action_id="a1",
                action_name="retention_discount",
                action_kind="retention_offer",
                product_id="",
                arm="treatment",
                outcome="accepted",
                value=None,
                currency="",
                occurred_at=now,
                recorded_at=now,
                interaction_id="i",
                attributes={},
                actor="",
                policy_version="default",
                decided_at=now,
            )
        )
    assert await outcome_rows(log, decision.decision_id) == []


async def test_concurrent_different_requests_with_one_key_record_one_and_write_one_interaction(
    recommendation: Recommendation, log: asyncpg.Pool, decision: pb.Decision
) -> None:
    # The key is claimed before the interaction is written: whichever request
    # claims it, the interaction written is that request's, and the others
    # are refused without writing one.
    requests = [
        pb.RecordOutcomeRequest(
            decision_id=decision.decision_id, outcome=outcome, idempotency_key="contested"
        )
        for outcome in [pb.ACTION_OUTCOME_ACCEPTED, pb.ACTION_OUTCOME_DECLINED] * 4
    ]
    answers = await asyncio.gather(
        *(recommendation.stub.RecordOutcome(r) for r in requests), return_exceptions=True
    )
    recorded = [a for a in answers if isinstance(a, pb.RecordOutcomeResponse)]
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(recorded) + len(refused) == len(requests)
    assert {e.code() for e in refused} <= {grpc.StatusCode.INVALID_ARGUMENT}
    assert len({a.interaction_id for a in recorded}) == 1
    assert sum(not a.duplicate for a in recorded) == 1
    [row] = await outcome_rows(log, decision.decision_id)
    stored = await recommendation.platform.interactions.GetInteraction(
        interactions_pb2.GetInteractionRequest(interaction_id=recorded[0].interaction_id)
    )
    assert stored.interaction.attributes["outcome"].string_value == row["outcome"]
    # Only the winner's interaction exists for this decision.
    listed = await recommendation.platform.interactions.ListInteractions(
        interactions_pb2.ListInteractionsRequest(
            customer=common_pb2.CustomerRef(customer_id=decision.customer_id),
            types=["action.outcome"],
        )
    )
    assert [i.interaction_id for i in listed.interactions] == [recorded[0].interaction_id]

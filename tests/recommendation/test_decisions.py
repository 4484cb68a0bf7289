"""The decision log over real gRPC and PostgreSQL: reads of unknown
decisions, checks of list requests, and the retention horizon on the
service's clock."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest

from converge.v1 import common_pb2, recommendation_pb2
from tests.conftest import Platform
from tests.recommendation.conftest import Recommendation, StartRecommendation, make_customer
from tests.recommendation.test_recommend import bad_fields, small_policy
from tests.waiting import wait_until

pb = recommendation_pb2


async def test_an_unknown_decision_is_not_found(recommendation: Recommendation) -> None:
    for decision_id in ("00000000-0000-4000-8000-000000000000", "not-a-decision"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await recommendation.stub.GetDecision(pb.GetDecisionRequest(decision_id=decision_id))
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND

    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await recommendation.stub.GetDecision(pb.GetDecisionRequest())
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == ["decision_id"]


@pytest.mark.parametrize(
    ("request_fields", "named"),
    [
        ({}, "customer"),
        ({"triggers": [99]}, "triggers[0]"),
        ({"page": common_pb2.PageRequest(page_token="forged")}, "page.page_token"),
        ({"page": common_pb2.PageRequest(page_size=-1)}, "page.page_size"),
    ],
)
async def test_bad_list_requests_name_the_field(
    recommendation: Recommendation, request_fields: dict[str, object], named: str
) -> None:
    fields = dict(request_fields)
    if named != "customer":
        fields["customer"] = common_pb2.CustomerRef(
            customer_id="00000000-0000-4000-8000-000000000000"
        )
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await recommendation.stub.ListDecisions(pb.ListDecisionsRequest(**fields))  # type: ignore[arg-type]
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(raised.value) == [named]


async def test_decisions_past_the_retention_horizon_are_purged(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    service = await start_recommendation(
        policy=small_policy(), decision_retention_days=30, decision_purge_interval_s=0.05
    )
    customer = await make_customer(platform, "old")
    old = await service.stub.Recommend(
        pb.RecommendRequest(customer=customer.ref, channel=common_pb2.CHANNEL_WEB)
    )
    service.clock.advance(timedelta(days=20))
    recent = await service.stub.Recommend(
        pb.RecommendRequest(customer=customer.ref, channel=common_pb2.CHANNEL_WEB)
    )

    service.clock.advance(timedelta(days=11))  # the first is now 31 days old, the second 11

    async def old_one() -> grpc.StatusCode:
        try:
            await service.stub.GetDecision(pb.GetDecisionRequest(decision_id=old.decision_id))
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    await wait_until(
        old_one, lambda code: code == grpc.StatusCode.NOT_FOUND, what="the old decision purged"
    )
    kept = await service.stub.GetDecision(pb.GetDecisionRequest(decision_id=recent.decision_id))
    assert kept.decision.decision_id == recent.decision_id


async def test_get_decision_shows_the_outcomes_recorded_since(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    service = await start_recommendation(policy=small_policy())
    customer = await make_customer(platform, "outcome")
    answer = await service.stub.Recommend(
        pb.RecommendRequest(customer=customer.ref, channel=common_pb2.CHANNEL_WEB)
    )
    before = await service.stub.GetDecision(pb.GetDecisionRequest(decision_id=answer.decision_id))

    recorded = await service.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=answer.decision_id,
            action_id=answer.actions[0].action_id,
            outcome=pb.ACTION_OUTCOME_ACCEPTED,
            channel=common_pb2.CHANNEL_WEB,
            idempotency_key="accepted-1",
        )
    )
    after = await service.stub.GetDecision(pb.GetDecisionRequest(decision_id=answer.decision_id))

    assert list(before.decision.outcomes) == []
    assert [(o.action_id, o.outcome, o.interaction_id) for o in after.decision.outcomes] == [
        (answer.actions[0].action_id, pb.ACTION_OUTCOME_ACCEPTED, recorded.interaction_id)
    ]
    # Everything else is the decision as it was shown.
    after.decision.ClearField("outcomes")
    assert after.decision == before.decision

"""Recommend over real gRPC with identity, interactions and scoring running."""

from __future__ import annotations

from converge.v1 import predictions_pb2, scoring_pb2
from tests.conftest import Platform
from tests.recommendation.conftest import Recommendation, Scoring, make_customer


async def test_the_fixtures_start_every_peer_and_scoring_answers_on_its_rules(
    platform: Platform, scoring: Scoring, recommendation: Recommendation
) -> None:
    customer = await make_customer(platform, "fixtures", at_risk=True)
    answer = await scoring.stub.Score(
        scoring_pb2.ScoreRequest(
            customer=customer.by_email,
            ticket_id=customer.ticket_id,
            candidate_product_ids=["tv", "router"],
        )
    )
    kinds = [p.kind for p in answer.predictions]
    assert kinds[:2] == [
        predictions_pb2.PREDICTION_KIND_CHURN,
        predictions_pb2.PREDICTION_KIND_ESCALATION,
    ]
    assert all(p.fallback_used for p in answer.predictions)
    assert answer.customer_id == customer.customer_id
    assert recommendation.runtime.port > 0

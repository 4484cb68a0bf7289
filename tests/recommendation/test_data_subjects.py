"""The recommendation service's DataSubjectService over real gRPC: a
customer's decisions and contact ledger exported, then erased, and a
decision written after the erasure never brings the customer back."""

from __future__ import annotations

import grpc
import pytest

from converge.v1 import common_pb2, privacy_pb2, recommendation_pb2
from tests.conftest import Platform
from tests.recommendation.conftest import Recommendation, StartRecommendation, make_customer
from tests.recommendation.test_recommend import small_policy

pb = recommendation_pb2


async def export_all(service: Recommendation, customer_id: str) -> dict[str, list[dict]]:
    sections: dict[str, list[dict]] = {}
    token = ""
    while True:
        page = await service.privacy.ExportCustomerData(
            privacy_pb2.ExportCustomerDataRequest(customer_ids=[customer_id], page_token=token)
        )
        assert page.service == "recommendation"
        for section in page.sections:
            sections.setdefault(section.kind, []).extend(
                {k: v for k, v in record.items()} for record in section.records
            )
        token = page.next_page_token
        if not token:
            return sections


async def test_a_customer_is_exported_then_erased_and_a_late_decision_does_not_bring_them_back(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    service = await start_recommendation(policy=small_policy(), max_page_bytes=2048)
    customer = await make_customer(platform, "forget")
    other = await make_customer(platform, "keep")
    decided = [
        (await service.stub.Recommend(
            pb.RecommendRequest(customer=customer.ref, channel=common_pb2.CHANNEL_WEB)
        )).decision_id
        for _ in range(3)
    ]  # fmt: skip
    kept = await service.stub.Recommend(
        pb.RecommendRequest(customer=other.ref, channel=common_pb2.CHANNEL_WEB)
    )

    exported = await export_all(service, customer.customer_id)
    erased = await service.privacy.EraseCustomerData(
        privacy_pb2.EraseCustomerDataRequest(customer_ids=[customer.customer_id], erasure_id="e-1")
    )
    again = await service.privacy.EraseCustomerData(
        privacy_pb2.EraseCustomerDataRequest(customer_ids=[customer.customer_id], erasure_id="e-1")
    )
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await service.stub.Recommend(
            pb.RecommendRequest(customer=customer.ref, channel=common_pb2.CHANNEL_WEB)
        )
    after = await export_all(service, customer.customer_id)
    listed = await service.stub.ListDecisions(pb.ListDecisionsRequest(customer=customer.ref))

    # The export pages under 2 KiB each and holds every decision, in full.
    assert sorted(r["decision_id"] for r in exported["decisions"]) == sorted(decided)
    assert all(r["decision"]["customerId"] == customer.customer_id for r in exported["decisions"])
    assert all(r["decision"]["actions"] for r in exported["decisions"])
    assert len(exported["contacts"]) == 3
    assert erased.erased_counts["decisions"] == 3
    assert erased.erased_counts["contacts"] == 3
    assert again.erased_counts["decisions"] == 0
    # Identity still knows the customer here (only this service erased it):
    # the decision made after the erasure is refused, not stored.
    assert late.value.code() == grpc.StatusCode.NOT_FOUND
    assert all(not records for records in after.values())
    assert list(listed.decisions) == []
    # The other customer is untouched.
    got = await service.stub.GetDecision(pb.GetDecisionRequest(decision_id=kept.decision_id))
    assert got.decision.customer_id == other.customer_id


async def test_export_refuses_a_token_it_did_not_issue(recommendation: Recommendation) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await recommendation.privacy.ExportCustomerData(
            privacy_pb2.ExportCustomerDataRequest(
                customer_ids=["00000000-0000-4000-8000-000000000000"], page_token="nonsense"
            )
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_malformed_customer_id_is_refused_naming_it(recommendation: Recommendation) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await recommendation.privacy.EraseCustomerData(
            privacy_pb2.EraseCustomerDataRequest(customer_ids=["not-an-id"], erasure_id="e-2")
        )
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "customer_ids[0]" in str(raised.value.details())

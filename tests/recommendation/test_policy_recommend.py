"""An activated policy, and the shipped default activated again, reach
Recommend on every replica without a restart: identity, interactions and scoring running for real (the shared
fixtures of conftest.py), two replicas on one database."""

from __future__ import annotations

from converge.recommendation.policy.service import (
    default_policy,
    default_policy_text,
    load_policy_text,
)
from converge.v1 import common_pb2
from converge.v1 import recommendation_pb2 as pb
from tests.conftest import Platform
from tests.recommendation.conftest import StartRecommendation, make_treated_customer
from tests.waiting import wait_until


async def test_recommend_on_another_replica_applies_the_activated_version(
    platform: Platform, start_recommendation: StartRecommendation
) -> None:
    # Polls far apart: only the activation's notification switches the second replica.
    first = await start_recommendation(policy_poll_interval_s=3600)
    second = await start_recommendation(policy_poll_interval_s=3600)
    # Version 1: the same support call under another name.
    text = default_policy_text()
    for old in ("  - name: proactive_support_call\n", "    action: proactive_support_call\n"):
        assert text.count(old) == 1
        text = text.replace(old, old.replace("proactive_support_call", "support_call_v1"))
    # Each customer outside the support call's control group of the version
    # it is asked under (a new name draws new groups).
    customers = [
        await make_treated_customer(
            platform, "risky", default_policy().policy, ["proactive_support_call"], at_risk=True
        ),
        await make_treated_customer(
            platform, "risky2", load_policy_text(text), ["support_call_v1"], at_risk=True
        ),
        await make_treated_customer(
            platform, "risky3", default_policy().policy, ["proactive_support_call"], at_risk=True
        ),
    ]

    async def recommend(customer_index: int) -> pb.RecommendResponse:
        customer = customers[customer_index]
        answer: pb.RecommendResponse = await second.stub.Recommend(
            pb.RecommendRequest(
                customer=customer.by_email,
                channel=common_pb2.CHANNEL_WEB,
                ticket_id=customer.ticket_id,
            )
        )
        return answer

    before = await recommend(0)
    assert before.policy_version == "default"
    assert before.actions[0].action_name == "proactive_support_call"

    created = await first.stub.CreatePolicyVersion(
        pb.CreatePolicyVersionRequest(yaml=text, actor=common_pb2.Actor(name="alice"))
    )
    version = created.policy.version
    await first.stub.ActivatePolicy(pb.ActivatePolicyRequest(version=version))

    async def applied() -> str:
        return (await second.stub.GetPolicy(pb.GetPolicyRequest())).policy.version

    await wait_until(applied, lambda v: v == version, what="the second replica on version 1")
    # (Another customer: the first one's support call is in its cool-down now.)
    after = await recommend(1)
    assert after.policy_version == version
    assert after.actions[0].action_name == "support_call_v1"
    logged = await second.stub.GetDecision(pb.GetDecisionRequest(decision_id=after.decision_id))
    assert logged.decision.policy_version == version

    # Back to the shipped default, activated on the first replica: the second follows.
    await first.stub.ActivatePolicy(
        pb.ActivatePolicyRequest(version="default", expected_active_version=version)
    )
    await wait_until(applied, lambda v: v == "default", what="the second replica on the default")
    back = await recommend(2)
    assert back.policy_version == "default"
    assert back.actions[0].action_name == "proactive_support_call"

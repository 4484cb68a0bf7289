"""Outcomes of real Recommend answers, end to end: a policy with a control
group, customers in both arms, RecordOutcome against the proposed action and
against the held-out one, and `converge actions report --json` over the
service's database counting what happened."""

from __future__ import annotations

import asyncio
import itertools
import json
from datetime import timedelta

import pytest

from converge.cli import main
from converge.recommendation.decisions.service import FixedPolicy
from converge.recommendation.outcomes.control import in_control_group
from converge.recommendation.outcomes.report import newcombe_interval
from converge.recommendation.policy.model import ActivePolicy, Policy
from converge.v1 import common_pb2
from converge.v1 import recommendation_pb2 as pb
from tests.conftest import Platform
from tests.recommendation.conftest import StartRecommendation, make_customer

pytestmark = pytest.mark.slow

ACTION = "courtesy_call"


def control_policy(salt: str) -> FixedPolicy:
    """One in-conversation courtesy call for every smb customer, half of them
    held out at random, and do_nothing."""
    return FixedPolicy(
        ActivePolicy(
            "lift-1",
            Policy.model_validate(
                {
                    "control_salt": salt,
                    "actions": [
                        {
                            "name": ACTION,
                            "kind": "proactive_support_call",
                            "value": 40,
                            "cost": 5,
                            "team_kind": "support",
                            "eligibility": [{"profile": "segment", "equals": "smb"}],
                            "control_share": 0.5,
                        },
                        {"name": "do_nothing", "kind": "do_nothing"},
                    ],
                    "contact": {"frequency_caps": []},
                }
            ),
        )
    )


async def test_outcomes_of_both_arms_make_the_actions_report(
    start_recommendation: StartRecommendation,
    platform: Platform,
    database: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Four customers; a salt that puts two in each arm (found by the same
    # function the service uses, so the split is known before any call).
    customers = [await make_customer(platform, f"lift{i}") for i in range(4)]
    ids = [c.customer_id for c in customers]
    salt = next(
        f"lift-{n}"
        for n in itertools.count()
        if sum(in_control_group(f"lift-{n}", c, ACTION, 0.5) for c in ids) == 2
    )
    service = await start_recommendation(policy=control_policy(salt))

    answers = [
        await service.stub.Recommend(
            pb.RecommendRequest(customer=c.ref, channel=common_pb2.CHANNEL_AGENT_DESKTOP)
        )
        for c in customers
    ]
    treated = [a for a in answers if a.actions[0].action_name == ACTION]
    control = [
        a
        for a in answers
        if any(
            s.action_name == ACTION and pb.SUPPRESSION_REASON_CONTROL_GROUP in s.reasons
            for s in a.suppressed
        )
    ]
    assert len(treated) == 2 and len(control) == 2

    service.clock.advance(hours=1)
    # Treated: one accepted and converted, one declined.
    await service.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=treated[0].decision_id, outcome=pb.ACTION_OUTCOME_ACCEPTED
        )
    )
    service.clock.advance(minutes=5)
    await service.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=treated[0].decision_id,
            outcome=pb.ACTION_OUTCOME_CONVERTED,
            value=common_pb2.Money(currency_code="EUR", units=40),
        )
    )
    await service.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=treated[1].decision_id, outcome=pb.ACTION_OUTCOME_DECLINED
        )
    )
    # Control: the outcome names the held-out action (it was never proposed,
    # so it has no id). One stayed (converted); of the other nothing is heard.
    await service.stub.RecordOutcome(
        pb.RecordOutcomeRequest(
            decision_id=control[1].decision_id,
            action_id=ACTION,
            outcome=pb.ACTION_OUTCOME_CONVERTED,
        )
    )

    # GetDecision shows the outcomes attached.
    replay = await service.stub.GetDecision(
        pb.GetDecisionRequest(decision_id=treated[0].decision_id)
    )
    assert [pb.ActionOutcome.Name(o.outcome) for o in replay.decision.outcomes] == [
        "ACTION_OUTCOME_ACCEPTED",
        "ACTION_OUTCOME_CONVERTED",
    ]

    since = (service.clock() - timedelta(days=1)).isoformat()
    code = await asyncio.to_thread(
        main,
        ["actions", "report", "--json", "--database-url", database, "--since", since],
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    by_name = {a["action_name"]: a for a in report["actions"]}
    call = by_name[ACTION]
    assert (call["offered"], call["held_out"], call["followed"]) == (2, 2, 1)
    assert call["outcomes"] == {"accepted": 1, "converted": 1, "declined": 1}
    assert call["control_outcomes"] == {"converted": 1}
    assert (call["treated_customers"], call["converted_treated"]) == (2, 1)
    assert (call["control_customers"], call["converted_control"]) == (2, 1)
    assert call["lift"] == pytest.approx(0.0)
    expected = newcombe_interval(1, 2, 1, 2)
    assert call["lift_interval"] == {"low": expected.low, "high": expected.high}
    assert report["lift_interval"].startswith("95 %, Newcombe")

    # The table for people says the same (wide enough not to fold columns).
    monkeypatch.setenv("COLUMNS", "200")
    code = await asyncio.to_thread(
        main, ["actions", "report", "--database-url", database, "--since", since]
    )
    table = capsys.readouterr().out
    assert code == 0
    assert ACTION in table and "1/2 50.0%" in table and "Newcombe" in table

    # Another policy version: nothing of it.
    code = await asyncio.to_thread(
        main,
        ["actions", "report", "--json", "--database-url", database, "--since", since,
         "--policy-version", "other"],
    )  # fmt: skip
    assert code == 0
    assert json.loads(capsys.readouterr().out)["actions"] == []

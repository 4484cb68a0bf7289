"""The alert rules alone (alerts/service.py): plain values in, plain values out."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import pytest

from converge.recommendation.alerts.service import (
    HIGH,
    NORMAL,
    URGENT,
    AlertState,
    CustomerFacts,
    Prediction,
    apply_operation,
    assess,
    dedup_key,
)
from converge.recommendation.policy.model import Policy
from converge.runtime.errors import FailedPrecondition

CUSTOMER = uuid.UUID("11111111-2222-4333-8444-555555555555")


def policy(**parts: Any) -> Policy:
    document: dict[str, Any] = {
        "actions": [
            {
                "name": "call",
                "kind": "proactive_support_call",
                "prediction": "escalation",
                "value": 200,
                "cost": 20,
                "urgent_above": 150,
                "high_above": 50,
            }
        ],
        "teams": [{"name": "support"}, {"name": "accounts"}, {"name": "emea"}, {"name": "sales"}],
        "alerts": [
            {
                "kind": "churn_risk",
                "prediction": "churn",
                "threshold": 0.5,
                "auto_resolve_below": 0.3,
                "default_team": "support",
            },
            {
                "kind": "escalation_risk",
                "prediction": "escalation",
                "threshold": 0.5,
                "default_team": "support",
                "action": "call",
            },
            {
                "kind": "cross_sell_moment",
                "prediction": "cross_sell",
                "threshold": 0.5,
                "default_team": "sales",
            },
        ],
    }
    document.update(parts)
    return Policy.model_validate(document)


def facts(**profile: str) -> CustomerFacts:
    return CustomerFacts(CUSTOMER, **profile)


def test_churn_goes_to_the_first_matching_route_else_the_owner_team_else_the_default() -> None:
    churn = [Prediction("churn", 0.9, 3)]
    routed = policy(routing=[{"team": "emea", "kinds": ["churn_risk"], "regions": ["emea"]}])
    assert assess(routed, facts(region="emea", owner_team="accounts"), churn).raise_[0].team == (
        "emea"
    )
    assert assess(routed, facts(region="us", owner_team="accounts"), churn).raise_[0].team == (
        "accounts"
    )
    assert assess(routed, facts(region="us", owner_team="unknown-team"), churn).raise_[0].team == (
        "support"
    )
    star = policy(routing=[{"team": "emea", "owner_teams": ["*"]}])
    assert assess(star, facts(owner_team="accounts"), churn).raise_[0].team == "emea"
    assert assess(star, facts(), churn).raise_[0].team == "support"


def test_below_the_threshold_nothing_is_raised_and_below_auto_resolve_the_alert_resolves() -> None:
    quiet = assess(policy(), facts(), [Prediction("churn", 0.4, 2)])
    assert quiet.raise_ == () and quiet.resolve == ()
    fallen = assess(policy(), facts(), [Prediction("churn", 0.2, 1)])
    assert fallen.resolve == ((dedup_key("churn_risk", CUSTOMER, ""), 0.2),)


def test_a_serious_escalation_withholds_and_withdraws_cross_sell() -> None:
    scores = [
        Prediction("escalation", 0.7, 3, ticket_id="T1"),
        Prediction("cross_sell", 0.9, 3, product_id="tv"),
    ]
    serious = assess(policy(arbitration={"serious_escalation_probability": 0.6}), facts(), scores)
    assert [c.kind for c in serious.raise_] == ["escalation_risk"]
    assert serious.withdraw == (dedup_key("cross_sell_moment", CUSTOMER, "tv"),)
    mild = assess(policy(arbitration={"serious_escalation_probability": 0.8}), facts(), scores)
    assert {c.kind for c in mild.raise_} == {"escalation_risk", "cross_sell_moment"}
    # An open escalation alert counts as much as a fresh score.
    held = assess(
        policy(arbitration={"serious_escalation_probability": 0.6}),
        facts(),
        [Prediction("cross_sell", 0.9, 3, product_id="tv")],
        open_escalation_probability=0.65,
    )
    assert held.raise_ == ()


@pytest.mark.parametrize(
    ("probability", "value", "priority"),
    [(0.95, Decimal("170.0000"), URGENT), (0.6, Decimal("100.0000"), HIGH)],
)
def test_expected_value_and_priority_follow_the_action(
    probability: float, value: Decimal, priority: int
) -> None:
    [candidate] = assess(
        policy(), facts(), [Prediction("escalation", probability, 3, ticket_id="T1")]
    ).raise_
    assert candidate.expected_value == value  # p x 200 x 1 - 20
    assert candidate.priority == priority
    assert candidate.dedup_key == f"escalation_risk:{CUSTOMER}:T1"
    assert NORMAL < HIGH < URGENT


def test_final_alerts_take_no_change_and_assigning_acknowledges() -> None:
    open_alert = AlertState(uuid.uuid4(), "open")
    assigned = apply_operation(open_alert, "assign", assignee="ana")
    assert (assigned.status, assigned.assignee) == ("assigned", "ana")
    assert apply_operation(assigned, "acknowledge").status == "assigned"
    resolved = apply_operation(assigned, "resolve", note="done")
    for operation in ("acknowledge", "assign", "resolve", "dismiss"):
        with pytest.raises(FailedPrecondition):
            apply_operation(resolved, operation)  # type: ignore[arg-type]
    escalated = AlertState(uuid.uuid4(), "escalated")
    assert apply_operation(escalated, "acknowledge").status == "acknowledged"

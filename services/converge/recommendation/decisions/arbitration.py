"""Arbitration by expected value, across sales and support: pure rules, plain
types (Decimal amounts in the policy's currency).

- Expected value = propensity x value x weight - cost (the manner of Pega's
  propensity x context weight x value x levers). Value and cost come from the
  action's offer (retention offers), its product (cross-sell), else the
  action's own `value` and `cost` (0 when unset). Rounded half-even to 4
  decimals, the policy's precision.
- Priority from the expected value: URGENT above `urgent_above`, HIGH above
  `high_above`, else NORMAL when positive, LOW otherwise.
- One arbitration across teams: no sales action while a serious escalation
  is open (escalation probability >= `serious_escalation_probability`) or a
  complaint is recent (`complaints_feature` > 0), and none while churn is
  high (>= `retention_first_churn_probability`): retention comes first.
- Ranking is deterministic: hand-overs the contact rules put first, then
  expected value descending, then priority descending, then action name, then
  product id.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from converge.recommendation.policy.model import ActionSpec, Policy

_PRECISION = Decimal("0.0001")
PRIORITIES = ("low", "normal", "high", "urgent")


def value_and_cost(
    action: ActionSpec, policy: Policy, product_id: str = ""
) -> tuple[Decimal, Decimal]:
    """What the action is worth when it works, and what it costs."""
    if action.offer:
        for offer in policy.catalogue.offers:
            if offer.id == action.offer:
                return offer.value, offer.cost
    if product_id:
        for product in policy.catalogue.products:
            if product.id == product_id:
                return product.value, product.cost
    return action.value or Decimal(0), action.cost or Decimal(0)


def expected_value(
    action: ActionSpec, propensity: float, policy: Policy, product_id: str = ""
) -> Decimal:
    """propensity x value x weight - cost, in the policy's currency."""
    value, cost = value_and_cost(action, policy, product_id)
    raw = Decimal(repr(propensity)) * value * Decimal(repr(action.weight)) - cost
    return raw.quantize(_PRECISION, rounding=ROUND_HALF_EVEN)


def priority(action: ActionSpec, expected: Decimal) -> str:
    """ "urgent", "high", "normal" or "low"."""
    if action.urgent_above is not None and expected > action.urgent_above:
        return "urgent"
    if action.high_above is not None and expected > action.high_above:
        return "high"
    return "normal" if expected > 0 else "low"


@dataclass(frozen=True)
class TeamBlock:
    """Why the arbitration across teams withholds sales actions now."""

    reason: str  # "escalation_open" or "arbitration"
    detail: str


def sales_blocks(
    policy: Policy,
    *,
    escalation: float | None,
    churn: float | None,
    features: Mapping[str, float | str],
) -> list[TeamBlock]:
    """Every reason the arbitration across teams withholds sales actions."""
    rules = policy.arbitration
    blocks: list[TeamBlock] = []
    if escalation is not None and escalation >= rules.serious_escalation_probability:
        blocks.append(
            TeamBlock(
                "escalation_open",
                f"escalation probability {escalation:.2f} >= "
                f"{rules.serious_escalation_probability:.2f}: no sales while it is open",
            )
        )
    if rules.complaints_feature:
        complaints = features.get(rules.complaints_feature)
        if isinstance(complaints, int | float) and complaints > 0:
            blocks.append(
                TeamBlock(
                    "escalation_open",
                    f"{complaints:.0f} recent complaint(s) ({rules.complaints_feature}): no sales",
                )
            )
    if churn is not None and churn >= rules.retention_first_churn_probability:
        blocks.append(
            TeamBlock(
                "arbitration",
                f"churn probability {churn:.2f} >= "
                f"{rules.retention_first_churn_probability:.2f}: retention first, no sales",
            )
        )
    return blocks


def rank_key(
    first: bool, expected: Decimal, priority_name: str, action_name: str, product_id: str
) -> tuple[bool, Decimal, int, str, str]:
    """Sort ascending with this key: the documented deterministic order."""
    return (not first, -expected, -PRIORITIES.index(priority_name), action_name, product_id)

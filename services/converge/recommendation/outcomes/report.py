"""The actions report (`converge actions report`): per action, how often it
was offered and followed, what came of it, and its lift over the control
group with a confidence interval. Pure functions over plain rows.

Units. A customer is the unit of the lift: the control assignment is per
customer and action (outcomes/control.py), so repeated decisions for one
customer are not independent trials. A customer is "treated" for an action
when some decision in the window proposed it, "control" when some decision
held it out for its control group; "converted" when a CONVERTED outcome was
recorded against one of those decisions for that action. A customer found in
both arms (the salt or the share changed within the window) is left out of
the lift and counted apart.

Lift = conversion(treated) - conversion(control), with Newcombe's hybrid
score interval for a difference of independent proportions (Newcombe 1998,
"Interval estimation for the difference between independent proportions",
Statistics in Medicine 17, method 10), built from the two Wilson score
intervals: it keeps its coverage for small groups and rates near 0 or 1,
where the Wald interval does not.

Uplift at k and the Qini coefficient (outcomes/uplift.py) rank customers by
the action's expected value in their decision (the higher of their
decisions'): do the customers the policy values most convert more because
of the action?
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from statistics import NormalDist

from converge.recommendation.outcomes.uplift import qini_coefficient, uplift_at_k

TREATMENT = "treatment"
CONTROL = "control"
ACCEPTED = "accepted"
CONVERTED = "converted"
UPLIFT_K = 0.3


@dataclass(frozen=True)
class Exposure:
    """One decision's proposal of an action (treatment) or its holding out
    for the action's control group (control)."""

    decision_id: str
    customer_id: str
    action_name: str
    arm: str
    expected_value: float
    decided_at: datetime
    policy_version: str


@dataclass(frozen=True)
class OutcomeRow:
    """One recorded outcome, as the report reads it."""

    decision_id: str
    action_name: str
    arm: str
    outcome: str


@dataclass(frozen=True)
class Interval:
    low: float
    high: float


@dataclass(frozen=True)
class ActionReport:
    action_name: str
    offered: int  # decisions that proposed it
    held_out: int  # decisions that held it out for its control group
    followed: int  # of the decisions that proposed it, those with an ACCEPTED outcome
    outcomes: dict[str, int]  # outcome -> count, treatment arm
    control_outcomes: dict[str, int]  # outcome -> count, control arm
    treated_customers: int
    converted_treated: int
    control_customers: int
    converted_control: int
    in_both_arms: int  # customers left out of the lift
    conversion_treated: float | None
    conversion_control: float | None
    lift: float | None
    lift_interval: Interval | None  # 95 %, Newcombe's hybrid score (method 10)
    uplift_at_30: float | None  # uplift at k = 0.3, sklift's "overall" strategy
    qini: float | None
    notes: list[str] = field(default_factory=list)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of a proportion (Wilson 1927)."""
    if trials <= 0:
        raise ValueError("trials must be positive")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return Interval(max(0.0, centre - half), min(1.0, centre + half))


def newcombe_interval(
    successes_1: int, trials_1: int, successes_2: int, trials_2: int, confidence: float = 0.95
) -> Interval:
    """Newcombe's hybrid score interval (1998, method 10) for p1 - p2."""
    p1 = successes_1 / trials_1
    p2 = successes_2 / trials_2
    w1 = wilson_interval(successes_1, trials_1, confidence)
    w2 = wilson_interval(successes_2, trials_2, confidence)
    difference = p1 - p2
    low = difference - math.sqrt((p1 - w1.low) ** 2 + (w2.high - p2) ** 2)
    high = difference + math.sqrt((w1.high - p1) ** 2 + (p2 - w2.low) ** 2)
    return Interval(low, high)


def build_report(
    exposures: Iterable[Exposure], outcomes: Iterable[OutcomeRow]
) -> list[ActionReport]:
    """One report per action name, in name order."""
    by_action: dict[str, list[Exposure]] = {}
    for exposure in exposures:
        by_action.setdefault(exposure.action_name, []).append(exposure)
    outcomes_by_key: dict[tuple[str, str, str], list[str]] = {}
    for row in outcomes:
        outcomes_by_key.setdefault((row.decision_id, row.action_name, row.arm), []).append(
            row.outcome
        )
    return [_action_report(name, by_action[name], outcomes_by_key) for name in sorted(by_action)]


def _action_report(
    name: str,
    exposures: list[Exposure],
    outcomes_by_key: dict[tuple[str, str, str], list[str]],
) -> ActionReport:
    counts = {TREATMENT: Counter[str](), CONTROL: Counter[str]()}
    # Per customer and arm: converted?, best expected value.
    customers: dict[str, dict[str, tuple[bool, float]]] = {TREATMENT: {}, CONTROL: {}}
    offered = held_out = followed = 0
    for exposure in exposures:
        found = outcomes_by_key.get((exposure.decision_id, name, exposure.arm), [])
        counts[exposure.arm].update(found)
        if exposure.arm == TREATMENT:
            offered += 1
            followed += ACCEPTED in found
        else:
            held_out += 1
        converted, best = customers[exposure.arm].get(exposure.customer_id, (False, -math.inf))
        customers[exposure.arm][exposure.customer_id] = (
            converted or CONVERTED in found,
            max(best, exposure.expected_value),
        )

    both = set(customers[TREATMENT]) & set(customers[CONTROL])
    treated = {c: v for c, v in customers[TREATMENT].items() if c not in both}
    control = {c: v for c, v in customers[CONTROL].items() if c not in both}
    converted_treated = sum(v[0] for v in treated.values())
    converted_control = sum(v[0] for v in control.values())

    notes: list[str] = []
    conversion_treated = converted_treated / len(treated) if treated else None
    conversion_control = converted_control / len(control) if control else None
    lift = interval = None
    if conversion_treated is not None and conversion_control is not None:
        lift = conversion_treated - conversion_control
        interval = newcombe_interval(
            converted_treated, len(treated), converted_control, len(control)
        )
    elif not control:
        notes.append("no control group: set the action's control_share to measure lift")
    if both:
        notes.append(f"{len(both)} customers in both arms (salt or share changed) left out")

    units = [*((1, v) for v in treated.values()), *((0, v) for v in control.values())]
    ys = [int(v[0]) for _, v in units]
    scores = [v[1] for _, v in units]
    flags = [bool(t) for t, _ in units]
    uplift = qini = None
    if treated and control:
        uplift = uplift_at_k(ys, scores, flags, UPLIFT_K)
        qini = qini_coefficient(ys, scores, flags)

    return ActionReport(
        action_name=name,
        offered=offered,
        held_out=held_out,
        followed=followed,
        outcomes=dict(sorted(counts[TREATMENT].items())),
        control_outcomes=dict(sorted(counts[CONTROL].items())),
        treated_customers=len(treated),
        converted_treated=converted_treated,
        control_customers=len(control),
        converted_control=converted_control,
        in_both_arms=len(both),
        conversion_treated=conversion_treated,
        conversion_control=conversion_control,
        lift=lift,
        lift_interval=interval,
        uplift_at_30=uplift,
        qini=qini,
        notes=notes,
    )

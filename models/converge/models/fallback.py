"""Rule-based scores for day one, before a prediction has the data to train
(`training.MINIMUMS`), or when no model version can be loaded.

Each prediction has a handful of documented rules over the interactions
service's feature names (`converge.features.engine.REGISTRY`). A score
starts from a prior (the log-odds of a typical base rate over the
prediction's horizon) and each rule that fires adds its weight in log-odds;
the probability is the logistic of the sum. The numbers are judgement, not
fitted: the result is a probability-like score that ranks obviously risky
cases above safe ones, not a calibrated probability, and it always says so
(`fallback=True`, `model_name` "converge-rules-<prediction>").

A feature that is absent, None or NaN is unknown: its rules do not fire and
it is listed in `unknown`. `ticket_priority` may be the category index the
interactions service sends (0 low, 1 normal, 2 high, 3 urgent) or the name.

Rules (weight in log-odds):

churn (prior 3% in 30 days)
  days_since_last_interaction >= 60: +1.8, else >= 30: +1.2
  payment_failures_30d >= 1: +0.8, +0.4 per further failure (at most +1.6)
  subscription_cancellations_90d >= 1: +1.5
  subscription_downgrades_90d >= 1: +0.5
  nps_last <= 3: +1.2, else <= 6 (detractor): +0.8, >= 9 (promoter): -0.5
  usage_change_30d < 0: +0.5
  count_30d_complaint >= 1: +0.5
  open_tickets >= 2: +0.4

escalation (prior 10% in 72 hours)
  ticket_open == 0: -2.0 (resolved tickets rarely escalate)
  ticket_priority urgent: +1.2, high: +0.7, low: -0.5
  ticket_sla_hours_left <= 0: +2.0, else <= 24: +1.2, else <= 72: +0.6
  ticket_reassignments >= 2: +0.8, else >= 1: +0.4
  ticket_last_sentiment <= -0.5: +0.9, else <= -0.2: +0.4
  ticket_reopens >= 1: +0.6
  ticket_priority_changes >= 1: +0.3
  escalations_90d >= 1: +0.4

cross_sell (prior 2% in 14 days)
  usage_change_30d >= 10: +1.0, else > 0: +0.6
  count_30d_purchase >= 1: +0.6
  marketing_clicks_30d >= 1: +0.5
  count_30d_login >= 8: +0.4
  products_held >= 1: +0.3
  payment_failures_30d >= 1: -0.7
  marketing_unsubscribes_90d >= 1: -0.6
  open_tickets >= 2: -0.4
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from converge.models.dataset import Prediction, check_prediction

RULES_VERSION = "rules-1"
PRIORITIES = ("low", "normal", "high", "urgent")
PRIORS: dict[Prediction, float] = {"churn": 0.03, "escalation": 0.10, "cross_sell": 0.02}

FeatureValue = float | int | str | None


@dataclass(frozen=True)
class Reason:
    """One rule that fired, shaped like `converge.v1.ReasonCode`."""

    code: str
    feature: str
    value: float | None
    contribution: float  # log-odds
    text: str


@dataclass(frozen=True)
class FallbackScore:
    prediction: Prediction
    probability: float
    reasons: tuple[Reason, ...]  # largest absolute contribution first
    unknown: tuple[str, ...]  # features the rules look at that were missing
    fallback: bool = True
    model_name: str = ""
    version: str = RULES_VERSION


def _number(value: FeatureValue) -> float | None:
    if value is None or isinstance(value, str):
        return None
    x = float(value)
    return None if math.isnan(x) else x


def _priority(value: FeatureValue) -> str | None:
    if isinstance(value, str):
        return value if value in PRIORITIES else None
    x = _number(value)
    if x is None or not x.is_integer() or not 0 <= x < len(PRIORITIES):
        return None
    return PRIORITIES[int(x)]


# A rule: feature name, and a function from its value to (code suffix,
# weight, text) or None when it does not fire.
Outcome = tuple[str, float, str] | None
Rule = tuple[str, Callable[[float], Outcome]]


def _days_inactive(x: float) -> Outcome:
    if x >= 60:
        return "very_long", 1.8, f"No interaction for {x:.0f} days"
    if x >= 30:
        return "long", 1.2, f"No interaction for {x:.0f} days"
    return None


def _failures(x: float) -> Outcome:
    if x < 1:
        return None
    return "some", min(0.8 + 0.4 * (x - 1), 1.6), f"{x:.0f} failed payment(s) in 30 days"


def _nps(x: float) -> Outcome:
    if x <= 3:
        return "very_low", 1.2, f"NPS of {x:.0f} (very low)"
    if x <= 6:
        return "low", 0.8, f"NPS of {x:.0f} (detractor)"
    if x >= 9:
        return "high", -0.5, f"NPS of {x:.0f} (promoter)"
    return None


def _at_least(threshold: float, code: str, weight: float, text: str) -> Callable[[float], Outcome]:
    def rule(x: float) -> Outcome:
        return (code, weight, text.format(x=x)) if x >= threshold else None

    return rule


def _sla(x: float) -> Outcome:
    if x <= 0:
        return "passed", 2.0, "SLA deadline already passed"
    if x <= 24:
        return "within_24h", 1.2, f"SLA runs out in {x:.0f} hours"
    if x <= 72:
        return "within_72h", 0.6, f"SLA runs out in {x:.0f} hours"
    return None


def _reassignments(x: float) -> Outcome:
    if x >= 2:
        return "many", 0.8, f"Reassigned {x:.0f} times"
    if x >= 1:
        return "some", 0.4, "Reassigned once"
    return None


def _sentiment(x: float) -> Outcome:
    if x <= -0.5:
        return "very_negative", 0.9, f"Latest sentiment very negative ({x:.2f})"
    if x <= -0.2:
        return "negative", 0.4, f"Latest sentiment negative ({x:.2f})"
    return None


def _usage_growth(x: float) -> Outcome:
    if x >= 10:
        return "strong_growth", 1.0, f"Usage up by {x:.0f} in 30 days"
    if x > 0:
        return "growth", 0.6, f"Usage up by {x:.0f} in 30 days"
    return None


def _ticket_open(x: float) -> Outcome:
    return ("closed", -2.0, "Ticket is resolved") if x == 0 else None


RULES: dict[Prediction, tuple[Rule, ...]] = {
    "churn": (
        ("days_since_last_interaction", _days_inactive),
        ("payment_failures_30d", _failures),
        (
            "subscription_cancellations_90d",
            _at_least(1, "some", 1.5, "{x:.0f} subscription cancellation(s) in 90 days"),
        ),
        (
            "subscription_downgrades_90d",
            _at_least(1, "some", 0.5, "{x:.0f} subscription downgrade(s) in 90 days"),
        ),
        ("nps_last", _nps),
        (
            "usage_change_30d",
            lambda x: ("falling", 0.5, f"Usage down by {-x:.0f} in 30 days") if x < 0 else None,
        ),
        ("count_30d_complaint", _at_least(1, "some", 0.5, "{x:.0f} complaint(s) in 30 days")),
        ("open_tickets", _at_least(2, "many", 0.4, "{x:.0f} support tickets open")),
    ),
    "escalation": (
        ("ticket_open", _ticket_open),
        ("ticket_sla_hours_left", _sla),
        ("ticket_reassignments", _reassignments),
        ("ticket_last_sentiment", _sentiment),
        ("ticket_reopens", _at_least(1, "some", 0.6, "Ticket reopened {x:.0f} time(s)")),
        (
            "ticket_priority_changes",
            _at_least(1, "some", 0.3, "Priority changed {x:.0f} time(s)"),
        ),
        ("escalations_90d", _at_least(1, "some", 0.4, "{x:.0f} escalation(s) in 90 days")),
    ),
    "cross_sell": (
        ("usage_change_30d", _usage_growth),
        ("count_30d_purchase", _at_least(1, "recent", 0.6, "{x:.0f} purchase(s) in 30 days")),
        ("marketing_clicks_30d", _at_least(1, "some", 0.5, "Clicked {x:.0f} marketing message(s)")),
        ("count_30d_login", _at_least(8, "frequent", 0.4, "{x:.0f} logins in 30 days")),
        ("products_held", _at_least(1, "customer", 0.3, "Holds {x:.0f} product(s)")),
        (
            "payment_failures_30d",
            _at_least(1, "payment_failures", -0.7, "{x:.0f} failed payment(s) in 30 days"),
        ),
        (
            "marketing_unsubscribes_90d",
            _at_least(1, "unsubscribed", -0.6, "Unsubscribed from marketing"),
        ),
        ("open_tickets", _at_least(2, "open_tickets", -0.4, "{x:.0f} support tickets open")),
    ),
}
PRIORITY_WEIGHTS = {"urgent": 1.2, "high": 0.7, "low": -0.5}


def features_used(prediction: str) -> tuple[str, ...]:
    """The feature names the rules of `prediction` read."""
    p = check_prediction(prediction)
    names = [name for name, _ in RULES[p]]
    if p == "escalation":
        names.append("ticket_priority")
    return tuple(names)


def score(prediction: str, features: Mapping[str, FeatureValue]) -> FallbackScore:
    """The rule-based score of one customer (or ticket, or customer and
    product) from its features by name."""
    p = check_prediction(prediction)
    prior = PRIORS[p]
    logit = math.log(prior / (1 - prior))
    reasons: list[Reason] = []
    unknown: list[str] = []
    for name, rule in RULES[p]:
        x = _number(features.get(name))
        if x is None:
            unknown.append(name)
            continue
        outcome = rule(x)
        if outcome is not None:
            suffix, weight, text = outcome
            reasons.append(Reason(f"{name}.{suffix}", name, x, weight, text))
            logit += weight
    if p == "escalation":
        raw = features.get("ticket_priority")
        level = _priority(raw)
        if level is None:
            unknown.append("ticket_priority")
        elif level in PRIORITY_WEIGHTS:
            weight = PRIORITY_WEIGHTS[level]
            value = float(PRIORITIES.index(level))
            text = f"Priority {level}"
            reasons.append(
                Reason(f"ticket_priority.{level}", "ticket_priority", value, weight, text)
            )
            logit += weight
    reasons.sort(key=lambda r: -abs(r.contribution))
    return FallbackScore(
        prediction=p,
        probability=1.0 / (1.0 + math.exp(-logit)),
        reasons=tuple(reasons),
        unknown=tuple(unknown),
        model_name=f"converge-rules-{p.replace('_', '-')}",
    )

"""Reasons: LightGBM's per-input contributions (`pred_contrib`, in log-odds)
turned into stable codes and short sentences for people.

Largest absolute contribution first; inputs that did not move the score
(contribution 0) are never reasons. Codes are stable per model version:

- `<input>.raises` / `<input>.lowers`: a number, by the direction it pushed;
- `<input>.missing`: the input had no value (which itself moved the score);
- `<input>.<category>`: a categorical input, by its category, or
  `<input>.other` when the value is not among the categories training kept.

Sentences never carry personal data: numbers are counts, days, scores or
amounts of the customer's own activity, and a category value is spoken only
when it is one the model learned, i.e. one that at least `min_count`
customers share (rarer values are "other" and never named). Feature
sentences use the served feature set's descriptions and units; profile
inputs are named by their meaning.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from converge.features.transform import CANDIDATE, OTHER, InputSchema
from converge.models.fallback import Reason
from converge.scoring.features import FeatureInfo

DEFAULT_MAX_REASONS = 3
MAX_REASONS = 20
WHAT: dict[str, str] = {
    "churn": "churn risk",
    "escalation": "escalation risk",
    "cross_sell": "purchase propensity",
}
_PROFILE_FIELDS = {
    "profile_segment": "Segment",
    "profile_plan": "Plan",
    "profile_region": "Region",
    "profile_owner_team": "Owning team",
}
_CODE_SAFE = re.compile(r"[^a-z0-9_]+")


def reason_count(max_reasons: int) -> int:
    """How many reasons a request gets: 0 means the default, at most MAX_REASONS."""
    return DEFAULT_MAX_REASONS if max_reasons <= 0 else min(max_reasons, MAX_REASONS)


def explain(
    prediction: str,
    schema: InputSchema,
    row: npt.NDArray[np.float64],
    contributions: npt.NDArray[np.float64],
    catalogue: Mapping[str, FeatureInfo],
    limit: int,
) -> tuple[Reason, ...]:
    """The top `limit` reasons of one scored row (`row` as the model read it,
    `contributions` its pred_contrib row, bias last)."""
    inputs = contributions[: len(schema.names)]
    order = np.argsort(-np.abs(inputs), kind="stable")
    reasons: list[Reason] = []
    for j in order[:limit]:
        contribution = float(inputs[j])
        if contribution == 0.0:
            break
        reasons.append(
            _reason(prediction, schema, schema.names[j], float(row[j]), contribution, catalogue)
        )
    return tuple(reasons)


def _reason(
    prediction: str,
    schema: InputSchema,
    name: str,
    value: float,
    contribution: float,
    catalogue: Mapping[str, FeatureInfo],
) -> Reason:
    effect = f"{'raises' if contribution > 0 else 'lowers'} {WHAT.get(prediction, 'the score')}"
    subject = _subject(name, catalogue)
    if math.isnan(value):
        return Reason(f"{name}.missing", name, None, contribution, f"{subject}: unknown ({effect})")
    categories = schema.categories.get(name)
    if categories is not None:
        category = categories[int(value)] if 0 <= int(value) < len(categories) else OTHER
        if category == OTHER:
            text = f"{subject}: an uncommon value ({effect})"
        else:
            text = f"{subject} '{category}' ({effect})"
        return Reason(f"{name}.{_code_part(category)}", name, None, contribution, text)
    direction = "raises" if contribution > 0 else "lowers"
    shown = _number(value, _unit(name, catalogue))
    return Reason(
        f"{name}.{direction}", name, value, contribution, f"{subject}: {shown} ({effect})"
    )


def _subject(name: str, catalogue: Mapping[str, FeatureInfo]) -> str:
    info = catalogue.get(name)
    if info is not None and info.description:
        return info.description.rstrip(". ")
    if name in _PROFILE_FIELDS:
        return _PROFILE_FIELDS[name]
    if name == "profile_tenure_days":
        return "Days as a customer"
    if name == CANDIDATE:
        return "Product"
    if name.startswith("profile_attr_"):
        return f"Profile attribute {name.removeprefix('profile_attr_')}"
    return name.replace("_", " ").capitalize()


def _unit(name: str, catalogue: Mapping[str, FeatureInfo]) -> str:
    info = catalogue.get(name)
    if info is not None:
        return info.unit
    return "days" if name == "profile_tenure_days" else ""


def _number(value: float, unit: str) -> str:
    if unit == "reporting_currency":
        return f"{value:,.2f}"
    if value.is_integer() or unit == "days":
        return f"{value:.0f}"
    return f"{value:.2f}"


def _code_part(category: str) -> str:
    return _CODE_SAFE.sub("_", category.lower()).strip("_")[:40] or "value"

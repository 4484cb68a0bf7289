"""Reasons from contributions: pure logic, no services."""

from __future__ import annotations

import math

import numpy as np

from converge.features.transform import InputSchema
from converge.scoring.features import FeatureInfo
from converge.scoring.reasons import explain, reason_count

SCHEMA = InputSchema(
    names=("reopens_90d", "nps_last", "profile_plan", "profile_attr_tier", "profile_tenure_days"),
    categories={"profile_plan": ("basic", "pro", "other"), "profile_attr_tier": ("gold", "other")},
)
CATALOGUE = {
    "reopens_90d": FeatureInfo("reopens_90d", "Tickets reopened in the last 90 days.", "count", "customer"),
    "nps_last": FeatureInfo("nps_last", "The latest net promoter score (NPS).", "points", "customer"),
}  # fmt: skip


def test_reasons_come_largest_first_with_stable_codes_and_readable_sentences() -> None:
    row = np.array([3.0, math.nan, 0.0, 1.0, 400.0])
    contributions = np.array([0.9, 0.4, -1.2, 0.05, -0.3, -2.0])  # (the bias last)

    reasons = explain("churn", SCHEMA, row, contributions, CATALOGUE, 4)

    assert [r.code for r in reasons] == [
        "profile_plan.basic",
        "reopens_90d.raises",
        "nps_last.missing",
        "profile_tenure_days.lowers",
    ]
    assert [r.text for r in reasons] == [
        "Plan 'basic' (lowers churn risk)",
        "Tickets reopened in the last 90 days: 3 (raises churn risk)",
        "The latest net promoter score (NPS): unknown (raises churn risk)",
        "Days as a customer: 400 (lowers churn risk)",
    ]
    assert reasons[1].value == 3.0 and reasons[2].value is None
    assert [r.contribution for r in reasons] == [-1.2, 0.9, 0.4, -0.3]


def test_an_uncommon_category_is_never_spoken() -> None:
    # "other": values too rare in training to be kept, which could single a customer out.
    row = np.array([0.0, 0.0, 0.0, 1.0, 10.0])
    contributions = np.array([0.0, 0.0, 0.0, 0.7, 0.0, -1.0])

    [reason] = explain("cross_sell", SCHEMA, row, contributions, CATALOGUE, 3)

    assert reason.code == "profile_attr_tier.other"
    assert reason.text == "Profile attribute tier: an uncommon value (raises purchase propensity)"


def test_inputs_that_did_not_move_the_score_are_no_reasons_and_counts_are_bounded() -> None:
    row = np.array([1.0, 5.0, 1.0, 0.0, 10.0])
    contributions = np.array([0.0, 0.2, 0.0, 0.0, 0.0, -1.0])

    assert [r.feature for r in explain("escalation", SCHEMA, row, contributions, CATALOGUE, 3)] == [
        "nps_last"
    ]
    assert (reason_count(0), reason_count(5), reason_count(99)) == (3, 5, 20)

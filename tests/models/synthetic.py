"""Synthetic training frames with a known logistic ground truth.

Each row is an entity at a weekly cutoff with churn-like features; the label
is drawn from `p_true`, the true probability, kept in the frame as a column
that is not a feature, so tests can compute the Bayes-optimal AUC on the very
rows they evaluate.

True log-odds: intercept + 0.8 * payment_failures_30d
+ 0.03 * days_since_last_interaction - 0.15 * usage_change_30d
- 0.25 * (nps_last - 7) (0.3 when NPS is missing)
+ plan effect (basic 0.6, plus 0, pro -0.5, enterprise -1.0); `noise` has no
effect. `signal` scales every effect (0 = labels independent of features).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from converge.models.dataset import TrainingFrame

PLANS = ("basic", "plus", "pro", "enterprise")
PLAN_EFFECT = np.array([0.6, 0.0, -0.5, -1.0])
FEATURES = (
    "payment_failures_30d",
    "days_since_last_interaction",
    "usage_change_30d",
    "nps_last",
    "plan",
    "noise",
)
START = datetime(2025, 1, 6, tzinfo=UTC)
FEATURE_SET_VERSION = "v1-synthetic"


def make_frame(
    n_cutoffs: int = 40,
    rows_per_cutoff: int = 400,
    seed: int = 0,
    intercept: float = -2.6,
    signal: float = 1.0,
    prediction: str = "churn",
) -> TrainingFrame:
    rng = np.random.default_rng(seed)
    n = n_cutoffs * rows_per_cutoff
    failures = rng.poisson(0.3, n)
    days = rng.exponential(15.0, n)
    usage = rng.normal(0.0, 5.0, n)
    nps = rng.integers(0, 11, n).astype(np.float64)
    nps[rng.random(n) < 0.3] = np.nan
    plan = rng.integers(0, len(PLANS), n)
    noise = rng.normal(0.0, 1.0, n)
    nps_term = np.where(np.isnan(nps), 0.3, -0.25 * (np.nan_to_num(nps) - 7))
    logit = intercept + signal * (
        0.8 * failures + 0.03 * days - 0.15 * usage + nps_term + PLAN_EFFECT[plan]
    )
    p_true = 1.0 / (1.0 + np.exp(-logit))
    label = (rng.random(n) < p_true).astype(np.int64)
    cutoffs = np.repeat([START + timedelta(weeks=w) for w in range(n_cutoffs)], rows_per_cutoff)
    frame = pd.DataFrame(
        {
            "entity_id": [f"c{i % (rows_per_cutoff * 2)}" for i in range(n)],
            "cutoff": pd.to_datetime(cutoffs, utc=True),
            "payment_failures_30d": failures,
            "days_since_last_interaction": days,
            "usage_change_30d": usage,
            "nps_last": nps,
            "plan": pd.Categorical.from_codes(plan, categories=list(PLANS)),
            "noise": noise,
            "label": label,
            "p_true": p_true,
        }
    )
    return TrainingFrame.from_frame(
        frame, prediction, FEATURE_SET_VERSION, feature_names=FEATURES, source="synthetic"
    )

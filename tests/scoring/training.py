"""Small real models for the scoring tests, trained and registered the way
the product does it (`assemble` -> `train` -> `ModelRegistry.log_training`),
fast: synthetic training rows over real feature names of the built-in set,
with a known logistic ground truth, so a model trains in about a second.

Training through the services (`converge models train` over recorded
interactions) would take minutes per model here; the transform under test
(`InputSchema`, learned by `assemble` and stored with the version) is the
same either way, and the parity test checks it against the product's
point-in-time path separately.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from converge.features.engine import FEATURE_SET_VERSION
from converge.models.dataset import TrainingFrame, time_split
from converge.models.evaluation import evaluate
from converge.models.registry import ModelRegistry, RegisteredVersion
from converge.models.training import TrainingConfig, train
from converge.models.trainingset import LabelRow, assemble

FAST = TrainingConfig(learning_rate=0.1, max_rounds=200, early_stopping_rounds=20, num_threads=1)
START = datetime(2025, 1, 6, tzinfo=UTC)
PLANS = ("basic", "plus", "pro")
SEGMENTS = ("smb", "enterprise")
PRODUCTS = ("tv", "phone", "broadband")
CUSTOMER_FEATURES = {
    "churn": (
        "payment_failures_30d",
        "days_since_last_interaction",
        "nps_last",
        "count_30d_complaint",
        "open_tickets",
        "count_30d_login",
    ),
    "escalation": ("escalations_90d", "open_tickets", "days_since_last_interaction"),
    "cross_sell": ("count_30d_purchase", "count_30d_login", "payment_failures_30d"),
}


def synthetic_frame(
    prediction: str, seed: int, *, flip: bool = False, feature_set_version: str = ""
) -> TrainingFrame:
    """6,000 labelled rows over 30 weekly cutoffs. `flip` reverses every
    effect, so a second version answers visibly differently."""
    rng = np.random.default_rng(seed)
    n_cutoffs, per_cutoff = 30, 200
    sign = -1.0 if flip else 1.0
    rows: list[LabelRow] = []
    customer_values: list[dict[str, float | str]] = []
    ticket_values: list[dict[str, float | str] | None] = []
    profiles = []
    for k in range(n_cutoffs):
        cutoff = START + timedelta(weeks=k)
        for i in range(per_cutoff):
            failures = float(rng.poisson(0.4))
            days = float(rng.exponential(20.0))
            nps = float(rng.integers(0, 11))
            complaints = float(rng.poisson(0.3))
            tickets = float(rng.poisson(0.6))
            logins = float(rng.poisson(6.0))
            purchases = float(rng.poisson(0.5))
            escalations = float(rng.poisson(0.2))
            plan = PLANS[int(rng.integers(0, len(PLANS)))]
            values: dict[str, float | str] = {
                "payment_failures_30d": failures,
                "days_since_last_interaction": days,
                "nps_last": nps,
                "count_30d_complaint": complaints,
                "open_tickets": tickets,
                "count_30d_login": logins,
                "count_30d_purchase": purchases,
                "escalations_90d": escalations,
            }
            customer_values.append(values)
            profiles.append(
                {
                    "segment": SEGMENTS[i % 2],
                    "plan": plan,
                    "region": "",
                    "owner_team": "",
                    "signup_date": cutoff - timedelta(days=float(rng.uniform(30, 900))),
                    "attributes": {},
                }
            )
            plan_effect = {"basic": 0.7, "plus": 0.0, "pro": -0.6}[plan]
            ticket: dict[str, float | str] | None = None
            ticket_id = product = ""
            if prediction == "churn":
                logit = -2.2 + sign * (
                    0.9 * failures + 0.03 * days - 0.2 * (nps - 6) + 0.5 * complaints + plan_effect
                )
            elif prediction == "escalation":
                priority = float(rng.integers(0, 4))
                reassignments = float(rng.poisson(0.7))
                sla_left = float(rng.normal(40.0, 30.0))
                ticket = {
                    "ticket_priority": priority,
                    "ticket_reassignments": reassignments,
                    "ticket_open": 1.0,
                    "ticket_sla_hours_left": sla_left,
                    "ticket_reopens": float(rng.poisson(0.2)),
                }
                ticket_id = f"T{k}-{i}"
                logit = -1.8 + sign * (
                    0.6 * priority + 0.7 * reassignments - 0.03 * sla_left + 0.5 * escalations
                )
            else:
                product = PRODUCTS[int(rng.integers(0, len(PRODUCTS)))]
                logit = -2.5 + sign * (
                    0.8 * purchases
                    + 0.1 * logins
                    - 0.8 * failures
                    + {"tv": 0.5, "phone": 0.0, "broadband": -0.5}[product]
                )
            label = int(rng.random() < 1.0 / (1.0 + np.exp(-logit)))
            rows.append(LabelRow(f"c{i}", cutoff, label, ticket_id=ticket_id, product=product))
            ticket_values.append(ticket)
    return assemble(
        prediction,
        rows,
        customer_values,
        ticket_values,
        profiles,
        feature_set_version or FEATURE_SET_VERSION,
        source="synthetic",
        customer_features=CUSTOMER_FEATURES[prediction],
    )


def register_version(
    registry: ModelRegistry,
    prediction: str,
    seed: int,
    *,
    flip: bool = False,
    feature_set_version: str = "",
) -> RegisteredVersion:
    """Trains one small model and registers it as a new version (no alias)."""
    frame = synthetic_frame(prediction, seed, flip=flip, feature_set_version=feature_set_version)
    split = time_split(frame)
    model = train(split.train, split.valid, FAST)
    return registry.log_training(
        model,
        evaluate(model, split.test),
        {"train": split.train, "test": split.test},
        requested_by="scoring tests",
    )

"""The three predictions and how far after a cutoff each label looks.

Kept apart from `dataset` (which needs pandas) so that the command line can
name them without loading the data stack."""

from __future__ import annotations

from datetime import timedelta
from typing import Literal

Prediction = Literal["churn", "escalation", "cross_sell"]
PREDICTIONS: tuple[Prediction, ...] = ("churn", "escalation", "cross_sell")
# How far after the cutoff each label looks.
HORIZONS: dict[Prediction, timedelta] = {
    "churn": timedelta(days=30),
    "escalation": timedelta(hours=72),
    "cross_sell": timedelta(days=14),
}

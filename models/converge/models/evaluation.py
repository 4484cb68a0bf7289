"""Metrics on the held-out test part, and plots.

Figures (`Evaluation`), each on the test rows:

- `roc_auc`: area under the ROC curve (0.5 = no skill);
- `pr_auc`: average precision (the area under the precision-recall curve as
  scikit-learn computes it; no skill = the base rate);
- `log_loss`, `brier`: of the calibrated probabilities;
- `ece`: expected calibration error with 10 equal-width bins over [0, 1]:
  the sum over bins of (rows in bin / rows) * |mean probability - positive
  rate| in the bin (0 = perfectly calibrated); empty bins count zero;
- `lift_top_decile`: the positive rate among the 10% highest scores
  (ceil(n / 10) rows, ties broken by row order) divided by the overall
  positive rate; `capture_top_decile`: the share of all positives found
  there.

`save_plots` writes the ROC curve, the reliability (calibration) curve and
the feature importance (total gain) as PNG files (matplotlib, Agg backend).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import pandas as pd

from converge.models.dataset import TrainingFrame

ECE_BINS = 10


class ProbabilityModel(Protocol):
    """Anything with calibrated probabilities (a `NativeModel`, a `TrainedModel`)."""

    def predict_proba(self, df: pd.DataFrame) -> npt.NDArray[np.float64]: ...


class EvaluationError(ValueError):
    """The test part cannot be evaluated (empty, or only one class)."""


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    mean_probability: float  # NaN when empty
    positive_rate: float  # NaN when empty


@dataclass(frozen=True)
class Evaluation:
    n: int
    n_positive: int
    base_rate: float
    roc_auc: float
    pr_auc: float
    log_loss: float
    brier: float
    ece: float
    lift_top_decile: float
    capture_top_decile: float
    n_top_decile: int
    window: tuple[str, str] = ("", "")
    # For the plots: ROC points (thinned) and the reliability bins.
    roc_fpr: tuple[float, ...] = field(default=(), repr=False)
    roc_tpr: tuple[float, ...] = field(default=(), repr=False)
    bins: tuple[ReliabilityBin, ...] = field(default=(), repr=False)

    def metrics(self, prefix: str = "test_") -> dict[str, float]:
        """The figures as MLflow metrics (`test_roc_auc`, ...)."""
        keys = (
            "roc_auc",
            "pr_auc",
            "log_loss",
            "brier",
            "ece",
            "lift_top_decile",
            "capture_top_decile",
            "base_rate",
            "n",
            "n_positive",
        )
        return {prefix + k: float(getattr(self, k)) for k in keys}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("roc_fpr", "roc_tpr", "bins"):
            data.pop(key)
        data["window"] = list(self.window)
        return data


def expected_calibration_error(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike, bins: int = ECE_BINS
) -> tuple[float, tuple[ReliabilityBin, ...]]:
    """ECE with `bins` equal-width bins over [0, 1] (the last bin includes 1),
    and the bins themselves."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.asarray(probabilities, dtype=np.float64)
    if len(y) == 0:
        raise EvaluationError("no rows to evaluate")
    index = np.minimum((p * bins).astype(np.int64), bins - 1)
    ece = 0.0
    out = []
    for b in range(bins):
        in_bin = index == b
        count = int(in_bin.sum())
        if count:
            mean_p = float(p[in_bin].mean())
            rate = float(y[in_bin].mean())
            ece += count / len(y) * abs(mean_p - rate)
        else:
            mean_p = rate = math.nan
        out.append(ReliabilityBin(b / bins, (b + 1) / bins, count, mean_p, rate))
    return ece, tuple(out)


def top_decile(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[float, float, int]:
    """(lift, capture, rows) in the top 10% of scores."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_top = max(1, math.ceil(len(y) / 10))
    order = np.argsort(-s, kind="stable")[:n_top]
    positives = y.sum()
    top_rate = y[order].mean()
    base = positives / len(y)
    lift = float(top_rate / base) if base > 0 else math.nan
    capture = float(y[order].sum() / positives) if positives > 0 else math.nan
    return lift, capture, n_top


def evaluate_scores(
    labels: npt.ArrayLike, probabilities: npt.ArrayLike, window: tuple[str, str] = ("", "")
) -> Evaluation:
    """Every figure from labels and calibrated probabilities."""
    from sklearn.metrics import (
        average_precision_score,
        brier_score_loss,
        log_loss,
        roc_auc_score,
        roc_curve,
    )

    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(probabilities, dtype=np.float64)
    if len(y) == 0:
        raise EvaluationError("the test part is empty")
    n_pos = int(y.sum())
    if n_pos in (0, len(y)):
        raise EvaluationError(
            f"the test part has only {'negatives' if n_pos == 0 else 'positives'} "
            f"({len(y)} rows): AUC is undefined; evaluate on a longer period"
        )
    ece, bins = expected_calibration_error(y, p)
    lift, capture, n_top = top_decile(y, p)
    fpr, tpr, _ = roc_curve(y, p)
    if len(fpr) > 400:  # thin the curve for plotting; keep both ends
        keep = np.unique(np.linspace(0, len(fpr) - 1, 400).astype(np.int64))
        fpr, tpr = fpr[keep], tpr[keep]
    return Evaluation(
        n=len(y),
        n_positive=n_pos,
        base_rate=n_pos / len(y),
        roc_auc=float(roc_auc_score(y, p)),
        pr_auc=float(average_precision_score(y, p)),
        log_loss=float(log_loss(y, p, labels=[0, 1])),
        brier=float(brier_score_loss(y, p)),
        ece=ece,
        lift_top_decile=lift,
        capture_top_decile=capture,
        n_top_decile=n_top,
        window=window,
        roc_fpr=tuple(float(v) for v in fpr),
        roc_tpr=tuple(float(v) for v in tpr),
        bins=bins,
    )


def evaluate(model: ProbabilityModel, frame_test: TrainingFrame) -> Evaluation:
    """The model's figures on the test part."""
    probabilities = model.predict_proba(frame_test.frame)
    window = (frame_test.window[0].isoformat(), frame_test.window[1].isoformat())
    return evaluate_scores(frame_test.labels, probabilities, window)


def feature_importance(booster: Any) -> pd.Series:
    """Total gain per feature, largest first."""
    gains = booster.feature_importance(importance_type="gain")
    return pd.Series(gains, index=booster.feature_name(), dtype=np.float64).sort_values(
        ascending=False
    )


def save_plots(model: Any, evaluation: Evaluation, out_dir: Path, title: str = "") -> list[Path]:
    """Writes roc.png, calibration.png and feature_importance.png (the last
    only when `model` has a LightGBM `booster`); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{title}: " if title else ""
    paths: list[Path] = []

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(evaluation.roc_fpr, evaluation.roc_tpr, label=f"model (AUC {evaluation.roc_auc:.3f})")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="no skill")
    ax.set(xlabel="False positive rate", ylabel="True positive rate", title=f"{prefix}ROC")
    ax.legend(loc="lower right")
    paths.append(out_dir / "roc.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    used = [b for b in evaluation.bins if b.count]
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.plot(
        [b.mean_probability for b in used],
        [b.positive_rate for b in used],
        marker="o",
        label=f"model (ECE {evaluation.ece:.3f})",
    )
    ax.set(
        xlabel="Mean predicted probability",
        ylabel="Observed positive rate",
        title=f"{prefix}Calibration ({len(evaluation.bins)} bins)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(loc="upper left")
    paths.append(out_dir / "calibration.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    booster = getattr(model, "booster", None)
    if booster is not None:
        gains = feature_importance(booster).head(25)[::-1]
        fig, ax = plt.subplots(figsize=(6, max(2.5, 0.3 * len(gains) + 1)))
        ax.barh(list(gains.index), list(gains.to_numpy()))
        ax.set(xlabel="Total gain", title=f"{prefix}Feature importance (gain)")
        paths.append(out_dir / "feature_importance.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths

"""The population stability index (PSI), in plain Python and numpy.

PSI compares how two samples of one variable fall into the same bins:

    PSI = sum over bins of (current - baseline) * ln(current / baseline)

with each side's share of its samples per bin. Bins come from the baseline:
for numbers, the cut points are its deciles (so about a tenth of the baseline
falls in each bin; repeated cut points merge, so a variable with few values
has fewer bins); for categories, each category seen on either side. Missing
values have their own bin, so a feature that starts going missing drifts too.
A bin empty on one side would make the logarithm infinite, so shares are
floored at `EMPTY_SHARE` (the usual convention) before the sum.

Levels follow `converge.v1.DriftLevel`: fewer than `MIN_SAMPLES` on either
side is INSUFFICIENT_DATA (no PSI), else NONE below 0.1, MODERATE below 0.25,
SIGNIFICANT from 0.25.

No I/O and no gRPC here: the service feeds it arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]

MIN_SAMPLES = 100
MODERATE_FROM = 0.1
SIGNIFICANT_FROM = 0.25
EMPTY_SHARE = 1e-4
MISSING = "missing"
DECILES = tuple(q / 10 for q in range(1, 10))


class DriftLevel(Enum):
    INSUFFICIENT_DATA = "insufficient_data"
    NONE = "none"
    MODERATE = "moderate"
    SIGNIFICANT = "significant"


@dataclass(frozen=True)
class Bin:
    """One bin: `lower <= x < upper` for numbers (label empty), the category
    (bounds 0) for categories, or the missing bin (label "missing")."""

    lower: float
    upper: float
    label: str
    baseline_fraction: float
    current_fraction: float


@dataclass(frozen=True)
class Drift:
    """The drift of one variable between a baseline and a current sample."""

    name: str
    psi: float  # 0 when the level is INSUFFICIENT_DATA
    level: DriftLevel
    bins: tuple[Bin, ...]
    baseline_samples: int
    current_samples: int
    baseline_missing_rate: float
    current_missing_rate: float


def psi(baseline: Sequence[float] | FloatArray, current: Sequence[float] | FloatArray) -> float:
    """The PSI of two share vectors over the same bins (each sums to 1).
    Every term is >= 0 (a share moving either way adds), so PSI >= 0, and it
    is symmetric in its two arguments."""
    b = np.maximum(np.asarray(baseline, dtype=np.float64), EMPTY_SHARE)
    c = np.maximum(np.asarray(current, dtype=np.float64), EMPTY_SHARE)
    if b.shape != c.shape:
        raise ValueError(f"share vectors of different lengths: {b.shape} and {c.shape}")
    return float(np.sum((c - b) * np.log(c / b)))


def level(value: float, baseline_samples: int, current_samples: int) -> DriftLevel:
    if min(baseline_samples, current_samples) < MIN_SAMPLES:
        return DriftLevel.INSUFFICIENT_DATA
    if value < MODERATE_FROM:
        return DriftLevel.NONE
    if value < SIGNIFICANT_FROM:
        return DriftLevel.MODERATE
    return DriftLevel.SIGNIFICANT


def decile_edges(baseline: FloatArray) -> FloatArray:
    """The distinct cut points of the baseline's deciles (missing values
    left out); empty when the baseline has no value."""
    present = baseline[~np.isnan(baseline)]
    if len(present) == 0:
        return np.empty(0, dtype=np.float64)
    return np.unique(np.quantile(present, DECILES))


def numeric_drift(name: str, baseline: FloatArray, current: FloatArray) -> Drift:
    """Drift of a number: bins from the baseline's deciles, and the missing bin."""
    baseline = np.asarray(baseline, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    edges = decile_edges(baseline)
    bounds = [-math.inf, *edges.tolist(), math.inf]

    def counts(values: FloatArray) -> FloatArray:
        missing = np.isnan(values)
        # Bin k holds edges[k-1] <= x < edges[k]: lower bounds are inclusive.
        at = np.searchsorted(edges, values[~missing], side="right")
        binned = np.bincount(at, minlength=len(edges) + 1).astype(np.float64)
        return np.append(binned, float(missing.sum()))

    labels = [""] * (len(bounds) - 1) + [MISSING]
    lowers = [*bounds[:-1], 0.0]
    uppers = [*bounds[1:], 0.0]
    return _drift(name, counts(baseline), counts(current), lowers, uppers, labels)


def categorical_drift(
    name: str, baseline: Sequence[str | None], current: Sequence[str | None]
) -> Drift:
    """Drift of a category: one bin per category seen on either side (the
    baseline's first, in order of first appearance), and the missing bin."""
    categories = list(dict.fromkeys(v for v in (*baseline, *current) if v is not None))
    position = {c: i for i, c in enumerate(categories)}
    missing_at = len(categories)

    def counts(values: Sequence[str | None]) -> FloatArray:
        out = np.zeros(len(categories) + 1, dtype=np.float64)
        for v in values:
            out[missing_at if v is None else position[v]] += 1
        return out

    zeros = [0.0] * (len(categories) + 1)
    return _drift(name, counts(baseline), counts(current), zeros, zeros, [*categories, MISSING])


def _drift(
    name: str,
    baseline_counts: FloatArray,
    current_counts: FloatArray,
    lowers: Sequence[float],
    uppers: Sequence[float],
    labels: Sequence[str],
) -> Drift:
    n_baseline = int(baseline_counts.sum())
    n_current = int(current_counts.sum())
    b = baseline_counts / n_baseline if n_baseline else baseline_counts
    c = current_counts / n_current if n_current else current_counts
    found = level(0.0, n_baseline, n_current)
    value = 0.0
    if found is not DriftLevel.INSUFFICIENT_DATA:
        value = psi(b, c)
        found = level(value, n_baseline, n_current)
    bins = tuple(
        Bin(lo, up, label, float(bf), float(cf))
        for lo, up, label, bf, cf in zip(lowers, uppers, labels, b, c, strict=True)
    )
    return Drift(
        name=name,
        psi=value,
        level=found,
        bins=bins,
        baseline_samples=n_baseline,
        current_samples=n_current,
        baseline_missing_rate=float(b[-1]) if n_baseline else 0.0,
        current_missing_rate=float(c[-1]) if n_current else 0.0,
    )

"""Uplift metrics: how well a ranking (here, the action's expected value)
finds the customers whom the action changes, measured on a randomised
treatment/control split. Pure functions over plain sequences.

Definitions follow scikit-uplift (sklift.metrics, after Radcliffe 2007,
"Using control groups to target on predicted lift", and Gutierrez & Gérardy
2017), so a reader can compare our figures with that library's:

- uplift at k (`strategy="overall"`): order every unit by score, best first
  (ties: stable ascending order reversed, as sklift's mergesort does), take
  the first int(n x k); the treated units' mean outcome minus the control
  units' mean outcome among them. `strategy="by_group"`: the first
  int(n_treated x k) treated and int(n_control x k) control units, each group
  ordered alone.
- Qini curve: at each distinct score threshold t (units ordered best first),
  Q(t) = Y_T(t) - Y_C(t) x N_T(t) / N_C(t), where N are the units and Y the
  positive outcomes of each group among the first t (the term is 0 while
  N_C(t) = 0), with the point (0, 0) prepended.
- Qini coefficient (sklift's qini_auc_score): (area under the model's Qini
  curve - area under the random line) / (area under the perfect curve - area
  under the random line), areas by the trapezoid rule; the random line joins
  (0, 0) to the curve's end; the perfect curve ranks by y x t - y x (1 - t)
  (treated positives first, control positives last: negative effects
  allowed, `negative_effect=True`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

Strategy = Literal["overall", "by_group"]


def _check(outcomes: Sequence[int], scores: Sequence[float], treated: Sequence[bool]) -> None:
    if not len(outcomes) == len(scores) == len(treated):
        raise ValueError("outcomes, scores and treated must have the same length")
    if any(y not in (0, 1) for y in outcomes):
        raise ValueError("outcomes must be 0 or 1")


def _best_first(scores: Sequence[float]) -> list[int]:
    """Indices by score, best first; ties in reverse index order (sklift's
    argsort(kind="mergesort")[::-1])."""
    return sorted(range(len(scores)), key=lambda i: scores[i])[::-1]


def _mean(values: Sequence[int]) -> float | None:
    return sum(values) / len(values) if values else None


def uplift_at_k(
    outcomes: Sequence[int],
    scores: Sequence[float],
    treated: Sequence[bool],
    k: float,
    strategy: Strategy = "overall",
) -> float | None:
    """Treated minus control mean outcome among the best-scored fraction `k`;
    None when a group has no unit there."""
    _check(outcomes, scores, treated)
    if not 0.0 < k <= 1.0:
        raise ValueError("k must be in (0, 1]")
    order = _best_first(scores)
    if strategy == "overall":
        top = order[: int(len(order) * k)]
        treated_mean = _mean([outcomes[i] for i in top if treated[i]])
        control_mean = _mean([outcomes[i] for i in top if not treated[i]])
    else:
        in_treatment = [i for i in order if treated[i]]
        in_control = [i for i in order if not treated[i]]
        treated_mean = _mean([outcomes[i] for i in in_treatment[: int(len(in_treatment) * k)]])
        control_mean = _mean([outcomes[i] for i in in_control[: int(len(in_control) * k)]])
    if treated_mean is None or control_mean is None:
        return None
    return treated_mean - control_mean


def qini_curve(
    outcomes: Sequence[int], scores: Sequence[float], treated: Sequence[bool]
) -> tuple[list[int], list[float]]:
    """The Qini curve's points: units targeted, incremental positives."""
    _check(outcomes, scores, treated)
    order = _best_first(scores)
    xs: list[int] = [0]
    ys: list[float] = [0.0]
    n_treated = n_control = y_treated = y_control = 0
    for position, i in enumerate(order):
        if treated[i]:
            n_treated += 1
            y_treated += outcomes[i]
        else:
            n_control += 1
            y_control += outcomes[i]
        last = position == len(order) - 1
        if last or scores[order[position + 1]] != scores[i]:
            ratio = n_treated / n_control if n_control else 0.0
            xs.append(position + 1)
            ys.append(y_treated - y_control * ratio)
    return xs, ys


def _area(xs: Sequence[float], ys: Sequence[float]) -> float:
    return sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))


def qini_coefficient(
    outcomes: Sequence[int], scores: Sequence[float], treated: Sequence[bool]
) -> float | None:
    """The normalised Qini coefficient (1 for the perfect ranking, 0 for a
    random one, negative for worse); None when it is undefined (no units, or
    the perfect curve has no area over the random line)."""
    _check(outcomes, scores, treated)
    if not outcomes:
        return None
    xs, ys = qini_curve(outcomes, scores, treated)
    perfect_scores = [float(y if t else -y) for y, t in zip(outcomes, treated, strict=True)]
    pxs, pys = qini_curve(outcomes, perfect_scores, treated)
    baseline = _area([0, pxs[-1]], [0.0, pys[-1]])
    perfect = _area(pxs, pys) - baseline
    if perfect == 0:
        return None
    return (_area(xs, ys) - baseline) / perfect

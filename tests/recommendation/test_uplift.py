"""Uplift at k and the Qini coefficient (outcomes/uplift.py) against a worked
example computed by hand, with scikit-uplift's definitions (sklift.metrics
uplift_at_k, qini_curve, perfect_qini_curve, qini_auc_score with
negative_effect=True; after Radcliffe 2007)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.recommendation.outcomes.uplift import qini_coefficient, qini_curve, uplift_at_k

# Eight customers, best score first: (score, treated, converted).
#   1: 0.9 T 1   2: 0.8 C 0   3: 0.7 T 1   4: 0.6 C 1
#   5: 0.5 T 0   6: 0.4 C 0   7: 0.3 T 0   8: 0.2 C 1
SCORES = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
TREATED = [True, False, True, False, True, False, True, False]
CONVERTED = [1, 0, 1, 1, 0, 0, 0, 1]


def test_qini_curve_of_the_worked_example() -> None:
    # Q(t) = Y_T(t) - Y_C(t) * N_T(t) / N_C(t), t = customers targeted:
    # t=1: 1 - 0 (no control yet)       = 1
    # t=2: 1 - 0 * 1/1                  = 1
    # t=3: 2 - 0 * 2/1                  = 2
    # t=4: 2 - 1 * 2/2                  = 1
    # t=5: 2 - 1 * 3/2                  = 0.5
    # t=6: 2 - 1 * 3/3                  = 1
    # t=7: 2 - 1 * 4/3                  = 2/3
    # t=8: 2 - 2 * 4/4                  = 0
    xs, ys = qini_curve(CONVERTED, SCORES, TREATED)
    assert xs == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert ys == pytest.approx([0, 1, 1, 2, 1, 0.5, 1, 2 / 3, 0])


def test_qini_coefficient_of_the_worked_example() -> None:
    # Model's area (trapezoids of width 1):
    #   0.5 + 1 + 1.5 + 1.5 + 0.75 + 0.75 + 5/6 + 1/3 = 43/6.
    # Random line: (0, 0) to (8, 0), area 0.
    # Perfect ranking by y*t - y*(1-t) = [1, 0, 1, -1, 0, 0, 0, -1]: thresholds
    # after the two treated converters (t=2: Q=2), after every zero (t=6: 4
    # treated, 2 control, Q = 2 - 0 = 2) and at the end (t=8: Q = 0); area
    # 2 + 8 + 2 = 12. Qini = (43/6 - 0) / (12 - 0) = 43/72.
    assert qini_coefficient(CONVERTED, SCORES, TREATED) == pytest.approx(43 / 72)


def test_uplift_at_k_of_the_worked_example() -> None:
    # Top 2 overall: customer 1 (T, 1), customer 2 (C, 0): 1 - 0.
    assert uplift_at_k(CONVERTED, SCORES, TREATED, 0.25) == pytest.approx(1.0)
    # Top 6 overall: treated 1, 3, 5 -> 2/3; control 2, 4, 6 -> 1/3.
    assert uplift_at_k(CONVERTED, SCORES, TREATED, 0.75) == pytest.approx(1 / 3)
    # By group, k = 0.75: int(4 * 0.75) = 3 of each group, the same customers.
    assert uplift_at_k(CONVERTED, SCORES, TREATED, 0.75, "by_group") == pytest.approx(1 / 3)
    # Whole population: treated 2/4, control 2/4.
    assert uplift_at_k(CONVERTED, SCORES, TREATED, 1.0) == pytest.approx(0.0)


def test_by_group_differs_from_overall_when_groups_are_unevenly_ranked() -> None:
    # Every treated customer scores above every control one: the overall top
    # half has no control customer (undefined), by group it compares the best
    # half of each group: treated 1, 1 -> 1; control 0, 1 -> 0.5.
    scores = [0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1]
    treated = [True, True, True, True, False, False, False, False]
    converted = [1, 1, 0, 0, 0, 1, 1, 0]
    assert uplift_at_k(converted, scores, treated, 0.5) is None
    assert uplift_at_k(converted, scores, treated, 0.5, "by_group") == pytest.approx(0.5)


def test_perfect_ranking_scores_one_and_reversed_ranking_scores_below_zero() -> None:
    perfect = [float(y if t else -y) for y, t in zip(CONVERTED, TREATED, strict=True)]
    assert qini_coefficient(CONVERTED, perfect, TREATED) == pytest.approx(1.0)
    reversed_scores = [-s for s in perfect]
    coefficient = qini_coefficient(CONVERTED, reversed_scores, TREATED)
    assert coefficient is not None and coefficient < 0


def test_ties_form_one_threshold() -> None:
    # Every score equal: the curve jumps straight to its end, so the model's
    # area equals the random line's and the coefficient is 0.
    xs, ys = qini_curve(CONVERTED, [0.5] * 8, TREATED)
    assert xs == [0, 8]
    assert ys == pytest.approx([0, 0])
    assert qini_coefficient(CONVERTED, [0.5] * 8, TREATED) == pytest.approx(0.0)


def test_undefined_cases_and_bad_input() -> None:
    assert qini_coefficient([], [], []) is None
    # No converter anywhere: the perfect curve is flat, nothing to normalise by.
    assert qini_coefficient([0, 0], [0.1, 0.2], [True, False]) is None
    with pytest.raises(ValueError, match="same length"):
        qini_coefficient([1], [0.1, 0.2], [True])
    with pytest.raises(ValueError, match="0 or 1"):
        uplift_at_k([2], [0.1], [True], 1.0)
    with pytest.raises(ValueError, match="k must be"):
        uplift_at_k([1], [0.1], [True], 0.0)


units = st.lists(
    st.tuples(st.integers(0, 1), st.floats(-100, 100, allow_nan=False), st.booleans()),
    min_size=2,
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(units)
def test_properties_hold_on_any_data(rows: list[tuple[int, float, bool]]) -> None:
    converted = [y for y, _, _ in rows]
    scores = [s for _, s, _ in rows]
    treated = [t for _, _, t in rows]
    # The perfect ranking scores 1 whenever the coefficient is defined.
    perfect = [float(y if t else -y) for y, t in zip(converted, treated, strict=True)]
    best = qini_coefficient(converted, perfect, treated)
    assert best is None or best == pytest.approx(1.0)
    # Only the order of the scores matters: doubling (exact in floating
    # point, so no two scores merge) changes nothing.
    moved = [2.0 * s for s in scores]
    assert qini_coefficient(converted, moved, treated) == pytest.approx(
        qini_coefficient(converted, scores, treated), nan_ok=True
    )
    # Uplift at k = 1 is the difference of the groups' conversion rates.
    treated_ys = [y for y, t in zip(converted, treated, strict=True) if t]
    control_ys = [y for y, t in zip(converted, treated, strict=True) if not t]
    whole = uplift_at_k(converted, scores, treated, 1.0)
    if treated_ys and control_ys:
        assert whole == pytest.approx(
            sum(treated_ys) / len(treated_ys) - sum(control_ys) / len(control_ys)
        )
    else:
        assert whole is None

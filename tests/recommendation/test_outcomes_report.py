"""The actions report's figures (outcomes/report.py): the Wilson and
Newcombe intervals against the worked examples of Newcombe 1998, and a
report over a small hand-made log whose every figure is counted by hand."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from converge.recommendation.outcomes.report import (
    Exposure,
    OutcomeRow,
    build_report,
    newcombe_interval,
    wilson_interval,
)

AT = datetime(2026, 12, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("x", "n", "low", "high"),
    # Newcombe 1998 ("Two-sided confidence intervals for the single
    # proportion", Statistics in Medicine 17), Table I, method 3 (score).
    [
        (81, 263, 0.2553, 0.3662),
        (15, 148, 0.0624, 0.1605),
        (0, 20, 0.0, 0.1611),
        (1, 29, 0.0061, 0.1718),
    ],
)
def test_wilson_interval_matches_newcombe_1998(x: int, n: int, low: float, high: float) -> None:
    interval = wilson_interval(x, n)
    assert interval.low == pytest.approx(low, abs=1e-4)
    assert interval.high == pytest.approx(high, abs=1e-4)


@pytest.mark.parametrize(
    ("x1", "n1", "x2", "n2", "low", "high"),
    # Newcombe 1998 ("Interval estimation for the difference between
    # independent proportions", Statistics in Medicine 17), Table II,
    # method 10 (hybrid score), examples (a), (b), (c), (e).
    [
        (56, 70, 48, 80, 0.0524, 0.3339),
        (9, 10, 3, 10, 0.1705, 0.8090),
        (6, 7, 2, 7, 0.0582, 0.8062),
        (5, 56, 0, 29, -0.0381, 0.1926),
    ],
)
def test_newcombe_interval_matches_newcombe_1998(
    x1: int, n1: int, x2: int, n2: int, low: float, high: float
) -> None:
    interval = newcombe_interval(x1, n1, x2, n2)
    assert interval.low == pytest.approx(low, abs=1e-4)
    assert interval.high == pytest.approx(high, abs=1e-4)


def exposure(
    decision: str, customer: str, arm: str, value: float, action: str = "offer"
) -> Exposure:
    return Exposure(decision, customer, action, arm, value, AT, "3")


def test_report_counts_by_hand() -> None:
    exposures = [
        # Treated: c1 (twice: d1, d2), c2, c3, c4.
        exposure("d1", "c1", "treatment", 9.0),
        exposure("d2", "c1", "treatment", 5.0),
        exposure("d3", "c2", "treatment", 7.0),
        exposure("d4", "c3", "treatment", 3.0),
        exposure("d5", "c4", "treatment", 1.0),
        # Control: c5, c6.
        exposure("d6", "c5", "control", 8.0),
        exposure("d7", "c6", "control", 2.0),
        # c7 in both arms: left out of the lift.
        exposure("d8", "c7", "treatment", 4.0),
        exposure("d9", "c7", "control", 4.0),
        # Another action, with no control group.
        exposure("d1", "c1", "treatment", 2.0, action="call"),
    ]
    outcomes = [
        OutcomeRow("d1", "offer", "treatment", "presented"),
        OutcomeRow("d1", "offer", "treatment", "accepted"),
        OutcomeRow("d2", "offer", "treatment", "converted"),  # c1 converted
        OutcomeRow("d3", "offer", "treatment", "accepted"),
        OutcomeRow("d3", "offer", "treatment", "converted"),  # c2 converted
        OutcomeRow("d4", "offer", "treatment", "declined"),
        OutcomeRow("d6", "offer", "control", "converted"),  # c5 converted
        OutcomeRow("d8", "offer", "treatment", "converted"),  # c7: left out
        # An outcome of another action of d1 does not count for "offer".
        OutcomeRow("d1", "call", "treatment", "converted"),
    ]
    call, offer = build_report(exposures, outcomes)

    assert offer.action_name == "offer"
    assert (offer.offered, offer.held_out, offer.followed) == (6, 3, 2)
    assert offer.outcomes == {"accepted": 2, "converted": 3, "declined": 1, "presented": 1}
    assert offer.control_outcomes == {"converted": 1}
    assert (offer.treated_customers, offer.converted_treated) == (4, 2)
    assert (offer.control_customers, offer.converted_control) == (2, 1)
    assert offer.in_both_arms == 1
    assert offer.conversion_treated == pytest.approx(0.5)
    assert offer.conversion_control == pytest.approx(0.5)
    assert offer.lift == pytest.approx(0.0)
    expected = newcombe_interval(2, 4, 1, 2)
    assert offer.lift_interval == expected
    assert (
        offer.lift_interval is not None and offer.lift_interval.low < 0 < offer.lift_interval.high
    )
    # Uplift at k = 0.3 of 6 customers: the first int(1.8) = 1 by best expected
    # value is c1 (9.0, treated): no control there, undefined.
    assert offer.uplift_at_30 is None
    # Qini over the six customers, best first: c1 (9, T, 1), c5 (8, C, 1),
    # c2 (7, T, 1), c3 (3, T, 0), c6 (2, C, 0), c4 (1, T, 0):
    # Q = 1, 1-1*1/1 = 0, 2-1*2/1 = 0, 2-1*3/1 = -1, 2-1*3/2 = 0.5, 2-1*4/2 = 0;
    # area (trapezoids of width 1) = 0.5 + 0.5 + 0 - 0.5 - 0.25 + 0.25 = 0.5.
    # Perfect (t*y - (1-t)*y): c1, c2 (1), c3, c6, c4 (0), c5 (-1): thresholds
    # at 2 (Q = 2), 5 (4 T, 1 C, no control converter: Q = 2), 6 (Q = 2 - 1*4/2 = 0);
    # area = 2 + 6 + 1 = 9; random line ends at 0. Qini = 0.5 / 9.
    assert offer.qini == pytest.approx(0.5 / 9)

    assert call.offered == 1 and call.held_out == 0
    assert call.lift is None and call.lift_interval is None
    assert call.notes == ["no control group: set the action's control_share to measure lift"]
    assert offer.notes == ["1 customers in both arms (salt or share changed) left out"]

"""Drift: the PSI maths against worked examples computed by hand and against
its properties (hypothesis), then GetDriftReport over real gRPC and
PostgreSQL, on prediction-log windows built from the churn version's own
training sample (stored with it in a real MLflow store): a shifted input is
SIGNIFICANT, an untouched one NONE."""

from __future__ import annotations

import math
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from converge.models.handle import ModelHandle
from converge.models.registry import ModelRegistry
from converge.runtime.values import timestamp
from converge.scoring import drift, prediction_log
from converge.scoring.store import LoggedPrediction, ScoringStore
from converge.v1 import common_pb2, predictions_pb2, scoring_pb2
from tests.scoring.conftest import Scoring, Versions, set_champion
from tests.scoring.test_score import bad_fields

StartScoring = Callable[[], Awaitable[Scoring]]
CHURN = predictions_pb2.PREDICTION_KIND_CHURN
T0 = datetime(2026, 5, 4, tzinfo=UTC)
DAY = timedelta(days=1)
SHIFTED = "payment_failures_30d"
UNTOUCHED = "nps_last"


# --- the maths, by hand ----------------------------------------------------------------


def test_psi_of_two_share_vectors_matches_the_formula_by_hand() -> None:
    # (0.25 - 0.5) ln(0.25 / 0.5) + (0.75 - 0.5) ln(0.75 / 0.5)
    #   = 0.25 * 0.693147 + 0.25 * 0.405465 = 0.274653
    assert drift.psi([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.274653, abs=1e-6)


def test_numeric_bins_are_the_baselines_deciles_and_an_empty_bin_is_floored() -> None:
    baseline = np.arange(100, dtype=np.float64)  # deciles 9.9, 19.8, ..., 89.1
    current = np.array([0.0] * 50 + [99.0] * 50)  # half in the first bin, half in the last
    found = drift.numeric_drift("x", baseline, current)

    edges = [b.lower for b in found.bins[1:10]]
    assert edges == pytest.approx([9.9 * k for k in range(1, 10)])
    assert found.bins[0].lower == -math.inf and found.bins[9].upper == math.inf
    assert [b.baseline_fraction for b in found.bins] == pytest.approx([0.1] * 10 + [0.0])
    assert [b.current_fraction for b in found.bins] == pytest.approx([0.5] + [0.0] * 8 + [0.5, 0])
    assert found.bins[10].label == "missing"
    # Two bins at 0.5 against 0.1; eight empty bins floored at 1e-4 against
    # 0.1; the missing bin empty on both sides adds nothing.
    by_hand = 2 * (0.5 - 0.1) * math.log(0.5 / 0.1) + 8 * (1e-4 - 0.1) * math.log(1e-4 / 0.1)
    assert by_hand == pytest.approx(1.287550 + 5.520678, abs=1e-6)  # 0.8 ln 5 + 0.7992 ln 1000
    assert found.psi == pytest.approx(by_hand)
    assert found.level is drift.DriftLevel.SIGNIFICANT


def test_a_value_on_a_cut_point_falls_in_the_bin_above() -> None:
    found = drift.numeric_drift("x", np.arange(100, dtype=np.float64), np.full(100, 9.9))
    assert found.bins[1].current_fraction == 1.0  # [9.9, 19.8)


def test_categories_and_the_missing_bin_by_hand() -> None:
    baseline = ["a"] * 60 + ["b"] * 40
    current: list[str | None] = ["a"] * 40 + ["b"] * 40 + [None] * 20
    found = drift.categorical_drift("plan", baseline, current)
    assert [(b.label, b.baseline_fraction, b.current_fraction) for b in found.bins] == [
        ("a", 0.6, 0.4),
        ("b", 0.4, 0.4),
        ("missing", 0.0, 0.2),
    ]
    # (0.4 - 0.6) ln(0.4/0.6) + 0 + (0.2 - 1e-4) ln(0.2/1e-4) = 0.081093 + 1.519420
    assert found.psi == pytest.approx(1.600513, abs=1e-6)
    assert found.current_missing_rate == pytest.approx(0.2)
    assert found.baseline_missing_rate == 0.0


def test_levels_follow_the_proto() -> None:
    assert drift.level(0.5, 99, 1000) is drift.DriftLevel.INSUFFICIENT_DATA
    assert drift.level(0.5, 1000, 99) is drift.DriftLevel.INSUFFICIENT_DATA
    assert drift.level(0.0999, 100, 100) is drift.DriftLevel.NONE
    assert drift.level(0.1, 100, 100) is drift.DriftLevel.MODERATE
    assert drift.level(0.2499, 100, 100) is drift.DriftLevel.MODERATE
    assert drift.level(0.25, 100, 100) is drift.DriftLevel.SIGNIFICANT
    few = drift.numeric_drift("x", np.arange(99, dtype=np.float64), np.zeros(500))
    assert few.level is drift.DriftLevel.INSUFFICIENT_DATA and few.psi == 0.0


# --- the maths, by property ------------------------------------------------------------

samples = st.lists(
    st.one_of(
        st.floats(min_value=-1e6, max_value=1e6, allow_nan=False),
        st.just(math.nan),
        st.sampled_from([0.0, 1.0, 2.0]),  # ties, as counts have
    ),
    min_size=1,
    max_size=300,
)
labels = st.lists(st.one_of(st.none(), st.sampled_from("abcde")), min_size=1, max_size=300)


@given(samples)
def test_a_sample_against_itself_has_no_drift(values: list[float]) -> None:
    array = np.array(values)
    assert drift.numeric_drift("x", array, array).psi == pytest.approx(0.0, abs=1e-12)


@given(labels)
def test_a_categorical_sample_against_itself_has_no_drift(values: list[str | None]) -> None:
    assert drift.categorical_drift("x", values, values).psi == pytest.approx(0.0, abs=1e-12)


@given(samples, samples)
def test_psi_is_never_negative_and_shares_sum_to_one(a: list[float], b: list[float]) -> None:
    found = drift.numeric_drift("x", np.array(a * 100), np.array(b * 100))
    assert found.psi >= 0.0
    assert sum(x.baseline_fraction for x in found.bins) == pytest.approx(1.0)
    assert sum(x.current_fraction for x in found.bins) == pytest.approx(1.0)


@given(labels, labels)
def test_over_the_same_bins_psi_is_symmetric(a: list[str | None], b: list[str | None]) -> None:
    forth = drift.categorical_drift("x", a, b)
    back = drift.categorical_drift("x", b, a)
    assert {x.label for x in forth.bins} == {x.label for x in back.bins}
    assert forth.psi == pytest.approx(back.psi)
    assert forth.psi >= 0.0


# --- GetDriftReport over gRPC -----------------------------------------------------------


def churn_handle(scoring: Scoring, version: str) -> ModelHandle:
    handle = ModelHandle(ModelRegistry(tracking_uri=scoring.tracking_uri), "churn", version)
    handle.load()
    return handle


def window_rows(
    handle: ModelHandle,
    start: datetime,
    n: int,
    *,
    seed: int,
    failures_added: float = 0.0,
    plan: str = "",
) -> list[LoggedPrediction]:
    """`n` log entries drawn from the version's training sample (its
    population), optionally shifted, scored by the version itself, spread
    over the day from `start`."""
    sample = handle.drift_sample
    assert sample is not None, "the test versions store a training sample"
    schema = handle.schema
    rng = np.random.default_rng(seed)
    inputs = sample.inputs[rng.integers(0, len(sample.inputs), size=n)].copy()
    names = list(sample.names)
    inputs[:, names.index(SHIFTED)] += failures_added
    if plan:
        inputs[:, names.index("profile_plan")] = schema.categories["profile_plan"].index(plan)
    probabilities = handle.predict(inputs)
    return [
        LoggedPrediction(
            score_id=uuid.uuid4().hex,
            position=0,
            customer_id=uuid.uuid4(),
            prediction="churn",
            ticket_id="",
            product_id="",
            model_name=handle.ref.name,
            model_version=handle.ref.version,
            features=prediction_log._named(row, schema),
            probability=float(p),
            band="low",
            channel="web",
            scored_at=start + DAY * (k / n),
        )
        for k, (row, p) in enumerate(zip(inputs, probabilities, strict=True))
    ]


def time_range(start: datetime, end: datetime) -> common_pb2.TimeRange:
    return common_pb2.TimeRange(start=timestamp(start), end=timestamp(end))


def by_feature(report: scoring_pb2.GetDriftReportResponse) -> dict[str, scoring_pb2.FeatureDrift]:
    return {f.feature: f for f in report.features}


@pytest.fixture
async def churn_scoring(
    start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> Scoring:
    set_champion(tracking_uri, "churn", versions.churn)
    return await start_scoring()


async def test_a_shifted_input_drifts_significantly_against_the_training_sample(
    churn_scoring: Scoring, versions: Versions
) -> None:
    handle = churn_handle(churn_scoring, versions.churn)
    store = ScoringStore(churn_scoring.runtime.pool)
    await store.append(window_rows(handle, T0, 1500, seed=1, failures_added=4.0, plan="pro"))
    # Outside the window: never read.
    await store.append(window_rows(handle, T0 - 2 * DAY, 300, seed=2))

    report = await churn_scoring.stub.GetDriftReport(
        scoring_pb2.GetDriftReportRequest(kind=CHURN, window=time_range(T0, T0 + DAY))
    )
    assert report.kind == CHURN
    assert report.model.version == versions.churn
    assert report.current_samples == 1500
    assert report.baseline_samples == len(handle.drift_sample.inputs)  # type: ignore[union-attr]
    assert not report.HasField("baseline_window")
    features = by_feature(report)
    assert set(features) == set(handle.schema.names)
    assert features[SHIFTED].level == scoring_pb2.DRIFT_LEVEL_SIGNIFICANT
    assert features["profile_plan"].level == scoring_pb2.DRIFT_LEVEL_SIGNIFICANT
    assert features[UNTOUCHED].level == scoring_pb2.DRIFT_LEVEL_NONE
    assert features[UNTOUCHED].psi < 0.1
    # More failed payments raise churn: the score moved with its input.
    assert report.score.feature == "score"
    assert report.score.level == scoring_pb2.DRIFT_LEVEL_SIGNIFICANT
    psis = [f.psi for f in report.features]
    assert psis == sorted(psis, reverse=True)
    plan_bins = {b.label: b for b in features["profile_plan"].bins}
    assert plan_bins["pro"].current_fraction == 1.0
    assert 0.2 < plan_bins["pro"].baseline_fraction < 0.5  # a third of the training plans


async def test_two_windows_of_the_log_compare_when_a_baseline_window_is_set(
    churn_scoring: Scoring, versions: Versions
) -> None:
    handle = churn_handle(churn_scoring, versions.churn)
    store = ScoringStore(churn_scoring.runtime.pool)
    await store.append(window_rows(handle, T0, 1000, seed=3))
    await store.append(window_rows(handle, T0 + DAY, 1000, seed=4, failures_added=4.0))

    report = await churn_scoring.stub.GetDriftReport(
        scoring_pb2.GetDriftReportRequest(
            kind=CHURN,
            window=time_range(T0 + DAY, T0 + 2 * DAY),
            baseline_window=time_range(T0, T0 + DAY),
            feature_names=[SHIFTED, UNTOUCHED],
        )
    )
    assert (report.current_samples, report.baseline_samples) == (1000, 1000)
    assert report.baseline_window.start.ToDatetime(UTC) == T0
    features = by_feature(report)
    assert set(features) == {SHIFTED, UNTOUCHED}
    assert features[SHIFTED].level == scoring_pb2.DRIFT_LEVEL_SIGNIFICANT
    assert features[UNTOUCHED].level == scoring_pb2.DRIFT_LEVEL_NONE

    # The same window on both sides: no drift at all.
    same = await churn_scoring.stub.GetDriftReport(
        scoring_pb2.GetDriftReportRequest(
            kind=CHURN,
            window=time_range(T0, T0 + DAY),
            baseline_window=time_range(T0, T0 + DAY),
        )
    )
    assert all(f.psi == pytest.approx(0.0, abs=1e-12) for f in same.features)


async def test_a_window_under_100_predictions_has_insufficient_data(
    churn_scoring: Scoring, versions: Versions
) -> None:
    handle = churn_handle(churn_scoring, versions.churn)
    await ScoringStore(churn_scoring.runtime.pool).append(
        window_rows(handle, T0, 99, seed=5, failures_added=4.0)
    )
    report = await churn_scoring.stub.GetDriftReport(
        scoring_pb2.GetDriftReportRequest(kind=CHURN, window=time_range(T0, T0 + DAY))
    )
    assert report.current_samples == 99
    for found in [report.score, *report.features]:
        assert found.level == scoring_pb2.DRIFT_LEVEL_INSUFFICIENT_DATA
        assert found.psi == 0.0


async def test_bad_drift_requests_name_the_field(churn_scoring: Scoring) -> None:
    cases = [
        (scoring_pb2.GetDriftReportRequest(), ["kind"]),
        (
            scoring_pb2.GetDriftReportRequest(kind=CHURN, feature_names=["no_such_input"]),
            ["feature_names[0]"],
        ),
        (
            scoring_pb2.GetDriftReportRequest(kind=CHURN, window=time_range(T0 + DAY, T0)),
            ["window"],
        ),
    ]
    for request, fields in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await churn_scoring.stub.GetDriftReport(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, request
        assert bad_fields(caught.value) == fields


async def test_drift_needs_a_version_to_compare_against(
    start_scoring: StartScoring, versions: Versions
) -> None:
    scoring = await start_scoring()  # no champion anywhere: the rules answer
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.stub.GetDriftReport(scoring_pb2.GetDriftReportRequest(kind=CHURN))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.stub.GetDriftReport(
            scoring_pb2.GetDriftReportRequest(kind=CHURN, model_version=versions.churn)
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND

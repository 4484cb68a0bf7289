"""Training, calibration, evaluation, splits and the fallback, on synthetic
frames with a known ground truth (real LightGBM, no fakes)."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from converge.models import fallback
from converge.models.dataset import (
    HORIZONS,
    Split,
    SplitError,
    TrainingFrame,
    stratified_folds,
    stratified_split,
    time_split,
)
from converge.models.evaluation import (
    evaluate,
    evaluate_scores,
    expected_calibration_error,
    save_plots,
    top_decile,
)
from converge.models.native import NativeModel
from converge.models.training import (
    MINIMUMS,
    InsufficientData,
    TrainedModel,
    TrainingConfig,
    search,
    train,
)
from tests.models.conftest import FAST
from tests.models.synthetic import make_frame

# --- splits -------------------------------------------------------------------------


def test_time_split_trains_on_the_past_validates_later_and_tests_on_the_latest() -> None:
    frame = make_frame(n_cutoffs=30, rows_per_cutoff=50, seed=3)
    split = time_split(frame)
    train_cut = split.train.frame["cutoff"]
    valid_cut = split.valid.frame["cutoff"]
    test_cut = split.test.frame["cutoff"]
    horizon = HORIZONS["churn"]
    assert train_cut.max() + horizon <= valid_cut.min()
    assert valid_cut.max() + horizon <= test_cut.min()
    assert test_cut.max() == frame.frame["cutoff"].max()
    # Each cutoff's rows are all in one part (or all left out in a gap).
    for cutoff, rows in frame.frame.groupby("cutoff").size().items():
        in_parts = [int((part.frame["cutoff"] == cutoff).sum()) for part in split]
        assert sorted(in_parts)[:2] == [0, 0] and max(in_parts) in (0, rows)
    assert split.test.n_examples >= 0.15 * frame.n_examples
    assert split.valid.n_examples >= 0.15 * frame.n_examples
    assert split.train.window[1] == train_cut.max().to_pydatetime()


def test_time_split_without_gap_keeps_every_row() -> None:
    frame = make_frame(n_cutoffs=10, rows_per_cutoff=20, seed=4)
    split = time_split(frame, gap=timedelta(0))
    assert sum(p.n_examples for p in split) == frame.n_examples
    assert split.train.frame["cutoff"].max() < split.valid.frame["cutoff"].min()
    assert split.valid.frame["cutoff"].max() < split.test.frame["cutoff"].min()


def test_time_split_refuses_too_few_cutoffs() -> None:
    with pytest.raises(SplitError, match="2 distinct cutoff"):
        time_split(make_frame(n_cutoffs=2, rows_per_cutoff=100), gap=timedelta(0))
    # Five weekly cutoffs cannot hold three parts 30 days apart.
    with pytest.raises(SplitError, match="gap"):
        time_split(make_frame(n_cutoffs=5, rows_per_cutoff=100))


def test_stratified_split_keeps_the_base_rate_and_refuses_repeated_entities() -> None:
    frame = make_frame(n_cutoffs=1, rows_per_cutoff=2000, seed=5)
    once = frame.frame.assign(entity_id=[f"e{i}" for i in range(frame.n_examples)])
    snapshot = replace(frame, frame=once)
    split = stratified_split(snapshot, seed=1)
    rate = snapshot.n_positives / snapshot.n_examples
    for part in split:
        assert abs(part.n_positives / part.n_examples - rate) < 0.01
    assert sum(p.n_examples for p in split) == snapshot.n_examples
    with pytest.raises(SplitError, match="time_split"):
        stratified_split(make_frame(n_cutoffs=3, rows_per_cutoff=100))


def test_cross_validation_folds_test_every_row_once_and_keep_the_base_rate() -> None:
    frame = make_frame(n_cutoffs=1, rows_per_cutoff=2000, seed=5)
    snapshot = replace(
        frame, frame=frame.frame.assign(entity_id=[f"e{i}" for i in range(frame.n_examples)])
    )
    folds = stratified_folds(snapshot, 5, seed=3)
    rate = snapshot.n_positives / snapshot.n_examples
    tested: list[str] = []
    for split in folds:
        parts = [set(part.frame["entity_id"]) for part in split]
        assert not (parts[0] & parts[1]) and not (parts[0] & parts[2])
        assert not (parts[1] & parts[2])
        assert sum(len(p) for p in parts) == snapshot.n_examples
        assert abs(split.test.n_positives / split.test.n_examples - rate) < 0.01
        assert (
            abs(split.valid.n_examples / (snapshot.n_examples - split.test.n_examples) - 0.15)
            < 0.01
        )
        tested += list(split.test.frame["entity_id"])
    assert sorted(tested) == sorted(snapshot.frame["entity_id"])  # each row tested exactly once
    again = stratified_folds(snapshot, 5, seed=3)
    assert [list(s.test.frame["entity_id"]) for s in again] == [
        list(s.test.frame["entity_id"]) for s in folds
    ]
    with pytest.raises(SplitError, match="split by time"):
        stratified_folds(make_frame(n_cutoffs=3, rows_per_cutoff=100), 5)


def test_training_frame_requires_tz_aware_cutoffs_and_category_dtype() -> None:
    frame = make_frame(n_cutoffs=3, rows_per_cutoff=10)
    naive = frame.frame.assign(cutoff=frame.frame["cutoff"].dt.tz_localize(None))
    with pytest.raises(ValueError, match="tz-aware"):
        TrainingFrame.from_frame(naive, "churn", "v1", feature_names=frame.feature_names)
    as_text = frame.frame.assign(plan=frame.frame["plan"].astype(str))
    with pytest.raises(ValueError, match="numeric or category"):
        TrainingFrame.from_frame(as_text, "churn", "v1", feature_names=frame.feature_names)


# --- training quality ---------------------------------------------------------------


def test_model_reaches_most_of_the_bayes_optimal_auc(
    big_split: Split, big_model: TrainedModel
) -> None:
    """The generator's true probabilities give the best AUC any model can
    reach on these test rows; the model must get at least 90% of the way from
    no skill (0.5) to it. With 25,000 rows and six features of which five
    matter, LightGBM reaches about 95%."""
    result = evaluate(big_model, big_split.test)
    bayes = roc_auc_score(big_split.test.labels, big_split.test.frame["p_true"])
    assert bayes > 0.75  # the generator has real signal
    assert result.roc_auc - 0.5 >= 0.9 * (bayes - 0.5), (result.roc_auc, bayes)
    assert result.lift_top_decile > 2.0
    assert big_model.categorical_features == ("plan",)


def test_calibrated_probabilities_mean_what_they_say(
    big_split: Split, big_model: TrainedModel
) -> None:
    """ECE under 0.05 on 4,000 test rows (the true probabilities themselves
    score about 0.01 there: sampling noise), while the booster's raw output,
    inflated by the class weighting, is clearly off: by Platt scaling (about
    400 validation positives, under the isotonic minimum of 1,000) and by
    isotonic regression when its minimum is lowered."""
    assert big_split.valid.n_positives < TrainingConfig().isotonic_min_positives
    isotonic = train(
        big_split.train, big_split.valid, FAST.model_copy(update={"isotonic_min_positives": 200})
    )
    assert big_model.calibrator.method == "sigmoid"
    assert isotonic.calibrator.method == "isotonic"
    for model in (big_model, isotonic):
        assert model.stats is not None and model.stats.scale_pos_weight > 2
        result = evaluate(model, big_split.test)
        assert result.ece < 0.05, model.calibrator.method
        raw_ece, _ = expected_calibration_error(
            big_split.test.labels, model.predict_raw(big_split.test.frame)
        )
        assert raw_ece > 0.05
        mean_p = model.predict_proba(big_split.test.frame).mean()
        assert abs(mean_p - result.base_rate) < 0.02


def test_few_validation_positives_use_platt_scaling(small_split: Split) -> None:
    rounds: list[tuple[int, int, float]] = []
    model = train(small_split.train, small_split.valid, FAST, progress=lambda *r: rounds.append(r))
    # Every boosting round is told, with its validation AUC, up to the last one run.
    assert [r[0] for r in rounds] == list(range(1, len(rounds) + 1))
    assert all(most == FAST.max_rounds for _, most, _ in rounds)
    assert all(0.0 <= auc <= 1.0 for _, _, auc in rounds)
    assert model.stats is not None and len(rounds) == model.stats.rounds_trained
    assert small_split.valid.n_positives < 200
    assert model.calibrator.method == "sigmoid"
    p = model.predict_proba(small_split.test.frame)
    assert np.all((p > 0) & (p < 1))
    assert abs(p.mean() - small_split.test.labels.mean()) < 0.05


def test_unseen_category_is_scored_as_missing(big_split: Split, big_model: TrainedModel) -> None:
    rows = big_split.test.frame.head(50)
    unseen = rows.assign(plan=pd.Series(["platinum"] * len(rows), index=rows.index))
    missing = rows.assign(plan=pd.Series([None] * len(rows), index=rows.index, dtype=object))
    as_text = rows.assign(plan=rows["plan"].astype(str))
    np.testing.assert_allclose(big_model.predict_proba(unseen), big_model.predict_proba(missing))
    np.testing.assert_allclose(big_model.predict_proba(as_text), big_model.predict_proba(rows))
    assert not np.allclose(big_model.predict_proba(unseen), big_model.predict_proba(rows))


def test_saved_model_predicts_the_same(
    big_split: Split, big_model: TrainedModel, tmp_path: Path
) -> None:
    loaded = NativeModel.load(big_model.save(tmp_path / "native"))
    frame = big_split.test.frame
    np.testing.assert_array_equal(loaded.predict_proba(frame), big_model.predict_proba(frame))
    assert loaded.categorical_levels == big_model.categorical_levels


def test_training_below_the_minimum_raises_insufficient_data() -> None:
    split = time_split(make_frame(n_cutoffs=10, rows_per_cutoff=15, seed=6), gap=timedelta(0))
    minimum = MINIMUMS["churn"]
    assert split.train.n_examples < minimum.train_examples
    with pytest.raises(InsufficientData) as caught:
        train(split.train, split.valid, FAST)
    assert caught.value.prediction == "churn"
    assert any("training examples, need 200" in s for s in caught.value.shortfalls)
    assert "fallback" in str(caught.value)


def test_search_is_bounded_and_never_worse_than_the_defaults(small_split: Split) -> None:
    quick = FAST.model_copy(update={"max_rounds": 100})
    result = search(small_split.train, small_split.valid, quick, trials=3, seed=7)
    assert len(result.trials) == 3
    assert result.trials[0].config == quick
    losses = [t.valid_log_loss for t in result.trials]
    assert result.best_config == result.trials[int(np.argmin(losses))].config
    assert all(math.isfinite(x) for x in losses)
    timed = search(small_split.train, small_split.valid, quick, trials=50, time_budget_s=0.0)
    assert len(timed.trials) == 1


# --- evaluation ---------------------------------------------------------------------


def test_metrics_on_hand_computed_scores() -> None:
    labels = np.array([1, 0, 1, 0, 0, 0, 0, 0, 0, 1] * 10)
    scores = np.array([0.95, 0.05, 0.85, 0.15, 0.25, 0.05, 0.15, 0.35, 0.05, 0.55] * 10)
    # Bins 0 (0.05 x3: rate 0), 1 (0.15 x2: 0), 2 (0.25: 0), 3 (0.35: 0),
    # 5 (0.55: 1), 8 (0.85: 1), 9 (0.95: 1); ECE = sum of |p - rate| / 10.
    expected = (3 * 0.05 + 2 * 0.15 + 0.25 + 0.35 + 0.45 + 0.15 + 0.05) / 10
    ece, bins = expected_calibration_error(labels, scores)
    assert ece == pytest.approx(expected)
    assert sum(b.count for b in bins) == len(labels)
    lift, capture, n_top = top_decile(labels, scores)
    assert n_top == 10
    assert lift == pytest.approx(1 / 0.3)
    assert capture == pytest.approx(10 / 30)
    result = evaluate_scores(labels, scores)
    assert result.roc_auc == pytest.approx(1.0)
    assert result.n_positive == 30


def test_plots_are_written_as_png(
    big_split: Split, big_model: TrainedModel, tmp_path: Path
) -> None:
    result = evaluate(big_model, big_split.test)
    paths = save_plots(big_model, result, tmp_path / "plots", title="churn")
    assert [p.name for p in paths] == ["roc.png", "calibration.png", "feature_importance.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert path.stat().st_size > 5000


# --- fallback -----------------------------------------------------------------------


RISKY: dict[str, dict[str, fallback.FeatureValue]] = {
    "churn": {
        "days_since_last_interaction": 75,
        "payment_failures_30d": 2,
        "nps_last": 2,
        "subscription_cancellations_90d": 1,
        "usage_change_30d": -12,
    },
    "escalation": {
        "ticket_open": 1,
        "ticket_priority": 3,
        "ticket_sla_hours_left": 5,
        "ticket_reassignments": 3,
        "ticket_last_sentiment": -0.8,
    },
    "cross_sell": {
        "usage_change_30d": 25,
        "count_30d_purchase": 2,
        "marketing_clicks_30d": 3,
        "count_30d_login": 20,
        "products_held": 2,
    },
}
SAFE: dict[str, dict[str, fallback.FeatureValue]] = {
    "churn": {
        "days_since_last_interaction": 2,
        "payment_failures_30d": 0,
        "nps_last": 10,
        "subscription_cancellations_90d": 0,
        "usage_change_30d": 4,
    },
    "escalation": {
        "ticket_open": 0,
        "ticket_priority": "low",
        "ticket_sla_hours_left": 200,
        "ticket_reassignments": 0,
        "ticket_last_sentiment": 0.6,
    },
    "cross_sell": {
        "usage_change_30d": -10,
        "count_30d_purchase": 0,
        "payment_failures_30d": 2,
        "marketing_unsubscribes_90d": 1,
    },
}


@pytest.mark.parametrize("prediction", ["churn", "escalation", "cross_sell"])
def test_fallback_ranks_a_risky_case_above_a_safe_one(prediction: str) -> None:
    risky = fallback.score(prediction, RISKY[prediction])
    safe = fallback.score(prediction, SAFE[prediction])
    prior = fallback.PRIORS[prediction]  # type: ignore[index]
    assert risky.probability > 3 * prior and safe.probability < prior
    assert risky.fallback and safe.fallback
    assert risky.model_name.startswith("converge-rules-")
    assert risky.reasons and all(r.text and r.contribution > 0 for r in risky.reasons)
    contributions = [abs(r.contribution) for r in risky.reasons]
    assert contributions == sorted(contributions, reverse=True)


def test_fallback_treats_missing_features_as_unknown() -> None:
    nothing = fallback.score("churn", {"nps_last": float("nan"), "payment_failures_30d": None})
    assert nothing.probability == pytest.approx(fallback.PRIORS["churn"])
    assert nothing.reasons == ()
    assert set(nothing.unknown) == set(fallback.features_used("churn"))


def test_fallback_reads_only_features_the_interactions_service_defines() -> None:
    from converge.features.engine import REGISTRY

    defined = {d.name for d in REGISTRY}
    for prediction in ("churn", "escalation", "cross_sell"):
        assert set(fallback.features_used(prediction)) <= defined, prediction


def test_tree_size_and_learning_rate_adapt_to_the_training_rows(small_split: Split) -> None:
    """Unset, they follow the number of training rows (small data: simpler
    trees, smaller steps); set, they are kept; a trained model records what
    it used."""
    default = TrainingConfig()
    small, medium, large = (
        default.for_rows(1_800),
        default.for_rows(20_000),
        default.for_rows(200_000),
    )
    assert (small.num_leaves, small.min_data_in_leaf, small.learning_rate) == (7, 18, 0.02)
    assert (medium.num_leaves, medium.min_data_in_leaf, medium.learning_rate) == (15, 40, 0.05)
    assert (large.num_leaves, large.min_data_in_leaf, large.learning_rate) == (31, 40, 0.05)
    assert default.for_rows(300).min_data_in_leaf == 10
    chosen = TrainingConfig(num_leaves=63, min_data_in_leaf=5, learning_rate=0.3).for_rows(1_800)
    assert (chosen.num_leaves, chosen.min_data_in_leaf, chosen.learning_rate) == (63, 5, 0.3)
    with pytest.raises(ValueError, match="for_rows"):
        default.lightgbm_params(1.0)
    model = train(small_split.train, small_split.valid, FAST)
    assert model.config == FAST.for_rows(small_split.train.n_examples)
    assert model.config.num_leaves == 7 and model.config.learning_rate == FAST.learning_rate

"""LightGBM training with calibrated probabilities.

`train(train, valid, config)`:

1. checks the minimums (`MINIMUMS`; below them it raises `InsufficientData`
   and the platform answers with `fallback`);
2. trains a binary LightGBM model, its tree size and learning rate chosen
   from the number of training rows unless the config sets them
   (`TrainingConfig.for_rows`: small data wants simpler trees), reproducibly
   (fixed seed, deterministic mode), categorical features passed natively,
   positives weighted by `scale_pos_weight` (by default the square root of
   negatives / positives: it helps the trees find rare positives without
   distorting scores as much as the full ratio), early stopping on the
   validation part's ROC AUC (a ranking metric, so the weighting does not
   bias the choice of the number of rounds);
3. fits a calibrator on the validation part, mapping the booster's (weighted,
   hence inflated) probabilities to calibrated ones. The rule:
   **isotonic regression** when the validation part has at least
   `config.isotonic_min_positives` positives and as many negatives (default
   1,000: below about a thousand calibration examples isotonic regression
   overfits where Platt scaling does not, Niculescu-Mizil and Caruana,
   "Predicting good probabilities with supervised learning", ICML 2005; and
   its flat steps tie scores the booster ranked apart, which cost IBM Telco
   0.003 AUC at 200), else **Platt scaling** (a two-parameter logistic fit
   on the booster's log-odds, strictly monotone: the booster's ranking and
   so its AUC are kept).

Early stopping and calibration share the validation part: the number of
rounds is one integer chosen there, a small optimism that the test part,
never used for either, measures honestly.

`search(...)` is an optional, bounded random search around the defaults.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import lightgbm as lgb
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from converge.models.dataset import PREDICTIONS, Prediction, TrainingFrame
from converge.models.native import Calibrator, FloatArray, NativeModel

# --- minimums -----------------------------------------------------------------------


@dataclass(frozen=True)
class Minimum:
    """The least data a prediction trains on. Below it, the rule-based
    fallback answers (`converge.models.fallback`), marked as such.

    200 training examples with 20 positives (and 20 negatives) is where a
    small LightGBM model with early stopping starts to beat simple rules on
    held-out data; 10 positives and 10 negatives in validation are the least
    for early stopping and a Platt fit to mean anything.
    """

    train_examples: int = 200
    train_positives: int = 20
    train_negatives: int = 20
    valid_examples: int = 50
    valid_positives: int = 10
    valid_negatives: int = 10


MINIMUMS: dict[Prediction, Minimum] = {p: Minimum() for p in PREDICTIONS}
MIN_EXAMPLES: dict[Prediction, int] = {p: m.train_examples for p, m in MINIMUMS.items()}
MIN_POSITIVES: dict[Prediction, int] = {p: m.train_positives for p, m in MINIMUMS.items()}


class InsufficientData(ValueError):
    """Too few labelled examples to train: use the rule-based fallback."""

    def __init__(self, prediction: str, shortfalls: list[str]) -> None:
        self.prediction = prediction
        self.shortfalls = shortfalls
        super().__init__(
            f"{prediction}: too little data to train ({'; '.join(shortfalls)}); "
            "the rule-based fallback answers until there is more"
        )


def shortfalls(train: TrainingFrame, valid: TrainingFrame) -> list[str]:
    """What `train` and `valid` lack against the prediction's minimum (empty
    when they are enough)."""
    m = MINIMUMS[train.prediction]
    out = []
    checks = (
        ("training examples", train.n_examples, m.train_examples),
        ("training positives", train.n_positives, m.train_positives),
        ("training negatives", train.n_examples - train.n_positives, m.train_negatives),
        ("validation examples", valid.n_examples, m.valid_examples),
        ("validation positives", valid.n_positives, m.valid_positives),
        ("validation negatives", valid.n_examples - valid.n_positives, m.valid_negatives),
    )
    for what, have, need in checks:
        if have < need:
            out.append(f"{have} {what}, need {need}")
    return out


def check_sufficient(train: TrainingFrame, valid: TrainingFrame) -> None:
    """Raises `InsufficientData` when below the prediction's minimum."""
    missing = shortfalls(train, valid)
    if missing:
        raise InsufficientData(train.prediction, missing)


# --- configuration ------------------------------------------------------------------


# Tree size and learning rate by the number of training rows, where the
# config leaves them unset (`TrainingConfig.for_rows`): small data wants
# simpler trees. Measured through the product path: on IBM Telco (about 4,800
# training rows a fold) 31 leaves gave 0.840 AUC and 7 leaves at a rate of
# 0.02 about 0.848; on the ServiceNow sample (about 1,800 training tickets)
# a leaf minimum of 40 rows lost 0.05 AUC against about 20, and 31 leaves
# stopped after 4 to 14 rounds. Large sets (CDNOW churn, 100,000+ rows)
# keep the former defaults.
SMALL_DATA_ROWS = 10_000
MEDIUM_DATA_ROWS = 50_000


def adaptive_num_leaves(n_train: int) -> int:
    """7 leaves below `SMALL_DATA_ROWS` training rows, 15 below
    `MEDIUM_DATA_ROWS`, else 31 (LightGBM's default)."""
    if n_train < SMALL_DATA_ROWS:
        return 7
    return 15 if n_train < MEDIUM_DATA_ROWS else 31


def adaptive_min_data_in_leaf(n_train: int) -> int:
    """1% of the training rows, at least 10 and at most 40: a leaf of 40 rows
    is a fine grain on 100,000 rows and a coarse one on 1,800."""
    return min(40, max(10, round(n_train / 100)))


def adaptive_learning_rate(n_train: int) -> float:
    """0.02 below `SMALL_DATA_ROWS` training rows (smaller steps average
    more trees, and few rows make each tree noisy; a few hundred rounds cost
    a second there), else 0.05."""
    return 0.02 if n_train < SMALL_DATA_ROWS else 0.05


class TrainingConfig(BaseModel):
    """LightGBM and calibration settings. The defaults work untuned.

    `learning_rate`, `num_leaves` and `min_data_in_leaf` left as None (the
    default) adapt to the number of training rows (`for_rows`, the
    `adaptive_*` rules above); a value given is used as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    learning_rate: float | None = Field(default=None, gt=0, le=1)
    num_leaves: int | None = Field(default=None, ge=2, le=4096)
    min_data_in_leaf: int | None = Field(default=None, ge=1)
    feature_fraction: float = Field(default=0.8, gt=0, le=1)
    bagging_fraction: float = Field(default=0.8, gt=0, le=1)
    bagging_freq: int = Field(default=1, ge=0)
    lambda_l2: float = Field(default=1.0, ge=0)
    max_rounds: int = Field(default=2000, ge=1)
    early_stopping_rounds: int = Field(default=100, ge=1)
    # How positives are weighted: sqrt(neg/pos), neg/pos, or not at all.
    imbalance: Literal["sqrt_ratio", "ratio", "none"] = "sqrt_ratio"
    isotonic_min_positives: int = Field(default=1000, ge=1)
    num_threads: int = Field(default=2, ge=1)
    seed: int = 42

    def for_rows(self, n_train: int) -> TrainingConfig:
        """This config with every unset size-dependent setting chosen for
        `n_train` training rows (what a trained model records)."""
        return self.model_copy(
            update={
                "learning_rate": self.learning_rate or adaptive_learning_rate(n_train),
                "num_leaves": self.num_leaves or adaptive_num_leaves(n_train),
                "min_data_in_leaf": self.min_data_in_leaf or adaptive_min_data_in_leaf(n_train),
            }
        )

    def lightgbm_params(self, scale_pos_weight: float) -> dict[str, Any]:
        """LightGBM's parameters, reproducible: a fixed `seed` (LightGBM
        derives its bagging, feature-sampling and other seeds from it),
        `deterministic` and `force_col_wise` as LightGBM documents for the
        same model from the same data, rows and thread count (the rows'
        order comes from the training-set builder, which sorts them by
        source keys). Unset size-dependent settings must be resolved first
        (`for_rows`)."""
        if self.learning_rate is None or self.num_leaves is None or self.min_data_in_leaf is None:
            raise ValueError("resolve the size-dependent settings first: config.for_rows(n)")
        return {
            "objective": "binary",
            "metric": ["auc", "binary_logloss"],
            "first_metric_only": True,
            "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves,
            "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction,
            "bagging_fraction": self.bagging_fraction,
            "bagging_freq": self.bagging_freq if self.bagging_fraction < 1 else 0,
            "lambda_l2": self.lambda_l2,
            "scale_pos_weight": scale_pos_weight,
            "num_threads": self.num_threads,
            "seed": self.seed,
            "deterministic": True,
            "force_col_wise": True,
            "verbosity": -1,
        }


@dataclass(frozen=True)
class TrainingStats:
    n_train: int
    n_train_positive: int
    n_valid: int
    n_valid_positive: int
    scale_pos_weight: float
    calibration: str
    valid_auc_raw: float
    rounds_trained: int
    seconds: float


@dataclass(frozen=True, eq=False)
class TrainedModel(NativeModel):
    """A `NativeModel` with how it was trained."""

    config: TrainingConfig = field(default_factory=TrainingConfig)
    stats: TrainingStats | None = None
    training_window: tuple[str, str] = ("", "")


# --- training -----------------------------------------------------------------------


def _scale_pos_weight(n_pos: int, n_neg: int, mode: str) -> float:
    if mode == "none" or n_pos == 0 or n_pos >= n_neg:
        return 1.0
    ratio = n_neg / n_pos
    return math.sqrt(ratio) if mode == "sqrt_ratio" else ratio


def _levels(train: TrainingFrame) -> dict[str, tuple[Any, ...]]:
    out: dict[str, tuple[Any, ...]] = {}
    for name in train.categorical_features:
        dtype = train.frame[name].dtype
        assert isinstance(dtype, pd.CategoricalDtype)
        out[name] = tuple(dtype.categories.tolist())
    return out


def fit_calibrator(raw: FloatArray, labels: np.ndarray, isotonic_min_positives: int) -> Calibrator:
    """Isotonic regression with enough positives and negatives, else Platt."""
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos >= isotonic_min_positives and n_neg >= isotonic_min_positives:
        from sklearn.isotonic import IsotonicRegression

        iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
        iso.fit(raw, labels)
        return Calibrator(
            method="isotonic",
            x=tuple(float(v) for v in iso.X_thresholds_),
            y=tuple(float(v) for v in iso.y_thresholds_),
        )
    from sklearn.linear_model import LogisticRegression

    margin = np.log(np.clip(raw, 1e-15, 1 - 1e-15) / np.clip(1 - raw, 1e-15, 1))
    lr = LogisticRegression(C=1e6, max_iter=1000)
    lr.fit(margin.reshape(-1, 1), labels)
    return Calibrator(method="sigmoid", a=float(lr.coef_[0][0]), b=float(lr.intercept_[0]))


def _check_same_schema(train: TrainingFrame, other: TrainingFrame, what: str) -> None:
    if train.prediction != other.prediction:
        raise ValueError(f"{what} part is for {other.prediction}, training for {train.prediction}")
    if (
        train.feature_names != other.feature_names
        or train.categorical_features != other.categorical_features
    ):
        raise ValueError(f"{what} part has other features than the training part")


# Told after each boosting round: (round, most rounds, validation AUC so far).
TrainingProgress = Callable[[int, int, float], None]


def _report_rounds(progress: TrainingProgress, max_rounds: int) -> Callable[[Any], None]:
    """A LightGBM callback that tells `progress` each round and its validation AUC."""

    def callback(env: Any) -> None:
        auc = next(
            (score for _, name, score, _ in env.evaluation_result_list if name == "auc"),
            float("nan"),
        )
        progress(env.iteration + 1, max_rounds, float(auc))

    return callback


def train(
    frame_train: TrainingFrame,
    frame_valid: TrainingFrame,
    config: TrainingConfig | None = None,
    progress: TrainingProgress | None = None,
) -> TrainedModel:
    """Trains, early-stops on `frame_valid` and calibrates on it; `progress`
    hears of every boosting round (training can take minutes on a real
    company's history, and a silent command looks stuck)."""
    config = (config or TrainingConfig()).for_rows(frame_train.n_examples)
    _check_same_schema(frame_train, frame_valid, "validation")
    check_sufficient(frame_train, frame_valid)
    started = time.perf_counter()
    levels = _levels(frame_train)
    # A first NativeModel only to prepare frames the one way serving will.
    shaper = NativeModel(
        booster=None,
        calibrator=Calibrator("identity"),
        feature_names=frame_train.feature_names,
        categorical_levels=levels,
        prediction=frame_train.prediction,
        feature_set_version=frame_train.feature_set_version,
        best_iteration=0,
        num_threads=config.num_threads,
    )
    x_train = shaper.prepare(frame_train.frame)
    x_valid = shaper.prepare(frame_valid.frame)
    y_train = frame_train.labels
    y_valid = frame_valid.labels
    n_pos = int(y_train.sum())
    spw = _scale_pos_weight(n_pos, len(y_train) - n_pos, config.imbalance)
    categorical = list(frame_train.categorical_features) or "auto"
    d_train = lgb.Dataset(x_train, y_train, categorical_feature=categorical, free_raw_data=True)
    d_valid = lgb.Dataset(x_valid, y_valid, categorical_feature=categorical, reference=d_train)
    history: dict[str, Any] = {}
    booster = lgb.train(
        config.lightgbm_params(spw),
        d_train,
        num_boost_round=config.max_rounds,
        valid_sets=[d_valid],
        valid_names=["validation"],
        callbacks=[
            lgb.early_stopping(config.early_stopping_rounds, first_metric_only=True, verbose=False),
            lgb.record_evaluation(history),
            *([_report_rounds(progress, config.max_rounds)] if progress is not None else []),
        ],
    )
    best = int(booster.best_iteration) or booster.current_iteration()
    valid_auc = float(booster.best_score.get("validation", {}).get("auc", float("nan")))
    rounds = len(history.get("validation", {}).get("auc", ())) or booster.current_iteration()
    # Keep exactly what is saved: the text model cut at the best iteration, so
    # this object, the pyfunc model and the scoring service predict alike.
    booster = lgb.Booster(model_str=booster.model_to_string(num_iteration=best))
    raw_valid = np.asarray(booster.predict(x_valid, num_threads=config.num_threads), dtype=float)
    calibrator = fit_calibrator(raw_valid, y_valid, config.isotonic_min_positives)
    stats = TrainingStats(
        n_train=len(y_train),
        n_train_positive=n_pos,
        n_valid=len(y_valid),
        n_valid_positive=int(y_valid.sum()),
        scale_pos_weight=spw,
        calibration=calibrator.method,
        valid_auc_raw=valid_auc,
        rounds_trained=rounds,
        seconds=time.perf_counter() - started,
    )
    return TrainedModel(
        booster=booster,
        calibrator=calibrator,
        feature_names=frame_train.feature_names,
        categorical_levels=levels,
        prediction=frame_train.prediction,
        feature_set_version=frame_train.feature_set_version,
        best_iteration=best,
        num_threads=config.num_threads,
        extra={"calibration": calibrator.method, "scale_pos_weight": spw},
        input_schema=(
            frame_train.input_schema.to_dict() if frame_train.input_schema is not None else None
        ),
        config=config,
        stats=stats,
        training_window=(frame_train.window[0].isoformat(), frame_train.window[1].isoformat()),
    )


# --- bounded hyper-parameter search -------------------------------------------------

# The space searched, around the defaults (log-uniform where scale matters):
#   learning_rate     log-uniform 0.02 .. 0.2
#   num_leaves        one of 7, 15, 31, 63, 127
#   min_data_in_leaf  one of 10, 20, 40, 80, 160
#   feature_fraction  uniform 0.5 .. 1.0
#   bagging_fraction  uniform 0.5 .. 1.0
#   lambda_l2         log-uniform 0.001 .. 10
MAX_TRIALS = 100


def _sample(rng: np.random.Generator, base: TrainingConfig) -> TrainingConfig:
    def log_uniform(lo: float, hi: float) -> float:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    return base.model_copy(
        update={
            "learning_rate": log_uniform(0.02, 0.2),
            "num_leaves": int(rng.choice([7, 15, 31, 63, 127])),
            "min_data_in_leaf": int(rng.choice([10, 20, 40, 80, 160])),
            "feature_fraction": float(rng.uniform(0.5, 1.0)),
            "bagging_fraction": float(rng.uniform(0.5, 1.0)),
            "lambda_l2": log_uniform(1e-3, 10.0),
        }
    )


@dataclass(frozen=True)
class Trial:
    config: TrainingConfig
    valid_log_loss: float
    valid_auc: float
    best_iteration: int
    seconds: float


@dataclass(frozen=True)
class SearchResult:
    best: TrainedModel
    best_config: TrainingConfig
    trials: tuple[Trial, ...]


def _platt_log_loss(raw: FloatArray, labels: np.ndarray) -> float:
    from sklearn.metrics import log_loss

    cal = fit_calibrator(raw, labels, isotonic_min_positives=len(labels) + 1)  # always Platt
    return float(log_loss(labels, cal.apply(raw), labels=[0, 1]))


def search(
    frame_train: TrainingFrame,
    frame_valid: TrainingFrame,
    config: TrainingConfig | None = None,
    trials: int = 20,
    seed: int = 0,
    time_budget_s: float = 600.0,
    progress: Any = None,
) -> SearchResult:
    """Random search over the space above, selecting by validation log loss.

    Trial 0 is `config` itself, so the result is never worse on validation
    than the defaults. Each trial's booster output is Platt-calibrated on the
    validation part before its log loss is taken (two fitted parameters: the
    in-sample optimism is negligible and the same for every trial); the
    winner keeps its own calibrator from `train`. Bounded: at most
    `min(trials, MAX_TRIALS)` trials, and no trial starts after
    `time_budget_s` seconds. `progress`, if given, is called with
    (trial number, trials) after each trial.
    """
    base = config or TrainingConfig()
    n = max(1, min(trials, MAX_TRIALS))
    rng = np.random.default_rng(seed)
    started = time.perf_counter()
    results: list[Trial] = []
    best: tuple[float, TrainedModel, TrainingConfig] | None = None
    for i in range(n):
        if i > 0 and time.perf_counter() - started > time_budget_s:
            break
        candidate = base if i == 0 else _sample(rng, base)
        t0 = time.perf_counter()
        model = train(frame_train, frame_valid, candidate)
        raw = model.predict_raw(frame_valid.frame)
        loss = _platt_log_loss(raw, frame_valid.labels)
        auc = model.stats.valid_auc_raw if model.stats else float("nan")
        results.append(Trial(candidate, loss, auc, model.best_iteration, time.perf_counter() - t0))
        if best is None or loss < best[0]:
            best = (loss, model, candidate)
        if progress is not None:
            progress(i + 1, n)
    assert best is not None
    return SearchResult(best=best[1], best_config=best[2], trials=tuple(results))

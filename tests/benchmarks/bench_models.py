"""Models: AUC / PR AUC / ECE of the three predictions on simulated data
(5,000 customers, in-process builder, default training config), and the
training time for a churn set from 100,000 simulated customers beside plain
`lgb.train` on the same matrix with the same parameters and number of rounds.
The real datasets' figures come from the product path (bench_product_path.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import lightgbm as lgb
import numpy as np
import pandas as pd

from converge.features.engine import FEATURE_SET_VERSION
from converge.models.dataset import TrainingFrame, time_split
from converge.models.evaluation import evaluate
from converge.models.native import Calibrator, NativeModel
from converge.models.simulator import simulate, to_events
from converge.models.training import TrainingConfig, _scale_pos_weight, train
from converge.models.trainingset import build_from_events, weekly_cutoffs
from tests.benchmarks.harness import BenchEnv

SIM_CUSTOMERS = 5_000
BIG_CUSTOMERS = 100_000
START = datetime(2025, 1, 1, tzinfo=UTC)
END = datetime(2025, 9, 1, tzinfo=UTC)


def _simulated() -> dict[str, float]:
    world = simulate(SIM_CUSTOMERS, 101, START, END)
    events, profiles = world.events_by_customer(), world.profile_histories()
    figures: dict[str, float] = {}
    for prediction, step in (("churn", 7), ("escalation", 2), ("cross_sell", 7)):
        cutoffs = weekly_cutoffs(
            datetime(2025, 3, 3, tzinfo=UTC),
            datetime(2025, 7, 28, tzinfo=UTC)
            if prediction != "escalation"
            else END - timedelta(days=4),
            timedelta(days=step),
        )
        frame = build_from_events(events, profiles, cutoffs, prediction)
        split = time_split(frame)
        result = evaluate(train(split.train, split.valid), split.test)
        figures[f"models.{prediction}.sim.auc"] = result.roc_auc
        figures[f"models.{prediction}.sim.pr_auc"] = result.pr_auc
        figures[f"models.{prediction}.sim.ece"] = result.ece
    return figures


def _concat(parts: list[pd.DataFrame]) -> TrainingFrame:
    features = [
        c
        for c in parts[0].columns
        if c not in ("entity_id", "cutoff", "label", "customer", "ticket_id", "product")
    ]
    categorical = [c for c in features if isinstance(parts[0][c].dtype, pd.CategoricalDtype)]
    df = pd.concat(parts, ignore_index=True)
    for name in categorical:
        levels = sorted({str(v) for p in parts for v in p[name].cat.categories})
        df[name] = pd.Categorical(df[name].astype(object), categories=levels)
    return TrainingFrame.from_frame(
        df, "churn", FEATURE_SET_VERSION, feature_names=features, source="simulated:100k"
    )


def _training_overhead() -> dict[str, float]:
    world = simulate(BIG_CUSTOMERS, 202, START, datetime(2025, 6, 1, tzinfo=UTC))
    world.keep_chunks = False
    cutoffs = weekly_cutoffs(
        datetime(2025, 1, 13, tzinfo=UTC), datetime(2025, 4, 28, tzinfo=UTC), timedelta(days=21)
    )
    # Chunk by chunk (20,000 customers at a time), to bound memory.
    parts = []
    for chunk in world.chunks():
        events = to_events(world, chunk.events)
        profiles = world.chunk_profile_histories(chunk)
        parts.append(build_from_events(events, profiles, cutoffs, "churn").frame)
    frame = _concat(parts)
    split = time_split(frame)
    config = TrainingConfig()
    started = time.perf_counter()
    model = train(split.train, split.valid, config)
    pipeline_s = time.perf_counter() - started
    assert model.stats is not None
    # Plain LightGBM: the same matrix (prepared once, outside the timing),
    # parameters and number of rounds; no validation, early stopping or calibration.
    shaper = NativeModel(
        booster=None,
        calibrator=Calibrator("identity"),
        feature_names=split.train.feature_names,
        categorical_levels=model.categorical_levels,
        prediction="churn",
        feature_set_version=split.train.feature_set_version,
        best_iteration=0,
        num_threads=config.num_threads,
    )
    x = shaper.prepare(split.train.frame)
    y = split.train.labels
    spw = _scale_pos_weight(int(y.sum()), len(y) - int(y.sum()), config.imbalance)
    # The parameters the pipeline resolved for this many rows, as it trained.
    params = {**config.for_rows(len(y)).lightgbm_params(spw), "metric": "none"}
    started = time.perf_counter()
    lgb.train(
        params,
        lgb.Dataset(x, y, categorical_feature=list(split.train.categorical_features) or "auto"),
        num_boost_round=model.stats.rounds_trained,
    )
    plain_s = time.perf_counter() - started
    assert np.isfinite(pipeline_s) and plain_s > 0
    return {
        "models.train_100k.pipeline_s": pipeline_s,
        "models.train_100k.plain_lightgbm_s": plain_s,
        "models.train_100k.vs_plain_lightgbm": pipeline_s / plain_s,
    }


async def run(env: BenchEnv) -> dict[str, float]:
    figures = _simulated()
    figures.update(_training_overhead())
    order = [
        "models.churn.sim.auc",
        "models.churn.sim.pr_auc",
        "models.churn.sim.ece",
        "models.escalation.sim.auc",
        "models.escalation.sim.pr_auc",
        "models.escalation.sim.ece",
        "models.cross_sell.sim.auc",
        "models.cross_sell.sim.pr_auc",
        "models.cross_sell.sim.ece",
        "models.train_100k.vs_plain_lightgbm",
        "models.train_100k.pipeline_s",
        "models.train_100k.plain_lightgbm_s",
    ]
    return {key: float(figures[key]) for key in order}

"""The prediction log's costs, in process against the bench PostgreSQL:

- what sampling adds to a Score call (`offer` of a four-prediction answer
  with its inputs, on the event loop), beside `offer` with sampling off, in
  the same run;
- rows per second the background writer stores with COPY;
- a drift report over a full window (20,000 logged rows against 5,000).

Figures: scoring.prediction_log.offer_us, scoring.prediction_log.offer_off_us,
scoring.prediction_log.copy_rows_per_s, scoring.drift_report.window_20k_ms.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime, timedelta
from importlib.resources import files

import numpy as np

from converge.features.transform import InputSchema
from converge.models.handle import ModelRef
from converge.runtime.database import create_pool, load_migrations, migrate
from converge.runtime.executor import CpuExecutor
from converge.scoring.models import ModelSlots
from converge.scoring.prediction_log import MAX_WINDOW_ROWS, DriftQuery, PredictionLog
from converge.scoring.service import Scored, ScoreResult
from converge.scoring.store import ScoringStore
from tests.benchmarks.harness import BenchEnv

T0 = datetime(2026, 6, 1, tzinfo=UTC)
NUMERIC = [f"input_{k}" for k in range(14)]
PLANS = ("basic", "plus", "pro", "other")
OFFERS = 20_000
COPY_ROWS = 50_000


class _NoRegistry:
    """Stands in for the MLflow registry: the drift bench compares two log
    windows, so no version is ever loaded (and the slots are never started)."""

    def serving_state(self, prediction: str) -> tuple[None, None]:
        return None, None

    def load(self, prediction: str, version: str, alias: str) -> object:
        raise AssertionError("not called")


def _answer(schema: InputSchema, rng: np.random.Generator, at: datetime) -> ScoreResult:
    ref = ModelRef("converge-churn", "1", "run", "champion", "set")
    predictions = tuple(
        Scored(
            prediction="churn" if n == 0 else "cross_sell",
            ticket_id="",
            product_id="" if n == 0 else f"p{n}",
            probability=float(rng.random()),
            band="low",
            model=ref,
            reasons=(),
            fallback_reason="",
            inputs=np.append(rng.poisson(3.0, len(NUMERIC)).astype(np.float64), rng.integers(4)),
        )
        for n in range(4)
    )
    return ScoreResult(str(uuid.uuid4()), predictions, None, uuid.uuid4().hex, at)  # type: ignore[arg-type]


async def run(env: BenchEnv) -> dict[str, float]:
    database = await env.new_database()
    pool = await create_pool(database, "scoring", application_name="bench-prediction-log")
    executor = CpuExecutor(1, 4, name="bench")
    try:
        async with pool.acquire() as connection:
            await migrate(
                connection, "scoring", load_migrations(files("converge.scoring") / "migrations")
            )
        store = ScoringStore(pool)
        schema = InputSchema(names=(*NUMERIC, "profile_plan"), categories={"profile_plan": PLANS})
        ref = ModelRef("converge-churn", "1", "run", "champion", "set")
        schemas = {ref: schema}
        slots = ModelSlots(_NoRegistry(), poll_interval_s=3600)  # type: ignore[arg-type]

        def log(rate: float) -> PredictionLog:
            return PredictionLog(
                store,
                slots,
                executor,
                sample_rate=rate,
                queue_size=OFFERS * 4,
                batch_size=500,
                flush_interval_s=3600,
                retention=timedelta(days=90),
                purge_interval_s=3600,
            )

        rng = np.random.default_rng(1)
        answers = [_answer(schema, rng, T0) for _ in range(OFFERS)]
        figures: dict[str, float] = {}
        for rate, name in ((0.0, "offer_off_us"), (1.0, "offer_us")):
            sampled = log(rate)
            started = time.perf_counter()
            for one in answers:
                sampled.offer(one, "web", schemas)
            figures[f"scoring.prediction_log.{name}"] = (
                (time.perf_counter() - started) / OFFERS * 1e6
            )

        # COPY: what the writer stores per second, in its batches.
        writer = log(1.0)
        rows = COPY_ROWS // 4
        for k, one in enumerate(answers[:rows]):
            writer.offer(
                ScoreResult(
                    one.customer_id,
                    one.predictions,
                    one.features,
                    one.score_id,
                    T0 + timedelta(seconds=k),
                ),
                "web",
                schemas,
            )
        started = time.perf_counter()
        written = await writer.flush()
        figures["scoring.prediction_log.copy_rows_per_s"] = written / (
            time.perf_counter() - started
        )

        # A drift report over a full window: the churn rows just written
        # (one in four), twice over as two windows of the log.
        churn_rows = written // 4
        assert churn_rows >= MAX_WINDOW_ROWS // 4
        more = log(1.0)
        for k, one in enumerate(answers[: MAX_WINDOW_ROWS - churn_rows]):
            more.offer(
                ScoreResult(
                    one.customer_id,
                    one.predictions[:1],
                    one.features,
                    one.score_id,
                    T0 + timedelta(seconds=rows + k),
                ),
                "web",
                schemas,
            )
        await more.flush()
        query = DriftQuery(
            prediction="churn",
            window_start=T0,
            window_end=T0 + timedelta(days=1),
            baseline_start=T0,
            baseline_end=T0 + timedelta(seconds=rows // 4),
            has_baseline_window=True,
            model_version="1",
            feature_names=(),
        )
        started = time.perf_counter()
        report = await writer.drift_report(query)
        figures["scoring.drift_report.window_20k_ms"] = (time.perf_counter() - started) * 1000
        assert report.current_samples == MAX_WINDOW_ROWS, report.current_samples
        return figures
    finally:
        await executor.close()
        await pool.close()

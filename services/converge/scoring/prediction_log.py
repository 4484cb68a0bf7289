"""The sampled prediction log: what was scored, by which version, from which
inputs; and what is read back from it (drift reports, a customer's export
and erasure, the retention purge). Plain Python types; SQL in `store.py`.

Writing never slows a Score call: `offer` decides the sample and puts the
rows in a bounded in-memory queue, and a background task writes them with
one COPY per batch. When the queue is full (the database is slow or down),
new rows are dropped and counted in `converge_scoring_prediction_log_dropped_total`
rather than held or waited for. `close` writes what is queued at shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import math
import operator
import random
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import prometheus_client

from converge.features.transform import InputSchema
from converge.models.handle import ModelRef
from converge.models.predictions import Prediction
from converge.models.serving_artifacts import InputSample
from converge.runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from converge.runtime.executor import CpuExecutor
from converge.runtime.tasks import stop_tasks, wait_event
from converge.scoring import drift
from converge.scoring.models import ModelSlots, Serving
from converge.scoring.service import ScoreResult
from converge.scoring.store import FeatureValues, LoggedPrediction, ScoringStore, StoredPrediction

logger = logging.getLogger(__name__)

SAMPLED = prometheus_client.Counter(
    "converge_scoring_prediction_log_sampled_total",
    "Predictions sampled for the prediction log (queued to be written).",
)
DROPPED = prometheus_client.Counter(
    "converge_scoring_prediction_log_dropped_total",
    "Sampled predictions not written to the prediction log.",
    ["reason"],  # queue_full: the writer fell behind; write_failed: the database refused
)
WRITTEN = prometheus_client.Counter(
    "converge_scoring_prediction_log_written_total",
    "Predictions written to the prediction log.",
)
PURGED = prometheus_client.Counter(
    "converge_scoring_prediction_log_purged_total",
    "Prediction log rows deleted past the retention horizon.",
)

DEFAULT_WINDOW = timedelta(days=7)
# The newest rows of a window a drift report reads: enough for stable deciles,
# few enough that a report stays well under a second of CPU.
MAX_WINDOW_ROWS = 20_000
SCORE = "score"


@dataclass(frozen=True)
class DriftQuery:
    prediction: Prediction
    window_start: datetime | None
    window_end: datetime | None
    baseline_start: datetime | None
    baseline_end: datetime | None
    has_baseline_window: bool  # False: the training sample is the baseline
    model_version: str  # empty: the champion
    feature_names: tuple[str, ...]


@dataclass(frozen=True)
class DriftReport:
    prediction: Prediction
    model: ModelRef | None  # None when the version is not loaded here
    model_version: str
    window: tuple[datetime, datetime]
    baseline_window: tuple[datetime, datetime] | None  # None: the training sample
    current_samples: int
    baseline_samples: int
    score: drift.Drift
    features: tuple[drift.Drift, ...]  # largest PSI first
    computed_at: datetime


@dataclass(frozen=True)
class _Sampled:
    """One sampled answer, waiting for the writer."""

    result: ScoreResult
    channel: str
    schemas: Mapping[ModelRef, InputSchema]

    def rows(self) -> list[LoggedPrediction]:
        result = self.result
        customer_id = uuid.UUID(result.customer_id)
        return [
            LoggedPrediction(
                score_id=result.score_id,
                position=n,
                customer_id=customer_id,
                prediction=scored.prediction,
                ticket_id=scored.ticket_id,
                product_id=scored.product_id,
                model_name=scored.model.name,
                model_version=scored.model.version,
                features=_named(scored.inputs, self.schemas.get(scored.model)),
                probability=scored.probability,
                band=scored.band,
                channel=self.channel,
                scored_at=result.scored_at,
            )
            for n, scored in enumerate(result.predictions)
        ]


@dataclass(frozen=True)
class _Columns:
    """A sample as columns: numbers (NaN missing) or labels (None missing)."""

    numbers: Mapping[str, np.ndarray]
    labels: Mapping[str, list[str | None]]
    probabilities: np.ndarray
    size: int


class PredictionLog:
    def __init__(
        self,
        store: ScoringStore,
        slots: ModelSlots,
        executor: CpuExecutor,
        *,
        sample_rate: float,
        queue_size: int,
        batch_size: int,
        flush_interval_s: float,
        retention: timedelta,
        purge_interval_s: float,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.slots = slots  # the versions whose training samples drift is measured against
        self.executor = executor
        self.sample_rate = sample_rate
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.flush_interval_s = flush_interval_s
        self.retention = retention
        self.purge_interval_s = purge_interval_s
        self.clock = clock
        self.rng = rng or random.Random()
        # Sampled answers as they came (turned into rows by the writer, not
        # on the call's path), and how many predictions they hold.
        self._queue: deque[_Sampled] = deque()
        self._queued_rows = 0
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # --- writing ----------------------------------------------------------------------

    def offer(
        self, result: ScoreResult, channel: str, schemas: Mapping[ModelRef, InputSchema]
    ) -> None:
        """Samples one Score answer (all its predictions, or none) into the
        queue; never waits. `schemas` names the inputs of each version that
        answered."""
        if self.sample_rate <= 0.0 or self.rng.random() >= self.sample_rate:
            return
        size = len(result.predictions)
        if self._queued_rows + size > self.queue_size:
            DROPPED.labels("queue_full").inc(size)
            return
        SAMPLED.inc(size)
        self._queue.append(_Sampled(result, channel, schemas))
        self._queued_rows += size
        if self._queued_rows >= self.batch_size:
            self._wake.set()

    @property
    def queued(self) -> int:
        """Predictions waiting to be written."""
        return self._queued_rows

    def _take(self) -> list[LoggedPrediction]:
        """About a batch of queued predictions (whole answers), as rows."""
        rows: list[LoggedPrediction] = []
        while self._queue and len(rows) < self.batch_size:
            sampled = self._queue.popleft()
            self._queued_rows -= len(sampled.result.predictions)
            rows += sampled.rows()
        return rows

    async def flush(self) -> int:
        """Writes everything queued now, a batch per COPY; how many rows were written."""
        written = 0
        async with self._write_lock:
            while self._queue:
                batch = self._take()
                try:
                    await self.store.append(batch)
                except Exception:  # (the log is best effort: scoring goes on)
                    logger.exception("prediction log: a batch of %d was not written", len(batch))
                    DROPPED.labels("write_failed").inc(len(batch))
                    continue
                WRITTEN.inc(len(batch))
                written += len(batch)
        return written

    async def purge(self) -> int:
        """Deletes what is older than the retention horizon."""
        purged = await self.store.purge(self.clock() - self.retention)
        PURGED.inc(purged)
        return purged

    def start(self) -> None:
        """Starts the writer and the retention purge."""
        self._tasks = [
            asyncio.create_task(self._write_forever(), name="prediction-log-writer"),
            asyncio.create_task(self._purge_forever(), name="prediction-log-purge"),
        ]

    async def close(self) -> None:
        """Stops the background work and writes what is still queued."""
        tasks, self._tasks = self._tasks, []
        await stop_tasks(tasks)
        await self.flush()

    async def _write_forever(self) -> None:
        while True:
            await wait_event(self._wake, self.flush_interval_s)
            self._wake.clear()
            await self.flush()

    async def _purge_forever(self) -> None:
        while True:
            try:
                await self.purge()
            except Exception:  # (tried again at the next interval)
                logger.exception("prediction log: the retention purge failed")
            await asyncio.sleep(self.purge_interval_s)

    # --- data subject rights ----------------------------------------------------------

    async def erase(self, customer_ids: Sequence[uuid.UUID]) -> dict[str, int]:
        """The customers' logged predictions deleted, queued ones included."""
        wanted = {str(c) for c in customer_ids}
        before = self._queued_rows
        kept = deque(s for s in self._queue if s.result.customer_id not in wanted)
        self._queue = kept
        self._queued_rows = sum(len(s.result.predictions) for s in kept)
        erased = await self.store.erase(customer_ids)
        return {"prediction_log": erased + before - self._queued_rows}

    def export(
        self, customer_ids: Sequence[uuid.UUID], after_seq: int
    ) -> AsyncIterator[StoredPrediction]:
        return self.store.export(customer_ids, after_seq)

    # --- drift ------------------------------------------------------------------------

    async def drift_report(self, query: DriftQuery) -> DriftReport:
        """PSI of the score and of each input between a window of the log and
        the baseline: the version's training sample, or another window."""
        now = self.clock()
        end = query.window_end or now
        start = query.window_start or end - DEFAULT_WINDOW
        if start >= end:
            raise InvalidArgument([FieldViolation("window", "start must be before end")])
        serving = _version(self.slots, query.prediction, query.model_version)
        if serving is None and not query.model_version:
            raise FailedPrecondition(
                f"no model version serves {query.prediction}: name one in model_version"
            )
        version = serving.model.ref.version if serving is not None else query.model_version
        current_rows = await self.store.window(
            query.prediction, version, start, end, MAX_WINDOW_ROWS
        )
        baseline_window: tuple[datetime, datetime] | None = None
        sample: InputSample | None = None
        baseline_rows: list[tuple[FeatureValues, float]] = []
        if query.has_baseline_window:
            b_end = query.baseline_end or now
            b_start = query.baseline_start or b_end - DEFAULT_WINDOW
            if b_start >= b_end:
                raise InvalidArgument(
                    [FieldViolation("baseline_window", "start must be before end")]
                )
            baseline_window = (b_start, b_end)
            rows = await self.store.window(
                query.prediction, version, b_start, b_end, MAX_WINDOW_ROWS
            )
            baseline_rows = [(r.features, r.probability) for r in rows]
        elif serving is None:
            raise NotFound("loaded model version", f"{query.prediction} {version}")
        else:
            sample = getattr(serving.model, "drift_sample", None)
            if sample is None:
                raise FailedPrecondition(
                    f"{query.prediction} version {version} has no training sample stored: "
                    "set baseline_window to compare two windows of the log"
                )
        schema = serving.model.schema if serving is not None else None
        current = [(r.features, r.probability) for r in current_rows]
        names, categorical = _inputs(schema, [*current, *baseline_rows])
        if query.feature_names:
            known = set(names)
            bad = [
                FieldViolation(f"feature_names[{i}]", "not an input of this model version")
                for i, name in enumerate(query.feature_names)
                if name not in known
            ]
            if bad:
                raise InvalidArgument(bad)
            names = list(dict.fromkeys(query.feature_names))

        def compute() -> tuple[drift.Drift, tuple[drift.Drift, ...], int, int]:
            now_columns = _from_rows(current, names, categorical)
            then_columns = (
                _from_sample(sample, schema, names, categorical)
                if sample is not None and schema is not None
                else _from_rows(baseline_rows, names, categorical)
            )
            score = drift.numeric_drift(
                SCORE, then_columns.probabilities, now_columns.probabilities
            )
            features = [
                drift.categorical_drift(n, then_columns.labels[n], now_columns.labels[n])
                if n in categorical
                else drift.numeric_drift(n, then_columns.numbers[n], now_columns.numbers[n])
                for n in names
            ]
            features.sort(key=lambda d: (-d.psi, d.name))
            return score, tuple(features), now_columns.size, then_columns.size

        score, features, n_current, n_baseline = await self.executor.run(compute)
        return DriftReport(
            prediction=query.prediction,
            model=serving.model.ref if serving is not None else None,
            model_version=version,
            window=(start, end),
            baseline_window=baseline_window,
            current_samples=n_current,
            baseline_samples=n_baseline,
            score=score,
            features=features,
            computed_at=now,
        )


def _version(slots: ModelSlots, prediction: Prediction, version: str) -> Serving | None:
    """The loaded version asked for (the champion for ""), if this replica holds it."""
    slot = slots.status(prediction)
    if not version:
        return slot.champion
    for serving in (slot.champion, slot.challenger, *slot.draining):
        if serving is not None and serving.model.ref.version == version:
            return serving
    return None


def _named(row: np.ndarray | None, schema: InputSchema | None) -> dict[str, float | str | None]:
    """A model's input row by input name: numbers, category labels, None for missing."""
    if row is None or schema is None:
        return {}
    out: dict[str, float | str | None] = {}
    for name, value in zip(schema.names, row.tolist(), strict=True):
        if value != value:  # NaN: missing
            out[name] = None
        elif name in schema.categories:
            out[name] = schema.categories[name][int(value)]
        else:
            out[name] = value if math.isfinite(value) else None
    return out


def _inputs(
    schema: InputSchema | None, rows: Sequence[tuple[FeatureValues, float]]
) -> tuple[list[str], set[str]]:
    """The inputs compared and which are categorical: the version's schema,
    or, for a version not loaded here, what its logged rows hold (text
    values are categories)."""
    if schema is not None:
        return list(schema.names), set(schema.categories)
    names: dict[str, None] = {}
    categorical: set[str] = set()
    for features, _ in rows:
        for name, value in features.items():
            names.setdefault(name)
            if isinstance(value, str):
                categorical.add(name)
    return list(names), categorical


def _from_rows(
    rows: Sequence[tuple[FeatureValues, float]], names: Sequence[str], categorical: set[str]
) -> _Columns:
    features = [f for f, _ in rows]
    numeric = [n for n in names if n not in categorical]
    labels = {
        name: [None if v is None else str(v) for v in (f.get(name) for f in features)]
        for name in names
        if name in categorical
    }
    table = _number_table(features, numeric)
    numbers = {name: table[:, j] for j, name in enumerate(numeric)}
    probabilities = np.array([p for _, p in rows], dtype=np.float64)
    return _Columns(numbers, labels, probabilities, len(rows))


def _number_table(features: Sequence[FeatureValues], numeric: Sequence[str]) -> np.ndarray:
    """The numeric inputs of logged rows as a matrix, NaN for missing. Rows of
    one version name every input (null when missing), so one C-level pick per
    row does; anything else (an input the row lacks, text where a number was
    expected) takes the slow path."""
    shape = (len(features), len(numeric))
    if not numeric or not features:
        return np.empty(shape, dtype=np.float64)
    pick = operator.itemgetter(*numeric)
    try:
        # (numpy reads None as NaN in a float array)
        return np.array([pick(f) for f in features], dtype=np.float64).reshape(shape)
    except (KeyError, ValueError, TypeError):
        return np.array(
            [[_number(f.get(name)) for name in numeric] for f in features], dtype=np.float64
        ).reshape(shape)


def _number(value: float | str | None) -> float:
    return math.nan if value is None or isinstance(value, str) else float(value)


def _from_sample(
    sample: InputSample, schema: InputSchema, names: Sequence[str], categorical: set[str]
) -> _Columns:
    position = {n: j for j, n in enumerate(sample.names)}
    numbers: dict[str, np.ndarray] = {}
    labels: dict[str, list[str | None]] = {}
    for name in names:
        column = sample.inputs[:, position[name]]
        if name in categorical:
            levels = schema.categories[name]
            labels[name] = [None if v != v else levels[int(v)] for v in column.tolist()]
        else:
            numbers[name] = column
    return _Columns(numbers, labels, sample.probabilities, len(sample.probabilities))

"""The scoring rules, in plain Python types (no gRPC here).

Score: resolve the features (the customer, the ticket for escalation, the
candidates for cross-sell) -> apply the caller's context features (they
replace or fill live ones; a name the served feature set lacks is refused,
naming it) -> one input row per prediction with `InputSchema.vector`, the
transform training uses -> the champion's calibrated probability and
per-input contributions -> the risk band from the version's thresholds ->
reasons. Predictions come in order: churn, escalation, then cross-sell per
candidate in request order. Before any version serves, the rule fallback
(`converge.models.fallback`) answers and says so.

A call's rows for every model it asks (champions and, when asked, the
challengers) go to the executor as one job, and the rows of concurrent calls
join them (`batching.Coalescer`): one thread hop per batch of calls, one
predict call per model in it, so the event loop does not wait on LightGBM and
a call pays one hop, not one per model. A lone call's few rows (`INLINE_ROWS`)
are the exception: with the executor idle they are predicted on the loop, as
the hop there and back cost more than predicting them (scoring's CPU per
Score at one caller 8.1-8.6 ms against 9.1-10.6 with the hop). Probabilities come from the plain
predict; LightGBM's contributions (`pred_contrib`, about ten times the cost)
only for the rows whose reasons are returned.
"""

from __future__ import annotations

import asyncio
import collections
import math
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from converge.features.transform import InputSchema, entity_values
from converge.models import fallback
from converge.models.fallback import Reason
from converge.models.handle import DEFAULT_THRESHOLDS, ModelRef
from converge.models.predictions import PREDICTIONS, Prediction
from converge.models.single_row import MAX_ROWS as SINGLE_ROW_MAX
from converge.runtime.errors import (
    ConvergeError,
    FieldViolation,
    InvalidArgument,
    Unavailable,
    Violations,
)
from converge.runtime.executor import CpuExecutor
from converge.runtime.values import CustomerKey
from converge.scoring.batching import Coalescer
from converge.scoring.features import (
    FeatureCatalogue,
    FeatureSource,
    FeatureValue,
    LiveFeatures,
)
from converge.scoring.models import (
    Lease,
    ModelSlots,
    ReloadOutcome,
    Serving,
    ServingModel,
    Slot,
)
from converge.scoring.reasons import explain, reason_count

FloatMatrix = npt.NDArray[np.float64]
MAX_CANDIDATES = 100
# A job this small, each model's rows on LightGBM's single-row path, runs on
# the event loop when no other job is in the executor: its ~0.3 ms of
# predicting costs less than the two thread hops (see the module doc).
INLINE_ROWS = 8


@dataclass(frozen=True)
class ScoreQuery:
    """One Score request, checked for shape by the servicer's conversion."""

    customer: CustomerKey
    predictions: tuple[Prediction, ...] = ()  # empty: every one the fields allow
    ticket_id: str = ""
    candidate_product_ids: tuple[str, ...] = ()
    context_features: Mapping[str, float] = field(default_factory=dict)
    max_reasons: int = 0
    omit_reasons: bool = False
    include_shadow: bool = False
    timeout_s: float = math.inf  # the caller's time left
    channel: str = ""  # where the request comes from, for the prediction log


@dataclass(frozen=True)
class ShadowScore:
    model: ModelRef
    probability: float
    band: str


@dataclass(frozen=True)
class Scored:
    """One prediction of a Score answer."""

    prediction: Prediction
    ticket_id: str
    product_id: str
    probability: float
    band: str  # "low", "medium", "high", "critical"
    model: ModelRef
    reasons: tuple[Reason, ...]
    fallback_reason: str  # empty when a model answered
    shadow: ShadowScore | None = None
    # The row the model read (None for the rules): what training would have
    # built for the same entity at the same moment.
    inputs: FloatMatrix | None = None

    @property
    def fallback_used(self) -> bool:
        return bool(self.fallback_reason)


@dataclass(frozen=True)
class ScoreResult:
    customer_id: str
    predictions: tuple[Scored, ...]
    features: LiveFeatures  # after the context features were applied
    score_id: str
    scored_at: datetime


@dataclass(frozen=True)
class _Rows:
    """One model's input rows of one call, and whether their contributions
    (for reasons) are wanted."""

    model: ServingModel
    matrix: FloatMatrix
    contributions: bool


@dataclass(eq=False)
class _Want:
    """One row of one call for one version (known by identity: results are
    handed back by `id`)."""

    serving: Serving
    row: FloatMatrix  # (1, inputs)
    contributions: bool


# Per row: the calibrated probability, and its contributions when asked.
_Predicted = tuple[float, "FloatMatrix | None"]


@dataclass(frozen=True)
class _Item:
    prediction: Prediction
    ticket_id: str = ""
    product_id: str = ""


Outcome = ScoreResult | ConvergeError
KeyT = TypeVar("KeyT")
ItemT = TypeVar("ItemT")


class PredictionSink(Protocol):
    """Where answers go to be sampled into the prediction log
    (`converge.scoring.prediction_log.PredictionLog`); must never wait."""

    def offer(
        self, result: ScoreResult, channel: str, schemas: Mapping[ModelRef, InputSchema]
    ) -> None: ...


class ScoringService:
    def __init__(
        self,
        features: FeatureSource,
        slots: ModelSlots,
        executor: CpuExecutor,
        *,
        max_batch: int,
        max_in_flight: int,
        replica: str,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        prediction_log: PredictionSink | None = None,
    ) -> None:
        self.features = features
        self.prediction_log = prediction_log
        self.slots = slots
        self.executor = executor
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.replica = replica
        self.clock = clock
        # Items of one ScoreBatch stream scored at once: enough to fill every
        # shared read (and predict) the coalescers allow in flight, few enough
        # that the stream is read no faster than it is scored.
        self.batch_window = max_batch * max_in_flight
        # One sharing point for every model: a batch holds calls' rows for
        # several versions, and lets go of them when it ends.
        self._predictor: Coalescer[tuple[_Rows, ...], list[list[_Predicted]]] = Coalescer(
            self._predict_batch, max_batch=max_batch, max_in_flight=max_in_flight
        )

    @property
    def predicts(self) -> Coalescer[tuple[_Rows, ...], list[list[_Predicted]]]:
        """The shared predictor (its counts, for tests and metrics)."""
        return self._predictor

    # --- Score ------------------------------------------------------------------------

    async def score(self, query: ScoreQuery) -> ScoreResult:
        [outcome] = await self.score_many([query])
        if isinstance(outcome, ConvergeError):
            raise outcome
        return outcome

    async def score_many(self, queries: Sequence[ScoreQuery]) -> list[Outcome]:
        """Each query's answer, or the error it alone answers with. The
        queries' features are read together (one shared read per batch of
        customers), their rows go to the predictor as one job, and each
        customer's values are merged and coded once for all its rows: what
        a stream of many queries costs is mostly what one costs times
        their number, less the round trips."""
        outcomes: list[Outcome | None] = [None] * len(queries)
        items: dict[int, list[_Item]] = {}
        for n, query in enumerate(queries):
            try:
                items[n] = self._items(query)
            except ConvergeError as error:
                outcomes[n] = error
        if items:
            longest = max(queries[n].timeout_s for n in items)
            catalogue = await self.features.catalogue(_bounded(longest))
            for n in list(items):
                try:
                    self._check_context(queries[n].context_features, catalogue.features)
                except ConvergeError as error:
                    outcomes[n] = error
                    del items[n]
            reads = await self._read_all([(queries[n], items[n]) for n in items], catalogue)
            lives: dict[int, LiveFeatures] = {}
            for n, read in zip(list(items), reads, strict=True):
                if isinstance(read, ConvergeError):
                    outcomes[n] = read
                    del items[n]
                elif isinstance(read, BaseException):
                    raise read
                else:
                    lives[n] = read
            wanted = tuple(dict.fromkeys(i.prediction for n in items for i in items[n]))
            with self.slots.lease(wanted) as lease:
                scored = await self._scored(queries, items, lives, lease, catalogue, longest)
                for n, predictions in scored.items():
                    result = ScoreResult(
                        customer_id=lives[n].customer_id,
                        predictions=predictions,
                        features=lives[n],
                        score_id=uuid.uuid4().hex,
                        scored_at=self.clock(),
                    )
                    outcomes[n] = result
                    if self.prediction_log is not None:
                        # Each answering version's inputs, by which the log names
                        # the row it read; inside the lease: a version swapped out
                        # meanwhile is unloaded (its schema gone) once its last
                        # call leaves it.
                        schemas = {
                            s.model.ref: s.model.schema
                            for p in dict.fromkeys(i.prediction for i in items[n])
                            if (s := lease.champions[p]) is not None
                        }
                        self.prediction_log.offer(result, queries[n].channel, schemas)
        return [o for o in outcomes if o is not None]

    async def _read_all(
        self, wanted: Sequence[tuple[ScoreQuery, Sequence[_Item]]], catalogue: FeatureCatalogue
    ) -> list[LiveFeatures | BaseException]:
        """Each query's features (or why not), the reads submitted at once so
        that they share round trips."""
        if len(wanted) == 1:  # (a Score: no task to gather)
            try:
                return [await self._read(*wanted[0], catalogue)]
            except ConvergeError as error:
                return [error]
        return await asyncio.gather(
            *(self._read(query, items, catalogue) for query, items in wanted),
            return_exceptions=True,
        )

    async def _read(
        self, query: ScoreQuery, items: Sequence[_Item], catalogue: FeatureCatalogue
    ) -> LiveFeatures:
        ticket_id = query.ticket_id if any(i.prediction == "escalation" for i in items) else ""
        live = await self.features.read(query.customer, ticket_id, query.timeout_s)
        return _with_context(live, query.context_features, catalogue.features)

    async def _scored(
        self,
        queries: Sequence[ScoreQuery],
        items: Mapping[int, Sequence[_Item]],
        lives: Mapping[int, LiveFeatures],
        lease: Lease,
        catalogue: FeatureCatalogue,
        timeout_s: float,
    ) -> dict[int, tuple[Scored, ...]]:
        """Every query's predictions, its rows through the predictor as one job."""
        wants: list[_Want] = []
        plans: dict[int, list[tuple[_Item, _Want | None, _Want | None]]] = {}
        for n, query_items in items.items():
            live = lives[n]
            values = entity_values(live.customer, live.ticket, live.profile, live.as_of)
            reasons = not queries[n].omit_reasons
            plan = plans[n] = []
            for serving, item_group in _by_prediction(query_items, lease.champions):
                challenger_serving = (
                    lease.challengers.get(item_group[0].prediction)
                    if serving is not None and queries[n].include_shadow
                    else None
                )
                products = tuple(i.product_id for i in item_group)
                champion_rows = serving.model.schema.rows(values, products) if serving else None
                shadow_rows = (
                    challenger_serving.model.schema.rows(values, products)
                    if challenger_serving is not None
                    else None
                )
                for k, item in enumerate(item_group):
                    champion = (
                        _Want(serving, champion_rows[k : k + 1], reasons)
                        if serving is not None and champion_rows is not None
                        else None
                    )
                    challenger = (
                        _Want(challenger_serving, shadow_rows[k : k + 1], False)
                        if challenger_serving is not None and shadow_rows is not None
                        else None
                    )
                    wants += [w for w in (champion, challenger) if w is not None]
                    plan.append((item, champion, challenger))
        predicted = await self._predict(wants, timeout_s)
        answers: dict[int, tuple[Scored, ...]] = {}
        for n, plan in plans.items():
            limit = 0 if queries[n].omit_reasons else reason_count(queries[n].max_reasons)
            scored = []
            for item, champion, challenger in plan:
                if champion is None:
                    why = lease.fallback_reasons[item.prediction]
                    scored.append(self._by_rules(item, lives[n], why, limit))
                    continue
                probability, contributions = predicted[id(champion)]
                model = champion.serving.model
                row = champion.row[0]
                shadow = None
                if challenger is not None:
                    shadow_probability = predicted[id(challenger)][0]
                    shadow_model = challenger.serving.model
                    shadow = ShadowScore(
                        shadow_model.ref,
                        shadow_probability,
                        shadow_model.thresholds.band(shadow_probability),
                    )
                scored.append(
                    Scored(
                        prediction=item.prediction,
                        ticket_id=item.ticket_id,
                        product_id=item.product_id,
                        probability=probability,
                        band=model.thresholds.band(probability),
                        model=model.ref,
                        reasons=explain(
                            item.prediction,
                            model.schema,
                            row,
                            contributions,
                            catalogue.features,
                            limit,
                        )
                        if contributions is not None and limit
                        else (),
                        fallback_reason="",
                        shadow=shadow,
                        inputs=row,
                    )
                )
            answers[n] = tuple(scored)
        return answers

    def _items(self, query: ScoreQuery) -> list[_Item]:
        v = Violations()
        wanted: Sequence[Prediction] = query.predictions or [
            p
            for p in PREDICTIONS
            if p == "churn"
            or (p == "escalation" and query.ticket_id)
            or (p == "cross_sell" and query.candidate_product_ids)
        ]
        if "escalation" in wanted and not query.ticket_id:
            v.add("ticket_id", "required to score escalation")
        if "cross_sell" in wanted and not query.candidate_product_ids:
            v.add("candidate_product_ids", "required to score cross-sell")
        if len(query.candidate_product_ids) > MAX_CANDIDATES:
            v.add("candidate_product_ids", f"at most {MAX_CANDIDATES}")
        for i, product in enumerate(query.candidate_product_ids):
            v.check(bool(product), f"candidate_product_ids[{i}]", "empty")
        v.raise_if_any()
        items: list[_Item] = []
        for prediction in PREDICTIONS:  # (the answer's order, whatever the request's)
            if prediction not in wanted:
                continue
            if prediction == "cross_sell":
                items += [_Item(prediction, product_id=p) for p in query.candidate_product_ids]
            elif prediction == "escalation":
                items.append(_Item(prediction, ticket_id=query.ticket_id))
            else:
                items.append(_Item(prediction))
        return items

    def _check_context(self, context: Mapping[str, float], known: Mapping[str, object]) -> None:
        violations = [
            FieldViolation(
                f'context_features["{name[:80]}"]', "not a feature of the served feature set"
            )
            for name in context
            if name not in known
        ]
        violations += [
            FieldViolation(f'context_features["{name[:80]}"]', "not a finite number")
            for name, value in context.items()
            if name in known and not math.isfinite(value)
        ]
        if violations:
            raise InvalidArgument(violations)

    # --- predicting -------------------------------------------------------------------

    async def _predict(self, wants: Sequence[_Want], timeout_s: float) -> dict[int, _Predicted]:
        """Each wanted row through its model (by `id` of the want), as one job
        of the shared predictor: rows for the same version and the same need
        of contributions go in one matrix (a call's cross-sell candidates,
        the queries of a batch, and other calls' rows meanwhile)."""
        groups: dict[tuple[int, bool], list[_Want]] = {}
        for want in wants:
            groups.setdefault((id(want.serving.model), want.contributions), []).append(want)
        if not groups:
            return {}
        job = tuple(
            _Rows(group[0].serving.model, _stack([w.row for w in group]), contributions)
            for (_, contributions), group in groups.items()
        )
        try:
            predicted = await self._predictor.submit(job, _bounded(timeout_s))
        except TimeoutError:
            raise Unavailable("scoring is overloaded: the model did not answer in time") from None
        out: dict[int, _Predicted] = {}
        for group, results in zip(groups.values(), predicted, strict=True):
            for want, result in zip(group, results, strict=True):
                out[id(want)] = result
        return out

    async def _predict_batch(
        self, jobs: Sequence[tuple[_Rows, ...]], time_left_s: float
    ) -> list[list[list[_Predicted]]]:
        if self.executor.busy == 0 and self.executor.queued == 0 and _small(jobs):
            return _predict_jobs(jobs)
        return await self.executor.run(_predict_jobs, jobs)

    def _by_rules(self, item: _Item, live: LiveFeatures, why: str, limit: int) -> Scored:
        values: dict[str, FeatureValue | None] = {**live.customer, **(live.ticket or {})}
        rules = fallback.score(item.prediction, values)
        return Scored(
            prediction=item.prediction,
            ticket_id=item.ticket_id,
            product_id=item.product_id,
            probability=rules.probability,
            band=DEFAULT_THRESHOLDS.band(rules.probability),
            model=ModelRef(rules.model_name, rules.version, "", "", ""),
            reasons=rules.reasons[:limit],
            fallback_reason=why,
        )

    # --- ScoreBatch -------------------------------------------------------------------

    async def score_stream(
        self, queries: AsyncIterator[tuple[KeyT, ScoreQuery | ConvergeError]]
    ) -> AsyncIterator[tuple[KeyT, Outcome]]:
        """Scores a stream of (key, query) in order; a query that failed its
        conversion, or whose scoring fails, answers with its error and the
        stream goes on.

        The stream is read by a task of its own into a window of at most
        `batch_window` items; whenever a chunk may start (fewer than
        `max_in_flight` running), everything waiting (up to `max_batch`)
        becomes one `score_many`: one shared feature read and one predict
        job per chunk, not per item. Nothing waits for a chunk to fill, so
        a caller that sends a few items and waits for their answers gets
        them at once."""
        window: asyncio.Queue[tuple[KeyT, ScoreQuery | ConvergeError] | _StreamEnd] = asyncio.Queue(
            self.batch_window
        )
        reader = asyncio.ensure_future(_read_into(queries, window))
        running: collections.deque[
            tuple[list[tuple[KeyT, ScoreQuery | ConvergeError]], asyncio.Task[list[Outcome]]]
        ] = collections.deque()
        end: _StreamEnd | None = None
        try:
            while end is None or running:
                while end is None and len(running) < self.max_in_flight:
                    if window.empty() and running:
                        break  # (answer what runs; the window fills meanwhile)
                    chunk: list[tuple[KeyT, ScoreQuery | ConvergeError]] = []
                    while len(chunk) < self.max_batch and (not chunk or not window.empty()):
                        entry = await window.get()
                        if isinstance(entry, _StreamEnd):
                            end = entry
                            break
                        chunk.append(entry)
                    if chunk:
                        running.append((chunk, asyncio.ensure_future(self._chunk(chunk))))
                if running:
                    chunk, task = running.popleft()
                    for (key, _), outcome in zip(chunk, await task, strict=True):
                        yield key, outcome
            if end is not None and end.error is not None:
                raise end.error  # (the request stream itself failed, after every answer before it)
        finally:
            reader.cancel()
            for _, task in running:
                task.cancel()

    async def _chunk(
        self, chunk: Sequence[tuple[object, ScoreQuery | ConvergeError]]
    ) -> list[Outcome]:
        """A chunk's answers: its conversion errors as they are, the rest scored together."""
        queries = [q for _, q in chunk if not isinstance(q, ConvergeError)]
        scored = iter(await self.score_many(queries) if queries else [])
        return [q if isinstance(q, ConvergeError) else next(scored) for _, q in chunk]

    # --- models -----------------------------------------------------------------------

    def model_status(self, prediction: Prediction) -> Slot:
        return self.slots.status(prediction)

    async def reload(self, predictions: Sequence[Prediction]) -> ReloadOutcome:
        return await self.slots.refresh(predictions or PREDICTIONS)


@dataclass(frozen=True)
class _StreamEnd:
    """The request stream ended, by itself or with `error`."""

    error: BaseException | None = None


async def _read_into(
    queries: AsyncIterator[ItemT], window: asyncio.Queue[ItemT | _StreamEnd]
) -> None:
    try:
        async for entry in queries:
            await window.put(entry)
    except asyncio.CancelledError:
        raise
    except BaseException as error:  # (handed to the answering side, in order)
        await window.put(_StreamEnd(error))
    else:
        await window.put(_StreamEnd())


def _by_prediction(
    items: Sequence[_Item], champions: Mapping[Prediction, Serving | None]
) -> list[tuple[Serving | None, list[_Item]]]:
    """The items of one query grouped by prediction (they come in order), with
    the version that answers each group."""
    groups: list[tuple[Serving | None, list[_Item]]] = []
    for item in items:
        if groups and groups[-1][1][0].prediction == item.prediction:
            groups[-1][1].append(item)
        else:
            groups.append((champions[item.prediction], [item]))
    return groups


def _small(jobs: Sequence[tuple[_Rows, ...]]) -> bool:
    rows = [len(entry.matrix) for job in jobs for entry in job]
    return sum(rows) <= INLINE_ROWS and max(rows) <= SINGLE_ROW_MAX


def _stack(matrices: Sequence[FloatMatrix]) -> FloatMatrix:
    return matrices[0] if len(matrices) == 1 else np.vstack(matrices)


def _predict_jobs(jobs: Sequence[tuple[_Rows, ...]]) -> list[list[list[_Predicted]]]:
    """The predictor's batch, in a worker thread: the rows of every job for
    one version in one predict call (and one `pred_contrib` call for those
    whose reasons are wanted); per job, per entry, per row its result."""
    by_model: dict[tuple[int, bool], list[_Rows]] = {}
    for job in jobs:
        for entry in job:
            by_model.setdefault((id(entry.model), entry.contributions), []).append(entry)
    answers: dict[int, list[_Predicted]] = {}  # id(entry) -> its rows' results
    for (_, contributions), entries in by_model.items():
        model = entries[0].model
        matrix = _stack([e.matrix for e in entries])
        probabilities = model.predict(matrix)
        contribution_rows = model.predict_with_contributions(matrix)[1] if contributions else None
        start = 0
        for entry in entries:
            end = start + len(entry.matrix)
            answers[id(entry)] = [
                (
                    float(probabilities[k]),
                    contribution_rows[k] if contribution_rows is not None else None,
                )
                for k in range(start, end)
            ]
            start = end
    return [[answers[id(entry)] for entry in job] for job in jobs]


def _bounded(timeout_s: float) -> float:
    return timeout_s if math.isfinite(timeout_s) else 3600.0


def _with_context(
    live: LiveFeatures, context: Mapping[str, float], known: Mapping[str, object]
) -> LiveFeatures:
    """The features with the caller's values in place of (or beside) the live ones."""
    if not context:
        return live
    customer = dict(live.customer)
    ticket = dict(live.ticket) if live.ticket is not None else None
    for name, value in context.items():
        info = known.get(name)
        if getattr(info, "entity", "customer") == "ticket" and ticket is not None:
            ticket[name] = value
        else:
            customer[name] = value
    return LiveFeatures(
        customer_id=live.customer_id,
        as_of=live.as_of,
        feature_set_version=live.feature_set_version,
        customer=customer,
        ticket_id=live.ticket_id,
        ticket=ticket,
        profile=live.profile,
    )

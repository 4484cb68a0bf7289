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
predict call per model in it, so the event loop never waits on LightGBM and
a call pays one hop, not one per model. Probabilities come from the plain
predict; LightGBM's contributions (`pred_contrib`, about ten times the cost)
only for the rows whose reasons are returned.
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from converge.features.transform import InputSchema
from converge.models import fallback
from converge.models.fallback import Reason
from converge.models.handle import DEFAULT_THRESHOLDS, ModelRef
from converge.models.predictions import PREDICTIONS, Prediction
from converge.runtime.errors import (
    ConvergeError,
    FieldViolation,
    InvalidArgument,
    Unavailable,
    Violations,
)
from converge.runtime.executor import CpuExecutor
from converge.scoring.batching import Coalescer
from converge.scoring.features import CustomerKey, FeatureSource, FeatureValue, LiveFeatures
from converge.scoring.models import (
    ModelSlots,
    ReloadOutcome,
    Serving,
    ServingModel,
    Slot,
)
from converge.scoring.reasons import explain, reason_count

FloatMatrix = npt.NDArray[np.float64]
MAX_CANDIDATES = 100


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


# Per row: the calibrated probability, and its contributions when asked.
_Predicted = tuple[float, "FloatMatrix | None"]


@dataclass(frozen=True)
class _Item:
    prediction: Prediction
    ticket_id: str = ""
    product_id: str = ""


Outcome = ScoreResult | ConvergeError
KeyT = TypeVar("KeyT")


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

    # --- Score ------------------------------------------------------------------------

    async def score(self, query: ScoreQuery) -> ScoreResult:
        items = self._items(query)
        predictions = tuple(dict.fromkeys(i.prediction for i in items))
        catalogue = await self.features.catalogue(_bounded(query.timeout_s))
        self._check_context(query.context_features, catalogue.features)
        ticket_id = query.ticket_id if "escalation" in predictions else ""
        live = await self.features.read(query.customer, ticket_id, query.timeout_s)
        live = _with_context(live, query.context_features, catalogue.features)
        limit = 0 if query.omit_reasons else reason_count(query.max_reasons)
        with self.slots.lease(predictions) as lease:
            champions = [lease.champions[i.prediction] for i in items]
            rows = [
                serving.model.schema.vector(
                    live.customer, live.ticket, live.profile, live.as_of, item.product_id
                )
                if serving is not None
                else None
                for item, serving in zip(items, champions, strict=True)
            ]
            challengers: list[Serving | None] = (
                [lease.challengers.get(i.prediction) for i in items]
                if query.include_shadow
                else [None] * len(items)
            )
            challenger_rows = [
                serving.model.schema.vector(
                    live.customer, live.ticket, live.profile, live.as_of, item.product_id
                )
                if serving is not None
                else None
                for item, serving in zip(items, challengers, strict=True)
            ]
            outputs, shadow_outputs = await self._predict_all(
                champions, rows, challengers, challenger_rows, bool(limit), query.timeout_s
            )
            shadows = [
                ShadowScore(s.model.ref, out[0], s.model.thresholds.band(out[0]))
                if s is not None and out is not None
                else None
                for s, out in zip(challengers, shadow_outputs, strict=True)
            ]
            scored = []
            for n, item in enumerate(items):
                serving = champions[n]
                if serving is None:
                    scored.append(
                        self._by_rules(item, live, lease.fallback_reasons[item.prediction], limit)
                    )
                    continue
                probability, contributions = outputs[n]  # type: ignore[misc]
                model = serving.model
                row = rows[n]
                assert row is not None
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
                            row[0],
                            contributions,
                            catalogue.features,
                            limit,
                        )
                        if contributions is not None
                        else (),
                        fallback_reason="",
                        shadow=shadows[n],
                        inputs=row[0],
                    )
                )
            result = ScoreResult(
                customer_id=live.customer_id,
                predictions=tuple(scored),
                features=live,
                score_id=uuid.uuid4().hex,
                scored_at=self.clock(),
            )
            if self.prediction_log is not None:
                # Each answering version's inputs, by which the log names the row
                # it read; inside the lease: a version swapped out meanwhile is
                # unloaded (its schema gone) once its last call leaves it.
                schemas = {s.model.ref: s.model.schema for s in champions if s is not None}
                self.prediction_log.offer(result, query.channel, schemas)
        return result

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

    async def _predict_all(
        self,
        champions: Sequence[Serving | None],
        rows: Sequence[FloatMatrix | None],
        challengers: Sequence[Serving | None],
        challenger_rows: Sequence[FloatMatrix | None],
        contributions: bool,
        timeout_s: float,
    ) -> tuple[list[_Predicted | None], list[_Predicted | None]]:
        """Each row through its model, as one job of the shared predictor:
        the champions' rows with contributions when `contributions`, the
        challengers' (shadow) rows without. Rows for the same version go
        together (cross-sell candidates, and other calls' rows meanwhile)."""
        wanted = [
            (serving, row, want)
            for servings, matrices, want in (
                (champions, rows, contributions),
                (challengers, challenger_rows, False),
            )
            for serving, row in zip(servings, matrices, strict=True)
        ]
        groups: dict[tuple[int, bool], list[int]] = {}
        for n, (serving, _, want) in enumerate(wanted):
            if serving is not None:
                groups.setdefault((id(serving.model), want), []).append(n)
        out: list[_Predicted | None] = [None] * len(wanted)
        if groups:
            job = tuple(
                _Rows(
                    wanted[positions[0]][0].model,  # type: ignore[union-attr]
                    _stack([wanted[n][1] for n in positions]),  # type: ignore[misc]
                    want,
                )
                for (_, want), positions in groups.items()
            )
            try:
                predicted = await self._predictor.submit(job, _bounded(timeout_s))
            except TimeoutError:
                raise Unavailable(
                    "scoring is overloaded: the model did not answer in time"
                ) from None
            for positions, results in zip(groups.values(), predicted, strict=True):
                for n, result in zip(positions, results, strict=True):
                    out[n] = result
        return out[: len(champions)], out[len(champions) :]

    async def _predict_batch(
        self, jobs: Sequence[tuple[_Rows, ...]], time_left_s: float
    ) -> list[list[list[_Predicted]]]:
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
        stream goes on. At most `batch_window` items are read ahead of the
        answers, so the stream is read no faster than it is scored."""
        window: list[tuple[KeyT, asyncio.Task[Outcome]]] = []
        try:
            async for key, query in queries:
                window.append((key, asyncio.ensure_future(self._outcome(query))))
                while len(window) >= self.batch_window or (window and window[0][1].done()):
                    first_key, first = window.pop(0)
                    yield first_key, await first
            for key, task in window:
                yield key, await task
            window = []
        finally:
            for _, task in window:
                task.cancel()

    async def _outcome(self, query: ScoreQuery | ConvergeError) -> Outcome:
        if isinstance(query, ConvergeError):
            return query
        try:
            return await self.score(query)
        except ConvergeError as error:
            return error

    # --- models -----------------------------------------------------------------------

    def model_status(self, prediction: Prediction) -> Slot:
        return self.slots.status(prediction)

    async def reload(self, predictions: Sequence[Prediction]) -> ReloadOutcome:
        return await self.slots.refresh(predictions or PREDICTIONS)


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

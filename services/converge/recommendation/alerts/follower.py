"""The alerts follower: it follows InteractionsService.StreamInteractions from
the cursor saved in this service's schema, re-scores the customers (and
tickets) each batch touched through scoring's ScoreBatch, and hands the
scores to the rules (service.py), whose verdict the store applies in one
transaction with the cursor the batch ends at.

With several replicas, one follows and the others stand by: the leader holds
a PostgreSQL session advisory lock on a connection it keeps, and applies its
batches on that same connection, so a leader that lost its connection (and
with it the lock) can no longer write. A replica standing by tries the lock
again every `standby_retry_s`; when the leader dies, its connection closes,
the lock is released and a stand-by takes over from the saved cursor.

Like the interactions service's identity follower, it never dies: a failure
(an unreachable peer, the database away) is logged, reported in health
(`last_error`) and retried after a delay that doubles up to a cap. The
batch that failed is replayed from the saved cursor: nothing is lost, and
the dedup key folds whatever a replay raises again.

A second loop does the work that falls due with time (escalation of
unacknowledged alerts, waiting alerts released by a new day's capacity or
expired, retention), reading the service's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import grpc

from converge.recommendation.alerts.convert import decision_body
from converge.recommendation.alerts.service import (
    Assessment,
    CustomerFacts,
    DecisionDraft,
    Prediction,
    PredictionName,
    Reason,
    assess,
    cross_sell_products,
    day_start,
    predictions_wanted,
)
from converge.recommendation.alerts.store import FOLLOWER_LOCK, AlertStore, TeamLimits
from converge.recommendation.peers import Peers, Scores
from converge.recommendation.policy.model import Policy, PolicySource
from converge.runtime.channels import aio_channel
from converge.runtime.errors import NotFound
from converge.runtime.tasks import stop_tasks
from converge.runtime.values import CustomerKey
from converge.v1 import interactions_pb2, interactions_pb2_grpc, predictions_pb2, scoring_pb2

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]

_PREDICTIONS = {
    predictions_pb2.PREDICTION_KIND_CHURN: "churn",
    predictions_pb2.PREDICTION_KIND_ESCALATION: "escalation",
    predictions_pb2.PREDICTION_KIND_CROSS_SELL: "cross_sell",
}


@dataclass(frozen=True)
class FollowerSettings:
    batch_size: int = 200
    first_retry_s: float = 0.2
    max_retry_s: float = 10.0
    standby_retry_s: float = 2.0
    due_work_interval_s: float = 5.0
    retention: timedelta = timedelta(days=365)


@dataclass(frozen=True)
class Prepared:
    """A batch scored and assessed, ready to be stored with its cursor."""

    cursor: str
    assessments: list[tuple[Assessment, DecisionDraft]]
    policy_version: str
    teams: dict[str, TeamLimits]
    now: datetime
    interactions: int
    scoring_ms: float


def team_limits(policy: Policy, now: datetime) -> dict[str, TeamLimits]:
    return {
        team.name: TeamLimits(
            daily_capacity=team.daily_capacity,
            day_start=day_start(now, team),
            ack_deadline=team.ack_deadline,
            lead_team=team.lead_team,
        )
        for team in policy.teams
    }


def _predictions(scores: Scores) -> list[Prediction]:
    """Scoring's answer as the rules read it (with the risk band, which the
    decisions' view of the answer leaves out)."""
    answer = scoring_pb2.ScoreResponse.FromString(scores.raw)
    found = []
    for p in answer.predictions:
        name = _PREDICTIONS.get(p.kind)
        if name is None:
            continue
        found.append(
            Prediction(
                prediction=name,  # type: ignore[arg-type]
                probability=p.probability,
                risk_band=int(p.risk_band),
                ticket_id=p.ticket_id,
                product_id=p.product_id,
                reasons=tuple(
                    Reason(
                        r.code,
                        r.feature,
                        r.value if r.HasField("value") else None,
                        r.contribution,
                        r.text,
                    )
                    for r in p.reasons
                ),
            )
        )
    return found


class AlertFollower:
    def __init__(
        self,
        *,
        store: AlertStore,
        peers: Peers,
        interactions_address: str,
        policy: PolicySource,
        clock: Clock,
        settings: FollowerSettings,
    ) -> None:
        self.store = store
        self.peers = peers
        self.policy = policy
        self.clock = clock
        self.settings = settings
        self._channel = aio_channel(interactions_address)
        self._interactions = interactions_pb2_grpc.InteractionsServiceStub(self._channel)
        self._tasks: list[asyncio.Task[None]] = []
        self._retry_s = settings.first_retry_s
        self.leading = False
        self.last_error: str | None = None
        # Batches applied by this replica (a health and test probe).
        self.batches = 0

    @property
    def healthy(self) -> bool:
        return self.last_error is None

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name="alerts-follower"),
            asyncio.create_task(self._run_due_work(), name="alerts-due-work"),
        ]

    async def close(self) -> None:
        await stop_tasks(self._tasks)
        await self._channel.close(None)

    # --- leadership and the retry loop -------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                led = await self._lead()
                if not led:
                    await asyncio.sleep(self.settings.standby_retry_s)
                    continue
                problem = "interactions change stream ended"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                problem = f"interactions change stream: {error.code().name}"
            except Exception as error:
                problem = f"{type(error).__name__}: {error}"
                logger.exception("alerts follower failed")
            self.last_error = problem
            logger.warning(
                "alerts follower interrupted (%s); retrying in %.1f s", problem, self._retry_s
            )
            await asyncio.sleep(self._retry_s)
            self._retry_s = min(self._retry_s * 2, self.settings.max_retry_s)

    async def _lead(self) -> bool:
        """Follows while this replica holds the lock; False when another does."""
        conn = await self.store.pool.acquire()
        try:
            if not await conn.fetchval("SELECT pg_try_advisory_lock(hashtext($1))", FOLLOWER_LOCK):
                self.last_error = None  # (standing by is healthy)
                return False
            self.leading = True
            try:
                await self._follow(conn)
            finally:
                self.leading = False
                if not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", FOLLOWER_LOCK)
            return True
        finally:
            await self.store.pool.release(conn)

    async def _follow(self, conn: asyncpg.pool.PoolConnectionProxy) -> None:
        cursor = await conn.fetchval("SELECT cursor FROM alert_stream_cursor") or ""
        stream = self._interactions.StreamInteractions(
            interactions_pb2.StreamInteractionsRequest(from_cursor=cursor, follow=True)
        )
        queue: asyncio.Queue[interactions_pb2.StreamInteractionsResponse | BaseException] = (
            asyncio.Queue(maxsize=self.settings.batch_size * 4)
        )

        async def read() -> None:
            try:
                async for item in stream:
                    await queue.put(item)
                await queue.put(EOFError("interactions change stream ended"))
            except BaseException as error:  # handed to the processing loop
                await queue.put(error)
                raise

        reader = asyncio.create_task(read(), name="alerts-follower-reader")
        self.last_error = None
        # A pipeline of two: batch N is stored while batch N+1 is read and
        # scored (storing waits for the one before it, so cursors advance in
        # order); a failure of either stops the follower, which resumes from
        # the saved cursor.
        storing: asyncio.Task[None] | None = None
        try:
            while True:
                if storing is not None and storing.done():
                    storing.result()  # (raises its failure now)
                first = await queue.get()
                batch = [first]
                while len(batch) < self.settings.batch_size and not queue.empty():
                    batch.append(queue.get_nowait())
                failure = next((b for b in batch if isinstance(b, BaseException)), None)
                items = [
                    b for b in batch if isinstance(b, interactions_pb2.StreamInteractionsResponse)
                ]
                if items:
                    prepared = await self.prepare(items)
                    if storing is not None:
                        await storing
                    storing = asyncio.create_task(self.store_batch(conn, prepared))
                if failure is not None:
                    if storing is not None:
                        await storing
                    if isinstance(failure, EOFError):
                        return
                    raise failure
        finally:
            if storing is not None and not storing.done():
                storing.cancel()
                with contextlib.suppress(BaseException):
                    await storing
            reader.cancel()
            stream.cancel()
            with contextlib.suppress(BaseException):
                await reader

    # --- one batch ---------------------------------------------------------------------
    async def apply(
        self,
        conn: asyncpg.pool.PoolConnectionProxy,
        items: list[interactions_pb2.StreamInteractionsResponse],
    ) -> None:
        """Re-scores who the batch touched and applies the verdict with the
        batch's last cursor, in one transaction."""
        await self.store_batch(conn, await self.prepare(items))

    async def prepare(self, items: list[interactions_pb2.StreamInteractionsResponse]) -> Prepared:
        """Re-scores the customers and tickets a batch touched, and assesses them."""
        started = time.perf_counter()
        now = self.clock()
        active = self.policy.active()
        policy = active.policy
        touched: dict[uuid.UUID, set[str]] = {}
        latest: dict[uuid.UUID, str] = {}
        for item in items:
            interaction = item.interaction
            if not interaction.customer_id:
                continue
            latest[uuid.UUID(interaction.customer_id)] = interaction.interaction_id
            tickets = touched.setdefault(uuid.UUID(interaction.customer_id), set())
            if interaction.ticket_id:
                tickets.add(interaction.ticket_id)
        assessments: list[tuple[Assessment, DecisionDraft]] = []
        wanted = predictions_wanted(policy)
        if wanted and touched:
            erased = await self.store.erased(list(touched))
            for customer_id in erased:
                touched.pop(customer_id, None)
            assessments = await self._assess(policy, active.version, wanted, touched, latest)
        return Prepared(
            cursor=items[-1].cursor,
            assessments=assessments,
            policy_version=active.version,
            teams=team_limits(policy, now),
            now=now,
            interactions=len(items),
            scoring_ms=(time.perf_counter() - started) * 1000,
        )

    async def store_batch(self, conn: asyncpg.pool.PoolConnectionProxy, batch: Prepared) -> None:
        """Applies a prepared batch with its cursor, in one transaction."""
        started = time.perf_counter()
        await self.store.apply_batch(
            conn, batch.cursor, batch.assessments, batch.policy_version, batch.teams, batch.now
        )
        self.batches += 1
        self._retry_s = self.settings.first_retry_s
        logger.debug(
            "alerts batch: %d interactions, %.0f ms scoring, %.0f ms storing",
            batch.interactions,
            batch.scoring_ms,
            (time.perf_counter() - started) * 1000,
        )

    async def _assess(
        self,
        policy: Policy,
        version: str,
        wanted: set[PredictionName],
        touched: dict[uuid.UUID, set[str]],
        latest: dict[uuid.UUID, str],
    ) -> list[tuple[Assessment, DecisionDraft]]:
        customers = list(touched)
        views = await asyncio.gather(
            *(self.peers.customer(CustomerKey(customer_id=str(c))) for c in customers),
            return_exceptions=True,
        )
        facts: dict[uuid.UUID, CustomerFacts] = {}
        for customer_id, view in zip(customers, views, strict=True):
            if isinstance(view, NotFound):
                continue  # (erased or merged away since: nothing to alert about)
            if isinstance(view, BaseException):
                raise view
            facts[customer_id] = CustomerFacts(
                customer_id, view.segment, view.region, view.owner_team
            )
        products = cross_sell_products(policy) if "cross_sell" in wanted else []
        customer_predictions: list[str] = [p for p in ("churn", "cross_sell") if p in wanted]
        calls: list[tuple[uuid.UUID, str, list[str]]] = []  # (customer, ticket, predictions)
        for customer_id in facts:
            if "churn" in customer_predictions or (customer_predictions and products):
                calls.append((customer_id, "", customer_predictions))
            if "escalation" in wanted:
                # One call per ticket, apart: a ticket scoring refuses (closed,
                # unknown) must not cost the customer's other scores.
                calls += [(customer_id, t, ["escalation"]) for t in sorted(touched[customer_id])]
        predictions: dict[uuid.UUID, list[Prediction]] = {c: [] for c in facts}
        answers: dict[uuid.UUID, list[bytes]] = {c: [] for c in facts}
        # One ScoreBatch stream per batch (scoring scores a window of its
        # items concurrently); an item's NOT_FOUND (a closed or unknown ticket,
        # a customer gone) only drops that item.
        requests = [
            Peers.score_request(
                CustomerKey(customer_id=str(customer_id)),
                ticket_id=ticket,
                products=products if "cross_sell" in kinds else (),
                predictions=kinds,
            )
            for customer_id, ticket, kinds in calls
        ]
        results = await self.peers.score_batch(requests) if requests else []
        for (customer_id, _, _), result in zip(calls, results, strict=True):
            if isinstance(result, NotFound):
                continue
            if isinstance(result, Exception):
                raise result
            predictions[customer_id] += _predictions(result)
            answers[customer_id].append(result.raw)
        open_escalation = await self.store.open_escalation(list(facts))
        return [
            (
                assess(
                    policy,
                    facts[c],
                    predictions[c],
                    open_escalation_probability=open_escalation.get(c, 0.0),
                ),
                self._draft(c, latest.get(c, ""), version, answers[c]),
            )
            for c in facts
        ]

    @staticmethod
    def _draft(
        customer_id: uuid.UUID, interaction_id: str, version: str, answers: list[bytes]
    ) -> DecisionDraft:
        decision_id = uuid.uuid4()

        def render(alert_ids: list[str], decided_at: datetime) -> bytes:
            return decision_body(
                decision_id, customer_id, interaction_id, version, answers, alert_ids, decided_at
            )

        return DecisionDraft(decision_id, customer_id, render)

    # --- work that falls due -----------------------------------------------------------
    async def _run_due_work(self) -> None:
        while True:
            await asyncio.sleep(self.settings.due_work_interval_s)
            try:
                await self.run_due_work()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("alerts due work failed; trying again next round")

    async def run_due_work(self) -> None:
        now = self.clock()
        policy = self.policy.active().policy
        await self.store.run_due_work(team_limits(policy, now), now)
        await self.store.purge_before(now - self.settings.retention)

"""Recommend: the recommendation service's latency and throughput with its
peers in the loop, every service a process of its own (`python -m
converge.<name>`), driven by the one load generator of the benches
(`tests/benchmarks/load.py`: 4 channels, closed-loop callers, pre-built
requests).

The ground: `CUSTOMERS` customers of the simulated population
(`converge.models.simulator`, 180 days of history) resolved in a real
identity service and their interactions ingested into a real interactions
service, each granted consent on every channel (so the contact rules and
the contact ledger do their whole work). Scoring runs as a process on its
rule fallback (an empty MLflow store, no champion: `converge.models.fallback`
answers): no LightGBM in the loop, which bench_scoring measures on its own.
The recommendation service applies the documented default policy (no
version activated) and logs every decision (no dry run): one Recommend is
identity's GetCustomer beside scoring's Score (which reads the features from
interactions) beside the customer's contact history, the policy's rules, and
the decision's write in one round trip (under the customer's contact lock:
the history checked unchanged, the decision and its contacts written).

Figures (names as issue 15 asks):

- `recommendation.recommend.c1.p50_ms`, `...c1.p99_ms`: one caller.
- `recommendation.recommend.c16.p50_ms`, `...c16.p99_ms`,
  `...c16.calls_per_s`: 16 callers.
- `recommendation.recommend.failed_calls`: failures of both runs.
- `recommendation.score_alone.c1.p50_ms`, `...c16.calls_per_s`: scoring's
  Score of what Recommend asks for (churn, escalation, cross-sell of the
  default policy's products), same customers, measured right after, and
  `recommendation.recommend.vs_score_alone`: Recommend's rate at 16 callers
  over Score's, what the decision adds to the score it rests on.
- `recommendation.get_customer_alone.c1.p50_ms`, `...c1.p99_ms`: identity's
  GetCustomer of the same customers at one caller, measured right after:
  the other peer call Recommend makes beside Score (on 2 cores the two slow
  each other down, so Recommend's Score takes longer than Score alone).
- `recommendation.recommend.c1.db_xacts_per_call`: PostgreSQL transactions
  committed in the recommendation service's database per Recommend at one
  caller (pg_stat_database.xact_commit; a statement outside a transaction
  counts as one, a transaction as one whatever its statements): about 2
  means the contact history read beside the peers (one statement) and the
  decision's write (one statement, migration 0007's commit_decision: lock,
  history check, decision and contacts) and nothing else per call; a little
  more when a decision was stale and read again, and the policy book's
  polling adds a little.
- `recommendation.recommend_dry_run.c1.p50_ms`, `...c1.p99_ms`: Recommend
  with `dry_run` (nothing logged, no contact counted: no decision
  transaction), one caller: the rest of p50 is the decision's writes.
- `recommendation.decision_write.transaction_p50_ms`, `...p99_ms` and
  `recommendation.decision_write.one_statement_p50_ms`, `...p99_ms`: the
  decision's write alone, side by side in one loop against the same
  PostgreSQL (alternating, same customers, a 3 kB body and one contact):
  the former transaction (BEGIN, the customer's contact lock, the history,
  the decision, the contact, COMMIT) against migration 0007's one statement
  (lock, history check, decision, contact); `...one_statement_vs_transaction`
  their p50 ratio; `...history_read_p50_ms` the read the one statement relies
  on, made beside the peers in Recommend (off the critical path).

Targets (issue 15): p99 under 10 ms at 1 caller and under 50 ms at 16; the
bench prints them beside the figures and asserts nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.benchmarks.harness import BenchEnv
from tests.benchmarks.load import LoadResult, drive, grpc_target

CUSTOMERS = 200
SEED = 15
HISTORY = timedelta(days=180)
WARMUP_S = 1.0
WINDOW_S = 4.0
# Decisions written each way in the side-by-side of the write alone.
WRITE_ROUNDS = 400
RECOMMEND_METHOD = "/converge.v1.RecommendationService/Recommend"
SCORE_METHOD = "/converge.v1.ScoringService/Score"
GET_CUSTOMER_METHOD = "/converge.v1.IdentityService/GetCustomer"
# The default policy's cross-sell catalogue (policy/default_policy.yaml).
PRODUCTS = ("premium_support", "extra_storage", "family_plan")

TARGETS: tuple[tuple[str, str, Callable[[float], bool]], ...] = (
    ("recommendation.recommend.c1.p99_ms", "under 10 ms", lambda v: v < 10.0),
    ("recommendation.recommend.c16.p99_ms", "under 50 ms", lambda v: v < 50.0),
)


@contextlib.contextmanager
def _stage(console: Console, what: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    console.print(f"recommendation: {what} in {time.perf_counter() - started:.1f} s")


async def _grant_consent(identity_address: str, customer_ids: list[str]) -> None:
    """Every channel granted, as a customer would through identity."""
    import grpc

    from converge.v1 import common_pb2, identity_pb2, identity_pb2_grpc

    channels = [
        common_pb2.CONTACT_CHANNEL_EMAIL,
        common_pb2.CONTACT_CHANNEL_SMS,
        common_pb2.CONTACT_CHANNEL_PHONE,
        common_pb2.CONTACT_CHANNEL_PUSH,
        common_pb2.CONTACT_CHANNEL_IN_APP,
    ]
    async with grpc.aio.insecure_channel(identity_address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        for customer_id in customer_ids:
            await stub.UpdateContactPreferences(
                identity_pb2.UpdateContactPreferencesRequest(
                    customer=common_pb2.CustomerRef(customer_id=customer_id),
                    consents=[
                        identity_pb2.ChannelConsent(
                            channel=c,  # type: ignore[arg-type]
                            status=identity_pb2.CONSENT_STATUS_GRANTED,
                            source="bench",
                        )
                        for c in channels
                    ],
                ),
                timeout=10,
            )


def _targets_table(figures: dict[str, float]) -> Table:
    table = Table(title="Recommendation: figures beside their targets")
    for column in ("figure", "value", "target", "met"):
        table.add_column(column, justify="right" if column == "value" else "left")
    for name, target, met in TARGETS:
        value = figures.get(name)
        if value is None or math.isnan(value):
            table.add_row(name, "not measured", target, "-")
        else:
            table.add_row(name, f"{value:,.3f}", target, "yes" if met(value) else "NO")
    return table


async def _commits(database: str, *, settle: bool = False) -> float:
    """Transactions committed in `database` so far (pg_stat_database)."""
    import asyncpg

    if settle:
        # Backends report their counts when idle, at most once a second
        # (PostgreSQL's PGSTAT_MIN_INTERVAL): let the last ones arrive.
        await asyncio.sleep(1.5)
    connection = await asyncpg.connect(database)
    try:
        found = await connection.fetchval(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
        )
        return float(found)
    finally:
        await connection.close()


async def _writes_side_by_side(
    database: str, customer_ids: list[str], rounds: int
) -> dict[str, float]:
    """The decision's write, the former transaction against the one statement,
    alternating (which goes first too) so that both see the same load."""
    import uuid

    import numpy as np

    from converge.recommendation.contact.rules import history_horizon
    from converge.recommendation.contact.store import ContactLedger, ContactRecord
    from converge.recommendation.decisions.store import (
        Committed,
        DecisionRecord,
        DecisionStore,
        ProposedContact,
    )
    from converge.recommendation.policy.service import default_policy
    from converge.runtime.database import create_pool

    policy = default_policy().policy
    horizon = history_horizon(policy.contact, policy.actions)
    pool = await create_pool(database, "recommendation", application_name="bench-writes")
    store, ledger = DecisionStore(pool), ContactLedger(pool)
    body = bytes(3000)
    timings: dict[str, list[float]] = {"transaction": [], "one_statement": [], "read": []}

    def record(customer_id: str, now: datetime) -> DecisionRecord:
        return DecisionRecord(str(uuid.uuid4()), customer_id, now, "recommend", "bench", body)

    async def transaction(customer_id: str) -> None:
        now = datetime.now(UTC)
        decision = record(customer_id, now)
        started = time.perf_counter()
        async with pool.acquire() as conn, conn.transaction():
            await ledger.lock_customer(conn, customer_id)
            await ledger.history(conn, customer_id, now - horizon)
            await store.insert(conn, decision)
            await ledger.record(
                conn,
                [
                    ContactRecord(
                        customer_id, decision.decision_id, "a1", "bench", "retention_offer",
                        "email", now,
                    )
                ],
            )  # fmt: skip
        timings["transaction"].append((time.perf_counter() - started) * 1000)

    async def one_statement(customer_id: str) -> None:
        now = datetime.now(UTC)
        started = time.perf_counter()
        history = await store.contact_history(customer_id, now - horizon)
        read = time.perf_counter()
        committed = await store.commit(
            record(customer_id, now),
            [ProposedContact("a1", "bench", "retention_offer", "email")],
            history,
        )
        assert committed is Committed.WRITTEN, committed
        timings["read"].append((read - started) * 1000)
        timings["one_statement"].append((time.perf_counter() - read) * 1000)

    try:
        for i in range(rounds):
            customer_id = customer_ids[i % len(customer_ids)]
            ways = (transaction, one_statement) if i % 2 else (one_statement, transaction)
            for way in ways:
                await way(customer_id)
    finally:
        await pool.close()
    figures = {}
    for name, key in (("transaction", "transaction"), ("one_statement", "one_statement")):
        figures[f"recommendation.decision_write.{name}_p50_ms"] = float(
            np.percentile(timings[key], 50)
        )
        figures[f"recommendation.decision_write.{name}_p99_ms"] = float(
            np.percentile(timings[key], 99)
        )
    figures["recommendation.decision_write.history_read_p50_ms"] = float(
        np.percentile(timings["read"], 50)
    )
    figures["recommendation.decision_write.one_statement_vs_transaction"] = _ratio(
        figures["recommendation.decision_write.one_statement_p50_ms"],
        figures["recommendation.decision_write.transaction_p50_ms"],
    )
    return figures


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) and not math.isnan(b) else float("nan")


async def run(env: BenchEnv) -> dict[str, float]:
    from converge.models.simulator import feed, simulate
    from converge.v1 import (
        common_pb2,
        identity_pb2,
        predictions_pb2,
        recommendation_pb2,
        scoring_pb2,
    )

    console = Console(stderr=True)
    work_dir = Path(tempfile.mkdtemp(prefix="recommend-", dir=env.work_dir))
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)

    with _stage(console, "customers resolved and interactions ingested"):
        world = await asyncio.to_thread(simulate, CUSTOMERS, SEED, end - HISTORY, end)
        identity = await env.start("identity", await env.new_database(), log_level="WARNING")
        interactions = await env.start(
            "interactions",
            await env.new_database(),
            log_level="WARNING",
            identity_address=identity.address,
        )
        summary = await feed(world, identity.address, interactions.address)
        customer_ids = sorted(summary.customer_ids.values())
        await _grant_consent(identity.address, customer_ids)

    with _stage(console, "scoring (rule fallback) and recommendation started"):
        scoring = await env.start(
            "scoring",
            await env.new_database(),
            ready_timeout_s=240.0,
            log_level="WARNING",
            interactions_address=interactions.address,
            identity_address=identity.address,
            tracking_uri=f"sqlite:///{work_dir / 'empty-mlflow.db'}",
            prediction_log_sample_rate="0",
        )
        recommendation_database = await env.new_database()
        recommendation = await env.start(
            "recommendation",
            recommendation_database,
            log_level="WARNING",
            identity_address=identity.address,
            interactions_address=interactions.address,
            scoring_address=scoring.address,
            alerts_follow="false",
        )

    figures: dict[str, float] = {}
    recommends = [
        recommendation_pb2.RecommendRequest(
            customer=common_pb2.CustomerRef(customer_id=c), channel=common_pb2.CHANNEL_WEB
        )
        for c in customer_ids
    ]
    dry_runs = [
        recommendation_pb2.RecommendRequest(
            customer=common_pb2.CustomerRef(customer_id=c),
            channel=common_pb2.CHANNEL_WEB,
            dry_run=True,
        )
        for c in customer_ids
    ]
    scores = [
        scoring_pb2.ScoreRequest(
            customer=common_pb2.CustomerRef(customer_id=c),
            predictions=[
                predictions_pb2.PREDICTION_KIND_CHURN,
                predictions_pb2.PREDICTION_KIND_CROSS_SELL,
            ],
            candidate_product_ids=list(PRODUCTS),
            include_features=True,
            channel=common_pb2.CHANNEL_WEB,
        )
        for c in customer_ids
    ]
    with _stage(console, "Recommend at 1 and 16 callers, Score alone beside it"):
        with grpc_target(recommendation.address) as target:
            call = target.unary(RECOMMEND_METHOD, recommends, recommendation_pb2.RecommendResponse)
            call(0, 0)  # fails loudly here if Recommend cannot answer at all
            by_callers: dict[int, LoadResult] = {}
            for callers in (1, 16):
                before = await _commits(recommendation_database)
                by_callers[callers] = await drive(
                    call, callers=callers, warmup_s=WARMUP_S, window_s=WINDOW_S
                )
                if callers == 1:
                    xacts = await _commits(recommendation_database, settle=True) - before
                    figures["recommendation.recommend.c1.db_xacts_per_call"] = _ratio(
                        xacts, by_callers[1].calls_total
                    )
            dry = target.unary(RECOMMEND_METHOD, dry_runs, recommendation_pb2.RecommendResponse)
            dry_run = await drive(dry, callers=1, warmup_s=WARMUP_S, window_s=WINDOW_S)
        with grpc_target(scoring.address) as target:
            score = target.unary(SCORE_METHOD, scores, scoring_pb2.ScoreResponse)
            score_alone = {
                callers: await drive(score, callers=callers, warmup_s=WARMUP_S, window_s=WINDOW_S)
                for callers in (1, 16)
            }
        with grpc_target(identity.address) as target:
            get_customer = target.unary(
                GET_CUSTOMER_METHOD,
                [
                    identity_pb2.GetCustomerRequest(customer=common_pb2.CustomerRef(customer_id=c))
                    for c in customer_ids
                ],
                identity_pb2.GetCustomerResponse,
            )
            customer_alone = await drive(
                get_customer, callers=1, warmup_s=WARMUP_S, window_s=WINDOW_S
            )

    with _stage(console, "the decision's write alone, transaction and one statement"):
        figures.update(
            await _writes_side_by_side(recommendation_database, customer_ids, WRITE_ROUNDS)
        )

    for callers, result in by_callers.items():
        figures[f"recommendation.recommend.c{callers}.p50_ms"] = result.p(50)
        figures[f"recommendation.recommend.c{callers}.p99_ms"] = result.p(99)
        figures[f"recommendation.recommend.c{callers}.calls_per_s"] = result.calls_per_s
        if result.failed:
            console.print(
                f"[red]recommendation: Recommend at {callers} callers: failed calls "
                f"{dict(result.failures)}[/red]"
            )
    figures["recommendation.recommend.failed_calls"] = float(
        sum(r.failed for r in by_callers.values())
    )
    figures["recommendation.recommend_dry_run.c1.p50_ms"] = dry_run.p(50)
    figures["recommendation.recommend_dry_run.c1.p99_ms"] = dry_run.p(99)
    figures["recommendation.score_alone.c1.p50_ms"] = score_alone[1].p(50)
    figures["recommendation.score_alone.c1.p99_ms"] = score_alone[1].p(99)
    figures["recommendation.score_alone.c16.calls_per_s"] = score_alone[16].calls_per_s
    figures["recommendation.get_customer_alone.c1.p50_ms"] = customer_alone.p(50)
    figures["recommendation.get_customer_alone.c1.p99_ms"] = customer_alone.p(99)
    figures["recommendation.recommend.vs_score_alone"] = _ratio(
        by_callers[16].calls_per_s, score_alone[16].calls_per_s
    )
    console.print(_targets_table(figures))
    return figures

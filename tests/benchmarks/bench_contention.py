"""Interactions: ingests contending for the same customers' feature states.

16 writers at once, each a series of bulk ingests of one batch (one
transaction) spread over the same 20 customers in shuffled order: 720
transactions in all. Figures: PostgreSQL's deadlock count for the database
over the run (from pg_stat_database, read once the service's sessions have
ended and handed their statistics over), and the transactions' p50 and p99."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import grpc

from converge.runtime.values import timestamp
from converge.v1 import common_pb2, interactions_pb2, interactions_pb2_grpc
from tests import postgres_stats
from tests.benchmarks.harness import BenchEnv, percentile
from tests.service_process import stop_process

WRITERS = 16
CUSTOMERS = 20
TRANSACTIONS_PER_WRITER = 45
ROWS_PER_TRANSACTION = 40  # (a subset of the 20 customers, in its own order)


def _batch(
    customers: list[str], writer: int, number: int, rng: random.Random
) -> interactions_pb2.IngestInteractionsRequest:
    now = datetime.now(UTC)
    return interactions_pb2.IngestInteractionsRequest(
        rows=[
            interactions_pb2.IngestRow(
                row_ref=str(i),
                idempotency_key=f"w{writer}-{number}-{i}",
                interaction=interactions_pb2.InteractionInput(
                    customer=common_pb2.CustomerRef(customer_id=rng.choice(customers)),
                    occurred_at=timestamp(now - timedelta(minutes=rng.randrange(60 * 24 * 30))),
                    channel=common_pb2.CHANNEL_WEB,
                    type="product.login",
                    source="bench",
                ),
            )
            for i in range(ROWS_PER_TRANSACTION)
        ]
    )


async def run(env: BenchEnv) -> dict[str, float]:
    database = await env.new_database()
    service = await env.start(
        "interactions",
        database,
        log_level="WARNING",
        identity_address="",
        ingest_batch_size=str(ROWS_PER_TRANSACTION),
    )
    customers = [str(uuid.uuid4()) for _ in range(CUSTOMERS)]
    before = await postgres_stats.deadlocks(database)
    latencies: list[float] = []
    failures = 0

    async def writer(stub: interactions_pb2_grpc.InteractionsServiceStub, number: int) -> None:
        nonlocal failures
        rng = random.Random(number)
        for transaction in range(TRANSACTIONS_PER_WRITER):
            message = _batch(customers, number, transaction, rng)
            started = time.perf_counter()
            try:
                reply = await stub.IngestInteractions(iter([message]))
                assert reply.stored == ROWS_PER_TRANSACTION, reply
            except grpc.aio.AioRpcError:
                failures += 1
            latencies.append((time.perf_counter() - started) * 1000)

    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
        await asyncio.gather(*(writer(stub, n) for n in range(WRITERS)))
    stop_process(service)
    await postgres_stats.sessions_ended(database, "converge-interactions")
    deadlocks = await postgres_stats.deadlocks(database) - before
    return {
        "interactions.ingest_contention.deadlocks": float(deadlocks),
        "interactions.ingest_contention.failed": float(failures),
        "interactions.ingest_contention.p50_ms": percentile(latencies, 0.50),
        "interactions.ingest_contention.p99_ms": percentile(latencies, 0.99),
    }

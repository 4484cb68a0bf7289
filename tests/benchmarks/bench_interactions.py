"""Interactions: streaming ingest with live features kept current, beside raw
asyncpg COPY of the same rows into a plain table. (GetFeatures latency, over
customers with realistic histories: bench_get_features.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import statistics
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import psutil

from converge.runtime.values import timestamp, to_plain, to_tagged
from converge.v1 import common_pb2, interactions_pb2, interactions_pb2_grpc
from tests.benchmarks.harness import BenchEnv
from tests.service_process import ServiceProcess, stop_process

# Long enough that customers' feature states reach their full size (a day
# bucket for nearly every day of the longest window), as an active customer's
# does. The stream's first and last batches (read with nothing to commit,
# committed with nothing left to read) are counted in: with the default
# 40,000-row batches they are two of between seven and eight.
EVENTS = 300_000
CUSTOMERS = 2_000
ROWS_PER_MESSAGE = 500
ROUNDS = 3

TYPES = [
    ("product.login", {}),
    ("product.usage", {"feature": common_pb2.AttributeValue(string_value="reports")}),
    ("conversation.chat", {"direction": common_pb2.AttributeValue(string_value="inbound")}),
    ("survey.nps", {"score": common_pb2.AttributeValue(number_value=7)}),
]


def _events(customers: list[str], tag: str) -> list[interactions_pb2.IngestInteractionsRequest]:
    rng = random.Random(7)
    now = datetime.now(UTC)
    rows = []
    for i in range(EVENTS):
        kind, attributes = TYPES[i % len(TYPES)]
        rows.append(
            interactions_pb2.IngestInteractionsRequest(
                row_ref=str(i),
                idempotency_key=f"{tag}-{i}",
                interaction=interactions_pb2.InteractionInput(
                    customer=common_pb2.CustomerRef(customer_id=rng.choice(customers)),
                    occurred_at=timestamp(now - timedelta(minutes=rng.randrange(0, 60 * 24 * 80))),
                    channel=common_pb2.CHANNEL_WEB,
                    type=kind,
                    attributes=attributes,
                    source="bench",
                ),
            )
        )
    return rows


def _row(request: interactions_pb2.IngestInteractionsRequest) -> interactions_pb2.IngestRow:
    return interactions_pb2.IngestRow(
        row_ref=request.row_ref,
        interaction=request.interaction,
        idempotency_key=request.idempotency_key,
    )


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _postgres_cpu_seconds() -> float:
    total = 0.0
    for process in psutil.process_iter(["name"]):
        if process.info["name"] == "postgres":
            with contextlib.suppress(psutil.Error):
                total += _cpu_seconds(process.pid)
    return total


def _stored_rows(
    rows: list[interactions_pb2.IngestInteractionsRequest],
) -> list[tuple[object, ...]]:
    """The rows already decoded, in their stored form: every column the
    interactions table stores, attributes as the JSON stored."""
    records = []
    for r in rows:
        sent = r.interaction
        attributes = {name: to_tagged(to_plain(value)) for name, value in sent.attributes.items()}
        records.append(
            (
                uuid.uuid4(),
                uuid.UUID(sent.customer.customer_id),
                sent.occurred_at.ToDatetime(tzinfo=UTC),
                sent.channel,
                sent.type,
                json.dumps(attributes),
                sent.ticket_id,
                sent.product_id,
                None,  # amount
                "",  # currency
                None,  # sentiment
                sent.source,
                r.idempotency_key,
                None,  # identifier
            )
        )
    return records


async def _raw_copy(database: str, records: list[tuple[object, ...]]) -> float:
    """Rows per second of one COPY of `records` into a plain table without
    keys or indexes."""
    connection = await asyncpg.connect(database)
    try:
        table = f"raw_interactions_{uuid.uuid4().hex[:8]}"
        await connection.execute(
            f"CREATE TABLE {table} (interaction_id uuid, customer_id uuid, "
            "occurred_at timestamptz, channel smallint, type text, attributes jsonb, "
            "ticket_id text, product_id text, amount numeric, currency text, "
            "sentiment double precision, source text, idempotency_key text, identifier jsonb)"
        )
        started = time.perf_counter()
        await connection.copy_records_to_table(table, records=records)
        return len(records) / (time.perf_counter() - started)
    finally:
        await connection.close()


@dataclass
class _Ingest:
    """One streaming ingest of the bench's rows into a fresh database."""

    service: ServiceProcess
    database: str
    events_per_s: float
    service_cpu_s: float
    postgres_cpu_s: float
    client_cpu_s: float


async def _ingest(
    env: BenchEnv, messages: list[interactions_pb2.IngestInteractionsRequest]
) -> _Ingest:
    database = await env.new_database()
    service = await env.start("interactions", database, log_level="WARNING", identity_address="")
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
        service_cpu, postgres_cpu = _cpu_seconds(service.process.pid), _postgres_cpu_seconds()
        client_cpu = time.process_time()
        started = time.perf_counter()
        summary = await stub.IngestInteractions(iter(messages))
        rate = EVENTS / (time.perf_counter() - started)
        client_cpu = time.process_time() - client_cpu
        service_cpu = _cpu_seconds(service.process.pid) - service_cpu
        postgres_cpu = _postgres_cpu_seconds() - postgres_cpu
    assert summary.stored == EVENTS, summary
    return _Ingest(service, database, rate, service_cpu, postgres_cpu, client_cpu)


async def _two_replicas(
    env: BenchEnv, messages: list[interactions_pb2.IngestInteractionsRequest]
) -> float:
    database = await env.new_database()
    replicas = [
        await env.start("interactions", database, log_level="WARNING", identity_address="")
        for _ in range(2)
    ]
    channels = [grpc.aio.insecure_channel(r.address) for r in replicas]
    try:
        stubs = [interactions_pb2_grpc.InteractionsServiceStub(c) for c in channels]
        started = time.perf_counter()
        summaries = await asyncio.gather(
            *(stub.IngestInteractions(iter(messages[i::2])) for i, stub in enumerate(stubs))
        )
        rate = EVENTS / (time.perf_counter() - started)
    finally:
        for channel in channels:
            await channel.close()
    assert sum(s.stored for s in summaries) == EVENTS, summaries
    return rate


async def run(env: BenchEnv) -> dict[str, float]:
    customers = [str(uuid.uuid4()) for _ in range(CUSTOMERS)]
    rows = _events(customers, "bench")
    messages = [
        interactions_pb2.IngestInteractionsRequest(
            rows=[_row(r) for r in rows[i : i + ROWS_PER_MESSAGE]]
        )
        for i in range(0, len(rows), ROWS_PER_MESSAGE)
    ]
    records = _stored_rows(rows)
    # Rounds of (stream ingest, raw COPY of the same rows), side by side: the
    # machine's speed drifts by a third within minutes here, and a ratio of
    # neighbours drifts far less than either figure.
    rounds: list[tuple[_Ingest, float]] = []
    for _ in range(ROUNDS):
        ingest = await _ingest(env, messages)
        rounds.append((ingest, await _raw_copy(ingest.database, records)))
        stop_process(ingest.service)
    ingests = [ingest for ingest, _ in rounds]

    two_replicas_rate = await _two_replicas(env, messages)

    def per_event(seconds: float) -> float:
        return seconds / (EVENTS * len(ingests)) * 1e6

    return {
        # Scaling out: the same stream split in two, sent at once to two
        # replicas of the service on one database (a fresh one).
        "interactions.ingest_stream.two_replicas.events_per_s": two_replicas_rate,
        # Medians over the rounds; the ratio is the median of each round's own.
        "interactions.ingest_stream.events_per_s": statistics.median(
            i.events_per_s for i in ingests
        ),
        "interactions.ingest_stream.raw_copy_rows_per_s": statistics.median(c for _, c in rounds),
        "interactions.ingest_stream.vs_raw_copy": statistics.median(
            i.events_per_s / c for i, c in rounds
        ),
        # Where an ingested event's CPU goes: the service process (one Python
        # thread does the per-row work) and all of PostgreSQL's processes.
        "interactions.ingest_stream.service_cpu_us_per_event": per_event(
            sum(i.service_cpu_s for i in ingests)
        ),
        "interactions.ingest_stream.postgres_cpu_us_per_event": per_event(
            sum(i.postgres_cpu_s for i in ingests)
        ),
        "interactions.ingest_stream.client_cpu_us_per_event": per_event(
            sum(i.client_cpu_s for i in ingests)
        ),
    }

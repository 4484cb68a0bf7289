"""Identity: Resolve under 16 concurrent callers, and bulk upsert beside the
same inserts done with raw asyncpg."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import asyncpg
import grpc

from converge.connectors.importer import ROWS_PER_MESSAGE
from converge.v1 import common_pb2, identity_pb2, identity_pb2_grpc
from tests.benchmarks.harness import BenchEnv, closed_loop, percentile

EXISTING_CUSTOMERS = 2_000
RESOLVE_CALLS = 6_000
BULK_ROWS = 10_000


def _row(i: int, tag: str) -> identity_pb2.BulkResolveRequest:
    return identity_pb2.BulkResolveRequest(
        row_ref=str(i),
        resolve=identity_pb2.ResolveRequest(
            identifiers=[
                common_pb2.Identifier(
                    type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=f"{tag}-{i}@example.com"
                ),
                common_pb2.Identifier(
                    type=common_pb2.IDENTIFIER_TYPE_CRM_ID, value=f"{tag}-crm-{i}"
                ),
            ],
            profile=identity_pb2.Profile(segment="smb", plan="basic", region="emea"),
        ),
    )


def _rows(count: int, tag: str) -> Iterator[identity_pb2.BulkResolveRequest]:
    """The rows in messages of ROWS_PER_MESSAGE, as `converge import` sends them."""
    for start in range(0, count, ROWS_PER_MESSAGE):
        end = min(start + ROWS_PER_MESSAGE, count)
        yield identity_pb2.BulkResolveRequest(rows=[_row(i, tag) for i in range(start, end)])


async def _raw_asyncpg_inserts(database: str, count: int) -> float:
    """The same rows (customer, two identifiers, three profile fields) with
    plain executemany into plain tables, in one transaction: rows per second."""
    connection = await asyncpg.connect(database)
    try:
        await connection.execute(
            """
            CREATE TABLE raw_customers (customer_id uuid PRIMARY KEY, created_at timestamptz DEFAULT now());
            CREATE TABLE raw_identifiers (kind smallint, source text, value text, customer_id uuid,
                                          PRIMARY KEY (kind, source, value));
            CREATE TABLE raw_profile_changes (customer_id uuid, field text, value jsonb,
                                              effective_at timestamptz DEFAULT now());
            """
        )
        ids = [uuid.uuid4() for _ in range(count)]
        started = time.perf_counter()
        async with connection.transaction():
            await connection.executemany(
                "INSERT INTO raw_customers (customer_id) VALUES ($1)", [(c,) for c in ids]
            )
            await connection.executemany(
                "INSERT INTO raw_identifiers VALUES ($1, '', $2, $3)",
                [(k, f"raw-{i}-{k}", c) for i, c in enumerate(ids) for k in (1, 3)],
            )
            await connection.executemany(
                "INSERT INTO raw_profile_changes (customer_id, field, value) VALUES ($1, $2, $3::jsonb)",
                [(c, f, '{"s": "x"}') for c in ids for f in ("segment", "plan", "region")],
            )
        return count / (time.perf_counter() - started)
    finally:
        await connection.close()


async def run(env: BenchEnv) -> dict[str, float]:
    database = await env.new_database()
    service = await env.start("identity", database, log_level="WARNING", db_pool_max_size="20")
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        await stub.BulkResolve(_rows(EXISTING_CUSTOMERS, "existing"))

        requests = [
            identity_pb2.ResolveRequest(
                identifiers=[
                    common_pb2.Identifier(
                        type=common_pb2.IDENTIFIER_TYPE_EMAIL,
                        value=f"existing-{i % EXISTING_CUSTOMERS}@example.com",
                    )
                ]
            )
            for i in range(RESOLVE_CALLS)
        ]
        await closed_loop(lambda i: stub.Resolve(requests[i]), concurrency=16, total=500)  # warm-up
        rate, latencies = await closed_loop(
            lambda i: stub.Resolve(requests[i]), concurrency=16, total=RESOLVE_CALLS
        )

        started = time.perf_counter()
        summary = await stub.BulkResolve(_rows(BULK_ROWS, "bulk"))
        bulk_rate = BULK_ROWS / (time.perf_counter() - started)
        assert summary.created == BULK_ROWS, summary

    raw_rate = await _raw_asyncpg_inserts(database, BULK_ROWS)
    return {
        "identity.resolve.c16.calls_per_s": rate,
        "identity.resolve.c16.p50_ms": percentile(latencies, 50),
        "identity.resolve.c16.p99_ms": percentile(latencies, 99),
        "identity.bulk_upsert.rows_per_s": bulk_rate,
        "identity.bulk_upsert.raw_asyncpg_rows_per_s": raw_rate,
        "identity.bulk_upsert.vs_raw_asyncpg": bulk_rate / raw_rate,
    }

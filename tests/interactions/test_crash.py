"""A crash loses no accepted data: SIGKILL the interactions process in the
middle of a bulk ingest, restart it, and find every acknowledged event exactly
once; the client then resends everything safely."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import grpc

from converge.v1 import common_pb2, interactions_pb2, interactions_pb2_grpc
from tests.interactions.builders import interaction, record
from tests.service_process import start_service, stop_process
from tests.waiting import wait_until

BULK_ROWS = 20_000
CUSTOMERS = [str(uuid.uuid4()) for _ in range(50)]


async def _stored_bulk_rows(database: str) -> int:
    connection = await asyncpg.connect(database)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM interactions.interactions WHERE idempotency_key LIKE 'bulk-%'"
        )
        return count
    finally:
        await connection.close()


def _bulk_rows() -> Iterator[interactions_pb2.IngestInteractionsRequest]:
    for i in range(BULK_ROWS):
        customer = common_pb2.CustomerRef(customer_id=CUSTOMERS[i % len(CUSTOMERS)])
        yield interactions_pb2.IngestInteractionsRequest(
            row_ref=str(i),
            interaction=interaction(customer, "product.login", days_ago=1 + (i % 500) / 100),
            idempotency_key=f"bulk-{i}",
        )


async def test_sigkill_during_bulk_ingest_loses_no_acknowledged_event(
    database: str, tmp_path: Path
) -> None:
    settings = {"identity_address": "", "ingest_batch_size": "500"}
    service = await start_service("interactions", database, tmp_path, **settings)
    acknowledged: list[str] = []
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = interactions_pb2_grpc.InteractionsServiceStub(channel)

            killed = asyncio.Event()

            async def rows_until_killed() -> AsyncIterator[
                interactions_pb2.IngestInteractionsRequest
            ]:
                # Half the rows, then the stream stays open until the kill, so
                # the crash always comes mid-stream however fast the machine.
                for n, row in enumerate(_bulk_rows()):
                    if n == BULK_ROWS // 2:
                        await killed.wait()
                    yield row

            async def bulk_ingest() -> interactions_pb2.IngestInteractionsResponse:
                return await stub.IngestInteractions(rows_until_killed())

            bulk = asyncio.create_task(bulk_ingest())

            async def unary_writer() -> None:
                for i in range(100_000):
                    key = f"unary-{i}"
                    customer = common_pb2.CustomerRef(customer_id=CUSTOMERS[i % len(CUSTOMERS)])
                    await stub.RecordInteraction(record(interaction(customer, days_ago=1), key))
                    acknowledged.append(key)

            writer = asyncio.create_task(unary_writer())
            # Kill once both writers have something durable: a committed bulk
            # batch and a few acknowledged single records.
            await wait_until(
                lambda: _stored_bulk_rows(database),
                lambda n: n > 0 and len(acknowledged) >= 20,
                what="a committed bulk batch and 20 acknowledged records",
            )
            service.process.send_signal(signal.SIGKILL)
            killed.set()
            for task in (bulk, writer):
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await task
            assert bulk.done() and bulk.exception() is not None  # the stream was cut short
    finally:
        stop_process(service)
    assert acknowledged, "no event was acknowledged before the crash"

    restarted = await start_service("interactions", database, tmp_path, **settings)
    try:
        connection = await asyncpg.connect(database)
        try:
            stored = await connection.fetch(
                "SELECT idempotency_key, count(*) AS n FROM interactions.interactions GROUP BY 1"
            )
        finally:
            await connection.close()
        counts = {r["idempotency_key"]: r["n"] for r in stored}
        assert all(counts.get(key) == 1 for key in acknowledged)
        assert set(counts.values()) == {1}
        bulk_before = sum(1 for key in counts if key.startswith("bulk-"))
        assert bulk_before < BULK_ROWS  # the crash came mid-stream

        async with grpc.aio.insecure_channel(restarted.address) as channel:
            stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
            resent = await stub.IngestInteractions(_bulk_rows())
            assert (resent.stored, resent.duplicates) == (BULK_ROWS - bulk_before, bulk_before)

            # The live features survived the crash consistent with the events.
            live = await stub.GetFeatures(
                interactions_pb2.GetFeaturesRequest(
                    customers=[common_pb2.CustomerRef(customer_id=c) for c in CUSTOMERS[:5]]
                )
            )
            queries = [
                interactions_pb2.PointInTimeQuery(
                    row_ref=str(i), customer_id=v.customer_id, as_of=v.as_of
                )
                for i, v in enumerate(live.customers)
            ]
            replies = stub.GetPointInTimeFeatures(
                iter([interactions_pb2.GetPointInTimeFeaturesRequest(queries=queries)])
            )
            [pit] = [reply async for reply in replies]
            for vector, result in zip(live.customers, pit.results, strict=True):
                assert dict(vector.values) == dict(result.customer.values)
    finally:
        stop_process(restarted)

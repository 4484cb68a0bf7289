"""What a cancelled IngestInteractions stream leaves behind (the rule is in
interactions.proto and README "Interactions and features"): every row a
response counted is stored; without a response, only whole batches the
service committed before it learned of the cancellation, in stream order,
and nothing after them."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import asyncpg
import grpc

from converge.v1 import common_pb2, identity_pb2, interactions_pb2
from tests.interactions.builders import email_ref, interaction
from tests.waiting import wait_until

BATCH = 50  # the second replica's ingest_batch_size: one message is one batch
MESSAGES = 8


async def _stored(database: str, prefix: str) -> list[int]:
    connection = await asyncpg.connect(database)
    try:
        rows = await connection.fetch(
            "SELECT idempotency_key FROM interactions.interactions WHERE idempotency_key LIKE $1",
            f"{prefix}-%",
        )
    finally:
        await connection.close()
    return sorted(int(r[0].rsplit("-", 1)[1]) for r in rows)


async def _ingests_in_flight(database: str) -> int:
    connection = await asyncpg.connect(database)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'converge-interactions' AND state <> 'idle'"
        )
        return count
    finally:
        await connection.close()


async def test_cancelled_streams_keep_whole_batches_in_order_and_acknowledged_rows(
    platform, second_replica, database: str
) -> None:
    customers = []
    for i in range(3):
        reply = await platform.identity.Resolve(
            identity_pb2.ResolveRequest(identifiers=[email_ref(f"c{i}@example.com").identifier])
        )
        customers.append(reply.customer.customer_id)
    rng = random.Random(17)
    stored_per_customer = dict.fromkeys(customers, 0)
    outcomes = []
    for stream in range(16):
        prefix = f"s{stream}"
        cancel = stream % 4 != 3  # (every fourth stream runs to its response)
        # How many messages the client sends before it stalls (MESSAGES: it
        # ends the stream), and how many batches it waits to see committed.
        sent_before_stall = rng.randrange(MESSAGES + 1) if cancel else MESSAGES
        wait_for_batches = rng.randrange(sent_before_stall + 1)
        stall = asyncio.Event()

        async def messages(
            prefix: str = prefix,
            sent_before_stall: int = sent_before_stall,
            stall: asyncio.Event = stall,
        ) -> AsyncIterator[interactions_pb2.IngestInteractionsRequest]:
            for m in range(MESSAGES):
                if m == sent_before_stall:
                    await stall.wait()  # (never set: the client stops here)
                yield interactions_pb2.IngestInteractionsRequest(
                    rows=[
                        interactions_pb2.IngestRow(
                            row_ref=str(i),
                            interaction=interaction(
                                common_pb2.CustomerRef(customer_id=customers[i % 3])
                            ),
                            idempotency_key=f"{prefix}-{i}",
                        )
                        for i in range(m * BATCH, (m + 1) * BATCH)
                    ]
                )

        call = second_replica.IngestInteractions(messages())
        if cancel:
            # Cancel once the service has committed some batches (a random
            # point: before, between or after its commits).
            await wait_until(
                lambda p=prefix: _stored(database, p),
                lambda keys, n=wait_for_batches: len(keys) >= n * BATCH,
                what="batches committed",
            )
            call.cancel()
        try:
            reply = await call
            acknowledged = reply.stored
            assert reply.stored == reply.received == MESSAGES * BATCH
        except asyncio.CancelledError:
            acknowledged = None
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.CANCELLED
            acknowledged = None
        await wait_until(lambda: _ingests_in_flight(database), lambda n: n == 0)

        keys = await _stored(database, prefix)
        outcomes.append((sent_before_stall, wait_for_batches, acknowledged, len(keys)))
        # Whole batches, from the first, never more than the client sent.
        assert keys == list(range(len(keys)))
        assert len(keys) % BATCH == 0
        assert len(keys) <= (MESSAGES if acknowledged is not None else sent_before_stall) * BATCH
        assert len(keys) >= wait_for_batches * BATCH if cancel else True
        if acknowledged is not None:  # every acknowledged row is stored
            assert len(keys) == acknowledged
        for index in keys:
            stored_per_customer[customers[index % 3]] += 1

    # Somewhere a stream was cancelled with batches kept, and one with none.
    assert any(a is None and n > 0 for _, _, a, n in outcomes), outcomes
    assert any(a is None and n == 0 for _, _, a, n in outcomes), outcomes
    # The features hold exactly the stored rows: nothing half-written.
    live = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(
            customers=[common_pb2.CustomerRef(customer_id=c) for c in customers]
        )
    )
    assert {v.customer_id: int(v.values["count_7d_login"]) for v in live.customers} == (
        stored_per_customer
    )

"""Bulk ingest keeps its integrity under pressure: ingests on shared customers
never deadlock, a row the database refuses is rejected alone (with its row
reference) while the rest of the stream is stored."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest

from converge.identity.app import SPEC as IDENTITY
from converge.identity.settings import IdentitySettings
from converge.interactions.app import SPEC as INTERACTIONS
from converge.interactions.settings import InteractionsSettings
from converge.interactions.store import INGEST_DEADLOCK_RETRIES
from converge.runtime.errors import read_status
from converge.runtime.server import ServiceRuntime
from converge.v1 import (
    common_pb2,
    identity_pb2,
    identity_pb2_grpc,
    interactions_pb2,
    interactions_pb2_grpc,
)
from tests import postgres_stats
from tests.interactions.builders import email_ref, interaction


async def _customers(
    identity: identity_pb2_grpc.IdentityServiceStub, count: int, prefix: str
) -> list[str]:
    """Customers created in identity (interactions takes only ids identity issued)."""
    ids = []
    for i in range(count):
        reply = await identity.Resolve(
            identity_pb2.ResolveRequest(
                identifiers=[email_ref(f"{prefix}-{i}@example.com").identifier]
            )
        )
        ids.append(reply.customer.customer_id)
    return ids


def _row(
    customer_id: str, key: str, days_ago: float, **fields: object
) -> interactions_pb2.IngestRow:
    return interactions_pb2.IngestRow(
        row_ref=key,
        interaction=interaction(
            common_pb2.CustomerRef(customer_id=customer_id),
            "product.login",
            days_ago=days_ago,
            **fields,
        ),
        idempotency_key=key,
    )


@dataclass
class Apart:
    """Identity, and an interactions replica the test stops itself (so its
    database sessions end and hand over their statistics); no other
    interactions replica runs, so its sessions are known by name."""

    identity: identity_pb2_grpc.IdentityServiceStub
    interactions: interactions_pb2_grpc.InteractionsServiceStub
    replica: ServiceRuntime
    replica_stopped: bool = False

    async def stop_replica(self) -> None:
        await self.replica.stop(grace=1)
        self.replica_stopped = True


@pytest.fixture
async def apart(database: str) -> AsyncIterator[Apart]:
    identity = ServiceRuntime(IDENTITY, IdentitySettings(database_url=database, port=0))
    await identity.start()
    replica = ServiceRuntime(
        INTERACTIONS,
        InteractionsSettings(
            database_url=database,
            port=0,
            identity_address=identity.address,
            ingest_batch_size=40,
            state_cache_size=0,
        ),
    )
    await replica.start()
    async with (
        grpc.aio.insecure_channel(identity.address) as identity_channel,
        grpc.aio.insecure_channel(replica.address) as channel,
    ):
        services = Apart(
            identity_pb2_grpc.IdentityServiceStub(identity_channel),
            interactions_pb2_grpc.InteractionsServiceStub(channel),
            replica,
        )
        yield services
    if not services.replica_stopped:
        await replica.stop(grace=1)
    await identity.stop(grace=1)


async def test_sixteen_writers_on_twenty_shared_customers_never_deadlock(
    apart: Apart, database: str
) -> None:
    """16 streams, each in batches (transactions) touching most of 20 shared
    customers in a shuffled order, all at once. PostgreSQL's own deadlock
    count for the database must not move, and every row must be in the
    features exactly once."""
    customers = await _customers(apart.identity, 20, "shared")
    rng = random.Random(13)
    before_db, before_retries = (
        await postgres_stats.deadlocks(database),
        INGEST_DEADLOCK_RETRIES._value.get(),
    )

    def stream(writer: int) -> list[interactions_pb2.IngestInteractionsRequest]:
        rows = [
            _row(customers[rng.randrange(20)], f"w{writer}-{i}", days_ago=1 + (i % 5))
            for i in range(240)
        ]
        return [
            interactions_pb2.IngestInteractionsRequest(rows=rows[start : start + 40])
            for start in range(0, len(rows), 40)
        ]

    streams = [stream(writer) for writer in range(16)]
    replies = await asyncio.gather(
        *(apart.interactions.IngestInteractions(iter(s)) for s in streams)
    )
    assert [r.stored for r in replies] == [240] * 16

    sent: dict[str, int] = {}
    for s in streams:
        for message in s:
            for row in message.rows:
                customer = row.interaction.customer.customer_id
                sent[customer] = sent.get(customer, 0) + 1
    live = await apart.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(
            customers=[common_pb2.CustomerRef(customer_id=c) for c in customers]
        )
    )
    assert {v.customer_id: int(v.values["count_7d_login"]) for v in live.customers} == sent

    assert INGEST_DEADLOCK_RETRIES._value.get() == before_retries
    await apart.stop_replica()
    await postgres_stats.sessions_ended(database, "converge-interactions")
    assert await postgres_stats.deadlocks(database) == before_db


async def _refuse_ticket(database: str, ticket_id: str) -> None:
    """Makes PostgreSQL refuse a value no request check knows of, as a value
    that slips past the checks would be (a CHECK constraint of the test's own
    database)."""
    connection = await asyncpg.connect(database)
    try:
        await connection.execute(
            "ALTER TABLE interactions.interactions ADD CONSTRAINT test_refused_ticket "
            f"CHECK (ticket_id <> '{ticket_id}')"
        )
    finally:
        await connection.close()


async def _stored_keys(database: str) -> set[str]:
    connection = await asyncpg.connect(database)
    try:
        return {
            r[0]
            for r in await connection.fetch("SELECT idempotency_key FROM interactions.interactions")
        }
    finally:
        await connection.close()


async def test_a_row_the_database_refuses_is_rejected_alone_and_the_stream_goes_on(
    platform, database: str
) -> None:
    [customer] = await _customers(platform.identity, 1, "refused")
    await _refuse_ticket(database, "poison")
    keys = [f"row-{i}" for i in range(500)]
    bad = {"row-3", "row-250", "row-251", "row-499"}
    messages = [
        interactions_pb2.IngestInteractionsRequest(
            rows=[
                _row(customer, key, 2, ticket_id="poison" if key in bad else f"t-{key}")
                for key in keys[start : start + 100]
            ]
        )
        for start in range(0, len(keys), 100)
    ]
    for attempt in range(2):  # the resend answers the same, with duplicates
        reply = await platform.interactions.IngestInteractions(iter(messages))
        assert reply.received == 500
        assert reply.rejected == len(bad)
        assert {r.row_ref for r in reply.rejections} == bad
        assert all(
            r.idempotency_key == r.row_ref and read_status(r.error).reason for r in reply.rejections
        )
        if attempt == 0:
            assert (reply.stored, reply.duplicates) == (496, 0)
        else:
            assert (reply.stored, reply.duplicates) == (0, 496)
        assert await _stored_keys(database) == set(keys) - bad
    live = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(
            customers=[common_pb2.CustomerRef(customer_id=customer)]
        )
    )
    assert live.customers[0].values["count_7d_login"] == 496


async def test_a_single_record_the_database_refuses_is_invalid_argument(
    platform, database: str
) -> None:
    [customer] = await _customers(platform.identity, 1, "refused-one")
    await _refuse_ticket(database, "poison")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await platform.interactions.RecordInteraction(
            interactions_pb2.RecordInteractionRequest(
                interaction=interaction(
                    common_pb2.CustomerRef(customer_id=customer), ticket_id="poison"
                ),
                idempotency_key=uuid.uuid4().hex,
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

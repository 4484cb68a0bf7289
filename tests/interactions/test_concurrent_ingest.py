"""Ingests running side by side (streams, replicas, single records): none
waits for another's batch, no state loses another's interactions, and the
change stream never hands out a cursor that a later commit lands behind."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc
import pytest

from converge.interactions.service import Draft
from converge.interactions.store import INGEST_LOCK, EventsOf, InteractionsStore
from converge.runtime.database import create_pool
from converge.v1 import interactions_pb2
from tests.identity.helpers import field_violations
from tests.interactions.builders import email_ref, interaction, record


def _draft(owner: uuid.UUID, key: str) -> Draft:
    draft = Draft(datetime.now(UTC), "product.login", 1, {}, "", "", None, None)
    draft.source, draft.idempotency_key, draft.owner = "test", key, owner
    return draft


async def _count_fold(
    states: dict[uuid.UUID, dict[str, Any] | None], rows: Sequence[Draft], events_of: EventsOf
) -> dict[uuid.UUID, dict[str, Any]]:
    """A fold whose state is the number of interactions folded in."""
    counts = {customer: (state or {"n": 0})["n"] for customer, state in states.items()}
    for row in rows:
        counts[row.owner] += 1
    return {customer: {"n": n} for customer, n in counts.items()}


async def test_a_state_written_by_another_ingest_meanwhile_is_folded_onto_not_overwritten(
    platform, database: str
) -> None:
    """While one batch folds, another ingest stores and commits rows of the
    same customers (one with a state already, one new to both). The first
    batch's state writes over the versions it read must fail, and it must fold
    its rows into the states as the other left them."""
    pool = await create_pool(database, "interactions", application_name="test")
    try:
        store = InteractionsStore(pool)
        known, new = uuid.uuid4(), uuid.uuid4()
        await store.ingest([_draft(known, "before")], _count_fold)
        other_committed = False

        async def fold_while_another_commits(
            states: dict[uuid.UUID, dict[str, Any] | None],
            rows: Sequence[Draft],
            events_of: EventsOf,
        ) -> dict[uuid.UUID, dict[str, Any]]:
            nonlocal other_committed
            if not other_committed:
                other_committed = True
                await store.ingest([_draft(known, "other-1"), _draft(new, "other-2")], _count_fold)
            return await _count_fold(states, rows, events_of)

        await store.ingest(
            [_draft(known, "mine-1"), _draft(new, "mine-2"), _draft(new, "mine-3")],
            fold_while_another_commits,
        )
        assert other_committed
        assert await store.states([known, new]) == {known: {"n": 3}, new: {"n": 3}}
    finally:
        await pool.close()


async def test_a_record_does_not_wait_for_a_batch_in_flight_nor_overtake_it_on_the_stream(
    platform, database: str
) -> None:
    customer = email_ref("side-by-side@example.com")
    await platform.interactions.RecordInteraction(record(interaction(customer), "early"))
    in_flight = await asyncpg.connect(database)
    try:
        # A bulk batch that has stored a row and not yet committed.
        batch = in_flight.transaction()
        await batch.start()
        await in_flight.execute("SELECT pg_advisory_xact_lock_shared($1)", INGEST_LOCK)
        await in_flight.execute(
            "INSERT INTO interactions.interactions "
            "(customer_id, occurred_at, channel, type, source, idempotency_key) "
            "VALUES (gen_random_uuid(), now(), 1, 'product.login', 'test', 'in-flight')"
        )

        recorded = await asyncio.wait_for(
            platform.interactions.RecordInteraction(record(interaction(customer), "late")), 10
        )
        assert not recorded.duplicate

        async def stream_keys() -> list[str]:
            messages = platform.interactions.StreamInteractions(
                interactions_pb2.StreamInteractionsRequest()
            )
            return [m.interaction.idempotency_key async for m in messages]

        # Stored after the batch began: it waits on the stream until the batch ends.
        assert await stream_keys() == ["early"]
        await batch.commit()
        assert await stream_keys() == ["early", "in-flight", "late"]
    finally:
        await in_flight.close()


async def test_replicas_ingesting_the_same_customers_at_once_keep_features_exact(
    platform, second_replica
) -> None:
    replicas = [platform.interactions, second_replica]
    customers = [email_ref(f"together-{i}@example.com") for i in range(6)]
    for customer in customers:  # (created up front: identity resolves each once)
        await platform.interactions.RecordInteraction(
            record(interaction(customer, "product.login", days_ago=30), uuid.uuid4().hex)
        )

    def stream(name: str) -> list[interactions_pb2.IngestInteractionsRequest]:
        return [
            interactions_pb2.IngestInteractionsRequest(
                rows=[
                    interactions_pb2.IngestRow(
                        interaction=interaction(
                            customers[i % len(customers)], "product.login", days_ago=1 + (i % 5)
                        ),
                        idempotency_key=f"{name}-{message}-{i}",
                    )
                    for i in range(60)
                ]
            )
            for message in range(5)
        ]

    replies = await asyncio.gather(
        *(replicas[n % 2].IngestInteractions(iter(stream(f"s{n}"))) for n in range(4))
    )
    assert [reply.stored for reply in replies] == [300] * 4

    live = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(customers=customers)
    )
    assert [v.values["count_7d_login"] for v in live.customers] == [200] * 6
    queries = [
        interactions_pb2.PointInTimeQuery(row_ref=str(i), customer_id=v.customer_id, as_of=v.as_of)
        for i, v in enumerate(live.customers)
    ]
    answers = platform.interactions.GetPointInTimeFeatures(
        iter([interactions_pb2.GetPointInTimeFeaturesRequest(queries=queries)])
    )
    [pit] = [r async for r in answers]
    for vector, result in zip(live.customers, pit.results, strict=True):
        assert dict(vector.values) == dict(result.customer.values)

    streamed = platform.interactions.StreamInteractions(
        interactions_pb2.StreamInteractionsRequest()
    )
    keys = [m.interaction.idempotency_key async for m in streamed]
    assert len(keys) == len(set(keys)) == 1200 + len(customers)


@pytest.mark.parametrize("cursor", ["x", "1.2.3", "-4", ".5", "5.", "1" * 19])
async def test_a_malformed_stream_cursor_is_invalid_argument_naming_from_cursor(
    platform, cursor: str
) -> None:
    messages = platform.interactions.StreamInteractions(
        interactions_pb2.StreamInteractionsRequest(from_cursor=cursor)
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        _ = [m async for m in messages]
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["from_cursor"]

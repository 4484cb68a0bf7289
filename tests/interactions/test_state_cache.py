"""Live feature states kept in memory between ingest batches (StateCache):
used only while the stored state is the one kept."""

from __future__ import annotations

import uuid

import asyncpg

from converge.interactions.store import StateCache
from converge.v1 import interactions_pb2
from tests.interactions.builders import email_ref, interaction, number, text


def test_a_kept_state_is_given_once_and_only_at_the_version_it_was_kept_as() -> None:
    cache = StateCache(capacity=2)
    first = uuid.UUID(int=1)
    cache.put(first, 7, {"n": 1})
    assert cache.take(first, 8) is None  # rewritten since: not given...
    assert cache.take(first, 7) is None  # ...and dropped
    cache.put(first, 7, {"n": 1})
    assert cache.take(first, 7) == {"n": 1}
    assert cache.take(first, 7) is None  # taken: an ingest owns it until it commits


def test_the_least_recently_kept_state_goes_first_beyond_capacity() -> None:
    cache = StateCache(capacity=2)
    first, second, third = (uuid.UUID(int=i) for i in range(1, 4))
    cache.put(first, 1, {})
    cache.put(second, 1, {})
    cache.put(first, 2, {})  # kept again: now the most recent
    cache.put(third, 1, {})
    assert len(cache) == 2
    assert cache.take(second, 1) is None
    assert cache.take(first, 2) == {} and cache.take(third, 1) == {}
    disabled = StateCache(capacity=0)
    disabled.put(first, 1, {})
    assert len(disabled) == 0


async def test_replicas_writing_the_same_customers_by_turns_keep_features_exact(
    platform, second_replica
) -> None:
    """Each replica keeps the states it wrote; a state another replica wrote
    since is read again, never taken from memory (a stale copy would lose the
    other replica's interactions from the features)."""
    replicas = [platform.interactions, second_replica]
    customers = [email_ref(f"turns-{i}@example.com") for i in range(3)]
    for turn in range(6):
        rows = [
            interactions_pb2.IngestRow(
                interaction=interaction(customer, "product.login", days_ago=turn + 1),
                idempotency_key=f"turn-{turn}-{i}",
            )
            for i, customer in enumerate(customers)
        ]
        reply = await replicas[turn % 2].IngestInteractions(
            iter([interactions_pb2.IngestInteractionsRequest(rows=rows)])
        )
        assert reply.stored == len(customers)
        for replica in replicas:
            features = await replica.GetFeatures(
                interactions_pb2.GetFeaturesRequest(customers=customers)
            )
            counts = [vector.values["count_7d_login"] for vector in features.customers]
            assert counts == [turn + 1] * len(customers), (turn, counts)


async def test_a_customer_with_months_of_history_keeps_its_state_in_its_row(
    platform, database: str
) -> None:
    """A state of a few KB is rewritten by every batch that touches its
    customer; stored out of line (TOAST) each rewrite also replaced its
    chunks, which made ingest for such customers markedly slower."""
    customer = email_ref("months@example.com")
    kinds = ["product.login", "product.usage", "conversation.chat", "survey.nps"]
    attributes = [
        {},
        {"feature": text("reports")},
        {"direction": text("inbound")},
        {"score": number(7)},
    ]
    rows = [
        interactions_pb2.IngestRow(
            interaction=interaction(
                customer, kinds[i % 4], days_ago=1 + i % 85, attributes=attributes[i % 4]
            ),
            idempotency_key=f"months-{i}",
        )
        for i in range(400)
    ]
    reply = await platform.interactions.IngestInteractions(
        iter([interactions_pb2.IngestInteractionsRequest(rows=rows)])
    )
    assert reply.stored == len(rows)
    connection = await asyncpg.connect(database)
    try:
        size = await connection.fetchval(
            "SELECT max(octet_length(state)) FROM interactions.customer_state"
        )
        toasted = await connection.fetchval(
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class "
            "WHERE oid = 'interactions.customer_state'::regclass"
        )
    finally:
        await connection.close()
    assert size > 2_500  # past where PostgreSQL would move it out of line by default
    assert toasted == 0

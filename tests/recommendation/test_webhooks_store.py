"""The webhooks store against real PostgreSQL: the outbox contract
(`WebhookStore.enqueue` inside the caller's transaction), claims shared by
replicas (SKIP LOCKED), results applied to the claimed attempt only, and the
customer's erasure and export."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from importlib.resources import files

import asyncpg
import pytest

from converge.recommendation.outbox import OutboxEvent
from converge.recommendation.webhooks.store import NewWebhook, WebhookStore
from converge.runtime.database import create_pool, load_migrations, migrate

NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database, "recommendation", application_name="test-webhooks")
    async with pool.acquire() as conn:
        await migrate(
            conn,
            "recommendation",
            load_migrations(files("converge.recommendation") / "migrations"),
        )
    yield pool
    await pool.close()


def event(team: str = "support", kind: str = "escalation_risk", body: bytes = b"{}") -> OutboxEvent:
    return OutboxEvent(
        event_id=f"evt_{uuid.uuid4().hex}",
        team=team,
        kind=kind,
        alert_id=str(uuid.uuid4()),
        customer_id=str(uuid.uuid4()),
        body=body,
        occurred_at=NOW,
    )


async def webhook(
    store: WebhookStore, team: str = "support", kinds: tuple[str, ...] = (), key: str = ""
) -> str:
    row = await store.create_webhook(
        NewWebhook(team, "https://hooks.example/in", "crm", kinds, NOW, "ops", "", key)
    )
    return row.webhook_id


async def test_enqueue_adds_one_delivery_per_matching_webhook_and_event(
    pool: asyncpg.Pool,
) -> None:
    store = WebhookStore(pool)
    every_kind = await webhook(store)
    escalations = await webhook(store, kinds=("escalation_risk",))
    await webhook(store, kinds=("churn_risk",))
    await webhook(store, team="sales")
    events = [event(), event(kind="churn_risk")]
    async with pool.acquire() as conn, conn.transaction():
        added = await WebhookStore.enqueue(conn, events)
    # escalation -> every_kind + escalations; churn -> every_kind + churn-only.
    assert added == 4
    async with pool.acquire() as conn, conn.transaction():
        again = await WebhookStore.enqueue(conn, events)
    assert again == 0, "an event enqueued twice adds no second delivery"
    claimed = await store.claim(NOW, 100, 60)
    by_event = {(c.event_id, c.webhook_id) for c in claimed}
    assert (events[0].event_id, every_kind) in by_event
    assert (events[0].event_id, escalations) in by_event
    assert len(claimed) == 4


async def test_enqueue_rolls_back_with_the_callers_transaction(pool: asyncpg.Pool) -> None:
    store = WebhookStore(pool)
    await webhook(store)
    with pytest.raises(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            assert await WebhookStore.enqueue(conn, [event()]) == 1
            raise RuntimeError("the alert transaction fails")
    assert await store.claim(NOW, 100, 60) == []


async def test_concurrent_claims_never_share_a_delivery(pool: asyncpg.Pool) -> None:
    store = WebhookStore(pool)
    await webhook(store)
    async with pool.acquire() as conn, conn.transaction():
        await WebhookStore.enqueue(conn, [event() for _ in range(60)])
    batches = await asyncio.gather(*(store.claim(NOW, 7, 60) for _ in range(12)))
    ids = [c.delivery_id for batch in batches for c in batch]
    assert len(ids) == len(set(ids)) == 60
    # Leased: nothing is due again before the lease ends, all of it after.
    assert await store.claim(NOW + timedelta(seconds=59), 100, 60) == []
    assert len(await store.claim(NOW + timedelta(seconds=61), 100, 60)) == 60


async def test_a_result_applies_only_to_the_attempt_claimed(pool: asyncpg.Pool) -> None:
    store = WebhookStore(pool)
    await webhook(store)
    async with pool.acquire() as conn, conn.transaction():
        await WebhookStore.enqueue(conn, [event()])
    (first,) = await store.claim(NOW, 10, 30)
    # The lease ran out and another replica claimed it again.
    (second,) = await store.claim(NOW + timedelta(seconds=31), 10, 30)
    assert second.attempts == first.attempts + 1
    assert not await store.mark_delivered(first, NOW, 200), "a stale attempt changes nothing"
    assert await store.mark_delivered(second, NOW, 200)


async def test_erase_and_export_take_deliveries_and_dead_letters(pool: asyncpg.Pool) -> None:
    store = WebhookStore(pool)
    await webhook(store)
    gone, kept = event(body=b'{"a":1}'), event()
    async with pool.acquire() as conn, conn.transaction():
        await WebhookStore.enqueue(conn, [gone, kept])
    for claimed in await store.claim(NOW, 10, 30):
        if claimed.event_id == gone.event_id:
            await store.mark_dead(claimed, NOW, 500, "HTTP 500")
    exported = await store.export([gone.customer_id])
    assert [r["event_id"] for r in exported["webhook_dead_letters"]] == [gone.event_id]
    assert exported["webhook_dead_letters"][0]["body"] == '{"a":1}'
    assert exported["webhook_deliveries"] == []
    async with pool.acquire() as conn:
        erased = await store.erase(conn, [gone.customer_id])
    assert erased == {"webhook_deliveries": 0, "webhook_dead_letters": 1}
    assert await store.export([gone.customer_id]) == {
        "webhook_deliveries": [],
        "webhook_dead_letters": [],
    }
    assert len((await store.export([kept.customer_id]))["webhook_deliveries"]) == 1

"""Recommend's one-round-trip write (decisions/store.py `contact_history` and
`commit`, migration 0007): a decision is written with its contacts only if
the customer's contact history is still the one its rules read, against a
real PostgreSQL (the `database` fixture)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from importlib.resources import files

import asyncpg
import pytest

from converge.recommendation.contact.store import ContactLedger, ContactRecord
from converge.recommendation.decisions import service as decision_service
from converge.recommendation.decisions.store import (
    Committed,
    DecisionRecord,
    DecisionStore,
    ProposedContact,
)
from converge.runtime.database import create_pool, load_migrations, migrate
from converge.v1 import common_pb2
from converge.v1 import recommendation_pb2 as pb
from tests.conftest import Platform
from tests.recommendation.conftest import StartRecommendation, make_customer
from tests.recommendation.test_recommend import reasons, recommend, small_policy

NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
SINCE = NOW - timedelta(days=30)
SCHEMA = "recommendation"
EMAIL = ProposedContact("a1", "retention_discount_20", "retention_offer", "email")


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    # The decision log, the contact ledger and the write over both.
    wanted = {2, 3, 7}
    migrations = [
        m
        for m in load_migrations(files("converge.recommendation") / "migrations")
        if m.version in wanted
    ]
    connection = await asyncpg.connect(database)
    try:
        await migrate(connection, SCHEMA, migrations)
    finally:
        await connection.close()
    pool = await create_pool(database, SCHEMA, application_name="test-commit", max_size=4)
    yield pool
    await pool.close()


def a_record(customer_id: str, key: str | None = None) -> DecisionRecord:
    return DecisionRecord(
        decision_id=str(uuid.uuid4()),
        customer_id=customer_id,
        decided_at=NOW,
        trigger="recommend",
        policy_version="default",
        body=b"decision",
        idempotency_key=key,
        request_sha256=b"sha" if key else None,
    )


async def contacts_of(pool: asyncpg.Pool, decision_id: str) -> list[str]:
    async with pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT action_id, channel FROM contact_ledger WHERE decision_id = $1 "
            "ORDER BY action_id",
            decision_id,
        )
    return [f"{r['action_id']}:{r['channel']}" for r in rows]


async def decision_count(pool: asyncpg.Pool, decision_id: str) -> int:
    async with pool.acquire() as conn:
        found = await conn.fetchval(
            "SELECT count(*) FROM decisions WHERE decision_id = $1", uuid.UUID(decision_id)
        )
    return int(found)


async def test_a_decision_is_written_with_its_contacts_when_the_history_is_unchanged(
    pool: asyncpg.Pool,
) -> None:
    store = DecisionStore(pool)
    customer = str(uuid.uuid4())
    history = await store.contact_history(customer, SINCE)
    assert history.entries == ()
    record = a_record(customer)

    assert await store.commit(record, [EMAIL], history) is Committed.WRITTEN
    assert await decision_count(pool, record.decision_id) == 1
    assert await contacts_of(pool, record.decision_id) == ["a1:email"]
    # What it wrote is the next decision's history.
    after = await store.contact_history(customer, SINCE)
    assert [(e.decision_id, e.channel) for e in after.entries] == [(record.decision_id, "email")]
    assert after.digest != history.digest


async def test_a_decision_read_before_another_contact_is_stale_and_writes_nothing(
    pool: asyncpg.Pool,
) -> None:
    store = DecisionStore(pool)
    ledger = ContactLedger(pool)
    customer = str(uuid.uuid4())
    read = await store.contact_history(customer, SINCE)
    # Another decision for the same customer counts a contact in between.
    async with pool.acquire() as conn:
        await ledger.record(
            conn,
            [ContactRecord(customer, "other", "a1", "x", "retention_offer", "email", NOW)],
        )
    record = a_record(customer)

    assert await store.commit(record, [EMAIL], read) is Committed.STALE
    assert await decision_count(pool, record.decision_id) == 0
    assert await contacts_of(pool, record.decision_id) == []
    # Read again, it holds.
    assert await store.commit(record, [EMAIL], await store.contact_history(customer, SINCE)) is (
        Committed.WRITTEN
    )


async def test_a_decline_recorded_since_the_read_makes_the_decision_stale(
    pool: asyncpg.Pool,
) -> None:
    store = DecisionStore(pool)
    ledger = ContactLedger(pool)
    customer = str(uuid.uuid4())
    async with pool.acquire() as conn:
        await ledger.record(
            conn,
            [ContactRecord(customer, "earlier", "a1", "x", "retention_offer", "email", NOW)],
        )
    read = await store.contact_history(customer, SINCE)
    async with pool.acquire() as conn:
        assert await ledger.mark_outcome(conn, "earlier", "a1", "declined", NOW)

    assert await store.commit(a_record(customer), [EMAIL], read) is Committed.STALE


async def test_contacts_older_than_the_window_do_not_make_a_decision_stale(
    pool: asyncpg.Pool,
) -> None:
    store = DecisionStore(pool)
    ledger = ContactLedger(pool)
    customer = str(uuid.uuid4())
    read = await store.contact_history(customer, SINCE)
    async with pool.acquire() as conn:
        await ledger.record(
            conn,
            [
                ContactRecord(
                    customer, "old", "a1", "x", "retention_offer", "email", SINCE - timedelta(1)
                )
            ],
        )

    assert await store.commit(a_record(customer), [EMAIL], read) is Committed.WRITTEN


async def test_an_erased_customer_and_a_taken_key_write_nothing(pool: asyncpg.Pool) -> None:
    store = DecisionStore(pool)
    erased = str(uuid.uuid4())
    async with pool.acquire() as conn, conn.transaction():
        await store.erase(conn, [erased])
    record = a_record(erased)
    assert await store.commit(record, [EMAIL], await store.contact_history(erased, SINCE)) is (
        Committed.ERASED
    )
    assert await decision_count(pool, record.decision_id) == 0
    assert await contacts_of(pool, record.decision_id) == []

    customer = str(uuid.uuid4())
    first, second = a_record(customer, key="k1"), a_record(customer, key="k1")
    history = await store.contact_history(customer, SINCE)
    assert await store.commit(first, [EMAIL], history) is Committed.WRITTEN
    history = await store.contact_history(customer, SINCE)
    assert await store.commit(second, [EMAIL], history) is Committed.KEY_TAKEN
    assert await contacts_of(pool, second.decision_id) == []


async def test_of_two_decisions_on_one_read_history_only_one_is_written(
    pool: asyncpg.Pool,
) -> None:
    """Both read the same empty history; the lock orders their writes and the
    second sees the first's contact: stale (it would decide again)."""
    store = DecisionStore(pool)
    customer = str(uuid.uuid4())
    history = await store.contact_history(customer, SINCE)
    results = await asyncio.gather(
        store.commit(a_record(customer), [EMAIL], history),
        store.commit(a_record(customer), [EMAIL], history),
    )
    assert sorted(r.value for r in results) == ["stale", "written"]


# --- through Recommend (real gRPC, identity and scoring running) ----------------------


@pytest.mark.parametrize("optimistic_attempts", [2, 0], ids=["optimistic", "under-the-lock"])
async def test_concurrent_recommends_for_one_customer_propose_a_capped_contact_once(
    platform: Platform,
    start_recommendation: StartRecommendation,
    monkeypatch: pytest.MonkeyPatch,
    optimistic_attempts: int,
) -> None:
    """Six calls at once read the same empty history; the one-round-trip write
    makes every later one stale, so each decides again on the history with the
    first's contact (0 attempts: every call takes the transaction holding the
    customer's lock, the fallback). Exactly one email passes the cap."""
    monkeypatch.setattr(decision_service, "OPTIMISTIC_ATTEMPTS", optimistic_attempts)
    service = await start_recommendation(
        policy=small_policy(
            contact={"frequency_caps": [{"channel": "email", "max_contacts": 1, "window": "P7D"}]}
        )
    )
    customer = await make_customer(platform, "contended")

    answers = await asyncio.gather(*(recommend(service, customer.ref) for _ in range(6)))

    offered = [a for a in answers if [x.action_name for x in a.actions] == ["cross_sell"]]
    assert len(offered) == 1
    for answer in answers:
        if answer is offered[0]:
            continue
        assert [a.kind for a in answer.actions] == [pb.ACTION_KIND_DO_NOTHING]
        withheld = [s for s in answer.suppressed if s.action_name == "cross_sell"]
        assert withheld and all("SUPPRESSION_REASON_FREQUENCY_CAP" in reasons(s) for s in withheld)
    listed = await service.stub.ListDecisions(
        pb.ListDecisionsRequest(customer=customer.ref, page=common_pb2.PageRequest(page_size=10))
    )
    assert len(listed.decisions) == 6

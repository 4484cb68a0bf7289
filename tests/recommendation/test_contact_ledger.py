"""The contact ledger (contact/store.py) and the gate the decisions side calls
(contact/service.py), against a real PostgreSQL (the `database` fixture)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.resources import files

import asyncpg
import pytest

from converge.recommendation.contact.rules import Candidate, Consent, ContactPreferences
from converge.recommendation.contact.service import ContactGate, ContactRetention, purge_expired
from converge.recommendation.contact.store import ContactLedger, ContactRecord
from converge.recommendation.policy.model import ActionSpec, ActivePolicy, FrequencyCap, Policy
from converge.runtime.database import create_pool, load_migrations, migrate
from tests.waiting import wait_until

NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
DAY = timedelta(days=1)
SCHEMA = "recommendation"


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    # Only this area's migration: the other areas' are theirs to test.
    contact = [
        m
        for m in load_migrations(files("converge.recommendation") / "migrations")
        if m.version == 3
    ]
    connection = await asyncpg.connect(database)
    try:
        await migrate(connection, SCHEMA, contact)
    finally:
        await connection.close()
    pool = await create_pool(database, SCHEMA, application_name="test-contact", max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
def ledger(pool: asyncpg.Pool) -> ContactLedger:
    return ContactLedger(pool)


def contact(
    customer: str, decision: str, action: str = "a1", *, name: str = "retention_discount_20",
    channel: str | None = "email", at: datetime = NOW,
) -> ContactRecord:  # fmt: skip
    return ContactRecord(customer, decision, action, name, "retention_offer", channel, at)


async def test_history_returns_what_was_recorded_since_a_time_and_a_replay_adds_nothing(
    ledger: ContactLedger, pool: asyncpg.Pool
) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    async with pool.acquire() as conn:
        await ledger.record(
            conn,
            [
                contact(alice, "d1", at=NOW - 10 * DAY),
                contact(alice, "d2", channel=None, name="escalate_to_human", at=NOW - DAY),
                contact(bob, "d3", at=NOW - DAY),
            ],
        )
        await ledger.record(conn, [contact(alice, "d2", channel=None, at=NOW - DAY)])  # replay
        recent = await ledger.history(conn, alice, NOW - 7 * DAY)
        everything = await ledger.history(conn, alice, NOW - 30 * DAY)
    assert [(e.decision_id, e.channel, e.action_name) for e in recent] == [
        ("d2", None, "escalate_to_human")
    ]
    assert [e.decision_id for e in everything] == ["d1", "d2"]
    assert everything[0].proposed_at == NOW - 10 * DAY
    assert everything[0].customer_id == alice


async def test_outcomes_mark_the_proposal_they_concern(
    ledger: ContactLedger, pool: asyncpg.Pool
) -> None:
    alice = str(uuid.uuid4())
    async with pool.acquire() as conn:
        await ledger.record(
            conn, [contact(alice, "d1", at=NOW - 40 * DAY), contact(alice, "d2", at=NOW - DAY)]
        )
        assert await ledger.mark_outcome(conn, "d1", "a1", "DECLINED", NOW - 2 * DAY)
        assert await ledger.mark_outcome(conn, "d2", "a1", "ACTION_OUTCOME_NOT_DELIVERED")
        assert not await ledger.mark_outcome(conn, "d2", "a1", "accepted")
        assert not await ledger.mark_outcome(conn, "d9", "a1", "declined", NOW)
        # A proposal made long ago but declined lately is still read: its
        # rejection cool-down runs from the decline.
        history = await ledger.history(conn, alice, NOW - 30 * DAY)
    by_decision = {e.decision_id: e for e in history}
    assert by_decision["d1"].declined_at == NOW - 2 * DAY
    assert by_decision["d2"].not_delivered and by_decision["d2"].declined_at is None


async def test_erase_removes_a_customers_contacts_and_none_come_back(
    ledger: ContactLedger, pool: asyncpg.Pool
) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    async with pool.acquire() as conn:
        await ledger.record(conn, [contact(alice, "d1"), contact(alice, "d2"), contact(bob, "d3")])
        async with conn.transaction():
            assert await ledger.erase(conn, [alice]) == {"contacts": 2}
        # A decision that read the customer before the erasure records after it.
        await ledger.record(conn, [contact(alice, "d4")])
        assert await ledger.history(conn, alice, NOW - 30 * DAY) == []
        assert len(await ledger.history(conn, bob, NOW - 30 * DAY)) == 1
    assert await ledger.export([alice]) == {"contacts": []}


async def test_export_gives_json_records(ledger: ContactLedger, pool: asyncpg.Pool) -> None:
    alice = str(uuid.uuid4())
    async with pool.acquire() as conn:
        await ledger.record(conn, [contact(alice, "d1", channel="sms")])
    exported = await ledger.export([alice])
    assert exported == {
        "contacts": [
            {
                "customer_id": alice,
                "decision_id": "d1",
                "action_id": "a1",
                "action_name": "retention_discount_20",
                "action_kind": "retention_offer",
                "channel": "sms",
                "proposed_at": NOW.isoformat(),
                "declined_at": None,
                "not_delivered": False,
            }
        ]
    }


async def test_retention_keeps_what_a_rule_can_still_count(
    ledger: ContactLedger, pool: asyncpg.Pool
) -> None:
    alice = str(uuid.uuid4())
    policy = Policy(
        actions=[
            ActionSpec(name="retention_discount_20", kind="retention_offer", cool_down=45 * DAY)
        ]
    )
    async with pool.acquire() as conn:
        await ledger.record(
            conn,
            [
                contact(alice, "old", at=NOW - 100 * DAY),
                contact(alice, "old_declined_lately", at=NOW - 100 * DAY),
                contact(alice, "in_cool_down", at=NOW - 40 * DAY),
            ],
        )
        await ledger.mark_outcome(conn, "old_declined_lately", "a1", "declined", NOW - 10 * DAY)
    # The policy looks back 45 days (the action's cool-down); the floor is shorter.
    assert await purge_expired(ledger, policy, floor=10 * DAY, now=NOW) == 1
    async with pool.acquire() as conn:
        kept = await ledger.history(conn, alice, NOW - 365 * DAY)
    assert sorted(e.decision_id for e in kept) == ["in_cool_down", "old_declined_lately"]
    # A longer floor keeps more.
    async with pool.acquire() as conn:
        await ledger.record(conn, [contact(alice, "older", at=NOW - 80 * DAY)])
    assert await purge_expired(ledger, policy, floor=90 * DAY, now=NOW) == 0


ONE_EMAIL_A_WEEK = Policy(
    actions=[
        ActionSpec(name="retention_discount_20", kind="retention_offer", contact_channels=["email"])
    ],
    contact={"frequency_caps": [FrequencyCap(channel="email", max_contacts=1, window=7 * DAY)]},
)
EMAIL_OK = ContactPreferences(consents={"email": Consent.GRANTED})


async def test_two_concurrent_decisions_for_one_customer_cannot_both_pass_a_cap(
    ledger: ContactLedger, pool: asyncpg.Pool
) -> None:
    """The first decision holds the customer's lock from its history read to
    its commit; the second waits for it, then sees its contact and is capped.
    Without the lock both would read an empty history and both send."""
    gate = ContactGate(ledger)
    alice = str(uuid.uuid4())
    [candidate] = [Candidate.of(a) for a in ONE_EMAIL_A_WEEK.actions]
    first_has_assessed = asyncio.Event()
    let_first_commit = asyncio.Event()

    async def decide(decision_id: str, hold: bool) -> bool:
        async with pool.acquire() as conn, conn.transaction():
            [verdict] = await gate.assess(
                conn, alice, [candidate], EMAIL_OK, ONE_EMAIL_A_WEEK,
                time_zone=None, open_tickets=None, now=NOW,
            )  # fmt: skip
            if hold:
                first_has_assessed.set()
                await let_first_commit.wait()
            if verdict.allowed:
                await gate.record(conn, alice, decision_id, [("a1", verdict)], NOW)
            return verdict.allowed

    first = asyncio.create_task(decide("d1", hold=True))
    await first_has_assessed.wait()
    second = asyncio.create_task(decide("d2", hold=False))

    async def waiting_on_advisory_lock() -> int:
        async with pool.acquire() as conn:
            count: int = await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
            )
            return count

    try:
        await wait_until(
            waiting_on_advisory_lock,
            what="the second decision waiting for the lock",
            timeout_s=20,
        )
    finally:
        let_first_commit.set()
    assert await first is True
    assert await second is False
    async with pool.acquire() as conn:
        assert [e.decision_id for e in await ledger.history(conn, alice, NOW - DAY)] == ["d1"]


async def test_record_refuses_a_withheld_verdict(ledger: ContactLedger, pool: asyncpg.Pool) -> None:
    gate = ContactGate(ledger)
    alice = str(uuid.uuid4())
    [candidate] = [Candidate.of(a) for a in ONE_EMAIL_A_WEEK.actions]
    async with pool.acquire() as conn, conn.transaction():
        [verdict] = await gate.assess(
            conn, alice, [candidate], None, ONE_EMAIL_A_WEEK,
            time_zone=None, open_tickets=None, now=NOW,
        )  # fmt: skip
        assert not verdict.allowed
        with pytest.raises(ValueError, match="withheld"):
            await gate.record(conn, alice, "d1", [("a1", verdict)], NOW)


async def test_the_retention_task_follows_the_active_policy_and_the_services_clock(
    ledger: ContactLedger, pool: asyncpg.Pool
) -> None:
    @dataclass
    class Switchable:
        current: ActivePolicy

        def active(self) -> ActivePolicy:
            return self.current

    alice = str(uuid.uuid4())
    async with pool.acquire() as conn:
        await ledger.record(conn, [contact(alice, "d1", at=NOW - 20 * DAY)])
    # The default rules look back 30 days (the rejection cool-down): kept.
    policies = Switchable(ActivePolicy("1", Policy(actions=[])))
    now = NOW
    retention = ContactRetention(ledger, policies, DAY, 3600, lambda: now)
    assert await retention.purge_once() == 0
    # A policy that looks back 10 days only: purged.
    short = Policy(actions=[], contact={"cool_down_after_rejection": 10 * DAY})
    policies.current = ActivePolicy("2", short)
    assert await retention.purge_once() == 1

"""All SQL of the contact rules: the contact ledger (migration 0003).

The decisions side calls `lock_customer`, `history` and `record` on the
decision's own connection, inside its transaction, so that two concurrent
Recommend calls for one customer cannot both pass a cap: the second waits for
the first to commit and then sees its contacts. Rows leave as frozen
dataclasses.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from converge.runtime.database import Connection


@dataclass(frozen=True)
class ContactRecord:
    """One action a decision proposed, as recorded."""

    customer_id: str
    decision_id: str
    action_id: str
    action_name: str
    action_kind: str
    # A contact channel; None when the action happens in the conversation.
    channel: str | None
    proposed_at: datetime


@dataclass(frozen=True)
class LedgerEntry:
    """A recorded proposal read back, with what its outcomes said."""

    customer_id: str
    decision_id: str
    action_id: str
    action_name: str
    action_kind: str
    channel: str | None
    proposed_at: datetime
    declined_at: datetime | None
    not_delivered: bool

    def as_json(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "decision_id": self.decision_id,
            "action_id": self.action_id,
            "action_name": self.action_name,
            "action_kind": self.action_kind,
            "channel": self.channel or "",
            "proposed_at": self.proposed_at.isoformat(),
            "declined_at": self.declined_at.isoformat() if self.declined_at else None,
            "not_delivered": self.not_delivered,
        }


# The same key the decisions side takes: one customer's decisions (and an
# erasure of that customer) run one at a time.
LOCK_CUSTOMER = "SELECT pg_advisory_xact_lock(hashtext('contact:' || $1::text))"
COLUMNS = """customer_id, decision_id, action_id, action_name, action_kind, channel,
       proposed_at, declined_at, not_delivered"""
HISTORY = f"""
SELECT {COLUMNS} FROM contact_ledger
WHERE customer_id = $1 AND (proposed_at > $2 OR declined_at > $2)
ORDER BY proposed_at
"""
# A replayed decision records nothing twice; rows of erased customers are
# never written.
RECORD = """
INSERT INTO contact_ledger
    (customer_id, decision_id, action_id, action_name, action_kind, channel, proposed_at)
SELECT r.* FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                       $7::timestamptz[])
    AS r(customer_id, decision_id, action_id, action_name, action_kind, channel, proposed_at)
WHERE NOT EXISTS (SELECT 1 FROM contact_erased_customers e WHERE e.customer_id = r.customer_id)
ON CONFLICT (decision_id, action_id) DO NOTHING
"""
MARK_DECLINED = """
UPDATE contact_ledger SET declined_at = GREATEST(declined_at, $3)
WHERE decision_id = $1 AND action_id = $2
"""
MARK_NOT_DELIVERED = """
UPDATE contact_ledger SET not_delivered = true WHERE decision_id = $1 AND action_id = $2
"""
TOMBSTONE = """
INSERT INTO contact_erased_customers (customer_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING
"""
ERASE = "DELETE FROM contact_ledger WHERE customer_id = ANY($1::uuid[])"
EXPORT = f"""
SELECT {COLUMNS} FROM contact_ledger WHERE customer_id = ANY($1::uuid[])
ORDER BY customer_id, proposed_at, decision_id, action_id
"""
# Retention: a row leaves once neither its proposal nor its decline can count.
PURGE = """
DELETE FROM contact_ledger
WHERE proposed_at < $1 AND (declined_at IS NULL OR declined_at < $1)
"""

# RecordOutcome's outcomes that change what the rules count (ActionOutcome
# names, any case, with or without the ACTION_OUTCOME_ prefix).
DECLINED = "declined"
NOT_DELIVERED = "not_delivered"


class ContactLedger:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def lock_customer(self, conn: Connection, customer_id: str) -> None:
        """Holds the customer's contact lock until `conn`'s transaction ends."""
        await conn.execute(LOCK_CUSTOMER, customer_id)

    async def history(
        self, conn: Connection, customer_id: str, since: datetime
    ) -> list[LedgerEntry]:
        """The customer's proposals made or declined after `since`, oldest first."""
        rows = await conn.fetch(HISTORY, uuid.UUID(customer_id), since)
        return [_entry(row) for row in rows]

    async def record(self, conn: Connection, contacts: Sequence[ContactRecord]) -> None:
        """Writes the proposals (one statement); a (decision, action) already
        recorded, or a customer erased, is skipped."""
        if not contacts:
            return
        await conn.execute(
            RECORD,
            [uuid.UUID(c.customer_id) for c in contacts],
            [c.decision_id for c in contacts],
            [c.action_id for c in contacts],
            [c.action_name for c in contacts],
            [c.action_kind for c in contacts],
            [c.channel or "" for c in contacts],
            [c.proposed_at for c in contacts],
        )

    async def mark_outcome(
        self,
        conn: Connection,
        decision_id: str,
        action_id: str,
        outcome: str,
        occurred_at: datetime | None = None,
    ) -> bool:
        """Applies an outcome to the proposal it concerns: DECLINED starts the
        cool-down after a rejection (from `occurred_at`, else the database's
        transaction time), NOT_DELIVERED stops it counting; other outcomes
        change nothing. Whether a recorded proposal was changed."""
        name = outcome.lower().removeprefix("action_outcome_")
        if name == DECLINED:
            if occurred_at is None:
                occurred_at = await conn.fetchval("SELECT now()")
            status = await conn.execute(MARK_DECLINED, decision_id, action_id, occurred_at)
        elif name == NOT_DELIVERED:
            status = await conn.execute(MARK_NOT_DELIVERED, decision_id, action_id)
        else:
            return False
        return _count(status) > 0

    async def erase(self, conn: Connection, customer_ids: Sequence[str]) -> dict[str, int]:
        """Deletes the customers' contacts and keeps their bare ids so that no
        decision in flight brings any back; rows deleted by kind. Call inside a
        transaction: it takes each customer's contact lock."""
        ids = sorted(uuid.UUID(c) for c in customer_ids)
        for customer_id in ids:  # sorted: two erasures never deadlock
            await conn.execute(LOCK_CUSTOMER, str(customer_id))
        await conn.execute(TOMBSTONE, ids)
        status = await conn.execute(ERASE, ids)
        return {"contacts": _count(status)}

    async def export(self, customer_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The customers' recorded contacts, as JSON-able records."""
        ids = [uuid.UUID(c) for c in customer_ids]
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(EXPORT, ids)
        return {"contacts": [_entry(row).as_json() for row in rows]}

    async def purge(self, before: datetime) -> int:
        """Deletes proposals made and declined before `before`; how many."""
        async with self.pool.acquire() as conn:
            status = await conn.execute(PURGE, before)
        return _count(status)


def _entry(row: asyncpg.Record) -> LedgerEntry:
    return LedgerEntry(
        customer_id=str(row["customer_id"]),
        decision_id=row["decision_id"],
        action_id=row["action_id"],
        action_name=row["action_name"],
        action_kind=row["action_kind"],
        channel=row["channel"] or None,
        proposed_at=row["proposed_at"],
        declined_at=row["declined_at"],
        not_delivered=row["not_delivered"],
    )


def _count(status: str) -> int:
    # "UPDATE 1", "DELETE 12"
    return int(status.rsplit(" ", 1)[-1])

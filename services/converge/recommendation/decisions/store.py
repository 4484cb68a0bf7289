"""The decision log's SQL (0002_decisions.sql): every decision stored as the
whole serialized `converge.v1.Decision` plus the columns lists filter on.

`insert(conn, record)` takes the caller's connection, so a decision is written
in the same transaction as the contacts it counts (Recommend) or the alert it
backs (alerts). Reads take their own connection from the pool."""

from __future__ import annotations

import enum
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from converge.recommendation.contact.store import LedgerEntry
from converge.runtime.database import Connection

# A decision whose customer was erased is not written (see the tombstones).
_INSERT = """
INSERT INTO decisions (decision_id, customer_id, decided_at, trigger, policy_version,
                       idempotency_key, request_sha256, body)
SELECT $1, $2, $3, $4, $5, $6, $7, $8
WHERE NOT EXISTS (SELECT 1 FROM decision_erased_customers WHERE customer_id = $2)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING decision_id
"""
# Recommend's optimistic read (0007): the contact history the rules need and
# its digest, from one snapshot; an empty history is one row of nulls.
_CONTACT_HISTORY = """
SELECT contact_history_digest($1, $2) AS digest, h.*
FROM (SELECT 1) AS one
LEFT JOIN (
    SELECT customer_id, decision_id, action_id, action_name, action_kind, channel,
           proposed_at, declined_at, not_delivered
    FROM contact_ledger
    WHERE customer_id = $1 AND (proposed_at > $2 OR declined_at > $2)
) AS h ON true
ORDER BY h.proposed_at
"""
# ... and its write, in one round trip (0007's commit_decision).
_COMMIT = "SELECT commit_decision($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)"
_COLUMNS = (
    "decision_id, customer_id, decided_at, trigger, policy_version, idempotency_key, "
    "request_sha256, body"
)
_GET = f"SELECT {_COLUMNS} FROM decisions WHERE decision_id = $1"
_BY_KEY = f"SELECT {_COLUMNS} FROM decisions WHERE idempotency_key = $1"
_OUTCOMES = """
SELECT decision_id::text AS decision_id, action_id, outcome, occurred_at, interaction_id
FROM decision_outcomes WHERE decision_id = ANY($1::uuid[])
ORDER BY decision_id, occurred_at, outcome_id
"""
# Newest first; the page key is (decided_at, decision_id), both descending.
_LIST = f"""
SELECT {_COLUMNS} FROM decisions
WHERE customer_id = ANY($1::uuid[])
  AND ($2::timestamptz IS NULL OR decided_at >= $2)
  AND ($3::timestamptz IS NULL OR decided_at < $3)
  AND (cardinality($4::text[]) = 0 OR trigger = ANY($4::text[]))
  AND ($5::timestamptz IS NULL OR (decided_at, decision_id) < ($5, $6::uuid))
ORDER BY decided_at DESC, decision_id DESC
LIMIT $7
"""
# A decision's outcomes go with it (their foreign key cascades, 0009).
_PURGE = """
WITH old AS (
    SELECT decision_id FROM decisions WHERE decided_at < $1 ORDER BY decided_at LIMIT $2
)
DELETE FROM decisions d USING old WHERE d.decision_id = old.decision_id
"""
# RecordOutcome's keys (the outcomes area's table) hold the customer id and
# cannot reference their outcome (a key is claimed before its outcome is
# written). A key claimed before the horizon belongs to a decision made
# before it, which this purge removes: the key goes too.
_PURGE_OUTCOME_KEYS = "DELETE FROM outcome_requests WHERE created_at < $1"
_TOMBSTONE = """
INSERT INTO decision_erased_customers (customer_id)
SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING
"""
_ERASE = "DELETE FROM decisions WHERE customer_id = ANY($1::uuid[])"
_EXPORT = f"""
SELECT {_COLUMNS} FROM decisions WHERE customer_id = ANY($1::uuid[])
ORDER BY decided_at, decision_id
"""


@dataclass(frozen=True)
class DecisionRecord:
    """One logged decision. `body` is the serialized converge.v1.Decision
    (without outcomes); `trigger` DecisionTrigger's name in lower case."""

    decision_id: str
    customer_id: str
    decided_at: datetime
    trigger: str
    policy_version: str
    body: bytes
    idempotency_key: str | None = None
    request_sha256: bytes | None = None


@dataclass(frozen=True)
class ContactHistory:
    """A customer's contact history since a time, with the digest that
    `commit` compares under the customer's lock."""

    customer_id: str
    entries: tuple[LedgerEntry, ...]
    since: datetime
    digest: str


@dataclass(frozen=True)
class ProposedContact:
    """A contact a decision proposes (its action, the channel; None: in the
    conversation), recorded by `commit` with the decision."""

    action_id: str
    action_name: str
    action_kind: str
    channel: str | None


class Committed(enum.Enum):
    """What `commit` did."""

    WRITTEN = "written"
    # The history changed since it was read: nothing written, decide again.
    STALE = "stale"
    # The idempotency key is bound to another decision: nothing written.
    KEY_TAKEN = "key_taken"
    # The customer was erased: nothing written.
    ERASED = "erased"


@dataclass(frozen=True)
class StoredOutcome:
    """An outcome recorded against a decision (the outcomes area's table)."""

    action_id: str
    outcome: str
    occurred_at: datetime
    interaction_id: str


@dataclass(frozen=True)
class StoredDecision:
    record: DecisionRecord
    outcomes: tuple[StoredOutcome, ...]


def _record(row: asyncpg.Record) -> DecisionRecord:
    return DecisionRecord(
        decision_id=str(row["decision_id"]),
        customer_id=str(row["customer_id"]),
        decided_at=row["decided_at"],
        trigger=row["trigger"],
        policy_version=row["policy_version"],
        body=bytes(row["body"]),
        idempotency_key=row["idempotency_key"],
        request_sha256=bytes(row["request_sha256"]) if row["request_sha256"] else None,
    )


def is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True


class DecisionStore:
    """`render` turns a stored body into a JSON-able record for exports (the
    Decision as proto3 JSON, built where protobuf conversions live)."""

    def __init__(
        self, pool: asyncpg.Pool, render: Callable[[bytes], dict[str, Any]] | None = None
    ) -> None:
        self.pool = pool
        self.render = render or (lambda body: {"body_hex": body.hex()})

    async def insert(self, conn: Connection, record: DecisionRecord) -> bool:
        """Writes a decision in the caller's transaction. False when nothing
        was written: its customer was erased, or its idempotency key is taken
        (read the winner with `by_idempotency_key`)."""
        written = await conn.fetchval(
            _INSERT,
            uuid.UUID(record.decision_id),
            uuid.UUID(record.customer_id),
            record.decided_at,
            record.trigger,
            record.policy_version,
            record.idempotency_key,
            record.request_sha256,
            record.body,
        )
        return written is not None

    async def contact_history(self, customer_id: str, since: datetime) -> ContactHistory:
        """The customer's contact history since `since` (proposals made or
        declined after it, oldest first) and its digest, read without a lock
        or a transaction: `commit` checks under the lock that it still holds."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_CONTACT_HISTORY, uuid.UUID(customer_id), since)
        return ContactHistory(
            customer_id=customer_id,
            entries=tuple(
                LedgerEntry(
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
                for row in rows
                if row["decision_id"] is not None
            ),
            since=since,
            digest=rows[0]["digest"],
        )

    async def commit(
        self,
        record: DecisionRecord,
        contacts: Sequence[ProposedContact],
        history: ContactHistory,
    ) -> Committed:
        """Writes a decision and its contacts in one statement (its own
        transaction, one round trip) if, under the customer's contact lock,
        the history since `history.since` is still `history`; else nothing."""
        async with self.pool.acquire() as conn:
            status = await conn.fetchval(
                _COMMIT,
                uuid.UUID(record.decision_id),
                uuid.UUID(record.customer_id),
                record.decided_at,
                record.trigger,
                record.policy_version,
                record.idempotency_key,
                record.request_sha256,
                record.body,
                history.since,
                history.digest,
                [c.action_id for c in contacts],
                [c.action_name for c in contacts],
                [c.action_kind for c in contacts],
                [c.channel or "" for c in contacts],
            )
        return Committed(status)

    async def by_idempotency_key(
        self, key: str, conn: Connection | None = None
    ) -> DecisionRecord | None:
        if conn is not None:
            row = await conn.fetchrow(_BY_KEY, key)
        else:
            async with self.pool.acquire() as own:
                row = await own.fetchrow(_BY_KEY, key)
        return _record(row) if row is not None else None

    async def get(self, decision_id: str) -> StoredDecision | None:
        """A decision with the outcomes recorded since; None when unknown (or purged)."""
        if not is_uuid(decision_id):
            return None
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(_GET, uuid.UUID(decision_id))
            if row is None:
                return None
            record = _record(row)
            outcomes = await self._outcomes(conn, [record.decision_id])
        return StoredDecision(record, outcomes.get(record.decision_id, ()))

    async def page(
        self,
        customer_ids: Sequence[str],
        *,
        since: datetime | None,
        until: datetime | None,
        triggers: Sequence[str],
        after: tuple[datetime, str] | None,
        limit: int,
    ) -> list[StoredDecision]:
        """Newest first, after the page key `after` (decided_at, decision_id)."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(
                _LIST,
                [uuid.UUID(c) for c in customer_ids],
                since,
                until,
                list(triggers),
                after[0] if after else None,
                uuid.UUID(after[1]) if after else None,
                limit,
            )
            records = [_record(row) for row in rows]
            outcomes = await self._outcomes(conn, [r.decision_id for r in records])
        return [StoredDecision(r, outcomes.get(r.decision_id, ())) for r in records]

    async def _outcomes(
        self, conn: Connection, decision_ids: Sequence[str]
    ) -> dict[str, tuple[StoredOutcome, ...]]:
        if not decision_ids:
            return {}
        found: dict[str, list[StoredOutcome]] = {}
        for row in await conn.fetch(_OUTCOMES, list(decision_ids)):
            found.setdefault(row["decision_id"], []).append(
                StoredOutcome(
                    row["action_id"], row["outcome"], row["occurred_at"], row["interaction_id"]
                )
            )
        return {k: tuple(v) for k, v in found.items()}

    async def purge(self, before: datetime, batch: int = 5_000) -> int:
        """Deletes decisions decided before `before`, a batch per statement
        (short transactions), with their outcomes and outcome keys; returns
        how many decisions. The keys go first: once a decision is seen gone,
        so is every key of its outcomes."""
        total = 0
        async with self.pool.acquire() as conn:
            await conn.execute(_PURGE_OUTCOME_KEYS, before)
            while True:
                status = await conn.execute(_PURGE, before, batch)
                deleted = int(status.split()[-1])
                total += deleted
                if deleted < batch:
                    return total

    # --- data subjects ----------------------------------------------------------------

    async def erase(self, conn: Connection, customer_ids: Sequence[str]) -> dict[str, int]:
        """Deletes the customers' decisions and leaves tombstones, in the
        caller's transaction: a decision written afterwards is refused."""
        ids = [uuid.UUID(c) for c in customer_ids if is_uuid(c)]
        await conn.execute(_TOMBSTONE, ids)
        status = await conn.execute(_ERASE, ids)
        return {"decisions": int(status.split()[-1])}

    async def export(self, customer_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The customers' decisions as JSON-able records (the Decision as
        proto3 JSON, by `render`), oldest first."""
        ids = [uuid.UUID(c) for c in customer_ids if is_uuid(c)]
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(_EXPORT, ids)
        return {
            "decisions": [
                {
                    "decision_id": r.decision_id,
                    "customer_id": r.customer_id,
                    "decided_at": r.decided_at.isoformat(),
                    "trigger": r.trigger,
                    "policy_version": r.policy_version,
                    "decision": self.render(r.body),
                }
                for r in (_record(row) for row in rows)
            ]
        }

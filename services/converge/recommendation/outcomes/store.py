"""All SQL of the outcomes area (migration 0004): the outcomes recorded
against decisions and RecordOutcome's idempotency keys. Rows leave as frozen
dataclasses.

The contact ledger is told of an outcome (`mark_outcome`: a rejection starts
its cool-down, an undelivered contact stops counting) in the same transaction
that records it, so the two never disagree."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol

import asyncpg

from converge.runtime.database import Connection
from converge.runtime.values import PlainValue, from_tagged, to_tagged

ARM_TREATMENT = "treatment"
ARM_CONTROL = "control"


class OutcomeLedger(Protocol):
    """What the contact area's ledger offers the outcomes area (contact/store.py
    `ContactLedger.mark_outcome`), called inside the outcome's transaction."""

    async def mark_outcome(
        self,
        conn: Connection,
        decision_id: str,
        action_id: str,
        outcome: str,
        occurred_at: datetime | None = None,
    ) -> object: ...


@dataclass(frozen=True)
class NewOutcome:
    """An outcome to record, resolved against its decision."""

    outcome_id: uuid.UUID
    decision_id: str
    alert_id: str
    customer_id: uuid.UUID
    action_id: str
    action_name: str
    action_kind: str
    product_id: str
    arm: str
    outcome: str
    value: Decimal | None
    currency: str
    occurred_at: datetime
    recorded_at: datetime
    interaction_id: str
    attributes: Mapping[str, PlainValue]
    actor: str
    policy_version: str
    decided_at: datetime


@dataclass(frozen=True)
class StoredOutcome(NewOutcome):
    """An outcome read back (same fields as written)."""


@dataclass(frozen=True)
class StoredRequest:
    """What an idempotency key is bound to."""

    idempotency_key: str
    request_sha256: bytes
    outcome_id: uuid.UUID
    interaction_id: str


COLUMNS = tuple(NewOutcome.__dataclass_fields__)
# Read back as written: decision_id is a uuid column (migration 0009, for its
# foreign key to decisions) and a str here, as everywhere else in the service.
SELECTED = ", ".join(
    "decision_id::text AS decision_id" if c == "decision_id" else c for c in COLUMNS
)

# Written once per outcome id: a request that adopted a pending claim (see
# CLAIM_KEY) and its first attempt cannot both write it.
INSERT_OUTCOME = f"""
INSERT INTO decision_outcomes ({", ".join(COLUMNS)})
VALUES ({", ".join(f"${i}" for i in range(1, len(COLUMNS) + 1))})
ON CONFLICT (outcome_id) DO NOTHING
"""
# A key is claimed before anything is written (interaction_id '' while
# pending): of two concurrent requests with one key, the second waits on the
# first's row and then finds it taken, so a request refused for its key never
# writes an interaction.
CLAIM_KEY = """
INSERT INTO outcome_requests
    (idempotency_key, request_sha256, outcome_id, interaction_id, customer_id, created_at)
VALUES ($1, $2, $3, '', $4, $5)
ON CONFLICT (idempotency_key) DO NOTHING
"""
COMPLETE_KEY = """
UPDATE outcome_requests SET interaction_id = $2 WHERE idempotency_key = $1
"""
# The decision must still be logged when its outcome is written, and stays
# so until the outcome commits: an erasure of the customer (which deletes the
# decision, then the outcomes, in one transaction) waits for the outcome and
# then deletes it too, or ran before and the outcome is refused.
DECISION_STILL_LOGGED = """
SELECT 1 FROM decisions WHERE decision_id = $1::uuid FOR SHARE
"""
FIND_KEY = """
SELECT idempotency_key, request_sha256, outcome_id, interaction_id
FROM outcome_requests WHERE idempotency_key = $1
"""
FOR_DECISIONS = f"""
SELECT {SELECTED} FROM decision_outcomes
WHERE decision_id = ANY($1::uuid[])
ORDER BY decision_id, occurred_at, outcome_id
"""
FOR_REPORT = f"""
SELECT {SELECTED} FROM decision_outcomes
WHERE decided_at >= $1 AND ($2::text IS NULL OR policy_version = $2)
ORDER BY decided_at, outcome_id
"""
# The decision log (the decisions area's table, read only): the report's
# exposures are the decisions' proposed and held-out actions.
DECISION_BODIES = """
SELECT body FROM decisions
WHERE decided_at >= $1 AND ($2::text IS NULL OR policy_version = $2)
ORDER BY decided_at, decision_id
"""
ERASE_OUTCOMES = "DELETE FROM decision_outcomes WHERE customer_id = ANY($1::uuid[])"
ERASE_REQUESTS = "DELETE FROM outcome_requests WHERE customer_id = ANY($1::uuid[])"
EXPORT_REQUESTS = """
SELECT idempotency_key, outcome_id, interaction_id, created_at FROM outcome_requests
WHERE customer_id = ANY($1::uuid[])
ORDER BY created_at, idempotency_key
"""
EXPORT = f"""
SELECT {SELECTED} FROM decision_outcomes
WHERE customer_id = ANY($1::uuid[])
ORDER BY occurred_at, outcome_id
"""


class DecisionGone(Exception):
    """The outcome's decision left the log (erased or purged) meanwhile."""


class OutcomeStore:
    def __init__(self, pool: asyncpg.Pool, ledger: OutcomeLedger | None = None) -> None:
        self.pool = pool
        # None until the contact area's ledger is wired (then every treatment
        # outcome reaches it).
        self.ledger = ledger

    async def find_request(self, idempotency_key: str) -> StoredRequest | None:
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(FIND_KEY, idempotency_key)
        return None if row is None else StoredRequest(**dict(row))

    async def claim(
        self,
        idempotency_key: str,
        request_sha256: bytes,
        outcome_id: uuid.UUID,
        customer_id: uuid.UUID,
        now: datetime,
    ) -> StoredRequest | None:
        """Binds the key to this request's fingerprint and outcome id, before
        anything is written; None when claimed now, else what the key was
        bound to before (its interaction_id '' while that request is pending
        or died between its writes)."""
        async with self.pool.acquire() as connection:
            status = await connection.execute(
                CLAIM_KEY, idempotency_key, request_sha256, outcome_id, customer_id, now
            )
            if status.endswith(" 1"):
                return None
            row = await connection.fetchrow(FIND_KEY, idempotency_key)
        assert row is not None  # (claimed by a committed request)
        return StoredRequest(**dict(row))

    async def record(self, outcome: NewOutcome, idempotency_key: str = "") -> bool:
        """Records `outcome` (and tells the contact ledger, for a proposed
        action), completing its key's claim when given. False when this
        outcome id was recorded already (a concurrent request with the same
        key and request did it). DecisionGone when the decision is no longer
        logged."""
        async with self.pool.acquire() as connection, connection.transaction():
            if await connection.fetchval(DECISION_STILL_LOGGED, outcome.decision_id) is None:
                raise DecisionGone(outcome.decision_id)
            values = [getattr(outcome, c) for c in COLUMNS]
            values[COLUMNS.index("attributes")] = {
                name: to_tagged(value) for name, value in outcome.attributes.items()
            }
            status = await connection.execute(INSERT_OUTCOME, *values)
            if status.endswith(" 0"):
                return False
            if idempotency_key:
                await connection.execute(COMPLETE_KEY, idempotency_key, outcome.interaction_id)
            if self.ledger is not None and outcome.arm == ARM_TREATMENT:
                await self.ledger.mark_outcome(
                    connection,
                    outcome.decision_id,
                    outcome.action_id,
                    outcome.outcome,
                    outcome.occurred_at,
                )
        return True

    async def for_decisions(
        self, conn: Connection, decision_ids: Sequence[str]
    ) -> dict[str, list[StoredOutcome]]:
        """The outcomes of each decision, in the order they happened (the
        decisions store reads them for `Decision.outcomes`)."""
        rows = await conn.fetch(FOR_DECISIONS, list(decision_ids))
        found: dict[str, list[StoredOutcome]] = {}
        for row in rows:
            found.setdefault(row["decision_id"], []).append(_stored(row))
        return found

    async def for_report(self, since: datetime, policy_version: str | None) -> list[StoredOutcome]:
        """Outcomes of decisions made since `since` (of one policy version)."""
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(FOR_REPORT, since, policy_version)
        return [_stored(r) for r in rows]

    async def decision_bodies(
        self, since: datetime, policy_version: str | None
    ) -> AsyncIterator[bytes]:
        """The stored Decision messages made since `since`, read through a
        cursor (a year of decisions need not fit in memory at once)."""
        async with self.pool.acquire() as connection, connection.transaction():
            async for row in connection.cursor(DECISION_BODIES, since, policy_version):
                yield bytes(row["body"])

    async def erase(self, conn: Connection, customer_ids: Sequence[str]) -> dict[str, int]:
        """Deletes the customers' outcomes and idempotency keys (kind -> rows)."""
        ids = [uuid.UUID(c) for c in customer_ids]
        outcomes = await conn.execute(ERASE_OUTCOMES, ids)
        requests = await conn.execute(ERASE_REQUESTS, ids)
        return {"outcomes": _count(outcomes), "outcome_requests": _count(requests)}

    async def export(self, customer_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The customers' outcomes and RecordOutcome keys as JSON-able records
        (kind -> records)."""
        ids = [uuid.UUID(c) for c in customer_ids]
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(EXPORT, ids)
            # The idempotency keys are erased with the customer, so shown too.
            requests = await connection.fetch(EXPORT_REQUESTS, ids)
        return {
            "outcomes": [_jsonable(asdict(_stored(r))) for r in rows],
            "outcome_requests": [_jsonable(dict(r)) for r in requests],
        }


def _stored(row: asyncpg.Record) -> StoredOutcome:
    fields = {name: row[name] for name in COLUMNS}
    fields["attributes"] = {name: from_tagged(v) for name, v in row["attributes"].items()}
    return StoredOutcome(**fields)


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in record.items():
        if key == "attributes":
            out[key] = {name: to_tagged(v) for name, v in value.items()}
        elif isinstance(value, datetime):
            out[key] = value.isoformat()
        elif isinstance(value, uuid.UUID | Decimal):
            out[key] = str(value)
        else:
            out[key] = value
    return out


def _count(status: str) -> int:
    # "DELETE 12"
    return int(status.rsplit(" ", 1)[-1])

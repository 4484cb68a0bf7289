"""All SQL of the scoring service: the sampled prediction log (migration
0002). Rows leave as frozen dataclasses."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

FeatureValues = Mapping[str, float | str | None]


@dataclass(frozen=True)
class LoggedPrediction:
    """One prediction of a sampled Score answer, as written."""

    score_id: str
    position: int
    customer_id: uuid.UUID
    prediction: str
    ticket_id: str
    product_id: str
    model_name: str
    model_version: str
    features: FeatureValues
    probability: float
    band: str
    channel: str
    scored_at: datetime


@dataclass(frozen=True)
class StoredPrediction(LoggedPrediction):
    """A logged prediction read back, with its place in the log."""

    seq: int = 0


@dataclass(frozen=True)
class WindowRow:
    """What a drift report reads of one logged prediction."""

    features: FeatureValues
    probability: float


COLUMNS = (
    "score_id",
    "position",
    "customer_id",
    "prediction",
    "ticket_id",
    "product_id",
    "model_name",
    "model_version",
    "features",
    "probability",
    "band",
    "channel",
    "scored_at",
)

WINDOW = """
SELECT features, probability FROM prediction_log
WHERE prediction = $1 AND model_version = $2 AND scored_at >= $3 AND scored_at < $4
ORDER BY scored_at DESC
LIMIT $5
"""
# Writers take it shared, erasures exclusive: an erasure waits for batches
# being written and every later batch sees its tombstones.
WRITE_LOCK = int.from_bytes(
    hashlib.sha256(b"converge:scoring:prediction_log").digest()[:8], "big", signed=True
)
LOCK_SHARED = "SELECT pg_advisory_xact_lock_shared($1)"
LOCK_EXCLUSIVE = "SELECT pg_advisory_xact_lock($1)"
DROP_ERASED = """
DELETE FROM prediction_log
WHERE customer_id = ANY($1::uuid[])
  AND customer_id IN (SELECT customer_id FROM erased_customers)
"""
TOMBSTONE = """
INSERT INTO erased_customers (customer_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING
"""
ERASE = "DELETE FROM prediction_log WHERE customer_id = ANY($1::uuid[])"
EXPORT_PAGE = f"""
SELECT seq, {", ".join(COLUMNS)} FROM prediction_log
WHERE customer_id = ANY($1::uuid[]) AND seq > $2
ORDER BY seq
LIMIT $3
"""
PURGE = "DELETE FROM prediction_log WHERE scored_at < $1"
EXPORT_CHUNK = 200


class ScoringStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def append(self, rows: Sequence[LoggedPrediction]) -> None:
        """Writes `rows` in one COPY, less those of customers erased meanwhile."""
        if not rows:
            return
        records = [
            (
                r.score_id,
                r.position,
                r.customer_id,
                r.prediction,
                r.ticket_id,
                r.product_id,
                r.model_name,
                r.model_version,
                dict(r.features),
                r.probability,
                r.band,
                r.channel,
                r.scored_at,
            )
            for r in rows
        ]
        customers = list({r.customer_id for r in rows})
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(LOCK_SHARED, WRITE_LOCK)
            await connection.copy_records_to_table(
                "prediction_log", columns=COLUMNS, records=records
            )
            await connection.execute(DROP_ERASED, customers)

    async def window(
        self, prediction: str, model_version: str, start: datetime, end: datetime, limit: int
    ) -> list[WindowRow]:
        """The newest `limit` logged predictions of one version in [start, end)."""
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(WINDOW, prediction, model_version, start, end, limit)
        return [WindowRow(r["features"], r["probability"]) for r in rows]

    async def erase(self, customer_ids: Sequence[uuid.UUID]) -> int:
        """Deletes the customers' logged predictions, and keeps their ids so
        that no batch written later brings any back; how many there were."""
        ids = list(customer_ids)
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(LOCK_EXCLUSIVE, WRITE_LOCK)
            await connection.execute(TOMBSTONE, ids)
            status = await connection.execute(ERASE, ids)
        return _count(status)

    async def export(
        self, customer_ids: Sequence[uuid.UUID], after_seq: int
    ) -> AsyncIterator[StoredPrediction]:
        """The customers' logged predictions after `after_seq`, by seq, read a
        chunk at a time (a caller may stop at any row)."""
        ids = list(customer_ids)
        while True:
            async with self.pool.acquire() as connection:
                rows = await connection.fetch(EXPORT_PAGE, ids, after_seq, EXPORT_CHUNK)
            for row in rows:
                yield _stored(row)
            if len(rows) < EXPORT_CHUNK:
                return
            after_seq = rows[-1]["seq"]

    async def purge(self, before: datetime) -> int:
        """Deletes what was scored before `before`; how many rows."""
        async with self.pool.acquire() as connection:
            status = await connection.execute(PURGE, before)
        return _count(status)


def _stored(row: asyncpg.Record) -> StoredPrediction:
    return StoredPrediction(**{name: row[name] for name in COLUMNS}, seq=row["seq"])


def _count(status: str) -> int:
    # "DELETE 12"
    return int(status.rsplit(" ", 1)[-1])

"""All SQL of webhooks (migrations 0006 and 0008): the registered webhooks, their
deliveries (the outbox the alerts area fills with `enqueue`, inside its own
transaction) and dead letters. Rows leave as frozen dataclasses."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from converge.recommendation.outbox import OutboxEvent
from converge.runtime.database import Connection

# Every replica's dispatcher LISTENs on this channel; `enqueue` notifies it,
# and PostgreSQL delivers the notification when the alert transaction
# commits (never before, never for a rolled-back one).
NOTIFY_CHANNEL = "converge_webhook_deliveries"


@dataclass(frozen=True)
class WebhookRow:
    webhook_id: str
    team: str
    url: str
    secret_id: str
    kinds: tuple[str, ...]
    created_at: datetime
    created_by_name: str
    created_by_reason: str
    # The fingerprint CreateWebhook's idempotency key is bound to; None
    # without a key, or for a webhook created before migration 0008.
    request_sha256: bytes | None = None


@dataclass(frozen=True)
class NewWebhook:
    team: str
    url: str
    secret_id: str
    kinds: tuple[str, ...]
    created_at: datetime
    created_by_name: str
    created_by_reason: str
    idempotency_key: str
    request_sha256: bytes = b""


@dataclass(frozen=True)
class Deletion:
    """What DeleteWebhook did under its idempotency key: the webhook, the
    pending deliveries dropped, and the fingerprint the key is bound to (the
    caller's own on a first request; the first request's on a repeat, when
    nothing was done again)."""

    webhook_id: str
    dropped_deliveries: int
    request_sha256: bytes


@dataclass(frozen=True)
class ClaimedDelivery:
    """A delivery claimed for one attempt: `attempts` counts this one."""

    delivery_id: str
    webhook_id: str
    event_id: str
    body: bytes
    attempts: int
    url: str
    secret_id: str


@dataclass(frozen=True)
class DeliveryRow:
    """A delivery as stored (a dead letter when `state` is "dead")."""

    delivery_id: str
    webhook_id: str
    event_id: str
    team: str
    kind: str
    alert_id: str
    customer_id: str
    body: bytes
    occurred_at: datetime
    state: str
    attempts: int
    first_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status: int
    last_error: str
    delivered_at: datetime | None
    dead_seq: int | None
    url: str
    secret_id: str


@dataclass(frozen=True)
class Redelivery:
    """A RedeliverDeadLetter result kept under its idempotency key."""

    delivery_id: str
    delivered: bool
    http_status: int
    # None for a result kept before migration 0008.
    request_sha256: bytes | None = None


@dataclass(frozen=True)
class RedeliveryAttempt:
    """What `redeliver` did: `dead` is the row before the attempt (None when
    there is no such dead letter); `earlier` is the result already kept under
    the idempotency key, when there was one (then nothing was attempted)."""

    dead: DeliveryRow | None
    delivered: bool = False
    http_status: int = 0
    error: str = ""
    earlier: Redelivery | None = None


_WEBHOOK_COLUMNS = (
    "webhook_id, team, url, secret_id, kinds, created_at, created_by_name, created_by_reason,"
    " request_sha256"
)

INSERT_WEBHOOK = f"""
INSERT INTO webhooks (webhook_id, team, url, secret_id, kinds, created_at, created_by_name,
                      created_by_reason, idempotency_key, request_sha256)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING {_WEBHOOK_COLUMNS}
"""
WEBHOOK_BY_KEY = f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE idempotency_key = $1"
LIST_WEBHOOKS = f"""
SELECT {_WEBHOOK_COLUMNS} FROM webhooks
WHERE deleted_at IS NULL AND ($1 = '' OR team = $1)
  AND (created_at, webhook_id) > ($2, $3)
ORDER BY created_at, webhook_id
LIMIT $4
"""
DELETE_WEBHOOK = """
UPDATE webhooks SET deleted_at = $2, deleted_reason = $3
WHERE webhook_id = $1 AND deleted_at IS NULL
"""
DROP_PENDING = "DELETE FROM webhook_deliveries WHERE webhook_id = $1 AND state = 'pending'"
# Binds DeleteWebhook's key first: a concurrent request with the same key
# waits on the primary key until this transaction ends, then finds it.
CLAIM_DELETION_KEY = """
INSERT INTO webhook_deletions (idempotency_key, webhook_id, request_sha256, dropped_deliveries,
                               deleted_at)
VALUES ($1, $2, $3, 0, $4)
ON CONFLICT (idempotency_key) DO NOTHING
RETURNING 1
"""
DELETION_BY_KEY = """
SELECT webhook_id, request_sha256, dropped_deliveries FROM webhook_deletions
WHERE idempotency_key = $1
"""
KEEP_DELETION = "UPDATE webhook_deletions SET dropped_deliveries = $2 WHERE idempotency_key = $1"

# One delivery per (event, webhook of the event's team that takes its kind);
# an event enqueued again adds nothing (the unique key), so a delivery id
# never carries two bodies.
ENQUEUE = """
WITH inserted AS (
    INSERT INTO webhook_deliveries (webhook_id, event_id, team, kind, alert_id, customer_id,
                                    body, occurred_at)
    SELECT w.webhook_id, e.event_id, e.team, e.kind, e.alert_id, e.customer_id, e.body,
           e.occurred_at
    FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::bytea[],
                $7::timestamptz[])
         AS e(event_id, team, kind, alert_id, customer_id, body, occurred_at)
    JOIN webhooks w ON w.team = e.team AND w.deleted_at IS NULL
                   AND (cardinality(w.kinds) = 0 OR e.kind = ANY (w.kinds))
    ON CONFLICT (event_id, webhook_id) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM inserted
"""
NOTIFY = "SELECT pg_notify($1, '')"

# Claims due deliveries for one attempt each. SKIP LOCKED lets replicas share
# the work; the claim itself moves `due_at` past the attempt's lease, so the
# row is free again (for another claim) only if this replica never records a
# result.
CLAIM = """
WITH due AS (
    SELECT delivery_id FROM webhook_deliveries
    WHERE state = 'pending' AND due_at <= $1
    ORDER BY due_at, seq
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries d
SET attempts = d.attempts + 1,
    due_at = $1 + make_interval(secs => $3),
    first_attempt_at = coalesce(d.first_attempt_at, $1),
    last_attempt_at = $1
FROM due, webhooks w
WHERE d.delivery_id = due.delivery_id AND w.webhook_id = d.webhook_id
RETURNING d.delivery_id, d.webhook_id, d.event_id, d.body, d.attempts, w.url, w.secret_id
"""
# Results apply only to the attempt that was claimed (same attempt count,
# still pending): a late answer after the lease ran out and another replica
# claimed the delivery again changes nothing.
MARK_DELIVERED = """
UPDATE webhook_deliveries
SET state = 'delivered', delivered_at = $3, last_status = $4, last_error = ''
WHERE delivery_id = $1 AND attempts = $2 AND state = 'pending'
"""
MARK_RETRY = """
UPDATE webhook_deliveries
SET due_at = $3, last_status = $4, last_error = $5
WHERE delivery_id = $1 AND attempts = $2 AND state = 'pending'
"""
MARK_DEAD = """
UPDATE webhook_deliveries
SET state = 'dead', dead_at = $3, dead_seq = nextval('webhook_dead_letter_seq'),
    last_status = $4, last_error = $5
WHERE delivery_id = $1 AND attempts = $2 AND state = 'pending'
"""
# 410 Gone: the webhook stops (the specification), and what was pending for
# it becomes dead letters, kept for an operator rather than dropped unseen.
GONE_WEBHOOK = """
UPDATE webhooks SET deleted_at = $2, deleted_reason = 'gone'
WHERE webhook_id = $1 AND deleted_at IS NULL
"""
GONE_PENDING = """
UPDATE webhook_deliveries
SET state = 'dead', dead_at = $2, dead_seq = nextval('webhook_dead_letter_seq'),
    last_error = CASE WHEN last_error = '' THEN $3 ELSE last_error END
WHERE webhook_id = $1 AND state = 'pending'
"""

_DELIVERY_COLUMNS = """
d.delivery_id, d.webhook_id, d.event_id, d.team, d.kind, d.alert_id, d.customer_id, d.body,
d.occurred_at, d.state, d.attempts, d.first_attempt_at, d.last_attempt_at, d.last_status,
d.last_error, d.delivered_at, d.dead_seq, w.url, w.secret_id
"""
LIST_DEAD = f"""
SELECT {_DELIVERY_COLUMNS}
FROM webhook_deliveries d JOIN webhooks w USING (webhook_id)
WHERE d.state = 'dead' AND ($1 = '' OR d.team = $1) AND ($2::uuid IS NULL OR d.webhook_id = $2)
  AND d.dead_seq < $3
ORDER BY d.dead_seq DESC
LIMIT $4
"""
DELIVERY = f"""
SELECT {_DELIVERY_COLUMNS}
FROM webhook_deliveries d JOIN webhooks w USING (webhook_id)
WHERE d.delivery_id = $1
"""
LOCK_DEAD = f"""
SELECT {_DELIVERY_COLUMNS}
FROM webhook_deliveries d JOIN webhooks w USING (webhook_id)
WHERE d.delivery_id = $1 AND d.state = 'dead'
FOR UPDATE OF d
"""
REDELIVERED = """
UPDATE webhook_deliveries
SET state = 'delivered', delivered_at = $2, last_status = $3, last_error = '',
    attempts = attempts + 1, last_attempt_at = $2, dead_seq = NULL
WHERE delivery_id = $1
"""
REDELIVERY_FAILED = """
UPDATE webhook_deliveries
SET attempts = attempts + 1, last_attempt_at = $2, last_status = $3, last_error = $4
WHERE delivery_id = $1
"""
REDELIVERY_BY_KEY = """
SELECT delivery_id, delivered, http_status, request_sha256 FROM webhook_redeliveries
WHERE idempotency_key = $1
"""
# Serialises the requests of one RedeliverDeadLetter key (two of them on
# different dead letters hold no common row lock) until the first commits.
LOCK_REDELIVERY_KEY = (
    "SELECT pg_advisory_xact_lock(hashtextextended('webhook_redeliveries/' || $1, 0))"
)
KEEP_REDELIVERY = """
INSERT INTO webhook_redeliveries (idempotency_key, delivery_id, delivered, http_status,
                                  attempted_at, request_sha256)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (idempotency_key) DO NOTHING
"""

ERASE_PENDING_DELIVERED = """
DELETE FROM webhook_deliveries WHERE customer_id = ANY ($1::text[]) AND state <> 'dead'
"""
ERASE_DEAD = """
DELETE FROM webhook_deliveries WHERE customer_id = ANY ($1::text[]) AND state = 'dead'
"""
EXPORT = f"""
SELECT {_DELIVERY_COLUMNS}
FROM webhook_deliveries d JOIN webhooks w USING (webhook_id)
WHERE d.customer_id = ANY ($1::text[])
ORDER BY d.seq
"""
PURGE_DELIVERED = """
DELETE FROM webhook_deliveries WHERE state = 'delivered' AND delivered_at < $1
"""
PURGE_DEAD = "DELETE FROM webhook_deliveries WHERE state = 'dead' AND dead_at < $1"
PURGE_REDELIVERIES = "DELETE FROM webhook_redeliveries WHERE attempted_at < $1"
PURGE_DELETIONS = "DELETE FROM webhook_deletions WHERE deleted_at < $1"

# Sorts before any page start: (created_at, webhook_id) of a first page.
_FIRST_PAGE = (datetime(1900, 1, 1, tzinfo=UTC), uuid.UUID(int=0))


def _webhook(row: asyncpg.Record) -> WebhookRow:
    return WebhookRow(
        webhook_id=str(row["webhook_id"]),
        team=row["team"],
        url=row["url"],
        secret_id=row["secret_id"],
        kinds=tuple(row["kinds"]),
        created_at=row["created_at"],
        created_by_name=row["created_by_name"],
        created_by_reason=row["created_by_reason"],
        request_sha256=_bytes_or_none(row["request_sha256"]),
    )


def _bytes_or_none(value: bytes | None) -> bytes | None:
    return bytes(value) if value is not None else None


def _redelivery(row: asyncpg.Record) -> Redelivery:
    return Redelivery(
        str(row["delivery_id"]),
        row["delivered"],
        row["http_status"],
        _bytes_or_none(row["request_sha256"]),
    )


def _delivery(row: asyncpg.Record) -> DeliveryRow:
    return DeliveryRow(
        delivery_id=str(row["delivery_id"]),
        webhook_id=str(row["webhook_id"]),
        event_id=row["event_id"],
        team=row["team"],
        kind=row["kind"],
        alert_id=row["alert_id"],
        customer_id=row["customer_id"],
        body=bytes(row["body"]),
        occurred_at=row["occurred_at"],
        state=row["state"],
        attempts=row["attempts"],
        first_attempt_at=row["first_attempt_at"],
        last_attempt_at=row["last_attempt_at"],
        last_status=row["last_status"],
        last_error=row["last_error"],
        delivered_at=row["delivered_at"],
        dead_seq=row["dead_seq"],
        url=row["url"],
        secret_id=row["secret_id"],
    )


class WebhookStore:
    """Webhooks, deliveries and dead letters in the service's schema."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    # -- The outbox (called by the alerts area inside its transaction).

    @staticmethod
    async def enqueue(conn: Connection, events: Sequence[OutboxEvent]) -> int:
        """Adds one pending delivery per (event, live webhook of the event's
        team that takes its kind), on the caller's connection and inside the
        caller's transaction, so the deliveries commit (or roll back) with the
        alert events. An event already enqueued for a webhook adds nothing.
        Returns the deliveries added. Wakes the dispatchers at commit."""
        if not events:
            return 0
        added: int = await conn.fetchval(
            ENQUEUE,
            [e.event_id for e in events],
            [e.team for e in events],
            [e.kind for e in events],
            [e.alert_id for e in events],
            [e.customer_id for e in events],
            [e.body for e in events],
            [e.occurred_at for e in events],
        )
        if added:
            await conn.execute(NOTIFY, NOTIFY_CHANNEL)
        return added

    # -- Webhooks.

    async def create_webhook(self, webhook: NewWebhook) -> WebhookRow:
        """Inserts the webhook; with an idempotency key already used, returns
        the webhook that key created (its `request_sha256` tells the caller
        whether it was this request)."""
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(
                INSERT_WEBHOOK,
                uuid.uuid4(),
                webhook.team,
                webhook.url,
                webhook.secret_id,
                list(webhook.kinds),
                webhook.created_at,
                webhook.created_by_name,
                webhook.created_by_reason,
                webhook.idempotency_key or None,
                webhook.request_sha256 if webhook.idempotency_key else None,
            )
            if row is None:
                row = await conn.fetchrow(WEBHOOK_BY_KEY, webhook.idempotency_key)
        assert row is not None
        return _webhook(row)

    async def list_webhooks(
        self, team: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[WebhookRow]:
        """Live webhooks, oldest first, after the page position `after`."""
        created, webhook_id = (after[0], uuid.UUID(after[1])) if after is not None else _FIRST_PAGE
        rows = await self.pool.fetch(LIST_WEBHOOKS, team, created, webhook_id, limit)
        return [_webhook(row) for row in rows]

    async def delete_webhook(
        self,
        webhook_id: str,
        now: datetime,
        idempotency_key: str = "",
        request_sha256: bytes = b"",
    ) -> Deletion:
        """Marks the webhook deleted and drops its pending deliveries (dead
        letters stay). Deleting a deleted or unknown webhook changes nothing.
        With an idempotency key already used, does nothing and returns what
        that key's request did (and the fingerprint it is bound to)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if idempotency_key:
                claimed = await conn.fetchval(
                    CLAIM_DELETION_KEY, idempotency_key, uuid.UUID(webhook_id), request_sha256, now
                )
                if claimed is None:
                    earlier = await conn.fetchrow(DELETION_BY_KEY, idempotency_key)
                    assert earlier is not None
                    return Deletion(
                        str(earlier["webhook_id"]),
                        earlier["dropped_deliveries"],
                        bytes(earlier["request_sha256"]),
                    )
            await conn.execute(DELETE_WEBHOOK, uuid.UUID(webhook_id), now, "deleted")
            status: str = await conn.execute(DROP_PENDING, uuid.UUID(webhook_id))
            dropped = int(status.split()[-1])
            if idempotency_key:
                await conn.execute(KEEP_DELETION, idempotency_key, dropped)
        return Deletion(webhook_id, dropped, request_sha256)

    # -- The dispatcher.

    async def listen(self, wake: Callable[[], None]) -> Callable[[], Awaitable[None]]:
        """Calls `wake()` whenever an enqueue commits, on any replica; returns
        the function that stops listening. Holds one pooled connection."""
        conn = await self.pool.acquire()

        def notified(*_: object) -> None:
            wake()

        try:
            await conn.add_listener(NOTIFY_CHANNEL, notified)
        except BaseException:
            await self.pool.release(conn)
            raise

        async def stop() -> None:
            try:
                await conn.remove_listener(NOTIFY_CHANNEL, notified)
            finally:
                await self.pool.release(conn)

        return stop

    async def claim(self, now: datetime, limit: int, lease_s: float) -> list[ClaimedDelivery]:
        rows = await self.pool.fetch(CLAIM, now, limit, lease_s)
        return [
            ClaimedDelivery(
                delivery_id=str(row["delivery_id"]),
                webhook_id=str(row["webhook_id"]),
                event_id=row["event_id"],
                body=bytes(row["body"]),
                attempts=row["attempts"],
                url=row["url"],
                secret_id=row["secret_id"],
            )
            for row in rows
        ]

    async def mark_delivered(
        self, delivery: ClaimedDelivery, now: datetime, http_status: int
    ) -> bool:
        status: str = await self.pool.execute(
            MARK_DELIVERED, uuid.UUID(delivery.delivery_id), delivery.attempts, now, http_status
        )
        return status.endswith(" 1")

    async def mark_retry(
        self, delivery: ClaimedDelivery, due_at: datetime, http_status: int, error: str
    ) -> bool:
        status: str = await self.pool.execute(
            MARK_RETRY,
            uuid.UUID(delivery.delivery_id),
            delivery.attempts,
            due_at,
            http_status,
            error,
        )
        return status.endswith(" 1")

    async def mark_dead(
        self, delivery: ClaimedDelivery, now: datetime, http_status: int, error: str
    ) -> bool:
        status: str = await self.pool.execute(
            MARK_DEAD, uuid.UUID(delivery.delivery_id), delivery.attempts, now, http_status, error
        )
        return status.endswith(" 1")

    async def webhook_gone(
        self, delivery: ClaimedDelivery, now: datetime, http_status: int, error: str
    ) -> None:
        """The receiver answered 410 Gone: the webhook is deleted and this
        delivery and the others pending for it become dead letters."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                MARK_DEAD,
                uuid.UUID(delivery.delivery_id),
                delivery.attempts,
                now,
                http_status,
                error,
            )
            await conn.execute(GONE_WEBHOOK, uuid.UUID(delivery.webhook_id), now)
            await conn.execute(
                GONE_PENDING,
                uuid.UUID(delivery.webhook_id),
                now,
                "not attempted: the webhook answered 410 Gone and was disabled",
            )

    # -- Dead letters.

    async def list_dead_letters(
        self, team: str, webhook_id: str | None, before_seq: int | None, limit: int
    ) -> list[DeliveryRow]:
        rows = await self.pool.fetch(
            LIST_DEAD,
            team,
            uuid.UUID(webhook_id) if webhook_id else None,
            before_seq if before_seq is not None else 2**63 - 1,
            limit,
        )
        return [_delivery(row) for row in rows]

    async def delivery(self, delivery_id: str) -> DeliveryRow | None:
        row = await self.pool.fetchrow(DELIVERY, uuid.UUID(delivery_id))
        return _delivery(row) if row is not None else None

    async def redeliver(
        self,
        delivery_id: str,
        attempt: Callable[[DeliveryRow], Awaitable[tuple[bool, int, str]]],
        now: Callable[[], datetime],
        idempotency_key: str,
        request_sha256: bytes = b"",
    ) -> RedeliveryAttempt:
        """Holds the dead letter (row lock, so two redeliveries of it do not
        both post), runs `await attempt(row)` -> (delivered, http_status,
        error), and records the result, with the idempotency key and the
        request's fingerprint: delivered leaves the dead-letter list. A key
        already used (looked up under a lock on the key, so two concurrent
        requests with it never both post) attempts nothing and returns the
        kept result as `earlier`."""
        async with self.pool.acquire() as conn, conn.transaction():
            if idempotency_key:
                await conn.execute(LOCK_REDELIVERY_KEY, idempotency_key)
                kept = await conn.fetchrow(REDELIVERY_BY_KEY, idempotency_key)
                if kept is not None:
                    return RedeliveryAttempt(None, earlier=_redelivery(kept))
            row = await conn.fetchrow(LOCK_DEAD, uuid.UUID(delivery_id))
            if row is None:
                return RedeliveryAttempt(None)
            dead = _delivery(row)
            delivered, http_status, error = await attempt(dead)
            at = now()
            if delivered:
                await conn.execute(REDELIVERED, uuid.UUID(delivery_id), at, http_status)
            else:
                await conn.execute(
                    REDELIVERY_FAILED, uuid.UUID(delivery_id), at, http_status, error
                )
            if idempotency_key:
                await conn.execute(
                    KEEP_REDELIVERY,
                    idempotency_key,
                    uuid.UUID(delivery_id),
                    delivered,
                    http_status,
                    at,
                    request_sha256,
                )
        return RedeliveryAttempt(dead, delivered, http_status, error)

    # -- Data subjects and retention.

    async def erase(self, conn: Connection, customer_ids: Sequence[str]) -> dict[str, int]:
        """Deletes the customers' deliveries and dead letters (kind -> rows)."""
        ids = list(customer_ids)
        delivered: str = await conn.execute(ERASE_PENDING_DELIVERED, ids)
        dead: str = await conn.execute(ERASE_DEAD, ids)
        return {
            "webhook_deliveries": int(delivered.split()[-1]),
            "webhook_dead_letters": int(dead.split()[-1]),
        }

    async def export(self, customer_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        """The customers' deliveries and dead letters as JSON-able records."""
        rows = [_delivery(row) for row in await self.pool.fetch(EXPORT, list(customer_ids))]

        def record(row: DeliveryRow) -> dict[str, Any]:
            return {
                "delivery_id": row.delivery_id,
                "webhook_id": row.webhook_id,
                "event_id": row.event_id,
                "team": row.team,
                "kind": row.kind,
                "alert_id": row.alert_id,
                "customer_id": row.customer_id,
                "body": row.body.decode(),
                "state": row.state,
                "attempts": row.attempts,
                "occurred_at": row.occurred_at.isoformat(),
                "last_attempt_at": row.last_attempt_at.isoformat() if row.last_attempt_at else None,
                "last_error": row.last_error,
            }

        return {
            "webhook_deliveries": [record(r) for r in rows if r.state != "dead"],
            "webhook_dead_letters": [record(r) for r in rows if r.state == "dead"],
        }

    async def purge(self, delivered_before: datetime, dead_before: datetime) -> tuple[int, int]:
        """Removes delivered deliveries and dead letters past their horizons."""
        async with self.pool.acquire() as conn:
            delivered: str = await conn.execute(PURGE_DELIVERED, delivered_before)
            dead: str = await conn.execute(PURGE_DEAD, dead_before)
            await conn.execute(PURGE_REDELIVERIES, dead_before)
            await conn.execute(PURGE_DELETIONS, dead_before)
        return int(delivered.split()[-1]), int(dead.split()[-1])

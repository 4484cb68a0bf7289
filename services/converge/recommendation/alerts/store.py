"""All SQL of alerts (migration 0005): the alerts, their outbox of events
(`alert_events`, ordered by writing transaction), the follower's cursor, the
lifecycle's idempotency keys and the erased customers' tombstones.

What makes an alert "once only" lives here: a batch of the change stream is
applied in one transaction with the cursor it ends at (a crash replays the
batch or nothing of it), a live alert is unique per dedup key (a partial
unique index), and every event is written in the transaction that changes
the alert, with its webhook deliveries (the transactional outbox)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from converge.recommendation.alerts.service import (
    CREATED,
    LIVE,
    STATUS_CHANGED,
    UPDATED,
    AlertState,
    Assessment,
    Candidate,
    DecisionDraft,
    Reason,
    key_bound_elsewhere,
    key_reused,
)
from converge.recommendation.decisions.store import DecisionRecord
from converge.recommendation.outbox import OutboxEvent
from converge.runtime.database import Connection
from converge.runtime.errors import NotFound

logger = logging.getLogger(__name__)

EVENTS_CHANNEL = "converge_alert_events"
# The key of the session lock the leading follower holds (one follower at a time).
FOLLOWER_LOCK = "converge:recommendation:alerts-follower"
DUE_LOCK = "converge:recommendation:alerts-due-work"

_LIVE = list(LIVE)
NOT_ACTIONABLE = 3  # AlertDismissReason

SAVED_CURSOR = "SELECT cursor FROM alert_stream_cursor"
SAVE_CURSOR = """
INSERT INTO alert_stream_cursor (singleton, cursor, updated_at) VALUES (true, $1, $2)
ON CONFLICT (singleton) DO UPDATE SET cursor = EXCLUDED.cursor, updated_at = EXCLUDED.updated_at
"""
ERASED = "SELECT customer_id FROM alert_erased_customers WHERE customer_id = ANY($1::uuid[])"
LIVE_BY_KEY = "SELECT * FROM alerts WHERE dedup_key = $1 AND status = ANY($2::text[]) FOR UPDATE"
DISMISSED_SINCE = """
SELECT 1 FROM alerts WHERE dedup_key = $1 AND status = 'dismissed' AND updated_at > $2 LIMIT 1
"""
OPEN_ESCALATION = """
SELECT customer_id, max(probability) AS probability FROM alerts
WHERE customer_id = ANY($1::uuid[]) AND kind = 'escalation_risk' AND status = ANY($2::text[])
GROUP BY customer_id
"""
# The live alerts among a batch's keys, locked: only keys found here can be
# folded into, resolved or withdrawn (one query, not one per key).
LIVE_KEYS = """
SELECT dedup_key FROM alerts WHERE dedup_key = ANY($1::text[]) AND status = ANY($2::text[])
FOR UPDATE
"""
ANNOUNCED_SINCE = "SELECT count(*) FROM alerts WHERE team = $1 AND announced_at >= $2"
INSERT_ALERT = """
INSERT INTO alerts (alert_id, kind, team, customer_id, ticket_id, product_id, dedup_key, status,
                    probability, risk_band, reasons, expected_value, priority, action_name,
                    decision_id, policy_version, due_by, expires_at, created_at, updated_at,
                    announced_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19,
        $19, $20)
"""
FOLD_ALERT = """
UPDATE alerts SET probability = $2, risk_band = $3, reasons = $4, expected_value = $5,
                  priority = $6, decision_id = $7, policy_version = $8,
                  occurrences = occurrences + 1, updated_at = $9
WHERE alert_id = $1
"""
SET_STATUS = """
UPDATE alerts SET status = $2, assignee = $3, status_note = $4, dismiss_reason = $5,
                  updated_at = $6
WHERE alert_id = $1
"""
# The event row carries the alert as it is after the change (to_jsonb of the
# row), so a subscriber replaying the stream sees each alert as it was then.
INSERT_EVENT = """
WITH written AS (
    INSERT INTO alert_events (event_id, alert_id, customer_id, teams, kind, type, actor_name,
                              actor_reason, occurred_at, alert)
    SELECT $2, a.alert_id, a.customer_id,
           CASE WHEN a.escalated_to_team = '' THEN ARRAY[a.team]
                ELSE ARRAY[a.team, a.escalated_to_team] END,
           a.kind, $3, $4, $5, $6, to_jsonb(a)
    FROM alerts a WHERE a.alert_id = $1
    RETURNING *
)
UPDATE alerts a SET last_cursor = w.xid::text || '.' || w.seq::text
FROM written w WHERE a.alert_id = w.alert_id
RETURNING w.xid::text AS xid, w.seq, w.event_id, w.type, w.actor_name, w.actor_reason,
          w.occurred_at, w.alert, w.teams, w.kind, w.alert_id, w.customer_id
"""
GET_ALERT = "SELECT * FROM alerts WHERE alert_id = $1"
GET_ALERT_FOR_UPDATE = "SELECT * FROM alerts WHERE alert_id = $1 FOR UPDATE"
# Serialises the lifecycle requests of one idempotency key (two of them on
# different alerts hold no common row lock): the second waits for the first
# to commit and then finds its key, instead of failing on the primary key.
LOCK_REQUEST_KEY = "SELECT pg_advisory_xact_lock(hashtextextended('alert_requests/' || $1, 0))"
REQUEST_SEEN = """
SELECT alert_id, operation, request_sha256 FROM alert_requests WHERE idempotency_key = $1
"""
REMEMBER_REQUEST = """
INSERT INTO alert_requests (idempotency_key, alert_id, operation, customer_id, applied_at,
                            request_sha256)
VALUES ($1, $2, $3, $4, $5, $6)
"""
OVERDUE = """
SELECT * FROM alerts WHERE status = 'open' AND due_by <= $1 ORDER BY due_by LIMIT 500
FOR UPDATE SKIP LOCKED
"""
ESCALATE = """
UPDATE alerts SET status = 'escalated', escalated_to_team = $2, updated_at = $3 WHERE alert_id = $1
"""
EXPIRED_WAITING = """
UPDATE alerts SET status = 'expired', updated_at = $1
WHERE status = 'waiting' AND expires_at <= $1 RETURNING alert_id
"""
WAITING_OF_TEAM = """
SELECT * FROM alerts WHERE team = $1 AND status = 'waiting'
ORDER BY expected_value DESC, created_at LIMIT $2 FOR UPDATE SKIP LOCKED
"""
TEAMS_WAITING = "SELECT DISTINCT team FROM alerts WHERE status = 'waiting'"
ANNOUNCE = """
UPDATE alerts SET status = 'open', announced_at = $2, due_by = $3, updated_at = $2
WHERE alert_id = $1
"""
# Events a team sees after a position, deliverable ones only (transactions
# older than every one still running: see migration 0005).
EVENTS_AFTER = """
SELECT xid::text AS xid, seq, event_id, type, actor_name, actor_reason, occurred_at, alert
FROM alert_events
WHERE (xid, seq) > ($1::text::xid8, $2::bigint)
  AND xid < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
  AND $3 = ANY(teams)
  AND (cardinality($4::text[]) = 0 OR kind = ANY($4::text[]))
ORDER BY xid, seq
LIMIT $5
"""
# Whether events after a position exist that are not deliverable yet (their
# transaction, or an older one, still runs): the reader then looks again
# shortly, as nothing will notify when that older transaction ends.
PENDING_AFTER = """
SELECT EXISTS (
    SELECT 1 FROM alert_events
    WHERE (xid, seq) > ($1::text::xid8, $2::bigint)
      AND xid >= (SELECT pg_snapshot_xmin(pg_current_snapshot()))
      AND $3 = ANY(teams)
)
"""
EVENTS_HEAD = """
SELECT xid::text AS xid, seq FROM alert_events
WHERE xid < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
ORDER BY xid DESC, seq DESC LIMIT 1
"""
ERASE_ALERTS = "DELETE FROM alerts WHERE customer_id = ANY($1::uuid[])"
ERASE_EVENTS = "DELETE FROM alert_events WHERE customer_id = ANY($1::uuid[])"
ERASE_REQUESTS = "DELETE FROM alert_requests WHERE customer_id = ANY($1::uuid[])"
TOMBSTONES = """
INSERT INTO alert_erased_customers (customer_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING
"""
EXPORT_ALERTS = "SELECT to_jsonb(a) AS alert FROM alerts a WHERE customer_id = ANY($1::uuid[])"
EXPORT_EVENTS = """
SELECT event_id, alert_id, type, actor_name, occurred_at FROM alert_events
WHERE customer_id = ANY($1::uuid[]) ORDER BY occurred_at
"""
EXPORT_REQUESTS = """
SELECT idempotency_key, alert_id, operation, applied_at FROM alert_requests
WHERE customer_id = ANY($1::uuid[]) ORDER BY applied_at, idempotency_key
"""
PURGE_EVENTS = "DELETE FROM alert_events WHERE occurred_at < $1"
PURGE_ALERTS = """
DELETE FROM alerts WHERE updated_at < $1 AND status <> ALL($2::text[])
"""
PURGE_REQUESTS = "DELETE FROM alert_requests WHERE applied_at < $1"


@dataclass(frozen=True)
class AlertRow:
    """One alert as stored."""

    alert_id: uuid.UUID
    kind: str
    team: str
    customer_id: uuid.UUID
    ticket_id: str
    product_id: str
    dedup_key: str
    status: str
    probability: float
    risk_band: int
    reasons: tuple[Reason, ...]
    expected_value: Decimal
    priority: int
    action_name: str
    assignee: str
    occurrences: int
    decision_id: uuid.UUID
    policy_version: str
    due_by: datetime | None
    escalated_to_team: str
    status_note: str
    dismiss_reason: int
    expires_at: datetime | None
    created_at: datetime
    updated_at: datetime
    announced_at: datetime | None
    cursor: str


@dataclass(frozen=True)
class AlertEventRow:
    """One event of the outbox: what happened, and the alert after it."""

    cursor: str
    position: tuple[int, int]
    event_id: uuid.UUID
    type: int
    actor_name: str
    actor_reason: str
    occurred_at: datetime
    alert: AlertRow


@dataclass(frozen=True)
class ListFilter:
    team: str
    statuses: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    customer_id: uuid.UUID | None = None
    assignee: str = ""
    created_from: datetime | None = None
    created_to: datetime | None = None


@dataclass(frozen=True)
class TeamLimits:
    """What the store needs of a policy team (see policy.model.Team)."""

    daily_capacity: int | None
    day_start: datetime
    ack_deadline: timedelta | None
    lead_team: str | None


# Hands an event to the webhooks area inside the alert's transaction
# (webhooks.store.WebhookStore.enqueue); None until that area is wired.
Enqueue = Callable[[Connection, Sequence[OutboxEvent]], Any]
RecordDecision = Callable[[Connection, DecisionRecord], Awaitable[bool]]
# Turns an event into the body webhooks post (convert.py's proto3 JSON).
EventBody = Callable[["AlertEventRow"], bytes]


def _reasons_json(reasons: Sequence[Reason]) -> list[dict[str, object]]:
    return [
        {
            "code": r.code,
            "feature": r.feature,
            "value": r.value,
            "contribution": r.contribution,
            "text": r.text,
        }
        for r in reasons
    ]


def _reasons(value: Sequence[dict[str, Any]]) -> tuple[Reason, ...]:
    return tuple(
        Reason(
            str(r["code"]),
            str(r["feature"]),
            None if r.get("value") is None else float(r["value"]),
            float(r["contribution"]),
            str(r["text"]),
        )
        for r in value
    )


def _time(value: object) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


def _alert(row: asyncpg.Record | dict[str, Any]) -> AlertRow:
    """An alert from its table row, or from the row as JSON (an event's copy)."""
    created = _time(row["created_at"])
    updated = _time(row["updated_at"])
    assert created is not None and updated is not None
    return AlertRow(
        alert_id=uuid.UUID(str(row["alert_id"])),
        kind=row["kind"],
        team=row["team"],
        customer_id=uuid.UUID(str(row["customer_id"])),
        ticket_id=row["ticket_id"],
        product_id=row["product_id"],
        dedup_key=row["dedup_key"],
        status=row["status"],
        probability=float(row["probability"]),
        risk_band=int(row["risk_band"]),
        reasons=_reasons(row["reasons"]),
        expected_value=Decimal(str(row["expected_value"])),
        priority=int(row["priority"]),
        action_name=row["action_name"],
        assignee=row["assignee"],
        occurrences=int(row["occurrences"]),
        decision_id=uuid.UUID(str(row["decision_id"])),
        policy_version=row["policy_version"],
        due_by=_time(row["due_by"]),
        escalated_to_team=row["escalated_to_team"],
        status_note=row["status_note"],
        dismiss_reason=int(row["dismiss_reason"]),
        expires_at=_time(row["expires_at"]),
        created_at=created,
        updated_at=updated,
        announced_at=_time(row["announced_at"]),
        cursor=row["last_cursor"],
    )


def _event(row: asyncpg.Record) -> AlertEventRow:
    xid, seq = int(row["xid"]), int(row["seq"])
    alert = _alert(row["alert"])
    cursor = f"{xid}.{seq}"
    return AlertEventRow(
        cursor=cursor,
        position=(xid, seq),
        event_id=row["event_id"],
        type=int(row["type"]),
        actor_name=row["actor_name"],
        actor_reason=row["actor_reason"],
        occurred_at=row["occurred_at"],
        # The copy was taken before the event's own cursor was known.
        alert=AlertRow(**{**alert.__dict__, "cursor": cursor}),
    )


class Listener:
    """A connection out of the pool, listening for new alert events."""

    def __init__(self, connection: asyncpg.pool.PoolConnectionProxy, callback: Any) -> None:
        self.connection = connection
        self.callback = callback

    def is_closed(self) -> bool:
        return bool(self.connection.is_closed())


class AlertStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        # webhooks.store.WebhookStore.enqueue, set in app.py when the webhooks
        # area is wired; with it, `event_body` makes the posted body.
        self.enqueue: Enqueue | None = None
        self.event_body: EventBody | None = None
        # decisions.store.DecisionStore.insert, set in app.py.
        self.record_decision: RecordDecision | None = None

    # --- the follower ------------------------------------------------------------------
    async def saved_cursor(self) -> str:
        async with self.pool.acquire() as conn:
            value = await conn.fetchval(SAVED_CURSOR)
        return str(value) if value is not None else ""

    async def save_cursor(self, cursor: str, now: datetime) -> None:
        """Moves the cursor when a batch called for no change (the common case)."""
        async with self.pool.acquire() as conn:
            await conn.execute(SAVE_CURSOR, cursor, now)

    async def erased(self, customer_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(ERASED, list(customer_ids))
        return {r["customer_id"] for r in rows}

    async def open_escalation(self, customer_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, float]:
        """The highest probability of each customer's live escalation alerts."""
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(OPEN_ESCALATION, list(customer_ids), _LIVE)
        return {r["customer_id"]: float(r["probability"]) for r in rows}

    async def apply_batch(
        self,
        conn: Connection,
        cursor: str,
        assessments: Sequence[tuple[Assessment, DecisionDraft]],
        policy_version: str,
        teams: dict[str, TeamLimits],
        now: datetime,
    ) -> list[AlertEventRow]:
        """Applies what a batch of the change stream called for (each
        customer's assessment with the decision behind it) and saves the
        cursor the batch ends at, in one transaction: a crash loses or
        replays the whole batch, never part of it. `conn` is the follower's
        own (the one holding its leadership lock)."""
        events: list[AlertEventRow] = []
        async with conn.transaction():
            customers = list({c.customer_id for a, _ in assessments for c in a.raise_})
            erased = {r["customer_id"] for r in await conn.fetch(ERASED, customers)}
            # Ranked by expected value, so a team's capacity goes to the best.
            candidates = sorted(
                ((c, d) for a, d in assessments for c in a.raise_ if c.customer_id not in erased),
                key=lambda item: item[0].expected_value,
                reverse=True,
            )
            backed: dict[uuid.UUID, list[str]] = {}
            for candidate, draft in candidates:
                alert_id, event = await self._raise(
                    conn, candidate, draft.decision_id, policy_version, teams, now
                )
                if alert_id is not None:
                    backed.setdefault(draft.decision_id, []).append(str(alert_id))
                if event is not None:
                    events.append(event)
            # Every alert raised or updated is backed by a logged decision
            # (trigger INTERACTION), in the same transaction.
            if self.record_decision is not None:
                for _, draft in assessments:
                    alert_ids = backed.get(draft.decision_id)
                    if alert_ids:
                        await self.record_decision(
                            conn,
                            DecisionRecord(
                                decision_id=str(draft.decision_id),
                                customer_id=str(draft.customer_id),
                                decided_at=now,
                                trigger="interaction",
                                policy_version=policy_version,
                                body=draft.render(alert_ids, now),
                            ),
                        )
            closing = [k for a, _ in assessments for k in (*(k for k, _ in a.resolve), *a.withdraw)]
            live = {r["dedup_key"] for r in await conn.fetch(LIVE_KEYS, closing, _LIVE)}
            for assessment, _ in assessments:
                for key, probability in assessment.resolve:
                    if key not in live:
                        continue
                    note = f"auto-resolved: the probability fell to {probability:.3f}"
                    event = await self._close(conn, key, "resolved", note, 0, now)
                    if event is not None:
                        events.append(event)
                for key in assessment.withdraw:
                    if key not in live:
                        continue
                    note = "withdrawn: a serious escalation of the customer is open"
                    event = await self._close(conn, key, "dismissed", note, NOT_ACTIONABLE, now)
                    if event is not None:
                        events.append(event)
            await conn.execute(SAVE_CURSOR, cursor, now)
            await self._enqueue(conn, events)
        return events

    async def _raise(
        self,
        conn: Connection,
        candidate: Candidate,
        decision_id: uuid.UUID,
        policy_version: str,
        teams: dict[str, TeamLimits],
        now: datetime,
    ) -> tuple[uuid.UUID | None, AlertEventRow | None]:
        live = await conn.fetchrow(LIVE_BY_KEY, candidate.dedup_key, _LIVE)
        reasons = _reasons_json(candidate.reasons)
        if live is not None:
            await conn.execute(
                FOLD_ALERT,
                live["alert_id"],
                candidate.probability,
                candidate.risk_band,
                reasons,
                candidate.expected_value,
                candidate.priority,
                decision_id,
                policy_version,
                now,
            )
            if live["status"] == "waiting":
                return live["alert_id"], None  # (not announced: nobody to tell yet)
            return live["alert_id"], await self._event(conn, live["alert_id"], UPDATED, now)
        if await conn.fetchval(DISMISSED_SINCE, candidate.dedup_key, now - candidate.dedup_window):
            return None, None  # the team said no action was needed, within the window
        limits = teams.get(candidate.team)
        waiting = False
        if limits is not None and limits.daily_capacity is not None:
            announced = await conn.fetchval(ANNOUNCED_SINCE, candidate.team, limits.day_start)
            waiting = announced >= limits.daily_capacity
        deadline = limits.ack_deadline if limits is not None else None
        alert_id = uuid.uuid4()
        await conn.execute(
            INSERT_ALERT,
            alert_id,
            candidate.kind,
            candidate.team,
            candidate.customer_id,
            candidate.ticket_id,
            candidate.product_id,
            candidate.dedup_key,
            "waiting" if waiting else "open",
            candidate.probability,
            candidate.risk_band,
            reasons,
            candidate.expected_value,
            candidate.priority,
            candidate.action_name,
            decision_id,
            policy_version,
            None if waiting or deadline is None else now + deadline,
            now + candidate.expire_after if waiting and candidate.expire_after else None,
            now,
            None if waiting else now,
        )
        if waiting:
            return alert_id, None
        return alert_id, await self._event(conn, alert_id, CREATED, now)

    async def _close(
        self, conn: Connection, key: str, status: str, note: str, reason: int, now: datetime
    ) -> AlertEventRow | None:
        """The service's own closing of a live alert (auto-resolve, withdrawal)."""
        live = await conn.fetchrow(LIVE_BY_KEY, key, _LIVE)
        if live is None:
            return None
        await conn.execute(
            SET_STATUS, live["alert_id"], status, live["assignee"], note, reason, now
        )
        if live["status"] == "waiting":
            return None
        return await self._event(conn, live["alert_id"], STATUS_CHANGED, now)

    async def _event(
        self,
        conn: Connection,
        alert_id: uuid.UUID,
        event_type: int,
        now: datetime,
        actor_name: str = "",
        actor_reason: str = "",
    ) -> AlertEventRow:
        row = await conn.fetchrow(
            INSERT_EVENT, alert_id, uuid.uuid4(), event_type, actor_name, actor_reason, now
        )
        assert row is not None
        return _event(row)

    async def _enqueue(self, conn: Connection, events: Sequence[AlertEventRow]) -> None:
        """Hands the events to webhooks in the caller's transaction (the
        transactional outbox): one pending delivery per matching webhook, the
        event's id as the delivery id."""
        if self.enqueue is None or self.event_body is None or not events:
            return
        outbox = [
            OutboxEvent(
                event_id=str(e.event_id),
                team=team,
                kind=e.alert.kind,
                alert_id=str(e.alert.alert_id),
                customer_id=str(e.alert.customer_id),
                body=self.event_body(e),
                occurred_at=e.occurred_at,
            )
            for e in events
            for team in dict.fromkeys([e.alert.team, e.alert.escalated_to_team])
            if team
        ]
        await self.enqueue(conn, outbox)

    # --- due work (escalation, capacity, expiry) ---------------------------------------------
    async def run_due_work(
        self, teams: dict[str, TeamLimits], now: datetime
    ) -> list[AlertEventRow]:
        """Escalates open alerts past their due time to the team's lead team,
        expires waiting alerts past their horizon, and announces waiting alerts
        the team's capacity now allows (a new day), best expected value first."""
        events: list[AlertEventRow] = []
        async with self.pool.acquire() as conn, conn.transaction():
            # One replica at a time (two would both see room in a capacity).
            if not await conn.fetchval("SELECT pg_try_advisory_xact_lock(hashtext($1))", DUE_LOCK):
                return []
            for row in await conn.fetch(OVERDUE, now):
                limits = teams.get(row["team"])
                lead = limits.lead_team if limits is not None else None
                if not lead:
                    continue
                await conn.execute(ESCALATE, row["alert_id"], lead, now)
                events.append(await self._event(conn, row["alert_id"], STATUS_CHANGED, now))
            await conn.execute(EXPIRED_WAITING, now)
            for team_row in await conn.fetch(TEAMS_WAITING):
                team = team_row["team"]
                limits = teams.get(team)
                room = 1000
                if limits is not None and limits.daily_capacity is not None:
                    announced = await conn.fetchval(ANNOUNCED_SINCE, team, limits.day_start)
                    room = max(0, limits.daily_capacity - announced)
                if room == 0:
                    continue
                deadline = limits.ack_deadline if limits is not None else None
                for row in await conn.fetch(WAITING_OF_TEAM, team, room):
                    due = now + deadline if deadline is not None else None
                    await conn.execute(ANNOUNCE, row["alert_id"], now, due)
                    events.append(await self._event(conn, row["alert_id"], CREATED, now))
            await self._enqueue(conn, events)
        return events

    # --- people's changes --------------------------------------------------------------
    async def change(
        self,
        alert_id: uuid.UUID,
        operation: str,
        decide: Callable[[AlertState], AlertState],
        *,
        idempotency_key: str,
        actor_name: str,
        actor_reason: str,
        visible: Callable[[AlertRow], bool],
        now: datetime,
        request_sha256: bytes = b"",
    ) -> AlertRow:
        """Applies a person's change (`decide` says what it is, or refuses),
        writes its event, and remembers the idempotency key with the request's
        fingerprint; a repeat of the same request under a key answers the
        alert as it is now, another request under it is INVALID_ARGUMENT (a
        key kept without a fingerprint, before migration 0008, is matched by
        alert as before)."""
        async with self.pool.acquire() as conn, conn.transaction():
            if idempotency_key:
                await conn.execute(LOCK_REQUEST_KEY, idempotency_key)
                seen = await conn.fetchrow(REQUEST_SEEN, idempotency_key)
                bound = seen["request_sha256"] if seen is not None else None
                if key_bound_elsewhere(bytes(bound) if bound is not None else None, request_sha256):
                    raise key_reused()
                if seen is not None and seen["alert_id"] == alert_id:
                    row = await conn.fetchrow(GET_ALERT, alert_id)
                    if row is None or not visible(_alert(row)):
                        raise NotFound("alert", str(alert_id))
                    return _alert(row)
            row = await conn.fetchrow(GET_ALERT_FOR_UPDATE, alert_id)
            if row is None or not visible(_alert(row)):
                raise NotFound("alert", str(alert_id))
            state = AlertState(
                alert_id=alert_id,
                status=row["status"],
                assignee=row["assignee"],
                status_note=row["status_note"],
                dismiss_reason=row["dismiss_reason"],
                team=row["team"],
                escalated_to_team=row["escalated_to_team"],
            )
            after = decide(state)
            await conn.execute(
                SET_STATUS,
                alert_id,
                after.status,
                after.assignee,
                after.status_note,
                after.dismiss_reason,
                now,
            )
            event = await self._event(conn, alert_id, STATUS_CHANGED, now, actor_name, actor_reason)
            if idempotency_key:
                await conn.execute(
                    REMEMBER_REQUEST,
                    idempotency_key,
                    alert_id,
                    operation,
                    row["customer_id"],
                    now,
                    request_sha256,
                )
            await self._enqueue(conn, [event])
            return event.alert

    # --- reads -------------------------------------------------------------------------
    async def get(self, alert_id: uuid.UUID) -> AlertRow | None:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(GET_ALERT, alert_id)
        return _alert(row) if row is not None else None

    async def list_alerts(
        self, where: ListFilter, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[AlertRow]:
        """A team's alerts (its own and those escalated to it), newest first,
        announced ones only (waiting alerts are not the team's yet)."""
        conditions = ["(team = $1 OR escalated_to_team = $1)", "status <> 'waiting'"]
        args: list[object] = [where.team]

        def arg(value: object) -> str:
            args.append(value)
            return f"${len(args)}"

        if where.statuses:
            conditions.append(f"status = ANY({arg(list(where.statuses))}::text[])")
        if where.kinds:
            conditions.append(f"kind = ANY({arg(list(where.kinds))}::text[])")
        if where.customer_id is not None:
            conditions.append(f"customer_id = {arg(where.customer_id)}")
        if where.assignee:
            conditions.append(f"assignee = {arg(where.assignee)}")
        if where.created_from is not None:
            conditions.append(f"created_at >= {arg(where.created_from)}")
        if where.created_to is not None:
            conditions.append(f"created_at < {arg(where.created_to)}")
        if after is not None:
            conditions.append(f"(created_at, alert_id) < ({arg(after[0])}, {arg(after[1])})")
        sql = (
            f"SELECT * FROM alerts WHERE {' AND '.join(conditions)} "
            f"ORDER BY created_at DESC, alert_id DESC LIMIT {arg(limit)}"
        )
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(sql, *args)
        return [_alert(r) for r in rows]

    async def events_after(
        self, team: str, position: tuple[int, int], kinds: Sequence[str], limit: int
    ) -> tuple[list[AlertEventRow], bool]:
        """A team's deliverable events after `position`, in order, and whether
        more exist that are not deliverable yet."""
        xid, seq = position
        async with self.pool.acquire() as conn:
            rows = await conn.fetch(EVENTS_AFTER, str(xid), seq, team, list(kinds), limit)
            pending = False
            if len(rows) < limit:
                last = (int(rows[-1]["xid"]), int(rows[-1]["seq"])) if rows else position
                pending = bool(await conn.fetchval(PENDING_AFTER, str(last[0]), last[1], team))
        return [_event(r) for r in rows], pending

    async def head(self) -> tuple[int, int]:
        async with self.pool.acquire() as conn:
            row = await conn.fetchrow(EVENTS_HEAD)
        return (int(row["xid"]), int(row["seq"])) if row is not None else (0, 0)

    async def listen(self, on_event: Callable[[], None]) -> Listener:
        connection = await self.pool.acquire()
        listener = Listener(connection, lambda *_: on_event())
        try:
            await connection.add_listener(EVENTS_CHANNEL, listener.callback)
        except BaseException:
            await self.pool.release(connection)
            raise
        return listener

    async def stop_listening(self, listener: Listener) -> None:
        try:
            if not listener.is_closed():
                await listener.connection.remove_listener(EVENTS_CHANNEL, listener.callback)
        finally:
            await self.pool.release(listener.connection)

    # --- data subjects and retention -------------------------------------------------------
    async def erase(self, conn: Connection, customer_ids: Sequence[str]) -> dict[str, int]:
        """Deletes a customer's alerts, events and requests and leaves a
        tombstone, so the follower never raises one for them again."""
        ids = [uuid.UUID(str(c)) for c in customer_ids]
        await conn.execute(TOMBSTONES, ids)
        counts = {}
        for kind, sql in (
            ("alerts", ERASE_ALERTS),
            ("alert_events", ERASE_EVENTS),
            ("alert_requests", ERASE_REQUESTS),
        ):
            status = await conn.execute(sql, ids)
            counts[kind] = int(status.split()[-1])
        return counts

    async def export(self, customer_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
        ids = [uuid.UUID(str(c)) for c in customer_ids]
        async with self.pool.acquire() as conn:
            alerts = [dict(r["alert"]) for r in await conn.fetch(EXPORT_ALERTS, ids)]
            events = [
                {
                    "event_id": str(r["event_id"]),
                    "alert_id": str(r["alert_id"]),
                    "type": r["type"],
                    "actor": r["actor_name"],
                    "occurred_at": r["occurred_at"].isoformat(),
                }
                for r in await conn.fetch(EXPORT_EVENTS, ids)
            ]
            # The lifecycle calls' keys are erased with the customer, so shown too.
            requests = [
                {
                    "idempotency_key": r["idempotency_key"],
                    "alert_id": str(r["alert_id"]),
                    "operation": r["operation"],
                    "applied_at": r["applied_at"].isoformat(),
                }
                for r in await conn.fetch(EXPORT_REQUESTS, ids)
            ]
        return {"alerts": alerts, "alert_events": events, "alert_requests": requests}

    async def purge_before(self, horizon: datetime) -> dict[str, int]:
        """Retention: events older than the horizon, and alerts finished
        (or waiting) and untouched since; live alerts stay."""
        async with self.pool.acquire() as conn, conn.transaction():
            counts = {}
            for kind, sql, args in (
                ("alert_events", PURGE_EVENTS, (horizon,)),
                (
                    "alerts",
                    PURGE_ALERTS,
                    (horizon, ["open", "acknowledged", "assigned", "escalated"]),
                ),
                ("alert_requests", PURGE_REQUESTS, (horizon,)),
            ):
                status = await conn.execute(sql, *args)
                counts[kind] = int(status.split()[-1])
        return counts

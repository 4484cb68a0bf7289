"""All SQL of the interactions service (schema `interactions`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Protocol, TypeVar

import asyncpg
import asyncpg.pool
import orjson
import prometheus_client

from converge.runtime.database import Connection
from converge.runtime.errors import Aborted

# Ingests hold this advisory lock shared, so they run side by side; erasure
# holds it exclusively, so no ingest in flight writes back interactions or a
# state of a customer erased under it.
INGEST_LOCK = 0x636F6E7665726765  # "converge"
LOCK_BESIDE_INGESTS = "SELECT pg_advisory_xact_lock_shared($1)"
LOCK_OUT_INGESTS = "SELECT pg_advisory_xact_lock($1)"

COLUMNS = (
    "interaction_id",
    "customer_id",
    "occurred_at",
    "channel",
    "type",
    "attributes",
    "ticket_id",
    "product_id",
    "amount",
    "currency",
    "sentiment",
    "source",
    "idempotency_key",
    "identifier",
)
# The rows just stored, by the ids the service gave them.
STORED_AS = """
SELECT seq, interaction_id, recorded_at, source, idempotency_key FROM interactions
WHERE interaction_id = ANY($1::uuid[])
"""

SELECT_BY_KEYS = """
SELECT i.* FROM interactions i
JOIN unnest($1::text[], $2::text[]) AS q(source, idempotency_key) USING (source, idempotency_key)
"""

# A state's version is the xmin of its row: whoever rewrites a state (another
# ingest or replica, an erasure, a hand-made UPDATE) changes it. Ingests fold
# side by side onto the states as they read them, and write them back in two
# steps. First LOCK_STATES takes every state row of the batch in one global
# order (customer id), in one statement: a stored row is locked (ON CONFLICT
# DO UPDATE ... WHERE false locks the row and writes nothing), a missing one is
# inserted, with the folded state when the ingest found none, else with an
# empty placeholder (the customer's row went away: folded again below). Two
# ingests thus always wait for each other's rows in the same order, inserted
# rows included, and can never deadlock on states (they did, 37 times in 720
# transactions, when the rows were locked in each statement's plan order and
# again when a state was folded a second time). Then WRITE_STATES writes each
# state over the version it was folded onto (compare and set); a state another
# ingest wrote since it was read is read again (it is locked now, so it stays
# as read), this batch's rows are folded into it, and it is written as is.
LOCK_STATES = """
INSERT INTO customer_state AS s (customer_id, state)
SELECT customer_id, coalesce(state, '\\x'::bytea)
FROM unnest($1::uuid[], $2::bytea[]) AS w(customer_id, state)
ORDER BY customer_id
ON CONFLICT (customer_id) DO UPDATE SET state = s.state WHERE false
RETURNING customer_id, xmin
"""
# A null version writes unconditionally (the row is locked by this ingest).
WRITE_STATES = """
UPDATE customer_state s SET state = w.state, updated_at = now()
FROM unnest($1::uuid[], $2::bytea[], $3::xid[]) AS w(customer_id, state, version)
WHERE s.customer_id = w.customer_id AND (w.version IS NULL OR s.xmin = w.version)
RETURNING s.customer_id, s.xmin
"""
STATE_VERSIONS = "SELECT customer_id, xmin FROM customer_state WHERE customer_id = ANY($1::uuid[])"

# States kept under another state version than the one served (a changed
# feature set), in customer order after a cursor, for the background rebuild.
# A state is stored with its version first (`{"version":"s1-...",`): its
# first bytes tell, without parsing kilobytes of JSON per customer at every
# start. (An empty placeholder exists only inside an ingest's transaction.)
STALE_STATES = """
SELECT customer_id, xmin FROM customer_state
WHERE customer_id > $1 AND length(state) > 0
  AND substring(state FOR length($2::bytea)) <> $2::bytea
ORDER BY customer_id
LIMIT $3
"""
# Locks states in the order ingests lock them (see LOCK_STATES), so a rebuild
# and an ingest wait for each other and never deadlock.
LOCK_STATES_IN_ORDER = """
SELECT customer_id FROM customer_state WHERE customer_id = ANY($1::uuid[])
ORDER BY customer_id FOR UPDATE
"""

# The customer each one given was merged into, recursively, as followed from
# the identity service: the root is the customer the links end at (a customer
# never merged is its own root). Links form a forest, but are followed as
# identity's events arrive, in whatever order their transactions committed, so
# a cycle can stand for a moment (A merged into B applied before the unmerge
# of an earlier B into A): ROOTS stops after 64 links, MEMBERS adds each
# (root, member) once (UNION), so neither runs forever on one.
#
# customer_links is reached by its key, one probe per customer and step: the
# lookups are LATERAL subqueries that OFFSET 0 keeps from being flattened into
# joins (as in LIVE_READS). Joined plainly, the planner, which estimates a
# recursive CTE at thousands of rows, hashed all of customer_links: under a
# generic plan on every call, and under a custom one for 100 customers.
# Measured with EXPLAIN (ANALYZE, BUFFERS), planning included, median of 25,
# two rounds, on 50,000 customers, 5,000 links (chains 2-3 deep), 400,000
# interactions, custom / generic plan:
#   ROOTS of 1 customer     0.3 / 7.8-9.3 ms  ->  0.3 / 0.07-0.13 ms
#   ROOTS of 100            3.7-4.6 / 5.0-7.6  ->  1.4-1.8 / 1.1-1.3
#   MEMBERS of 1 root       0.2-0.4 / 5.9-7.3  ->  0.2-0.3 / 0.09-0.18
#   MEMBERS of 100 roots    2.5-3.5 / 7.7-15   ->  1.5-1.7 / 1.3-1.5
# (the hash read all 188 pages of customer_links; the probes 11 pages for 1
# customer). The whole-table cost grows with every merge; the probes do not.
ROOTS = """
WITH RECURSIVE up AS (
    SELECT c AS start, c AS cur, 0 AS depth FROM unnest($1::uuid[]) AS c
    UNION ALL
    SELECT up.start, l.surviving_customer_id, up.depth + 1
    FROM up CROSS JOIN LATERAL (
        SELECT surviving_customer_id FROM customer_links WHERE merged_customer_id = up.cur OFFSET 0
    ) AS l
    WHERE up.depth < 64
)
SELECT DISTINCT ON (start) start, cur AS root FROM up ORDER BY start, depth DESC
"""

# Each root given and every customer merged into it, recursively.
MEMBERS = """
WITH RECURSIVE members AS (
    SELECT r AS root, r AS member FROM unnest($1::uuid[]) AS r
    UNION
    SELECT m.root, l.merged_customer_id FROM members m CROSS JOIN LATERAL (
        SELECT merged_customer_id FROM customer_links WHERE surviving_customer_id = m.member
        OFFSET 0
    ) AS l
)
SELECT root, member FROM members
"""

SELECT_STATES = (
    "SELECT customer_id, state, xmin FROM customer_state WHERE customer_id = ANY($1::uuid[])"
)

# What GetFeatures reads, in one statement (a round trip, and a pool release
# that resets the connection, cost more than the reading): for each customer
# asked and each owner of a ticket asked ($4: the customer the ticket was
# first recorded for: `owners`), whether it is erased, the customer it was
# merged into (ROOTS), and the kept state of that root and of every customer
# merged into it (MEMBERS), one row per (customer, member), with the state's
# version (row xmin); a member without a state gives nulls. A state at the
# version the caller says it knows ($2, $3: its features are in memory) is
# not sent again, unless it owns a ticket asked whose features the caller
# does not hold ($5: those it holds). Each ticket's owner comes as a row of its own, with the
# ticket id set (null on the others).
#
# Every table is reached by its key, one probe per customer: the lookups are
# LATERAL subqueries that OFFSET 0 keeps from being flattened into joins.
# Joined plainly, the planner (which estimates a recursive CTE at thousands
# of rows) hashed or merge-scanned all of customer_state for each call: half
# the table on average, 1.5-40 ms on the bench's 2,000 customers, and
# growing with every customer. `ticket_id <> ''` lets a generic plan use the
# partial ticket index: without it, once PostgreSQL switched the prepared
# statement to its generic plan, each call scanned `interactions` in
# parallel (~90 ms); it also keeps an empty ticket id from naming the owner
# of some interaction without a ticket.
LIVE_READS = """
WITH RECURSIVE owners AS (
    SELECT DISTINCT ON (ticket_id) ticket_id, customer_id FROM interactions
    WHERE ticket_id = ANY($4::text[]) AND ticket_id <> '' ORDER BY ticket_id, seq
),
up AS (
    SELECT c AS start, c AS cur, 0 AS depth
    FROM (SELECT unnest($1::uuid[]) UNION SELECT customer_id FROM owners) AS asked(c)
    UNION ALL
    SELECT up.start, l.surviving_customer_id, up.depth + 1
    FROM up CROSS JOIN LATERAL (
        SELECT surviving_customer_id FROM customer_links WHERE merged_customer_id = up.cur OFFSET 0
    ) AS l
    WHERE up.depth < 64
),
rooted AS (SELECT DISTINCT ON (start) start, cur AS root FROM up ORDER BY start, depth DESC),
members AS (
    SELECT root, root AS member FROM (SELECT DISTINCT root FROM rooted) AS r
    UNION  -- (once each: see ROOTS)
    SELECT m.root, l.merged_customer_id FROM members m CROSS JOIN LATERAL (
        SELECT merged_customer_id FROM customer_links WHERE surviving_customer_id = m.member
        OFFSET 0
    ) AS l
)
SELECT NULL::text AS ticket_id, r.start, r.root, e.erased IS NOT NULL AS erased,
       m.member, s.xmin,
       CASE WHEN k.version = s.xmin AND NOT EXISTS (
           SELECT 1 FROM owners o WHERE o.customer_id = m.member AND o.ticket_id <> ALL($5::text[])
       ) THEN NULL ELSE s.state END AS state
FROM rooted r
JOIN members m ON m.root = r.root
LEFT JOIN LATERAL (
    SELECT true AS erased FROM erased_customers WHERE customer_id = r.start OFFSET 0
) AS e ON true
LEFT JOIN LATERAL (
    SELECT xmin, state FROM customer_state WHERE customer_id = m.member OFFSET 0
) AS s ON true
LEFT JOIN unnest($2::uuid[], $3::xid[]) AS k(member, version) ON k.member = m.member
UNION ALL
SELECT ticket_id, customer_id, NULL, NULL, NULL, NULL, NULL FROM owners
"""

TIMELINE = """
SELECT * FROM interactions
WHERE customer_id = ANY($1::uuid[])
  AND ($2::text[] IS NULL OR type = ANY($2) OR EXISTS (
        SELECT 1 FROM unnest($3::text[]) AS p(prefix) WHERE type LIKE p.prefix || '%'))
  AND ($4::smallint[] IS NULL OR channel = ANY($4))
  AND ($5::timestamptz IS NULL OR occurred_at >= $5)
  AND ($6::timestamptz IS NULL OR occurred_at < $6)
  AND ($7 = '' OR ticket_id = $7)
  AND (occurred_at, seq) < ($8, $9)
ORDER BY occurred_at DESC, seq DESC
LIMIT $10
"""

EVENTS_BEFORE = """
SELECT * FROM interactions
WHERE customer_id = ANY($1::uuid[]) AND occurred_at < $2
ORDER BY occurred_at, seq
"""

# A chunk of a customer's export. By seq: unique and never reused, so a page
# token naming the last seq sent resumes exactly after it.
EXPORT_CHUNK_ROWS = 500
EXPORT_CHUNK = """
SELECT * FROM interactions
WHERE customer_id = ANY($1::uuid[]) AND seq > $2
ORDER BY seq
LIMIT $3
"""

EVENTS_OF_CUSTOMER = "SELECT * FROM interactions WHERE customer_id = $1 ORDER BY occurred_at, seq"

# In (xid, seq) order, and only rows of transactions older than any still
# running (see migration 0005): a row can never commit behind a cursor given
# out. A transaction left open anywhere in the cluster holds the stream back
# until it ends.
STREAM_AFTER = """
SELECT * FROM interactions
WHERE (xid, seq) > ($1::xid8, $2::bigint)
  AND xid < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
ORDER BY xid, seq
LIMIT $3
"""

# The position of the latest row the stream can deliver now (see STREAM_AFTER).
STREAM_HEAD = """
SELECT xid, seq FROM interactions
WHERE xid < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
ORDER BY xid DESC, seq DESC
LIMIT 1
"""

# Notified once by every transaction that stored interactions, at its commit
# (migration 0007); a process's change feed listens on it.
STORED_CHANNEL = "converge_interactions_stored"
# The database work of change-stream followers: it must not grow with their
# number (see change_feed.py).
STREAM_READS = prometheus_client.Counter(
    "converge_interactions_stream_reads_total",
    "Reads of the change stream, by StreamInteractions followers and the change feed.",
)

SELECT_INTERACTION = "SELECT * FROM interactions WHERE interaction_id = $1"

SELECT_TYPES = "SELECT * FROM interaction_types ORDER BY name"
INSERT_TYPE = """
INSERT INTO interaction_types (name, spec) VALUES ($1, $2)
ON CONFLICT (name) DO NOTHING RETURNING *
"""
# Over the version the caller read: a concurrent change makes it match nothing.
UPDATE_TYPE = """
UPDATE interaction_types SET spec = $2, version = version + 1, updated_at = now()
WHERE name = $1 AND version = $3 RETURNING *
"""

# Erased customers (tombstones, see migration 0006): an ingest refuses them.
ERASED_AMONG = "SELECT customer_id FROM erased_customers WHERE customer_id = ANY($1::uuid[])"
RECORD_ERASED = (
    "INSERT INTO erased_customers (customer_id) SELECT unnest($1::uuid[]) ON CONFLICT DO NOTHING"
)

UPSERT_LINK = """
INSERT INTO customer_links (merged_customer_id, surviving_customer_id, merge_id) VALUES ($1, $2, $3)
ON CONFLICT (merged_customer_id) DO UPDATE
SET surviving_customer_id = excluded.surviving_customer_id, merge_id = excluded.merge_id
"""

DELETE_LINK = "DELETE FROM customer_links WHERE merge_id = $1"

SAVE_SYNC = """
INSERT INTO identity_sync (singleton, cursor, last_event_at) VALUES (true, $1, $2)
ON CONFLICT (singleton) DO UPDATE SET cursor = $1, last_event_at = $2, applied_at = now()
"""

SELECT_SYNC = "SELECT cursor, last_event_at, applied_at FROM identity_sync"

# A purge walks the table once in stored order from a cursor: old interactions
# mostly come first, and no batch rescans what an earlier one emptied.
PURGE_BATCH = """
WITH doomed AS (
    SELECT xid, seq FROM interactions
    WHERE (xid, seq) > ($5::xid8, $6::bigint)
      AND occurred_at < $1 AND ($2::text[] IS NULL OR type = ANY($2) OR EXISTS (
        SELECT 1 FROM unnest($3::text[]) AS p(prefix) WHERE type LIKE p.prefix || '%'))
    ORDER BY xid, seq
    LIMIT $4
)
DELETE FROM interactions i USING doomed d WHERE (i.xid, i.seq) = (d.xid, d.seq)
RETURNING i.xid, i.seq, i.type
"""

ERASE_INTERACTIONS = "DELETE FROM interactions WHERE customer_id = ANY($1::uuid[])"
ERASE_STATES = "DELETE FROM customer_state WHERE customer_id = ANY($1::uuid[])"
ERASE_LINKS = """
DELETE FROM customer_links
WHERE merged_customer_id = ANY($1::uuid[]) OR surviving_customer_id = ANY($1::uuid[])
"""

COUNT_PURGEABLE = """
SELECT type, count(*) AS n FROM interactions
WHERE occurred_at < $1 AND ($2::text[] IS NULL OR type = ANY($2) OR EXISTS (
    SELECT 1 FROM unnest($3::text[]) AS p(prefix) WHERE type LIKE p.prefix || '%'))
GROUP BY type
"""


Key = tuple[str, str]  # (source, idempotency key)


# --- what leaves the store: plain frozen dataclasses, never asyncpg records --------
@dataclass(frozen=True, slots=True)
class StoredInteraction:
    """An interaction as stored: every column of `interactions`, in the
    table's order (an export lists them all)."""

    seq: int
    interaction_id: uuid.UUID
    customer_id: uuid.UUID
    occurred_at: datetime
    recorded_at: datetime
    channel: int
    type: str
    attributes: dict[str, Any]  # tagged values (see converge.runtime.values)
    ticket_id: str
    product_id: str
    amount: Decimal | float | None  # (a Decimal as read; a draft's amount when only checked)
    currency: str
    sentiment: float | None
    source: str
    idempotency_key: str
    identifier: dict[str, Any] | None  # the identifier it was sent with, if any
    xid: int  # the transaction that stored it (its place in the change stream)


def _interactions(records: Iterable[asyncpg.Record]) -> list[StoredInteraction]:
    return [StoredInteraction(**r) for r in records]


@dataclass(frozen=True, slots=True)
class StoredAs:
    """What the database gave a row just stored."""

    seq: int
    interaction_id: uuid.UUID
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class StoredType:
    """A registered interaction type as stored: its spec as JSON, and its version."""

    name: str
    spec: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class SyncStatus:
    """How far this service has followed identity's events."""

    cursor: str
    last_event_at: datetime | None
    applied_at: datetime


@dataclass(frozen=True, slots=True)
class LiveRead:
    """What live features read of one customer: whether it is erased, the
    customer it was merged into (itself when none), and the kept states of
    that root and of the customers merged into it: each one's version (row
    xmin), and the state as parsed unless it is at the version the caller
    knew."""

    root: uuid.UUID
    erased: bool
    versions: dict[uuid.UUID, int]
    states: dict[uuid.UUID, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class LiveReads:
    """`LiveRead`s by customer asked for (the tickets' owners included), and
    the customer each ticket asked for was first recorded for (a ticket
    nobody has: absent)."""

    customers: dict[uuid.UUID, LiveRead]
    ticket_owners: dict[str, uuid.UUID]


@dataclasses.dataclass(frozen=True)
class Listener:
    """A connection taken out of the pool to listen (see listen_for_stored)."""

    connection: asyncpg.pool.PoolConnectionProxy
    callback: Callable[..., None]

    def is_closed(self) -> bool:
        try:
            return self.connection.is_closed()
        except asyncpg.InterfaceError:  # (already given back to the pool)
            return True


EventsOf = Callable[[uuid.UUID], Awaitable[list[StoredInteraction]]]
Row = TypeVar("Row", bound="NewInteraction")
Fold = Callable[
    [dict[uuid.UUID, dict[str, Any] | None], Sequence[Row], EventsOf],
    Awaitable[dict[uuid.UUID, dict[str, Any]]],
]


class NewInteraction(Protocol):
    """What the store needs of an interaction to store: the service's Draft,
    once the customer it belongs to (its owner) is known."""

    @property
    def owner(self) -> uuid.UUID: ...

    @property
    def source(self) -> str: ...

    @property
    def idempotency_key(self) -> str: ...

    def record(self) -> tuple[Any, ...]:
        """The row in `COLUMNS` order."""
        ...


def _type_filter(types: Sequence[str]) -> tuple[list[str] | None, list[str]]:
    """Exact names and prefixes ("ticket.*" -> "ticket.") of a type filter."""
    if not types:
        return None, []
    exact = [t for t in types if not t.endswith(".*")]
    prefixes = [t[:-1] for t in types if t.endswith(".*")]
    return exact, prefixes


async def _copy(
    connection: Connection, rows: Sequence[NewInteraction], ids: list[uuid.UUID] | None = None
) -> None:
    """Copies the rows in; `ids`, when given, receives their interaction ids."""
    # Records made as the COPY encodes them (it yields to the event loop
    # between buffers), not all at once: a batch's worth took tens of ms of
    # loop time that other requests waited for.
    records: Iterable[tuple[Any, ...]] = (row.record() for row in rows)
    if ids is not None:
        records = list(records)
    await connection.copy_records_to_table("interactions", columns=COLUMNS, records=records)
    if ids is not None:
        ids.extend(record[0] for record in records)


# What the database (or the encoding of a row for it) refuses in one row, as a
# check let through: a value out of a column's range, a character the text
# type cannot hold, a constraint. A re-sent key (UniqueViolationError) is not
# one of them: it is a duplicate, handled apart.
_REFUSALS = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    ValueError,
    TypeError,
    OverflowError,
)


def _refused(error: Exception) -> bool:
    return isinstance(error, _REFUSALS) and not isinstance(error, asyncpg.UniqueViolationError)


async def _copy_sorting_out(
    connection: Connection, rows: Sequence[Row], ids: list[uuid.UUID] | None
) -> tuple[list[Row], list[tuple[Row, str]]]:
    """Copies the rows in a savepoint; when a row's value is refused, halves
    the batch until the refused rows are found (a COPY fails whole) and copies
    the others. Returns the rows copied and the refused ones with the reason.
    A re-sent key raises UniqueViolationError, as a plain COPY does."""
    try:
        attempt: list[uuid.UUID] | None = [] if ids is not None else None
        async with connection.transaction():
            await _copy(connection, rows, attempt)
    except Exception as error:
        if not _refused(error):
            raise
        if len(rows) == 1:
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            return [], [(rows[0], f"the database refused a value of this row: {reason}")]
        middle = len(rows) // 2
        copied, refused = await _copy_sorting_out(connection, rows[:middle], ids)
        later, refused_later = await _copy_sorting_out(connection, rows[middle:], ids)
        return [*copied, *later], [*refused, *refused_later]
    if ids is not None and attempt is not None:
        ids.extend(attempt)
    return list(rows), []


DUMPS_PER_SLICE = 500


async def _dump_states(
    states: dict[uuid.UUID, dict[str, Any]], customers: Sequence[uuid.UUID]
) -> list[bytes]:
    """The states serialised, yielding to the event loop now and then (a state
    takes about 30 µs; a batch touches thousands)."""
    dumped = []
    for done, customer in enumerate(customers, 1):
        dumped.append(orjson.dumps(states[customer]))
        if done % DUMPS_PER_SLICE == 0:
            await asyncio.sleep(0)
    return dumped


States = dict[uuid.UUID, dict[str, Any] | None]  # None: the customer has no state yet
Versions = dict[uuid.UUID, int | None]  # each state's row xmin; None: no row yet


async def _read_states(
    connection: Connection, customers: Sequence[uuid.UUID]
) -> tuple[States, Versions]:
    """The kept states of `customers`, with the versions they were read at."""
    states: States = dict.fromkeys(customers)
    versions: Versions = dict.fromkeys(customers)
    for r in await connection.fetch(SELECT_STATES, list(customers)):
        states[r["customer_id"]] = orjson.loads(r["state"])
        versions[r["customer_id"]] = r["xmin"]
    return states, versions


def _customers_of(rows: Sequence[NewInteraction]) -> list[uuid.UUID]:
    return list({row.owner for row in rows})


class StateCache:
    """The feature states this replica wrote last, by customer, each with the
    version (row xmin) it was written as, the least recently used dropped
    beyond `capacity`. A stream's consecutive batches mostly touch the same
    customers: a state still at the version written is taken from here
    instead of being read and parsed again (about 20 µs a state here).

    An ingest takes the entries of its customers out and puts back only what
    it committed, so a failed batch never leaves a half-folded state behind.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[uuid.UUID, tuple[int, dict[str, Any]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def take(self, customer_id: uuid.UUID, version: int) -> dict[str, Any] | None:
        """The kept state if it is still at `version`; the entry is removed either way."""
        entry = self._entries.pop(customer_id, None)
        return entry[1] if entry is not None and entry[0] == version else None

    def forget(self, customer_ids: Iterable[uuid.UUID]) -> None:
        for customer_id in customer_ids:
            self._entries.pop(customer_id, None)

    def put(self, customer_id: uuid.UUID, version: int, state: dict[str, Any]) -> None:
        if self.capacity <= 0:
            return
        self._entries.pop(customer_id, None)  # (re-inserted last: most recently used)
        self._entries[customer_id] = (version, state)
        while len(self._entries) > self.capacity:
            del self._entries[next(iter(self._entries))]


async def _states_for_update(
    connection: Connection, rows: Sequence[NewInteraction], cache: StateCache
) -> tuple[States, Versions]:
    """The kept states of the rows' customers and their versions, from the
    cache where it holds the stored version; the cache gives its entries up
    (see StateCache)."""
    customers = _customers_of(rows)
    states: States = dict.fromkeys(customers)
    stored: dict[uuid.UUID, int] = {
        r[0]: r[1] for r in await connection.fetch(STATE_VERSIONS, customers)
    }
    cache.forget(c for c in customers if c not in stored)
    versions: Versions = dict.fromkeys(customers)
    versions.update(stored)
    unknown = []
    for customer_id, version in stored.items():
        kept = cache.take(customer_id, version)
        if kept is None:
            unknown.append(customer_id)
        else:
            states[customer_id] = kept
    if unknown:
        read, read_versions = await _read_states(connection, unknown)
        states.update(read)
        versions.update(read_versions)
    return states, versions


# How often ingests running side by side got in each other's way: many
# refolds mean replicas or streams keep writing the same customers at once.
STATES_REFOLDED = prometheus_client.Counter(
    "converge_interactions_states_refolded_total",
    "Feature states an ingest folded again because another ingest wrote them first.",
)
INGEST_DEADLOCK_RETRIES = prometheus_client.Counter(
    "converge_interactions_ingest_deadlock_retries_total",
    "Ingest transactions run again after PostgreSQL broke a deadlock between ingests.",
)

# A deadlock left between ingests (two streams storing the same keys at once
# in opposite orders; states cannot deadlock, see LOCK_STATES) runs the batch
# again; past these attempts it fails (nothing of it committed) and the client
# sends it again.
DEADLOCK_ATTEMPTS = 3


class _FoldNeedsReads(Exception):
    """A fold running beside the COPY needed the database (a state to rebuild)."""


async def _no_reads(customer_id: uuid.UUID) -> list[StoredInteraction]:
    raise _FoldNeedsReads


async def _copy_unstored(
    connection: Connection, first: dict[Key, Row], ids: list[uuid.UUID] | None
) -> tuple[dict[Key, StoredInteraction], list[Row], list[tuple[Row, str]]]:
    """Copies the rows whose key is not stored yet (as `_copy_sorting_out`);
    returns the first copies of those that were, the rows copied and the
    rows refused."""
    while True:
        found = await connection.fetch(
            SELECT_BY_KEYS, [key[0] for key in first], [key[1] for key in first]
        )
        duplicates = {(r["source"], r["idempotency_key"]): StoredInteraction(**r) for r in found}
        unstored = [row for key, row in first.items() if key not in duplicates]
        attempt: list[uuid.UUID] | None = [] if ids is not None else None
        try:
            fresh, refused = await _copy_sorting_out(connection, unstored, attempt)
        except asyncpg.UniqueViolationError:
            continue  # another ingest, in flight when we looked, stored one of them since
        if ids is not None and attempt is not None:
            ids.extend(attempt)
        return duplicates, fresh, refused


async def _write_states(
    connection: Connection,
    updated: dict[uuid.UUID, dict[str, Any]],
    versions: Versions,
    rows: Sequence[Row],
    fold: Fold[Row],
    events_of: EventsOf,
) -> dict[uuid.UUID, tuple[int, dict[str, Any]]]:
    """Writes the folded states over the versions they were folded onto,
    every row locked first in customer order (see LOCK_STATES). A state
    another ingest wrote since is read again and this batch's rows of its
    customer folded into it. Returns each written state with its new version."""
    customers = sorted(updated)
    dumped = await _dump_states(updated, customers)
    written: dict[uuid.UUID, tuple[int, dict[str, Any]]] = {}
    lost: States = {}  # customers to fold again, from the state now stored
    for customer_id, version in await connection.fetch(
        LOCK_STATES,
        customers,
        [None if versions[c] is not None else d for c, d in zip(customers, dumped, strict=True)],
    ):
        if versions[customer_id] is None:  # (new to both: inserted as folded)
            written[customer_id] = (version, updated[customer_id])
        else:  # (gone since it was read: a placeholder now, folded from nothing)
            lost[customer_id] = None
    # Over the version folded onto; a customer new to this ingest whose row
    # another ingest inserted meanwhile is not written here but folded again.
    stored = [
        i
        for i, c in enumerate(customers)
        if versions[c] is not None and c not in written and c not in lost
    ]
    for customer_id, version in await connection.fetch(
        WRITE_STATES,
        [customers[i] for i in stored],
        [dumped[i] for i in stored],
        [versions[customers[i]] for i in stored],
    ):
        written[customer_id] = (version, updated[customer_id])
    changed = [c for c in customers if c not in written and c not in lost]
    if changed:
        read, _ = await _read_states(connection, changed)
        lost.update(read)
    if not lost:
        return written
    STATES_REFOLDED.inc(len(lost))
    refolded = await fold(lost, [row for row in rows if row.owner in lost], events_of)
    again = sorted(refolded)
    for customer_id, version in await connection.fetch(
        WRITE_STATES, again, await _dump_states(refolded, again), [None] * len(again)
    ):
        written[customer_id] = (version, refolded[customer_id])
    return written


@dataclass(frozen=True)
class IngestOutcome:
    """What an ingest transaction did with its rows, each key once."""

    new: dict[Key, StoredAs | None]  # stored now (seq, id, recorded_at if asked)
    duplicates: dict[Key, StoredInteraction]  # stored before: the first copy
    refused: dict[Key, str]  # a value the database refused: why
    erased: frozenset[uuid.UUID]  # owners erased: none of their rows was stored


def _reasons(refused: Sequence[tuple[NewInteraction, str]]) -> dict[Key, str]:
    return {(row.source, row.idempotency_key): reason for row, reason in refused}


class InteractionsStore:
    def __init__(self, pool: asyncpg.Pool, state_cache_size: int = 0) -> None:
        self.pool = pool
        self.state_cache = StateCache(state_cache_size)
        # Called with the customer ids after each erasure commits, for what
        # keeps rows in memory (the change feed's recent rows).
        self.erasure_hooks: list[Callable[[Sequence[uuid.UUID]], None]] = []

    async def ingest(
        self, rows: Sequence[Row], fold: Fold[Row], *, stored_rows: bool = True
    ) -> IngestOutcome:
        """Stores the rows not stored before and folds them into the live
        feature states, in one transaction: what is acknowledged is durable and
        already in the features. Ingests run side by side (replicas, streams,
        single records); each folds onto the states as stored (see LOCK_STATES).

        `fold(states_by_customer, fresh_rows, events_of)` returns the new
        states; `events_of(customer)` reads a customer's stored interactions in
        the same transaction, for rebuilding a state from scratch. A key given
        twice in one batch is stored once, from its first row. Rows of an
        erased customer, and rows with a value the database refuses, are not
        stored; the others are (see IngestOutcome).
        """
        for _ in range(DEADLOCK_ATTEMPTS - 1):
            try:
                return await self._ingest_once(rows, fold, stored_rows)
            except asyncpg.DeadlockDetectedError:
                # Two streams stored the same keys at once in opposite orders
                # (states are locked in one order and cannot deadlock). Nothing
                # of this one was committed; it runs again.
                INGEST_DEADLOCK_RETRIES.inc()
        return await self._ingest_once(rows, fold, stored_rows)

    async def _ingest_once(
        self, rows: Sequence[Row], fold: Fold[Row], stored_rows: bool
    ) -> IngestOutcome:
        first: dict[Key, Row] = {}
        for row in rows:  # a key repeated within the batch: the first copy wins
            first.setdefault((row.source, row.idempotency_key), row)
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(LOCK_BESIDE_INGESTS, INGEST_LOCK)
            # Under the lock, so an erasure is wholly before this (its ids are
            # listed now) or wholly after (it deletes what this stores).
            erased = frozenset(
                r[0] for r in await connection.fetch(ERASED_AMONG, _customers_of(rows))
            )
            if erased:
                first = {key: row for key, row in first.items() if row.owner not in erased}

            async def events_of(customer_id: uuid.UUID) -> list[StoredInteraction]:
                return _interactions(await connection.fetch(EVENTS_OF_CUSTOMER, customer_id))

            duplicates: dict[Key, StoredInteraction] = {}
            refused: list[tuple[Row, str]] = []
            fresh = list(first.values())
            updated: dict[uuid.UUID, dict[str, Any]] | None = None
            ids: list[uuid.UUID] | None = [] if stored_rows else None
            states, versions = await _states_for_update(connection, fresh, self.state_cache)
            try:
                # Optimistically, as re-sent keys and refused values are rare:
                # binary COPY straight into the table, where the unique key
                # refuses a key stored before. Meanwhile Python folds the rows
                # into the states (the fold yields now and then, so the COPY's
                # data keeps flowing).
                async with connection.transaction():
                    folding = asyncio.ensure_future(fold(states, fresh, _no_reads))
                    try:
                        await _copy(connection, fresh, ids)
                    finally:
                        with contextlib.suppress(_FoldNeedsReads):
                            updated = await folding
            except Exception as error:
                if not (isinstance(error, asyncpg.UniqueViolationError) or _refused(error)):
                    raise
                duplicates, fresh, refused = await _copy_unstored(connection, first, ids)
                updated = None  # folded with rows that were not stored
            new: dict[Key, StoredAs | None] = {}
            if not fresh:
                return IngestOutcome(new, duplicates, _reasons(refused), erased)
            if stored_rows:
                for r in await connection.fetch(STORED_AS, ids):
                    new[(r["source"], r["idempotency_key"])] = StoredAs(
                        r["seq"], r["interaction_id"], r["recorded_at"]
                    )
            elif duplicates or refused:
                new = dict.fromkeys((row.source, row.idempotency_key) for row in fresh)
            else:
                new = dict.fromkeys(first)  # (every row was stored: the keys at hand)
            if updated is None:  # (a state to rebuild from its interactions, or duplicates)
                # The first fold may have changed the states it was given: read them again.
                states, versions = await _read_states(connection, _customers_of(fresh))
                updated = await fold(states, fresh, events_of)
            written = await _write_states(connection, updated, versions, fresh, fold, events_of)
        for customer_id, (version, state) in written.items():  # committed: keep them
            self.state_cache.put(customer_id, version, state)
        return IngestOutcome(new, duplicates, _reasons(refused), erased)

    async def erased_among(self, customer_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        async with self.pool.acquire() as connection:
            return {r[0] for r in await connection.fetch(ERASED_AMONG, list(customer_ids))}

    async def roots(self, customer_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, uuid.UUID]:
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(ROOTS, list(customer_ids))
        return {r["start"]: r["root"] for r in rows}

    async def members(self, roots: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[uuid.UUID]]:
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(MEMBERS, list(roots))
        found: dict[uuid.UUID, list[uuid.UUID]] = {}
        for row in rows:
            found.setdefault(row["root"], []).append(row["member"])
        return found

    async def live_reads(
        self,
        customer_ids: Sequence[uuid.UUID],
        ticket_ids: Sequence[str] = (),
        known: Mapping[uuid.UUID, int] | None = None,
        held_tickets: Sequence[str] = (),
    ) -> LiveReads:
        """What live features read of `customer_ids` and of the tickets'
        owners, in one statement. The states at the version `known` gives for
        their customer are not sent, but for the owner of a ticket asked that
        is not among `held_tickets`."""
        known = known or {}
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(
                LIVE_READS,
                list(dict.fromkeys(customer_ids)),
                list(known),
                list(known.values()),
                list(ticket_ids),
                list(held_tickets),
            )
        parsed: dict[uuid.UUID, dict[str, Any]] = {}  # (a member's state parsed once)
        reads: dict[uuid.UUID, LiveRead] = {}
        owners: dict[str, uuid.UUID] = {}
        for ticket_id, start, root, erased, member, version, raw in rows:
            if ticket_id is not None:
                owners[ticket_id] = start
                continue
            read = reads.get(start)
            if read is None:
                read = reads[start] = LiveRead(root, erased, {}, {})
            if version is not None:
                read.versions[member] = version
            if raw is not None:
                state = parsed.get(member)
                if state is None:
                    state = parsed[member] = orjson.loads(raw)
                read.states[member] = state
        return LiveReads(reads, owners)

    async def states(self, customer_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, dict[str, Any]]:
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(SELECT_STATES, list(customer_ids))
        return {r["customer_id"]: orjson.loads(r["state"]) for r in rows}

    async def timeline(
        self,
        members: Sequence[uuid.UUID],
        types: Sequence[str],
        channels: Sequence[int],
        start: datetime | None,
        end: datetime | None,
        ticket_id: str,
        before: tuple[datetime, int],
        limit: int,
    ) -> list[StoredInteraction]:
        exact, prefixes = _type_filter(types)
        async with self.pool.acquire() as connection:
            return _interactions(
                await connection.fetch(
                    TIMELINE,
                    list(members),
                    exact,
                    prefixes,
                    list(channels) or None,
                    start,
                    end,
                    ticket_id,
                    before[0],
                    before[1],
                    limit,
                )
            )

    async def stale_states(
        self, state_version: str, after: uuid.UUID, limit: int
    ) -> list[tuple[uuid.UUID, int]]:
        """Up to `limit` customers after `after` whose kept state is of
        another state version, each with the version (row xmin) read."""
        # (A state whose version is not its first key would be rebuilt once
        # for nothing; one of another version never starts with this.)
        prefix = orjson.dumps({"version": state_version})[:-1]
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(STALE_STATES, after, prefix, limit)
        return [(r["customer_id"], r["xmin"]) for r in rows]

    async def replace_states(
        self, states: dict[uuid.UUID, dict[str, Any]], versions: dict[uuid.UUID, int]
    ) -> set[uuid.UUID]:
        """Writes each state over the version it was read at (compare and
        set): a state an ingest rewrote since is left as that ingest wrote it
        (ingest rebuilds a stale state itself, with its own rows). Returns the
        customers written."""
        customers = sorted(states)
        dumped = await _dump_states(states, customers)
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(LOCK_STATES_IN_ORDER, customers)
            written = await connection.fetch(
                WRITE_STATES, customers, dumped, [versions[c] for c in customers]
            )
        self.state_cache.forget(customers)
        return {r["customer_id"] for r in written}

    async def events_before(
        self, members: Sequence[uuid.UUID], until: datetime
    ) -> list[StoredInteraction]:
        async with self.pool.acquire() as connection:
            return _interactions(await connection.fetch(EVENTS_BEFORE, list(members), until))

    async def stream_after(self, cursor: tuple[int, int], limit: int) -> list[StoredInteraction]:
        """Up to `limit` interactions after the (xid, seq) `cursor`, in stream order."""
        STREAM_READS.inc()
        async with self.pool.acquire() as connection:
            return _interactions(await connection.fetch(STREAM_AFTER, cursor[0], cursor[1], limit))

    async def stream_head(self) -> tuple[int, int]:
        """The (xid, seq) of the latest row the stream can deliver now; (0, 0) when none."""
        STREAM_READS.inc()
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(STREAM_HEAD)
        return (0, 0) if row is None else (row["xid"], row["seq"])

    async def listen_for_stored(self, on_stored: Callable[[], None]) -> Listener:
        """A pool connection kept out of the pool, listening for stored
        interactions: `on_stored()` runs after each such commit. Give it back
        with `stop_listening`."""
        connection = await self.pool.acquire()
        listener = Listener(connection, lambda *_: on_stored())
        try:
            await connection.add_listener(STORED_CHANNEL, listener.callback)
        except BaseException:
            await self.pool.release(connection)
            raise
        return listener

    async def stop_listening(self, listener: Listener) -> None:
        """Gives the listening connection back, whatever state it is in: a
        connection never released would keep the pool's close() waiting."""
        connection = listener.connection
        try:
            if not listener.is_closed():
                await connection.remove_listener(STORED_CHANNEL, listener.callback)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # (a broken connection is replaced when released)
        finally:
            with contextlib.suppress(asyncpg.InterfaceError):  # (released already)
                await self.pool.release(connection)

    async def get(self, interaction_id: uuid.UUID) -> StoredInteraction | None:
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(SELECT_INTERACTION, interaction_id)
        return None if row is None else StoredInteraction(**row)

    # --- identity following -----------------------------------------------------
    async def apply_merge(
        self,
        merged: uuid.UUID,
        surviving: uuid.UUID,
        merge_id: uuid.UUID,
        cursor: str,
        at: datetime,
    ) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(UPSERT_LINK, merged, surviving, merge_id)
            await connection.execute(SAVE_SYNC, cursor, at)

    async def apply_unmerge(self, merge_id: uuid.UUID, cursor: str, at: datetime) -> None:
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(DELETE_LINK, merge_id)
            await connection.execute(SAVE_SYNC, cursor, at)

    async def save_sync(self, cursor: str, at: datetime) -> None:
        async with self.pool.acquire() as connection:
            await connection.execute(SAVE_SYNC, cursor, at)

    async def sync_status(self) -> SyncStatus | None:
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(SELECT_SYNC)
        return None if row is None else SyncStatus(**row)

    # --- types ------------------------------------------------------------------
    async def custom_types(self) -> list[StoredType]:
        async with self.pool.acquire() as connection:
            return [StoredType(**r) for r in await connection.fetch(SELECT_TYPES)]

    async def save_type(
        self, name: str, spec: dict[str, Any], expected_version: int | None
    ) -> StoredType:
        """Creates a type (expected_version None) or bumps it from expected_version."""
        async with self.pool.acquire() as connection:
            if expected_version is None:
                row = await connection.fetchrow(INSERT_TYPE, name, spec)
            else:
                row = await connection.fetchrow(UPDATE_TYPE, name, spec, expected_version)
        if row is None:
            raise Aborted(f"interaction type {name!r} changed concurrently; retry")
        return StoredType(**row)

    # --- retention and erasure ----------------------------------------------------
    async def purge(self, older_than: datetime, types: Sequence[str], batch: int) -> dict[str, int]:
        """Deletes in batches, each its own short transaction, so ingest never waits long."""
        exact, prefixes = _type_filter(types)
        purged: dict[str, int] = {}
        after = (0, 0)
        while True:
            async with self.pool.acquire() as connection:
                rows = await connection.fetch(
                    PURGE_BATCH, older_than, exact, prefixes, batch, *after
                )
            for row in rows:
                purged[row["type"]] = purged.get(row["type"], 0) + 1
                after = max(after, (row["xid"], row["seq"]))
            if len(rows) < batch:
                return purged

    async def count_purgeable(self, older_than: datetime, types: Sequence[str]) -> dict[str, int]:
        exact, prefixes = _type_filter(types)
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(COUNT_PURGEABLE, older_than, exact, prefixes)
        return {r["type"]: r["n"] for r in rows}

    async def erase(self, customer_ids: Sequence[uuid.UUID]) -> dict[str, int]:
        self.state_cache.forget(customer_ids)  # (a stale copy is never used, but is personal data)
        async with self.pool.acquire() as connection, connection.transaction():
            # Serialised with ingest, so no batch in flight writes back a state
            # (or interactions) of a customer erased under it.
            await connection.execute(LOCK_OUT_INGESTS, INGEST_LOCK)
            interactions = await connection.execute(ERASE_INTERACTIONS, list(customer_ids))
            states = await connection.execute(ERASE_STATES, list(customer_ids))
            links = await connection.execute(ERASE_LINKS, list(customer_ids))
            await connection.execute(RECORD_ERASED, list(customer_ids))
        # (again: an ingest that committed while this waited put its states back)
        self.state_cache.forget(customer_ids)
        for hook in self.erasure_hooks:
            hook(customer_ids)
        return {
            "interactions": int(interactions.split()[-1]),
            "feature_states": int(states.split()[-1]),
            "merge_links": int(links.split()[-1]),
        }

    async def export(
        self, customer_ids: Sequence[uuid.UUID], after_seq: int
    ) -> AsyncIterator[StoredInteraction]:
        """The customers' interactions after `after_seq`, by seq. Read a chunk
        at a time, each on a connection released before its rows are handed
        out, so a caller may stop at any row (a page is full) at no cost."""
        while True:
            async with self.pool.acquire() as connection:
                rows = await connection.fetch(
                    EXPORT_CHUNK, list(customer_ids), after_seq, EXPORT_CHUNK_ROWS
                )
            for row in rows:
                yield StoredInteraction(**row)
            if len(rows) < EXPORT_CHUNK_ROWS:
                return
            after_seq = rows[-1]["seq"]

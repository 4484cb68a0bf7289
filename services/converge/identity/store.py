"""All SQL of the identity service (schema `identity`). Rows leave as the
frozen dataclasses of `domain.py`; database errors leave as domain errors."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import orjson

from converge.identity.domain import (
    AttachedIdentifier,
    ChannelConsent,
    Customer,
    IdentityEvent,
    LockedCustomer,
    Merge,
    Preferences,
    ProfileChange,
    ProfileFields,
    TaggedValue,
)
from converge.identity.identifiers import IdentifierKind, NormalizedIdentifier
from converge.runtime.database import Connection

EVENT_CREATED, EVENT_MERGED, EVENT_UNMERGED, EVENT_FORGOTTEN, EVENT_PROFILE_CHANGED = 1, 2, 3, 4, 5
EVENT_IDENTIFIER_REMOVED = 6

# Lookups follow merges: an identifier's owner, then up the merged_into chain to
# the customer that survives. Merge chains are short; 64 bounds a corrupt loop.
FIND_ROOTS = """
WITH RECURSIVE found AS (
    SELECT i.kind, i.source, i.value, i.customer_id
    FROM identifiers i
    JOIN unnest($1::smallint[], $2::text[], $3::text[]) AS q(kind, source, value)
      USING (kind, source, value)
), up AS (
    SELECT kind, source, value, customer_id AS cur, 0 AS depth FROM found
    UNION ALL
    SELECT up.kind, up.source, up.value, c.merged_into, up.depth + 1
    FROM up JOIN customers c ON c.customer_id = up.cur
    WHERE c.merged_into IS NOT NULL AND up.depth < 64
)
SELECT DISTINCT ON (kind, source, value) kind, source, value, cur AS root
FROM up ORDER BY kind, source, value, depth DESC
"""

OWNERS = """
SELECT i.kind, i.source, i.value, i.customer_id, i.attached_at FROM identifiers i
JOIN unnest($1::smallint[], $2::text[], $3::text[]) AS q(kind, source, value)
  USING (kind, source, value)
"""

ROOTS_OF_CUSTOMERS = """
WITH RECURSIVE up AS (
    SELECT customer_id AS start, customer_id AS cur, 0 AS depth
    FROM customers WHERE customer_id = ANY($1::uuid[])
    UNION ALL
    SELECT up.start, c.merged_into, up.depth + 1
    FROM up JOIN customers c ON c.customer_id = up.cur
    WHERE c.merged_into IS NOT NULL AND up.depth < 64
)
SELECT DISTINCT ON (start) start, cur AS root FROM up ORDER BY start, depth DESC
"""

CLUSTER_MEMBERS = """
WITH RECURSIVE members AS (
    SELECT customer_id FROM customers WHERE customer_id = $1
    UNION ALL
    SELECT c.customer_id FROM customers c JOIN members m ON c.merged_into = m.customer_id
)
SELECT customer_id FROM members
"""

# One round trip for everything a Customer message shows.
LOAD_CUSTOMER = """
WITH RECURSIVE members AS (
    SELECT customer_id FROM customers WHERE customer_id = $1
    UNION ALL
    SELECT c.customer_id FROM customers c JOIN members m ON c.merged_into = m.customer_id
)
SELECT c.customer_id, c.created_at, c.updated_at, c.profile, c.merged_into, now() AS read_at,
    ARRAY(SELECT customer_id FROM members WHERE customer_id <> $1) AS merged_ids,
    ARRAY(SELECT ROW(i.kind, i.source, i.value, i.customer_id, i.attached_at)
          FROM identifiers i WHERE i.customer_id IN (SELECT customer_id FROM members)
          ORDER BY i.attached_at, i.kind, i.value) AS identifiers,
    ARRAY(SELECT ROW(p.do_not_contact, p.preferred_channel, p.wants_human, p.updated_at)
          FROM contact_preferences p WHERE p.customer_id IN (SELECT customer_id FROM members)
          ORDER BY p.updated_at DESC LIMIT 1) AS preferences,
    -- Each flag's latest explicit change across the cluster: after a merge, a
    -- later change of one flag on one customer must not reset the others'.
    (SELECT jsonb_object_agg(f.field, f.value) FROM (
            SELECT DISTINCT ON (field) field, value FROM preference_changes
            WHERE customer_id IN (SELECT customer_id FROM members)
              AND field IN ('do_not_contact', 'preferred_channel', 'wants_human')
            ORDER BY field, recorded_at DESC, change_id DESC) f) AS preference_flags,
    ARRAY(SELECT ROW(k.channel, k.status, k.updated_at, k.source) FROM (
            SELECT DISTINCT ON (channel) channel, status, updated_at, source FROM consents
            WHERE customer_id IN (SELECT customer_id FROM members)
            ORDER BY channel, updated_at DESC) k ORDER BY k.channel) AS consents
FROM customers c WHERE c.customer_id = $1
"""

PROFILE_AS_OF = """
SELECT coalesce(jsonb_object_agg(field, value) FILTER (WHERE value IS NOT NULL), '{}'::jsonb)
FROM (
    SELECT DISTINCT ON (field) field, value FROM profile_changes
    WHERE customer_id = $1 AND effective_at <= $2
    ORDER BY field, effective_at DESC, change_id DESC
) latest
"""

# LOAD_CUSTOMER for many customers in one statement (BatchGetCustomers: a
# training set asks for tens of thousands of profiles as of each cutoff, and a
# round trip per customer made that minutes), with the profile as of $2 when
# $2 is not null. Built from the two statements above, so they cannot drift.
LOAD_CUSTOMERS = (
    "SELECT loaded.*, CASE WHEN $2::timestamptz IS NULL THEN NULL ELSE ("
    + PROFILE_AS_OF.strip().replace("$1", "ids.id")
    + ") END AS profile_as_of FROM unnest($1::uuid[]) AS ids(id) CROSS JOIN LATERAL ("
    + LOAD_CUSTOMER.strip().replace("$1", "ids.id")
    + ") AS loaded"
)

# LOAD_CUSTOMER of the survivor of the customer $1 (GetCustomer by id): the
# root and its cluster from one snapshot in one statement, where a read-only
# transaction took four round trips (BEGIN, the root, the customer, COMMIT).
# Built from the two statements above, so they cannot drift.
LOAD_ROOT_CUSTOMER = (
    "SELECT loaded.* FROM ("
    + ROOTS_OF_CUSTOMERS.strip().replace("$1::uuid[]", "ARRAY[$1::uuid]")
    + ") AS roots CROSS JOIN LATERAL ("
    + LOAD_CUSTOMER.strip().replace("$1", "roots.root")
    + ") AS loaded"
)

REFRESH_PROFILE = """
UPDATE customers SET updated_at = now(), profile = (
    SELECT coalesce(jsonb_object_agg(field, value) FILTER (WHERE value IS NOT NULL), '{}'::jsonb)
    FROM (
        SELECT DISTINCT ON (field) field, value FROM profile_changes
        WHERE customer_id = $1 AND effective_at <= now()
        ORDER BY field, effective_at DESC, change_id DESC
    ) latest)
WHERE customer_id = $1
"""

CURRENT_PROFILE = "SELECT profile FROM customers WHERE customer_id = $1"

INSERT_CUSTOMER = "INSERT INTO customers (customer_id) VALUES ($1)"

# ON CONFLICT DO NOTHING: an identifier a concurrent writer took shows as a
# short row count, not as a unique violation, which PostgreSQL would log with
# the identifier's value (personal data) in it.
INSERT_IDENTIFIERS = """
INSERT INTO identifiers (kind, source, value, customer_id)
SELECT kind, source, value, $4 FROM unnest($1::smallint[], $2::text[], $3::text[]) AS q(kind, source, value)
ON CONFLICT (kind, source, value) DO NOTHING
"""

DETACH_IDENTIFIER = """
DELETE FROM identifiers WHERE kind = $1 AND source = $2 AND value = $3 RETURNING customer_id
"""

# One change of a profile, its fields together (see migration 0003). The
# customer's row is held first, as a foreign key would: erasure cannot delete
# the customer under it, and a customer already erased writes nothing (0 rows).
INSERT_PROFILE_UPDATE = """
WITH held AS (SELECT customer_id FROM customers WHERE customer_id = $1 FOR KEY SHARE)
INSERT INTO profile_updates (customer_id, fields, effective_at, actor, merge_id)
SELECT customer_id, $2::jsonb, coalesce($3, now()), $4, $5 FROM held
"""

# Holds existing customers (as INSERT_PROFILE_UPDATE does) before their history
# is written by COPY; returns those that still exist.
HOLD_CUSTOMERS = """
SELECT customer_id FROM customers WHERE customer_id = ANY($1::uuid[]) FOR KEY SHARE
"""

IDENTIFIERS_OF = "SELECT kind, source, value FROM identifiers WHERE customer_id = ANY($1::uuid[])"

LOCK_CUSTOMERS = """
SELECT customer_id, created_at, merged_into FROM customers
WHERE customer_id = ANY($1::uuid[]) ORDER BY customer_id FOR UPDATE
"""

INSERT_MERGE = """
INSERT INTO merges (merge_id, surviving_customer_id, merged_customer_id, joining_identifiers,
                    actor, reason, policy)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING *
"""

SET_MERGED_INTO = "UPDATE customers SET merged_into = $2, updated_at = now() WHERE customer_id = $1"

SELECT_MERGE = "SELECT * FROM merges WHERE merge_id = $1"
SELECT_MERGE_FOR_UPDATE = "SELECT * FROM merges WHERE merge_id = $1 FOR UPDATE"

MARK_UNMERGED = """
UPDATE merges SET unmerged_at = now(), unmerged_by = $2 WHERE merge_id = $1 RETURNING *
"""

DELETE_MERGE_TAKEOVERS = "DELETE FROM profile_updates WHERE merge_id = $1"

LIST_MERGES = """
SELECT * FROM merges
WHERE (surviving_customer_id = ANY($1::uuid[]) OR merged_customer_id = ANY($1::uuid[]))
  AND ($2 OR unmerged_at IS NULL)
ORDER BY merged_at DESC, merge_id
"""

INSERT_EVENT = """
INSERT INTO identity_events (event_type, customer_id, other_customer_id, merge_id,
                             identifier_kind, identifier_source, identifier_value)
VALUES ($1, $2, $3, $4, $5, $6, $7)
"""

# In (xid, event_id) order, and only events of transactions older than any
# still running (see migration 0002): an event can never commit behind a
# cursor given out. A transaction left open anywhere in the database cluster
# holds the stream back until it ends.
EVENTS_AFTER = """
SELECT xid, event_id, event_type, customer_id, other_customer_id, merge_id, occurred_at,
       identifier_kind, identifier_source, identifier_value
FROM identity_events
WHERE (xid, event_id) > ($1::xid8, $2::bigint)
  AND xid < (SELECT pg_snapshot_xmin(pg_current_snapshot()))
ORDER BY xid, event_id
LIMIT $3
"""

# An erased customer's removed identifiers leave the outbox with them.
FORGET_REMOVED_IDENTIFIERS = """
UPDATE identity_events
SET identifier_kind = NULL, identifier_source = NULL, identifier_value = NULL
WHERE customer_id = ANY($1::uuid[]) AND identifier_value IS NOT NULL
"""

CLAIM_IDEMPOTENCY_KEY = """
INSERT INTO idempotency_keys (method, key, fingerprint) VALUES ($1, $2, $3)
ON CONFLICT (method, key) DO NOTHING
"""

SELECT_IDEMPOTENCY_KEY = (
    "SELECT fingerprint, result FROM idempotency_keys WHERE method = $1 AND key = $2"
)

SAVE_IDEMPOTENCY_RESULT = "UPDATE idempotency_keys SET result = $3 WHERE method = $1 AND key = $2"

# An erasure's result is saved after the erasure, outside the claiming
# transaction; only under the request that claimed the key, never over
# another request's result.
SAVE_ERASURE_RESULT = """
INSERT INTO idempotency_keys (method, key, fingerprint, result) VALUES ('ForgetCustomer', $1, $2, $3)
ON CONFLICT (method, key) DO UPDATE SET result = excluded.result
WHERE idempotency_keys.fingerprint = excluded.fingerprint
"""

UPSERT_PREFERENCES = """
INSERT INTO contact_preferences (customer_id, do_not_contact, preferred_channel, wants_human)
VALUES ($1, coalesce($2, false), coalesce($3, 0), coalesce($4, false))
ON CONFLICT (customer_id) DO UPDATE SET
    do_not_contact = coalesce($2, contact_preferences.do_not_contact),
    preferred_channel = coalesce($3, contact_preferences.preferred_channel),
    wants_human = coalesce($4, contact_preferences.wants_human),
    updated_at = now()
"""

UPSERT_CONSENT = """
INSERT INTO consents (customer_id, channel, status, updated_at, source) VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (customer_id, channel) DO UPDATE SET
    status = excluded.status, updated_at = excluded.updated_at, source = excluded.source
WHERE excluded.updated_at >= consents.updated_at  -- an older consent arriving late loses
"""

INSERT_PREFERENCE_CHANGE = """
INSERT INTO preference_changes (customer_id, field, value, source, actor) VALUES ($1, $2, $3, $4, $5)
"""

LIST_PROFILE_CHANGES = """
SELECT field, value, effective_at, recorded_at, actor, change_id, position FROM profile_changes
WHERE customer_id = $1 AND effective_at >= $2 AND effective_at < $3
  AND (change_id, position) > ($4, $5)
ORDER BY change_id, position LIMIT $6
"""

LIST_CUSTOMERS = """
SELECT customer_id FROM customers
WHERE merged_into IS NULL AND customer_id > $1
  AND ($2 = '' OR profile -> 'segment' ->> 's' = $2)
  AND ($3 = '' OR profile -> 'plan' ->> 's' = $3)
  AND ($4 = '' OR profile -> 'region' ->> 's' = $4)
  AND ($5 = '' OR profile -> 'owner_team' ->> 's' = $5)
  AND ($6 = '' OR lower(profile -> 'display_name' ->> 's') LIKE lower($6) || '%')
ORDER BY customer_id LIMIT $7
"""

DELETE_CUSTOMERS = "DELETE FROM customers WHERE customer_id = ANY($1::uuid[])"
# Erasure locks the customers before deleting their history (no foreign key
# cascades it, migration 0003): a write of history waits for the erasure, then
# finds the customer gone and writes nothing.
LOCK_CUSTOMERS_FOR_ERASURE = """
SELECT customer_id FROM customers WHERE customer_id = ANY($1::uuid[]) ORDER BY customer_id FOR UPDATE
"""
DELETE_PROFILE_HISTORY = "DELETE FROM profile_updates WHERE customer_id = ANY($1::uuid[])"
DELETE_IDEMPOTENCY_RESULTS = """
DELETE FROM idempotency_keys WHERE result ->> 'customer_id' = ANY($1::text[])
"""
INSERT_ERASURE = """
INSERT INTO erasures (erasure_id, actor, reason, customers, services, complete)
VALUES ($1, $2, $3, $4, $5, $6)
"""

# Bulk creation of customers none of whose identifiers is known yet, in one
# statement for a whole batch: the rows with a known identifier are left out,
# each key is claimed with its result at once (a key another request holds
# leaves its row out too), then the customers, their identifiers, their first
# profile change and their CREATED events are written; history and events in
# the rows' order (change_id and event_id keep it). One round trip instead of
# nine, and no second write of each key to save its result. The caller checks
# `attached` against `expected` (an identifier a concurrent writer took) and
# rolls back when they differ.
INSERT_FRESH_CUSTOMERS = """
WITH input AS (
    SELECT * FROM unnest($1::uuid[], $2::jsonb[], $3::text[], $4::timestamptz[], $5::text[],
                         $6::bytea[], $7::jsonb[])
        WITH ORDINALITY AS q(customer_id, profile, fields, effective_at, key, fingerprint, result, n)
), identifier AS (
    SELECT * FROM unnest($8::smallint[], $9::text[], $10::text[], $11::uuid[])
        AS q(kind, source, value, customer_id)
), unknown AS (
    SELECT input.* FROM input
    WHERE NOT EXISTS (SELECT FROM identifier x JOIN identifiers i USING (kind, source, value)
                      WHERE x.customer_id = input.customer_id)
), claimed AS (
    INSERT INTO idempotency_keys (method, key, fingerprint, result)
    SELECT 'Resolve', key, fingerprint, result FROM unknown WHERE key IS NOT NULL
    ON CONFLICT (method, key) DO NOTHING
    RETURNING key
), fresh AS (
    SELECT * FROM unknown WHERE key IS NULL OR key IN (SELECT key FROM claimed)
), new_customers AS (
    INSERT INTO customers (customer_id, profile) SELECT customer_id, profile FROM fresh
    RETURNING customer_id
), new_identifiers AS (
    INSERT INTO identifiers (kind, source, value, customer_id)
    SELECT x.kind, x.source, x.value, x.customer_id FROM identifier x JOIN fresh USING (customer_id)
    ON CONFLICT (kind, source, value) DO NOTHING
    RETURNING customer_id
), history AS (
    INSERT INTO profile_updates (customer_id, fields, effective_at, actor)
    SELECT customer_id, fields::jsonb, coalesce(effective_at, now()), $12 FROM fresh
    WHERE fields IS NOT NULL ORDER BY n
), events AS (
    INSERT INTO identity_events (event_type, customer_id)
    SELECT $13, customer_id FROM fresh ORDER BY n
)
SELECT ARRAY(SELECT customer_id FROM new_customers) AS created,
       (SELECT count(*) FROM new_identifiers) AS attached,
       (SELECT count(*) FROM identifier JOIN fresh USING (customer_id)) AS expected
"""

# Events in the order given (followers read them in event_id order).
BULK_INSERT_EVENTS = """
INSERT INTO identity_events (event_type, customer_id)
SELECT $1, customer_id FROM unnest($2::uuid[]) WITH ORDINALITY AS q(customer_id, n) ORDER BY n
"""

# A key is claimed with its result: the set-based paths know each row's
# result before they write it, and a claim that fails rolls them back.
BULK_CLAIM_IDEMPOTENCY_KEYS = """
INSERT INTO idempotency_keys (method, key, fingerprint, result)
SELECT $1, key, fingerprint, result FROM unnest($2::text[], $3::bytea[], $4::jsonb[])
    AS q(key, fingerprint, result)
ON CONFLICT (method, key) DO NOTHING
RETURNING key
"""

# Saved results of keys, for answering a batch's re-sent rows in one read.
SELECT_IDEMPOTENCY_RESULTS = """
SELECT key, fingerprint, result FROM idempotency_keys WHERE method = $1 AND key = ANY($2::text[])
"""

# The identifiers of kinds $2 held anywhere in each root's cluster (the root
# and every customer merged into it): merge protection for a whole batch.
CLUSTER_IDENTIFIERS = """
WITH RECURSIVE members AS (
    SELECT customer_id AS root, customer_id FROM customers WHERE customer_id = ANY($1::uuid[])
    UNION ALL
    SELECT m.root, c.customer_id FROM customers c JOIN members m ON c.merged_into = m.customer_id
)
SELECT m.root, i.kind, i.source, i.value
FROM members m JOIN identifiers i USING (customer_id)
WHERE i.kind = ANY($2::smallint[])
"""

# REFRESH_PROFILE for many customers in one statement.
REFRESH_PROFILES = """
UPDATE customers c SET updated_at = now(), profile = (
    SELECT coalesce(jsonb_object_agg(field, value) FILTER (WHERE value IS NOT NULL), '{}'::jsonb)
    FROM (
        SELECT DISTINCT ON (field) field, value FROM profile_changes p
        WHERE p.customer_id = c.customer_id AND p.effective_at <= now()
        ORDER BY field, effective_at DESC, change_id DESC
    ) latest)
WHERE c.customer_id = ANY($1::uuid[])
"""

TRANSACTION_TIME = "SELECT now()"

# COPY's columns for profile updates (change_id and recorded_at take their defaults).
PROFILE_UPDATE_COLUMNS = ("customer_id", "fields", "effective_at", "actor")

NIL_UUID = uuid.UUID(int=0)


@dataclass(frozen=True)
class FreshCustomer:
    """A customer `insert_fresh_customers` creates: its new id, identifiers
    and first profile (effective at `effective_at`, else now), and the
    idempotency key (with its request's fingerprint and result) it claims."""

    customer_id: uuid.UUID
    identifiers: Sequence[NormalizedIdentifier]
    profile: ProfileFields
    effective_at: datetime | None
    key: str | None
    fingerprint: bytes | None
    result: dict[str, Any] | None


class RetryableConflict(Exception):
    """Another transaction got there first (a unique identifier, a merge); retry."""


def _row_count(status: str) -> int:
    """The row count of a command status such as "INSERT 0 3"."""
    return int(status.rsplit(" ", 1)[-1])


def _identifier_arrays(
    identifiers: Sequence[NormalizedIdentifier],
) -> tuple[list[int], list[str], list[str]]:
    return (
        [int(i.kind) for i in identifiers],
        [i.source for i in identifiers],
        [i.value for i in identifiers],
    )


def _event_from_row(row: asyncpg.Record) -> IdentityEvent:
    identifier = None
    if row["identifier_value"] is not None:
        identifier = NormalizedIdentifier(
            IdentifierKind(row["identifier_kind"]),
            row["identifier_source"],
            row["identifier_value"],
        )
    return IdentityEvent(
        xid=row["xid"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        customer_id=str(row["customer_id"]),
        other_customer_id=str(row["other_customer_id"]) if row["other_customer_id"] else None,
        merge_id=str(row["merge_id"]) if row["merge_id"] else None,
        occurred_at=row["occurred_at"],
        identifier=identifier,
    )


def _merge_from_row(row: asyncpg.Record) -> Merge:
    return Merge(
        merge_id=str(row["merge_id"]),
        surviving_customer_id=str(row["surviving_customer_id"]),
        merged_customer_id=str(row["merged_customer_id"]),
        joining_identifiers=tuple(
            NormalizedIdentifier(IdentifierKind(k), s, v) for k, s, v in row["joining_identifiers"]
        ),
        actor=row["actor"],
        reason=row["reason"],
        policy=row["policy"],
        merged_at=row["merged_at"],
        unmerged_at=row["unmerged_at"],
    )


class IdentityTransaction:
    """The SQL of one transaction; obtained from `IdentityStore.transaction()`."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        # Customers this transaction created or already announced a change of:
        # one event each (CREATED covers a new customer's first profile).
        self._announced: set[str] = set()

    async def _fetch_one(self, query: str, *args: Any) -> asyncpg.Record:
        row = await self.connection.fetchrow(query, *args)
        assert row is not None, "statement returns a row"
        return row

    # --- idempotency -------------------------------------------------------
    async def claim_idempotency_key(
        self, method: str, key: str, fingerprint: bytes
    ) -> tuple[bool, dict[str, Any] | None]:
        """Claims a key for this transaction. Returns (claimed, prior result).

        A concurrent request with the same key waits on the key's row until the
        first one commits, then finds its result; if the first rolled back, the
        second claims the key itself.
        """
        status = await self.connection.execute(CLAIM_IDEMPOTENCY_KEY, method, key, fingerprint)
        if status.endswith(" 1"):
            return True, None
        row = await self.connection.fetchrow(SELECT_IDEMPOTENCY_KEY, method, key)
        if row is None:  # the claimant rolled back between our insert and select
            raise RetryableConflict()
        if bytes(row["fingerprint"]) != fingerprint:
            return False, {"fingerprint_mismatch": True}
        result: dict[str, Any] | None = row["result"]
        return False, result

    async def save_idempotency_result(self, method: str, key: str, result: dict[str, Any]) -> None:
        await self.connection.execute(SAVE_IDEMPOTENCY_RESULT, method, key, result)

    # --- lookups -----------------------------------------------------------
    async def find_roots(
        self, identifiers: Sequence[NormalizedIdentifier]
    ) -> dict[NormalizedIdentifier, str]:
        """The surviving customer of each identifier that is known."""
        rows = await self.connection.fetch(FIND_ROOTS, *_identifier_arrays(identifiers))
        return {
            NormalizedIdentifier(IdentifierKind(r["kind"]), r["source"], r["value"]): str(r["root"])
            for r in rows
        }

    async def owners(
        self, identifiers: Sequence[NormalizedIdentifier]
    ) -> dict[NormalizedIdentifier, AttachedIdentifier]:
        """The customer each known identifier is attached to (before merges)."""
        rows = await self.connection.fetch(OWNERS, *_identifier_arrays(identifiers))
        return {
            (
                identifier := NormalizedIdentifier(
                    IdentifierKind(r["kind"]), r["source"], r["value"]
                )
            ): AttachedIdentifier(identifier, str(r["customer_id"]), r["attached_at"])
            for r in rows
        }

    async def roots_of(self, customer_ids: Sequence[str]) -> dict[str, str]:
        rows = await self.connection.fetch(ROOTS_OF_CUSTOMERS, [uuid.UUID(c) for c in customer_ids])
        return {str(r["start"]): str(r["root"]) for r in rows}

    async def cluster_members(self, root_id: str) -> list[str]:
        rows = await self.connection.fetch(CLUSTER_MEMBERS, uuid.UUID(root_id))
        return [str(r["customer_id"]) for r in rows]

    async def load_customer(
        self, customer_id: str, as_of: datetime | None = None, *, require_root: bool = False
    ) -> Customer | None:
        """The customer with everything a Customer message shows; None when
        missing (or, with `require_root`, when merged into another since)."""
        row = await self.connection.fetchrow(LOAD_CUSTOMER, uuid.UUID(customer_id))
        if row is None or (require_root and row["merged_into"] is not None):
            return None
        profile: ProfileFields = row["profile"]
        if as_of is not None:
            profile = await self.connection.fetchval(PROFILE_AS_OF, uuid.UUID(customer_id), as_of)
        return _customer(row, profile, as_of)

    async def load_root_customer(self, customer_id: str) -> Customer | None:
        """The customer `customer_id` belongs to now (its survivor after
        merges), in one statement; None when unknown."""
        row = await self.connection.fetchrow(LOAD_ROOT_CUSTOMER, uuid.UUID(customer_id))
        return None if row is None else _customer(row, row["profile"], None)

    async def load_customers(
        self, customer_ids: Sequence[str], as_of: datetime | None = None
    ) -> dict[str, Customer]:
        """`load_customer` of many customers in one statement, by id (the
        missing left out)."""
        rows = await self.connection.fetch(
            LOAD_CUSTOMERS, [uuid.UUID(c) for c in customer_ids], as_of
        )
        return {
            str(r["customer_id"]): _customer(
                r, r["profile"] if as_of is None else r["profile_as_of"], as_of
            )
            for r in rows
        }

    async def list_customer_ids(
        self,
        after: str,
        segment: str,
        plan: str,
        region: str,
        owner_team: str,
        name_prefix: str,
        limit: int,
    ) -> list[str]:
        after_id = uuid.UUID(after) if after else NIL_UUID
        escaped = name_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        rows = await self.connection.fetch(
            LIST_CUSTOMERS, after_id, segment, plan, region, owner_team, escaped, limit
        )
        return [str(r["customer_id"]) for r in rows]

    # --- bulk ------------------------------------------------------------------
    async def claim_idempotency_keys(
        self,
        method: str,
        keys: Sequence[str],
        fingerprints: Sequence[bytes],
        results: Sequence[dict[str, Any]],
    ) -> set[str]:
        """Claims the keys not used before, each with its request's result
        (saved at once: the caller writes the effect in the same
        transaction); returns those claimed."""
        rows = await self.connection.fetch(
            BULK_CLAIM_IDEMPOTENCY_KEYS, method, keys, fingerprints, results
        )
        return {r["key"] for r in rows}

    async def saved_results(
        self, method: str, keys: Sequence[str]
    ) -> dict[str, tuple[bytes, dict[str, Any] | None]]:
        """Each key already used: its request's fingerprint and saved result
        (None while the request that claimed it is still running)."""
        rows = await self.connection.fetch(SELECT_IDEMPOTENCY_RESULTS, method, list(keys))
        return {r["key"]: (bytes(r["fingerprint"]), r["result"]) for r in rows}

    async def cluster_identifiers(
        self, roots: Iterable[str], kinds: Iterable[IdentifierKind]
    ) -> dict[str, list[NormalizedIdentifier]]:
        """The identifiers of the given kinds in each root's cluster."""
        rows = await self.connection.fetch(
            CLUSTER_IDENTIFIERS, [uuid.UUID(r) for r in roots], [int(k) for k in kinds]
        )
        found: dict[str, list[NormalizedIdentifier]] = {}
        for r in rows:
            found.setdefault(str(r["root"]), []).append(
                NormalizedIdentifier(IdentifierKind(r["kind"]), r["source"], r["value"])
            )
        return found

    async def copy_profile_changes(
        self, changes: Sequence[tuple[uuid.UUID, ProfileFields, datetime | None, str]]
    ) -> None:
        """Writes many customers' profile changes with COPY, in the order
        given (so change_id keeps it); a change without a time takes effect
        at the transaction's time, as `record_profile_changes` does."""
        now: datetime = await self.connection.fetchval(TRANSACTION_TIME)
        await self.connection.copy_records_to_table(
            "profile_updates",
            records=[
                (customer_id, list(fields.items()), effective_at or now, actor)
                for customer_id, fields, effective_at, actor in changes
                if fields
            ],
            columns=PROFILE_UPDATE_COLUMNS,
        )

    async def update_known_profiles(
        self, updates: Sequence[tuple[str, ProfileFields, datetime | None, str]]
    ) -> None:
        """Upserts profiles of existing customers, in order: each update as
        `record_profile_changes` would in a transaction of its own (its
        history, the current profiles refreshed, one PROFILE_CHANGED each)."""
        written = [
            (uuid.UUID(customer_id), dict(fields), at, actor)
            for customer_id, fields, at, actor in updates
            if fields
        ]
        if not written:
            return
        wanted = {c for c, _, _, _ in written}
        held = await self.connection.fetch(HOLD_CUSTOMERS, list(wanted))
        if len(held) != len(wanted):
            raise RetryableConflict()  # erased since it was found: decide again
        await self.copy_profile_changes(written)
        await self.connection.execute(REFRESH_PROFILES, list({c for c, _, _, _ in written}))
        await self.connection.execute(
            BULK_INSERT_EVENTS, EVENT_PROFILE_CHANGED, [c for c, _, _, _ in written]
        )
        self._announced.update(str(c) for c, _, _, _ in written)

    async def insert_fresh_customers(
        self, customers: Sequence[FreshCustomer], actor: str
    ) -> list[int]:
        """Creates the customers none of whose identifiers is known and whose
        idempotency key (if any) no other request holds, with their
        identifiers, first profile change (effective at the time given, else
        the transaction's) and saved result, in one statement; returns the
        positions of those created, in order.

        Raises RetryableConflict when a concurrent writer took an identifier
        (the transaction must then end)."""
        ids = [customer.customer_id for customer in customers]
        owners = [c.customer_id for c in customers for _ in c.identifiers]
        flat = [identifier for c in customers for identifier in c.identifiers]
        row = await self._fetch_one(
            INSERT_FRESH_CUSTOMERS,
            ids,
            [c.profile for c in customers],
            # (As JSON text: asyncpg would take a list inside an array
            # parameter for one more dimension of the array.)
            [
                orjson.dumps(list(c.profile.items())).decode() if c.profile else None
                for c in customers
            ],
            [c.effective_at for c in customers],
            [c.key for c in customers],
            [c.fingerprint for c in customers],
            [c.result for c in customers],
            *_identifier_arrays(flat),
            owners,
            actor,
            EVENT_CREATED,
        )
        if row["attached"] != row["expected"]:
            raise RetryableConflict()
        position = {customer_id: i for i, customer_id in enumerate(ids)}
        return sorted(position[customer_id] for customer_id in row["created"])

    # --- customers and identifiers ------------------------------------------
    async def insert_customer(self, customer_id: str) -> None:
        await self.connection.execute(INSERT_CUSTOMER, uuid.UUID(customer_id))
        await self.record_event(EVENT_CREATED, customer_id)
        self._announced.add(customer_id)

    async def attach_identifiers(
        self, customer_id: str, identifiers: Sequence[NormalizedIdentifier]
    ) -> None:
        """Attaches identifiers none of which is attached yet; raises
        RetryableConflict (and the transaction must end) when a concurrent
        writer took one."""
        if not identifiers:
            return
        status = await self.connection.execute(
            INSERT_IDENTIFIERS, *_identifier_arrays(identifiers), uuid.UUID(customer_id)
        )
        if _row_count(status) != len(identifiers):
            raise RetryableConflict()

    async def detach_identifier(self, identifier: NormalizedIdentifier) -> str | None:
        """Removes an identifier and announces it (IDENTIFIER_REMOVED, naming
        the customer it was attached to); returns that customer, or None."""
        owner = await self.connection.fetchval(
            DETACH_IDENTIFIER, int(identifier.kind), identifier.source, identifier.value
        )
        if owner is None:
            return None
        await self.record_event(EVENT_IDENTIFIER_REMOVED, str(owner), identifier=identifier)
        return str(owner)

    async def lock_customers(self, customer_ids: Iterable[str]) -> dict[str, LockedCustomer]:
        """Row-locks customers in id order (no deadlocks between two merges)."""
        rows = await self.connection.fetch(
            LOCK_CUSTOMERS, [uuid.UUID(c) for c in set(customer_ids)]
        )
        return {
            str(r["customer_id"]): LockedCustomer(
                str(r["customer_id"]),
                r["created_at"],
                None if r["merged_into"] is None else str(r["merged_into"]),
            )
            for r in rows
        }

    async def identifiers_of(self, customer_ids: Sequence[str]) -> list[NormalizedIdentifier]:
        rows = await self.connection.fetch(IDENTIFIERS_OF, [uuid.UUID(c) for c in customer_ids])
        return [
            NormalizedIdentifier(IdentifierKind(r["kind"]), r["source"], r["value"]) for r in rows
        ]

    # --- profiles ------------------------------------------------------------
    async def record_profile_changes(
        self,
        customer_id: str,
        changes: Mapping[str, TaggedValue | None],
        effective_at: datetime | None,
        actor: str,
        merge_id: str | None = None,
    ) -> None:
        """Records changes (effective now when `effective_at` is None) and
        refreshes the current profile from the history."""
        if not changes:
            return
        status = await self.connection.execute(
            INSERT_PROFILE_UPDATE,
            uuid.UUID(customer_id),
            list(changes.items()),
            effective_at,
            actor,
            uuid.UUID(merge_id) if merge_id else None,
        )
        if _row_count(status) != 1:
            raise RetryableConflict()  # erased since it was found: decide again
        await self.connection.execute(REFRESH_PROFILE, uuid.UUID(customer_id))
        if merge_id is None:  # (a merge's takeovers are announced by MERGED)
            await self._announce_change(customer_id)

    async def current_profile(self, customer_id: str) -> ProfileFields:
        profile: ProfileFields = await self.connection.fetchval(
            CURRENT_PROFILE, uuid.UUID(customer_id)
        )
        return profile

    async def list_profile_changes(
        self,
        customer_id: str,
        start: datetime,
        end: datetime,
        after: tuple[int, int],
        limit: int,
    ) -> list[tuple[tuple[int, int], ProfileChange]]:
        """Field changes in order, after the (change_id, position) `after`;
        each with its own position."""
        rows = await self.connection.fetch(
            LIST_PROFILE_CHANGES, uuid.UUID(customer_id), start, end, *after, limit
        )
        return [
            (
                (r["change_id"], r["position"]),
                ProfileChange(
                    r["field"], r["value"], r["effective_at"], r["recorded_at"], r["actor"]
                ),
            )
            for r in rows
        ]

    # --- merges --------------------------------------------------------------
    async def insert_merge(
        self,
        surviving: str,
        merged: str,
        joining: Sequence[NormalizedIdentifier],
        actor: str,
        reason: str,
        policy: str,
    ) -> Merge:
        merge_id = str(uuid.uuid4())
        row = await self._fetch_one(
            INSERT_MERGE,
            uuid.UUID(merge_id),
            uuid.UUID(surviving),
            uuid.UUID(merged),
            [[int(i.kind), i.source, i.value] for i in joining],
            actor,
            reason,
            policy,
        )
        await self.connection.execute(SET_MERGED_INTO, uuid.UUID(merged), uuid.UUID(surviving))
        await self.record_event(EVENT_MERGED, surviving, merged, merge_id)
        return _merge_from_row(row)

    async def merge_for_update(self, merge_id: str) -> Merge | None:
        row = await self.connection.fetchrow(SELECT_MERGE_FOR_UPDATE, uuid.UUID(merge_id))
        return _merge_from_row(row) if row else None

    async def get_merge(self, merge_id: str) -> Merge | None:
        row = await self.connection.fetchrow(SELECT_MERGE, uuid.UUID(merge_id))
        return _merge_from_row(row) if row else None

    async def undo_merge(self, merge: Merge, actor: str) -> Merge:
        await self.connection.execute(SET_MERGED_INTO, uuid.UUID(merge.merged_customer_id), None)
        await self.connection.execute(DELETE_MERGE_TAKEOVERS, uuid.UUID(merge.merge_id))
        await self.connection.execute(REFRESH_PROFILE, uuid.UUID(merge.surviving_customer_id))
        row = await self._fetch_one(MARK_UNMERGED, uuid.UUID(merge.merge_id), actor)
        await self.record_event(
            EVENT_UNMERGED, merge.surviving_customer_id, merge.merged_customer_id, merge.merge_id
        )
        return _merge_from_row(row)

    async def list_merges(self, customer_ids: Sequence[str], include_undone: bool) -> list[Merge]:
        rows = await self.connection.fetch(
            LIST_MERGES, [uuid.UUID(c) for c in customer_ids], include_undone
        )
        return [_merge_from_row(r) for r in rows]

    # --- contact preferences -------------------------------------------------
    async def update_preferences(
        self,
        customer_id: str,
        do_not_contact: bool | None,
        preferred_channel: int | None,
        wants_human: bool | None,
        consents: Sequence[tuple[int, int, datetime, str]],
        actor: str,
    ) -> None:
        cid = uuid.UUID(customer_id)
        if (do_not_contact, preferred_channel, wants_human) != (None, None, None):
            await self.connection.execute(
                UPSERT_PREFERENCES, cid, do_not_contact, preferred_channel, wants_human
            )
        for name, value in (
            ("do_not_contact", do_not_contact),
            ("preferred_channel", preferred_channel),
            ("wants_human", wants_human),
        ):
            if value is not None:
                await self.connection.execute(INSERT_PREFERENCE_CHANGE, cid, name, value, "", actor)
        for channel, status, at, source in consents:
            await self.connection.execute(UPSERT_CONSENT, cid, channel, status, at, source)
            await self.connection.execute(
                INSERT_PREFERENCE_CHANGE, cid, f"consent.{channel}", status, source, actor
            )
        if consents or (do_not_contact, preferred_channel, wants_human) != (None, None, None):
            await self._announce_change(customer_id)

    async def _announce_change(self, customer_id: str) -> None:
        """A PROFILE_CHANGED event, once per customer and transaction."""
        if customer_id not in self._announced:
            self._announced.add(customer_id)
            await self.record_event(EVENT_PROFILE_CHANGED, customer_id)

    # --- events and erasure --------------------------------------------------
    async def record_event(
        self,
        event_type: int,
        customer_id: str,
        other: str | None = None,
        merge_id: str | None = None,
        identifier: NormalizedIdentifier | None = None,
    ) -> None:
        await self.connection.execute(
            INSERT_EVENT,
            event_type,
            uuid.UUID(customer_id),
            uuid.UUID(other) if other else None,
            uuid.UUID(merge_id) if merge_id else None,
            int(identifier.kind) if identifier else None,
            identifier.source if identifier else None,
            identifier.value if identifier else None,
        )

    async def delete_customers(self, customer_ids: Sequence[str]) -> int:
        ids = [uuid.UUID(c) for c in customer_ids]
        await self.connection.execute(LOCK_CUSTOMERS_FOR_ERASURE, ids)
        await self.connection.execute(DELETE_PROFILE_HISTORY, ids)
        await self.connection.execute(DELETE_IDEMPOTENCY_RESULTS, list(customer_ids))
        await self.connection.execute(
            FORGET_REMOVED_IDENTIFIERS, [uuid.UUID(c) for c in customer_ids]
        )
        status = await self.connection.execute(
            DELETE_CUSTOMERS, [uuid.UUID(c) for c in customer_ids]
        )
        return int(status.split()[-1])

    async def save_erasure_result(
        self, key: str, fingerprint: bytes, result: dict[str, Any]
    ) -> None:
        await self.connection.execute(SAVE_ERASURE_RESULT, key, fingerprint, result)

    async def record_erasure(
        self,
        erasure_id: str,
        actor: str,
        reason: str,
        customers: int,
        services: list[dict[str, Any]],
        complete: bool,
    ) -> None:
        await self.connection.execute(
            INSERT_ERASURE, uuid.UUID(erasure_id), actor, reason, customers, services, complete
        )


class IdentityStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[IdentityTransaction]:
        async with self.pool.acquire() as connection, connection.transaction():
            yield IdentityTransaction(connection)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[IdentityTransaction]:
        """A connection outside any transaction: each statement sees the latest state."""
        async with self.pool.acquire() as connection:
            yield IdentityTransaction(connection)

    @contextlib.asynccontextmanager
    async def reading(self) -> AsyncIterator[IdentityTransaction]:
        """A read-only snapshot: every query of the block sees the same state."""
        async with (
            self.pool.acquire() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            yield IdentityTransaction(connection)

    async def events_after(self, cursor: tuple[int, int], limit: int) -> list[IdentityEvent]:
        """Up to `limit` events after the (xid, event_id) `cursor`, in stream order."""
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(EVENTS_AFTER, cursor[0], cursor[1], limit)
        return [_event_from_row(r) for r in rows]


def _customer(row: Any, profile: ProfileFields, as_of: datetime | None) -> Customer:
    """A Customer from a LOAD_CUSTOMER row and the profile to show (as of
    `as_of` when given, which is then the time the answer describes)."""
    read_at: datetime = row["read_at"] if as_of is None else as_of
    preferences = Preferences()
    if row["preferences"]:
        updated_at = row["preferences"][0][3]
        flags = row["preference_flags"] or {}
        preferences = Preferences(
            (),
            bool(flags.get("do_not_contact", False)),
            int(flags.get("preferred_channel", 0)),
            bool(flags.get("wants_human", False)),
            updated_at,
        )
    consents = tuple(ChannelConsent(c, s, at, src) for c, s, at, src in row["consents"])
    latest = max(
        [preferences.updated_at, *(c.updated_at for c in consents)],
        key=lambda t: t or datetime.min.replace(tzinfo=read_at.tzinfo),
    )
    preferences = Preferences(
        consents,
        preferences.do_not_contact,
        preferences.preferred_channel,
        preferences.wants_human,
        latest,
    )
    return Customer(
        customer_id=str(row["customer_id"]),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        profile=profile,
        identifiers=tuple(
            AttachedIdentifier(NormalizedIdentifier(IdentifierKind(k), s, v), str(cid), at)
            for k, s, v, cid, at in row["identifiers"]
        ),
        merged_customer_ids=tuple(str(m) for m in row["merged_ids"]),
        preferences=preferences,
        as_of=read_at,
    )

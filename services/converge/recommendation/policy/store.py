"""All SQL of the policy area (migrations 0001, 0010): stored versions, the
active one, the activation log, and the notification every replica listens
to. Rows leave as frozen dataclasses. The shipped default is no stored
version: while it is in effect policy_active has no row, and the log names
it null (as "from" and as "to").

Creating and activating take one advisory lock (transaction-scoped), so
version numbers follow each other without gaps and two activations never
interleave; both are rare, so the lock costs nothing that matters. An
activation NOTIFYs `ACTIVATED_CHANNEL` in its transaction: PostgreSQL
delivers it at commit, never for a rolled-back activation."""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

logger = logging.getLogger(__name__)

# The channel activations are announced on (payload: the version, or
# DEFAULT_PAYLOAD when going back to the default).
ACTIVATED_CHANNEL = "recommendation_policy_activated"
DEFAULT_PAYLOAD = "default"
_LOCK = "recommendation:policy"

LOCK = "SELECT pg_advisory_xact_lock(hashtext($1))"
VERSION_COLUMNS = """
    v.version, v.sha256, v.description, v.created_by, v.created_reason, v.created_at,
    v.activated_at, (a.version IS NOT NULL) AS active
"""
SELECT_VERSION = f"""
    SELECT {VERSION_COLUMNS}, v.yaml
    FROM policy_versions v LEFT JOIN policy_active a ON a.version = v.version
    WHERE v.version = $1
"""
SELECT_ACTIVE = f"""
    SELECT {VERSION_COLUMNS}, v.yaml
    FROM policy_active a JOIN policy_versions v ON v.version = a.version
"""
SELECT_ACTIVE_VERSION = "SELECT version FROM policy_active"
LIST_VERSIONS = f"""
    SELECT {VERSION_COLUMNS}, CASE WHEN $3 THEN NULL ELSE v.yaml END AS yaml
    FROM policy_versions v LEFT JOIN policy_active a ON a.version = v.version
    WHERE v.version < $1
    ORDER BY v.version DESC
    LIMIT $2
"""
SELECT_BY_CREATE_KEY = f"""
    SELECT {VERSION_COLUMNS}, v.yaml, v.request_sha256
    FROM policy_versions v LEFT JOIN policy_active a ON a.version = v.version
    WHERE v.idempotency_key = $1
"""
INSERT_VERSION = """
    INSERT INTO policy_versions
        (version, yaml, sha256, description, created_by, created_reason, created_at,
         idempotency_key, request_sha256)
    SELECT coalesce(max(version), 0) + 1, $1, $2, $3, $4, $5, $6, $7, $8 FROM policy_versions
    RETURNING version
"""
SELECT_BY_ACTIVATE_KEY = """
    SELECT version, previous_version FROM policy_activations WHERE idempotency_key = $1
"""
UPSERT_ACTIVE = """
    INSERT INTO policy_active (singleton, version, activated_at) VALUES (true, $1, $2)
    ON CONFLICT (singleton) DO UPDATE SET version = EXCLUDED.version,
                                          activated_at = EXCLUDED.activated_at
"""
DELETE_ACTIVE = "DELETE FROM policy_active"
MARK_ACTIVATED = "UPDATE policy_versions SET activated_at = $2 WHERE version = $1"
LOG_ACTIVATION = """
    INSERT INTO policy_activations
        (version, previous_version, activated_at, activated_by, reason, idempotency_key)
    VALUES ($1, $2, $3, $4, $5, $6)
"""
NOTIFY = "SELECT pg_notify($1, $2)"
DEFAULT_ACTIVATED_AT = "SELECT max(activated_at) FROM policy_activations WHERE version IS NULL"
LIST_ACTIVATIONS = """
    SELECT version, previous_version, activated_at, activated_by, reason
    FROM policy_activations ORDER BY seq
"""


@dataclass(frozen=True)
class StoredVersion:
    version: int
    # None when listed with omit_yaml.
    yaml: str | None
    sha256: str
    description: str
    created_by: str
    created_reason: str
    created_at: datetime
    activated_at: datetime | None
    active: bool


@dataclass(frozen=True)
class NewVersion:
    yaml: str
    description: str
    created_by: str
    created_reason: str
    created_at: datetime
    idempotency_key: str
    # Digest of what the request asked for (text and description).
    request_sha256: str


@dataclass(frozen=True)
class Created:
    version: StoredVersion
    # False when the idempotency key named an earlier request's version.
    new: bool


class IdempotencyConflict(Exception):
    """The idempotency key was used before for another request."""


class ActivationConflict(Exception):
    """The active version is not the one the caller expected."""

    def __init__(self, active: int | None) -> None:
        super().__init__(f"active version is {active}")
        self.active = active


@dataclass(frozen=True)
class Activation:
    # None: the default.
    version: StoredVersion | None
    previous: int | None
    # False when nothing changed (already active, or a repeated request).
    changed: bool


@dataclass(frozen=True)
class ActivationEntry:
    # None: the default (as the version switched to, or from).
    version: int | None
    previous_version: int | None
    activated_at: datetime
    activated_by: str
    reason: str


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", errors="surrogatepass")).hexdigest()


def _version(row: asyncpg.Record | None) -> StoredVersion:
    assert row is not None  # (read inside the transaction that found or wrote it)
    return StoredVersion(
        version=row["version"],
        yaml=row["yaml"],
        sha256=row["sha256"],
        description=row["description"],
        created_by=row["created_by"],
        created_reason=row["created_reason"],
        created_at=row["created_at"],
        activated_at=row["activated_at"],
        active=row["active"],
    )


async def _stored(
    connection: asyncpg.pool.PoolConnectionProxy[asyncpg.Record], version: int | None
) -> StoredVersion | None:
    if version is None:
        return None
    return _version(await connection.fetchrow(SELECT_VERSION, version))


class PolicyStore:
    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def get(self, version: int) -> StoredVersion | None:
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(SELECT_VERSION, version)
        return None if row is None else _version(row)

    async def active(self) -> StoredVersion | None:
        """The active version with its text; None while the default is in effect."""
        async with self.pool.acquire() as connection:
            row = await connection.fetchrow(SELECT_ACTIVE)
        return None if row is None else _version(row)

    async def active_version(self) -> int | None:
        async with self.pool.acquire() as connection:
            version: int | None = await connection.fetchval(SELECT_ACTIVE_VERSION)
        return version

    async def page(self, before: int | None, limit: int, omit_yaml: bool) -> list[StoredVersion]:
        """Up to `limit` versions older than `before` (None: from the newest), newest first."""
        start = before if before is not None else 2**63 - 1
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(LIST_VERSIONS, start, limit, omit_yaml)
        return [_version(r) for r in rows]

    async def create(self, new: NewVersion) -> Created:
        """Stores a version numbered after the newest; the earlier version
        when its idempotency key and request match (IdempotencyConflict when
        only the key does)."""
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(LOCK, _LOCK)
            if new.idempotency_key:
                row = await connection.fetchrow(SELECT_BY_CREATE_KEY, new.idempotency_key)
                if row is not None:
                    if row["request_sha256"] != new.request_sha256:
                        raise IdempotencyConflict(new.idempotency_key)
                    return Created(_version(row), new=False)
            version = await connection.fetchval(
                INSERT_VERSION,
                new.yaml,
                text_sha256(new.yaml),
                new.description,
                new.created_by,
                new.created_reason,
                new.created_at,
                new.idempotency_key,
                new.request_sha256,
            )
            row = await connection.fetchrow(SELECT_VERSION, version)
        return Created(_version(row), new=True)

    async def activate(
        self,
        version: int | None,
        expected_active: int | Any | None,
        at: datetime,
        actor: str,
        reason: str,
        idempotency_key: str,
    ) -> Activation | None:
        """Makes `version` (None: the shipped default) the active one and
        announces it; None when the version does not exist. `expected_active`
        (None: the default; the `ANY_ACTIVE` marker: no expectation) must
        match the active version, else ActivationConflict. A repeated
        idempotency key answers the first result (IdempotencyConflict for
        another version, the default included)."""
        async with self.pool.acquire() as connection, connection.transaction():
            await connection.execute(LOCK, _LOCK)
            if idempotency_key:
                earlier = await connection.fetchrow(SELECT_BY_ACTIVATE_KEY, idempotency_key)
                if earlier is not None:
                    if earlier["version"] != version:
                        raise IdempotencyConflict(idempotency_key)
                    return Activation(
                        await _stored(connection, version),
                        earlier["previous_version"],
                        changed=False,
                    )
            row = None
            if version is not None:
                row = await connection.fetchrow(SELECT_VERSION, version)
                if row is None:
                    return None
            active: int | None = await connection.fetchval(SELECT_ACTIVE_VERSION)
            if expected_active is not ANY_ACTIVE and expected_active != active:
                raise ActivationConflict(active)
            if active == version:
                return Activation(None if row is None else _version(row), active, changed=False)
            if version is None:
                await connection.execute(DELETE_ACTIVE)
            else:
                await connection.execute(UPSERT_ACTIVE, version, at)
                await connection.execute(MARK_ACTIVATED, version, at)
            await connection.execute(
                LOG_ACTIVATION, version, active, at, actor, reason, idempotency_key
            )
            await connection.execute(
                NOTIFY, ACTIVATED_CHANNEL, DEFAULT_PAYLOAD if version is None else str(version)
            )
            stored = await _stored(connection, version)
        return Activation(stored, active, changed=True)

    async def default_activated_at(self) -> datetime | None:
        """When the default was last activated; None if never (it was in
        effect from the start)."""
        async with self.pool.acquire() as connection:
            at: datetime | None = await connection.fetchval(DEFAULT_ACTIVATED_AT)
        return at

    async def activations(self) -> list[ActivationEntry]:
        """The activation log, oldest first (the audit)."""
        async with self.pool.acquire() as connection:
            rows = await connection.fetch(LIST_ACTIVATIONS)
        return [ActivationEntry(**dict(r)) for r in rows]

    # --- following activations ----------------------------------------------------
    async def listen(self, on_activated: Callable[[], None]) -> ActivationListener:
        """A connection kept out of the pool, listening for activations:
        `on_activated()` runs after each one commits (on any replica)."""
        connection = await self.pool.acquire()
        listener = ActivationListener(connection, lambda *_: on_activated())
        try:
            await connection.add_listener(ACTIVATED_CHANNEL, listener.callback)
        except BaseException:
            await self.pool.release(connection)
            raise
        return listener

    async def stop_listening(self, listener: ActivationListener) -> None:
        """Gives the listening connection back, whatever state it is in."""
        try:
            if not listener.is_closed():
                await listener.connection.remove_listener(ACTIVATED_CHANNEL, listener.callback)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            pass  # (a broken connection is replaced when released)
        finally:
            with contextlib.suppress(asyncpg.InterfaceError):  # (released already)
                await self.pool.release(listener.connection)


class _AnyActive:
    def __repr__(self) -> str:
        return "ANY_ACTIVE"


# No expectation about the active version (ActivatePolicy without
# expected_active_version).
ANY_ACTIVE: Any = _AnyActive()


@dataclass(frozen=True)
class ActivationListener:
    connection: asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    callback: Callable[..., None]

    def is_closed(self) -> bool:
        try:
            return bool(self.connection.is_closed())
        except asyncpg.InterfaceError:  # (already given back to the pool)
            return True

"""The asyncpg pool and the versioned SQL migrations of one service.

Each service owns one PostgreSQL schema, named after it, and its connections
see only that schema on their search path; services read each other's data
over gRPC, never through tables.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from typing import Any

import asyncpg
import asyncpg.pool
import orjson

# A connection straight from asyncpg or one borrowed from a pool.
Connection = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy

logger = logging.getLogger(__name__)

_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_SCHEMA_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(folder: Traversable) -> list[Migration]:
    """Reads `NNNN_name.sql` files in version order; other files are an error."""
    found = []
    for entry in folder.iterdir():
        if entry.name.startswith(("_", ".")) or not entry.name.endswith(".sql"):
            continue
        match = _MIGRATION_NAME.match(entry.name)
        if match is None:
            raise ValueError(f"migration file {entry.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration versions in {folder}")
    return found


async def migrate(connection: Connection, schema: str, migrations: list[Migration]) -> list[int]:
    """Applies the migrations not yet applied, each in its own transaction.

    An advisory lock serialises replicas starting together; a migration whose
    text changed after it was applied stops the service rather than drift.
    """
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"bad schema name {schema!r}")
    lock_key = int.from_bytes(
        hashlib.sha256(f"converge:{schema}".encode()).digest()[:8], "big", signed=True
    )
    applied_now: list[int] = []
    await connection.execute("SELECT pg_advisory_lock($1)", lock_key)
    try:
        await connection.execute(
            f"""
            CREATE SCHEMA IF NOT EXISTS {schema};
            CREATE TABLE IF NOT EXISTS {schema}.schema_migrations (
                version    integer PRIMARY KEY,
                name       text NOT NULL,
                checksum   text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            );
            """
        )
        rows = await connection.fetch(f"SELECT version, checksum FROM {schema}.schema_migrations")
        applied = {row["version"]: row["checksum"] for row in rows}
        for migration in migrations:
            if migration.version in applied:
                if applied[migration.version] != migration.checksum:
                    raise RuntimeError(
                        f"migration {schema}/{migration.version:04d}_{migration.name} changed after "
                        "it was applied; add a new migration instead of editing an applied one"
                    )
                continue
            async with connection.transaction():
                await connection.execute(f"SET LOCAL search_path TO {schema}")
                await connection.execute(migration.sql)
                await connection.execute(
                    f"INSERT INTO {schema}.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            applied_now.append(migration.version)
            logger.info("applied migration %s/%04d_%s", schema, migration.version, migration.name)
    finally:
        await connection.execute("SELECT pg_advisory_unlock($1)", lock_key)
    return applied_now


async def pending_migrations(
    connection: Connection, schema: str, migrations: list[Migration]
) -> list[Migration]:
    """The migrations not yet applied, for a service told not to migrate at start.

    Reads only: a schema never migrated has every migration pending.
    """
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"bad schema name {schema!r}")
    exists = await connection.fetchval(
        "SELECT to_regclass($1) IS NOT NULL", f"{schema}.schema_migrations"
    )
    if not exists:
        return list(migrations)
    rows = await connection.fetch(f"SELECT version FROM {schema}.schema_migrations")
    applied = {row["version"] for row in rows}
    return [m for m in migrations if m.version not in applied]


_JSONB_VERSION = b"\x01"


# orjson rather than the standard json module: every ingested interaction and
# every live feature state passes through here, and orjson is several times
# faster at both ends (measured on the ingest path).
def _encode_jsonb(value: object) -> bytes:
    return _JSONB_VERSION + orjson.dumps(value)


def _decode_jsonb(data: bytes) -> object:
    return orjson.loads(memoryview(data)[1:])


def _encode_json(value: object) -> str:
    return orjson.dumps(value).decode()


async def _init_connection(connection: asyncpg.Connection) -> None:
    # jsonb in binary format, so COPY (binary only) can carry it too.
    await connection.set_type_codec(
        "jsonb", encoder=_encode_jsonb, decoder=_decode_jsonb, schema="pg_catalog", format="binary"
    )
    await connection.set_type_codec(
        "json", encoder=_encode_json, decoder=orjson.loads, schema="pg_catalog"
    )


class _Connection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection that remembers whether it ever LISTENed, the one
    session state our code leaves behind it (`remove_listener` unlistens,
    but a connection given back after a failure may still be listening)."""

    listened = False

    async def add_listener(self, channel: str, callback: Any) -> None:
        self.listened = True
        await super().add_listener(channel, callback)


async def _reset(connection: asyncpg.Connection) -> None:
    """What a connection given back to the pool needs before its next use.

    asyncpg's default runs `SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL` on every release: a round trip that every
    `pool.acquire()` waits for, on every read of every request (measured:
    acquire, one SELECT and release took 0.55 ms p50 against 0.31 ms without
    it). Our code changes session state only inside transactions (SET LOCAL,
    transaction-scoped advisory locks, cursors), which end with them, and
    asyncpg rolls back a transaction left open before this runs. The one
    exception is LISTEN, tracked by `_Connection`: such a connection gets
    the full reset. (Session-level SET, advisory locks or WITH HOLD cursors
    on a pooled connection must be undone by their user; `migrate` unlocks
    its lock itself.)"""
    if isinstance(connection, _Connection) and connection.listened:
        await connection.execute(connection.get_reset_query())
        connection.listened = False


async def create_pool(
    dsn: str,
    schema: str,
    *,
    application_name: str,
    min_size: int = 1,
    max_size: int = 10,
    command_timeout: float = 30.0,
    plan_cache_mode: str = "auto",
) -> asyncpg.Pool:
    """One pool per process, its connections confined to the service's schema
    and planning prepared statements by `plan_cache_mode`."""
    pool = await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=command_timeout,
        init=_init_connection,
        connection_class=_Connection,
        reset=_reset,
        server_settings={
            "search_path": schema,
            "application_name": application_name,
            "plan_cache_mode": plan_cache_mode,
        },
    )
    assert pool is not None
    return pool

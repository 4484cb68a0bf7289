"""What the shared pool does when a connection is given back: no reset round
trip for a connection whose session nothing changed, a full reset for one
that listened, and an open transaction rolled back."""

from __future__ import annotations

import asyncpg

from converge.runtime.database import create_pool


async def _last_query(database: str, backend_pid: int) -> str:
    """The last statement the backend ran, as PostgreSQL reports it."""
    observer = await asyncpg.connect(database)
    try:
        query = await observer.fetchval(
            "SELECT query FROM pg_stat_activity WHERE pid = $1", backend_pid
        )
    finally:
        await observer.close()
    return str(query)


async def test_a_released_connection_runs_no_reset_query(database: str) -> None:
    pool = await create_pool(database, "public", application_name="test", max_size=1)
    try:
        async with pool.acquire() as connection:
            backend = connection.get_server_pid()
            assert await connection.fetchval("SELECT 41 + 1") == 42
        # asyncpg's default reset (UNLISTEN *, RESET ALL, ...) would be the last statement.
        assert await _last_query(database, backend) == "SELECT 41 + 1"
    finally:
        await pool.close()


async def test_a_connection_that_listened_is_reset_when_released(database: str) -> None:
    pool = await create_pool(database, "public", application_name="test", max_size=1)
    try:
        async with pool.acquire() as connection:
            # Given back still listening, as after a failure between listen and unlisten.
            await connection.add_listener("converge_test", lambda *_: None)
            assert await connection.fetchval("SELECT count(*) FROM pg_listening_channels()") == 1
        async with pool.acquire() as connection:  # (the same one: the pool holds one)
            assert await connection.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
            await connection.fetchval("SELECT 1")
            backend = connection.get_server_pid()
        # Reset once, not on every later release.
        assert await _last_query(database, backend) == "SELECT 1"
    finally:
        await pool.close()


async def test_a_transaction_left_open_is_rolled_back_when_released(database: str) -> None:
    pool = await create_pool(database, "public", application_name="test", max_size=1)
    try:
        async with pool.acquire() as connection:
            await connection.execute("CREATE TABLE kept (n int)")
            await connection.execute("BEGIN")
            await connection.execute("INSERT INTO kept VALUES (1)")
        async with pool.acquire() as connection:
            assert not connection.is_in_transaction()
            assert await connection.fetchval("SELECT count(*) FROM kept") == 0
    finally:
        await pool.close()


async def test_connections_plan_by_the_given_plan_cache_mode_even_after_a_full_reset(
    database: str,
) -> None:
    pool = await create_pool(
        database,
        "public",
        application_name="test",
        max_size=1,
        plan_cache_mode="force_generic_plan",
    )
    try:
        async with pool.acquire() as connection:
            assert await connection.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
            # Given back listening: the release resets it fully (RESET ALL).
            await connection.add_listener("converge_test", lambda *_: None)
        async with pool.acquire() as connection:
            assert await connection.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
            assert await connection.fetchval("SHOW plan_cache_mode") == "force_generic_plan"
    finally:
        await pool.close()

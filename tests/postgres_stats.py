"""PostgreSQL's own statistics, read the same way by tests and benchmarks."""

from __future__ import annotations

import asyncpg

from tests.waiting import wait_until


async def deadlocks(database: str) -> int:
    """Deadlocks PostgreSQL has counted in this database so far."""
    connection = await asyncpg.connect(database)
    try:
        found: int = await connection.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
        return found
    finally:
        await connection.close()


async def sessions_ended(database: str, application_name: str) -> None:
    """Waits until no session of `application_name` is left: a session hands
    its statistics (deadlocks included) over as it ends."""
    connection = await asyncpg.connect(database)
    try:

        async def sessions() -> int:
            count: int = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                application_name,
            )
            return count

        await wait_until(sessions, lambda n: n == 0, what=f"{application_name} sessions ended")
    finally:
        await connection.close()

"""The embedded PostgreSQL keeps personal data out of its log: a unique
violation on an email is logged without the email."""

from __future__ import annotations

import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.waiting import wait_until


async def test_unique_violation_on_an_email_leaves_the_email_out_of_the_server_log(
    postgres_url: str, database: str
) -> None:
    email = f"private.person.{uuid.uuid4().hex[:8]}@example.com"
    marker = f"log-marker-{uuid.uuid4().hex}"
    connection = await asyncpg.connect(database)
    try:
        data_directory = Path(await connection.fetchval("SHOW data_directory"))
        await connection.execute("CREATE TABLE people (email text PRIMARY KEY, name text)")
        await connection.execute("INSERT INTO people VALUES ($1, 'Private Person')", email)
        with pytest.raises(asyncpg.UniqueViolationError):
            await connection.execute(f"INSERT INTO people VALUES ('{email}', 'Private Person')")
        with pytest.raises(asyncpg.UniqueViolationError):
            await connection.execute("INSERT INTO people VALUES ($1, 'Private Person')", email)
        # An error of our own after them: once it is in the log, so is what
        # came before (one backend writes its log lines in order).
        with pytest.raises(asyncpg.RaiseError):
            await connection.execute(f"DO $$ BEGIN RAISE EXCEPTION '{marker}'; END $$")
    finally:
        await connection.close()

    log = data_directory / "log"

    async def log_text() -> str:
        return log.read_text(errors="replace")

    text = await wait_until(log_text, lambda t: marker in t, what="the marker error in the log")
    assert "duplicate key value violates unique constraint" in text  # the errors are logged
    assert email not in text
    assert "Private Person" not in text

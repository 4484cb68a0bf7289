"""The local PostgreSQL from binaries installed on the machine, the fallback
where pgserver cannot be imported: it starts (as a dedicated user when run as
root), takes every service's migrations, is joined by a second user of the same
directory, and stops when the process that started it lets go."""

from __future__ import annotations

import shutil
import sys
from importlib.resources import files
from pathlib import Path

import asyncpg
import psutil
import pytest

from converge.runtime.database import load_migrations, migrate
from converge.runtime.embedded_postgres import EmbeddedPostgres

_PG_CTL = shutil.which("pg_ctl")
_BIN_DIR = Path(_PG_CTL).resolve().parent if _PG_CTL else None
pytestmark = pytest.mark.skipif(
    _PG_CTL is None, reason="no PostgreSQL binaries on this machine's PATH (pg_ctl)"
)


def _servers_under(path: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "postgres" and str(path) in " ".join(
            process.info["cmdline"] or []
        ):
            found.append(process)
    return found


async def test_without_pgserver_the_machines_postgres_serves_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pgserver", None)  # as if it could not be imported
    monkeypatch.delenv("CONVERGE_POSTGRES_BIN_DIR", raising=False)
    server = EmbeddedPostgres(tmp_path)
    url = server.start()
    try:
        assert server.bin_dir == _BIN_DIR
        connection = await asyncpg.connect(url)
        try:
            for service in ("identity", "interactions"):
                folder = files(f"converge.{service}") / "migrations"
                assert await migrate(connection, service, load_migrations(folder))
            assert await connection.fetchval("SELECT count(*) FROM interactions.interactions") == 0
        finally:
            await connection.close()

        joined = EmbeddedPostgres(tmp_path)
        assert joined.start() == url
        joined.stop()  # it did not start the server: the server stays
        connection = await asyncpg.connect(url)
        await connection.close()
        assert _servers_under(tmp_path)
    finally:
        server.stop()
    assert not _servers_under(tmp_path)

"""Settings from the environment, and versioned migrations per service schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from converge.identity.settings import IdentitySettings
from converge.runtime.database import Migration, load_migrations, migrate


def test_settings_read_shared_and_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u:secret@db/converge")
    monkeypatch.setenv("CONVERGE_IDENTITY_PORT", "6000")
    monkeypatch.setenv("CONVERGE_IDENTITY_UNIQUE_IDENTIFIER_TYPES", '["CRM_ID"]')
    settings = IdentitySettings()
    assert settings.port == 6000
    assert settings.unique_identifier_types == frozenset({"CRM_ID"})
    assert settings.database_url is not None
    assert "secret" not in repr(settings)  # secrets never reach logs


def test_a_wrong_setting_stops_the_process_naming_the_variable() -> None:
    env = {**os.environ, "CONVERGE_IDENTITY_PORT": "not-a-port"}
    result = subprocess.run(
        [sys.executable, "-m", "converge.identity"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "invalid setting CONVERGE_IDENTITY_PORT" in result.stderr


async def test_migrations_apply_once_in_order_and_refuse_edits(
    database: str, tmp_path: Path
) -> None:
    (tmp_path / "0001_first.sql").write_text("CREATE TABLE things (id int PRIMARY KEY);")
    (tmp_path / "0002_second.sql").write_text("ALTER TABLE things ADD COLUMN name text;")
    from importlib.resources.abc import Traversable

    folder: Traversable = tmp_path  # a Path is a Traversable
    migrations = load_migrations(folder)
    assert [m.version for m in migrations] == [1, 2]
    connection = await asyncpg.connect(database)
    try:
        assert await migrate(connection, "sample", migrations) == [1, 2]
        assert await migrate(connection, "sample", migrations) == []
        columns = await connection.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = 'sample' "
            "AND table_name = 'things' ORDER BY ordinal_position"
        )
        assert [c["column_name"] for c in columns] == ["id", "name"]
        edited = [
            migrations[0],
            Migration(2, "second", "ALTER TABLE things ADD COLUMN other text;"),
        ]
        with pytest.raises(RuntimeError, match="changed after it was applied"):
            await migrate(connection, "sample", edited)
    finally:
        await connection.close()


def test_badly_named_migration_is_refused(tmp_path: Path) -> None:
    (tmp_path / "first.sql").write_text("SELECT 1;")
    with pytest.raises(ValueError, match=r"NNNN_name\.sql"):
        load_migrations(tmp_path)

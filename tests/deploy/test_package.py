"""The package as a cluster installs it: a wheel with everything the commands
load, extras per role, and a `migrate` command run once before the pods start."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from converge.identity.app import SPEC as IDENTITY
from converge.identity.settings import IdentitySettings
from converge.runtime.server import ServiceRuntime, migrate_and_exit
from tests.conftest import ROOT

UV = Path(sys.executable).parent / "uv"
# The folders the wheel assembles into the `converge` namespace.
PACKAGE_FOLDERS = ("services/converge", "protos/converge", "models/converge")
DATA_SUFFIXES = (".sql", ".yaml", ".yml", ".proto")


def _run(*command: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env={k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"},
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("dist")
    _run(UV, "build", "--wheel", "--quiet", "--out-dir", out, ROOT, cwd=ROOT)
    (built,) = out.glob("converge-*.whl")
    yield built


def test_the_wheel_carries_every_module_and_data_file_the_commands_load(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = set()
    for folder in PACKAGE_FOLDERS:
        for path in (ROOT / folder).rglob("*"):
            if "__pycache__" in path.parts or not path.is_file():
                continue
            if path.suffix == ".py" or path.suffix in DATA_SUFFIXES:
                expected.add("converge/" + path.relative_to(ROOT / folder).as_posix())
    missing = sorted(expected - names)
    assert not missing, f"left out of the wheel: {missing[:10]}"
    assert "converge/models/cli.py" in names  # `converge` imports it: once left out
    assert any(n.startswith("converge/identity/migrations/") for n in names)
    assert any(n.endswith("/licenses/LICENSE") for n in names)


def test_the_wheel_installs_in_a_fresh_virtualenv_per_role(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    _run(UV, "venv", "--quiet", "--python", sys.executable, venv)
    python = venv / "bin" / "python"
    lock = ROOT / "requirements.lock"  # the versions CI tests, fetched from uv's cache

    # The core alone: the command's parser builds without LightGBM or MLflow.
    _run(UV, "pip", "install", "--quiet", "--python", python, "-c", lock, wheel)
    help_text = _run(venv / "bin" / "converge", "--help", cwd=tmp_path).stdout
    assert "models" in help_text and "import" in help_text
    _run(venv / "bin" / "converge", "models", "--help", cwd=tmp_path)
    without_extra = subprocess.run(
        [venv / "bin" / "converge", "platform", "status"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert without_extra.returncode == 2
    assert "converge[platform]" in without_extra.stderr  # names the extra, no traceback
    installed = _run(UV, "pip", "list", "--python", python).stdout.lower()
    for heavy in ("lightgbm", "mlflow", "pandas", "kubernetes", "phonenumbers"):
        assert heavy not in installed, f"{heavy} installed without the extra that needs it"

    # The identity role: its service starts far enough to answer --help.
    _run(UV, "pip", "install", "--quiet", "--python", python, "-c", lock, f"{wheel}[identity]")
    service_help = _run(python, "-m", "converge.identity", "--help", cwd=tmp_path).stdout
    assert "migrate" in service_help
    installed = _run(UV, "pip", "list", "--python", python).stdout.lower()
    assert "phonenumbers" in installed and "lightgbm" not in installed


async def _applied_versions(database: str, schema: str) -> list[int]:
    connection = await asyncpg.connect(database)
    try:
        exists = await connection.fetchval(
            "SELECT to_regclass($1) IS NOT NULL", f"{schema}.schema_migrations"
        )
        if not exists:
            return []
        rows = await connection.fetch(f"SELECT version FROM {schema}.schema_migrations")
        return sorted(row["version"] for row in rows)
    finally:
        await connection.close()


async def test_a_service_told_not_to_migrate_refuses_a_stale_schema_until_migrate_runs(
    database: str,
) -> None:
    settings = IdentitySettings(database_url=database, port=0, migrate_on_start=False)
    runtime = ServiceRuntime(IDENTITY, settings)
    with pytest.raises(RuntimeError, match=r"migrations pending .*converge\.identity migrate"):
        await runtime.start()
    await runtime.stop(grace=0)
    assert await _applied_versions(database, "identity") == []  # it only read

    assert await migrate_and_exit(IDENTITY, settings) == 0
    applied = await _applied_versions(database, "identity")
    assert applied and applied == sorted(applied)
    assert await migrate_and_exit(IDENTITY, settings) == 0  # again: nothing to do, no error

    runtime = ServiceRuntime(IDENTITY, settings)
    await runtime.start()
    await runtime.stop(grace=0)


def test_migrate_command_applies_the_schema_and_exits(database: str) -> None:
    env = {**os.environ, "DATABASE_URL": database}
    result = subprocess.run(
        [sys.executable, "-m", "converge.identity", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "schema up to date" in result.stdout

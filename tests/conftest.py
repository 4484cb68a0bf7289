"""Session-wide fixtures: one real PostgreSQL for the whole run (started here,
never assumed), a fresh database per test, and services run in-process on a
real loopback TCP port with the shared runtime (interceptors included)."""

from __future__ import annotations

import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest

from converge.runtime.embedded_postgres import EmbeddedPostgres

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the test session (runs as root too)."""
    data_dir = Path(tempfile.mkdtemp(prefix="converge-test-pg-"))
    server = EmbeddedPostgres(data_dir)
    url = server.start()
    yield url
    server.stop()


def database_url(server_url: str, name: str) -> str:
    parts = urlsplit(server_url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture
async def database(postgres_url: str) -> AsyncIterator[str]:
    """A new, empty database for one test; its URL."""
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    yield database_url(postgres_url, name)
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await admin.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
async def channel_factory() -> AsyncIterator[list[grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []
    yield channels
    for channel in channels:
        await channel.close()

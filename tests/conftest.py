"""Session-wide fixtures: one real PostgreSQL for the whole run (started here,
never assumed), a fresh database per test, and services run in-process on a
real loopback TCP port with the shared runtime (interceptors included)."""

from __future__ import annotations

import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from hypothesis import settings as hypothesis_settings

from converge.identity.app import SPEC as IDENTITY
from converge.identity.settings import IdentitySettings
from converge.interactions.app import SPEC as INTERACTIONS
from converge.interactions.settings import InteractionsSettings
from converge.runtime.embedded_postgres import EmbeddedPostgres
from converge.runtime.server import ServiceRuntime
from converge.v1 import identity_pb2_grpc, interactions_pb2_grpc, privacy_pb2_grpc

# Tests never write into the source tree: hypothesis keeps no example
# database (.hypothesis/); a failure prints its example and seed instead.
hypothesis_settings.register_profile("converge", database=None, print_blob=True)
hypothesis_settings.load_profile("converge")

ROOT = Path(__file__).resolve().parents[1]
# The real public datasets, read in place (never copied into the project).
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Modules holding a test marked `slow` run first, each in its collected
    order. `make test` runs two xdist workers that take a module at a time
    (`--dist loadfile`): a module of minutes taken last would keep one worker
    busy while the other has nothing left (test_product_path.py alone is
    about two minutes)."""
    slow_modules = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.path not in slow_modules)  # stable: order kept within


def shared_dataset(relative: str) -> Path:
    """A file or folder of ../shared/data, or a skip naming it: tests of the
    real datasets cannot run where they are absent (CI has them)."""
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared datasets are not on this machine")
    return path


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server for the test session (runs as root too)."""
    data_dir = Path(tempfile.mkdtemp(prefix="converge-test-pg-"))
    server = EmbeddedPostgres(data_dir)
    url = server.start()
    yield url
    server.stop()
    shutil.rmtree(data_dir, ignore_errors=True)  # about 40 MB a session otherwise left in /tmp


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


@dataclass
class Platform:
    """Identity and interactions running together in-process on real TCP ports,
    against the test's database, the interactions service following identity."""

    identity: identity_pb2_grpc.IdentityServiceStub
    interactions: interactions_pb2_grpc.InteractionsServiceStub
    interactions_privacy: privacy_pb2_grpc.DataSubjectServiceStub
    interactions_address: str
    identity_address: str


@pytest.fixture
async def platform(database: str) -> AsyncIterator[Platform]:
    identity = ServiceRuntime(IDENTITY, IdentitySettings(database_url=database, port=0))
    await identity.start()
    interactions = ServiceRuntime(
        INTERACTIONS,
        InteractionsSettings(
            database_url=database, port=0, identity_address=identity.address, ingest_batch_size=200
        ),
    )
    await interactions.start()
    identity_channel = grpc.aio.insecure_channel(identity.address)
    interactions_channel = grpc.aio.insecure_channel(interactions.address)
    yield Platform(
        identity_pb2_grpc.IdentityServiceStub(identity_channel),
        interactions_pb2_grpc.InteractionsServiceStub(interactions_channel),
        privacy_pb2_grpc.DataSubjectServiceStub(interactions_channel),
        interactions.address,
        identity.address,
    )
    await identity_channel.close()
    await interactions_channel.close()
    await interactions.stop(grace=1)
    await identity.stop(grace=1)


@pytest.fixture
async def second_replica(
    platform: Platform, database: str
) -> AsyncIterator[interactions_pb2_grpc.InteractionsServiceStub]:
    """Another replica of the interactions service on the platform's database."""
    second = ServiceRuntime(
        INTERACTIONS,
        InteractionsSettings(
            database_url=database,
            port=0,
            identity_address=platform.identity_address,
            ingest_batch_size=50,
        ),
    )
    await second.start()
    channel = grpc.aio.insecure_channel(second.address)
    yield interactions_pb2_grpc.InteractionsServiceStub(channel)
    await channel.close()
    await second.stop(grace=1)

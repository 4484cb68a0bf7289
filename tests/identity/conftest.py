from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from converge.identity.app import SPEC
from converge.identity.settings import IdentitySettings
from converge.runtime.server import ServiceRuntime
from converge.v1 import identity_pb2_grpc

IdentityFactory = Callable[..., Any]


@pytest.fixture
async def identity_factory(database: str) -> AsyncIterator[IdentityFactory]:
    """Starts identity services on port 0 against the test's database."""
    started: list[tuple[ServiceRuntime, grpc.aio.Channel]] = []

    async def start(**overrides: Any) -> identity_pb2_grpc.IdentityServiceStub:
        settings = IdentitySettings(database_url=database, port=0, **overrides)
        runtime = ServiceRuntime(SPEC, settings)
        await runtime.start()
        channel = grpc.aio.insecure_channel(runtime.address)
        started.append((runtime, channel))
        return identity_pb2_grpc.IdentityServiceStub(channel)

    yield start
    for runtime, channel in started:
        await channel.close()
        await runtime.stop(grace=1)


@pytest.fixture
async def identity(identity_factory: IdentityFactory) -> identity_pb2_grpc.IdentityServiceStub:
    stub: identity_pb2_grpc.IdentityServiceStub = await identity_factory()
    return stub

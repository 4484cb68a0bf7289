"""Identity and interactions running together in-process, on real TCP ports,
against a fresh database, the interactions service following identity."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from converge.identity.servicer import SPEC as IDENTITY
from converge.identity.settings import IdentitySettings
from converge.interactions.servicer import SPEC as INTERACTIONS
from converge.interactions.settings import InteractionsSettings
from converge.runtime.server import ServiceRuntime
from converge.v1 import identity_pb2_grpc, interactions_pb2_grpc, privacy_pb2_grpc


@dataclass
class Platform:
    identity: identity_pb2_grpc.IdentityServiceStub
    interactions: interactions_pb2_grpc.InteractionsServiceStub
    interactions_privacy: privacy_pb2_grpc.DataSubjectServiceStub
    interactions_address: str


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
    )
    await identity_channel.close()
    await interactions_channel.close()
    await interactions.stop(grace=1)
    await identity.stop(grace=1)

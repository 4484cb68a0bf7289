"""Followers of the change stream wait for a notification: their number does
not drive up the database work of a replica (issue 12, item 14)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import prometheus_client
import pytest

from converge.interactions.app import SPEC as INTERACTIONS
from converge.interactions.settings import InteractionsSettings
from converge.runtime.server import ServiceRuntime
from converge.v1 import interactions_pb2, interactions_pb2_grpc
from tests.interactions.builders import email_ref, interaction, record
from tests.waiting import until

FOLLOWERS = 60
NEW_ROWS = 15
FALLBACK_POLL_S = 0.5
DEADLINE_S = 120.0


def stream_reads() -> float:
    """Reads of the change stream by this process's replicas (the store counts them)."""
    return (
        prometheus_client.REGISTRY.get_sample_value("converge_interactions_stream_reads_total")
        or 0.0
    )


@pytest.fixture
async def follower_replica(platform: Any, database: str) -> AsyncIterator[ServiceRuntime]:
    """An interactions replica that only serves the followers."""
    replica = ServiceRuntime(
        INTERACTIONS,
        InteractionsSettings(
            database_url=database,
            port=0,
            identity_address=platform.identity_address,
            stream_fallback_poll_s=FALLBACK_POLL_S,
        ),
    )
    await replica.start()
    yield replica
    await replica.stop(grace=1)


async def test_idle_followers_cost_no_reads_and_still_get_new_rows_promptly(
    platform: Any, follower_replica: ServiceRuntime
) -> None:
    customer = email_ref("followed@example.com")
    await platform.interactions.RecordInteraction(record(interaction(customer), "first"))
    reads_before = stream_reads()
    started = time.monotonic()

    channel = grpc.aio.insecure_channel(follower_replica.address)
    stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
    everything = interactions_pb2.StreamInteractionsRequest(follow=True)
    # Half follow every type; half a type nobody records (idle: never delivered anything).
    idle = interactions_pb2.StreamInteractionsRequest(follow=True, types=["survey.*"])
    received: list[list[str]] = [[] for _ in range(FOLLOWERS)]

    async def follow(index: int) -> None:
        request = everything if index % 2 == 0 else idle
        async for message in stub.StreamInteractions(request):
            received[index].append(message.interaction.idempotency_key)

    followers = [asyncio.create_task(follow(i)) for i in range(FOLLOWERS)]
    try:
        await until(
            lambda: all(received[i] == ["first"] for i in range(0, FOLLOWERS, 2)),
            "every follower delivered the stored row",
            timeout_s=DEADLINE_S,
        )
        for n in range(NEW_ROWS):
            key = f"new-{n}"
            await platform.interactions.RecordInteraction(record(interaction(customer), key))
            await until(
                lambda key=key: all(received[i][-1:] == [key] for i in range(0, FOLLOWERS, 2)),
                f"every follower delivered {key}",
                timeout_s=DEADLINE_S,
            )
        assert not any(received[i] for i in range(1, FOLLOWERS, 2))
        elapsed = time.monotonic() - started

        # Reading each new row from the database per follower takes at least
        # FOLLOWERS * NEW_ROWS reads (900). Shared, it takes a few per
        # follower to catch up once, a few per new row and one per fallback
        # poll, however many follow.
        reads = stream_reads() - reads_before
        bound = 3 * FOLLOWERS + 3 * NEW_ROWS + elapsed / FALLBACK_POLL_S + 10
        assert NEW_ROWS <= reads <= bound, (reads, bound)
    finally:
        for task in followers:
            task.cancel()
        await asyncio.gather(*followers, return_exceptions=True)
        await channel.close()

"""Interactions: RecordInteraction latency with no follower of the change
stream open, then with 1,000 idle followers open (StreamInteractions with
follow, each waiting for a type nobody records), against service processes.

Idle followers used to poll the database each, and 1,000 of them took the
RecordInteraction p50 from 4.5 ms to 314 ms; they now wait on the process's
shared change feed (see converge/interactions/change_feed.py), so the two
figures should be close.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import grpc

from converge.runtime.values import timestamp
from converge.v1 import common_pb2, interactions_pb2, interactions_pb2_grpc
from tests.benchmarks.harness import BenchEnv, closed_loop, percentile

FOLLOWERS = 1_000
CHANNELS = 20
CUSTOMERS = 50
RECORDS = 400
DEADLINE_S = 300.0


def _record(
    customer: common_pb2.CustomerRef, kind: str
) -> interactions_pb2.RecordInteractionRequest:
    return interactions_pb2.RecordInteractionRequest(
        interaction=interactions_pb2.InteractionInput(
            customer=customer,
            occurred_at=timestamp(datetime.now(UTC)),
            channel=common_pb2.CHANNEL_WEB,
            type=kind,
            attributes={"score": common_pb2.AttributeValue(number_value=8)}
            if kind == "survey.nps"
            else {},
            source="bench",
        ),
        idempotency_key=uuid.uuid4().hex,
    )


async def _record_p50(
    stub: interactions_pb2_grpc.InteractionsServiceStub, customers: list[str]
) -> float:
    refs = [common_pb2.CustomerRef(customer_id=c) for c in customers]
    requests = [_record(refs[i % len(refs)], "product.login") for i in range(RECORDS)]
    _, latencies = await closed_loop(
        lambda i: stub.RecordInteraction(requests[i]), concurrency=1, total=RECORDS
    )
    return percentile(latencies, 50)


async def run(env: BenchEnv) -> dict[str, float]:
    database = await env.new_database()
    identity = await env.start("identity", database, log_level="WARNING")
    service = await env.start(
        "interactions", database, log_level="WARNING", identity_address=identity.address
    )
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
        customers = []
        for i in range(CUSTOMERS):  # (made through identity, as a channel would)
            email = common_pb2.CustomerRef(
                identifier=common_pb2.Identifier(
                    type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=f"follow-{i}@example.com"
                )
            )
            reply = await stub.RecordInteraction(_record(email, "product.login"))
            customers.append(reply.interaction.customer_id)
        await _record_p50(stub, customers)  # warm-up
        without = await _record_p50(stub, customers)

        # The followers want surveys only: each gets the one survey stored
        # here, then idles while the bench records logins.
        await stub.RecordInteraction(
            _record(common_pb2.CustomerRef(customer_id=customers[0]), "survey.nps")
        )
        follow = interactions_pb2.StreamInteractionsRequest(follow=True, types=["survey.*"])
        # (Spread over connections as separate clients would be.)
        follower_channels = [grpc.aio.insecure_channel(service.address) for _ in range(CHANNELS)]
        follower_stubs = [
            interactions_pb2_grpc.InteractionsServiceStub(c) for c in follower_channels
        ]
        delivered = 0

        async def follower(index: int) -> None:
            nonlocal delivered
            async for _ in follower_stubs[index % CHANNELS].StreamInteractions(follow):
                delivered += 1

        followers = [asyncio.create_task(follower(i)) for i in range(FOLLOWERS)]
        try:
            deadline = time.monotonic() + DEADLINE_S
            while delivered < FOLLOWERS:
                failed = next((t for t in followers if t.done()), None)
                if failed is not None:
                    failed.result()  # (raises what ended it)
                assert time.monotonic() < deadline, f"{delivered} of {FOLLOWERS} followers started"
                await asyncio.sleep(0.05)
            with_followers = await _record_p50(stub, customers)
        finally:
            for task in followers:
                task.cancel()
            await asyncio.gather(*followers, return_exceptions=True)
            for follower_channel in follower_channels:
                await follower_channel.close()
    return {
        "interactions.idle_followers_0.record_p50_ms": without,
        f"interactions.idle_followers_{FOLLOWERS}.record_p50_ms": with_followers,
    }

"""PostgreSQL stops under load and starts again: callers get UNAVAILABLE
meanwhile, health follows the database, and both services carry on without a
restart, the identity follower in interactions included, losing nothing they
acknowledged.

The tests run their own embedded PostgreSQL (the session's is shared by every
other test), stopped and started by the test."""

from __future__ import annotations

import asyncio
import multiprocessing
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from converge.identity.app import SPEC as IDENTITY
from converge.identity.settings import IdentitySettings
from converge.interactions.app import SPEC as INTERACTIONS
from converge.interactions.settings import InteractionsSettings
from converge.runtime.embedded_postgres import EmbeddedPostgres
from converge.runtime.server import ServiceRuntime
from converge.v1 import (
    common_pb2,
    identity_pb2,
    identity_pb2_grpc,
    interactions_pb2,
    interactions_pb2_grpc,
)
from tests.interactions.builders import email_ref, interaction
from tests.waiting import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Short, so that health follows the database within a test's patience.
HEALTH = {"health_check_interval_s": 0.05, "health_check_timeout_s": 1.0}


def _serve_postgres(data_dir: str, commands: Connection) -> None:
    """Runs in a process of its own: starts and stops an EmbeddedPostgres on
    command, so that no process running gRPC forks (as root, pgserver forks
    pg_ctl as its own user, and a fork while gRPC's threads run may crash)."""
    server = EmbeddedPostgres(Path(data_dir))
    while True:
        command = commands.recv()
        if command == "start":
            commands.send(server.start())
        else:
            server.stop()
            commands.send(None)
            if command == "exit":
                return


class RestartablePostgres:
    """An EmbeddedPostgres in a helper process, stopped and started at will."""

    def __init__(self, data_dir: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self._commands, theirs = context.Pipe()
        self._process = context.Process(
            target=_serve_postgres, args=(str(data_dir), theirs), daemon=True
        )
        self._process.start()

    def _ask(self, command: str) -> str | None:
        self._commands.send(command)
        answer: str | None = self._commands.recv()
        return answer

    def start(self) -> str:
        """Starts the server (or finds it running); its URL."""
        url = self._ask("start")
        assert url is not None
        return url

    def stop(self) -> None:
        self._ask("stop")

    def close(self) -> None:
        self._ask("exit")
        self._process.join(timeout=60)


@pytest.fixture(scope="module")
def restartable_postgres() -> Iterator[RestartablePostgres]:
    data_dir = Path(tempfile.mkdtemp(prefix="converge-outage-pg-"))
    server = RestartablePostgres(data_dir)
    server.start()
    yield server
    server.close()
    shutil.rmtree(data_dir, ignore_errors=True)


async def _fresh_database(server: RestartablePostgres) -> str:
    """A database of its own on the restartable server, for one test."""
    url = await asyncio.to_thread(server.start)  # the running server's URL
    name = f"outage_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


async def health_of(address: str) -> int:
    async with grpc.aio.insecure_channel(address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
        except grpc.aio.AioRpcError:
            return -1
        return int(reply.status)


def health_is(status: int, *addresses: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return all([await health_of(a) == status for a in addresses])

    return check


@dataclass
class Outcomes:
    """What the load saw: status codes by name, and what was acknowledged."""

    codes: Counter[str] = field(default_factory=Counter)
    interactions: set[str] = field(default_factory=set)
    customers: set[str] = field(default_factory=set)

    def saw(self, code: grpc.StatusCode) -> None:
        self.codes[code.name] += 1


async def _until_acknowledged(
    outcomes: Outcomes, call: Callable[[], Awaitable[object]], stop: asyncio.Event
) -> object | None:
    """Sends one request until it is acknowledged, as a client that retries
    UNAVAILABLE would (same idempotency key, so retries are safe)."""
    while not stop.is_set():
        try:
            reply = await call()
        except grpc.aio.AioRpcError as error:
            outcomes.saw(error.code())
            if error.code() != grpc.StatusCode.UNAVAILABLE:
                return None
            await asyncio.sleep(0.02)  # back off a little before the retry
            continue
        outcomes.saw(grpc.StatusCode.OK)
        return reply
    return None


async def _record_load(
    stub: interactions_pb2_grpc.InteractionsServiceStub,
    customer: common_pb2.CustomerRef,
    outcomes: Outcomes,
    stop: asyncio.Event,
) -> None:
    while not stop.is_set():
        request = interactions_pb2.RecordInteractionRequest(
            interaction=interaction(customer), idempotency_key=uuid.uuid4().hex
        )
        reply = await _until_acknowledged(
            outcomes, lambda r=request: stub.RecordInteraction(r, timeout=30), stop
        )
        if isinstance(reply, interactions_pb2.RecordInteractionResponse):
            outcomes.interactions.add(reply.interaction.interaction_id)


async def _resolve_load(
    stub: identity_pb2_grpc.IdentityServiceStub, outcomes: Outcomes, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        request = identity_pb2.ResolveRequest(
            identifiers=[
                common_pb2.Identifier(
                    type=common_pb2.IDENTIFIER_TYPE_EMAIL,
                    value=f"load-{uuid.uuid4().hex[:10]}@example.com",
                )
            ]
        )
        reply = await _until_acknowledged(
            outcomes, lambda r=request: stub.Resolve(r, timeout=30), stop
        )
        if isinstance(reply, identity_pb2.ResolveResponse):
            outcomes.customers.add(reply.customer.customer_id)


@dataclass
class Platform:
    identity: ServiceRuntime
    interactions: ServiceRuntime


@pytest.fixture
async def outage_platform(restartable_postgres: RestartablePostgres) -> AsyncIterator[Platform]:
    database = await _fresh_database(restartable_postgres)
    identity = ServiceRuntime(IDENTITY, IdentitySettings(database_url=database, port=0, **HEALTH))
    await identity.start()
    interactions = ServiceRuntime(
        INTERACTIONS,
        InteractionsSettings(
            database_url=database, port=0, identity_address=identity.address, **HEALTH
        ),
    )
    await interactions.start()
    yield Platform(identity, interactions)
    await asyncio.to_thread(restartable_postgres.start)  # whatever the test left
    await interactions.stop(grace=1)
    await identity.stop(grace=1)


async def test_health_is_not_serving_while_postgres_is_down_and_serving_again_after(
    outage_platform: Platform, restartable_postgres: RestartablePostgres
) -> None:
    addresses = (outage_platform.identity.address, outage_platform.interactions.address)
    await wait_until(health_is(SERVING, *addresses), what="SERVING at start", timeout_s=120)

    await asyncio.to_thread(restartable_postgres.stop)
    await wait_until(
        health_is(NOT_SERVING, *addresses),
        what="NOT_SERVING while PostgreSQL is down",
        timeout_s=120,
    )

    await asyncio.to_thread(restartable_postgres.start)
    await wait_until(
        health_is(SERVING, *addresses), what="SERVING once PostgreSQL is back", timeout_s=120
    )


@pytest.mark.slow
async def test_services_carry_on_after_postgres_stops_under_load_and_starts_again(
    outage_platform: Platform, restartable_postgres: RestartablePostgres
) -> None:
    addresses = (outage_platform.identity.address, outage_platform.interactions.address)
    identity_channel = grpc.aio.insecure_channel(outage_platform.identity.address)
    interactions_channel = grpc.aio.insecure_channel(outage_platform.interactions.address)
    identity = identity_pb2_grpc.IdentityServiceStub(identity_channel)
    interactions = interactions_pb2_grpc.InteractionsServiceStub(interactions_channel)
    try:
        # Two customers, each with an interaction, to merge once PostgreSQL is back.
        survivor, merged = [
            (
                await identity.Resolve(
                    identity_pb2.ResolveRequest(
                        identifiers=[
                            common_pb2.Identifier(
                                type=common_pb2.IDENTIFIER_TYPE_EMAIL,
                                value=f"{who}-{uuid.uuid4().hex[:8]}@example.com",
                            )
                        ]
                    )
                )
            ).customer.customer_id
            for who in ("survivor", "merged")
        ]
        merged_interaction = (
            await interactions.RecordInteraction(
                interactions_pb2.RecordInteractionRequest(
                    interaction=interaction(common_pb2.CustomerRef(customer_id=merged)),
                    idempotency_key="before-the-outage",
                )
            )
        ).interaction.interaction_id

        outcomes = Outcomes()
        stop = asyncio.Event()
        load = [
            asyncio.create_task(
                _record_load(
                    interactions, common_pb2.CustomerRef(customer_id=survivor), outcomes, stop
                )
            ),
            asyncio.create_task(
                _record_load(
                    interactions,
                    email_ref(f"load-{uuid.uuid4().hex[:8]}@example.com"),
                    outcomes,
                    stop,
                )
            ),
            asyncio.create_task(_resolve_load(identity, outcomes, stop)),
        ]

        async def acknowledged_more(than: int) -> bool:
            return len(outcomes.interactions) + len(outcomes.customers) > than + 20

        await wait_until(lambda: acknowledged_more(0), what="the load to run", timeout_s=120)

        await asyncio.to_thread(restartable_postgres.stop)
        await wait_until(
            health_is(NOT_SERVING, *addresses),
            what="NOT_SERVING while PostgreSQL is down",
            timeout_s=120,
        )

        async def refused_as_unavailable() -> bool:
            return outcomes.codes["UNAVAILABLE"] >= 3

        await wait_until(
            refused_as_unavailable,
            what="calls refused with UNAVAILABLE during the outage",
            timeout_s=120,
        )

        await asyncio.to_thread(restartable_postgres.start)
        await wait_until(
            health_is(SERVING, *addresses), what="SERVING once PostgreSQL is back", timeout_s=120
        )
        after_restart = len(outcomes.interactions) + len(outcomes.customers)
        await wait_until(
            lambda: acknowledged_more(after_restart), what="the load to carry on", timeout_s=120
        )

        # A merge made after the restart reaches interactions: the identity
        # follower survived the outage.
        await identity.MergeCustomers(
            identity_pb2.MergeCustomersRequest(
                surviving_customer_id=survivor, merged_customer_id=merged
            )
        )

        async def merge_followed() -> bool:
            timeline = await interactions.ListInteractions(
                interactions_pb2.ListInteractionsRequest(
                    customer=common_pb2.CustomerRef(customer_id=survivor),
                    page=common_pb2.PageRequest(page_size=1000),
                )
            )
            return merged_interaction in {i.interaction_id for i in timeline.interactions}

        await wait_until(
            merge_followed,
            what="the merge made after the restart to reach interactions",
            timeout_s=120,
        )

        stop.set()
        await asyncio.gather(*load)

        assert set(outcomes.codes) <= {"OK", "UNAVAILABLE"}, outcomes.codes
        # Nothing acknowledged is lost.
        for interaction_id in outcomes.interactions:
            found = await interactions.GetInteraction(
                interactions_pb2.GetInteractionRequest(interaction_id=interaction_id)
            )
            assert found.interaction.interaction_id == interaction_id
        for customer_id in outcomes.customers:
            await identity.GetCustomer(
                identity_pb2.GetCustomerRequest(
                    customer=common_pb2.CustomerRef(customer_id=customer_id)
                )
            )
    finally:
        await identity_channel.close()
        await interactions_channel.close()

"""Interactions takes only customers that exist: ids identity issued and that
were not erased. Ingests racing a ForgetCustomer leave nothing of the
customer behind once Forget returns, and nothing of it comes back later."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest

from converge.identity.app import SPEC as IDENTITY
from converge.identity.settings import IdentitySettings
from converge.interactions.app import SPEC as INTERACTIONS
from converge.interactions.settings import InteractionsSettings
from converge.runtime.errors import read_status
from converge.runtime.server import ServiceRuntime
from converge.v1 import (
    common_pb2,
    identity_pb2,
    identity_pb2_grpc,
    interactions_pb2,
    interactions_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
)
from tests.conftest import free_port
from tests.interactions.builders import email_ref, interaction, record
from tests.waiting import wait_until


@dataclass
class Erasing:
    """Identity asking interactions to erase (a peer) on ForgetCustomer."""

    identity: identity_pb2_grpc.IdentityServiceStub
    interactions: interactions_pb2_grpc.InteractionsServiceStub


@pytest.fixture
async def erasing(database: str) -> AsyncIterator[Erasing]:
    identity_port = free_port()
    interactions = ServiceRuntime(
        INTERACTIONS,
        InteractionsSettings(
            database_url=database,
            port=0,
            identity_address=f"127.0.0.1:{identity_port}",
            ingest_batch_size=20,
        ),
    )
    await interactions.start()
    identity = ServiceRuntime(
        IDENTITY,
        IdentitySettings(
            database_url=database,
            port=identity_port,
            peer_services={"interactions": interactions.address},
        ),
    )
    await identity.start()
    async with (
        grpc.aio.insecure_channel(identity.address) as identity_channel,
        grpc.aio.insecure_channel(interactions.address) as interactions_channel,
    ):
        erasing = Erasing(
            identity_pb2_grpc.IdentityServiceStub(identity_channel),
            interactions_pb2_grpc.InteractionsServiceStub(interactions_channel),
        )
        # Interactions tried identity before it listened, and its own channel
        # (not the test's) reconnects with back-off: wait until interactions
        # itself reaches identity, or the first calls fail UNAVAILABLE.
        await wait_until(lambda: _reaches_identity(erasing), what="interactions reaching identity")
        yield erasing
    await identity.stop(grace=1)
    await interactions.stop(grace=1)


async def _reaches_identity(erasing: Erasing) -> bool:
    """Whether interactions can resolve an identifier through identity now."""
    try:
        await erasing.interactions.ListInteractions(
            interactions_pb2.ListInteractionsRequest(customer=email_ref("nobody@example.com"))
        )
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            return False
        # NOT_FOUND for an unknown identifier: identity answered.
        assert error.code() == grpc.StatusCode.NOT_FOUND, error
    return True


def _by_id(customer_id: str) -> common_pb2.CustomerRef:
    return common_pb2.CustomerRef(customer_id=customer_id)


async def _remains(database: str, customer_id: str) -> dict[str, int]:
    """What interactions holds of a customer, read in its schema."""
    connection = await asyncpg.connect(database)
    try:
        row = await connection.fetchrow(
            "SELECT (SELECT count(*) FROM interactions.interactions WHERE customer_id = $1) AS rows,"
            " (SELECT count(*) FROM interactions.customer_state WHERE customer_id = $1) AS states",
            uuid.UUID(customer_id),
        )
        assert row is not None
        return dict(row)
    finally:
        await connection.close()


async def _streamed_customers(
    interactions: interactions_pb2_grpc.InteractionsServiceStub,
) -> set[str]:
    messages = interactions.StreamInteractions(interactions_pb2.StreamInteractionsRequest())
    return {m.interaction.customer_id async for m in messages}


async def _refused_as_not_found(call: object) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call  # type: ignore[misc]
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_ingests_racing_forget_leave_nothing_and_the_id_is_refused_after(
    erasing: Erasing, database: str
) -> None:
    email = email_ref("forgotten@example.com")
    created = await erasing.identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[email.identifier])
    )
    customer_id = created.customer.customer_id
    forgotten = asyncio.Event()
    sent = 0

    async def streams(writer: int) -> None:
        """Bulk streams by id and by identifier, until a while after Forget."""
        nonlocal sent
        after = 0
        while after < 3:
            after += forgotten.is_set()
            rows = [
                interactions_pb2.IngestRow(
                    row_ref=str(i),
                    interaction=interaction(_by_id(customer_id) if i % 2 else email),
                    idempotency_key=uuid.uuid4().hex,
                    lookup_only=True,
                )
                for i in range(60)
            ]
            await erasing.interactions.IngestInteractions(
                iter([interactions_pb2.IngestInteractionsRequest(rows=rows)])
            )
            sent += len(rows)

    async def records() -> None:
        after = 0
        while after < 20:
            after += forgotten.is_set()
            try:
                await erasing.interactions.RecordInteraction(
                    record(interaction(_by_id(customer_id)))
                )
            except grpc.aio.AioRpcError as error:
                assert error.code() == grpc.StatusCode.NOT_FOUND

    writers = [asyncio.create_task(streams(w)) for w in range(4)] + [
        asyncio.create_task(records()) for _ in range(4)
    ]
    try:
        # Forget once ingests are storing rows of the customer.
        await wait_until(lambda: _remains(database, customer_id), lambda r: r["rows"] > 50)
        reply = await erasing.identity.ForgetCustomer(
            identity_pb2.ForgetCustomerRequest(
                customer=_by_id(customer_id), actor=common_pb2.Actor(name="privacy-officer")
            )
        )
        assert reply.complete
        assert await _remains(database, customer_id) == {"rows": 0, "states": 0}
        forgotten.set()
        await asyncio.gather(*writers)
    finally:
        for writer in writers:
            writer.cancel()
    assert sent > 0

    # Nothing came back from what was in flight, anywhere in the service.
    assert await _remains(database, customer_id) == {"rows": 0, "states": 0}
    assert customer_id not in await _streamed_customers(erasing.interactions)
    live = await erasing.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(customers=[_by_id(customer_id)])
    )
    assert not live.customers[0].found

    # And later ingests of that id are refused: NOT_FOUND, per row in a stream.
    await _refused_as_not_found(
        erasing.interactions.RecordInteraction(record(interaction(_by_id(customer_id))))
    )
    await _refused_as_not_found(
        erasing.interactions.ListInteractions(
            interactions_pb2.ListInteractionsRequest(customer=_by_id(customer_id))
        )
    )
    reply = await erasing.interactions.IngestInteractions(
        iter(
            [
                interactions_pb2.IngestInteractionsRequest(
                    rows=[
                        interactions_pb2.IngestRow(
                            row_ref="late",
                            interaction=interaction(_by_id(customer_id)),
                            idempotency_key="late",
                        )
                    ]
                )
            ]
        )
    )
    assert (reply.stored, reply.rejected) == (0, 1)
    assert reply.rejections[0].row_ref == "late"
    assert read_status(reply.rejections[0].error).field == "interaction.customer"
    assert "not found" in read_status(reply.rejections[0].error).reason
    assert await _remains(database, customer_id) == {"rows": 0, "states": 0}

    # The person's identifier is free again: it resolves to a new customer,
    # not to the erased id this replica had remembered for it.
    again = await erasing.interactions.RecordInteraction(record(interaction(email)))
    assert again.interaction.customer_id not in ("", customer_id)


async def test_an_id_identity_never_issued_gets_no_rows_nor_features(platform) -> None:
    stranger = str(uuid.uuid4())
    await _refused_as_not_found(
        platform.interactions.RecordInteraction(record(interaction(_by_id(stranger))))
    )
    await _refused_as_not_found(
        platform.interactions.ListInteractions(
            interactions_pb2.ListInteractionsRequest(customer=_by_id(stranger))
        )
    )
    known = await platform.identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[email_ref("known@example.com").identifier])
    )
    reply = await platform.interactions.IngestInteractions(
        iter(
            [
                interactions_pb2.IngestInteractionsRequest(
                    rows=[
                        interactions_pb2.IngestRow(
                            row_ref=name,
                            interaction=interaction(_by_id(customer)),
                            idempotency_key=name,
                        )
                        for name, customer in [
                            ("stranger", stranger),
                            ("known", known.customer.customer_id),
                        ]
                    ]
                )
            ]
        )
    )
    assert (reply.stored, reply.rejected) == (1, 1)
    assert [(r.row_ref, read_status(r.error).field) for r in reply.rejections] == [
        ("stranger", "interaction.customer")
    ]
    live = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(
            customers=[_by_id(stranger), _by_id(known.customer.customer_id)]
        )
    )
    assert [v.found for v in live.customers] == [False, True]


async def test_without_identity_any_id_is_taken_until_it_is_erased(database: str) -> None:
    """With no identity service configured there is no registry of customers
    to ask: any id is taken, except an id erased here."""
    runtime = ServiceRuntime(
        INTERACTIONS, InteractionsSettings(database_url=database, port=0, identity_address="")
    )
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            interactions = interactions_pb2_grpc.InteractionsServiceStub(channel)
            privacy = privacy_pb2_grpc.DataSubjectServiceStub(channel)
            customer_id = str(uuid.uuid4())
            await interactions.RecordInteraction(record(interaction(_by_id(customer_id))))
            await privacy.EraseCustomerData(
                privacy_pb2.EraseCustomerDataRequest(customer_ids=[customer_id])
            )
            await _refused_as_not_found(
                interactions.RecordInteraction(record(interaction(_by_id(customer_id))))
            )
            await _refused_as_not_found(
                interactions.ListInteractions(
                    interactions_pb2.ListInteractionsRequest(customer=_by_id(customer_id))
                )
            )
            assert await _remains(database, customer_id) == {"rows": 0, "states": 0}
    finally:
        await runtime.stop(grace=1)

"""Custom interaction types, the feature registry, and retention purges."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import grpc
import pytest

from converge.interactions.app import SPEC as INTERACTIONS
from converge.interactions.settings import InteractionsSettings
from converge.runtime.server import ServiceRuntime
from converge.runtime.values import timestamp
from converge.v1 import common_pb2, interactions_pb2, interactions_pb2_grpc
from tests.identity.helpers import field_violations
from tests.interactions.builders import NOW, email_ref, interaction, number, record


def _custom_type(
    *attributes: interactions_pb2.InteractionAttributeSpec,
) -> interactions_pb2.InteractionType:
    return interactions_pb2.InteractionType(
        name="custom.store.visit", description="A visit to a store.", attributes=list(attributes)
    )


async def test_custom_types_register_accept_interactions_and_change_only_compatibly(
    platform,
) -> None:
    minutes = interactions_pb2.InteractionAttributeSpec(
        name="minutes",
        type=interactions_pb2.INTERACTION_ATTRIBUTE_TYPE_NUMBER,
        required=True,
        min_value=0,
    )
    created = await platform.interactions.RegisterInteractionType(
        interactions_pb2.RegisterInteractionTypeRequest(interaction_type=_custom_type(minutes))
    )
    assert created.created and created.interaction_type.version == 1

    customer = email_ref("visitor@example.com")
    await platform.interactions.RecordInteraction(
        record(
            interaction(
                customer,
                "custom.store.visit",
                attributes={"minutes": number(12)},
                channel=common_pb2.CHANNEL_IN_STORE,
            )
        )
    )
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await platform.interactions.RecordInteraction(
            record(interaction(customer, "custom.store.visit", attributes={"minutes": number(-1)}))
        )
    assert "interaction.attributes.minutes" in field_violations(bad.value)

    optional = interactions_pb2.InteractionAttributeSpec(
        name="aisle", type=interactions_pb2.INTERACTION_ATTRIBUTE_TYPE_STRING
    )
    changed = await platform.interactions.RegisterInteractionType(
        interactions_pb2.RegisterInteractionTypeRequest(
            interaction_type=_custom_type(minutes, optional)
        )
    )
    assert not changed.created and changed.interaction_type.version == 2

    with pytest.raises(grpc.aio.AioRpcError) as incompatible:  # dropping a required attribute
        await platform.interactions.RegisterInteractionType(
            interactions_pb2.RegisterInteractionTypeRequest(interaction_type=_custom_type(optional))
        )
    assert incompatible.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    listed = await platform.interactions.ListInteractionTypes(
        interactions_pb2.ListInteractionTypesRequest(custom_only=True)
    )
    assert [t.name for t in listed.interaction_types] == ["custom.store.visit"]
    everything = await platform.interactions.ListInteractionTypes(
        interactions_pb2.ListInteractionTypesRequest()
    )
    assert {"ticket.opened", "survey.nps", "custom.store.visit"} <= {
        t.name for t in everything.interaction_types
    }


async def test_built_in_types_cannot_be_redefined_and_custom_names_are_prefixed(platform) -> None:
    for name in ("ticket.opened", "store.visit"):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await platform.interactions.RegisterInteractionType(
                interactions_pb2.RegisterInteractionTypeRequest(
                    interaction_type=interactions_pb2.InteractionType(name=name)
                )
            )
        assert error.value.code() in (
            grpc.StatusCode.INVALID_ARGUMENT,
            grpc.StatusCode.FAILED_PRECONDITION,
        )


async def test_feature_registry_is_listed_with_its_version(platform) -> None:
    registry = await platform.interactions.ListFeatureDefinitions(
        interactions_pb2.ListFeatureDefinitionsRequest(
            entity=interactions_pb2.FEATURE_ENTITY_TICKET
        )
    )
    assert registry.feature_set_version.startswith("builtin-")
    names = {d.name for d in registry.definitions}
    assert {"ticket_age_hours", "ticket_sla_hours_left", "ticket_reassignments"} <= names
    assert all(name.startswith("ticket_") for name in names)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await platform.interactions.ListFeatureDefinitions(
            interactions_pb2.ListFeatureDefinitionsRequest(feature_set_version="v0-old")
        )
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_purge_removes_only_interactions_older_than_the_horizon(platform) -> None:
    customer = email_ref("old@example.com")
    for days in (400, 300, 200, 10):
        await platform.interactions.RecordInteraction(
            record(interaction(customer, days_ago=days), f"age-{days}")
        )
    horizon = timestamp(NOW - timedelta(days=250))
    actor = common_pb2.Actor(name="admin", reason="retention policy")

    dry = await platform.interactions.PurgeInteractions(
        interactions_pb2.PurgeInteractionsRequest(older_than=horizon, dry_run=True, actor=actor)
    )
    assert dry.purged == 2
    purged = await platform.interactions.PurgeInteractions(
        interactions_pb2.PurgeInteractionsRequest(older_than=horizon, actor=actor)
    )
    assert (purged.purged, dict(purged.purged_by_type)) == (2, {"product.login": 2})
    left = await platform.interactions.ListInteractions(
        interactions_pb2.ListInteractionsRequest(customer=customer)
    )
    assert [i.idempotency_key for i in left.interactions] == ["age-10", "age-200"]

    with pytest.raises(grpc.aio.AioRpcError) as too_recent:
        await platform.interactions.PurgeInteractions(
            interactions_pb2.PurgeInteractionsRequest(
                older_than=timestamp(NOW - timedelta(days=30)), actor=actor
            )
        )
    assert too_recent.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as nameless:
        await platform.interactions.PurgeInteractions(
            interactions_pb2.PurgeInteractionsRequest(older_than=horizon)
        )
    assert "actor.name" in field_violations(nameless.value)


async def test_purge_while_ingesting_neither_blocks_nor_loses_new_events(platform) -> None:
    customer = email_ref("busy@example.com")
    for i in range(300):
        await platform.interactions.RecordInteraction(
            record(interaction(customer, days_ago=500 + i / 10), f"old-{i}")
        )

    async def ingest_recent() -> int:
        stored = 0
        for i in range(50):
            reply = await platform.interactions.RecordInteraction(
                record(
                    interaction(
                        customer, "survey.nps", days_ago=1, attributes={"score": number(8)}
                    ),
                    f"new-{i}",
                )
            )
            stored += not reply.duplicate
        return stored

    purge = platform.interactions.PurgeInteractions(
        interactions_pb2.PurgeInteractionsRequest(
            older_than=timestamp(NOW - timedelta(days=400)), actor=common_pb2.Actor(name="admin")
        )
    )
    purged, stored = await asyncio.gather(purge, ingest_recent())
    assert (purged.purged, stored) == (300, 50)
    left = await platform.interactions.ListInteractions(
        interactions_pb2.ListInteractionsRequest(customer=customer)
    )
    assert len(left.interactions) == 50


async def test_a_purge_in_many_small_batches_walks_the_table_once(database: str) -> None:
    """Old and recent interactions interleaved in stored order, purged seven at
    a time: every old one goes, every recent one stays."""
    runtime = ServiceRuntime(
        INTERACTIONS,
        InteractionsSettings(
            database_url=database, port=0, identity_address="", purge_batch_size=7
        ),
    )
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
            customer = common_pb2.CustomerRef(customer_id=str(uuid.uuid4()))
            for i in range(60):
                old = i % 3 != 0
                await stub.RecordInteraction(
                    record(interaction(customer, days_ago=500 if old else 1), f"row-{i}")
                )
            purged = await stub.PurgeInteractions(
                interactions_pb2.PurgeInteractionsRequest(
                    older_than=timestamp(NOW - timedelta(days=400)),
                    actor=common_pb2.Actor(name="admin"),
                )
            )
            left = await stub.ListInteractions(
                interactions_pb2.ListInteractionsRequest(customer=customer)
            )
    finally:
        await runtime.stop(grace=1)
    assert purged.purged == 40
    assert sorted(int(i.idempotency_key.split("-")[1]) for i in left.interactions) == list(
        range(0, 60, 3)
    )

"""A configured feature set served by the interactions service: described by
ListFeatureDefinitions (filters included), read by GetFeatures and
GetPointInTimeFeatures (categorical features as text), checked in
`feature_names`; and a changed set rebuilding the live states in the
background while a stream ingests."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import prometheus_client
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from converge.features.config import load_feature_set
from converge.interactions.app import SPEC as INTERACTIONS
from converge.interactions.settings import InteractionsSettings
from converge.runtime.server import ServiceRuntime
from converge.runtime.settings import load_settings
from converge.v1 import common_pb2, interactions_pb2, interactions_pb2_grpc
from tests.features.sets import write_set
from tests.interactions.builders import email_ref, interaction, record, text
from tests.waiting import wait_until

CHANNELS = [common_pb2.CHANNEL_WEB, common_pb2.CHANNEL_PHONE, common_pb2.CHANNEL_EMAIL]


@contextlib.asynccontextmanager
async def interactions_serving(
    database: str, identity_address: str, feature_set: str
) -> AsyncIterator[tuple[interactions_pb2_grpc.InteractionsServiceStub, grpc.aio.Channel]]:
    """Another interactions service on the test's database, serving `feature_set`."""
    runtime = ServiceRuntime(
        INTERACTIONS,
        InteractionsSettings(
            database_url=database,
            port=0,
            identity_address=identity_address,
            ingest_batch_size=50,
            feature_set=feature_set,
            state_rebuild_batch=7,
        ),
    )
    await runtime.start()
    channel = grpc.aio.insecure_channel(runtime.address)
    try:
        yield interactions_pb2_grpc.InteractionsServiceStub(channel), channel
    finally:
        await channel.close()
        await runtime.stop(grace=1)


def _ticket_history(rng: random.Random, customer: common_pb2.CustomerRef, tag: str) -> list:
    """Tickets whose service-desk attributes change as they are updated, and
    calls, in shuffled order (late events are normal)."""
    items = []
    for n in range(rng.randrange(4, 25)):
        ticket = f"{tag}-T{rng.randrange(3)}"
        kind = rng.choice(
            ["ticket.opened", "ticket.updated", "ticket.resolved", "conversation.call"]
        )
        attributes: dict = {}
        fields: dict = {}
        if kind.startswith("ticket."):
            fields = {"ticket_id": ticket}
            for name, values in (
                ("category", ["network", "Network", "billing", "access"]),
                ("assignment_group", ["Group 1", "Group 2", "Group 3"]),
                ("urgency", ["high", "low"]),
            ):
                if rng.random() < 0.6:
                    attributes[name] = text(rng.choice(values))
            if kind == "ticket.opened":
                attributes["priority"] = text(rng.choice(["low", "normal", "high", "urgent"]))
        else:
            attributes = {"direction": text(rng.choice(["inbound", "outbound"]))}
        items.append(
            record(
                interaction(
                    customer,
                    kind,
                    days_ago=rng.uniform(0.01, 60),
                    channel=rng.choice(CHANNELS),
                    attributes=attributes,
                    **fields,
                ),
                f"{tag}-{n}",
            )
        )
    rng.shuffle(items)
    return items


async def _assert_live_equals_point_in_time(
    stub: interactions_pb2_grpc.InteractionsServiceStub, customers: list
) -> interactions_pb2.GetFeaturesResponse:
    live = await stub.GetFeatures(
        interactions_pb2.GetFeaturesRequest(customers=customers, include_open_tickets=True)
    )
    queries = [
        interactions_pb2.PointInTimeQuery(row_ref=str(i), customer_id=v.customer_id, as_of=v.as_of)
        for i, v in enumerate(live.customers)
    ] + [
        interactions_pb2.PointInTimeQuery(
            row_ref=t.ticket_id, customer_id=t.customer_id, as_of=t.as_of, ticket_id=t.ticket_id
        )
        for t in live.tickets
    ]
    [pit] = [
        r
        async for r in stub.GetPointInTimeFeatures(
            iter([interactions_pb2.GetPointInTimeFeaturesRequest(queries=queries)])
        )
    ]
    assert pit.feature_set_version == live.feature_set_version
    results = list(pit.results)
    for vector, result in zip(live.customers, results[: len(customers)], strict=True):
        assert dict(vector.values) == dict(result.customer.values)
        assert dict(vector.category_values) == dict(result.customer.category_values)
        assert vector.feature_set_version == live.feature_set_version
    for vector, result in zip(live.tickets, results[len(customers) :], strict=True):
        assert dict(vector.values) == dict(result.ticket.values)
        assert dict(vector.category_values) == dict(result.ticket.category_values)
    return live


async def test_a_configured_set_is_described_served_and_checked(
    platform, database: str, tmp_path: Path
) -> None:
    path = write_set(tmp_path)
    configured = load_feature_set(path)
    async with interactions_serving(database, platform.identity_address, str(path)) as (stub, _):
        listed = await stub.ListFeatureDefinitions(interactions_pb2.ListFeatureDefinitionsRequest())
        assert listed.feature_set_version == configured.version
        assert list(listed.served_versions) == [configured.version]
        by_name = {d.name: d for d in listed.definitions}
        network = by_name["network_tickets_30d"]
        assert [(f.attribute, list(f.values)) for f in network.filters] == [
            ("category", ["network"]),
            ("priority", ["high", "urgent"]),
        ]
        assert network.window.seconds == 30 * 86400
        group = by_name["ticket_assignment_group"]
        assert group.aggregation == interactions_pb2.FEATURE_AGGREGATION_CATEGORY
        assert group.min_category_count == 5
        assert "open_tickets" in by_name  # (builtin: true)

        customer = email_ref("configured@example.com")
        for item in [
            record(interaction(customer, "ticket.opened", days_ago=2, ticket_id="CFG-1",
                   attributes={"priority": text("high"), "category": text("network"),
                               "assignment_group": text("Group 1")})),
            record(interaction(customer, "ticket.updated", days_ago=1, ticket_id="CFG-1",
                   attributes={"assignment_group": text("Group 7")})),
        ]:  # fmt: skip
            await stub.RecordInteraction(item)
        reply = await stub.GetFeatures(
            interactions_pb2.GetFeaturesRequest(
                customers=[customer],
                ticket_ids=["CFG-1"],
                feature_names=["network_tickets_30d", "last_ticket_category",
                               "ticket_assignment_group", "ticket_category"],
            )
        )  # fmt: skip
        assert reply.feature_set_version == configured.version
        [vector] = reply.customers
        assert dict(vector.values) == {"network_tickets_30d": 1.0}
        assert dict(vector.category_values) == {"last_ticket_category": "network"}
        [ticket] = reply.tickets
        assert dict(ticket.category_values) == {
            "ticket_assignment_group": "Group 7",
            "ticket_category": "network",
        }
        assert dict(ticket.values) == {}

        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.GetFeatures(
                interactions_pb2.GetFeaturesRequest(
                    customers=[customer], feature_names=["network_tickets_30d", "nope"]
                )
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "feature_names[1]" in str(error.value.trailing_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.GetFeatures(
                interactions_pb2.GetFeaturesRequest(
                    customers=[customer], feature_set_version="builtin-000000000000"
                )
            )
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    # The built-in service does not know the configured names.
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await platform.interactions.GetFeatures(
            interactions_pb2.GetFeaturesRequest(
                customers=[customer], feature_names=["network_tickets_30d"]
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_live_features_of_a_configured_set_equal_point_in_time_features(
    platform, database: str, tmp_path: Path
) -> None:
    rng = random.Random(13)
    customers = [email_ref(f"cfg-parity-{i}@example.com") for i in range(10)]
    path = write_set(tmp_path)
    async with interactions_serving(database, platform.identity_address, str(path)) as (stub, _):
        for i, customer in enumerate(customers):
            for request in _ticket_history(rng, customer, f"cp{i}"):
                await stub.RecordInteraction(request)
        live = await _assert_live_equals_point_in_time(stub, customers)
    # The histories reach the filtered and categorical features (the test could fail).
    assert any(v.values["network_tickets_30d"] > 0 for v in live.customers)
    assert any("last_ticket_category" in v.category_values for v in live.customers)
    assert any("ticket_assignment_group" in t.category_values for t in live.tickets)
    assert any(t.values["ticket_urgent_updates"] > 0 for t in live.tickets)


def test_a_wrong_feature_set_stops_the_start_naming_the_setting_and_the_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_set(tmp_path, "version: 1\nname: broken\nfeatures:\n  - name: x\n    colour: 1\n")
    monkeypatch.setenv("CONVERGE_INTERACTIONS_FEATURE_SET", str(path))
    with pytest.raises(SystemExit) as stopped:
        load_settings(InteractionsSettings)
    assert stopped.value.code == 2
    message = capsys.readouterr().err
    assert "CONVERGE_INTERACTIONS_FEATURE_SET" in message
    assert f"{path}: line 4, features[0].description: required key missing" in message
    assert "line 5, features[0].colour: unknown key" in message


async def _state_versions(database: str) -> dict[str, str]:
    connection = await asyncpg.connect(database)
    try:
        rows = await connection.fetch(
            "SELECT customer_id::text, convert_from(state, 'UTF8')::jsonb ->> 'version' AS v "
            "FROM interactions.customer_state"
        )
    finally:
        await connection.close()
    return {r["customer_id"]: r["v"] for r in rows}


def _rebuilt_so_far() -> float:
    return (
        prometheus_client.REGISTRY.get_sample_value("converge_interactions_states_rebuilt_total")
        or 0.0
    )


async def test_a_changed_feature_set_rebuilds_live_states_in_the_background_beside_ingest(
    platform, database: str, tmp_path: Path
) -> None:
    """States written under the built-in set (A); the service restarted with a
    configured set (B) while a stream ingests for half of the customers:
    every state ends at B's state version, no ingested row is lost, the
    untouched half was rebuilt in the background, and live features equal
    point-in-time ones for B."""
    rng = random.Random(17)
    customers = [email_ref(f"rebuild-{i}@example.com") for i in range(24)]
    for i, customer in enumerate(customers):
        for request in _ticket_history(rng, customer, f"rb{i}"):
            await platform.interactions.RecordInteraction(request)
    builtin_state = load_feature_set("").state_version
    written_under_a = await _state_versions(database)
    assert len(written_under_a) == len(customers)
    assert set(written_under_a.values()) == {builtin_state}

    path = write_set(tmp_path)
    configured = load_feature_set(path)
    assert configured.state_version != builtin_state
    streamed = customers[::2]
    rebuilt_before = _rebuilt_so_far()
    async with interactions_serving(database, platform.identity_address, str(path)) as (
        stub,
        channel,
    ):
        rows = [
            interactions_pb2.IngestRow(
                interaction=interaction(
                    customer, "ticket.opened", days_ago=0.5, ticket_id=f"NEW-{i}-{n}",
                    attributes={"priority": text("urgent"), "category": text("network")},
                ),
                idempotency_key=f"stream-{i}-{n}",
            )
            for i, customer in enumerate(streamed)
            for n in range(3)
        ]  # fmt: skip
        batches = [
            interactions_pb2.IngestInteractionsRequest(rows=rows[k : k + 5])
            for k in range(0, len(rows), 5)
        ]
        reply = await stub.IngestInteractions(iter(batches))
        assert reply.stored == len(rows)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING

        await wait_until(
            lambda: _state_versions(database),
            lambda versions: set(versions.values()) == {configured.state_version},
            what="every live state at the configured set's state version",
        )
        untouched = len(customers) - len(streamed)
        assert _rebuilt_so_far() - rebuilt_before >= untouched
        live = await _assert_live_equals_point_in_time(stub, customers)
    for vector in live.customers[::2]:  # the streamed tickets were all kept
        assert vector.values["network_tickets_30d"] >= 3
    assert await asyncio.wait_for(_state_versions(database), 30) is not None

"""GetFeatures' read path: everything read in one statement, a stored state
read as parsed, and features read earlier today answered again from memory
(FeatureCache) only while the stored state is at the version they were read
from; merges and writes since are always seen."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from converge.features.engine import BUILTIN, FeatureValues
from converge.interactions.app import SPEC
from converge.interactions.change_feed import ChangeFeed
from converge.interactions.identity_link import IdentityLink
from converge.interactions.service import FeatureCache, InteractionsService
from converge.interactions.settings import InteractionsSettings
from converge.interactions.store import LIVE_READS, InteractionsStore
from converge.runtime.server import ServiceRuntime
from converge.runtime.values import timestamp
from converge.v1 import common_pb2, interactions_pb2, interactions_pb2_grpc
from tests.interactions.builders import interaction, record, text


@dataclass
class Served:
    """The interactions service over gRPC, and a second service object on
    the same database whose cache the test can look into."""

    stub: interactions_pb2_grpc.InteractionsServiceStub
    store: InteractionsStore
    service: InteractionsService


@pytest.fixture
async def served(database: str) -> AsyncIterator[Served]:
    settings = InteractionsSettings(database_url=database, port=0, identity_address="")
    runtime = ServiceRuntime(SPEC, settings)
    await runtime.start()
    store = InteractionsStore(runtime.pool)
    identity = IdentityLink("", 1.0, store)  # (no identity service: ids as given)
    service = InteractionsService(store, identity, settings, ChangeFeed(store, 1.0), BUILTIN)
    channel = grpc.aio.insecure_channel(runtime.address)
    yield Served(interactions_pb2_grpc.InteractionsServiceStub(channel), store, service)
    await channel.close()
    await runtime.stop(grace=1)


async def _record(served: Served, customer: uuid.UUID, key: str, days_ago: float) -> None:
    ref = common_pb2.CustomerRef(customer_id=str(customer))
    await served.stub.RecordInteraction(record(interaction(ref, days_ago=days_ago), key))


async def _features(served: Served, *customers: uuid.UUID) -> tuple[datetime, list[object]]:
    as_of, found, _ = await served.service.features([(c, None) for c in customers], [], False)
    return as_of, [values for _, values in found]


async def _expected(served: Served, members: list[uuid.UUID], as_of: datetime) -> FeatureValues:
    """The features as read from the stored states without any cache."""
    kept = await served.store.states(members)
    states = [BUILTIN.state_from_json(kept[m]) for m in members if m in kept]
    state = states[0]
    for other in states[1:]:
        state = state.merge(other)
    return BUILTIN.customer_features(state, as_of)


async def test_an_unchanged_state_is_not_sent_again_and_reads_the_same(served: Served) -> None:
    customer = uuid.uuid4()
    for day in (1, 3, 20):
        await _record(served, customer, f"c-{day}", day)
    as_of, [first] = await _features(served, customer)
    assert first == await _expected(served, [customer], as_of)
    [(version, _)] = served.service.feature_cache.readings([customer], as_of).values()

    reads = await served.store.live_reads([customer], known={customer: version})
    assert reads.customers[customer].versions == {customer: version}
    assert reads.customers[customer].states == {}  # (known: not sent)

    as_of, [again] = await _features(served, customer)
    assert again == await _expected(served, [customer], as_of)
    assert again is not None and again["count_7d_all"] == 2.0


async def test_a_write_since_the_cached_read_is_seen(served: Served) -> None:
    customer = uuid.uuid4()
    await _record(served, customer, "w-1", 2)
    _, [before] = await _features(served, customer)
    assert before is not None and before["count_7d_all"] == 1.0
    await _record(served, customer, "w-2", 1)
    as_of, [after] = await _features(served, customer)
    assert after is not None and after["count_7d_all"] == 2.0
    assert after == await _expected(served, [customer], as_of)


async def test_a_merge_since_the_cached_reads_gives_the_merged_features(served: Served) -> None:
    survivor, merged = uuid.uuid4(), uuid.uuid4()
    await _record(served, survivor, "s-1", 2)
    await _record(served, merged, "m-1", 3)
    await _record(served, merged, "m-2", 40)
    await _features(served, survivor, merged)  # (both cached)
    await served.store.apply_merge(merged, survivor, uuid.uuid4(), "cursor-1", datetime.now(UTC))

    as_of, found, _ = await served.service.features([(survivor, None), (merged, None)], [], False)
    expected = await _expected(served, [survivor, merged], as_of)
    assert found == [(survivor, expected), (survivor, expected)]
    assert expected["count_7d_all"] == 2.0 and expected["count_90d_all"] == 3.0


async def test_features_over_grpc_equal_the_stored_states_features(served: Served) -> None:
    customers = [uuid.uuid4() for _ in range(3)]
    for i, customer in enumerate(customers):
        for day in range(i + 1):
            await _record(served, customer, f"g-{i}-{day}", day + 0.5)
    request = interactions_pb2.GetFeaturesRequest(
        customers=[common_pb2.CustomerRef(customer_id=str(c)) for c in customers]
        + [common_pb2.CustomerRef(customer_id=str(uuid.uuid4()))]  # (no interactions)
    )
    for _ in range(2):  # (read, then read again while unchanged)
        reply = await served.stub.GetFeatures(request)
        as_of = reply.customers[0].as_of.ToDatetime(tzinfo=UTC)
        for customer, vector in zip(customers, reply.customers, strict=False):
            assert vector.found and vector.customer_id == str(customer)
            assert dict(vector.values) == await _expected(served, [customer], as_of)
        assert reply.customers[3].found and reply.customers[3].values["count_90d_all"] == 0.0


def test_the_least_recently_read_customer_goes_first_beyond_capacity() -> None:
    state = BUILTIN.new_state()
    now = datetime.now(UTC)
    reading = BUILTIN.day_reading(state, now)
    cache = FeatureCache(capacity=2)
    first, second, third = (uuid.UUID(int=i) for i in range(1, 4))
    cache.put(first, 1, reading)
    cache.put(second, 1, reading)
    assert cache.readings([first], now) == {first: (1, reading)}  # (now the most recent)
    cache.put(third, 1, reading)
    assert set(cache.readings([first, second, third], now)) == {first, third}
    disabled = FeatureCache(capacity=0)
    disabled.put(first, 1, reading)
    assert len(disabled) == 0


async def test_an_erased_customers_features_are_dropped_and_never_served(served: Served) -> None:
    customer = uuid.uuid4()
    await _record(served, customer, "e-1", 1)
    as_of, [values] = await _features(served, customer)
    assert values is not None and served.service.feature_cache.readings([customer], as_of)
    await served.service.erase([customer])
    assert served.service.feature_cache.readings([customer], as_of) == {}
    _, [gone] = await _features(served, customer)
    assert gone is None


async def _ticket_history(served: Served, customer: uuid.UUID, tag: str) -> None:
    """Two tickets of the customer: t-open (opened with an SLA, escalated)
    and t-done (opened, then resolved)."""
    ref = common_pb2.CustomerRef(customer_id=str(customer))
    sla = common_pb2.AttributeValue(
        timestamp_value=timestamp(datetime.now(UTC) + timedelta(hours=30))
    )
    rows = [
        interaction(ref, "ticket.opened", days_ago=3, ticket_id=f"{tag}-open",
                    attributes={"priority": text("high"), "sla_due_at": sla}),
        interaction(ref, "ticket.escalated", days_ago=2, ticket_id=f"{tag}-open", sentiment=-0.4),
        interaction(ref, "ticket.opened", days_ago=10, ticket_id=f"{tag}-done",
                    attributes={"priority": text("low")}),
        interaction(ref, "ticket.resolved", days_ago=9, ticket_id=f"{tag}-done", sentiment=0.5),
        interaction(ref, "product.login", days_ago=1),
    ]  # fmt: skip
    for i, row in enumerate(rows):
        await served.stub.RecordInteraction(record(row, f"{tag}-{i}"))


def _uncached(served: Served) -> InteractionsService:
    settings = served.service.settings.model_copy(update={"feature_cache_size": 0})
    fresh = InteractionsService(
        served.store, served.service.identity, settings, served.service.changes, BUILTIN
    )
    fresh.clock = served.service.clock
    return fresh


async def test_cached_ticket_and_open_ticket_reads_equal_fresh_ones_at_any_later_moment(
    served: Served,
) -> None:
    """Customers, named tickets and open tickets, read again from memory at
    moments later the same day, the next day and weeks later (a controlled
    clock), equal what a service without a cache reads from the states."""
    customers = [uuid.uuid4(), uuid.uuid4()]
    for i, customer in enumerate(customers):
        await _ticket_history(served, customer, f"k{i}")
    service, fresh = served.service, _uncached(served)
    tickets = ["k0-open", "k1-done", "nobody's"]
    refs = [(c, None) for c in customers]
    start = datetime.now(UTC) + timedelta(minutes=1)
    for moment in (timedelta(0), timedelta(hours=1), timedelta(days=1), timedelta(days=40)):
        service.clock = lambda at=start + moment: at  # type: ignore[misc]
        fresh.clock = service.clock
        for include_open in (False, True):
            first = await service.features(refs, tickets, include_open)
            again = await service.features(refs, tickets, include_open)
            expected = await fresh.features(refs, tickets, include_open)
            assert first == again == expected
        # Everything asked is now held: no state needs sending.
        known, held = service.feature_cache.known_versions(customers, tickets, True, start + moment)
        assert known.keys() == set(customers) and held == ["k0-open", "k1-done"]
    _, _, read = expected
    assert [(t, v is not None) for _, t, v in read] == [
        ("k0-open", True), ("k1-done", True), ("nobody's", False), ("k1-open", True)
    ]  # fmt: skip
    assert read[0][2] is not None and read[0][2]["ticket_escalations"] == 1.0


async def test_a_write_since_a_cached_ticket_read_is_seen(served: Served) -> None:
    customer = uuid.uuid4()
    await _ticket_history(served, customer, "w")
    ref = common_pb2.CustomerRef(customer_id=str(customer))
    _, _, [(_, _, before)] = await served.service.features([(customer, None)], ["w-open"], False)
    assert before is not None and before["ticket_open"] == 1.0
    await served.stub.RecordInteraction(
        record(interaction(ref, "ticket.resolved", days_ago=0.5, ticket_id="w-open"), "w-r")
    )
    _, _, [(_, _, after)] = await served.service.features([(customer, None)], ["w-open"], False)
    assert after is not None and after["ticket_open"] == 0.0
    [(_, _, expected)] = (await _uncached(served).features([(customer, None)], ["w-open"], False))[
        2
    ]
    assert after["ticket_escalations"] == expected["ticket_escalations"]  # type: ignore[index]


async def test_a_known_state_is_sent_when_it_owns_a_ticket_asked_and_not_held(
    served: Served,
) -> None:
    """The customer's features are held, the ticket's are not: the store
    sends the state all the same (one round trip), and the ticket is read
    from it."""
    customer = uuid.uuid4()
    await _ticket_history(served, customer, "f")
    # One moment for the read and the look (a day turning between them would empty it).
    moment = datetime.now(UTC)
    served.service.clock = lambda: moment
    await _features(served, customer)
    known, held = served.service.feature_cache.known_versions([customer], ["f-open"], False, moment)
    assert customer in known and held == []
    reads = await served.store.live_reads([customer], ["f-open"], known, held)
    assert customer in reads.customers[customer].states
    held_back = await served.store.live_reads([customer], ["f-open"], known, ["f-open"])
    assert held_back.customers[customer].states == {}
    now, _, [(owner, _, values)] = await served.service.features(
        [(customer, None)], ["f-open"], False
    )
    state = BUILTIN.stored_state((await served.store.states([customer]))[customer])
    assert owner == customer and values == BUILTIN.ticket_features(state, "f-open", now)


async def test_an_erased_customers_ticket_readings_are_dropped(served: Served) -> None:
    customer = uuid.uuid4()
    await _ticket_history(served, customer, "x")
    moment = datetime.now(UTC)
    served.service.clock = lambda: moment
    await served.service.features([(customer, None)], ["x-open", "x-done"], True)
    cache = served.service.feature_cache
    assert cache.known_versions([], ["x-open"], False, moment)[1] == ["x-open"]
    await served.service.erase([customer])
    assert len(cache) == 0 and cache._ticket_holders == {}
    _, _, tickets = await served.service.features([(customer, None)], ["x-open"], False)
    assert tickets == [(uuid.UUID(int=0), "x-open", None)]


def test_an_evicted_customers_ticket_readings_go_with_it() -> None:
    reading = BUILTIN.ticket_reading(BUILTIN.new_state(), "t", datetime.now(UTC))
    cache = FeatureCache(capacity=1)
    first, second = uuid.UUID(int=1), uuid.UUID(int=2)
    cache.put_ticket(first, 7, "t1", reading)
    assert cache.known_versions([], ["t1"], False, datetime.now(UTC)) == ({first: 7}, ["t1"])
    cache.put_ticket(second, 1, "t2", reading)
    assert cache.known_versions([], ["t1", "t2"], False, datetime.now(UTC)) == (
        {second: 1},
        ["t2"],
    )
    assert cache._ticket_holders == {"t2": second}
    cache.put_ticket(second, 2, "t3", reading)  # (a newer version: the older one's go)
    assert cache._ticket_holders == {"t3": second}


def _scans(plan: dict[str, Any]) -> Iterator[dict[str, Any]]:
    if "Relation Name" in plan:
        yield plan
    for child in plan.get("Plans", []):
        yield from _scans(child)


async def test_live_reads_probe_every_table_by_key_in_the_generic_plan(served: Served) -> None:
    """The plan PostgreSQL falls back to for the prepared statement reads
    each table through an index, by key, per customer: no scan of all
    states (or of all interactions for the tickets) whatever the table
    sizes. (Seq scans are turned off: on these small tables a seq scan per
    probe can be the cheaper plan, which would hide a missing index path.)"""
    async with served.store.pool.acquire() as connection, connection.transaction():
        await connection.execute("SET LOCAL enable_seqscan = off")
        await connection.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        await connection.execute(f"PREPARE live_reads AS {LIVE_READS}")
        try:
            explained = await connection.fetchval(
                "EXPLAIN (FORMAT JSON) EXECUTE live_reads("
                f"'{{{uuid.uuid4()}}}', '{{{uuid.uuid4()}}}', '{{7}}', '{{t-1}}', '{{t-1}}')"
            )
        finally:
            await connection.execute("DEALLOCATE live_reads")
    [plan] = explained
    scans = list(_scans(plan["Plan"]))
    assert {s["Relation Name"] for s in scans} == {
        "interactions", "customer_links", "erased_customers", "customer_state"
    }  # fmt: skip
    for scan in scans:
        condition = scan.get("Index Cond") or scan.get("Recheck Cond") or ""
        key = "ticket_id" if scan["Relation Name"] == "interactions" else "_id"
        assert "$" in condition or "." in condition, scan  # (a parameter or an outer row's column)
        assert key in condition, scan

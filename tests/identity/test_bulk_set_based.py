"""A bulk resolve's set-based paths (replays read at once, fresh customers
created together, known customers updated together) leave exactly what
resolving the same rows one by one leaves: the same customers with the same
identifiers, profiles and profile history, the same merges, the same events
for each customer in the same order, and the same answer for every row.

Generated batches mix rows of new and existing customers, identifiers another
customer owns, idempotency keys repeated inside a batch (the same content or
another), rows identity refuses (two CRM ids, a lookup of nobody) and profile
times. Each example runs in two worlds of the same database, told apart by a
prefix on every identifier and key: one resolves the batch with
`resolve_batch`, the other row by row; then both run it again (a re-run).

The service runs over its real store and PostgreSQL; the gRPC side of
BulkResolve (several rows a message) is tested at the end."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from converge.identity.domain import Actor, BulkOutcome, BulkRow, Idempotency
from converge.identity.identifiers import IdentifierKind, NormalizedIdentifier
from converge.identity.peers import PeerServices
from converge.identity.service import IdentityService
from converge.identity.settings import IdentitySettings
from converge.identity.store import IdentityStore
from converge.runtime.database import create_pool
from converge.runtime.errors import read_status
from converge.v1 import identity_pb2
from tests.identity.helpers import CRM, EMAIL, ident
from tests.identity.test_bulk import row

PAST = (datetime(2019, 3, 1, tzinfo=UTC), datetime(2021, 7, 1, tzinfo=UTC))


@dataclass(frozen=True)
class Spec:
    """A generated row, the same in both worlds."""

    identifiers: tuple[tuple[str, int], ...]  # (kind, number)
    profile: tuple[tuple[str, str], ...]
    upsert: tuple[tuple[str, str], ...] | None
    effective_at: datetime | None
    key: str | None
    lookup_only: bool


# Few enough identifiers that rows meet (shared, owned by others, joined),
# enough that many rows stay on their own (the set-based paths take those).
identifier_specs = st.lists(
    st.tuples(st.sampled_from(["EMAIL", "CRM_ID"]), st.integers(0, 5)),
    min_size=1,
    max_size=2,
    unique=True,
)
fields = st.lists(
    st.tuples(st.sampled_from(["plan", "segment", "attributes.tier"]), st.sampled_from("ab")),
    max_size=3,
    unique_by=lambda f: f[0],
)
specs = st.builds(
    Spec,
    identifiers=identifier_specs.map(tuple),
    profile=fields.map(tuple),
    upsert=st.one_of(st.none(), fields.filter(bool).map(tuple), fields.filter(bool).map(tuple)),
    effective_at=st.sampled_from([None, *PAST]),
    key=st.sampled_from([None, None, "k0", "k1", "k2", "k3", "k4"]),
    lookup_only=st.sampled_from([False, False, False, True]),
)


def bulk_row(spec: Spec, world: str) -> BulkRow:
    identifiers = tuple(
        NormalizedIdentifier(
            IdentifierKind[kind],
            "",
            f"{world}.{n}@example.com" if kind == "EMAIL" else f"{world}-crm-{n}",
        )
        for kind, n in spec.identifiers
    )
    content = repr((spec.identifiers, spec.profile, spec.upsert, spec.effective_at))
    idempotency = None
    if spec.key is not None:
        fingerprint = hashlib.sha256((content + repr(spec.lookup_only)).encode()).digest()
        idempotency = Idempotency(f"{world}-{spec.key}", fingerprint)
    return BulkRow(
        identifiers,
        {name: {"s": value} for name, value in spec.profile},
        None if spec.upsert is None else {name: {"s": value} for name, value in spec.upsert},
        spec.lookup_only,
        Actor("crm-import", ""),
        idempotency,
        spec.effective_at,
    )


def answers(outcomes: list[BulkOutcome]) -> list[tuple[Any, ...]]:
    return [
        (o.created, o.merges, type(o.error).__name__, str(o.error) if o.error else "")
        for o in outcomes
    ]


async def world_state(connection: asyncpg.Connection, world: str) -> dict[str, Any]:
    """Everything the world holds, each customer named by its identifiers
    (ids are random) and times of "now" left out."""
    customers = await connection.fetch(
        """
        SELECT c.customer_id, c.merged_into, c.profile,
               ARRAY(SELECT i.kind || ':' || i.value FROM identity.identifiers i
                     WHERE i.customer_id = c.customer_id ORDER BY 1) AS identifiers
        FROM identity.customers c
        WHERE c.customer_id IN (SELECT customer_id FROM identity.identifiers WHERE value LIKE $1)
        """,
        f"%{world}%",
    )
    names = {c["customer_id"]: "|".join(c["identifiers"]).replace(world, "W") for c in customers}
    ids = list(names)
    changes = await connection.fetch(
        "SELECT customer_id, field, value, effective_at, actor, merge_id IS NOT NULL AS taken "
        "FROM identity.profile_changes WHERE customer_id = ANY($1) ORDER BY change_id, position",
        ids,
    )
    events = await connection.fetch(
        "SELECT customer_id, event_type, other_customer_id FROM identity.identity_events "
        "WHERE customer_id = ANY($1) ORDER BY xid, event_id",
        ids,
    )
    merges = await connection.fetch(
        "SELECT surviving_customer_id, merged_customer_id, joining_identifiers "
        "FROM identity.merges WHERE surviving_customer_id = ANY($1)",
        ids,
    )
    history: dict[str, list[Any]] = {}
    for c in changes:
        at = c["effective_at"] if c["effective_at"] in PAST else "now"
        actor = "merge" if c["actor"].startswith("merge:") else c["actor"]  # (its random id)
        history.setdefault(names[c["customer_id"]], []).append(
            (c["field"], c["value"], at, actor, c["taken"])
        )
    stream: dict[str, list[Any]] = {}
    for e in events:
        other = names.get(e["other_customer_id"]) if e["other_customer_id"] else None
        stream.setdefault(names[e["customer_id"]], []).append((e["event_type"], other))
    return {
        "customers": sorted(
            (names[c["customer_id"]], names.get(c["merged_into"]), repr(c["profile"]))
            for c in customers
        ),
        "history": history,
        "events": stream,
        "merges": sorted(
            (
                names[m["surviving_customer_id"]],
                names[m["merged_customer_id"]],
                repr(m["joining_identifiers"]).replace(world, "W"),
            )
            for m in merges
        ),
    }


@pytest.fixture
async def service(identity, database: str) -> AsyncIterator[IdentityService]:
    """The identity service's rules over their real store (the `identity`
    fixture has migrated the database)."""
    settings = IdentitySettings(database_url=database, port=0)
    pool = await create_pool(database, "identity", application_name="test-set-based")
    yield IdentityService(IdentityStore(pool), settings, PeerServices(settings.peer_services, 1.0))
    await pool.close()


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@example(  # two customers created together, then upserted together on the re-run
    before=[],
    batch=[
        Spec((("CRM_ID", 1),), (), (("plan", "a"),), None, None, False),
        Spec((("EMAIL", 2),), (), (("plan", "b"),), PAST[0], None, False),
    ],
)
@given(
    before=st.lists(specs, max_size=5),
    batch=st.lists(specs, min_size=1, max_size=10),
)
async def test_a_batch_leaves_what_its_rows_one_by_one_leave(
    service: IdentityService, database: str, before: list[Spec], batch: list[Spec]
) -> None:
    together, alone = f"t{uuid.uuid4().hex[:8]}", f"a{uuid.uuid4().hex[:8]}"
    for world in (together, alone):  # the same customers beforehand
        await service.resolve_one_by_one([bulk_row(s, world) for s in before])
    connection = await asyncpg.connect(database)
    try:
        for _ in ("first run", "re-run"):
            set_based = await service.resolve_batch([bulk_row(s, together) for s in batch])
            one_by_one = await service.resolve_one_by_one([bulk_row(s, alone) for s in batch])
            assert answers(set_based) == answers(one_by_one)
            assert await world_state(connection, together) == await world_state(connection, alone)
    finally:
        await connection.close()


async def test_rows_of_a_known_customer_are_upserted_in_row_order_in_one_transaction(
    service: IdentityService, database: str
) -> None:
    world = f"w{uuid.uuid4().hex[:8]}"
    await service.resolve_batch(
        [bulk_row(Spec((("CRM_ID", 1),), (("plan", "a"),), None, None, None, False), world)]
    )
    rows = [
        bulk_row(Spec((("CRM_ID", 1),), (), (("plan", plan),), None, f"k{n}", False), world)
        for n, plan in enumerate("babab")
    ]
    outcomes = await service.resolve_batch(rows)
    assert answers(outcomes) == [(False, 0, "NoneType", "")] * 5
    connection = await asyncpg.connect(database)
    try:
        customer = await connection.fetchrow(
            "SELECT c.customer_id, c.profile -> 'plan' ->> 's' AS plan FROM identity.customers c "
            "JOIN identity.identifiers i USING (customer_id) WHERE i.value = $1",
            f"{world}-crm-1",
        )
        history = await connection.fetch(
            "SELECT value ->> 's' AS plan FROM identity.profile_changes "
            "WHERE customer_id = $1 ORDER BY change_id",
            customer["customer_id"],
        )
        changed = await connection.fetch(
            "SELECT DISTINCT xid::text FROM identity.identity_events "
            "WHERE customer_id = $1 AND event_type = 5",
            customer["customer_id"],
        )
    finally:
        await connection.close()
    assert customer["plan"] == "b"  # the last row's value
    assert [h["plan"] for h in history] == list("ababab")
    assert len(changed) == 1  # five rows, one transaction (one event each, in order)


async def test_new_customers_are_created_together_beside_a_row_the_merge_protection_refuses(
    service: IdentityService, database: str
) -> None:
    world = f"w{uuid.uuid4().hex[:8]}"
    fresh = [Spec((("EMAIL", n),), (("plan", "a"),), None, None, f"k{n}", False) for n in range(3)]
    two_crm_ids = Spec((("CRM_ID", 1), ("CRM_ID", 2)), (), None, None, None, False)
    outcomes = await service.resolve_batch([bulk_row(s, world) for s in [*fresh, two_crm_ids]])
    assert [o.created for o in outcomes[:3]] == [True] * 3
    assert type(outcomes[3].error).__name__ == "FailedPrecondition"
    connection = await asyncpg.connect(database)
    try:
        created = await connection.fetch(
            "SELECT DISTINCT e.xid::text FROM identity.identity_events e "
            "JOIN identity.identifiers i USING (customer_id) "
            "WHERE i.value LIKE $1 AND e.event_type = 1",
            f"{world}%",
        )
    finally:
        await connection.close()
    # One transaction for the three (the refused row alone went one by one).
    assert len(created) == 1


async def test_several_rows_in_one_message_are_each_a_row(identity) -> None:
    email = f"{uuid.uuid4().hex[:8]}@example.com"
    carrier = identity_pb2.BulkResolveRequest(
        rows=[
            row("r1", ident(EMAIL, email), key=f"{email}-1"),
            row("r2", ident(CRM, f"crm-{email}"), key=f"{email}-2"),
            identity_pb2.BulkResolveRequest(
                row_ref="r3",
                resolve=identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, "x@example.com")]),
                rows=[row("r4", ident(EMAIL, "y@example.com"))],
            ),
        ]
    )
    alone = row("r0", ident(EMAIL, f"other-{email}"))
    reply = await identity.BulkResolve(iter([alone, carrier]))
    assert (reply.received, reply.created, reply.rejected) == (4, 3, 1)
    assert [(r.row_ref, read_status(r.error).field) for r in reply.rejections] == [("r3", "rows")]

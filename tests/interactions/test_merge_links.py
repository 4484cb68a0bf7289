"""The merges followed from identity, as the store reads them (ROOTS,
MEMBERS, LIVE_READS): a chain of merges ends at one root whose members are
the whole chain, a customer merged into twice has both, and a cycle (which
links applied out of order can form for a moment) ends rather than recursing
for ever."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from importlib.resources import files
from typing import Any

import asyncpg
import pytest

from converge.interactions.service import Draft
from converge.interactions.store import EventsOf, InteractionsStore
from converge.runtime.database import create_pool, load_migrations, migrate


def _draft(owner: uuid.UUID) -> Draft:
    draft = Draft(datetime.now(UTC), "product.login", 1, {}, "", "", None, None)
    draft.source, draft.idempotency_key, draft.owner = "test", str(owner), owner
    return draft


async def _owner_fold(
    states: dict[uuid.UUID, dict[str, Any] | None], rows: Sequence[Draft], events_of: EventsOf
) -> dict[uuid.UUID, dict[str, Any]]:
    """A fold whose state names its customer, so a read shows whose it is."""
    return {row.owner: {"customer": str(row.owner)} for row in rows}


@pytest.fixture
async def store(database: str) -> AsyncIterator[InteractionsStore]:
    connection = await asyncpg.connect(database)
    try:
        await migrate(
            connection,
            "interactions",
            load_migrations(files("converge.interactions") / "migrations"),
        )
    finally:
        await connection.close()
    # (the pool's 30 s command timeout turns a recursion that never ends into a failure)
    pool = await create_pool(database, "interactions", application_name="test")
    try:
        yield InteractionsStore(pool)
    finally:
        await pool.close()


async def _merge(store: InteractionsStore, merged: uuid.UUID, surviving: uuid.UUID) -> None:
    await store.apply_merge(merged, surviving, uuid.uuid4(), "cursor", datetime.now(UTC))


async def test_a_chain_of_merges_and_a_customer_merged_into_twice_read_as_one_cluster(
    store: InteractionsStore,
) -> None:
    """a into b into c (a chain 2 deep), x and y both into s, z into y, and
    a customer never merged: every customer reaches its root, and each root
    every customer merged into it, however deep."""
    a, b, c, s, x, y, z, alone = (uuid.uuid4() for _ in range(8))
    await store.ingest([_draft(customer) for customer in (a, b, c, s, x, y, z, alone)], _owner_fold)
    for merged, surviving in ((a, b), (b, c), (x, s), (y, s), (z, y)):
        await _merge(store, merged, surviving)

    assert await store.roots([a, b, c, x, y, z, s, alone]) == {
        a: c, b: c, c: c, x: s, y: s, z: s, s: s, alone: alone,
    }  # fmt: skip
    members = await store.members([c, s, alone])
    assert {root: sorted(found) for root, found in members.items()} == {
        c: sorted([a, b, c]),
        s: sorted([s, x, y, z]),
        alone: [alone],
    }

    reads = await store.live_reads([a, z, alone])
    assert {asked: read.root for asked, read in reads.customers.items()} == {
        a: c,
        z: s,
        alone: alone,
    }
    # Each customer's read holds the kept state of every member of its cluster.
    assert {
        asked: {member: state["customer"] for member, state in read.states.items()}
        for asked, read in reads.customers.items()
    } == {
        a: {m: str(m) for m in (a, b, c)},
        z: {m: str(m) for m in (s, x, y, z)},
        alone: {alone: str(alone)},
    }


async def test_an_unmerge_in_a_chain_splits_it_where_the_link_was(
    store: InteractionsStore,
) -> None:
    a, b, c = (uuid.uuid4() for _ in range(3))
    await _merge(store, a, b)
    merge_id = uuid.uuid4()
    await store.apply_merge(b, c, merge_id, "cursor", datetime.now(UTC))
    assert await store.roots([a]) == {a: c}

    await store.apply_unmerge(merge_id, "cursor", datetime.now(UTC))
    assert await store.roots([a, b, c]) == {a: b, b: b, c: c}
    members = await store.members([b, c])
    assert {root: sorted(found) for root, found in members.items()} == {
        b: sorted([a, b]),
        c: [c],
    }


async def test_a_cycle_of_links_ends_and_names_each_member_once(
    store: InteractionsStore,
) -> None:
    """a into b and b into a at once (a merge applied before the unmerge of
    the merge the other way), with c merged into b: the reads end, every
    customer of the cycle reaches a root inside it, and that root's members
    are the three customers, each once."""
    a, b, c = (uuid.uuid4() for _ in range(3))
    await store.ingest([_draft(customer) for customer in (a, b, c)], _owner_fold)
    await _merge(store, a, b)
    await _merge(store, b, a)
    await _merge(store, c, b)

    roots = await store.roots([a, b, c])
    assert set(roots) == {a, b, c}
    assert set(roots.values()) <= {a, b}
    for root in set(roots.values()):
        found = (await store.members([root]))[root]
        assert sorted(found) == sorted([a, b, c])

    reads = await store.live_reads([c])
    assert reads.customers[c].root in {a, b}
    assert set(reads.customers[c].states) == {a, b, c}

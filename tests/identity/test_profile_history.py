"""Profile history stored one row per change (migration 0003): what it still
serves (as-of reads, pages of field changes, erasure) and what it costs the
write path (one row per customer of an import, not one per field)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from converge.identity.domain import Actor, BulkRow
from converge.identity.identifiers import IdentifierKind, NormalizedIdentifier
from converge.identity.peers import PeerServices
from converge.identity.service import IdentityService
from converge.identity.settings import IdentitySettings
from converge.identity.store import IdentityStore, RetryableConflict
from converge.runtime.database import create_pool, load_migrations, migrate
from converge.v1 import common_pb2, identity_pb2
from tests.conftest import database_url
from tests.identity.test_profiles import update
from tests.waiting import wait_until

FIELDS = ("plan", "segment", "region", "display_name", "attributes.tier")
PAST = datetime(2019, 3, 1, tzinfo=UTC)


@pytest.fixture
async def service(identity, database: str) -> AsyncIterator[IdentityService]:
    """The identity rules over their real store (`identity` migrated the database)."""
    settings = IdentitySettings(database_url=database, port=0)
    pool = await create_pool(database, "identity", application_name="test-profile-history")
    yield IdentityService(IdentityStore(pool), settings, PeerServices(settings.peer_services, 1.0))
    await pool.close()


def crm_row(n: int, prefix: str) -> BulkRow:
    return BulkRow(
        (NormalizedIdentifier(IdentifierKind.CRM_ID, "", f"{prefix}-{n}"),),
        {},
        {field: {"s": f"{field}-{n}"} for field in FIELDS},
        False,
        Actor("crm-import", ""),
        None,
        PAST,
    )


async def test_an_imported_batch_writes_one_history_row_per_customer_and_reads_as_before(
    identity, service: IdentityService, database: str
) -> None:
    prefix = uuid.uuid4().hex[:8]
    outcomes = await service.resolve_batch([crm_row(n, prefix) for n in range(40)])
    assert all(o.created and o.error is None for o in outcomes)

    connection = await asyncpg.connect(database)
    try:
        stored = await connection.fetchval("SELECT count(*) FROM identity.profile_updates")
        per_field = await connection.fetchval("SELECT count(*) FROM identity.profile_changes")
        customer_id = await connection.fetchval(
            "SELECT customer_id FROM identity.identifiers WHERE value = $1", f"{prefix}-7"
        )
    finally:
        await connection.close()
    assert (stored, per_field) == (40, 40 * len(FIELDS))

    # As of the time the mapping gave, and not before it.
    as_of = Timestamp()
    as_of.FromDatetime(PAST)
    then = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(customer_id=str(customer_id)), as_of=as_of
        )
    )
    assert (then.customer.profile.plan, then.customer.profile.region) == ("plan-7", "region-7")
    assert then.customer.profile.attributes["tier"].string_value == "attributes.tier-7"
    as_of.FromDatetime(datetime(2019, 2, 28, tzinfo=UTC))
    before = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(customer_id=str(customer_id)), as_of=as_of
        )
    )
    assert before.customer.profile == identity_pb2.Profile()


async def test_pages_stop_inside_a_change_and_a_bare_change_token_resumes_after_it(
    identity, database: str
) -> None:
    created = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(
            profile=identity_pb2.Profile(segment="smb", plan="free", region="emea"),
        )
    )
    customer_id = created.customer.customer_id
    await update(identity, customer_id, ["plan"], plan="premium")

    def listing(token: str) -> identity_pb2.ListProfileChangesRequest:
        return identity_pb2.ListProfileChangesRequest(
            customer_id=customer_id, page=common_pb2.PageRequest(page_size=2, page_token=token)
        )

    first = await identity.ListProfileChanges(listing(""))
    second = await identity.ListProfileChanges(listing(first.page.next_page_token))
    assert [c.field for c in first.changes] == ["segment", "plan"]
    assert [(c.field, c.value.string_value) for c in second.changes] == [
        ("region", "emea"),
        ("plan", "premium"),
    ]
    assert not second.page.next_page_token

    # A token given out before migration 0003 named a change id alone: the
    # page after it starts after every field of that change.
    connection = await asyncpg.connect(database)
    try:
        created_change = await connection.fetchval(
            "SELECT min(change_id) FROM identity.profile_updates WHERE customer_id = $1::uuid",
            customer_id,
        )
    finally:
        await connection.close()
    bare = base64.urlsafe_b64encode(str(created_change).encode()).decode()
    resumed = await identity.ListProfileChanges(listing(bare))
    assert [(c.field, c.value.string_value) for c in resumed.changes] == [("plan", "premium")]


async def wait_until_blocked(database: str, application_name: str) -> None:
    """Waits (on the condition, with a deadline) until a session of that name
    waits on a lock."""
    connection = await asyncpg.connect(database)
    try:
        await wait_until(
            lambda: connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE application_name = $1 AND wait_event_type = 'Lock'",
                application_name,
            ),
            what=f"{application_name} waiting on a lock",
            timeout_s=30,
        )
    finally:
        await connection.close()


async def history_of(database: str, customer_id: str) -> int:
    connection = await asyncpg.connect(database)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM identity.profile_updates WHERE customer_id = $1::uuid",
            customer_id,
        )
        return count
    finally:
        await connection.close()


async def test_history_written_during_an_erasure_never_outlives_the_customer(
    identity, database: str
) -> None:
    """No foreign key cascades history any more: a write that began first
    makes the erasure wait and is erased with it; an erasure that began first
    makes the write wait, then write nothing."""
    writer_pool = await create_pool(database, "identity", application_name="history-writer")
    eraser_pool = await create_pool(database, "identity", application_name="history-eraser")
    writer, eraser = IdentityStore(writer_pool), IdentityStore(eraser_pool)
    try:
        for write_first in (True, False):
            created = await identity.CreateCustomer(
                identity_pb2.CreateCustomerRequest(profile=identity_pb2.Profile(plan="free"))
            )
            customer_id = created.customer.customer_id
            change = {"plan": {"s": "premium"}}
            if write_first:
                async with writer.transaction() as tx:
                    await tx.record_profile_changes(customer_id, change, None, "crm")
                    erasing = asyncio.ensure_future(erase(eraser, customer_id))
                    await wait_until_blocked(database, "history-eraser")
                assert await erasing == 1
            else:
                async with eraser.transaction() as tx:
                    await tx.delete_customers([customer_id])
                    writing = asyncio.ensure_future(write(writer, customer_id, change))
                    await wait_until_blocked(database, "history-writer")
                with pytest.raises(RetryableConflict):
                    await writing
            assert await history_of(database, customer_id) == 0
    finally:
        await writer_pool.close()
        await eraser_pool.close()


async def erase(store: IdentityStore, customer_id: str) -> int:
    async with store.transaction() as tx:
        return await tx.delete_customers([customer_id])


async def write(store: IdentityStore, customer_id: str, change: dict[str, object]) -> None:
    async with store.transaction() as tx:
        await tx.record_profile_changes(customer_id, change, None, "crm")  # type: ignore[arg-type]


async def test_migration_0003_keeps_every_field_change_and_its_id(postgres_url: str) -> None:
    """History written one row per field (0001) reads the same after 0003,
    change ids kept (page tokens given out before stay valid), and later
    changes take higher ids."""
    from importlib.resources import files

    name = f"m_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_url)
    await admin.execute(f"CREATE DATABASE {name}")
    await admin.close()
    url = database_url(postgres_url, name)
    migrations = load_migrations(files("converge.identity") / "migrations")
    connection = await asyncpg.connect(url)
    try:
        await migrate(connection, "identity", [m for m in migrations if m.version < 3])
        customer = uuid.uuid4()
        await connection.execute(
            "INSERT INTO identity.customers (customer_id) VALUES ($1)", customer
        )
        await connection.execute(
            """
            INSERT INTO identity.profile_changes (customer_id, field, value, effective_at, actor)
            VALUES ($1, 'plan', '{"s": "free"}', $2, 'crm'),
                   ($1, 'segment', '{"s": "smb"}', $2, 'crm'),
                   ($1, 'segment', NULL, $2, 'agent')
            """,
            customer,
            PAST,
        )
        before = await connection.fetch(
            "SELECT change_id, field, value::text, effective_at, actor "
            "FROM identity.profile_changes ORDER BY change_id"
        )
        await migrate(connection, "identity", migrations)
        after = await connection.fetch(
            "SELECT change_id, field, value::text, effective_at, actor "
            "FROM identity.profile_changes ORDER BY change_id, position"
        )
        assert [tuple(r) for r in after] == [tuple(r) for r in before]
        later = await connection.fetchval(
            "INSERT INTO identity.profile_updates (customer_id, fields, effective_at) "
            "VALUES ($1, '[]', now()) RETURNING change_id",
            customer,
        )
        assert later > max(r["change_id"] for r in before)
    finally:
        await connection.close()

"""StreamIdentityEvents: the durable, resumable feed other services follow."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from converge.v1 import common_pb2, identity_pb2
from tests.identity.helpers import DEVICE, EMAIL, field_violations, ident, unique_email
from tests.waiting import wait_until

CREATED = identity_pb2.IDENTITY_EVENT_TYPE_CREATED
MERGED = identity_pb2.IDENTITY_EVENT_TYPE_MERGED
UNMERGED = identity_pb2.IDENTITY_EVENT_TYPE_UNMERGED
FORGOTTEN = identity_pb2.IDENTITY_EVENT_TYPE_FORGOTTEN


def order(cursor: str) -> tuple[int, int]:
    """A cursor ("xid.event", or a bare event number) as a sortable pair; tests
    only compare cursors, they never build one."""
    head, _, tail = cursor.rpartition(".")
    return int(head or 0), int(tail)


async def events(
    identity, from_cursor: str = ""
) -> list[identity_pb2.StreamIdentityEventsResponse]:
    call = identity.StreamIdentityEvents(
        identity_pb2.StreamIdentityEventsRequest(from_cursor=from_cursor, follow=False)
    )
    return [event async for event in call]


async def merge_and_unmerge(identity) -> tuple[str, str, str]:
    email = unique_email()
    crm = await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email)]))
    web = await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(DEVICE, "d-ev")]))
    joined = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email), ident(DEVICE, "d-ev")])
    )
    [merge] = joined.merges
    await identity.UnmergeCustomers(identity_pb2.UnmergeCustomersRequest(merge_id=merge.merge_id))
    return crm.customer.customer_id, web.customer.customer_id, merge.merge_id


async def test_events_list_created_merged_unmerged_in_order_with_increasing_cursors(
    identity,
) -> None:
    assert await events(identity) == []
    crm, web, merge_id = await merge_and_unmerge(identity)

    found = await events(identity)
    assert [(e.type, e.customer_id, e.other_customer_id, e.merge_id) for e in found] == [
        (CREATED, crm, "", ""),
        (CREATED, web, "", ""),
        (MERGED, crm, web, merge_id),
        (UNMERGED, crm, web, merge_id),
    ]
    cursors = [order(e.cursor) for e in found]
    assert cursors == sorted(set(cursors))
    times = [e.occurred_at.ToDatetime() for e in found]
    assert times == sorted(times)


async def test_resuming_from_a_cursor_returns_only_later_events(identity) -> None:
    await merge_and_unmerge(identity)
    found = await events(identity)
    later = await events(identity, found[1].cursor)
    assert [e.cursor for e in later] == [e.cursor for e in found[2:]]
    assert [e.type for e in later] == [MERGED, UNMERGED]
    assert await events(identity, found[-1].cursor) == []

    # New events after the last cursor are delivered on the next resume.
    newcomer = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
    )
    [created] = await events(identity, found[-1].cursor)
    assert (created.type, created.customer_id) == (CREATED, newcomer.customer.customer_id)
    assert order(created.cursor) > order(found[-1].cursor)


async def test_forgetting_a_customer_is_an_event(identity) -> None:
    email = unique_email()
    resolved = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email)])
    )
    [created] = await events(identity)
    await identity.ForgetCustomer(
        identity_pb2.ForgetCustomerRequest(
            customer=common_pb2.CustomerRef(customer_id=resolved.customer.customer_id),
            actor=common_pb2.Actor(name="privacy-operator"),
        )
    )
    [forgotten] = await events(identity, created.cursor)
    assert (forgotten.type, forgotten.customer_id) == (FORGOTTEN, resolved.customer.customer_id)


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5.2", ".5", " 7", "²", "9" * 30], ids=repr)
async def test_bad_cursor_is_invalid_argument_naming_from_cursor(identity, cursor: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await events(identity, cursor)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["from_cursor"]


async def test_profile_and_preference_changes_are_announced_once_each(identity) -> None:
    """A new customer is CREATED only; a later profile update and a later
    preference update are one PROFILE_CHANGED each."""
    changed = identity_pb2.IDENTITY_EVENT_TYPE_PROFILE_CHANGED
    created = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(
            identifiers=[ident(EMAIL, unique_email())], profile=identity_pb2.Profile(plan="basic")
        )
    )
    customer_id = created.customer.customer_id
    assert [e.type for e in await events(identity)] == [CREATED]

    await identity.UpdateCustomer(
        identity_pb2.UpdateCustomerRequest(
            customer_id=customer_id,
            profile=identity_pb2.Profile(plan="premium", segment="smb"),
            update_mask=field_mask_pb2.FieldMask(paths=["plan", "segment"]),
        )
    )
    await identity.UpdateContactPreferences(
        identity_pb2.UpdateContactPreferencesRequest(
            customer=common_pb2.CustomerRef(customer_id=customer_id),
            preferences=identity_pb2.ContactPreferences(wants_human=True),
            update_mask=field_mask_pb2.FieldMask(paths=["wants_human"]),
        )
    )
    found = await events(identity)
    assert [(e.type, e.customer_id) for e in found] == [
        (CREATED, customer_id),
        (changed, customer_id),
        (changed, customer_id),
    ]


async def _admin(database: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(database)
    await connection.execute("SET search_path = identity")
    return connection


async def _wait_for_a_blocked_statement(admin: asyncpg.Connection) -> None:
    async def blocked() -> int:
        found: int = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return found

    await wait_until(blocked, lambda n: n > 0, what="the resolve waiting on a lock")


async def test_an_event_committed_after_a_later_one_is_not_skipped(identity, database) -> None:
    """Event ids are taken at insert, transactions commit in any order: a merge
    whose transaction is held open after writing its MERGED event commits after
    a later CREATED. A reader resuming from the cursor of that CREATED must
    still get the MERGED (today's id-ordered stream skipped it for good)."""
    email, phone_email = unique_email(), unique_email()
    await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email)]))
    await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(DEVICE, "d-held")]))
    # The held row's owner is a bystander: its foreign key locks that customer.
    bystander = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
    )
    admin = await _admin(database)
    try:
        # Another transaction holds the new identifier uncommitted, so the
        # joining resolve writes its merge (and MERGED event), then waits on it.
        held = admin.transaction()
        await held.start()
        await admin.execute(
            "INSERT INTO identifiers (kind, source, value, customer_id) VALUES (1, '', $1, $2)",
            phone_email,
            uuid.UUID(bystander.customer.customer_id),
        )
        joining = asyncio.ensure_future(
            identity.Resolve(
                identity_pb2.ResolveRequest(
                    identifiers=[
                        ident(EMAIL, email),
                        ident(DEVICE, "d-held"),
                        ident(EMAIL, phone_email),
                    ]
                )
            )
        )
        await _wait_for_a_blocked_statement(admin)
        await identity.Resolve(
            identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
        )
        seen = await events(identity)
        await held.rollback()
        joined = await joining
    finally:
        await admin.close()
    [merge] = joined.merges
    resumed = await events(identity, seen[-1].cursor) if seen else await events(identity)
    delivered = [*seen, *resumed]
    assert [e.type for e in delivered].count(MERGED) == 1
    assert [e.merge_id for e in delivered if e.type == MERGED] == [merge.merge_id]
    assert [e.type for e in delivered].count(CREATED) == 4
    assert [order(e.cursor) for e in delivered] == sorted({order(e.cursor) for e in delivered})


async def test_a_bare_event_number_cursor_still_resumes_in_place(identity, database) -> None:
    """Cursors issued before the stream was ordered by transaction were bare
    event ids, and the events written then have xid 0 (migration 0002):
    resuming from such a cursor gives the events after it, then every later one."""
    await merge_and_unmerge(identity)
    admin = await _admin(database)
    try:
        await admin.execute("UPDATE identity_events SET xid = '0'")  # as written before 0002
    finally:
        await admin.close()
    found = await events(identity)
    bare = str(found[1].cursor.rpartition(".")[2])
    assert found[1].cursor.startswith("0.")
    newcomer = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
    )
    later = await events(identity, bare)
    assert [e.cursor for e in later[:-1]] == [e.cursor for e in found[2:]]
    assert (later[-1].type, later[-1].customer_id) == (CREATED, newcomer.customer.customer_id)

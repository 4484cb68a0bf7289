"""StreamIdentityEvents: the durable, resumable feed other services follow."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2

from converge.v1 import common_pb2, identity_pb2
from tests.identity.helpers import DEVICE, EMAIL, field_violations, ident, unique_email

CREATED = identity_pb2.IDENTITY_EVENT_TYPE_CREATED
MERGED = identity_pb2.IDENTITY_EVENT_TYPE_MERGED
UNMERGED = identity_pb2.IDENTITY_EVENT_TYPE_UNMERGED
FORGOTTEN = identity_pb2.IDENTITY_EVENT_TYPE_FORGOTTEN


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
    cursors = [int(e.cursor) for e in found]
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
    assert int(created.cursor) > int(found[-1].cursor)


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


@pytest.mark.parametrize("cursor", ["abc", "-1", "1.5", " 7", "²", "9" * 30], ids=repr)
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

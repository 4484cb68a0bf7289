"""Resolve: normalisation, creation, matching, merging and its protection."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from converge.runtime.errors import read_status
from converge.v1 import common_pb2, identity_pb2
from tests.identity.helpers import (
    CRM,
    DEVICE,
    EMAIL,
    PHONE,
    ident,
    precondition_subjects,
    unique_email,
)


async def test_resolve_creates_then_matches_through_normalised_identifiers(identity) -> None:
    email = unique_email()
    first = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(EMAIL, f"  {email.upper()} ")],
            profile=identity_pb2.Profile(segment="smb", plan="premium"),
        )
    )
    assert first.created
    stored = {(i.identifier.type, i.identifier.value) for i in first.customer.identifiers}
    assert stored == {(EMAIL, email)}
    assert first.customer.profile.segment == "smb"

    again = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(EMAIL, email), ident(PHONE, "+44 20 7946 0958")]
        )
    )
    assert not again.created
    assert again.customer.customer_id == first.customer.customer_id
    assert [(i.type, i.value) for i in again.attached_identifiers] == [(PHONE, "+442079460958")]

    by_phone = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(identifier=ident(PHONE, "+44 (0)20 7946 0958"))
        )
    )
    assert by_phone.customer.customer_id == first.customer.customer_id


async def test_resolve_merges_customers_joined_by_identifiers(identity) -> None:
    email = unique_email()
    known = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(EMAIL, email), ident(CRM, "CRM-1")],
            profile=identity_pb2.Profile(segment="enterprise"),
        )
    )
    visitor = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(DEVICE, "dev-42")], profile=identity_pb2.Profile(region="emea")
        )
    )
    assert visitor.customer.customer_id != known.customer.customer_id

    joined = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(DEVICE, "dev-42"), ident(EMAIL, email)])
    )
    survivor = joined.customer
    assert survivor.customer_id == known.customer.customer_id  # policy "oldest"
    assert list(survivor.merged_customer_ids) == [visitor.customer.customer_id]
    [merge] = joined.merges
    assert merge.merged_customer_id == visitor.customer.customer_id
    assert merge.policy == "oldest"
    # Fill-missing policy: the survivor keeps its segment and gains the region.
    assert (survivor.profile.segment, survivor.profile.region) == ("enterprise", "emea")

    # A merged-away id keeps answering with the survivor.
    through_old_id = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(customer_id=visitor.customer.customer_id)
        )
    )
    assert through_old_id.customer.customer_id == survivor.customer_id


async def test_merge_protection_refuses_conflicting_unique_identifiers(identity) -> None:
    email_a, email_b = unique_email(), unique_email()
    a = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email_a), ident(CRM, "CRM-A")])
    )
    b = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email_b), ident(CRM, "CRM-B")])
    )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await identity.Resolve(
            identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email_a), ident(EMAIL, email_b)])
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert precondition_subjects(refused.value) == [
        "IDENTIFIER_TYPE_CRM_ID".removeprefix("IDENTIFIER_TYPE_")
    ]

    with pytest.raises(grpc.aio.AioRpcError) as by_hand:
        await identity.MergeCustomers(
            identity_pb2.MergeCustomersRequest(
                surviving_customer_id=a.customer.customer_id,
                merged_customer_id=b.customer.customer_id,
            )
        )
    assert by_hand.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    # Nothing changed: each customer still has exactly its own identifiers.
    for resolved, email in ((a, email_a), (b, email_b)):
        now = await identity.GetCustomer(
            identity_pb2.GetCustomerRequest(
                customer=common_pb2.CustomerRef(customer_id=resolved.customer.customer_id)
            )
        )
        assert not now.customer.merged_customer_ids
        assert {i.identifier.value for i in now.customer.identifiers} == {
            email,
            "CRM-A" if resolved is a else "CRM-B",
        }
    merges = await identity.ListMerges(
        identity_pb2.ListMergesRequest(customer_id=a.customer.customer_id, include_undone=True)
    )
    assert not merges.merges


async def test_unmerge_gives_each_customer_back_its_own_identifiers(identity) -> None:
    email = unique_email()
    crm = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(EMAIL, email)], profile=identity_pb2.Profile(segment="smb")
        )
    )
    web = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(DEVICE, "device-x")], profile=identity_pb2.Profile(plan="free")
        )
    )
    joined = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email), ident(DEVICE, "device-x")])
    )
    assert joined.customer.profile.plan == "free"
    [merge] = joined.merges

    undone = await identity.UnmergeCustomers(
        identity_pb2.UnmergeCustomersRequest(
            merge_id=merge.merge_id, actor=common_pb2.Actor(name="steward", reason="wrong device")
        )
    )
    assert undone.merge.HasField("unmerged_at")
    assert undone.surviving_customer.customer_id == crm.customer.customer_id
    assert undone.restored_customer.customer_id == web.customer.customer_id
    assert not undone.surviving_customer.merged_customer_ids
    assert {i.identifier.value for i in undone.surviving_customer.identifiers} == {email}
    assert {i.identifier.value for i in undone.restored_customer.identifiers} == {"device-x"}
    # The value taken over by the merge goes back with it.
    assert undone.surviving_customer.profile.plan == ""
    assert undone.restored_customer.profile.plan == "free"

    # Lookups by the restored customer's identifier now find it again.
    found = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(identifier=ident(DEVICE, "DEVICE-X"))
        )
    )
    assert found.customer.customer_id == web.customer.customer_id


async def test_concurrent_resolves_of_a_new_identifier_create_one_customer(identity) -> None:
    email = unique_email()
    request = identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email)])
    results = await asyncio.gather(*(identity.Resolve(request) for _ in range(60)))
    assert len({r.customer.customer_id for r in results}) == 1
    assert sum(r.created for r in results) == 1


async def test_concurrent_joins_of_the_same_customers_merge_once(identity) -> None:
    email = unique_email()
    await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email)]))
    await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(DEVICE, "d-" + email)]))
    request = identity_pb2.ResolveRequest(
        identifiers=[ident(EMAIL, email), ident(DEVICE, "d-" + email)]
    )
    results = await asyncio.gather(*(identity.Resolve(request) for _ in range(20)))
    assert len({r.customer.customer_id for r in results}) == 1
    assert sum(len(r.merges) for r in results) == 1


async def test_repeated_idempotency_key_has_no_second_effect(identity) -> None:
    request = identity_pb2.ResolveRequest(
        identifiers=[ident(EMAIL, unique_email())], idempotency_key="import-row-1"
    )
    first = await identity.Resolve(request)
    second = await identity.Resolve(request)
    assert first.created and not second.created
    assert first.customer.customer_id == second.customer.customer_id

    reused = identity_pb2.ResolveRequest(
        identifiers=[ident(EMAIL, unique_email())], idempotency_key="import-row-1"
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.Resolve(reused)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_lookup_only_never_creates(identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.Resolve(
            identity_pb2.ResolveRequest(
                identifiers=[ident(EMAIL, unique_email())], lookup_only=True
            )
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await identity.ListCustomers(identity_pb2.ListCustomersRequest())
    assert not listed.customers


async def test_resolve_names_the_owner_of_each_identifier_after_a_merge(identity) -> None:
    email = unique_email()
    owner = await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email)]))
    device = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(DEVICE, "own-" + email)])
    )
    await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(EMAIL, email), ident(DEVICE, "own-" + email)]
        )
    )
    again = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(DEVICE, "OWN-" + email), ident(EMAIL, email.upper())]
        )
    )
    assert again.customer.customer_id == owner.customer.customer_id
    assert [(r.identifier.value, r.customer_id) for r in again.resolved_identifiers] == [
        ("own-" + email, device.customer.customer_id),
        (email, owner.customer.customer_id),
    ]


async def test_batch_resolve_answers_each_item_in_order_with_its_own_errors(identity) -> None:
    known = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
    )
    known_email = known.customer.identifiers[0].identifier.value
    new_email = unique_email()
    reply = await identity.BatchResolve(
        identity_pb2.BatchResolveRequest(
            requests=[
                identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, new_email)]),
                identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, "not-an-email")]),
                identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, known_email.upper())]),
                identity_pb2.ResolveRequest(
                    identifiers=[ident(EMAIL, unique_email())], lookup_only=True
                ),
                identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, new_email)]),
            ]
        )
    )
    created, bad, matched, missing, repeated = reply.results
    assert created.created and created.resolved_identifiers[0].identifier.value == new_email
    bad_error = read_status(bad.error)
    assert (bad_error.code, bad_error.field) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "identifiers[0].value",
    )
    assert bad_error.reason and not bad.customer_id
    assert not created.HasField("error") and not matched.HasField("error")
    assert (matched.customer_id, matched.created) == (known.customer.customer_id, False)
    assert read_status(missing.error).code == grpc.StatusCode.NOT_FOUND
    assert not missing.customer_id
    assert repeated.customer_id == created.customer_id and not repeated.created

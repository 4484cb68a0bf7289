"""The identity service under fuzzed requests: every RPC of IdentityService
gets valid requests mutated in one to three fields (see tests/fuzzing.py),
over real gRPC against real PostgreSQL. No call may end UNKNOWN or INTERNAL,
an INVALID_ARGUMENT names a field, and afterwards the data reads back
consistently: what a call acknowledged reads back as acknowledged, and the
seeded customers are still found by id and by each of their identifiers.

Destructive calls (merge, unmerge, forget, remove an identifier) act on
customers made for that one example, so the seeded ones stay comparable.
"""

from __future__ import annotations

import uuid
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converge.v1 import common_pb2, identity_pb2
from tests.fuzzing import SERVICE_FUZZ_PHASES, assert_refused_properly, mutate
from tests.identity.helpers import CRM, DEVICE, EMAIL, ident

pytestmark = pytest.mark.slow

ACTOR = common_pb2.Actor(name="fuzzer", reason="property test")
POOL = [f"pool-{i}@example.com" for i in range(3)]


def _profile() -> identity_pb2.Profile:
    profile = identity_pb2.Profile(
        display_name="Ada Lovelace",
        segment="smb",
        plan="pro",
        region="eu",
        owner_team="support",
        lifetime_value=common_pb2.Money(currency_code="EUR", units=1234, nanos=500_000_000),
        attributes={"tier": common_pb2.AttributeValue(string_value="gold")},
    )
    profile.signup_date.FromSeconds(1_600_000_000)
    return profile


def _by_id(customer_id: str) -> common_pb2.CustomerRef:
    return common_pb2.CustomerRef(customer_id=customer_id)


def _by_email(email: str) -> common_pb2.CustomerRef:
    return common_pb2.CustomerRef(identifier=ident(EMAIL, email))


def _new_email() -> str:
    return f"fuzz-{uuid.uuid4().hex[:12]}@example.com"


async def _victim(identity) -> identity_pb2.Customer:
    created = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(
            profile=_profile(),
            identifiers=[ident(EMAIL, _new_email()), ident(DEVICE, uuid.uuid4().hex)],
            actor=ACTOR,
        )
    )
    return created.customer


async def _base_request(identity, method: str, pool_id: str, pool_email: str) -> Message:
    """A valid request for `method` (victims created first where it destroys)."""
    yesterday = common_pb2.TimeRange()
    yesterday.start.FromSeconds(1_500_000_000)
    yesterday.end.GetCurrentTime()
    if method == "CreateCustomer":
        return identity_pb2.CreateCustomerRequest(
            profile=_profile(),
            identifiers=[ident(EMAIL, _new_email()), ident(CRM, "c-1", source="crm")],
            idempotency_key=uuid.uuid4().hex,
            actor=ACTOR,
        )
    if method == "GetCustomer":
        return identity_pb2.GetCustomerRequest(customer=_by_id(pool_id))
    if method == "BatchGetCustomers":
        return identity_pb2.BatchGetCustomersRequest(customer_ids=[pool_id, str(uuid.uuid4())])
    if method == "UpdateCustomer":
        return identity_pb2.UpdateCustomerRequest(
            customer_id=pool_id,
            profile=_profile(),
            update_mask=field_mask_pb2.FieldMask(
                paths=["display_name", "signup_date", "lifetime_value", "attributes.tier"]
            ),
            actor=ACTOR,
        )
    if method == "ListCustomers":
        return identity_pb2.ListCustomersRequest(
            page=common_pb2.PageRequest(page_size=5), segment="smb", name_prefix="Ada"
        )
    if method == "ListProfileChanges":
        return identity_pb2.ListProfileChangesRequest(
            customer_id=pool_id, effective=yesterday, page=common_pb2.PageRequest(page_size=5)
        )
    if method == "Resolve":
        return identity_pb2.ResolveRequest(
            identifiers=[ident(EMAIL, pool_email), ident(DEVICE, uuid.uuid4().hex)],
            profile=_profile(),
            actor=ACTOR,
        )
    if method == "BulkResolve":
        return identity_pb2.BulkResolveRequest(
            row_ref="r1",
            resolve=identity_pb2.ResolveRequest(
                identifiers=[ident(EMAIL, _new_email())], profile=_profile(), actor=ACTOR
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["segment"]),
        )
    if method == "BatchResolve":
        return identity_pb2.BatchResolveRequest(
            requests=[
                identity_pb2.ResolveRequest(
                    identifiers=[ident(EMAIL, _new_email())], profile=_profile(), actor=ACTOR
                )
            ]
        )
    if method == "RemoveIdentifier":
        victim = await _victim(identity)
        return identity_pb2.RemoveIdentifierRequest(
            identifier=victim.identifiers[1].identifier, actor=ACTOR
        )
    if method == "MergeCustomers":
        survivor, merged = await _victim(identity), await _victim(identity)
        return identity_pb2.MergeCustomersRequest(
            surviving_customer_id=survivor.customer_id,
            merged_customer_id=merged.customer_id,
            actor=ACTOR,
            idempotency_key=uuid.uuid4().hex,
        )
    if method == "UnmergeCustomers":
        survivor, merged = await _victim(identity), await _victim(identity)
        merge = await identity.MergeCustomers(
            identity_pb2.MergeCustomersRequest(
                surviving_customer_id=survivor.customer_id,
                merged_customer_id=merged.customer_id,
                actor=ACTOR,
            )
        )
        return identity_pb2.UnmergeCustomersRequest(merge_id=merge.merge.merge_id, actor=ACTOR)
    if method == "ListMerges":
        return identity_pb2.ListMergesRequest(customer_id=pool_id, include_undone=True)
    if method == "GetContactPreferences":
        return identity_pb2.GetContactPreferencesRequest(customer=_by_email(pool_email))
    if method == "UpdateContactPreferences":
        consent = identity_pb2.ChannelConsent(
            channel=common_pb2.CONTACT_CHANNEL_EMAIL,
            status=identity_pb2.CONSENT_STATUS_GRANTED,
            source="web-form",
        )
        consent.updated_at.FromSeconds(1_600_000_000)
        return identity_pb2.UpdateContactPreferencesRequest(
            customer=_by_id(pool_id),
            consents=[consent],
            preferences=identity_pb2.ContactPreferences(wants_human=True),
            update_mask=field_mask_pb2.FieldMask(paths=["wants_human"]),
            actor=ACTOR,
        )
    if method == "ForgetCustomer":
        victim = await _victim(identity)
        return identity_pb2.ForgetCustomerRequest(
            customer=_by_id(victim.customer_id), actor=ACTOR, idempotency_key=uuid.uuid4().hex
        )
    if method == "ExportCustomer":
        return identity_pb2.ExportCustomerRequest(customer=_by_email(pool_email), actor=ACTOR)
    if method == "StreamIdentityEvents":
        return identity_pb2.StreamIdentityEventsRequest()
    raise AssertionError(f"no base request for {method}")


METHODS = sorted(identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].methods_by_name)


async def _call(identity, method: str, request: Message) -> Any:
    stub = getattr(identity, method)
    if method == "BulkResolve":

        async def rows():
            yield request

        return await stub(rows(), timeout=30)
    if method == "StreamIdentityEvents":
        return [event async for event in stub(request, timeout=30)]
    return await stub(request, timeout=30)


def _comparable(customer: identity_pb2.Customer) -> identity_pb2.Customer:
    """A customer without the read time, which differs between two reads."""
    copy = identity_pb2.Customer()
    copy.CopyFrom(customer)
    copy.ClearField("as_of")
    return copy


class _Seen:
    def __init__(self) -> None:
        self.pool: dict[str, str] = {}  # email -> customer id


async def _assert_consistent(identity, seen: _Seen) -> None:
    for email, customer_id in seen.pool.items():
        by_id = (
            await identity.GetCustomer(
                identity_pb2.GetCustomerRequest(customer=_by_id(customer_id))
            )
        ).customer
        assert by_id.customer_id == customer_id
        for attached in by_id.identifiers:
            found = await identity.GetCustomer(
                identity_pb2.GetCustomerRequest(
                    customer=common_pb2.CustomerRef(identifier=attached.identifier)
                )
            )
            assert found.customer.customer_id == customer_id
        assert any(a.identifier.value == email for a in by_id.identifiers)


@settings(
    max_examples=250,
    phases=SERVICE_FUZZ_PHASES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(method=st.sampled_from(METHODS), pool=st.sampled_from(range(len(POOL))), data=st.data())
async def test_fuzzed_requests_are_answered_or_refused_and_data_stays_consistent(
    identity, method: str, pool: int, data: st.DataObject
) -> None:
    seen: _Seen = getattr(identity, "_fuzz_seen", None) or _Seen()
    if not seen.pool:
        for email in POOL:
            created = await identity.CreateCustomer(
                identity_pb2.CreateCustomerRequest(
                    profile=_profile(), identifiers=[ident(EMAIL, email)], actor=ACTOR
                )
            )
            seen.pool[email] = created.customer.customer_id
        identity._fuzz_seen = seen  # (one service for every example of this test)
    email = POOL[pool]
    base = await _base_request(identity, method, seen.pool[email], email)
    request = mutate(data, base)
    if method == "StreamIdentityEvents":
        request.follow = False  # (a follower would never end)
    try:
        reply = await _call(identity, method, request)
    except grpc.aio.AioRpcError as error:
        assert_refused_properly(error)
    else:
        acknowledged = getattr(reply, "customer", None)
        if method in ("CreateCustomer", "UpdateCustomer", "Resolve") and acknowledged:
            read = await identity.GetCustomer(
                identity_pb2.GetCustomerRequest(customer=_by_id(acknowledged.customer_id))
            )
            assert _comparable(read.customer) == _comparable(acknowledged)
    await _assert_consistent(identity, seen)

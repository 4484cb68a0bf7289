"""Input identity cannot store is refused with INVALID_ARGUMENT naming the
field, never INTERNAL, and changes nothing: times outside 1900..2200 in any
field (profile dates, attribute times, consent times, read times, ranges),
NUL characters in any text, a lifetime value beyond the money bound.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from converge.runtime.errors import read_status
from converge.runtime.fields import MAX_MONEY_UNITS
from converge.v1 import common_pb2, identity_pb2
from tests.identity.helpers import EMAIL, field_violations, ident, unique_email

YEAR_ONE = timestamp_pb2.Timestamp(seconds=-62_135_596_800)  # 0001-01-01T00:00:00Z
ACTOR = common_pb2.Actor(name="tester")


async def refused(call, request) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    return field_violations(error.value)


def _year_one_signup(profile: identity_pb2.Profile) -> None:
    profile.signup_date.CopyFrom(YEAR_ONE)


def _year_one_attribute(profile: identity_pb2.Profile) -> None:
    profile.attributes["since"].timestamp_value.CopyFrom(YEAR_ONE)


def _nul_name(profile: identity_pb2.Profile) -> None:
    profile.display_name = "Ada\x00"


def _nul_attribute(profile: identity_pb2.Profile) -> None:
    profile.attributes["note"].string_value = "a\x00b"


def _huge_value(profile: identity_pb2.Profile) -> None:
    profile.lifetime_value.CopyFrom(
        common_pb2.Money(currency_code="EUR", units=MAX_MONEY_UNITS + 1)
    )


@pytest.mark.parametrize(
    ("change", "field", "bulk_field"),
    [
        (_year_one_signup, "profile.signup_date", "resolve.profile.signup_date"),
        (
            _year_one_attribute,
            "profile.attributes[since].timestamp_value",
            "resolve.profile.attributes[since]",
        ),
        (_nul_name, "profile.display_name", "resolve.profile.display_name"),
        (
            _nul_attribute,
            "profile.attributes[note].string_value",
            "resolve.profile.attributes[note]",
        ),
        (_huge_value, "profile.lifetime_value", "resolve.profile.lifetime_value"),
    ],
    ids=["signup-year-one", "attribute-year-one", "nul-name", "nul-attribute", "huge-ltv"],
)
async def test_unstorable_profiles_are_refused_at_create_and_resolve(
    identity, change, field, bulk_field
) -> None:
    profile = identity_pb2.Profile()
    change(profile)
    email = unique_email()
    created = identity_pb2.CreateCustomerRequest(
        profile=profile, identifiers=[ident(EMAIL, email)], actor=ACTOR
    )
    assert field in await refused(identity.CreateCustomer, created)
    resolve = identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email)], profile=profile)
    assert field in await refused(identity.Resolve, resolve)

    async def rows():
        yield identity_pb2.BulkResolveRequest(row_ref="r1", resolve=resolve)

    reply = await identity.BulkResolve(rows())
    assert (reply.rejected, reply.created) == (1, 0)
    assert read_status(reply.rejections[0].error).field == bulk_field  # (checked row by row there)
    listed = await identity.ListCustomers(identity_pb2.ListCustomersRequest())
    assert list(listed.customers) == []


async def test_out_of_range_times_elsewhere_are_refused(identity) -> None:
    created = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(identifiers=[ident(EMAIL, unique_email())])
    )
    customer_id = created.customer.customer_id
    ref = common_pb2.CustomerRef(customer_id=customer_id)
    get = identity_pb2.GetCustomerRequest(customer=ref, as_of=YEAR_ONE)
    assert "as_of" in await refused(identity.GetCustomer, get)
    batch = identity_pb2.BatchGetCustomersRequest(customer_ids=[customer_id], as_of=YEAR_ONE)
    assert "as_of" in await refused(identity.BatchGetCustomers, batch)
    update = identity_pb2.UpdateCustomerRequest(
        customer_id=customer_id,
        profile=identity_pb2.Profile(segment="smb"),
        update_mask=field_mask_pb2.FieldMask(paths=["segment"]),
        effective_at=YEAR_ONE,
    )
    assert "effective_at" in await refused(identity.UpdateCustomer, update)
    changes = identity_pb2.ListProfileChangesRequest(customer_id=customer_id)
    changes.effective.start.CopyFrom(YEAR_ONE)
    assert "effective.start" in await refused(identity.ListProfileChanges, changes)
    consent = identity_pb2.ChannelConsent(
        channel=common_pb2.CONTACT_CHANNEL_EMAIL,
        status=identity_pb2.CONSENT_STATUS_GRANTED,
        updated_at=YEAR_ONE,
    )
    preferences = identity_pb2.UpdateContactPreferencesRequest(customer=ref, consents=[consent])
    assert "consents[0].updated_at" in await refused(identity.UpdateContactPreferences, preferences)
    read = await identity.GetCustomer(identity_pb2.GetCustomerRequest(customer=ref))
    assert read.customer.profile.segment == ""
    assert list(read.customer.contact_preferences.consents) == []


async def test_nul_in_filters_actors_and_keys_is_refused(identity) -> None:
    listed = identity_pb2.ListCustomersRequest(name_prefix="A\x00")
    assert "name_prefix" in await refused(identity.ListCustomers, listed)
    created = identity_pb2.CreateCustomerRequest(
        identifiers=[ident(EMAIL, unique_email())],
        actor=common_pb2.Actor(name="ops\x00"),
        idempotency_key="k\x00",
    )
    violations = await refused(identity.CreateCustomer, created)
    assert {"actor.name", "idempotency_key"} <= set(violations)

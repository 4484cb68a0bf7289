"""Consent and contact preferences, as the recommendation service reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from converge.v1 import common_pb2, identity_pb2
from tests.identity.helpers import DEVICE, EMAIL, field_violations, ident, unique_email

GRANTED = identity_pb2.CONSENT_STATUS_GRANTED
DENIED = identity_pb2.CONSENT_STATUS_DENIED
MAIL = common_pb2.CONTACT_CHANNEL_EMAIL
SMS = common_pb2.CONTACT_CHANNEL_SMS
PUSH = common_pb2.CONTACT_CHANNEL_PUSH


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def consent(channel: int, status: int, source: str = "", at: datetime | None = None):
    message = identity_pb2.ChannelConsent(channel=channel, status=status, source=source)  # type: ignore[arg-type]
    if at is not None:
        message.updated_at.CopyFrom(ts(at))
    return message


def statuses(preferences: identity_pb2.ContactPreferences) -> dict[int, int]:
    return {c.channel: c.status for c in preferences.consents}


async def new_customer(identity, *identifiers: common_pb2.Identifier) -> str:
    resolved = await identity.Resolve(identity_pb2.ResolveRequest(identifiers=list(identifiers)))
    return resolved.customer.customer_id


async def update_preferences(identity, ref: common_pb2.CustomerRef, **fields):
    return await identity.UpdateContactPreferences(
        identity_pb2.UpdateContactPreferencesRequest(customer=ref, **fields)
    )


async def read_preferences(identity, ref: common_pb2.CustomerRef):
    return await identity.GetContactPreferences(
        identity_pb2.GetContactPreferencesRequest(customer=ref)
    )


async def test_consent_per_channel_and_flags_are_kept_and_readable_by_identifier(
    identity,
) -> None:
    email = unique_email()
    customer_id = await new_customer(identity, ident(EMAIL, email))
    ref = common_pb2.CustomerRef(customer_id=customer_id)

    fresh = await read_preferences(identity, ref)
    assert fresh.contact_preferences == identity_pb2.ContactPreferences()

    updated = await update_preferences(
        identity,
        ref,
        consents=[consent(MAIL, GRANTED, "web-preference-centre"), consent(SMS, DENIED, "call")],
        update_mask=field_mask_pb2.FieldMask(paths=["do_not_contact", "preferred_channel"]),
        preferences=identity_pb2.ContactPreferences(
            do_not_contact=True, preferred_channel=MAIL, wants_human=True
        ),
        actor=common_pb2.Actor(name="preference-centre"),
    )
    assert updated.customer_id == customer_id
    preferences = updated.contact_preferences
    assert statuses(preferences) == {MAIL: GRANTED, SMS: DENIED}
    assert {c.channel: c.source for c in preferences.consents} == {
        MAIL: "web-preference-centre",
        SMS: "call",
    }
    assert preferences.do_not_contact
    assert preferences.preferred_channel == MAIL
    assert not preferences.wants_human  # not in the mask
    assert preferences.HasField("updated_at")

    # wants_human through the mask; the other flags keep their values.
    await update_preferences(
        identity,
        ref,
        update_mask=field_mask_pb2.FieldMask(paths=["wants_human"]),
        preferences=identity_pb2.ContactPreferences(wants_human=True),
    )
    read = await read_preferences(
        identity, common_pb2.CustomerRef(identifier=ident(EMAIL, f" {email.upper()}"))
    )
    assert read.customer_id == customer_id
    got = read.contact_preferences
    assert (got.do_not_contact, got.preferred_channel, got.wants_human) == (True, MAIL, True)
    assert statuses(got) == {MAIL: GRANTED, SMS: DENIED}

    # The same preferences come with the customer.
    customer = await identity.GetCustomer(identity_pb2.GetCustomerRequest(customer=ref))
    assert customer.customer.contact_preferences == got


async def test_a_later_consent_change_on_the_same_channel_wins(identity) -> None:
    ref = common_pb2.CustomerRef(customer_id=await new_customer(identity, ident(DEVICE, "d-1")))
    await update_preferences(identity, ref, consents=[consent(MAIL, GRANTED, "signup")])
    withdrawn = await update_preferences(
        identity, ref, consents=[consent(MAIL, DENIED, "unsubscribe-link")]
    )
    assert statuses(withdrawn.contact_preferences) == {MAIL: DENIED}
    read = await read_preferences(identity, ref)
    [mail] = read.contact_preferences.consents
    assert (mail.status, mail.source) == (DENIED, "unsubscribe-link")


async def test_an_older_consent_arriving_late_does_not_override_a_newer_one(identity) -> None:
    ref = common_pb2.CustomerRef(customer_id=await new_customer(identity, ident(DEVICE, "d-2")))
    now = datetime.now(UTC)
    await update_preferences(
        identity, ref, consents=[consent(MAIL, DENIED, "unsubscribe-link", now)]
    )
    # A CRM export replayed later carries the consent given a week earlier.
    late = await update_preferences(
        identity, ref, consents=[consent(MAIL, GRANTED, "crm-export", now - timedelta(days=7))]
    )
    [mail] = late.contact_preferences.consents
    assert (mail.status, mail.source) == (DENIED, "unsubscribe-link")


async def test_merged_cluster_preferences_are_read_through_the_survivor(identity) -> None:
    email = unique_email()
    crm = await new_customer(identity, ident(EMAIL, email))
    web = await new_customer(identity, ident(DEVICE, "d-web"))
    now = datetime.now(UTC)
    # The CRM record: email consent granted long ago, SMS denied recently, do-not-contact.
    await update_preferences(
        identity,
        common_pb2.CustomerRef(customer_id=crm),
        consents=[
            consent(MAIL, GRANTED, "crm", now - timedelta(days=30)),
            consent(SMS, DENIED, "crm", now - timedelta(minutes=1)),
        ],
        update_mask=field_mask_pb2.FieldMask(paths=["do_not_contact"]),
        preferences=identity_pb2.ContactPreferences(do_not_contact=True),
    )
    # The web record, changed later: email consent withdrawn, SMS granted long
    # ago, push granted, and the customer asked for a human.
    await update_preferences(
        identity,
        common_pb2.CustomerRef(customer_id=web),
        consents=[
            consent(MAIL, DENIED, "web", now - timedelta(days=1)),
            consent(SMS, GRANTED, "web", now - timedelta(days=60)),
            consent(PUSH, GRANTED, "app", now - timedelta(days=2)),
        ],
        update_mask=field_mask_pb2.FieldMask(paths=["wants_human"]),
        preferences=identity_pb2.ContactPreferences(wants_human=True),
    )
    joined = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email), ident(DEVICE, "d-web")])
    )
    survivor = joined.customer.customer_id
    assert survivor == crm

    for ref in (
        common_pb2.CustomerRef(customer_id=survivor),
        common_pb2.CustomerRef(customer_id=web),  # the merged-away id
        common_pb2.CustomerRef(identifier=ident(DEVICE, "d-web")),
    ):
        read = await read_preferences(identity, ref)
        assert read.customer_id == survivor
        preferences = read.contact_preferences
        # Per channel, the latest change across the merged customers wins.
        assert statuses(preferences) == {MAIL: DENIED, SMS: DENIED, PUSH: GRANTED}
        # Each flag keeps its latest explicit value, whichever customer set it:
        # a do-not-contact must not be lost because the other record changed later.
        assert preferences.do_not_contact
        assert preferences.wants_human


async def test_repeated_idempotency_key_does_not_apply_the_change_again(identity) -> None:
    ref = common_pb2.CustomerRef(customer_id=await new_customer(identity, ident(DEVICE, "d-3")))
    grant = identity_pb2.UpdateContactPreferencesRequest(
        customer=ref, consents=[consent(MAIL, GRANTED, "signup")], idempotency_key="pref-1"
    )
    first = await identity.UpdateContactPreferences(grant)
    assert statuses(first.contact_preferences) == {MAIL: GRANTED}
    await update_preferences(identity, ref, consents=[consent(MAIL, DENIED, "unsubscribe")])

    replayed = await identity.UpdateContactPreferences(grant)
    assert replayed.customer_id == first.customer_id
    assert statuses(replayed.contact_preferences) == {MAIL: DENIED}
    assert statuses((await read_preferences(identity, ref)).contact_preferences) == {MAIL: DENIED}

    reused = identity_pb2.UpdateContactPreferencesRequest(
        customer=ref, consents=[consent(SMS, GRANTED)], idempotency_key="pref-1"
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.UpdateContactPreferences(reused)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["idempotency_key"]


async def test_invalid_preference_updates_name_their_fields(identity) -> None:
    ref = common_pb2.CustomerRef(customer_id=await new_customer(identity, ident(DEVICE, "d-4")))
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await update_preferences(
            identity,
            ref,
            consents=[consent(common_pb2.CONTACT_CHANNEL_UNSPECIFIED, GRANTED), consent(MAIL, 7)],
            update_mask=field_mask_pb2.FieldMask(paths=["consents"]),
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error.value)) == {
        "consents[0].channel",
        "consents[1].status",
        "update_mask.paths[0]",
    }
    with pytest.raises(grpc.aio.AioRpcError) as future:
        await update_preferences(
            identity,
            ref,
            consents=[consent(MAIL, DENIED, "crm", datetime.now(UTC) + timedelta(days=365))],
        )
    assert future.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(future.value)) == ["consents[0].updated_at"]
    with pytest.raises(grpc.aio.AioRpcError) as empty:
        await update_preferences(identity, ref)
    assert empty.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(empty.value)) == ["update_mask"]
    assert (await read_preferences(identity, ref)).contact_preferences == (
        identity_pb2.ContactPreferences()
    )


async def test_preferences_of_an_unknown_identifier_are_not_found(identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await read_preferences(
            identity, common_pb2.CustomerRef(identifier=ident(EMAIL, unique_email()))
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

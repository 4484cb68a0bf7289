"""Plain identity types -> protobuf messages: every conversion the identity
servicer answers with, kept out of the servicer (which only checks requests,
calls the service and answers)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime

from converge.identity.domain import (
    BUILTIN_PROFILE_FIELDS,
    Customer,
    IdentityEvent,
    Merge,
    ProfileChange,
    ProfileFields,
    TaggedValue,
)
from converge.identity.identifiers import NormalizedIdentifier
from converge.identity.service import ExportPage, ExportPosition, PeerErasure
from converge.runtime.cursors import commit_cursor
from converge.runtime.values import from_plain, from_tagged, timestamp
from converge.v1 import common_pb2, identity_pb2

_STRING_FIELDS = frozenset(name for name, tag in BUILTIN_PROFILE_FIELDS.items() if tag == "s")


def attribute_value(tagged: TaggedValue) -> common_pb2.AttributeValue:
    if "m" in tagged:  # money has no AttributeValue of its own: shown as text
        money = tagged["m"]
        return common_pb2.AttributeValue(
            string_value=f"{money['u'] + money['n'] / 1e9:.2f} {money['c']}"
        )
    return from_plain(from_tagged(tagged))


def profile_pb(fields: ProfileFields) -> identity_pb2.Profile:
    profile = identity_pb2.Profile()
    for name, tagged in fields.items():
        if name in _STRING_FIELDS:
            setattr(profile, name, tagged["s"])
        elif name == "signup_date":
            profile.signup_date.CopyFrom(timestamp(datetime.fromisoformat(tagged["t"])))
        elif name == "lifetime_value":
            money = tagged["m"]
            profile.lifetime_value.CopyFrom(
                common_pb2.Money(currency_code=money["c"], units=money["u"], nanos=money["n"])
            )
        else:
            profile.attributes[name.removeprefix("attributes.")].CopyFrom(attribute_value(tagged))
    return profile


def identifier_pb(identifier: NormalizedIdentifier) -> common_pb2.Identifier:
    return common_pb2.Identifier(
        type=common_pb2.IdentifierType.ValueType(identifier.kind),
        value=identifier.value,
        source=identifier.source,
    )


def customer_pb(customer: Customer) -> identity_pb2.Customer:
    preferences = customer.preferences
    message = identity_pb2.Customer(
        customer_id=customer.customer_id,
        profile=profile_pb(customer.profile),
        identifiers=[
            identity_pb2.CustomerIdentifier(
                identifier=identifier_pb(a.identifier),
                customer_id=a.customer_id,
                attached_at=timestamp(a.attached_at),
            )
            for a in customer.identifiers
        ],
        contact_preferences=identity_pb2.ContactPreferences(
            consents=[
                identity_pb2.ChannelConsent(
                    channel=common_pb2.ContactChannel.ValueType(c.channel),
                    status=identity_pb2.ConsentStatus.ValueType(c.status),
                    updated_at=timestamp(c.updated_at),
                    source=c.source,
                )
                for c in preferences.consents
            ],
            do_not_contact=preferences.do_not_contact,
            preferred_channel=preferences.preferred_channel,  # type: ignore[arg-type]
            wants_human=preferences.wants_human,
        ),
        merged_customer_ids=customer.merged_customer_ids,
        created_at=timestamp(customer.created_at),
        updated_at=timestamp(customer.updated_at),
        as_of=timestamp(customer.as_of),
    )
    if preferences.updated_at is not None:
        message.contact_preferences.updated_at.CopyFrom(timestamp(preferences.updated_at))
    return message


def merge_pb(merge: Merge) -> identity_pb2.MergeRecord:
    record = identity_pb2.MergeRecord(
        merge_id=merge.merge_id,
        surviving_customer_id=merge.surviving_customer_id,
        merged_customer_id=merge.merged_customer_id,
        joining_identifiers=[identifier_pb(i) for i in merge.joining_identifiers],
        actor=common_pb2.Actor(name=merge.actor, reason=merge.reason),
        merged_at=timestamp(merge.merged_at),
        policy=merge.policy,
    )
    if merge.unmerged_at is not None:
        record.unmerged_at.CopyFrom(timestamp(merge.unmerged_at))
    return record


def change_pb(change: ProfileChange) -> identity_pb2.ProfileChange:
    message = identity_pb2.ProfileChange(
        field=change.field,
        effective_at=timestamp(change.effective_at),
        recorded_at=timestamp(change.recorded_at),
        actor=change.actor,
    )
    if change.value is not None:
        message.value.CopyFrom(attribute_value(change.value))
    return message


def event_pb(event: IdentityEvent) -> identity_pb2.StreamIdentityEventsResponse:
    message = identity_pb2.StreamIdentityEventsResponse(
        cursor=commit_cursor(event.xid, event.event_id),
        type=event.event_type,  # type: ignore[arg-type]
        customer_id=event.customer_id,
        other_customer_id=event.other_customer_id or "",
        merge_id=event.merge_id or "",
        occurred_at=timestamp(event.occurred_at),
    )
    if event.identifier is not None:
        message.identifier.CopyFrom(identifier_pb(event.identifier))
    return message


def forget_response_pb(
    erasure_id: str, outcomes: Sequence[PeerErasure], complete: bool, erased_at: datetime
) -> identity_pb2.ForgetCustomerResponse:
    return identity_pb2.ForgetCustomerResponse(
        erasure_id=erasure_id,
        services=[
            identity_pb2.ServiceErasure(
                service=o.service, done=o.done, erased_counts=o.erased_counts, error=o.error
            )
            for o in outcomes
        ],
        complete=complete,
        erased_at=timestamp(erased_at),
    )


def export_response_pb(page: ExportPage) -> identity_pb2.ExportCustomerResponse:
    response = identity_pb2.ExportCustomerResponse(
        profile_changes=[change_pb(c) for c in page.changes],
        merges=[merge_pb(m) for m in page.merges],
        services=page.peer_pages,
        unavailable_services=page.unavailable,
        next_page_token="" if page.next is None else export_token(page.next),
    )
    if page.customer is not None:
        response.customer.CopyFrom(customer_pb(page.customer))
    return response


# An export's page token: the position as compact JSON, base64url. Opaque to
# callers; it carries the other service's own token untouched.
def export_token(position: ExportPosition) -> str:
    plain = json.dumps(
        [position.customer_id, position.service, position.service_token], separators=(",", ":")
    )
    return base64.urlsafe_b64encode(plain.encode()).decode()


def export_position(token: str) -> ExportPosition:
    """The position a token names; ValueError for one identity did not issue."""
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError) as error:
        raise ValueError("not a token this service issued") from error
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise ValueError("not a token this service issued")
    return ExportPosition(*value)

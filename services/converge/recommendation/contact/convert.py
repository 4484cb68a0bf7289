"""Protobuf <-> the contact rules' plain types: identity's ContactPreferences
in, SuppressionReason and ContactChannel out."""

from __future__ import annotations

from converge.recommendation.contact.rules import (
    CONTACT_CHANNELS,
    Consent,
    ContactPreferences,
    Suppression,
)
from converge.v1 import common_pb2, identity_pb2, recommendation_pb2

_CONSENTS = {
    identity_pb2.CONSENT_STATUS_GRANTED: Consent.GRANTED,
    identity_pb2.CONSENT_STATUS_DENIED: Consent.DENIED,
}


def channel_name(channel: common_pb2.ContactChannel.ValueType) -> str | None:
    """'email', 'sms'...; None for UNSPECIFIED (or a value this build does not know)."""
    name = common_pb2.ContactChannel.Name(channel) if channel in _KNOWN_CHANNELS else ""
    lowered = name.removeprefix("CONTACT_CHANNEL_").lower()
    return lowered if lowered in CONTACT_CHANNELS else None


_KNOWN_CHANNELS = frozenset(common_pb2.ContactChannel.values())


def channel_proto(name: str | None) -> common_pb2.ContactChannel.ValueType:
    """The ContactChannel of a channel name; UNSPECIFIED for None (in the conversation)."""
    if name is None:
        return common_pb2.CONTACT_CHANNEL_UNSPECIFIED
    return common_pb2.ContactChannel.Value(f"CONTACT_CHANNEL_{name.upper()}")


def preferences_from_proto(message: identity_pb2.ContactPreferences) -> ContactPreferences:
    """Identity's preferences as the rules read them. A consent on a channel
    this build does not know is dropped (it cannot allow a channel the rules
    use); a status other than GRANTED or DENIED reads as unspecified, which
    allows nothing (fail closed). When a channel is listed twice, the later
    entry wins unless either denies: a denial is never overridden here."""
    consents: dict[str, Consent] = {}
    for entry in message.consents:
        channel = channel_name(entry.channel)
        if channel is None:
            continue
        status = _CONSENTS.get(entry.status, Consent.UNSPECIFIED)
        if consents.get(channel) is Consent.DENIED:
            continue
        consents[channel] = status
    return ContactPreferences(
        consents=consents,
        do_not_contact=message.do_not_contact,
        preferred_channel=channel_name(message.preferred_channel),
        wants_human=message.wants_human,
    )


def suppression_proto(reason: Suppression) -> recommendation_pb2.SuppressionReason.ValueType:
    return recommendation_pb2.SuppressionReason.Value(f"SUPPRESSION_REASON_{reason.value}")

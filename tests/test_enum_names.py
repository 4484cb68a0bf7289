"""The lower-case names people write for the protos' enums (in policies,
feature sets and on the command line) are kept as plain Python in a few
places, so that light modules need not import protobuf or pydantic. Each copy
must name exactly the proto's values, in the proto's order: a value added to
a proto and not here would be refused by a policy or a command, or silently
read as another."""

from __future__ import annotations

from typing import get_args

from google.protobuf.descriptor import EnumDescriptor

from converge.features.definitions import CHANNEL_NAMES
from converge.recommendation.contact.rules import CONTACT_CHANNELS
from converge.recommendation.decisions import cli as recommend_cli
from converge.recommendation.policy.model import (
    ActionKindName,
    ContactChannelName,
    RequestChannelName,
)
from converge.v1 import common_pb2, recommendation_pb2


def _lowered(enum: EnumDescriptor, prefix: str) -> tuple[str, ...]:
    """The enum's names without the prefix, lower case, by number (0 included)."""
    by_number = sorted(enum.values, key=lambda value: value.number)
    return tuple(value.name.removeprefix(prefix).lower() for value in by_number)


def test_request_channel_names_are_common_protos_channel() -> None:
    proto = _lowered(common_pb2.Channel.DESCRIPTOR, "CHANNEL_")
    assert proto == CHANNEL_NAMES  # by number, UNSPECIFIED first
    assert get_args(RequestChannelName) == proto[1:]
    assert proto[1:] == recommend_cli.REQUEST_CHANNELS


def test_contact_channel_names_are_common_protos_contact_channel() -> None:
    proto = _lowered(common_pb2.ContactChannel.DESCRIPTOR, "CONTACT_CHANNEL_")[1:]
    assert get_args(ContactChannelName) == proto
    assert proto == CONTACT_CHANNELS
    assert proto == recommend_cli.CONTACT_CHANNELS


def test_action_kind_names_are_recommendation_protos_action_kind() -> None:
    proto = _lowered(recommendation_pb2.ActionKind.DESCRIPTOR, "ACTION_KIND_")[1:]
    assert get_args(ActionKindName) == proto
    assert proto == recommend_cli.ACTION_KINDS

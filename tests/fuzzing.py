"""Hypothesis strategies that mutate protobuf requests field by field, and the
assertion every fuzzed call must pass, shared by the identity and interactions
fuzzers.

A mutation walks the message's descriptor to one field (nested messages,
repeated and map fields included) and gives it a hostile value for its type:
extreme integers, NaN and infinities, NUL and huge strings, invalid UUIDs,
out-of-range timestamps, enum numbers out of range, empty or oversized
repeated fields, the other member of a oneof, or the field cleared.
"""

from __future__ import annotations

import math
from typing import Any

import grpc
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import Phase
from hypothesis import strategies as st

# The phases of the fuzzers that call real services: no shrinking. One
# example costs up to half a second of real calls, and Hypothesis shrinks a
# failure for up to five minutes, which is the suite's per-test timeout: a
# failure found in CI (interactions, 2026-12-03) showed as a timeout with no
# example. Unshrunk, it fails at once and prints the example and its seed.
SERVICE_FUZZ_PHASES = (Phase.explicit, Phase.reuse, Phase.generate)

_INT32 = (0, 1, -1, 2**31 - 1, -(2**31))
_INT64 = (*_INT32, 2**63 - 1, -(2**63), 10**12, 999_999_999, 1_000_000_000, -999_999_999)
_UINT = (0, 1, 2**32 - 1)
_DOUBLES = (math.nan, math.inf, -math.inf, 1e308, -1e308, -0.0, 5e-324, 1e15, -1.5)
_STRINGS = (
    "",
    "\x00",
    "a\x00b",
    " ",
    "not-a-uuid",
    "00000000-0000-0000-0000-000000000000",
    "é" * 300,
    "x" * 70_000,
    "custom.\x00",
    "../../etc/passwd",
    "' OR 1=1 --",
    "\U0001d518\U0001d52b",  # (letters outside the BMP)
    "1.2",
    "-5",
    "99999999999999999999999",
    # Tokens and cursors in the shapes the services issue, with numbers out of range.
    "2024-01-01T00:00:00+00:00/99999999999999999999",
    "0001-01-01T00:00:00/1",
    "99999999999999999999.99999999999999999999",
    "-1.-1",
    "MTIzNDU2Nzg5MDEyMzQ1Njc4OTAx",
)
# Timestamp seconds: year 1, year 9999, before 1900, after 2200, the epoch, and
# the edges of the accepted range.
_SECONDS = (
    -62_135_596_800,
    253_402_300_799,
    -2_208_988_801,
    7_258_118_400,
    0,
    -1,
    2**40,
    -(2**40),
)
_NANOS = (0, -1, 999_999_999, 1_000_000_000, 2**31 - 1)
_REPEAT = (0, 2, 1001)


def _int_values(field: FieldDescriptor) -> tuple[int, ...]:
    kind = field.type
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return _UINT
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return (*_UINT, 2**64 - 1)
    if kind in (
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_SFIXED64,
    ):
        return _INT64
    return _INT32


def _scalar(data: st.DataObject, field: FieldDescriptor) -> Any:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return data.draw(st.sampled_from(_STRINGS) | st.text(max_size=20))
    if kind == FieldDescriptor.TYPE_BYTES:
        return data.draw(st.binary(max_size=64))
    if kind == FieldDescriptor.TYPE_BOOL:
        return data.draw(st.booleans())
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return data.draw(st.sampled_from(_DOUBLES) | st.floats(allow_nan=True))
    if kind == FieldDescriptor.TYPE_ENUM:
        defined = [v.number for v in field.enum_type.values]
        return data.draw(st.sampled_from([*defined, max(defined) + 1, 999, -1, 2**31 - 1]))
    return data.draw(st.sampled_from(_int_values(field)))


def _hostile_message(data: st.DataObject, message: Message) -> None:
    """Sets `message` (a Timestamp gets extreme times; others one field)."""
    if message.DESCRIPTOR.full_name == "google.protobuf.Timestamp":
        message.seconds = data.draw(st.sampled_from(_SECONDS))  # type: ignore[attr-defined]
        message.nanos = data.draw(st.sampled_from(_NANOS))  # type: ignore[attr-defined]
        return
    mutate_once(data, message, depth=1)


def _fields(descriptor: Descriptor) -> list[FieldDescriptor]:
    return list(descriptor.fields)


def mutate_once(data: st.DataObject, message: Message, depth: int = 0) -> None:
    """One hostile change somewhere in `message`."""
    fields = _fields(message.DESCRIPTOR)
    if not fields:
        return
    field = data.draw(st.sampled_from(fields), label="field")
    name = field.name
    target: Any = getattr(message, name)
    is_map = field.message_type is not None and field.message_type.GetOptions().map_entry
    if is_map:
        action = data.draw(st.sampled_from(["clear", "add", "many"]))
        if action == "clear":
            message.ClearField(name)
            return
        value_field = field.message_type.fields_by_name["value"]
        count = 1 if action == "add" else data.draw(st.sampled_from([65, 101, 5000]))
        for i in range(count):
            key = (
                data.draw(st.sampled_from(["k", "\x00", "Bad Key", "x" * 300, "ok_name"]))
                if count == 1
                else f"k{i}"
            )
            if value_field.type == FieldDescriptor.TYPE_MESSAGE:
                entry = target[key]
                if count == 1:
                    _hostile_message(data, entry)
                else:
                    entry.SetInParent()
                    _set_any_oneof(data, entry)
            else:
                target[key] = _scalar(data, value_field)
        return
    if field.is_repeated:
        action = data.draw(st.sampled_from(["clear", "grow", "mutate_item"]))
        if action == "clear":
            message.ClearField(name)
            return
        if action == "grow":
            size = data.draw(st.sampled_from(_REPEAT))
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                template = target[0] if len(target) else None
                message.ClearField(name)
                for _ in range(size):
                    item = target.add()
                    if template is not None:
                        item.CopyFrom(template)
            else:
                template_value = target[0] if len(target) else _scalar(data, field)
                message.ClearField(name)
                target.extend([template_value] * size)
            return
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            item = target[0] if len(target) else target.add()
            if depth < 3 and data.draw(st.booleans()):
                mutate_once(data, item, depth + 1)
            else:
                _hostile_message(data, item)
        else:
            if len(target):
                target[0] = _scalar(data, field)
            else:
                target.append(_scalar(data, field))
        return
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        action = data.draw(st.sampled_from(["clear", "descend"]))
        if action == "clear":
            message.ClearField(name)
            return
        if field.message_type.full_name == "google.protobuf.Timestamp" or depth >= 3:
            _hostile_message(data, target)
        else:
            target.SetInParent()
            mutate_once(data, target, depth + 1)
        return
    setattr(message, name, _scalar(data, field))


def _set_any_oneof(data: st.DataObject, message: Message) -> None:
    for oneof in message.DESCRIPTOR.oneofs:
        field = data.draw(st.sampled_from(list(oneof.fields)))
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            _hostile_message(data, getattr(message, field.name))
        else:
            setattr(message, field.name, _scalar(data, field))


def mutate(data: st.DataObject, message: Message) -> Message:
    """`message` changed in one to three places (a copy)."""
    changed = type(message)()
    changed.CopyFrom(message)
    for _ in range(data.draw(st.integers(min_value=1, max_value=3), label="mutations")):
        mutate_once(data, changed)
    return changed


BROKEN = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)


def assert_refused_properly(error: grpc.aio.AioRpcError) -> None:
    """A fuzzed call may fail, but never as UNKNOWN or INTERNAL, and an
    INVALID_ARGUMENT names at least one field in a BadRequest."""
    assert error.code() not in BROKEN, f"{error.code().name}: {error.details()}"
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        status = rpc_status.from_call(error)
        assert status is not None, f"no status details: {error.details()}"
        violations = []
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [v.field for v in bad.field_violations]
        assert violations, f"INVALID_ARGUMENT without a field violation: {error.details()}"

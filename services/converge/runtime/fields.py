"""Checks of request fields that every service makes the same way.

What every service refuses, whatever the field (one definition here, used by
both services for every field of every request):

- Times outside [`EARLIEST_TIME`, `LATEST_TIME`) = [1900-01-01, 2200-01-01)
  UTC, or with nanos outside [0, 1e9). Protobuf allows years 1 to 9999, but
  PostgreSQL stores the year 1 as `-infinity` after time-zone arithmetic,
  and no customer event, consent or query time lies that far out.
- Text holding NUL (U+0000): PostgreSQL's text and jsonb cannot store it.
- Enum numbers the schema does not define, and Money whose units and nanos
  disagree in sign, whose |nanos| >= 1e9, or whose size exceeds
  `MAX_MONEY_UNITS` (see there): checked where a handler converts them, so
  they are reported with the request's other violations.

`checked_requests` makes every unary-request handler refuse NUL text and
out-of-range times before it runs; stream-request handlers and hot paths
check their rows themselves (`check_message`, or cheap inline checks).
"""

from __future__ import annotations

import functools
import inspect
import math
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.protobuf import timestamp_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from converge.runtime.errors import Violations
from converge.runtime.values import PlainValue, to_plain
from converge.v1 import common_pb2

EARLIEST_TIME = datetime(1900, 1, 1, tzinfo=UTC)
LATEST_TIME = datetime(2200, 1, 1, tzinfo=UTC)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The range as Timestamp seconds, so hot paths compare integers.
EARLIEST_SECONDS = int((EARLIEST_TIME - _EPOCH).total_seconds())
LATEST_SECONDS = int((LATEST_TIME - _EPOCH).total_seconds())  # exclusive
TIME_RANGE = "a time from 1900-01-01 to 2200-01-01 UTC"

# The largest amount of money one field may carry, in major units (a billion).
# Features sum amounts as integer nano-units kept in 64-bit integers (the
# stored feature state): one amount is then at most 1e18 nano-units, well
# inside 2^63 (9.2e18), and a day's sum saturates rather than overflows.
MAX_MONEY_UNITS = 1_000_000_000
_NANOS = 1_000_000_000


def parse_uuid(value: str, field: str, violations: Violations) -> str | None:
    """A required id in canonical UUID form, or None with the violation noted."""
    if not value:
        violations.add(field, "required")
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        violations.add(field, "not an id this platform issued (a UUID)")
        return None


def check_identifier(
    identifier: common_pb2.Identifier, path: str, violations: Violations, max_length: int
) -> None:
    """A customer named by an identifier in a `CustomerRef`: a known type and
    a value; normalising it is identity's business."""
    violations.check(
        identifier.type != 0 and identifier.type in common_pb2.IdentifierType.values(),
        f"{path}.type",
        "set a known identifier type",
    )
    violations.check(
        0 < len(identifier.value.strip()) <= max_length,
        f"{path}.value",
        f"required, at most {max_length} characters",
    )


def time_problem(ts: timestamp_pb2.Timestamp) -> str | None:
    """Why a Timestamp cannot be accepted, or None."""
    if not EARLIEST_SECONDS <= ts.seconds < LATEST_SECONDS:
        return f"must be {TIME_RANGE}"
    if not 0 <= ts.nanos < _NANOS:
        return "nanos must be within 0..999,999,999"
    return None


def parse_time(ts: timestamp_pb2.Timestamp, field: str, violations: Violations) -> datetime | None:
    """A Timestamp as an aware UTC datetime, or None with the violation noted."""
    problem = time_problem(ts)
    if problem is not None:
        violations.add(field, problem)
        return None
    return _EPOCH + timedelta(0, ts.seconds, ts.nanos // 1000)


def plain_attribute(
    value: common_pb2.AttributeValue, path: str, violations: Violations
) -> PlainValue | None:
    """An AttributeValue of a request as plain Python, or None with the
    violation noted: none of its values set, a Timestamp out of range (which
    protobuf's own conversion would raise on), a number not finite. Lengths
    are the caller's to check: each field has its own limit."""
    which = value.WhichOneof("value")
    if which is None:
        violations.add(path, "set one of string_value, number_value, bool_value, timestamp_value")
        return None
    if which == "timestamp_value":
        return parse_time(value.timestamp_value, path, violations)
    if which == "number_value" and not math.isfinite(value.number_value):
        violations.add(path, "must be a finite number")
        return None
    return to_plain(value)


def money_problem(units: int, nanos: int) -> str | None:
    """Why a Money's amount cannot be accepted, or None."""
    if not -_NANOS < nanos < _NANOS or (units > 0 > nanos) or (units < 0 < nanos):
        return "nanos must be within ±999,999,999 and of the same sign as units"
    if abs(units * _NANOS + nanos) > MAX_MONEY_UNITS * _NANOS:
        return f"at most {MAX_MONEY_UNITS:,} in absolute value"
    return None


def _problems(message: Message, path: str, violations: Violations, full: bool) -> None:
    for descriptor, value in message.ListFields():
        name = f"{path}{descriptor.name}"
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            value_field = descriptor.message_type.fields_by_name["value"]
            for key in value:
                if isinstance(key, str) and "\x00" in key:
                    violations.add(f"{name}[{key[:64]!r}]", "must not contain NUL characters")
                _one(value_field, value[key], f"{name}[{str(key)[:64]}]", violations, full)
        elif descriptor.is_repeated:
            for i, item in enumerate(value):
                _one(descriptor, item, f"{name}[{i}]", violations, full)
        else:
            _one(descriptor, value, name, violations, full)


def _one(
    descriptor: FieldDescriptor, value: Any, path: str, violations: Violations, full: bool
) -> None:
    kind = descriptor.type
    if kind == FieldDescriptor.TYPE_STRING:
        if "\x00" in value:
            violations.add(path, "must not contain NUL characters")
    elif kind == FieldDescriptor.TYPE_ENUM and full:
        enum = descriptor.enum_type
        if enum is not None and enum.values_by_number.get(value) is None:
            violations.add(path, f"unknown value {value}")
    elif kind == FieldDescriptor.TYPE_MESSAGE:
        full_name = descriptor.message_type.full_name if descriptor.message_type else ""
        if full_name == "google.protobuf.Timestamp":
            problem = time_problem(value)
            if problem is not None:
                violations.add(path, problem)
        elif full_name == "converge.v1.Money":
            problem = money_problem(value.units, value.nanos) if full else None
            if problem is not None:
                violations.add(path, problem)
        else:
            _problems(value, f"{path}.", violations, full)


def check_message(
    message: Message, violations: Violations, path: str = "", *, full: bool = True
) -> None:
    """Notes every field of `message` (nested ones too) that no service can
    accept: see the module's docstring. `path` prefixes the field paths.
    `full=False` checks only text and times (what would fail in the database
    or in conversion) and leaves enums and Money to the handler, which checks
    them beside the request's other rules, so all are reported at once."""
    _problems(message, f"{path}." if path else "", violations, full)


_Servicer = TypeVar("_Servicer", bound=type)


def _refuse_unacceptable(request: Message) -> None:
    violations = Violations()
    check_message(request, violations, full=False)
    violations.raise_if_any()


def _checked(handler: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(handler):

        async def checked_stream(self: Any, request: Message, context: Any) -> AsyncIterator[Any]:
            _refuse_unacceptable(request)
            async for response in handler(self, request, context):
                yield response

        return functools.wraps(handler)(checked_stream)

    async def checked(self: Any, request: Message, context: Any) -> Any:
        _refuse_unacceptable(request)
        return await handler(self, request, context)

    return functools.wraps(handler)(checked)


def checked_requests(cls: _Servicer) -> _Servicer:
    """A class decorator: every handler of a servicer that takes one request
    message refuses a request `check_message` finds fault with
    (INVALID_ARGUMENT naming each field) before it runs. Handlers reading a
    stream of requests (`request_iterator`) check their messages themselves,
    row by row and cheaply."""
    for name, handler in list(vars(cls).items()):
        if not (name[:1].isupper() and inspect.iscoroutinefunction(handler)) and not (
            name[:1].isupper() and inspect.isasyncgenfunction(handler)
        ):
            continue
        if "request_iterator" in inspect.signature(handler).parameters:
            continue
        setattr(cls, name, _checked(handler))
    return cls

"""Protobuf built from what the store returns, and pages bounded by their
encoded size (a default gRPC client refuses a message over 4 MB)."""

from __future__ import annotations

import uuid
from datetime import datetime
from decimal import Decimal
from typing import Any, Generic, TypeVar

from google.protobuf import struct_pb2
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)


def export_record_pb(row: Any) -> struct_pb2.Struct:
    """One stored interaction as the JSON-like record of an export."""
    data = {}
    for key, value in dict(row).items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, uuid.UUID):
            value = str(value)
        elif key == "amount" and value is not None:
            # Decimal text: a JSON number is a binary float and loses cents.
            value = format(Decimal(value).normalize(), "f")
        data[key] = value
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


def _varint_size(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


class BoundedPage(Generic[M]):
    """Messages of one page, up to `max_bytes` encoded as a repeated message
    field: `add` refuses the message that would pass the bound, except the
    first, so that a single large item never stops paging from moving on."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.messages: list[M] = []
        self.size = 0

    def add(self, message: M) -> bool:
        size = message.ByteSize()
        # The field's tag (one byte for field numbers below 16) and length.
        size += 1 + _varint_size(size)
        if self.messages and self.size + size > self.max_bytes:
            return False
        self.messages.append(message)
        self.size += size
        return True


# An export page token names the last row sent (its seq). Opaque to callers;
# the prefix lets a token of another kind be told apart.
_EXPORT_TOKEN_PREFIX = "after-seq:"


def export_token(last_seq: int) -> str:
    return f"{_EXPORT_TOKEN_PREFIX}{last_seq}"


def parse_export_token(token: str) -> int | None:
    """The seq an export page starts after: 0 for no token, None for a token
    this service did not issue."""
    if not token:
        return 0
    digits = token.removeprefix(_EXPORT_TOKEN_PREFIX)
    if digits == token or not digits.isascii() or not digits.isdigit() or len(digits) > 18:
        return None
    return int(digits)

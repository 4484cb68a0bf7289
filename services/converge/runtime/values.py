"""Conversions between protobuf's typed values and plain Python, shared by
every service so a value means the same everywhere.

Stored form ("tagged JSON"): {"s": text} | {"n": number} | {"b": flag} |
{"t": ISO-8601 time}; it keeps the type a bare JSON value would lose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from google.protobuf import timestamp_pb2

from converge.v1 import common_pb2

PlainValue = str | float | bool | datetime


@dataclass(frozen=True)
class CustomerKey:
    """A customer as a caller named it: by id, or by identifier (type
    number, value, source), as sent on to the service that knows customers
    (a client never creates one by naming it)."""

    customer_id: str = ""
    identifier_type: int = 0
    identifier_value: str = ""
    identifier_source: str = ""

    def describe(self) -> str:
        return self.customer_id or f"identifier {self.identifier_value}"

    def to_pb(self) -> common_pb2.CustomerRef:
        if self.customer_id:
            return common_pb2.CustomerRef(customer_id=self.customer_id)
        return common_pb2.CustomerRef(
            identifier=common_pb2.Identifier(
                type=self.identifier_type,  # type: ignore[arg-type]
                value=self.identifier_value,
                source=self.identifier_source,
            )
        )


def timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def to_datetime(ts: timestamp_pb2.Timestamp) -> datetime:
    return ts.ToDatetime(tzinfo=UTC)


def to_plain(value: common_pb2.AttributeValue) -> PlainValue | None:
    """The Python value of an AttributeValue; None when none of its fields is set."""
    which = value.WhichOneof("value")
    if which == "string_value":
        return value.string_value
    if which == "number_value":
        return value.number_value
    if which == "bool_value":
        return value.bool_value
    if which == "timestamp_value":
        return to_datetime(value.timestamp_value)
    return None


def from_plain(value: PlainValue) -> common_pb2.AttributeValue:
    if isinstance(value, bool):
        return common_pb2.AttributeValue(bool_value=value)
    if isinstance(value, int | float):
        return common_pb2.AttributeValue(number_value=float(value))
    if isinstance(value, datetime):
        return common_pb2.AttributeValue(timestamp_value=timestamp(value))
    return common_pb2.AttributeValue(string_value=value)


def to_tagged(value: PlainValue) -> dict[str, Any]:
    kind = type(value)  # exact types first: this runs for every attribute ingested
    if kind is str:
        return {"s": value}
    if kind is float:
        return {"n": value}
    if kind is bool:
        return {"b": value}
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    if isinstance(value, int | float):
        return {"n": float(value)}
    return {"s": str(value)}


def from_tagged(tagged: dict[str, Any]) -> PlainValue:
    if "s" in tagged:
        return str(tagged["s"])
    if "n" in tagged:
        return float(tagged["n"])
    if "b" in tagged:
        return bool(tagged["b"])
    return datetime.fromisoformat(tagged["t"])


def money_to_float(money: common_pb2.Money) -> float:
    return money.units + money.nanos / 1e9


def money_from_float(amount: float, currency: str) -> common_pb2.Money:
    units = math.trunc(amount)
    nanos = round((amount - units) * 1e9)
    return common_pb2.Money(currency_code=currency, units=units, nanos=nanos)


def money_to_decimal(money: common_pb2.Money) -> Decimal:
    """The exact amount of a Money (checked: same signs, |nanos| < 1e9)."""
    return Decimal(money.units) + Decimal(money.nanos).scaleb(-9)


def money_from_decimal(amount: Decimal, currency: str) -> common_pb2.Money:
    """The Money of an exact amount: the inverse of `money_to_decimal` (an
    amount with more than nine decimals, never stored now, is rounded)."""
    nanos_total = int(amount.scaleb(9).to_integral_value(ROUND_HALF_EVEN))
    units = abs(nanos_total) // 1_000_000_000
    nanos = abs(nanos_total) % 1_000_000_000
    sign = -1 if nanos_total < 0 else 1
    return common_pb2.Money(currency_code=currency, units=sign * units, nanos=sign * nanos)

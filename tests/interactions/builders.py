"""Builders of interactions for the tests."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from converge.runtime.values import timestamp
from converge.v1 import common_pb2, interactions_pb2

NOW = datetime.now(UTC)


def email_ref(email: str) -> common_pb2.CustomerRef:
    return common_pb2.CustomerRef(
        identifier=common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=email)
    )


def interaction(
    customer: common_pb2.CustomerRef,
    type_: str = "product.login",
    *,
    days_ago: float = 1.0,
    at: datetime | None = None,
    channel: int = common_pb2.CHANNEL_WEB,
    attributes: dict[str, common_pb2.AttributeValue] | None = None,
    **fields: object,
) -> interactions_pb2.InteractionInput:
    occurred = at or NOW - timedelta(days=days_ago)
    return interactions_pb2.InteractionInput(
        customer=customer,
        occurred_at=timestamp(occurred),
        channel=channel,  # type: ignore[arg-type]
        type=type_,
        attributes=attributes or {},
        source="test",
        **fields,  # type: ignore[arg-type]
    )


def record(
    item: interactions_pb2.InteractionInput, key: str | None = None
) -> interactions_pb2.RecordInteractionRequest:
    return interactions_pb2.RecordInteractionRequest(
        interaction=item, idempotency_key=key or uuid.uuid4().hex
    )


def text(value: str) -> common_pb2.AttributeValue:
    return common_pb2.AttributeValue(string_value=value)


def number(value: float) -> common_pb2.AttributeValue:
    return common_pb2.AttributeValue(number_value=value)

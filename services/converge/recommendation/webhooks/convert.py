"""Every protobuf conversion and request check of the webhook RPCs."""

from __future__ import annotations

import base64
import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import json_format
from google.protobuf.message import Message

from converge.recommendation.webhooks.store import DeliveryRow, WebhookRow
from converge.runtime.errors import Violations
from converge.runtime.fields import parse_uuid
from converge.runtime.values import timestamp
from converge.v1 import common_pb2
from converge.v1 import recommendation_pb2 as pb

logger = logging.getLogger(__name__)

DEFAULT_PAGE, MAX_PAGE = 100, 1000
MAX_TEXT = 200
_KIND_PREFIX = "ALERT_KIND_"


def kind_name(kind: int) -> str:
    """AlertKind as stored and as OutboxEvent.kind carries it: "escalation_risk"."""
    return pb.AlertKind.Name(kind)[len(_KIND_PREFIX) :].lower()  # type: ignore[arg-type]


def kind_value(name: str) -> int:
    return int(pb.AlertKind.Value(_KIND_PREFIX + name.upper()))


def _kinds(kinds: list[int], violations: Violations) -> list[str]:
    names = []
    for index, kind in enumerate(kinds):
        if kind == pb.ALERT_KIND_UNSPECIFIED or kind not in pb.AlertKind.values():
            violations.add(f"kinds[{index}]", "not an alert kind")
        else:
            names.append(kind_name(kind))
    return names


def _text(value: str, field: str, violations: Violations, *, required: bool) -> str:
    if required and not value.strip():
        violations.add(field, "required")
    elif len(value) > MAX_TEXT:
        violations.add(field, f"longer than {MAX_TEXT} characters")
    return value


def _page_size(page: common_pb2.PageRequest, violations: Violations) -> int:
    violations.check(page.page_size >= 0, "page.page_size", "must not be negative")
    return min(page.page_size or DEFAULT_PAGE, MAX_PAGE)


def _token(token: str, violations: Violations) -> str | None:
    if not token:
        return None
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        violations.add("page.page_token", "not a token this service issued")
        return None


def _encode_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode()


def request_fingerprint(request: Message) -> bytes:
    """What an idempotency key is bound to: the SHA-256 of the request
    without its key (deterministic serialization), prefixed by the message's
    full name so the same bytes of two RPCs never match."""
    unkeyed = type(request)()
    unkeyed.CopyFrom(request)
    unkeyed.ClearField("idempotency_key")
    digest = hashlib.sha256(request.DESCRIPTOR.full_name.encode() + b"\0")
    digest.update(unkeyed.SerializeToString(deterministic=True))
    return digest.digest()


@dataclass(frozen=True)
class CreateWebhook:
    team: str
    url: str
    secret_id: str
    kinds: list[str]
    idempotency_key: str
    actor_name: str
    actor_reason: str
    request_sha256: bytes


def parse_create(request: pb.CreateWebhookRequest) -> CreateWebhook:
    v = Violations()
    team = _text(request.team, "team", v, required=True)
    v.check(bool(request.url), "url", "required")
    secret_id = _text(request.secret_id, "secret_id", v, required=True)
    kinds = _kinds(list(request.kinds), v)
    key = _text(request.idempotency_key, "idempotency_key", v, required=False)
    v.raise_if_any()
    return CreateWebhook(
        team,
        request.url,
        secret_id,
        kinds,
        key,
        request.actor.name,
        request.actor.reason,
        request_fingerprint(request),
    )


def webhook(row: WebhookRow) -> pb.Webhook:
    return pb.Webhook(
        webhook_id=row.webhook_id,
        team=row.team,
        url=row.url,
        secret_id=row.secret_id,
        kinds=[kind_value(k) for k in row.kinds],  # type: ignore[misc]
        created_at=timestamp(row.created_at),
        created_by=common_pb2.Actor(name=row.created_by_name, reason=row.created_by_reason),
    )


@dataclass(frozen=True)
class ListWebhooks:
    team: str
    after: tuple[datetime, str] | None
    limit: int


def parse_list_webhooks(request: pb.ListWebhooksRequest) -> ListWebhooks:
    v = Violations()
    team = _text(request.team, "team", v, required=False)
    limit = _page_size(request.page, v)
    after = None
    token = _token(request.page.page_token, v)
    if token is not None:
        created, _, webhook_id = token.partition("/")
        try:
            after = (datetime.fromisoformat(created), str(uuid.UUID(webhook_id)))
            # A time out of range once in UTC (year 1 at +14:00) would fail in
            # the driver, as INTERNAL: refuse it here.
            if after[0].tzinfo is not None:
                after = (after[0].astimezone(UTC), after[1])
        except (ValueError, OverflowError):
            after = None
        if after is None or after[0].tzinfo is None:
            v.add("page.page_token", "not a token this service issued")
    v.raise_if_any()
    return ListWebhooks(team, after, limit)


def list_webhooks_response(rows: list[WebhookRow], limit: int) -> pb.ListWebhooksResponse:
    next_token = ""
    if len(rows) == limit and rows:
        last = rows[-1]
        next_token = _encode_token(f"{last.created_at.isoformat()}/{last.webhook_id}")
    return pb.ListWebhooksResponse(
        webhooks=[webhook(r) for r in rows],
        page=common_pb2.PageResponse(next_page_token=next_token),
    )


@dataclass(frozen=True)
class Keyed:
    """A request naming one row (a webhook, a dead letter), with its
    idempotency key ("" for none) and the fingerprint the key is bound to."""

    target_id: str
    idempotency_key: str
    request_sha256: bytes


def parse_delete(request: pb.DeleteWebhookRequest) -> Keyed:
    v = Violations()
    webhook_id = parse_uuid(request.webhook_id, "webhook_id", v)
    key = _text(request.idempotency_key, "idempotency_key", v, required=False)
    v.raise_if_any()
    assert webhook_id is not None
    return Keyed(webhook_id, key, request_fingerprint(request))


@dataclass(frozen=True)
class ListDeadLetters:
    team: str
    webhook_id: str | None
    before_seq: int | None
    limit: int


def parse_list_dead_letters(request: pb.ListDeadLettersRequest) -> ListDeadLetters:
    v = Violations()
    team = _text(request.team, "team", v, required=False)
    webhook_id = parse_uuid(request.webhook_id, "webhook_id", v) if request.webhook_id else None
    limit = _page_size(request.page, v)
    before = None
    token = _token(request.page.page_token, v)
    if token is not None:
        if token.isascii() and token.isdigit() and len(token) <= 18:
            before = int(token)
        else:
            v.add("page.page_token", "not a token this service issued")
    v.raise_if_any()
    return ListDeadLetters(team, webhook_id, before, limit)


def alert_event(body: bytes) -> pb.AlertEvent | None:
    """The posted AlertEvent read back from its proto3 JSON."""
    try:
        return json_format.Parse(body, pb.AlertEvent(), ignore_unknown_fields=True)
    except json_format.ParseError as error:
        logger.warning("a stored webhook body is not an AlertEvent: %s", error)
        return None


def dead_letter(row: DeliveryRow) -> pb.DeadLetter:
    letter = pb.DeadLetter(
        dead_letter_id=row.delivery_id,
        webhook_id=row.webhook_id,
        team=row.team,
        attempts=row.attempts,
        last_error=row.last_error,
    )
    event = alert_event(row.body)
    if event is not None:
        letter.event.CopyFrom(event)
    if row.first_attempt_at is not None:
        letter.first_attempt_at.CopyFrom(timestamp(row.first_attempt_at))
    if row.last_attempt_at is not None:
        letter.last_attempt_at.CopyFrom(timestamp(row.last_attempt_at))
    return letter


def list_dead_letters_response(rows: list[DeliveryRow], limit: int) -> pb.ListDeadLettersResponse:
    next_token = ""
    if len(rows) == limit and rows and rows[-1].dead_seq is not None:
        next_token = _encode_token(str(rows[-1].dead_seq))
    return pb.ListDeadLettersResponse(
        dead_letters=[dead_letter(r) for r in rows],
        page=common_pb2.PageResponse(next_page_token=next_token),
    )


def parse_redeliver(request: pb.RedeliverDeadLetterRequest) -> Keyed:
    v = Violations()
    dead_letter_id = parse_uuid(request.dead_letter_id, "dead_letter_id", v)
    key = _text(request.idempotency_key, "idempotency_key", v, required=False)
    v.raise_if_any()
    assert dead_letter_id is not None
    return Keyed(dead_letter_id, key, request_fingerprint(request))

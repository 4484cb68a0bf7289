"""Every protobuf <-> plain conversion of the interactions service, and the
checks of a request's shape with their field paths: the servicer calls these
and `service.py`, which sees plain Python types only. Pages are bounded by
their encoded size (a default gRPC client refuses a message over 4 MB)."""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, Generic, TypeVar

from asyncpg.pgproto import pgproto
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from converge.interactions.identity_link import IdentifierRef
from converge.interactions.service import Draft, IngestStreamSummary, TimelineQuery
from converge.interactions.store import StoredInteraction, StoredType, SyncStatus
from converge.interactions.types import (
    AttributeSpec,
    AttributeType,
    InteractionTypeSpec,
    RequiredField,
    validate_type_spec,
)
from converge.runtime.cursors import parse_commit_cursor
from converge.runtime.errors import FieldViolation, InvalidArgument, Violations, field_status
from converge.runtime.fields import (
    EARLIEST_SECONDS,
    EARLIEST_TIME,
    LATEST_SECONDS,
    LATEST_TIME,
    MAX_MONEY_UNITS,
    check_identifier,
    check_message,
    parse_uuid,
    plain_attribute,
)
from converge.runtime.values import (
    from_plain,
    from_tagged,
    money_from_decimal,
    money_to_decimal,
    timestamp,
    to_datetime,
)
from converge.v1 import common_pb2, interactions_pb2, privacy_pb2

M = TypeVar("M", bound=Message)

MAX_ATTRIBUTES = 64
MAX_STRING_BYTES = 4096
MAX_KEY = 256
MAX_BATCH = 1000
MAX_ROWS_PER_MESSAGE = 5000
DEFAULT_PAGE, MAX_PAGE = 100, 1000
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_SOURCE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_FIELD_NAMES: dict[int, RequiredField] = {
    interactions_pb2.INTERACTION_FIELD_TICKET_ID: "ticket_id",
    interactions_pb2.INTERACTION_FIELD_PRODUCT_ID: "product_id",
    interactions_pb2.INTERACTION_FIELD_AMOUNT: "amount",
    interactions_pb2.INTERACTION_FIELD_SENTIMENT: "sentiment",
}
_ATTRIBUTE_TYPES: dict[int, AttributeType] = {
    interactions_pb2.INTERACTION_ATTRIBUTE_TYPE_STRING: "string",
    interactions_pb2.INTERACTION_ATTRIBUTE_TYPE_NUMBER: "number",
    interactions_pb2.INTERACTION_ATTRIBUTE_TYPE_BOOL: "bool",
    interactions_pb2.INTERACTION_ATTRIBUTE_TYPE_TIMESTAMP: "timestamp",
}


# --- protobuf -> plain ------------------------------------------------------------
def uuid_field(value: str, path: str, v: Violations) -> uuid.UUID | None:
    parsed = parse_uuid(value, path, v)
    return uuid.UUID(parsed) if parsed else None


def customer_ref(
    ref: common_pb2.CustomerRef, path: str, v: Violations
) -> tuple[uuid.UUID | None, IdentifierRef | None]:
    which = ref.WhichOneof("ref")
    if which == "customer_id":
        return uuid_field(ref.customer_id, f"{path}.customer_id", v), None
    if which == "identifier":
        identifier = ref.identifier
        check_identifier(identifier, f"{path}.identifier", v, MAX_KEY)
        return None, IdentifierRef(identifier.type, identifier.value, identifier.source)
    v.add(path, "set customer_id or identifier")
    return None, None


def to_draft(
    message: interactions_pb2.InteractionInput,
    key: str,
    lookup_only: bool,
    row_ref: str,
    path: str,
    key_path: str,
    v: Violations,
) -> Draft | None:
    before = len(v.found)
    # NUL in text, times out of range, inconsistent money, unknown enums.
    check_message(message, v, path)
    v.check("\x00" not in key, key_path, "must not contain NUL characters")
    customer_id, identifier = customer_ref(message.customer, f"{path}.customer", v)
    v.check(message.HasField("occurred_at"), f"{path}.occurred_at", "required")
    v.check(
        message.channel != 0 and message.channel in common_pb2.Channel.values(),
        f"{path}.channel",
        "set a known channel",
    )
    v.check(0 < len(message.type) <= 64, f"{path}.type", "required, at most 64 characters")
    v.check(
        bool(_SOURCE.match(message.source)),
        f"{path}.source",
        "required: 1-64 of a-z, 0-9, '_', '.', '-'",
    )
    v.check(0 < len(key) <= MAX_KEY, key_path, f"required, at most {MAX_KEY} characters")
    v.check(len(message.ticket_id) <= MAX_KEY, f"{path}.ticket_id", "too long")
    v.check(len(message.product_id) <= MAX_KEY, f"{path}.product_id", "too long")
    v.check(
        len(message.attributes) <= MAX_ATTRIBUTES,
        f"{path}.attributes",
        f"at most {MAX_ATTRIBUTES} attributes",
    )
    attributes: dict[str, Any] = {}
    for name, value in message.attributes.items():
        field_path = f"{path}.attributes.{name[:64]}"
        if not _ATTRIBUTE_NAME.match(name):
            v.add(field_path, "name must match [a-z][a-z0-9_]{0,62}")
            continue
        plain = plain_attribute(value, field_path, v)
        if isinstance(plain, str) and len(plain.encode()) > MAX_STRING_BYTES:
            v.add(field_path, f"longer than {MAX_STRING_BYTES} bytes")
        elif plain is not None:
            attributes[name] = plain
    amount = currency = None
    if message.HasField("amount"):
        amount, currency = money_to_decimal(message.amount), message.amount.currency_code
        v.check(
            bool(re.fullmatch(r"[A-Z]{3}", currency)),
            f"{path}.amount.currency_code",
            "an ISO 4217 code such as EUR",
        )
    sentiment = message.sentiment if message.HasField("sentiment") else None
    if len(v.found) > before:
        return None
    return Draft(
        row_ref=row_ref,
        customer_id=customer_id,
        identifier=identifier,
        occurred_at=to_datetime(message.occurred_at),
        channel=message.channel,
        type=message.type,
        attributes=attributes,
        ticket_id=message.ticket_id,
        product_id=message.product_id,
        amount=amount,
        currency=currency or "",
        sentiment=sentiment,
        source=message.source,
        idempotency_key=key,
        lookup_only=lookup_only,
    )


def parse_timeline_token(token: str, path: str, v: Violations) -> tuple[datetime, int] | None:
    """A timeline page token ("<occurred_at>/<seq>") as issued, or None."""
    if not token:
        return None
    at, _, seq = token.partition("/")
    try:
        parsed = (datetime.fromisoformat(at), int(seq))
    except ValueError:
        parsed = None
    # (Only what this service issues: an aware time in range and a bigint seq.)
    if (
        parsed is None
        or parsed[0].utcoffset() is None
        or not EARLIEST_TIME <= parsed[0] < LATEST_TIME
        or not 0 <= parsed[1] < 2**63
    ):
        v.add(path, "not a token this service issued")
        return None
    return parsed


# The bulk path: rows in the common valid shape are read here in one pass with
# what was checked before remembered (a customer id's parse, a source, an
# attribute name); anything unusual goes through `to_draft` for its violations.
_CHANNELS = frozenset(n for n in common_pb2.Channel.values() if n)
_IDENTIFIER_TYPES = frozenset(n for n in common_pb2.IdentifierType.values() if n)
_CURRENCY = re.compile(r"[A-Z]{3}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_REMEMBERED = 100_000
_MONEY_LIMIT = MAX_MONEY_UNITS * 1_000_000_000  # in nano-units


class _Seen:
    """Values already found valid, so repeats skip the check (bounded)."""

    def __init__(self) -> None:
        self.customer_ids: dict[str, uuid.UUID] = {}
        self.sources: set[str] = set()
        self.attribute_names: set[str] = set()
        self.amounts: dict[int, Decimal] = {}

    @staticmethod
    def matches(seen: set[str], value: str, pattern: re.Pattern[str]) -> bool:
        """Whether `value` matches `pattern`, remembered in `seen` when it does."""
        if value in seen:
            return True
        if not pattern.match(value):
            return False
        if len(seen) >= _REMEMBERED:
            seen.clear()
        seen.add(value)
        return True

    def amount(self, nanos: int) -> Decimal:
        """The exact amount of `nanos` nano-units (prices repeat: remembered)."""
        found = self.amounts.get(nanos)
        if found is None:
            if len(self.amounts) >= _REMEMBERED:
                self.amounts.clear()
            found = self.amounts[nanos] = Decimal(nanos).scaleb(-9)
        return found

    def customer_id(self, text: str) -> uuid.UUID | None:
        found = self.customer_ids.get(text)
        if found is None:
            try:
                # asyncpg's own UUID (a uuid.UUID, equal and hashing alike):
                # hashed and encoded in C, where uuid.UUID does both in Python.
                found = pgproto.UUID(uuid.UUID(text).bytes)
            except ValueError:
                return None
            if len(self.customer_ids) >= _REMEMBERED:
                self.customer_ids.clear()
            self.customer_ids[text] = found
        return found


_SEEN = _Seen()


def fast_draft(
    message: interactions_pb2.InteractionInput, key: str, lookup_only: bool, row_ref: str
) -> Draft | None:
    """The draft of a row in the common valid shape, or None to check it fully."""
    # (NUL checks only on free text: PostgreSQL refuses U+0000 in text.)
    if not 0 < len(key) <= MAX_KEY or "\x00" in key:
        return None
    source = message.source
    if not _SEEN.matches(_SEEN.sources, source, _SOURCE):
        return None
    customer = message.customer
    customer_id = identifier = None
    given_id = customer.customer_id  # (read first: WhichOneof costs twice as much)
    if given_id:
        customer_id = _SEEN.customer_id(given_id)
        if customer_id is None:
            return None
    elif customer.HasField("identifier"):
        ref = customer.identifier
        if (
            ref.type not in _IDENTIFIER_TYPES
            or not 0 < len(ref.value.strip()) <= MAX_KEY
            or "\x00" in ref.value
            or "\x00" in ref.source
        ):
            return None
        identifier = IdentifierRef(ref.type, ref.value, ref.source)
    else:
        return None
    channel = message.channel
    kind = message.type
    ticket_id = message.ticket_id
    product_id = message.product_id
    if (
        channel not in _CHANNELS
        or not 0 < len(kind) <= 64
        or len(ticket_id) > MAX_KEY
        or len(product_id) > MAX_KEY
        or not message.HasField("occurred_at")
        or "\x00" in kind
        or "\x00" in ticket_id
        or "\x00" in product_id
    ):
        return None
    attributes: dict[str, Any] = {}
    sent = message.attributes
    if sent:
        if len(sent) > MAX_ATTRIBUTES:
            return None
        for name in sent:  # (a map's items() view iterates in Python, keys in C)
            value = sent[name]
            if not _SEEN.matches(_SEEN.attribute_names, name, _ATTRIBUTE_NAME):
                return None
            held = value.WhichOneof("value")
            if held == "string_value":
                text = value.string_value
                if (
                    len(text) * 4 > MAX_STRING_BYTES and len(text.encode()) > MAX_STRING_BYTES
                ) or "\x00" in text:
                    return None
                attributes[name] = text
            elif held == "number_value":
                number = value.number_value
                if not math.isfinite(number):
                    return None
                attributes[name] = number
            elif held == "bool_value":
                attributes[name] = value.bool_value
            elif held == "timestamp_value":
                at = value.timestamp_value
                if not (EARLIEST_SECONDS <= at.seconds < LATEST_SECONDS and 0 <= at.nanos < 10**9):
                    return None
                attributes[name] = to_datetime(at)
            else:
                return None
    amount = None
    currency = ""
    if message.HasField("amount"):
        money = message.amount
        currency = money.currency_code
        units, money_nanos = money.units, money.nanos
        total = units * 1_000_000_000 + money_nanos  # (money_problem, inlined)
        if (
            not _CURRENCY.fullmatch(currency)
            or not -_MONEY_LIMIT <= total <= _MONEY_LIMIT
            or not -1_000_000_000 < money_nanos < 1_000_000_000
            or (units > 0 > money_nanos)
            or (units < 0 < money_nanos)
        ):
            return None
        amount = _SEEN.amount(total)
    occurred = message.occurred_at
    seconds, nanos = occurred.seconds, occurred.nanos
    if not (EARLIEST_SECONDS <= seconds < LATEST_SECONDS and 0 <= nanos < 10**9):
        return None
    # By position, in Draft's field order (keywords cost three times as much).
    return Draft(
        _EPOCH + timedelta(0, seconds, nanos // 1000),  # occurred_at
        kind,  # type
        channel,
        attributes,
        ticket_id,
        product_id,
        amount,
        message.sentiment if message.HasField("sentiment") else None,
        row_ref,
        customer_id,
        identifier,
        currency,
        source,
        key,  # idempotency_key
        lookup_only,
    )


# --- plain -> protobuf ------------------------------------------------------------
def interaction_pb(row: StoredInteraction) -> interactions_pb2.Interaction:
    message = interactions_pb2.Interaction(
        interaction_id=str(row.interaction_id),
        customer_id=str(row.customer_id),
        occurred_at=timestamp(row.occurred_at),
        channel=common_pb2.Channel.ValueType(row.channel),
        type=row.type,
        attributes={k: from_plain(from_tagged(t)) for k, t in row.attributes.items()},
        ticket_id=row.ticket_id,
        product_id=row.product_id,
        source=row.source,
        idempotency_key=row.idempotency_key,
        recorded_at=timestamp(row.recorded_at),
    )
    if row.amount is not None:
        message.amount.CopyFrom(money_from_decimal(Decimal(row.amount), row.currency))
    if row.sentiment is not None:
        message.sentiment = row.sentiment
    if row.identifier:
        identifier = row.identifier
        message.identifier.CopyFrom(
            common_pb2.Identifier(
                type=identifier["type"], value=identifier["value"], source=identifier["source"]
            )
        )
    return message


def type_pb(
    spec: InteractionTypeSpec, row: StoredType | None = None
) -> interactions_pb2.InteractionType:
    by_name = {
        v: interactions_pb2.InteractionAttributeType.ValueType(k)
        for k, v in _ATTRIBUTE_TYPES.items()
    }
    by_field = {v: interactions_pb2.InteractionField.ValueType(k) for k, v in _FIELD_NAMES.items()}
    message = interactions_pb2.InteractionType(
        name=spec.name,
        description=spec.description,
        attributes=[
            interactions_pb2.InteractionAttributeSpec(
                name=a.name,
                type=by_name[a.type],
                required=a.required,
                description=a.description,
                allowed_values=a.allowed_values,
                unit=a.unit,
                **({"min_value": a.min_value} if a.min_value is not None else {}),
                **({"max_value": a.max_value} if a.max_value is not None else {}),
            )
            for a in spec.attributes
        ],
        required_fields=sorted(by_field[f] for f in spec.required_fields),
        built_in=spec.built_in,
        version=row.version if row is not None else 1,
    )
    if row is not None:
        message.created_at.CopyFrom(timestamp(row.created_at))
        message.updated_at.CopyFrom(timestamp(row.updated_at))
    return message


_STORED_COLUMNS = tuple(f.name for f in dataclasses.fields(StoredInteraction))


def export_record_pb(row: StoredInteraction) -> struct_pb2.Struct:
    """One stored interaction as the JSON-like record of an export (every column)."""
    data = {}
    for key in _STORED_COLUMNS:
        value = getattr(row, key)
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


# --- requests checked, responses built (one per handler that needs more than a line)
def record_request(request: interactions_pb2.RecordInteractionRequest) -> Draft:
    """The interaction of a RecordInteraction request; INVALID_ARGUMENT naming
    each field at fault."""
    v = Violations()
    draft = to_draft(
        request.interaction,
        request.idempotency_key,
        request.lookup_only,
        "",
        "interaction",
        "idempotency_key",
        v,
    )
    v.raise_if_any()
    assert draft is not None
    return draft


def read_ingest_message(
    message: interactions_pb2.IngestInteractionsRequest,
    received: int,
    add: Callable[[Draft], None],
    reject: Callable[[str, str, str, str], None],
) -> int:
    """Each row of one IngestInteractions message, as a draft to `add` or a
    `reject(row_ref, idempotency_key, field, reason)`; returns the rows
    received so far (a row without a row_ref is referred to by its number)."""
    if len(message.rows) > MAX_ROWS_PER_MESSAGE:
        raise InvalidArgument(
            [FieldViolation("rows", f"at most {MAX_ROWS_PER_MESSAGE} per message")]
        )
    items: list[interactions_pb2.IngestInteractionsRequest | interactions_pb2.IngestRow] = [
        *([message] if message.HasField("interaction") else []),
        *message.rows,
    ]
    for item in items:
        received += 1
        row_ref = item.row_ref or str(received)
        fast = fast_draft(item.interaction, item.idempotency_key, item.lookup_only, row_ref)
        if fast is not None:
            add(fast)
            continue
        v = Violations()
        draft = to_draft(
            item.interaction,
            item.idempotency_key,
            item.lookup_only,
            row_ref,
            "interaction",
            "idempotency_key",
            v,
        )
        if draft is None:
            found = v.found[0]
            reject(row_ref, item.idempotency_key, found.field, found.description)
            continue
        add(draft)
    return received


def ingest_response(summary: IngestStreamSummary) -> interactions_pb2.IngestInteractionsResponse:
    return interactions_pb2.IngestInteractionsResponse(
        received=summary.received,
        stored=summary.stored,
        duplicates=summary.duplicates,
        rejected=summary.rejected,
        customers_created=summary.customers_created,
        rejections=[
            interactions_pb2.IngestRejection(
                row_ref=r.row_ref,
                idempotency_key=r.idempotency_key,
                error=field_status(r.field, r.reason),
            )
            for r in summary.rejections
        ],
    )


def timeline_request(
    request: interactions_pb2.ListInteractionsRequest,
) -> tuple[TimelineQuery, int]:
    """The timeline query of a ListInteractions request (one row more than the
    page, to know whether another follows) and the page's row count."""
    v = Violations()
    customer_id, identifier = customer_ref(request.customer, "customer", v)
    v.check(request.page.page_size >= 0, "page.page_size", "must not be negative")
    for i, channel in enumerate(request.channels):
        v.check(
            channel in common_pb2.Channel.values() and channel != 0,
            f"channels[{i}]",
            "unknown channel",
        )
    before = parse_timeline_token(request.page.page_token, "page.page_token", v)
    v.raise_if_any()
    size = min(request.page.page_size or DEFAULT_PAGE, MAX_PAGE)
    occurred = request.occurred
    query = TimelineQuery(
        customer_id,
        identifier,
        list(request.types),
        list(request.channels),
        to_datetime(occurred.start) if occurred.HasField("start") else None,
        to_datetime(occurred.end) if occurred.HasField("end") else None,
        request.ticket_id,
        before,
        size + 1,
    )
    return query, size


def timeline_response(
    root: uuid.UUID, rows: list[StoredInteraction], size: int, max_bytes: int
) -> interactions_pb2.ListInteractionsResponse:
    """A page of up to `size` rows and `max_bytes` encoded."""
    page: BoundedPage[interactions_pb2.Interaction] = BoundedPage(max_bytes)
    for row in rows[:size]:
        if not page.add(interaction_pb(row)):
            break
    sent = len(page.messages)
    # The last row sent, whether the page ended at its row count or at its
    # byte bound: the next page starts just after it.
    token = timeline_token(rows[sent - 1]) if len(rows) > sent else ""
    return interactions_pb2.ListInteractionsResponse(
        customer_id=str(root),
        interactions=page.messages,
        page=common_pb2.PageResponse(next_page_token=token),
    )


def stream_request(request: interactions_pb2.StreamInteractionsRequest) -> tuple[int, int]:
    """The (xid, seq) position a StreamInteractions request starts after."""
    v = Violations()
    cursor = parse_commit_cursor(request.from_cursor, "from_cursor", v)
    v.raise_if_any()
    return cursor


def required_interaction_id(value: str, path: str) -> uuid.UUID:
    v = Violations()
    interaction_id = uuid_field(value, path, v)
    v.raise_if_any()
    assert interaction_id is not None
    return interaction_id


def timeline_token(row: StoredInteraction) -> str:
    """The token of the page that starts just after `row`."""
    return f"{row.occurred_at.isoformat()}/{row.seq}"


def type_spec_of(given: interactions_pb2.InteractionType) -> InteractionTypeSpec:
    """The type a RegisterInteractionType request describes, checked whole
    (validate_type_spec); INVALID_ARGUMENT naming each field at fault."""
    v = Violations()
    for i, a in enumerate(given.attributes):
        v.check(
            a.type in _ATTRIBUTE_TYPES,
            f"interaction_type.attributes[{i}].type",
            "set a known attribute type",
        )
    for i, f in enumerate(given.required_fields):
        v.check(f in _FIELD_NAMES, f"interaction_type.required_fields[{i}]", "unknown field")
    v.raise_if_any()
    spec = InteractionTypeSpec(
        name=given.name,
        description=given.description,
        attributes=tuple(
            AttributeSpec(
                name=a.name,
                type=_ATTRIBUTE_TYPES[a.type],
                required=a.required,
                description=a.description,
                allowed_values=tuple(a.allowed_values),
                min_value=a.min_value if a.HasField("min_value") else None,
                max_value=a.max_value if a.HasField("max_value") else None,
                unit=a.unit,
            )
            for a in given.attributes
        ),
        required_fields=frozenset(_FIELD_NAMES[f] for f in given.required_fields),
        built_in=False,
    )
    for field_path, problem in validate_type_spec(spec):
        v.add(f"interaction_type.{field_path}", problem)
    v.raise_if_any()
    return spec


def purge_request(request: interactions_pb2.PurgeInteractionsRequest) -> datetime:
    """The purge's horizon, once the request names it and who asked."""
    v = Violations()
    v.check(request.HasField("older_than"), "older_than", "required")
    v.check(bool(request.actor.name), "actor.name", "required: who asked for the purge")
    v.raise_if_any()
    return to_datetime(request.older_than)


def sync_status_pb(
    connected: bool, status: SyncStatus | None
) -> interactions_pb2.GetIdentitySyncStatusResponse:
    response = interactions_pb2.GetIdentitySyncStatusResponse(connected=connected)
    if status is not None:
        response.cursor = status.cursor
        response.applied_at.CopyFrom(timestamp(status.applied_at))
        if status.last_event_at is not None:
            response.last_event_at.CopyFrom(timestamp(status.last_event_at))
    return response


def _customer_ids(values: Any, v: Violations) -> list[uuid.UUID]:
    """The customer ids of a data subject request (at least one)."""
    ids = [uuid_field(c, f"customer_ids[{i}]", v) for i, c in enumerate(values)]
    v.check(bool(values), "customer_ids", "at least one customer id")
    return [i for i in ids if i is not None]


def erase_request(request: privacy_pb2.EraseCustomerDataRequest) -> list[uuid.UUID]:
    v = Violations()
    ids = _customer_ids(request.customer_ids, v)
    v.raise_if_any()
    return ids


def export_request(request: privacy_pb2.ExportCustomerDataRequest) -> tuple[list[uuid.UUID], int]:
    """The customers of an export and the seq its page starts after."""
    v = Violations()
    ids = _customer_ids(request.customer_ids, v)
    after = parse_export_token(request.page_token)
    v.check(after is not None, "page_token", "not a token this service issued")
    v.raise_if_any()
    assert after is not None
    return ids, after


async def export_response(
    rows: AsyncIterator[StoredInteraction], after: int, max_bytes: int
) -> privacy_pb2.ExportCustomerDataResponse:
    """One export page of `rows` (read only as far as the page's byte bound),
    with the token of the next page when the bound stopped it."""
    page: BoundedPage[struct_pb2.Struct] = BoundedPage(max_bytes)
    token = ""
    async for row in rows:
        if not page.add(export_record_pb(row)):
            # Rows go by seq: the next page starts after the last one sent.
            token = export_token(after)
            break
        after = row.seq
    return privacy_pb2.ExportCustomerDataResponse(
        service="interactions",
        sections=[privacy_pb2.ExportedRecords(kind="interactions", records=page.messages)],
        exported_at=timestamp(datetime.now(UTC)),
        next_page_token=token,
    )

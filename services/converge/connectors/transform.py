"""Applies a mapping to the records of a file: each row becomes the requests to
send (an identity upsert and/or an interaction) or a rejection with its reason.

Plain Python and protobuf messages, no network: `converge import --dry-run`
and the tests use it alone. Rows are mapped in file order; a group's state
(its previous row, its row count) lives here between rows, which is what the
mapping's previous-row conditions, `previous` values and `{_seq}` read.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from google.protobuf import json_format, timestamp_pb2

from converge.connectors.mapping import (
    MAX_KEY_LENGTH,
    AmountSpec,
    Condition,
    IdentifierSpec,
    InteractionSpec,
    Mapping,
    Scalar,
    ValueSpec,
    ValueType,
    channel_number,
    parse_template,
)
from converge.connectors.reader import Record, RecordFile
from converge.v1 import common_pb2, identity_pb2, interactions_pb2

MAX_IDENTIFIER_LENGTH = 256
# Bounds of the per-import caches of converted and encoded values: columns
# with a value per row (names, amounts) stop filling them and are converted
# each time, so memory stays flat however large the file.
_CACHED_CELLS = 4096
_CACHED_ENCODINGS = 65536
_NOT_CACHED: Any = object()
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_TRUE = frozenset({"true", "t", "yes", "y", "1"})
_FALSE = frozenset({"false", "f", "no", "n", "0"})
_NANOS = Decimal(1_000_000_000)
_MAX_UNITS = 2**63 - 1

Converted = str | float | bool | datetime


@dataclass(frozen=True)
class MappedRow:
    """A row ready to send: `resolve` for the identity service (when the
    mapping upserts profiles), `ingest` for the interactions service (when it
    records interactions)."""

    line: int
    identifier: common_pb2.Identifier
    resolve: identity_pb2.BulkResolveRequest | None
    # The interactions the row becomes (none when no `when` of the mapping's
    # interactions holds).
    ingests: tuple[interactions_pb2.IngestInteractionsRequest, ...]
    # For each of `resolve`'s identifiers after the first, the index of the
    # mapping's `extra_identifiers` entry it came from (to apply its `on_invalid`).
    extra_specs: tuple[int, ...] = ()
    # `resolve` serialized inside a BulkResolveRequest's `rows`: such pieces
    # joined are a BulkResolveRequest carrying them all (protobuf merges
    # concatenated messages by appending repeated fields), which the importer
    # sends as they are instead of copying every row into a new message.
    resolve_wire: bytes = b""

    @property
    def ingest(self) -> interactions_pb2.IngestInteractionsRequest | None:
        """The row's first interaction (the only one for most mappings)."""
        return self.ingests[0] if self.ingests else None

    def as_dict(self) -> dict[str, Any]:
        """The requests as JSON-ready dicts, for people and `--json`."""
        out: dict[str, Any] = {"line": self.line}
        if self.resolve is not None:
            out["bulk_resolve"] = json_format.MessageToDict(self.resolve)
        if len(self.ingests) == 1:
            out["ingest"] = json_format.MessageToDict(self.ingests[0])
        elif self.ingests:
            out["ingests"] = [json_format.MessageToDict(i) for i in self.ingests]
        return out


@dataclass(frozen=True)
class RejectedRow:
    """A row not sent: `reason` names the column or key and the problem (no
    values, so equal reasons can be counted); `detail` adds the value."""

    line: int
    field: str
    reason: str
    detail: str


@dataclass(frozen=True)
class SkippedRow:
    """A row left out on purpose by the mapping's `skip` conditions."""

    line: int


MapResult = MappedRow | RejectedRow | SkippedRow


class RowError(Exception):
    """Why one row cannot be mapped."""

    def __init__(self, field: str, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason
        self.detail = detail or reason


@dataclass
class _Group:
    seq: int = 0
    previous: dict[str, str | None] | None = None


@dataclass
class _Row:
    record: Record
    values: dict[str, str | None]
    group: _Group
    seq: int

    @property
    def previous(self) -> dict[str, str | None] | None:
        return self.group.previous


@dataclass
class RowMapper:
    """Maps rows one by one, in file order; keeps the per-group state and the
    idempotency keys seen (a key repeated within the file is a rejection,
    never a silent duplicate)."""

    mapping: Mapping
    _groups: dict[tuple[str | None, ...], _Group] = field(default_factory=dict)
    _keys: dict[str, int] = field(default_factory=dict)
    _missing: frozenset[str] = field(init=False)
    # Per interaction of the mapping: its occurred_at and channel, both
    # required whatever the mapping says.
    _required: list[tuple[ValueSpec, ValueSpec]] = field(init=False)
    # Who the identity service records as having made the changes.
    _actor: common_pb2.Actor = field(init=False)
    # Per value path, the values of cells converted so far (see `_value`).
    _cells: dict[str, dict[str | None, object]] = field(default_factory=dict)
    # Profile fields and attributes in wire form, by name and value (see `_resolve`).
    _encoded: dict[tuple[str, type, Converted], bytes] = field(default_factory=dict)
    # The profile's text fields and attributes: (field mask name, value path, spec).
    _text_fields: list[tuple[str, str, ValueSpec]] = field(init=False)
    _attributes: list[tuple[str, str, ValueSpec]] = field(init=False)
    # Per profile value path whose value depends on its cell only: the cell's
    # text -> the field's wire form (None: the field is left out), so a value
    # seen before costs one lookup (see `_piece`).
    _pieces: dict[str, dict[str | None, bytes | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        profile = self.mapping.profile
        self._text_fields = [
            (name, f"profile.{name}", spec)
            for name, spec in (profile.text_fields() if profile is not None else {}).items()
        ]
        self._attributes = [
            (f"attributes.{name}", f"profile.attributes.{name}", spec)
            for name, spec in (profile.attributes if profile is not None else {}).items()
        ]
        self._actor = common_pb2.Actor(
            name=f"converge-import/{self.mapping.source}", reason="file import"
        )
        self._missing = frozenset(v.strip() for v in self.mapping.missing_values) | {""}
        self._required = [
            (
                spec.occurred_at.model_copy(update={"required": True}),
                spec.channel.model_copy(update={"required": True}),
            )
            for _, spec in self.mapping.interaction_specs
        ]

    # --- one row ------------------------------------------------------------------
    def map(self, record: Record) -> MapResult:
        if record.error is not None:
            return RejectedRow(
                record.line, "row", "malformed row", f"line {record.line}: {record.error}"
            )
        missing = self._missing
        values: dict[str, str | None] = {}
        # Each cell stripped, and the mapping's missing values made None.
        for name, value in record.values.items():
            if value is not None:
                value = value.strip()
                if value in missing:
                    value = None
            values[name] = value
        key = tuple(values.get(c) for c in self.mapping.group_by)
        group = self._groups.setdefault(key, _Group())
        group.seq += 1
        row = _Row(record, values, group, group.seq)
        try:
            if any(self._holds(c, row, f"skip[{i}]") for i, c in enumerate(self.mapping.skip)):
                return SkippedRow(record.line)
            for i, rule in enumerate(self.mapping.reject):
                if self._holds(rule.when, row, f"reject[{i}].when"):
                    raise RowError(f"reject[{i}]", rule.reason)
            mapped = self._map_row(row)
        except RowError as e:
            return RejectedRow(record.line, e.field, e.reason, f"line {record.line}: {e.detail}")
        for ingest in mapped.ingests:
            key_text = ingest.idempotency_key
            first = self._keys.setdefault(key_text, record.line)
            if (
                first != record.line
                or sum(i.idempotency_key == key_text for i in mapped.ingests) > 1
            ):
                return RejectedRow(
                    record.line,
                    "interaction.idempotency_key",
                    "idempotency key repeats an earlier row's",
                    f"line {record.line}: key {key_text!r} was already used by line {first}",
                )
        group.previous = values
        return mapped

    def _map_row(self, row: _Row) -> MappedRow:
        mapping = self.mapping
        identifier = self._identifier(mapping.customer.identifier, "customer.identifier", row, True)
        assert identifier is not None
        resolve, extra_specs, wire = (
            self._resolve(identifier, row) if mapping.needs_identity else (None, (), b"")
        )
        ingests = tuple(
            ingest
            for index, (path, spec) in enumerate(mapping.interaction_specs)
            if (ingest := self._ingest(index, path, spec, identifier, row)) is not None
        )
        return MappedRow(row.record.line, identifier, resolve, ingests, extra_specs, wire)

    # --- conditions -----------------------------------------------------------------
    def _holds(self, c: Condition, row: _Row, path: str) -> bool:
        previous = row.previous
        if c.first_in_group is not None and (previous is None) != c.first_in_group:
            return False
        if c.column is not None:
            value = row.values.get(c.column)
            before = previous.get(c.column) if previous is not None else None
            if c.equals is not None and value != c.equals:
                return False
            if c.in_ is not None and value not in c.in_:
                return False
            if c.not_in is not None and value in c.not_in:
                return False
            if c.missing is not None and (value is None) != c.missing:
                return False
            if c.matches is not None and (value is None or not re.search(c.matches, value)):
                return False
            if c.changed is not None and (previous is not None and value != before) != c.changed:
                return False
            for test, sign in (("increased", 1), ("decreased", -1)):
                wanted = getattr(c, test)
                if wanted is None:
                    continue
                moved = False
                if previous is not None and value is not None and before is not None:
                    difference = _parse_number(value, c.column, path) - _parse_number(
                        before, c.column, path
                    )
                    moved = difference * sign > 0
                if moved != wanted:
                    return False
            if c.previous_equals is not None and (previous is None or before != c.previous_equals):
                return False
            if c.previous_in is not None and (previous is None or before not in c.previous_in):
                return False
            if c.previous_not_in is not None and (previous is None or before in c.previous_not_in):
                return False
        if c.all_ is not None and not all(
            self._holds(x, row, f"{path}.all[{i}]") for i, x in enumerate(c.all_)
        ):
            return False
        if c.any_ is not None and not any(
            self._holds(x, row, f"{path}.any[{i}]") for i, x in enumerate(c.any_)
        ):
            return False
        return not (c.not_ is not None and self._holds(c.not_, row, f"{path}.not"))

    # --- values -------------------------------------------------------------------
    def _render(self, template: str, row: _Row, path: str, *, strict: bool) -> str | None:
        """A template with the row's values; None (or, when strict, a RowError)
        when a column it names is missing."""
        parts: list[str] = []
        for is_field, text in parse_template(template).parts:
            if not is_field:
                parts.append(text)
                continue
            if text == "_line":
                parts.append(str(row.record.line))
            elif text == "_row":
                parts.append(str(row.record.row))
            elif text == "_seq":
                parts.append(str(row.seq))
            elif text == "_source":
                parts.append(self.mapping.source)
            else:
                value = row.values.get(text)
                if value is None:
                    if strict:
                        raise RowError(path, f"{text}: missing", f"{text} is missing")
                    return None
                parts.append(value)
        return "".join(parts)

    def _value(self, spec: ValueSpec, path: str, row: _Row) -> Converted | None:
        cells = self._cells.get(path)
        if cells is None:
            pure = spec.when is None and not spec.cases and spec.previous is None
            cells = self._cells[path] = {} if pure and spec.template is None else _NOT_CACHED
        if cells is _NOT_CACHED:
            return self._compute_value(spec, path, row)
        # A value read from one cell (or a constant) depends on that cell
        # only, and exports repeat their values a lot: each is converted once.
        raw = row.values.get(spec.column) if spec.column is not None else None
        found = cells.get(raw, _NOT_CACHED)
        if found is _NOT_CACHED:
            found = self._compute_value(spec, path, row)  # (a RowError is not kept)
            if len(cells) < _CACHED_CELLS:
                cells[raw] = found
        return found  # type: ignore[return-value]

    def _compute_value(self, spec: ValueSpec, path: str, row: _Row) -> Converted | None:
        raw: Scalar | None = None
        origin = path
        if spec.when is not None and not self._holds(spec.when, row, f"{path}.when"):
            if spec.default is not None:
                return _convert(spec.default, spec, path, path)
            if spec.required:
                raise RowError(path, f"{path}: missing (its condition does not hold)")
            return None
        for case in spec.cases:
            if self._holds(case.when, row, f"{path}.cases"):
                raw = case.value
                break
        else:
            from_file = True
            if spec.column is not None:
                raw, origin = row.values.get(spec.column), spec.column
            elif spec.previous is not None:
                previous = row.previous
                raw = previous.get(spec.previous) if previous is not None else None
                origin = f"previous {spec.previous}"
            elif spec.template is not None:
                raw = self._render(spec.template, row, path, strict=False)
            else:
                raw, from_file = spec.value, False
            if raw is not None and from_file and spec.map is not None:
                text = str(raw)
                if text in spec.map:
                    raw = spec.map[text]
                elif spec.unmapped == "missing":
                    raw = None
                elif spec.unmapped == "reject":
                    raise RowError(
                        path,
                        f"{origin}: value not in the map of {path}",
                        f"{origin} = {text!r}: not in the map of {path}",
                    )
        if raw is None:
            if spec.default is not None:
                raw = spec.default
            elif spec.required:
                raise RowError(
                    path, f"{origin}: missing", f"{origin} is missing ({path} is required)"
                )
            else:
                return None
        return _convert(raw, spec, origin, path)

    def _identifier(
        self, spec: IdentifierSpec, path: str, row: _Row, required: bool
    ) -> common_pb2.Identifier | None:
        if spec.column is not None:
            value, origin = row.values.get(spec.column), spec.column
        else:
            assert spec.template is not None
            value, origin = self._render(spec.template, row, path, strict=False), spec.template
        if value is None:
            if required:
                raise RowError(
                    path, f"{origin}: missing (the customer identifier)", f"{origin} is missing"
                )
            return None
        if len(value) > MAX_IDENTIFIER_LENGTH:
            raise RowError(
                path, f"{origin}: identifier longer than {MAX_IDENTIFIER_LENGTH} characters"
            )
        return common_pb2.Identifier(
            type=common_pb2.IdentifierType.ValueType(spec.type_number),
            value=value,
            source=spec.source,
        )

    def _amount(self, spec: AmountSpec, path: str, row: _Row) -> common_pb2.Money | None:
        text = row.values.get(spec.column)
        if text is None:
            if spec.required:
                raise RowError(
                    path,
                    f"{spec.column}: missing",
                    f"{spec.column} is missing ({path} is required)",
                )
            return None
        if spec.currency is not None:
            currency = spec.currency
        else:
            assert spec.currency_column is not None
            found = row.values.get(spec.currency_column)
            if found is None or not re.fullmatch(r"[A-Za-z]{3}", found):
                raise RowError(
                    path,
                    f"{spec.currency_column}: not a currency code",
                    f"{spec.currency_column} = {found!r}: not an ISO 4217 currency code",
                )
            currency = found.upper()
        try:
            amount = Decimal(text).quantize(Decimal("1e-9"))
        except InvalidOperation:
            raise RowError(
                path, f"{spec.column}: not an amount", f"{spec.column} = {text!r}: not an amount"
            ) from None
        if not amount.is_finite() or abs(amount) > _MAX_UNITS:
            raise RowError(path, f"{spec.column}: amount out of range", f"{spec.column} = {text!r}")
        units = int(amount)
        nanos = int((amount - units) * _NANOS)
        return common_pb2.Money(currency_code=currency, units=units, nanos=nanos)

    # --- requests -----------------------------------------------------------------
    def _resolve(
        self, identifier: common_pb2.Identifier, row: _Row
    ) -> tuple[identity_pb2.BulkResolveRequest, tuple[int, ...], bytes]:
        """The row's BulkResolve item, which `extra_identifiers` entry each
        of its identifiers after the first came from, and the item's wire
        form inside a BulkResolveRequest (`MappedRow.resolve_wire`)."""
        mapping = self.mapping
        identifiers = [identifier]
        extra_specs: list[int] = []
        for i, extra in enumerate(mapping.customer.extra_identifiers):
            found = self._identifier(extra, f"customer.extra_identifiers[{i}]", row, False)
            if found is not None and found not in identifiers:
                identifiers.append(found)
                extra_specs.append(i)
        # Built in place, field by field, inside the envelope it is sent in:
        # protobuf copies a message given to a constructor or CopyFrom, which
        # cost more than the mapping itself.
        envelope = identity_pb2.BulkResolveRequest()
        request = envelope.rows.add(row_ref=str(row.record.line))
        resolve = request.resolve
        resolve.identifiers.extend(identifiers)
        profile = resolve.profile
        mask: list[str] = []
        # The text fields and attributes as their wire form, cached by value
        # and parsed at once: setting map entries one by one costs more than
        # everything else the row needs.
        encoded: list[bytes] = []
        spec = mapping.profile
        if spec is not None:
            for name, value_path, value_spec in self._text_fields:
                piece = self._piece(name, value_path, value_spec, row, text=True)
                if piece is not None:
                    encoded.append(piece)
                    mask.append(name)
            if spec.signup_date is not None:
                when = self._value(spec.signup_date, "profile.signup_date", row)
                if isinstance(when, datetime):
                    profile.signup_date.FromDatetime(when)
                    mask.append("signup_date")
            if spec.lifetime_value is not None:
                money = self._amount(spec.lifetime_value, "profile.lifetime_value", row)
                if money is not None:
                    profile.lifetime_value.CopyFrom(money)
                    mask.append("lifetime_value")
            for name, value_path, value_spec in self._attributes:
                piece = self._piece(name, value_path, value_spec, row, text=False)
                if piece is not None:
                    encoded.append(piece)
                    mask.append(name)
            profile.MergeFromString(b"".join(encoded))
        resolve.lookup_only = mapping.customer.lookup_only
        resolve.actor.CopyFrom(self._actor)
        # Same identifiers and values, same key: a re-run replays the first
        # result; a changed row gets a new key and its values are upserted.
        # When the values became true is part of the row: the same values
        # at another time are another row (A, then B, then A again).
        since = None
        if spec is not None and spec.effective_at is not None:
            when = self._value(spec.effective_at, "profile.effective_at", row)
            if isinstance(when, datetime):
                since = _timestamp(when)
        content = resolve.SerializeToString(deterministic=True) + "\0".join(mask).encode()
        if since is not None:
            content += since.SerializeToString(deterministic=True)
        digest = hashlib.sha256(content).hexdigest()
        key = f"{mapping.source}:{identifier.value}:{digest[:16]}"
        if len(key) > MAX_KEY_LENGTH:
            key = f"{mapping.source}:{digest[:40]}"
        resolve.idempotency_key = key
        request.update_mask.paths.extend(mask)
        if since is not None:
            request.profile_effective_at.CopyFrom(since)
        return request, tuple(extra_specs), envelope.SerializeToString()

    def _piece(
        self, name: str, value_path: str, spec: ValueSpec, row: _Row, *, text: bool
    ) -> bytes | None:
        """The wire form of a profile field (`_encode` of its `_value`, as
        text for a text field); None when the value is missing. A value read
        from one cell is looked up by the cell's text, as `_value` caches it."""
        cells = self._pieces.get(value_path)
        if cells is None and value_path not in self._pieces:
            pure = spec.when is None and not spec.cases and spec.previous is None
            if pure and spec.template is None:
                cells = self._pieces[value_path] = {}
        raw = None
        if cells is not None:
            raw = row.values.get(spec.column) if spec.column is not None else None
            found = cells.get(raw, _NOT_CACHED)
            if found is not _NOT_CACHED:
                return found  # type: ignore[no-any-return]
        value = self._value(spec, value_path, row)  # (a RowError is not kept)
        piece = None if value is None else self._encode(name, str(value) if text else value)
        if cells is not None and len(cells) < _CACHED_CELLS:
            cells[raw] = piece
        return piece

    def _encode(self, path: str, value: Converted) -> bytes:
        """A Profile holding only the field at `path` (a text field or
        "attributes.<name>") set to `value`, serialized; such pieces
        concatenated are the serialized Profile holding them all."""
        key = (path, type(value), value)
        found = self._encoded.get(key)
        if found is None:
            if path.startswith("attributes."):
                one = identity_pb2.Profile()
                _set_attribute(one.attributes[path.removeprefix("attributes.")], value)
            else:
                one = identity_pb2.Profile()
                setattr(one, path, str(value))
            found = one.SerializeToString()
            if len(self._encoded) < _CACHED_ENCODINGS:
                self._encoded[key] = found
        return found

    def _ingest(
        self,
        index: int,
        path: str,
        spec: InteractionSpec,
        identifier: common_pb2.Identifier,
        row: _Row,
    ) -> interactions_pb2.IngestInteractionsRequest | None:
        """The interaction `spec` makes of the row; None when its `when` does not hold."""
        if spec.when is not None and not self._holds(spec.when, row, f"{path}.when"):
            return None
        occurred_at, channel_spec = self._required[index]
        kind = self._value(spec.type, f"{path}.type", row)
        if kind is None:
            raise RowError(f"{path}.type", "no interaction type (no case matched and no default)")
        kind = str(kind)
        if not _TYPE_NAME.match(kind) or len(kind) > 64:
            raise RowError(
                f"{path}.type",
                "not an interaction type name",
                f"{kind!r} is not an interaction type name",
            )
        when = self._value(occurred_at, f"{path}.occurred_at", row)
        assert isinstance(when, datetime)
        channel_name = self._value(channel_spec, f"{path}.channel", row)
        channel = channel_number(str(channel_name))
        if channel is None:
            raise RowError(
                f"{path}.channel", "unknown channel", f"{channel_name!r} is not a channel"
            )
        interaction = interactions_pb2.InteractionInput(
            customer=common_pb2.CustomerRef(identifier=identifier),
            occurred_at=_timestamp(when),
            channel=common_pb2.Channel.ValueType(channel),
            type=kind,
            source=self.mapping.source,
        )
        for name in ("ticket_id", "product_id"):
            value_spec = getattr(spec, name)
            if value_spec is not None:
                text = self._value(value_spec, f"{path}.{name}", row)
                if text is not None:
                    setattr(interaction, name, str(text))
        if spec.amount is not None:
            money = self._amount(spec.amount, f"{path}.amount", row)
            if money is not None:
                interaction.amount.CopyFrom(money)
        if spec.sentiment is not None:
            sentiment = self._value(spec.sentiment, f"{path}.sentiment", row)
            if isinstance(sentiment, float):
                if not -1.0 <= sentiment <= 1.0:
                    raise RowError(
                        f"{path}.sentiment", "sentiment outside -1..1", f"sentiment {sentiment}"
                    )
                interaction.sentiment = sentiment
        for name, attribute in spec.attributes.items():
            if attribute.for_types is not None and kind not in attribute.for_types:
                continue
            value = self._value(attribute, f"{path}.attributes.{name}", row)
            if value is not None:
                interaction.attributes[name].CopyFrom(_attribute(value))
        key = self._render(spec.idempotency_key, row, f"{path}.idempotency_key", strict=True)
        assert key is not None
        if len(key) > MAX_KEY_LENGTH:
            raise RowError(
                f"{path}.idempotency_key",
                f"idempotency key longer than {MAX_KEY_LENGTH} characters",
                f"key {key[:40]!r}... is {len(key)} characters",
            )
        return interactions_pb2.IngestInteractionsRequest(
            row_ref=str(row.record.line),
            interaction=interaction,
            idempotency_key=key,
            lookup_only=self.mapping.customer.lookup_only,
        )


# --- conversions ------------------------------------------------------------------
def _parse_number(raw: str | int | float, origin: str, path: str) -> float:
    """A finite number, or a RowError naming the column and the value."""
    try:
        number = float(raw)
    except ValueError:
        raise RowError(
            path, f"{origin}: not a number", f"{origin} = {raw!r}: not a number"
        ) from None
    if not math.isfinite(number):
        raise RowError(path, f"{origin}: not a finite number", f"{origin} = {raw!r}")
    return number


def _convert(raw: Scalar, spec: ValueSpec, origin: str, path: str) -> Converted:
    kind: ValueType = spec.value_type
    if kind == "string":
        if isinstance(raw, bool):
            return "true" if raw else "false"
        return str(raw)
    if kind == "number":
        if isinstance(raw, bool):
            raise RowError(path, f"{origin}: not a number", f"{origin} = {raw!r}: not a number")
        if isinstance(raw, str) and (spec.thousands or spec.decimal != "."):
            raw = raw.strip()
            for mark in spec.thousands:
                raw = raw.replace(mark, "")
            raw = raw.replace(spec.decimal, ".")
        number = _parse_number(raw, origin, path)
        if spec.scale is not None:
            number *= spec.scale
        if spec.clamp is not None:
            low, high = spec.clamp
            number = max(number, low) if low is not None else number
            number = min(number, high) if high is not None else number
        return number
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise RowError(
            path,
            f"{origin}: not a yes/no value",
            f"{origin} = {raw!r}: not true/false, yes/no or 1/0",
        )
    return _parse_time(raw, spec, origin, path)


def _parse_time(raw: Scalar, spec: ValueSpec, origin: str, path: str) -> datetime:
    text = str(raw).strip()
    for fmt in spec.formats:  # the first format that reads the text wins
        try:
            return _time_from_text(text, fmt, spec.timezone)
        except (ValueError, OverflowError, OSError):
            continue
    described = " or ".join(spec.formats)
    raise RowError(
        path,
        f"{origin}: not a time in format {described}",
        f"{origin} = {text!r}: not a time in format {described}",
    )


@functools.lru_cache(maxsize=8192)
def _time_from_text(text: str, fmt: str, timezone: str) -> datetime:
    """Exports repeat their times a lot (and strptime is slow): cached."""
    if fmt == "unix":
        when = datetime.fromtimestamp(float(text), UTC)
    elif fmt == "iso":
        when = datetime.fromisoformat(text)
    else:
        when = datetime.strptime(text, fmt)
    if when.tzinfo is None:
        when = when.replace(tzinfo=ZoneInfo(timezone))
    return when.astimezone(UTC)


def _timestamp(when: datetime) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(when)
    return ts


def _set_attribute(target: common_pb2.AttributeValue, value: Converted) -> None:
    """Sets `value` into an attribute in place (what `_attribute` builds, without a copy)."""
    if isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, float):
        target.number_value = value
    elif isinstance(value, datetime):
        target.timestamp_value.FromDatetime(value)
    else:
        target.string_value = value


def _attribute(value: Converted) -> common_pb2.AttributeValue:
    if isinstance(value, bool):
        return common_pb2.AttributeValue(bool_value=value)
    if isinstance(value, float):
        return common_pb2.AttributeValue(number_value=value)
    if isinstance(value, datetime):
        return common_pb2.AttributeValue(timestamp_value=_timestamp(value))
    return common_pb2.AttributeValue(string_value=value)


# --- whole files --------------------------------------------------------------------
def map_records(
    records: Iterator[Record], mapping: Mapping, *, limit: int | None = None
) -> Iterator[tuple[Record, MapResult]]:
    """Maps records in order, stopping after `limit` rows when given."""
    mapper = RowMapper(mapping)
    for count, record in enumerate(records, start=1):
        if limit is not None and count > limit:
            return
        yield record, mapper.map(record)


def map_file(
    path: Path, mapping: Mapping, *, origin: str = "mapping", limit: int | None = None
) -> Iterator[MapResult]:
    """Reads and maps a whole file. Raises MappingError before the first row
    when the mapping names columns the file lacks, FileError when the file
    cannot be read."""
    with RecordFile(path, mapping.file) as source:
        if source.columns is not None:
            mapping.check_columns(source.columns, origin)
        for _, result in map_records(source.records(), mapping, limit=limit):
            yield result

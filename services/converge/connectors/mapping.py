"""The mapping file format: how the rows of an exported file become customers
and interactions, declared in YAML and parsed into pydantic models.

A mapping names the file format, the `source` system, the customer
identifier, and then an `interaction` (one per row) and/or a `profile`
(an upsert of the customer's profile through the identity service). Every
value is described the same way (a `ValueSpec`): where it comes from
(`column`, `previous` row's column, constant `value` or `template`), how raw
text is translated (`map`, with `unmapped` saying what happens to values the
map lacks), its `type` and, for times, its `format` and `timezone`. Ordered
`cases` (first match wins) compute a value from conditions, including
conditions on the previous row of the same group (`group_by`), which is how
"the first row of an incident is ticket.opened" or "reassignment_count
increased" are said without code. The shipped files in `mappings/` explain
every key in their comments.

Numbers can be read with a decimal comma and grouping marks, scaled and
clamped; a time may be tried against several formats; `when` on a value or
an interaction makes it conditional; `interactions` (a list) makes several
interactions of one row.

Errors name the line and the key at fault:
`line 12, interaction.attributes.priority.map: ...`.
Unknown keys are errors too, so a typo never silently does nothing.
"""

from __future__ import annotations

import codecs
import functools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from converge.runtime import config_files
from converge.runtime.config_files import ConfigFileError
from converge.v1 import common_pb2

# Placeholders every template may use besides the file's columns.
SPECIAL_PLACEHOLDERS = {
    "_line": "the row's line number in the file (1 is the first line)",
    "_row": "the row's number among the data rows (1 is the first)",
    "_seq": "the row's position within its group (`group_by`), 1 for the group's first row",
    "_source": "the mapping's `source`",
}
MAX_KEY_LENGTH = 128
_SOURCE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_TYPE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
_PLACEHOLDER_NAME = re.compile(r"^[^{}]+$")
_UNION_TAGS = frozenset({"str", "int", "float", "bool"})
_KEY_PREFIX = re.compile(r"^([A-Za-z_][\w.]*(?:\[[^\]]*\])*): (.*)$", re.DOTALL)

ValueType = Literal["string", "number", "bool", "timestamp"]
Scalar = str | int | float | bool


class MappingError(ConfigFileError):
    """A mapping that cannot be used; each problem names the key at fault
    (and, for the file's own keys, its line)."""


def _text(value: Any) -> Any:
    """YAML scalars compared with or looked up by file text become text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return value


Text = Annotated[str, BeforeValidator(_text)]


# --- templates ----------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and `{placeholder}`s; `{{` and `}}` are braces."""

    parts: tuple[tuple[bool, str], ...]  # (is_placeholder, text)

    @property
    def placeholders(self) -> list[str]:
        return [text for is_field, text in self.parts if is_field]

    @property
    def columns(self) -> list[str]:
        return [p for p in self.placeholders if p not in SPECIAL_PLACEHOLDERS]


@functools.lru_cache(maxsize=256)
def parse_template(text: str) -> Template:
    """Parses a template, or raises ValueError saying what is wrong with it."""
    parts: list[tuple[bool, str]] = []
    literal: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if text.startswith("{{", i) or text.startswith("}}", i):
            literal.append(char)
            i += 2
            continue
        if char == "}":
            raise ValueError(f"unmatched '}}' at position {i} (write '}}}}' for a brace)")
        if char == "{":
            end = text.find("}", i)
            name = text[i + 1 : end] if end != -1 else ""
            if end == -1 or not _PLACEHOLDER_NAME.match(name):
                raise ValueError(f"bad placeholder at position {i}: write {{column}}")
            if literal:
                parts.append((False, "".join(literal)))
                literal = []
            parts.append((True, name))
            i = end + 1
            continue
        literal.append(char)
        i += 1
    if literal:
        parts.append((False, "".join(literal)))
    return Template(tuple(parts))


def _check_template(text: str) -> Template:
    template = parse_template(text)
    for name in template.placeholders:
        if name.startswith("_") and name not in SPECIAL_PLACEHOLDERS:
            known = ", ".join("{" + s + "}" for s in SPECIAL_PLACEHOLDERS)
            raise ValueError(f"unknown placeholder {{{name}}} (special ones: {known})")
    return template


# --- names checked against the generated protobuf enums -------------------------
@functools.lru_cache(maxsize=64)
def channel_number(name: str) -> int | None:
    """The wire number of a channel named "PHONE", "phone" or "CHANNEL_PHONE"."""
    key = name.strip().upper()
    key = key if key.startswith("CHANNEL_") else f"CHANNEL_{key}"
    if key == "CHANNEL_UNSPECIFIED" or key not in common_pb2.Channel.DESCRIPTOR.values_by_name:
        return None
    return int(common_pb2.Channel.Value(key))


def channel_names() -> list[str]:
    return [
        k.removeprefix("CHANNEL_")
        for k in common_pb2.Channel.DESCRIPTOR.values_by_name
        if k != "CHANNEL_UNSPECIFIED"
    ]


@functools.lru_cache(maxsize=64)
def identifier_type_number(name: str) -> int | None:
    """The wire number of an identifier type named "EMAIL" or "IDENTIFIER_TYPE_EMAIL"."""
    key = name.strip().upper()
    key = key if key.startswith("IDENTIFIER_TYPE_") else f"IDENTIFIER_TYPE_{key}"
    if (
        key == "IDENTIFIER_TYPE_UNSPECIFIED"
        or key not in common_pb2.IdentifierType.DESCRIPTOR.values_by_name
    ):
        return None
    return int(common_pb2.IdentifierType.Value(key))


def identifier_type_names() -> list[str]:
    return [
        k.removeprefix("IDENTIFIER_TYPE_")
        for k in common_pb2.IdentifierType.DESCRIPTOR.values_by_name
        if k != "IDENTIFIER_TYPE_UNSPECIFIED"
    ]


# --- the models -------------------------------------------------------------------
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_GROUP_TESTS = (
    "changed",
    "increased",
    "decreased",
    "previous_equals",
    "previous_in",
    "previous_not_in",
)
_COLUMN_TESTS = ("equals", "in_", "not_in", "missing", "matches", *_GROUP_TESTS)


class Condition(_Model):
    """A test on a row; every test given must hold. `true` asks for the test to
    hold, `false` for it not to. Tests on the previous row are false on the
    first row of a group."""

    column: str | None = None
    equals: Text | None = None
    in_: list[Text] | None = Field(default=None, alias="in")
    not_in: list[Text] | None = None
    missing: bool | None = None
    matches: str | None = None
    changed: bool | None = None
    increased: bool | None = None
    decreased: bool | None = None
    previous_equals: Text | None = None
    previous_in: list[Text] | None = None
    previous_not_in: list[Text] | None = None
    first_in_group: bool | None = None
    all_: list[Condition] | None = Field(default=None, alias="all")
    any_: list[Condition] | None = Field(default=None, alias="any")
    not_: Condition | None = Field(default=None, alias="not")

    @model_validator(mode="after")
    def _check(self) -> Condition:
        column_tests = [t for t in _COLUMN_TESTS if getattr(self, t) is not None]
        if column_tests and self.column is None:
            names = ", ".join(t.rstrip("_") for t in column_tests)
            raise ValueError(f"column: required by {names}")
        if self.column is not None and not column_tests:
            raise ValueError(
                "column: say what to test it for (equals, in, not_in, missing, matches, "
                "changed, increased, decreased, previous_equals, previous_in, previous_not_in)"
            )
        if not column_tests and all(
            v is None for v in (self.first_in_group, self.all_, self.any_, self.not_)
        ):
            raise ValueError("an empty condition: give at least one test")
        if self.matches is not None:
            try:
                re.compile(self.matches)
            except re.error as e:
                raise ValueError(f"matches: not a regular expression ({e})") from None
        return self

    def uses_group(self) -> bool:
        return (
            self.first_in_group is not None
            or any(getattr(self, t) is not None for t in _GROUP_TESTS)
            or any(c.uses_group() for c in (*(self.all_ or ()), *(self.any_ or ())))
            or (self.not_ is not None and self.not_.uses_group())
        )

    def columns(self, path: str) -> Iterator[tuple[str, str]]:
        if self.column is not None:
            yield f"{path}.column", self.column
        for key, items in (("all", self.all_), ("any", self.any_)):
            for i, c in enumerate(items or ()):
                yield from c.columns(f"{path}.{key}[{i}]")
        if self.not_ is not None:
            yield from self.not_.columns(f"{path}.not")


class Case(_Model):
    """One case of a value: when `when` holds (first match wins), the value is `value`."""

    when: Condition
    value: Scalar | None


class ValueSpec(_Model):
    """Where a value comes from and how raw text becomes it."""

    # The type a value of this field has when `type` is not given.
    natural_type: ClassVar[ValueType] = "string"

    column: str | None = None
    previous: str | None = None
    value: Scalar | None = None
    template: str | None = None
    cases: list[Case] = []
    map: dict[Text, Scalar | None] | None = None
    unmapped: Literal["keep", "missing", "reject"] = "reject"
    type: ValueType | None = None
    # Timestamps: "iso", "unix" or a strptime format; a list tries each in turn
    # (exports mix "2016-02-29 10:00" with "29/02/2016").
    format: str | list[str] | None = None
    timezone: str = "UTC"
    # Numbers: the decimal separator and the grouping characters to remove
    # ("1.234,5" is `decimal: ","` with `thousands: "."`), a factor applied
    # after parsing (cents to units: 0.01) and bounds the result is held to.
    decimal: Literal[".", ","] = "."
    thousands: str = ""
    scale: float | None = None
    clamp: tuple[float | None, float | None] | None = None
    # Read the value only when this holds; otherwise it is missing (then
    # `default` and `required` apply): "the amount, when the status is paid".
    when: Condition | None = None
    default: Scalar | None = None
    required: bool = False

    @model_validator(mode="after")
    def _check(self) -> ValueSpec:
        sources = [
            k for k in ("column", "previous", "value", "template") if getattr(self, k) is not None
        ]
        if len(sources) > 1:
            raise ValueError(
                f"give only one of column, previous, value, template (got {', '.join(sources)})"
            )
        if not sources and not self.cases and self.default is None:
            raise ValueError("give one of column, previous, value, template, cases or default")
        if self.map is not None and not ({"column", "previous", "template"} & set(sources)):
            raise ValueError(
                "map: translates values read from a column; give column, previous or template"
            )
        if (
            self.type is not None
            and type(self).natural_type != "string"
            and self.type != self.natural_type
        ):
            raise ValueError(f"type: must be {self.natural_type} here (got {self.type})")
        if self.template is not None:
            try:
                _check_template(self.template)
            except ValueError as e:
                raise ValueError(f"template: {e}") from None
        if self.format is not None and self.value_type != "timestamp":
            raise ValueError("format: only for timestamps (type: timestamp)")
        for fmt in self.formats:
            if fmt not in ("iso", "unix") and "%" not in fmt:
                raise ValueError(
                    'format: "iso", "unix" or a strptime format such as "%d/%m/%Y %H:%M"'
                )
        if isinstance(self.format, list) and not self.format:
            raise ValueError("format: give at least one format")
        number_options = [
            k
            for k, unset in (("decimal", "."), ("thousands", ""), ("scale", None), ("clamp", None))
            if getattr(self, k) != unset
        ]
        if number_options and self.value_type != "number":
            raise ValueError(f"{number_options[0]}: only for numbers (type: number)")
        if self.decimal in self.thousands:
            raise ValueError("thousands: must not contain the decimal separator")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale != 0):
            raise ValueError("scale: a finite number other than 0")
        if self.clamp is not None:
            low, high = self.clamp
            if low is not None and high is not None and low > high:
                raise ValueError("clamp: [low, high] with low <= high")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"timezone: unknown time zone {self.timezone!r}") from None
        for label, constant in self.constants():
            problem = self._check_constant(constant)
            if problem:
                raise ValueError(f"{label}: {problem}")
        return self

    @property
    def value_type(self) -> ValueType:
        return self.type or self.natural_type

    @property
    def formats(self) -> tuple[str, ...]:
        """The time formats to try, in order."""
        if self.format is None:
            return ("iso",)
        return (self.format,) if isinstance(self.format, str) else tuple(self.format)

    def constants(self) -> Iterator[tuple[str, Scalar]]:
        """Values written in the mapping itself, with the key they are under."""
        if self.value is not None:
            yield "value", self.value
        if self.default is not None:
            yield "default", self.default
        for i, case in enumerate(self.cases):
            if case.value is not None:
                yield f"cases[{i}].value", case.value
        for key, mapped in (self.map or {}).items():
            if mapped is not None:
                yield f"map[{key!r}]", mapped

    def _check_constant(self, constant: Scalar) -> str | None:
        return None

    def columns(self, path: str) -> Iterator[tuple[str, str]]:
        if self.column is not None:
            yield f"{path}.column", self.column
        if self.previous is not None:
            yield f"{path}.previous", self.previous
        if self.template is not None:
            for name in parse_template(self.template).columns:
                yield f"{path}.template", name
        for i, case in enumerate(self.cases):
            yield from case.when.columns(f"{path}.cases[{i}].when")
        if self.when is not None:
            yield from self.when.columns(f"{path}.when")

    def conditions(self, path: str) -> Iterator[tuple[str, Condition]]:
        for i, case in enumerate(self.cases):
            yield f"{path}.cases[{i}].when", case.when
        if self.when is not None:
            yield f"{path}.when", self.when

    def uses_group(self) -> bool:
        return self.previous is not None or (
            self.template is not None and "_seq" in parse_template(self.template).placeholders
        )


class TextSpec(ValueSpec):
    """A text value (profile fields, ticket and product ids)."""

    @model_validator(mode="after")
    def _text_only(self) -> TextSpec:
        if self.type not in (None, "string"):
            raise ValueError(f"type: must be string here (got {self.type})")
        return self


class TimestampSpec(ValueSpec):
    natural_type: ClassVar[ValueType] = "timestamp"


class NumberSpec(ValueSpec):
    natural_type: ClassVar[ValueType] = "number"


class ChannelSpec(TextSpec):
    """A channel name: WEB, MOBILE, EMAIL, CHAT, PHONE, SOCIAL, IN_STORE, SERVICE_DESK, ..."""

    def _check_constant(self, constant: Scalar) -> str | None:
        if isinstance(constant, str) and channel_number(constant) is not None:
            return None
        return f"unknown channel {constant!r} (one of {', '.join(channel_names())})"


class TypeNameSpec(TextSpec):
    """An interaction type name such as "ticket.opened"."""

    def _check_constant(self, constant: Scalar) -> str | None:
        if isinstance(constant, str) and _TYPE_NAME.match(constant) and len(constant) <= 64:
            return None
        return f"{constant!r} is not an interaction type name (lower-case dot-separated words)"


class AttributeSpec(ValueSpec):
    """An interaction attribute; `for_types` limits it to some interaction types
    (the service rejects attributes a type does not declare)."""

    for_types: list[str] | None = None

    @model_validator(mode="after")
    def _check_types(self) -> AttributeSpec:
        for i, name in enumerate(self.for_types or ()):
            if not _TYPE_NAME.match(name):
                raise ValueError(f"for_types[{i}]: {name!r} is not an interaction type name")
        return self


class IdentifierSpec(_Model):
    """A customer identifier read from a column or rendered from several."""

    type: str
    source: str = ""
    column: str | None = None
    template: str | None = None

    @model_validator(mode="after")
    def _check(self) -> IdentifierSpec:
        number = identifier_type_number(self.type)
        if number is None:
            raise ValueError(
                f"type: unknown identifier type {self.type!r} (one of {', '.join(identifier_type_names())})"
            )
        if (self.column is None) == (self.template is None):
            raise ValueError("give exactly one of column, template")
        if self.template is not None:
            try:
                template = _check_template(self.template)
            except ValueError as e:
                raise ValueError(f"template: {e}") from None
            if not template.columns:
                raise ValueError("template: name at least one column")
        needs_source = number in (
            common_pb2.IDENTIFIER_TYPE_EXTERNAL_ID,
            common_pb2.IDENTIFIER_TYPE_SOCIAL_HANDLE,
        )
        if needs_source and not _SOURCE.match(self.source):
            raise ValueError("source: required for this type: 1-64 of a-z, 0-9, '_', '.', '-'")
        return self

    @property
    def type_number(self) -> int:
        number = identifier_type_number(self.type)
        assert number is not None
        return number

    def columns(self, path: str) -> Iterator[tuple[str, str]]:
        if self.column is not None:
            yield f"{path}.column", self.column
        if self.template is not None:
            for name in parse_template(self.template).columns:
                yield f"{path}.template", name


class ExtraIdentifierSpec(IdentifierSpec):
    """Another identifier of the row's customer, attached to it by the
    identity service. `on_invalid` says what a value identity refuses (a
    malformed phone number) does: `drop` sends the row without it and counts
    a warning; `reject` rejects the whole row, its profile and interactions."""

    on_invalid: Literal["drop", "reject"] = "drop"


class CustomerSpec(_Model):
    """Who each row is about."""

    identifier: IdentifierSpec
    extra_identifiers: list[ExtraIdentifierSpec] = []
    lookup_only: bool = False

    def columns(self, path: str) -> Iterator[tuple[str, str]]:
        yield from self.identifier.columns(f"{path}.identifier")
        for i, extra in enumerate(self.extra_identifiers):
            yield from extra.columns(f"{path}.extra_identifiers[{i}]")


class AmountSpec(_Model):
    """An amount of money: a decimal number column and its currency."""

    column: str
    currency: str | None = None
    currency_column: str | None = None
    required: bool = False

    @model_validator(mode="after")
    def _check(self) -> AmountSpec:
        if (self.currency is None) == (self.currency_column is None):
            raise ValueError("give exactly one of currency, currency_column")
        if self.currency is not None and not _CURRENCY.match(self.currency):
            raise ValueError(f"currency: {self.currency!r} is not an ISO 4217 code such as USD")
        return self

    def columns(self, path: str) -> Iterator[tuple[str, str]]:
        yield f"{path}.column", self.column
        if self.currency_column is not None:
            yield f"{path}.currency_column", self.currency_column


def _check_attribute_names(names: Iterator[str] | list[str]) -> None:
    for name in names:
        if not _ATTRIBUTE_NAME.match(name):
            raise ValueError(f"attributes.{name}: names must match [a-z][a-z0-9_]{{0,62}}")


class ProfileSpec(_Model):
    """Profile fields upserted through the identity service (`BulkResolve`)."""

    display_name: TextSpec | None = None
    segment: TextSpec | None = None
    plan: TextSpec | None = None
    region: TextSpec | None = None
    owner_team: TextSpec | None = None
    signup_date: TimestampSpec | None = None
    lifetime_value: AmountSpec | None = None
    attributes: dict[str, ValueSpec] = {}
    # When the row's values became true (a snapshot's date, a change log's
    # time): history imported today is then read as it was. Without it they
    # take effect at import time, and the import's summary says so.
    effective_at: TimestampSpec | None = None

    @model_validator(mode="after")
    def _check(self) -> ProfileSpec:
        _check_attribute_names(list(self.attributes))
        if (
            not self.text_fields()
            and self.signup_date is None
            and self.lifetime_value is None
            and not self.attributes
        ):
            raise ValueError("name at least one profile field or attribute")
        return self

    def text_fields(self) -> dict[str, TextSpec]:
        fields = {
            "display_name": self.display_name,
            "segment": self.segment,
            "plan": self.plan,
            "region": self.region,
            "owner_team": self.owner_team,
        }
        return {k: v for k, v in fields.items() if v is not None}

    def values(self) -> Iterator[tuple[str, ValueSpec]]:
        yield from self.text_fields().items()
        if self.signup_date is not None:
            yield "signup_date", self.signup_date
        for name, spec in self.attributes.items():
            yield f"attributes.{name}", spec
        if self.effective_at is not None:
            yield "effective_at", self.effective_at


class InteractionSpec(_Model):
    """An interaction a row becomes (when `when` holds, if given)."""

    when: Condition | None = None
    type: TypeNameSpec
    occurred_at: TimestampSpec
    channel: ChannelSpec
    ticket_id: TextSpec | None = None
    product_id: TextSpec | None = None
    amount: AmountSpec | None = None
    sentiment: NumberSpec | None = None
    attributes: dict[str, AttributeSpec] = {}
    idempotency_key: str

    @model_validator(mode="after")
    def _check(self) -> InteractionSpec:
        _check_attribute_names(list(self.attributes))
        try:
            template = _check_template(self.idempotency_key)
        except ValueError as e:
            raise ValueError(f"idempotency_key: {e}") from None
        if not template.placeholders:
            raise ValueError(
                "idempotency_key: must name columns (a constant key would store one row)"
            )
        return self

    def values(self) -> Iterator[tuple[str, ValueSpec]]:
        yield "type", self.type
        yield "occurred_at", self.occurred_at
        yield "channel", self.channel
        for key in ("ticket_id", "product_id", "sentiment"):
            spec = getattr(self, key)
            if spec is not None:
                yield key, spec
        for name, spec in self.attributes.items():
            yield f"attributes.{name}", spec


class FileSpec(_Model):
    """How to read the file."""

    format: Literal["csv", "whitespace", "jsonl"]
    delimiter: str = ","
    quotechar: str = '"'
    encoding: str = "utf-8-sig"
    header: bool = True
    columns: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> FileSpec:
        if self.format != "csv" and (self.delimiter != "," or self.quotechar != '"'):
            raise ValueError("delimiter and quotechar: only for csv")
        if len(self.delimiter) != 1 or len(self.quotechar) != 1:
            raise ValueError("delimiter and quotechar: one character each")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"encoding: unknown encoding {self.encoding!r}") from None
        if self.format == "jsonl" and (not self.header or self.columns is not None):
            raise ValueError("header and columns: not for jsonl (its keys name the columns)")
        if not self.header and not self.columns:
            raise ValueError("columns: required when the file has no header line")
        if self.header and self.columns is not None:
            raise ValueError("columns: only when header is false (the header names the columns)")
        return self


class RejectRule(_Model):
    """Rows for which `when` holds are rejected with `reason`."""

    when: Condition
    reason: str = Field(min_length=1)


class Mapping(_Model):
    """One mapping file."""

    version: Literal[1]
    description: str = ""
    source: str
    file: FileSpec
    missing_values: list[Text] = [""]
    group_by: list[str] = []
    skip: list[Condition] = []
    reject: list[RejectRule] = []
    customer: CustomerSpec
    profile: ProfileSpec | None = None
    # One interaction per row, or several (`interactions`, each with its own
    # `when` and idempotency key): a cancellation row that names no product
    # becomes one cancellation per product the row says was held.
    interaction: InteractionSpec | None = None
    interactions: list[InteractionSpec] = []

    @model_validator(mode="after")
    def _check(self) -> Mapping:
        if not _SOURCE.match(self.source):
            raise ValueError(
                f"source: {self.source!r}: 1-64 of a-z, 0-9, '_', '.', '-', starting with a letter or digit"
            )
        if self.interaction is not None and self.interactions:
            raise ValueError("give interaction (one per row) or interactions (several), not both")
        if self.profile is None and not self.interaction_specs:
            raise ValueError("give profile, interaction or both: otherwise nothing is imported")
        if not self.group_by:
            for path, condition in self.conditions():
                if condition.uses_group():
                    raise ValueError(f"{path}: compares rows of a group: set group_by")
            for path, spec in self.value_specs():
                if spec.uses_group():
                    raise ValueError(f"{path}: uses the previous row or {{_seq}}: set group_by")
            for path, interaction in self.interaction_specs:
                if "_seq" in parse_template(interaction.idempotency_key).placeholders:
                    raise ValueError(f"{path}.idempotency_key: uses {{_seq}}: set group_by")
        return self

    @property
    def interaction_specs(self) -> list[tuple[str, InteractionSpec]]:
        """Each interaction a row may become, with the key it is under."""
        if self.interaction is not None:
            return [("interaction", self.interaction)]
        return [(f"interactions[{i}]", spec) for i, spec in enumerate(self.interactions)]

    @property
    def records_interactions(self) -> bool:
        return bool(self.interaction_specs)

    def value_specs(self) -> Iterator[tuple[str, ValueSpec]]:
        if self.profile is not None:
            for key, spec in self.profile.values():
                yield f"profile.{key}", spec
        for path, interaction in self.interaction_specs:
            for key, spec in interaction.values():
                yield f"{path}.{key}", spec

    def conditions(self) -> Iterator[tuple[str, Condition]]:
        for i, condition in enumerate(self.skip):
            yield f"skip[{i}]", condition
        for i, rule in enumerate(self.reject):
            yield f"reject[{i}].when", rule.when
        for path, spec in self.value_specs():
            yield from spec.conditions(path)
        for path, interaction in self.interaction_specs:
            if interaction.when is not None:
                yield f"{path}.when", interaction.when

    def column_references(self) -> Iterator[tuple[str, str]]:
        """Every (key, column) the mapping reads, to check against the file's header."""
        for i, name in enumerate(self.group_by):
            yield f"group_by[{i}]", name
        for i, condition in enumerate(self.skip):
            yield from condition.columns(f"skip[{i}]")
        for i, rule in enumerate(self.reject):
            yield from rule.when.columns(f"reject[{i}].when")
        yield from self.customer.columns("customer")
        for path, spec in self.value_specs():
            yield from spec.columns(path)
        if self.profile is not None and self.profile.lifetime_value is not None:
            yield from self.profile.lifetime_value.columns("profile.lifetime_value")
        for path, interaction in self.interaction_specs:
            if interaction.when is not None:
                yield from interaction.when.columns(f"{path}.when")
            if interaction.amount is not None:
                yield from interaction.amount.columns(f"{path}.amount")
            for name in parse_template(interaction.idempotency_key).columns:
                yield f"{path}.idempotency_key", name

    def check_columns(self, columns: list[str], origin: str) -> None:
        """Raises MappingError naming every key that reads a column the file lacks."""
        known = set(columns)
        problems = [
            f"{path}: no column {name!r} in the file (columns: {', '.join(columns)})"
            for path, name in self.column_references()
            if name not in known
        ]
        if problems:
            raise MappingError(origin, problems)

    @property
    def needs_identity(self) -> bool:
        """Whether the import first upserts customers through the identity service."""
        return self.profile is not None or bool(self.customer.extra_identifiers)


# --- loading ----------------------------------------------------------------------
def parse_mapping(text: str, origin: str = "<mapping>") -> Mapping:
    """Parses mapping text, or raises MappingError naming every bad key and its line."""
    data, root = config_files.parse_yaml(
        text, origin, MappingError, expected="version, source, file, ..."
    )
    return config_files.validate(Mapping, data, root, origin, MappingError)


def shipped_mappings() -> dict[str, Traversable]:
    """The mappings shipped with Converge, by name ("itsm_incidents")."""
    return config_files.shipped("converge.connectors", "mappings")


def load_mapping(ref: str | Path) -> Mapping:
    """Loads a mapping from a file path or by the name of a shipped mapping."""
    text, origin = config_files.read(
        ref, "converge.connectors", "mappings", "mapping", MappingError
    )
    return parse_mapping(text, origin)

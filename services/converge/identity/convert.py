"""Every protobuf <-> plain conversion of the identity service, and the checks
of a request's shape with their field paths: the servicer calls these and
`service.py`, which sees plain Python types only."""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from google.rpc import status_pb2

from converge.identity.domain import (
    BUILTIN_PROFILE_FIELDS,
    Actor,
    AttachedIdentifier,
    BulkOutcome,
    BulkRow,
    BulkSummary,
    Customer,
    ExportPage,
    ExportPosition,
    Idempotency,
    IdentityEvent,
    Merge,
    PeerErasure,
    PreferenceUpdate,
    ProfileChange,
    ProfileFields,
    ResolveResult,
    TaggedValue,
)
from converge.identity.identifiers import IdentifierError, NormalizedIdentifier, normalize
from converge.identity.settings import IdentitySettings
from converge.runtime.cursors import commit_cursor
from converge.runtime.errors import (
    ConvergeError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    Violations,
    field_status,
)
from converge.runtime.fields import (
    MAX_MONEY_UNITS,
    money_problem,
    parse_time,
    parse_uuid,
    time_problem,
)
from converge.runtime.values import from_plain, from_tagged, timestamp, to_datetime
from converge.v1 import common_pb2, identity_pb2

# In the order a Profile message declares them (the order of its violations).
_STRING_FIELDS = tuple(name for name, tag in BUILTIN_PROFILE_FIELDS.items() if tag == "s")

MAX_IDENTIFIERS = 50
MAX_ATTRIBUTES = 100
MAX_TEXT = 256
MAX_ATTRIBUTE_TEXT = 2048
MAX_IDEMPOTENCY_KEY = 128
MAX_BATCH = 1000
DEFAULT_PAGE, MAX_PAGE = 100, 1000
# Rejected rows a BulkResolve answer lists (all are counted): converge import
# streams calls of this many rows, so every rejected row is known by its
# line; at most about 2 MB of answer (row_ref is at most MAX_ROW_REF).
MAX_LISTED_REJECTIONS = 5000
MAX_ROW_REF = 128
MAX_CLOCK_SKEW = timedelta(minutes=5)
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# Cursors and change tokens are bigint ids: ASCII digits that fit in 63 bits
# (str.isdigit() also accepts "²", which int() then refuses).
_SEQUENCE_NUMBER = re.compile(r"[0-9]{1,18}")
_PREFERENCE_FIELDS = ("do_not_contact", "preferred_channel", "wants_human")


# --- protobuf -> plain, with every violation named by its field path ---------
def parse_identifier(
    message: common_pb2.Identifier, path: str, violations: Violations, settings: IdentitySettings
) -> NormalizedIdentifier | None:
    try:
        return normalize(
            message.type,
            message.value,
            message.source,
            default_phone_region=settings.default_phone_region,
        )
    except IdentifierError as error:
        violations.add(f"{path}.{error.part}", str(error))
        return None


def parse_identifiers(
    messages: Sequence[common_pb2.Identifier],
    path: str,
    violations: Violations,
    settings: IdentitySettings,
    *,
    required: bool,
) -> list[NormalizedIdentifier]:
    if required and not messages:
        violations.add(path, "at least one identifier is required")
    if len(messages) > MAX_IDENTIFIERS:
        violations.add(path, f"at most {MAX_IDENTIFIERS} identifiers")
        return []
    found = [
        parse_identifier(m, f"{path}[{i}]", violations, settings) for i, m in enumerate(messages)
    ]
    return [i for i in found if i is not None]


def parse_customer_ref(
    ref: common_pb2.CustomerRef, path: str, violations: Violations, settings: IdentitySettings
) -> tuple[str | None, NormalizedIdentifier | None]:
    which = ref.WhichOneof("ref")
    if which == "customer_id":
        return parse_uuid(ref.customer_id, f"{path}.customer_id", violations), None
    if which == "identifier":
        return None, parse_identifier(ref.identifier, f"{path}.identifier", violations, settings)
    violations.add(path, "set customer_id or identifier")
    return None, None


def _tagged(
    value: common_pb2.AttributeValue, path: str, violations: Violations
) -> TaggedValue | None:
    which = value.WhichOneof("value")
    if which == "string_value":
        if len(value.string_value) > MAX_ATTRIBUTE_TEXT:
            violations.add(path, f"longer than {MAX_ATTRIBUTE_TEXT} characters")
        _check_text(value.string_value, path, violations)
        return {"s": value.string_value}
    if which == "number_value":
        if not math.isfinite(value.number_value):
            violations.add(path, "must be a finite number")
        return {"n": value.number_value}
    if which == "bool_value":
        return {"b": value.bool_value}
    if which == "timestamp_value":
        at = parse_time(value.timestamp_value, path, violations)
        return None if at is None else {"t": at.isoformat()}
    violations.add(path, "set one of string_value, number_value, bool_value, timestamp_value")
    return None


def _check_text(text: str, path: str, violations: Violations) -> None:
    # (PostgreSQL's text and jsonb cannot hold U+0000.)
    if "\x00" in text:
        violations.add(path, "must not contain NUL characters")


def _money(money: common_pb2.Money, path: str, violations: Violations) -> TaggedValue:
    if not _CURRENCY.match(money.currency_code):
        violations.add(f"{path}.currency_code", "an ISO 4217 code such as EUR")
    if not -999_999_999 <= money.nanos <= 999_999_999 or (money.units * money.nanos < 0):
        violations.add(f"{path}.nanos", "within ±999,999,999 and of the same sign as units")
    elif money_problem(money.units, money.nanos) is not None:
        violations.add(path, f"at most {MAX_MONEY_UNITS:,} in absolute value")
    return {"m": {"c": money.currency_code, "u": money.units, "n": money.nanos}}


def _profile_field(
    profile: identity_pb2.Profile, name: str, path: str, violations: Violations
) -> TaggedValue | None:
    """One field of a Profile message as a tagged value; None when unset."""
    if name in _STRING_FIELDS:
        text: str = getattr(profile, name)
        if len(text) > MAX_TEXT:
            violations.add(f"{path}.{name}", f"longer than {MAX_TEXT} characters")
        _check_text(text, f"{path}.{name}", violations)
        return {"s": text} if text else None
    if name == "signup_date":
        if not profile.HasField("signup_date"):
            return None
        at = parse_time(profile.signup_date, f"{path}.signup_date", violations)
        return None if at is None else {"t": at.isoformat()}
    if name == "lifetime_value":
        if not profile.HasField("lifetime_value"):
            return None
        return _money(profile.lifetime_value, f"{path}.lifetime_value", violations)
    attribute = name.removeprefix("attributes.")
    if attribute not in profile.attributes:
        return None
    return _tagged(profile.attributes[attribute], f"{path}.attributes[{attribute}]", violations)


@functools.lru_cache(maxsize=4096)
def _is_attribute_name(name: str) -> bool:
    """(Cached: a bulk import names the same few attributes on every row.)"""
    return _ATTRIBUTE_NAME.match(name) is not None


@functools.lru_cache(maxsize=4096)
def _is_profile_path(name: str) -> bool:
    """A field an update mask may name: a built-in field or "attributes.<name>"."""
    return name in BUILTIN_PROFILE_FIELDS or (
        name.startswith("attributes.") and _is_attribute_name(name.removeprefix("attributes."))
    )


def _check_attribute_names(
    profile: identity_pb2.Profile, path: str, violations: Violations
) -> None:
    if len(profile.attributes) > MAX_ATTRIBUTES:
        violations.add(f"{path}.attributes", f"at most {MAX_ATTRIBUTES} attributes")
    for name in profile.attributes:
        if not _is_attribute_name(name):
            violations.add(
                f"{path}.attributes[{name[:64]}]", "name must match [a-z][a-z0-9_]{0,62}"
            )


def parse_profile(
    profile: identity_pb2.Profile, path: str, violations: Violations
) -> ProfileFields:
    """Every field set in the message (creation, resolve).

    A valid profile takes `_valid_profile` (one pass over the fields set, no
    field paths built: a bulk import checks millions); a profile it does not
    accept is checked again field by field, so the violations a caller sees
    are those of the thorough check, in its order."""
    fields = _valid_profile(profile)
    if fields is not None:
        return fields
    return _parse_profile_checked(profile, path, violations)


@functools.lru_cache(maxsize=256)
def _is_currency(code: str) -> bool:
    return _CURRENCY.match(code) is not None


def _valid_profile(profile: identity_pb2.Profile) -> ProfileFields | None:
    """The profile's fields when every one is valid, else None (then
    `_parse_profile_checked` names what is wrong). The same fields, values
    and order as `_parse_profile_checked` (a test holds them equal)."""
    fields: ProfileFields = {}
    signup_date = lifetime_value = attributes = None
    # ListFields: only the fields set (a string set to "" is not), in field
    # number order; owner_team (7) comes after the two messages (5, 6), which
    # are added after it below, as the thorough check adds them.
    for descriptor, value in profile.ListFields():
        name = descriptor.name
        if name == "attributes":
            attributes = value
        elif name == "signup_date":
            signup_date = value
        elif name == "lifetime_value":
            lifetime_value = value
        elif len(value) <= MAX_TEXT and "\x00" not in value:
            fields[name] = {"s": value}
        else:
            return None
    if signup_date is not None:
        if time_problem(signup_date) is not None:
            return None
        fields["signup_date"] = {"t": _time_text(signup_date)}
    if lifetime_value is not None:
        code, units, nanos = (
            lifetime_value.currency_code,
            lifetime_value.units,
            lifetime_value.nanos,
        )
        if (
            not _is_currency(code)
            or not -999_999_999 <= nanos <= 999_999_999
            or units * nanos < 0
            or money_problem(units, nanos) is not None
        ):
            return None
        fields["lifetime_value"] = {"m": {"c": code, "u": units, "n": nanos}}
    if attributes is None:
        return fields
    if len(attributes) > MAX_ATTRIBUTES:
        return None
    for attribute in attributes:
        if not _is_attribute_name(attribute):
            return None
        value = attributes[attribute]
        which = value.WhichOneof("value")
        if which == "string_value":
            text = value.string_value
            if len(text) > MAX_ATTRIBUTE_TEXT or "\x00" in text:
                return None
            fields[_ATTRIBUTE_PATHS[attribute]] = {"s": text}
        elif which == "bool_value":
            fields[_ATTRIBUTE_PATHS[attribute]] = {"b": value.bool_value}
        elif which == "number_value":
            number = value.number_value
            if not math.isfinite(number):
                return None
            fields[_ATTRIBUTE_PATHS[attribute]] = {"n": number}
        elif which == "timestamp_value":
            if time_problem(value.timestamp_value) is not None:
                return None
            fields[_ATTRIBUTE_PATHS[attribute]] = {"t": _time_text(value.timestamp_value)}
        else:
            return None
    return fields


class _AttributePaths(dict[str, str]):
    """ "attributes.<name>" by name, built once per name (bounded: names are
    checked before they are looked up here, and an import names few)."""

    def __missing__(self, name: str) -> str:
        path = f"attributes.{name}"
        if len(self) < 4096:
            self[name] = path
        return path


_ATTRIBUTE_PATHS = _AttributePaths()


def _time_text(ts: Any) -> str:
    """A Timestamp already known to be in range, as the ISO text stored."""
    at = parse_time(ts, "", _UNUSED_VIOLATIONS)
    assert at is not None
    return at.isoformat()


# (Given to parse_time for a timestamp already checked: it adds nothing.)
_UNUSED_VIOLATIONS = Violations()


def _parse_profile_checked(
    profile: identity_pb2.Profile, path: str, violations: Violations
) -> ProfileFields:
    """Every field set in the message, each bad one named (see `parse_profile`)."""
    _check_attribute_names(profile, path, violations)
    names = [*_STRING_FIELDS, "signup_date", "lifetime_value"]
    fields = {name: _profile_field(profile, name, path, violations) for name in names}
    for attribute, value in profile.attributes.items():
        # Valid values the common way, without building their field path (a
        # bulk import checks millions); anything else takes `_tagged`.
        which = value.WhichOneof("value")
        tagged: TaggedValue | None
        if which == "bool_value":
            tagged = {"b": value.bool_value}
        elif which == "number_value" and math.isfinite(value.number_value):
            tagged = {"n": value.number_value}
        elif (
            which == "string_value"
            and len(text := value.string_value) <= MAX_ATTRIBUTE_TEXT
            and "\x00" not in text
        ):
            tagged = {"s": text}
        else:
            tagged = _tagged(value, f"{path}.attributes[{attribute}]", violations)
        fields[f"attributes.{attribute}"] = tagged
    return {name: value for name, value in fields.items() if value is not None}


def parse_profile_mask(
    profile: identity_pb2.Profile,
    mask_paths: Sequence[str],
    path: str,
    mask_path: str,
    violations: Violations,
) -> dict[str, TaggedValue | None]:
    """The fields named by a mask; a named field left unset is cleared (None)."""
    _check_attribute_names(profile, path, violations)
    if not mask_paths:
        violations.add(mask_path, "name at least one field to change")
    changes: dict[str, TaggedValue | None] = {}
    for i, name in enumerate(mask_paths):
        known = name in (*_STRING_FIELDS, "signup_date", "lifetime_value") or (
            name.startswith("attributes.")
            and _ATTRIBUTE_NAME.match(name.removeprefix("attributes."))
        )
        if not known:
            violations.add(f"{mask_path}.paths[{i}]", f"unknown profile field {name[:80]!r}")
            continue
        changes[name] = _profile_field(profile, name, path, violations)
    return changes


def parse_actor(actor: common_pb2.Actor, path: str, violations: Violations) -> Actor:
    valid = _valid_actor(actor.name, actor.reason)
    if valid is not None:
        return valid
    violations.check(len(actor.name) <= MAX_TEXT, f"{path}.name", f"longer than {MAX_TEXT}")
    violations.check(len(actor.reason) <= MAX_ATTRIBUTE_TEXT, f"{path}.reason", "too long")
    _check_text(actor.name, f"{path}.name", violations)
    _check_text(actor.reason, f"{path}.reason", violations)
    return Actor(actor.name, actor.reason)


@functools.lru_cache(maxsize=256)
def _valid_actor(name: str, reason: str) -> Actor | None:
    """The actor when valid, else None. (Cached: an import's rows share one.)"""
    valid = len(name) <= MAX_TEXT and len(reason) <= MAX_ATTRIBUTE_TEXT
    return Actor(name, reason) if valid and "\x00" not in name + reason else None


def parse_idempotency(
    key: str, request: Any, violations: Violations, path: str = "idempotency_key"
) -> Idempotency | None:
    if not key:
        return None
    if len(key) > MAX_IDEMPOTENCY_KEY:
        violations.add(path, f"longer than {MAX_IDEMPOTENCY_KEY} characters")
        return None
    if "\x00" in key:
        violations.add(path, "must not contain NUL characters")
        return None
    fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
    return Idempotency(key, fingerprint)


def parse_page_size(page: common_pb2.PageRequest, violations: Violations, path: str) -> int:
    violations.check(page.page_size >= 0, f"{path}.page_size", "must not be negative")
    return min(page.page_size or DEFAULT_PAGE, MAX_PAGE)


def decode_page_token(token: str, violations: Violations, path: str) -> str:
    if not token:
        return ""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        violations.add(f"{path}.page_token", "not a token this service issued")
        return ""


def encode_page_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode() if value else ""


def parse_resolve(
    request: identity_pb2.ResolveRequest,
    path: str,
    v: Violations,
    settings: IdentitySettings,
    fingerprinted: Any = None,
) -> tuple[list[NormalizedIdentifier], ProfileFields, Actor, Idempotency | None]:
    """The plain arguments of a resolve; `fingerprinted` is the message
    whose content a reused idempotency key must match (the request itself
    unless given)."""
    prefix = f"{path}." if path else ""
    identifiers = parse_identifiers(
        request.identifiers, f"{prefix}identifiers", v, settings, required=True
    )
    profile = parse_profile(request.profile, f"{prefix}profile", v)
    actor = parse_actor(request.actor, f"{prefix}actor", v)
    idempotency = parse_idempotency(
        request.idempotency_key, fingerprinted or request, v, f"{prefix}idempotency_key"
    )
    return identifiers, profile, actor, idempotency


def bulk_rows(
    item: identity_pb2.BulkResolveRequest,
) -> Iterator[tuple[identity_pb2.BulkResolveRequest, bool]]:
    """The rows one BulkResolve message carries, each with whether it came
    inside `rows`: the message's own row (when it has a resolve, or carries
    nothing else: then refused as a row without identifiers), then `rows`."""
    if item.HasField("resolve") or not item.rows:
        yield item, False
    for row in item.rows:
        yield row, True


def _masked_fields(
    profile: ProfileFields, paths: Sequence[str], mask_path: str, violations: Violations
) -> ProfileFields:
    """The fields of an already parsed profile that an update mask names
    (a named field left unset is not changed); unknown names are violations."""
    names = tuple(paths)
    for i in _unknown_mask_paths(names):
        violations.add(f"{mask_path}.paths[{i}]", f"unknown profile field {names[i][:80]!r}")
    return {name: profile[name] for name in names if name in profile}


@functools.lru_cache(maxsize=256)
def _unknown_mask_paths(names: tuple[str, ...]) -> tuple[int, ...]:
    """The positions of the names a profile mask may not name. (Cached: an
    import's rows carry the same mask.)"""
    return tuple(i for i, name in enumerate(names) if not _is_profile_path(name))


def _fingerprinted_row(item: identity_pb2.BulkResolveRequest) -> identity_pb2.BulkResolveRequest:
    """What a row's idempotency key must match on a re-send: the row without
    its row_ref (a re-sent row is the same row whatever its number) and with
    its update mask (a changed mask makes it another request).

    Built as before rows could share a message (keys stored then still
    match): the mask and effective time present even when empty. A row that
    is only itself is changed in place rather than copied, once its
    row_ref and effective time have been read: a copy of each row's
    profile cost more than the rest of its checks."""
    if item.rows:
        return identity_pb2.BulkResolveRequest(
            resolve=item.resolve,
            update_mask=item.update_mask,
            profile_effective_at=item.profile_effective_at,
        )
    item.ClearField("row_ref")
    item.update_mask.SetInParent()
    item.profile_effective_at.SetInParent()
    return item


def parse_bulk_row(
    item: identity_pb2.BulkResolveRequest,
    received: int,
    settings: IdentitySettings,
    *,
    nested: bool = False,
) -> tuple[str, BulkRow | InvalidArgument]:
    """One row of a bulk resolve with its reference (its number in the stream
    when it has none), or why it is refused."""
    row_ref = item.row_ref[:MAX_ROW_REF] or str(received)
    v = Violations()
    # Echoed in the answer: a huge one would make it too big to send.
    v.check(len(item.row_ref) <= MAX_ROW_REF, "row_ref", f"longer than {MAX_ROW_REF}")
    v.check(not (nested and item.rows), "rows", "a row inside rows carries no rows")
    has_effective_at = item.HasField("profile_effective_at")
    identifiers, profile, actor, idempotency = parse_resolve(
        item.resolve, "resolve", v, settings, _fingerprinted_row(item)
    )
    effective_at = None
    if has_effective_at:
        effective_at = parse_time(item.profile_effective_at, "profile_effective_at", v)
        if effective_at is not None and effective_at > datetime.now(UTC) + MAX_CLOCK_SKEW:
            v.add("profile_effective_at", "must not be in the future")
    upsert = None
    if item.update_mask.paths:
        # (The profile is parsed and checked once, above: an import's rows
        # name every field twice, in the profile and in the mask.)
        upsert = _masked_fields(profile, item.update_mask.paths, "update_mask", v)
    if v.found:
        return row_ref, InvalidArgument(v.found)
    return row_ref, BulkRow(
        tuple(identifiers),
        profile,
        upsert,
        item.resolve.lookup_only,
        actor,
        idempotency,
        effective_at,
    )


def parse_batch_resolve(
    request: identity_pb2.BatchResolveRequest, settings: IdentitySettings
) -> tuple[list[identity_pb2.BatchResolveResult], list[tuple[int, BulkRow]]]:
    """A result per request, already filled for the requests refused by their
    checks, and the rows of the others with their index."""
    if len(request.requests) > MAX_BATCH:
        raise InvalidArgument([FieldViolation("requests", f"at most {MAX_BATCH}")])
    results = [identity_pb2.BatchResolveResult() for _ in request.requests]
    rows: list[tuple[int, BulkRow]] = []
    for index, item in enumerate(request.requests):
        v = Violations()
        identifiers, profile, actor, idempotency = parse_resolve(item, "", v, settings)
        if v.found:
            results[index].error.CopyFrom(field_status(v.found[0].field, v.found[0].description))
            continue
        rows.append(
            (
                index,
                BulkRow(tuple(identifiers), profile, None, item.lookup_only, actor, idempotency),
            )
        )
    return results, rows


def parse_effective_at(request: identity_pb2.UpdateCustomerRequest) -> datetime | None:
    effective_at = to_datetime(request.effective_at) if request.HasField("effective_at") else None
    if effective_at is not None and effective_at > datetime.now(UTC) + MAX_CLOCK_SKEW:
        raise InvalidArgument([FieldViolation("effective_at", "must not be in the future")])
    return effective_at


def parse_customers_after(page: common_pb2.PageRequest, v: Violations) -> str:
    """The customer id a ListCustomers page starts after ("" from the first)."""
    after = decode_page_token(page.page_token, v, "page")
    if after:
        parse_uuid(after, "page.page_token", v)
    return after


# A bare change id (the tokens given out before a change's fields were stored
# together) resumes after every field of that change.
_WHOLE_CHANGE = 2**63 - 1


def parse_change_token(page: common_pb2.PageRequest, v: Violations) -> tuple[int, int]:
    """The (change, field position) a ListProfileChanges page starts after
    ((0, 0) from the first)."""
    token = decode_page_token(page.page_token, v, "page")
    change, _, position = token.partition(":")
    valid = not token or (
        bool(_SEQUENCE_NUMBER.fullmatch(change))
        and (not position or bool(_SEQUENCE_NUMBER.fullmatch(position)))
    )
    v.check(valid, "page.page_token", "not a token this service issued")
    if not token or not valid:
        return (0, 0)
    return (int(change), int(position) if position else _WHOLE_CHANGE)


def encode_change_token(after: tuple[int, int] | None) -> str:
    """The page token of the position a next page starts after ("" when none)."""
    return encode_page_token(f"{after[0]}:{after[1]}" if after else "")


def parse_effective_range(interval: common_pb2.TimeRange) -> tuple[datetime, datetime]:
    """An effective-time range; an open end is unbounded."""
    start = (
        to_datetime(interval.start)
        if interval.HasField("start")
        else datetime.min.replace(tzinfo=UTC)
    )
    end = (
        to_datetime(interval.end) if interval.HasField("end") else datetime.max.replace(tzinfo=UTC)
    )
    return start, end


def parse_preference_update(
    request: identity_pb2.UpdateContactPreferencesRequest, v: Violations
) -> PreferenceUpdate:
    consents = []
    for i, consent in enumerate(request.consents):
        path = f"consents[{i}]"
        v.check(
            consent.channel in common_pb2.ContactChannel.values() and consent.channel != 0,
            f"{path}.channel",
            "set a known contact channel",
        )
        v.check(
            consent.status in identity_pb2.ConsentStatus.values(),
            f"{path}.status",
            "unknown status",
        )
        v.check(len(consent.source) <= MAX_TEXT, f"{path}.source", "too long")
        at = to_datetime(consent.updated_at) if consent.HasField("updated_at") else None
        # A later-dated consent wins, so one dated in the future would stick.
        v.check(
            at is None or at <= datetime.now(UTC) + MAX_CLOCK_SKEW,
            f"{path}.updated_at",
            "must not be in the future",
        )
        consents.append((int(consent.channel), int(consent.status), at, consent.source))
    values: dict[str, Any] = {}
    for i, name in enumerate(request.update_mask.paths):
        if name not in _PREFERENCE_FIELDS:
            v.add(f"update_mask.paths[{i}]", f"one of {', '.join(_PREFERENCE_FIELDS)}")
            continue
        values[name] = getattr(request.preferences, name)
    if "preferred_channel" in values:
        v.check(
            values["preferred_channel"] in common_pb2.ContactChannel.values(),
            "preferences.preferred_channel",
            "unknown contact channel",
        )
    v.check(bool(consents or values), "update_mask", "nothing to change: give consents or a mask")
    return PreferenceUpdate(
        consents=tuple(consents),
        do_not_contact=values.get("do_not_contact"),
        preferred_channel=values.get("preferred_channel"),
        wants_human=values.get("wants_human"),
    )


def parse_export_token(token: str, v: Violations) -> ExportPosition | None:
    if not token:
        return None
    try:
        return export_position(token)
    except ValueError as error:
        v.add("page_token", str(error))
        return None


# --- plain -> protobuf ---------------------------------------------------------


def attribute_value(tagged: TaggedValue) -> common_pb2.AttributeValue:
    if "m" in tagged:  # money has no AttributeValue of its own: shown as text
        money = tagged["m"]
        return common_pb2.AttributeValue(
            string_value=f"{money['u'] + money['n'] / 1e9:.2f} {money['c']}"
        )
    return from_plain(from_tagged(tagged))


def profile_pb(fields: ProfileFields) -> identity_pb2.Profile:
    profile = identity_pb2.Profile()
    for name, tagged in fields.items():
        if name in _STRING_FIELDS:
            setattr(profile, name, tagged["s"])
        elif name == "signup_date":
            profile.signup_date.CopyFrom(timestamp(datetime.fromisoformat(tagged["t"])))
        elif name == "lifetime_value":
            money = tagged["m"]
            profile.lifetime_value.CopyFrom(
                common_pb2.Money(currency_code=money["c"], units=money["u"], nanos=money["n"])
            )
        else:
            profile.attributes[name.removeprefix("attributes.")].CopyFrom(attribute_value(tagged))
    return profile


def identifier_pb(identifier: NormalizedIdentifier) -> common_pb2.Identifier:
    return common_pb2.Identifier(
        type=common_pb2.IdentifierType.ValueType(identifier.kind),
        value=identifier.value,
        source=identifier.source,
    )


def customer_pb(customer: Customer) -> identity_pb2.Customer:
    preferences = customer.preferences
    message = identity_pb2.Customer(
        customer_id=customer.customer_id,
        profile=profile_pb(customer.profile),
        identifiers=[
            identity_pb2.CustomerIdentifier(
                identifier=identifier_pb(a.identifier),
                customer_id=a.customer_id,
                attached_at=timestamp(a.attached_at),
            )
            for a in customer.identifiers
        ],
        contact_preferences=identity_pb2.ContactPreferences(
            consents=[
                identity_pb2.ChannelConsent(
                    channel=common_pb2.ContactChannel.ValueType(c.channel),
                    status=identity_pb2.ConsentStatus.ValueType(c.status),
                    updated_at=timestamp(c.updated_at),
                    source=c.source,
                )
                for c in preferences.consents
            ],
            do_not_contact=preferences.do_not_contact,
            preferred_channel=preferences.preferred_channel,  # type: ignore[arg-type]
            wants_human=preferences.wants_human,
        ),
        merged_customer_ids=customer.merged_customer_ids,
        created_at=timestamp(customer.created_at),
        updated_at=timestamp(customer.updated_at),
        as_of=timestamp(customer.as_of),
    )
    if preferences.updated_at is not None:
        message.contact_preferences.updated_at.CopyFrom(timestamp(preferences.updated_at))
    return message


def merge_pb(merge: Merge) -> identity_pb2.MergeRecord:
    record = identity_pb2.MergeRecord(
        merge_id=merge.merge_id,
        surviving_customer_id=merge.surviving_customer_id,
        merged_customer_id=merge.merged_customer_id,
        joining_identifiers=[identifier_pb(i) for i in merge.joining_identifiers],
        actor=common_pb2.Actor(name=merge.actor, reason=merge.reason),
        merged_at=timestamp(merge.merged_at),
        policy=merge.policy,
    )
    if merge.unmerged_at is not None:
        record.unmerged_at.CopyFrom(timestamp(merge.unmerged_at))
    return record


def change_pb(change: ProfileChange) -> identity_pb2.ProfileChange:
    message = identity_pb2.ProfileChange(
        field=change.field,
        effective_at=timestamp(change.effective_at),
        recorded_at=timestamp(change.recorded_at),
        actor=change.actor,
    )
    if change.value is not None:
        message.value.CopyFrom(attribute_value(change.value))
    return message


def event_pb(event: IdentityEvent) -> identity_pb2.StreamIdentityEventsResponse:
    message = identity_pb2.StreamIdentityEventsResponse(
        cursor=commit_cursor(event.xid, event.event_id),
        type=event.event_type,  # type: ignore[arg-type]
        customer_id=event.customer_id,
        other_customer_id=event.other_customer_id or "",
        merge_id=event.merge_id or "",
        occurred_at=timestamp(event.occurred_at),
    )
    if event.identifier is not None:
        message.identifier.CopyFrom(identifier_pb(event.identifier))
    return message


def forget_response_pb(
    erasure_id: str, outcomes: Sequence[PeerErasure], complete: bool, erased_at: datetime
) -> identity_pb2.ForgetCustomerResponse:
    return identity_pb2.ForgetCustomerResponse(
        erasure_id=erasure_id,
        services=[
            identity_pb2.ServiceErasure(
                service=o.service, done=o.done, erased_counts=o.erased_counts, error=o.error
            )
            for o in outcomes
        ],
        complete=complete,
        erased_at=timestamp(erased_at),
    )


def export_response_pb(page: ExportPage) -> identity_pb2.ExportCustomerResponse:
    response = identity_pb2.ExportCustomerResponse(
        profile_changes=[change_pb(c) for c in page.changes],
        merges=[merge_pb(m) for m in page.merges],
        services=page.peer_pages,
        unavailable_services=page.unavailable,
        next_page_token="" if page.next is None else export_token(page.next),
    )
    if page.customer is not None:
        response.customer.CopyFrom(customer_pb(page.customer))
    return response


# An export's page token: the position as compact JSON, base64url. Opaque to
# callers; it carries the other service's own token untouched.
def export_token(position: ExportPosition) -> str:
    plain = json.dumps(
        [position.customer_id, position.service, position.service_token], separators=(",", ":")
    )
    return base64.urlsafe_b64encode(plain.encode()).decode()


def export_position(token: str) -> ExportPosition:
    """The position a token names; ValueError for one identity did not issue."""
    try:
        value = json.loads(base64.urlsafe_b64decode(token.encode("ascii")))
    except (binascii.Error, UnicodeError, ValueError) as error:
        raise ValueError("not a token this service issued") from error
    if not (isinstance(value, list) and len(value) == 3 and all(isinstance(v, str) for v in value)):
        raise ValueError("not a token this service issued")
    return ExportPosition(*value)


def customer_identifier_pb(attached: AttachedIdentifier) -> identity_pb2.CustomerIdentifier:
    return identity_pb2.CustomerIdentifier(
        identifier=identifier_pb(attached.identifier),
        customer_id=attached.customer_id,
        attached_at=timestamp(attached.attached_at),
    )


def resolve_response_pb(
    result: ResolveResult, identifiers: Sequence[NormalizedIdentifier]
) -> identity_pb2.ResolveResponse:
    owned = {a.identifier: a for a in result.customer.identifiers}
    resolved = [owned[i] for i in identifiers if i in owned]
    return identity_pb2.ResolveResponse(
        resolved_identifiers=[customer_identifier_pb(a) for a in resolved],
        customer=customer_pb(result.customer),
        created=result.created,
        merges=[merge_pb(m) for m in result.merges],
        attached_identifiers=[identifier_pb(i) for i in result.attached],
    )


def batch_get_response_pb(
    requested: Sequence[str], found: Sequence[Customer | None]
) -> identity_pb2.BatchGetCustomersResponse:
    response = identity_pb2.BatchGetCustomersResponse()
    for customer_id, customer in zip(requested, found, strict=True):
        if customer is None:
            response.missing_customer_ids.append(customer_id)
        else:
            response.customers.append(customer_pb(customer))
    return response


def batch_resolve_response_pb(
    results: list[identity_pb2.BatchResolveResult],
    rows: Sequence[tuple[int, BulkRow]],
    resolved: Sequence[tuple[BulkOutcome, str, list[AttachedIdentifier]]],
) -> identity_pb2.BatchResolveResponse:
    """Fills the results of the rows resolved (see `parse_batch_resolve`)."""
    for (index, _), (outcome, survivor, owners) in zip(rows, resolved, strict=True):
        result = results[index]
        if isinstance(outcome.error, ConvergeError):
            result.error.CopyFrom(outcome.error.rpc_status())
            continue
        result.customer_id = survivor
        result.created = outcome.created
        result.resolved_identifiers.extend(customer_identifier_pb(a) for a in owners)
    return identity_pb2.BatchResolveResponse(results=results)


def _rejection_status(field_path: str, reason: str) -> status_pb2.Status:
    # A bulk row names the field at fault when a field is; a row refused
    # otherwise (unknown under lookup_only, a forbidden merge) names none.
    return (
        field_status(field_path, reason) if field_path else FailedPrecondition(reason).rpc_status()
    )


def bulk_resolve_response_pb(summary: BulkSummary) -> identity_pb2.BulkResolveResponse:
    return identity_pb2.BulkResolveResponse(
        received=summary.received,
        created=summary.created,
        matched=summary.matched,
        merged=summary.merged,
        rejected=len(summary.rejections),
        rejections=[
            identity_pb2.BulkRejection(row_ref=r, error=_rejection_status(f, why))
            for r, f, why in summary.rejections[:MAX_LISTED_REJECTIONS]
        ],
    )

"""The identity service's gRPC face: protobuf in, validation with field paths,
`service.py` for the rules, protobuf out. Nothing else lives here."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import re
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any

import grpc
from google.protobuf import json_format

from converge.identity.convert import (
    change_pb,
    customer_pb,
    event_pb,
    export_position,
    export_response_pb,
    forget_response_pb,
    identifier_pb,
    merge_pb,
)
from converge.identity.domain import (
    Actor,
    BulkRow,
    BulkSummary,
    Idempotency,
    PreferenceUpdate,
    ProfileFields,
    TaggedValue,
)
from converge.identity.identifiers import IdentifierError, NormalizedIdentifier, normalize
from converge.identity.service import IdentityService, PeerErasure, PeerExport
from converge.identity.settings import IdentitySettings
from converge.identity.store import IdentityStore
from converge.runtime.cursors import parse_commit_cursor
from converge.runtime.errors import ConvergeError, FieldViolation, InvalidArgument, Violations
from converge.runtime.fields import (
    MAX_MONEY_UNITS,
    checked_requests,
    money_problem,
    parse_time,
    parse_uuid,
)
from converge.runtime.server import ServiceContext, ServiceSpec
from converge.runtime.values import timestamp, to_datetime
from converge.v1 import (
    common_pb2,
    identity_pb2,
    identity_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
)

MAX_IDENTIFIERS = 50
MAX_ATTRIBUTES = 100
MAX_TEXT = 256
MAX_ATTRIBUTE_TEXT = 2048
MAX_IDEMPOTENCY_KEY = 128
MAX_BATCH = 1000
DEFAULT_PAGE, MAX_PAGE = 100, 1000
MAX_LISTED_REJECTIONS = 1000
MAX_ROW_REF = 128
# Rows of a bulk resolve handled per transaction.
BULK_BATCH = 500
MAX_CLOCK_SKEW = timedelta(minutes=5)
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# Cursors and change tokens are bigint ids: ASCII digits that fit in 63 bits
# (str.isdigit() also accepts "²", which int() then refuses).
_SEQUENCE_NUMBER = re.compile(r"[0-9]{1,18}")
_STRING_FIELDS = ("display_name", "segment", "plan", "region", "owner_team")
_PREFERENCE_FIELDS = ("do_not_contact", "preferred_channel", "wants_human")


# --- protobuf -> plain, with every violation named by its field path ---------
def _identifier(
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


def _identifiers(
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
    found = [_identifier(m, f"{path}[{i}]", violations, settings) for i, m in enumerate(messages)]
    return [i for i in found if i is not None]


def _customer_ref(
    ref: common_pb2.CustomerRef, path: str, violations: Violations, settings: IdentitySettings
) -> tuple[str | None, NormalizedIdentifier | None]:
    which = ref.WhichOneof("ref")
    if which == "customer_id":
        return parse_uuid(ref.customer_id, f"{path}.customer_id", violations), None
    if which == "identifier":
        return None, _identifier(ref.identifier, f"{path}.identifier", violations, settings)
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


def _check_attribute_names(
    profile: identity_pb2.Profile, path: str, violations: Violations
) -> None:
    if len(profile.attributes) > MAX_ATTRIBUTES:
        violations.add(f"{path}.attributes", f"at most {MAX_ATTRIBUTES} attributes")
    for name in profile.attributes:
        if not _ATTRIBUTE_NAME.match(name):
            violations.add(
                f"{path}.attributes[{name[:64]}]", "name must match [a-z][a-z0-9_]{0,62}"
            )


def _profile_fields(
    profile: identity_pb2.Profile, path: str, violations: Violations
) -> ProfileFields:
    """Every field set in the message (creation, resolve)."""
    _check_attribute_names(profile, path, violations)
    names = [
        *_STRING_FIELDS,
        "signup_date",
        "lifetime_value",
        *(f"attributes.{a}" for a in profile.attributes),
    ]
    fields = {name: _profile_field(profile, name, path, violations) for name in names}
    return {name: value for name, value in fields.items() if value is not None}


def _masked_profile_fields(
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


def _actor(actor: common_pb2.Actor, path: str, violations: Violations) -> Actor:
    violations.check(len(actor.name) <= MAX_TEXT, f"{path}.name", f"longer than {MAX_TEXT}")
    violations.check(len(actor.reason) <= MAX_ATTRIBUTE_TEXT, f"{path}.reason", "too long")
    _check_text(actor.name, f"{path}.name", violations)
    _check_text(actor.reason, f"{path}.reason", violations)
    return Actor(actor.name, actor.reason)


def _idempotency(
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


def _page_size(page: common_pb2.PageRequest, violations: Violations, path: str) -> int:
    violations.check(page.page_size >= 0, f"{path}.page_size", "must not be negative")
    return min(page.page_size or DEFAULT_PAGE, MAX_PAGE)


def _decode_token(token: str, violations: Violations, path: str) -> str:
    if not token:
        return ""
    try:
        return base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        violations.add(f"{path}.page_token", "not a token this service issued")
        return ""


def _encode_token(value: str) -> str:
    return base64.urlsafe_b64encode(value.encode()).decode() if value else ""


def _violated_field(error: ConvergeError) -> str:
    return error.violations[0].field if isinstance(error, InvalidArgument) else ""


@checked_requests
class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, service: IdentityService, settings: IdentitySettings) -> None:
        self.service = service
        self.settings = settings
        self._peers: dict[str, privacy_pb2_grpc.DataSubjectServiceAsyncStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        for name, target in settings.peer_services.items():
            channel = grpc.aio.insecure_channel(target)
            self._channels.append(channel)
            self._peers[name] = privacy_pb2_grpc.DataSubjectServiceStub(channel)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)

    async def CreateCustomer(
        self, request: identity_pb2.CreateCustomerRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.CreateCustomerResponse:
        v = Violations()
        profile = _profile_fields(request.profile, "profile", v)
        identifiers = _identifiers(
            request.identifiers, "identifiers", v, self.settings, required=False
        )
        actor = _actor(request.actor, "actor", v)
        idempotency = _idempotency(request.idempotency_key, request, v)
        v.raise_if_any()
        customer = await self.service.create_customer(profile, identifiers, actor, idempotency)
        return identity_pb2.CreateCustomerResponse(customer=customer_pb(customer))

    async def GetCustomer(
        self, request: identity_pb2.GetCustomerRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.GetCustomerResponse:
        v = Violations()
        customer_id, identifier = _customer_ref(request.customer, "customer", v, self.settings)
        v.raise_if_any()
        as_of = to_datetime(request.as_of) if request.HasField("as_of") else None
        customer = await self.service.get_customer(customer_id, identifier, as_of)
        return identity_pb2.GetCustomerResponse(customer=customer_pb(customer))

    async def BatchGetCustomers(
        self, request: identity_pb2.BatchGetCustomersRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.BatchGetCustomersResponse:
        v = Violations()
        v.check(len(request.customer_ids) <= MAX_BATCH, "customer_ids", f"at most {MAX_BATCH}")
        ids = [parse_uuid(c, f"customer_ids[{i}]", v) for i, c in enumerate(request.customer_ids)]
        v.raise_if_any()
        as_of = to_datetime(request.as_of) if request.HasField("as_of") else None
        found = await self.service.batch_get([i for i in ids if i], as_of)
        response = identity_pb2.BatchGetCustomersResponse()
        for requested, customer in zip(request.customer_ids, found, strict=True):
            if customer is None:
                response.missing_customer_ids.append(requested)
            else:
                response.customers.append(customer_pb(customer))
        return response

    async def UpdateCustomer(
        self, request: identity_pb2.UpdateCustomerRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.UpdateCustomerResponse:
        v = Violations()
        customer_id = parse_uuid(request.customer_id, "customer_id", v)
        changes = _masked_profile_fields(
            request.profile, list(request.update_mask.paths), "profile", "update_mask", v
        )
        actor = _actor(request.actor, "actor", v)
        idempotency = _idempotency(request.idempotency_key, request, v)
        v.raise_if_any()
        assert customer_id is not None
        effective_at = (
            to_datetime(request.effective_at) if request.HasField("effective_at") else None
        )
        if effective_at is not None and effective_at > datetime.now(UTC) + MAX_CLOCK_SKEW:
            raise InvalidArgument([FieldViolation("effective_at", "must not be in the future")])
        customer = await self.service.update_customer(
            customer_id, changes, effective_at, actor, idempotency
        )
        return identity_pb2.UpdateCustomerResponse(customer=customer_pb(customer))

    async def ListCustomers(
        self, request: identity_pb2.ListCustomersRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ListCustomersResponse:
        v = Violations()
        size = _page_size(request.page, v, "page")
        after = _decode_token(request.page.page_token, v, "page")
        if after:
            parse_uuid(after, "page.page_token", v)
        v.raise_if_any()
        customers, last = await self.service.list_customers(
            after,
            size,
            segment=request.segment,
            plan=request.plan,
            region=request.region,
            owner_team=request.owner_team,
            name_prefix=request.name_prefix,
        )
        return identity_pb2.ListCustomersResponse(
            customers=[customer_pb(c) for c in customers],
            page=common_pb2.PageResponse(next_page_token=_encode_token(last)),
        )

    async def ListProfileChanges(
        self, request: identity_pb2.ListProfileChangesRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ListProfileChangesResponse:
        v = Violations()
        customer_id = parse_uuid(request.customer_id, "customer_id", v)
        size = _page_size(request.page, v, "page")
        token = _decode_token(request.page.page_token, v, "page")
        v.check(
            not token or bool(_SEQUENCE_NUMBER.fullmatch(token)),
            "page.page_token",
            "not a token this service issued",
        )
        v.raise_if_any()
        assert customer_id is not None
        start = (
            to_datetime(request.effective.start)
            if request.effective.HasField("start")
            else datetime.min.replace(tzinfo=UTC)
        )
        end = (
            to_datetime(request.effective.end)
            if request.effective.HasField("end")
            else datetime.max.replace(tzinfo=UTC)
        )
        changes, last = await self.service.list_profile_changes(
            customer_id, start, end, int(token or 0), size
        )
        return identity_pb2.ListProfileChangesResponse(
            changes=[change_pb(c) for c in changes],
            page=common_pb2.PageResponse(next_page_token=_encode_token(str(last) if last else "")),
        )

    def _resolve_arguments(
        self,
        request: identity_pb2.ResolveRequest,
        path: str,
        v: Violations,
        fingerprinted: Any = None,
    ) -> tuple[list[NormalizedIdentifier], ProfileFields, Actor, Idempotency | None]:
        """The plain arguments of a resolve; `fingerprinted` is the message
        whose content a reused idempotency key must match (the request itself
        unless given)."""
        prefix = f"{path}." if path else ""
        identifiers = _identifiers(
            request.identifiers, f"{prefix}identifiers", v, self.settings, required=True
        )
        profile = _profile_fields(request.profile, f"{prefix}profile", v)
        actor = _actor(request.actor, f"{prefix}actor", v)
        idempotency = _idempotency(
            request.idempotency_key, fingerprinted or request, v, f"{prefix}idempotency_key"
        )
        return identifiers, profile, actor, idempotency

    async def Resolve(
        self, request: identity_pb2.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ResolveResponse:
        v = Violations()
        identifiers, profile, actor, idempotency = self._resolve_arguments(request, "", v)
        v.raise_if_any()
        result = await self.service.resolve(
            identifiers,
            profile,
            lookup_only=request.lookup_only,
            actor=actor,
            idempotency=idempotency,
        )
        owned = {a.identifier: a for a in result.customer.identifiers}
        resolved = [owned[i] for i in identifiers if i in owned]
        return identity_pb2.ResolveResponse(
            resolved_identifiers=[
                identity_pb2.CustomerIdentifier(
                    identifier=identifier_pb(a.identifier),
                    customer_id=a.customer_id,
                    attached_at=timestamp(a.attached_at),
                )
                for a in resolved
            ],
            customer=customer_pb(result.customer),
            created=result.created,
            merges=[merge_pb(m) for m in result.merges],
            attached_identifiers=[identifier_pb(i) for i in result.attached],
        )

    async def BulkResolve(
        self,
        request_iterator: AsyncIterator[identity_pb2.BulkResolveRequest],
        context: grpc.aio.ServicerContext,
    ) -> identity_pb2.BulkResolveResponse:
        summary = BulkSummary()
        batch: list[tuple[str, BulkRow]] = []

        async def flush() -> None:
            outcomes = await self.service.resolve_batch([row for _, row in batch])
            for (row_ref, _), outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome.error, ConvergeError):
                    # (The service names a row's fields as in ResolveRequest.)
                    field = _violated_field(outcome.error)
                    summary.rejections.append(
                        (row_ref, f"resolve.{field}" if field else "", outcome.error.message)
                    )
                    continue
                summary.created += outcome.created
                summary.matched += not outcome.created
                summary.merged += outcome.merges
            batch.clear()

        async for item in request_iterator:
            summary.received += 1
            row_ref = item.row_ref[:MAX_ROW_REF] or str(summary.received)
            v = Violations()
            # Echoed in the answer: a huge one would make it too big to send.
            v.check(len(item.row_ref) <= MAX_ROW_REF, "row_ref", f"longer than {MAX_ROW_REF}")
            # A re-sent row is the same row whatever its row_ref; a changed
            # update mask makes it a different request.
            identifiers, profile, actor, idempotency = self._resolve_arguments(
                item.resolve,
                "resolve",
                v,
                identity_pb2.BulkResolveRequest(resolve=item.resolve, update_mask=item.update_mask),
            )
            upsert = None
            if item.update_mask.paths:
                changes = _masked_profile_fields(
                    item.resolve.profile,
                    list(item.update_mask.paths),
                    "resolve.profile",
                    "update_mask",
                    v,
                )
                upsert = {k: val for k, val in changes.items() if val is not None}
            if v.found:
                error = InvalidArgument(v.found)
                summary.rejections.append((row_ref, _violated_field(error), error.message))
                continue
            batch.append(
                (
                    row_ref,
                    BulkRow(
                        tuple(identifiers),
                        profile,
                        upsert,
                        item.resolve.lookup_only,
                        actor,
                        idempotency,
                    ),
                )
            )
            if len(batch) >= BULK_BATCH:
                await flush()
        if batch:
            await flush()
        return identity_pb2.BulkResolveResponse(
            received=summary.received,
            created=summary.created,
            matched=summary.matched,
            merged=summary.merged,
            rejected=len(summary.rejections),
            rejections=[
                identity_pb2.BulkRejection(row_ref=r, field=f, reason=why)
                for r, f, why in summary.rejections[:MAX_LISTED_REJECTIONS]
            ],
        )

    async def BatchResolve(
        self, request: identity_pb2.BatchResolveRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.BatchResolveResponse:
        if len(request.requests) > MAX_BATCH:
            raise InvalidArgument([FieldViolation("requests", f"at most {MAX_BATCH}")])
        results = [identity_pb2.BatchResolveResult() for _ in request.requests]
        rows: list[tuple[int, BulkRow]] = []
        for index, item in enumerate(request.requests):
            v = Violations()
            identifiers, profile, actor, idempotency = self._resolve_arguments(item, "", v)
            if v.found:
                results[index].error_code = "INVALID_ARGUMENT"
                results[index].error_field = v.found[0].field
                results[index].error = v.found[0].description
                continue
            rows.append(
                (
                    index,
                    BulkRow(
                        tuple(identifiers), profile, None, item.lookup_only, actor, idempotency
                    ),
                )
            )
        resolved = await self.service.batch_resolve([row for _, row in rows])
        for (index, _), (outcome, survivor, owners) in zip(rows, resolved, strict=True):
            result = results[index]
            if isinstance(outcome.error, ConvergeError):
                result.error_code = outcome.error.code.name
                result.error_field = _violated_field(outcome.error)
                result.error = outcome.error.message
                continue
            result.customer_id = survivor
            result.created = outcome.created
            result.resolved_identifiers.extend(
                identity_pb2.CustomerIdentifier(
                    identifier=identifier_pb(a.identifier),
                    customer_id=a.customer_id,
                    attached_at=timestamp(a.attached_at),
                )
                for a in owners
            )
        return identity_pb2.BatchResolveResponse(results=results)

    async def RemoveIdentifier(
        self, request: identity_pb2.RemoveIdentifierRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.RemoveIdentifierResponse:
        v = Violations()
        identifier = _identifier(request.identifier, "identifier", v, self.settings)
        actor = _actor(request.actor, "actor", v)
        v.raise_if_any()
        assert identifier is not None
        customer = await self.service.remove_identifier(identifier, actor)
        return identity_pb2.RemoveIdentifierResponse(customer=customer_pb(customer))

    async def MergeCustomers(
        self, request: identity_pb2.MergeCustomersRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.MergeCustomersResponse:
        v = Violations()
        surviving = parse_uuid(request.surviving_customer_id, "surviving_customer_id", v)
        merged = parse_uuid(request.merged_customer_id, "merged_customer_id", v)
        actor = _actor(request.actor, "actor", v)
        idempotency = _idempotency(request.idempotency_key, request, v)
        v.raise_if_any()
        assert surviving is not None and merged is not None
        merge, customer = await self.service.merge_customers(surviving, merged, actor, idempotency)
        return identity_pb2.MergeCustomersResponse(
            merge=merge_pb(merge), customer=customer_pb(customer)
        )

    async def UnmergeCustomers(
        self, request: identity_pb2.UnmergeCustomersRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.UnmergeCustomersResponse:
        v = Violations()
        merge_id = parse_uuid(request.merge_id, "merge_id", v)
        actor = _actor(request.actor, "actor", v)
        v.raise_if_any()
        assert merge_id is not None
        merge, survivor, restored = await self.service.unmerge(merge_id, actor)
        return identity_pb2.UnmergeCustomersResponse(
            merge=merge_pb(merge),
            surviving_customer=customer_pb(survivor),
            restored_customer=customer_pb(restored),
        )

    async def ListMerges(
        self, request: identity_pb2.ListMergesRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ListMergesResponse:
        v = Violations()
        customer_id = parse_uuid(request.customer_id, "customer_id", v)
        v.raise_if_any()
        assert customer_id is not None
        merges = await self.service.list_merges(customer_id, request.include_undone)
        return identity_pb2.ListMergesResponse(merges=[merge_pb(m) for m in merges])

    async def GetContactPreferences(
        self, request: identity_pb2.GetContactPreferencesRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.GetContactPreferencesResponse:
        v = Violations()
        customer_id, identifier = _customer_ref(request.customer, "customer", v, self.settings)
        v.raise_if_any()
        customer = customer_pb(await self.service.get_customer(customer_id, identifier))
        return identity_pb2.GetContactPreferencesResponse(
            customer_id=customer.customer_id, contact_preferences=customer.contact_preferences
        )

    async def UpdateContactPreferences(
        self,
        request: identity_pb2.UpdateContactPreferencesRequest,
        context: grpc.aio.ServicerContext,
    ) -> identity_pb2.UpdateContactPreferencesResponse:
        v = Violations()
        customer_id, identifier = _customer_ref(request.customer, "customer", v, self.settings)
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
        v.check(
            bool(consents or values), "update_mask", "nothing to change: give consents or a mask"
        )
        actor = _actor(request.actor, "actor", v)
        idempotency = _idempotency(request.idempotency_key, request, v)
        v.raise_if_any()
        update = PreferenceUpdate(
            consents=tuple(consents),
            do_not_contact=values.get("do_not_contact"),
            preferred_channel=values.get("preferred_channel"),
            wants_human=values.get("wants_human"),
        )
        customer = customer_pb(
            await self.service.update_preferences(
                customer_id, identifier, update, actor, idempotency
            )
        )
        return identity_pb2.UpdateContactPreferencesResponse(
            customer_id=customer.customer_id, contact_preferences=customer.contact_preferences
        )

    async def _erase_at_peer(
        self, name: str, customer_ids: Sequence[str], erasure_id: str
    ) -> PeerErasure:
        try:
            reply = await self._peers[name].EraseCustomerData(
                privacy_pb2.EraseCustomerDataRequest(
                    customer_ids=customer_ids, erasure_id=erasure_id
                ),
                timeout=self.settings.peer_timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            return PeerErasure(name, False, {}, f"{error.code().name}: {error.details()}")
        return PeerErasure(name, True, dict(reply.erased_counts), "")

    async def ForgetCustomer(
        self, request: identity_pb2.ForgetCustomerRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ForgetCustomerResponse:
        v = Violations()
        customer_id, identifier = _customer_ref(request.customer, "customer", v, self.settings)
        actor = _actor(request.actor, "actor", v)
        v.check(bool(actor.name), "actor.name", "required: who asked for the erasure")
        idempotency = _idempotency(request.idempotency_key, request, v)
        v.raise_if_any()
        erasure_id, outcomes, complete, erased_at = await self.service.forget(
            customer_id, identifier, actor, idempotency, self._erase_at_peer, list(self._peers)
        )
        return forget_response_pb(erasure_id, outcomes, complete, erased_at)

    async def _export_at_peer(
        self, name: str, customer_ids: Sequence[str], page_token: str
    ) -> PeerExport:
        try:
            reply = await self._peers[name].ExportCustomerData(
                privacy_pb2.ExportCustomerDataRequest(
                    customer_ids=customer_ids, page_token=page_token
                ),
                timeout=self.settings.peer_timeout_s,
            )
        except grpc.aio.AioRpcError:
            return PeerExport(name, False, None, "")
        return PeerExport(name, True, reply, reply.next_page_token)

    async def ExportCustomer(
        self, request: identity_pb2.ExportCustomerRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ExportCustomerResponse:
        v = Violations()
        customer_id, identifier = _customer_ref(request.customer, "customer", v, self.settings)
        position = None
        if request.page_token:
            try:
                position = export_position(request.page_token)
            except ValueError as error:
                v.add("page_token", str(error))
        v.raise_if_any()
        page = await self.service.export(
            customer_id, identifier, position, self._export_at_peer, list(self._peers)
        )
        return export_response_pb(page)

    async def StreamIdentityEvents(
        self, request: identity_pb2.StreamIdentityEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[identity_pb2.StreamIdentityEventsResponse]:
        v = Violations()
        cursor = parse_commit_cursor(request.from_cursor, "from_cursor", v)
        v.raise_if_any()
        while True:
            events = await self.service.store.events_after(cursor, 500)
            for event in events:
                cursor = (event.xid, event.event_id)
                yield event_pb(event)
            if not events and not request.follow:
                return
            if not events:
                await asyncio.sleep(0.2)


async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
    settings = context.settings
    assert isinstance(settings, IdentitySettings)
    servicer = IdentityServicer(IdentityService(IdentityStore(context.pool), settings), settings)
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(servicer, server)
    context.on_shutdown(servicer.close)
    return [identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name]


SPEC = ServiceSpec(
    name="identity", migrations=files("converge.identity") / "migrations", register=register
)

__all__ = ["SPEC", "IdentityServicer", "customer_pb", "json_format"]

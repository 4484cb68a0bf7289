"""Plain types of the identity service, free of gRPC and SQL.

Profile values travel as tagged JSON so one column can hold any typed value:
{"s": text} | {"n": number} | {"b": flag} | {"t": ISO time} |
{"m": {"c": currency, "u": units, "n": nanos}}. Profile field names are the
field-mask paths of `converge.v1.Profile`: "segment", "attributes.nps_last".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from converge.identity.identifiers import NormalizedIdentifier

TaggedValue = dict[str, Any]
ProfileFields = dict[str, TaggedValue]

# Profile fields other than free-form attributes, with the tag each must carry.
BUILTIN_PROFILE_FIELDS: dict[str, str] = {
    "display_name": "s",
    "segment": "s",
    "plan": "s",
    "region": "s",
    "signup_date": "t",
    "lifetime_value": "m",
    "owner_team": "s",
}


@dataclass(frozen=True)
class AttachedIdentifier:
    identifier: NormalizedIdentifier
    customer_id: str
    attached_at: datetime


@dataclass(frozen=True)
class ChannelConsent:
    channel: int
    status: int
    updated_at: datetime
    source: str


@dataclass(frozen=True)
class Preferences:
    consents: tuple[ChannelConsent, ...] = ()
    do_not_contact: bool = False
    preferred_channel: int = 0
    wants_human: bool = False
    updated_at: datetime | None = None


@dataclass(frozen=True)
class Customer:
    customer_id: str
    created_at: datetime
    updated_at: datetime
    profile: ProfileFields
    identifiers: tuple[AttachedIdentifier, ...]
    merged_customer_ids: tuple[str, ...]
    preferences: Preferences
    as_of: datetime


@dataclass(frozen=True)
class LockedCustomer:
    """A customer row a transaction holds locked, with what picks a merge's survivor."""

    customer_id: str
    created_at: datetime
    merged_into: str | None


@dataclass(frozen=True)
class ProfileChange:
    field: str
    value: TaggedValue | None
    effective_at: datetime
    recorded_at: datetime
    actor: str


@dataclass(frozen=True)
class Merge:
    merge_id: str
    surviving_customer_id: str
    merged_customer_id: str
    joining_identifiers: tuple[NormalizedIdentifier, ...]
    actor: str
    reason: str
    policy: str
    merged_at: datetime
    unmerged_at: datetime | None


@dataclass(frozen=True)
class ResolveResult:
    customer: Customer
    created: bool
    merges: tuple[Merge, ...]
    attached: tuple[NormalizedIdentifier, ...]


@dataclass(frozen=True)
class Idempotency:
    """A caller's idempotency key and a fingerprint of the request it came with."""

    key: str
    fingerprint: bytes


@dataclass(frozen=True)
class Actor:
    name: str = ""
    reason: str = ""


@dataclass(frozen=True)
class PreferenceUpdate:
    consents: tuple[tuple[int, int, datetime | None, str], ...] = ()  # channel, status, at, source
    do_not_contact: bool | None = None
    preferred_channel: int | None = None
    wants_human: bool | None = None


@dataclass(frozen=True)
class BulkRow:
    """One validated row of a bulk resolve."""

    identifiers: tuple[NormalizedIdentifier, ...]
    profile: ProfileFields
    upsert: ProfileFields | None
    lookup_only: bool
    actor: Actor
    idempotency: Idempotency | None
    # When the row's profile values became true; None: now.
    effective_at: datetime | None = None


@dataclass(frozen=True)
class BulkOutcome:
    """What one row of a bulk resolve did, or why it was refused."""

    created: bool = False
    merges: int = 0
    error: Exception | None = None


@dataclass
class BulkSummary:
    received: int = 0
    created: int = 0
    matched: int = 0
    merged: int = 0
    rejections: list[tuple[str, str, str]] = field(default_factory=list)  # row, field, reason


@dataclass(frozen=True)
class IdentityEvent:
    """One event of the outbox other services follow. Its position in the
    stream is (xid, event_id): the writing transaction's id, then the event's."""

    xid: int
    event_id: int
    event_type: int
    customer_id: str
    other_customer_id: str | None
    merge_id: str | None
    occurred_at: datetime
    identifier: NormalizedIdentifier | None  # the identifier removed, for IDENTIFIER_REMOVED


@dataclass(frozen=True)
class PeerErasure:
    service: str
    done: bool
    erased_counts: dict[str, int]
    error: str


@dataclass(frozen=True)
class PeerExport:
    """One page of another service's export: `page` is its answer as it came
    (identity passes it on untouched), `next_token` its own page token for the
    next page; `done` False when it could not be asked."""

    service: str
    done: bool
    page: Any
    next_token: str


@dataclass(frozen=True)
class ExportPosition:
    """Where a paged export resumes: the customer it is of (its surviving id
    when it began), the service asked next and that service's page token."""

    customer_id: str
    service: str
    service_token: str


@dataclass(frozen=True)
class ExportPage:
    """One page of a customer's export. The first carries identity's own part
    (`customer` set); each carries at most one page of another service."""

    customer: Customer | None
    changes: list[ProfileChange]
    merges: list[Merge]
    peer_pages: list[Any]
    unavailable: list[str]
    next: ExportPosition | None

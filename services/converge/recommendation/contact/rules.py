"""The contact rules: which candidate actions may reach the customer now, on
which channel, and if not, every reason why and until when.

Pure: plain types in, plain types out, `now` passed in, no I/O. The decisions
side reads the customer's preferences from identity on every decision (never
cached), the contact history from `ContactLedger` under the customer's lock,
and asks `assess`.

What each rule means (README, "Contact rules"):

- Consent, per contact channel: only GRANTED consent allows a channel; a
  channel not listed, never asked or DENIED is withheld NO_CONSENT. When the
  preferences could not be read, every outbound channel is withheld (fail
  closed) and automated actions are withheld as if the customer wanted a human.
- Do-not-contact: every outbound channel is withheld, whatever the consents.
- Frequency caps: at most `max_contacts` contacts on a channel ("any": on every
  channel together) in the rolling window ending now, that is the contacts
  proposed at instants t with now - window < t. Counted in UTC instants: a
  window is a duration, not a calendar period ("7 days" is 168 hours, not
  "this week"), so it means the same in every time zone and across DST
  changes. Braze and Iterable document their frequency caps the same way.
  Contacts recorded as NOT_DELIVERED do not count.
- Cool-downs: an action with `cool_down` is not proposed again (on any channel,
  in or out of a conversation) within that long after it was last proposed;
  an action the customer declined is not proposed again within
  `contact.cool_down_after_rejection` of the decline.
- Quiet hours: no outbound contact on the quiet-hours channels between `start`
  (included) and `end` (excluded), local time of the customer's time zone
  (profile attribute `time_zone`, an IANA name, else the policy's
  `default_time_zone`); the period may wrap midnight; start == end means no
  quiet hours. Local times come from zoneinfo, so DST is the zone's own.
- Open ticket: no offer (retention or cross-sell, in or out of a
  conversation) while the customer's open-tickets feature is above 0.
- Wants a human: no automated action is proposed; the hand-over actions that
  are allowed must rank first (`Verdict.must_rank_first`).

Actions without contact channels happen in the current conversation: they are
no outbound contact, so consent, do-not-contact, caps and quiet hours do not
apply to them; cool-downs, the open-ticket rule and wants-a-human do.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from typing import Protocol, get_args
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from converge.recommendation.policy.model import (
    ActionSpec,
    ContactChannelName,
    ContactRules,
    QuietHours,
)

# The policy's kinds that make an offer (no offer while a ticket is open).
OFFER_KINDS = frozenset({"retention_offer", "cross_sell_offer"})
# Hand-overs to a person, in the order they win when the customer wants a human.
HAND_OVER_KINDS = ("escalate_to_human", "escalate_to_senior_agent")
# The channels a contact may use (common.proto's ContactChannel, lower case).
CONTACT_CHANNELS: tuple[str, ...] = get_args(ContactChannelName)


class Suppression(enum.StrEnum):
    """Why a candidate is withheld: the names of recommendation.proto's
    SuppressionReason without the `SUPPRESSION_REASON_` prefix."""

    NO_CONSENT = "NO_CONSENT"
    DO_NOT_CONTACT = "DO_NOT_CONTACT"
    FREQUENCY_CAP = "FREQUENCY_CAP"
    COOL_DOWN = "COOL_DOWN"
    OPEN_TICKET = "OPEN_TICKET"
    WANTS_HUMAN = "WANTS_HUMAN"
    QUIET_HOURS = "QUIET_HOURS"


class Consent(enum.StrEnum):
    """identity.proto's ConsentStatus, lower case."""

    UNSPECIFIED = "unspecified"
    GRANTED = "granted"
    DENIED = "denied"


@dataclass(frozen=True)
class ContactPreferences:
    """The customer's consent and preferences as identity returned them."""

    # Channel -> consent; a channel not listed has no consent.
    consents: Mapping[str, Consent] = field(default_factory=dict)
    do_not_contact: bool = False
    # A contact channel, or None when the customer named none.
    preferred_channel: str | None = None
    wants_human: bool = False


@dataclass(frozen=True)
class Candidate:
    """One action the decisions side would propose, as the rules see it."""

    # Identifies the candidate in the answer (the decisions side's own key,
    # for example the action's name and product).
    key: str
    action_name: str
    kind: str
    # Where it reaches the customer, in preference order; empty: it happens
    # in the current conversation. Filter by the request's channels before:
    # a candidate whose channels were all filtered out is no candidate.
    contact_channels: tuple[str, ...] = ()
    automated: bool = False
    cool_down: timedelta | None = None

    @classmethod
    def of(cls, spec: ActionSpec, key: str | None = None) -> Candidate:
        return cls(
            key=spec.name if key is None else key,
            action_name=spec.name,
            kind=spec.kind,
            contact_channels=tuple(spec.contact_channels),
            automated=spec.automated,
            cool_down=spec.cool_down,
        )

    @property
    def outbound(self) -> bool:
        return bool(self.contact_channels)


class Contacted(Protocol):
    """What the rules read of a past proposal (ContactLedger's LedgerEntry,
    or PastContact)."""

    @property
    def action_name(self) -> str: ...
    @property
    def channel(self) -> str | None: ...
    @property
    def proposed_at(self) -> datetime: ...
    @property
    def declined_at(self) -> datetime | None: ...
    @property
    def not_delivered(self) -> bool: ...


@dataclass(frozen=True)
class PastContact:
    """A proposal of the contact history, written by hand (tests, tools)."""

    action_name: str
    # None for an action proposed in the conversation.
    channel: str | None
    proposed_at: datetime
    declined_at: datetime | None = None
    not_delivered: bool = False


@dataclass(frozen=True)
class Verdict:
    """The rules' answer for one candidate."""

    candidate: Candidate
    allowed: bool
    # Allowed: the channel to use (None in the conversation). Withheld: the
    # channel it would have used (the first in preference order), or None.
    channel: str | None
    # Every reason that applied, in SuppressionReason order; empty when allowed.
    reasons: tuple[Suppression, ...] = ()
    # For people, for example "2 emails in 7 days, cap 2; no consent for sms".
    detail: str = ""
    # The earliest instant every time-bound reason (cap, cool-down, quiet
    # hours) has lifted; None when allowed or when a reason no clock lifts
    # applies (consent, do-not-contact, open ticket, wants a human).
    suppressed_until: datetime | None = None
    # An allowed hand-over while the customer wants a human: rank it first.
    must_rank_first: bool = False


@dataclass(frozen=True)
class _Block:
    reason: Suppression
    detail: str
    # When it lifts by itself; None: not by the clock.
    until: datetime | None


def history_horizon(rules: ContactRules, actions: Iterable[ActionSpec]) -> timedelta:
    """How far back the contact history must reach for `assess` to see every
    contact that can still count: the longest cap window or cool-down."""
    spans = [rules.cool_down_after_rejection]
    spans += [cap.window for cap in rules.frequency_caps]
    spans += [action.cool_down for action in actions if action.cool_down is not None]
    return max(spans)


def assess(
    candidates: Sequence[Candidate],
    preferences: ContactPreferences | None,
    history: Iterable[Contacted],
    rules: ContactRules,
    *,
    time_zone: str | None,
    open_tickets: float | None,
    now: datetime,
) -> list[Verdict]:
    """One verdict per candidate, in the candidates' order.

    `preferences` None: they could not be read (fail closed). `time_zone`: the
    profile's `time_zone` attribute, None when absent (an unknown name falls
    back to the policy's default too). `open_tickets`: the live feature, None
    when the customer has none (no open ticket). `now` must be aware.
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    past = [contact for contact in history if not contact.not_delivered]
    zone = _zone(time_zone, rules.default_time_zone)
    wants_human = preferences is None or preferences.wants_human
    verdicts = []
    for candidate in candidates:
        action_blocks = _action_blocks(candidate, preferences, past, rules, open_tickets, now)
        if not candidate.outbound:
            verdicts.append(_verdict(candidate, action_blocks, {}, wants_human))
            continue
        channel_blocks = {
            channel: _channel_blocks(channel, preferences, past, rules, zone, now)
            for channel in _preference_order(candidate, preferences)
        }
        verdicts.append(_verdict(candidate, action_blocks, channel_blocks, wants_human))
    return verdicts


def _verdict(
    candidate: Candidate,
    action_blocks: list[_Block],
    channel_blocks: dict[str, list[_Block]],
    wants_human: bool,
) -> Verdict:
    open_channel = next((c for c, blocks in channel_blocks.items() if not blocks), None)
    if not action_blocks and (not candidate.outbound or open_channel is not None):
        return Verdict(
            candidate,
            allowed=True,
            channel=open_channel,
            must_rank_first=wants_human and candidate.kind in HAND_OVER_KINDS,
        )
    blocks = list(action_blocks)
    for channel_list in channel_blocks.values():
        blocks += [b for b in channel_list if b not in blocks]
    order = list(Suppression)
    reasons = tuple(sorted({b.reason for b in blocks}, key=order.index))
    # Time-bound lower bound: the action's own blocks must all lift, and at
    # least one channel's blocks must all lift.
    until = _all_lift(action_blocks)
    channel_untils = [_all_lift(bs) for bs in channel_blocks.values()]
    if channel_untils and None not in channel_untils:
        until = _later(until, min(u for u in channel_untils if u is not None))
    return Verdict(
        candidate,
        allowed=False,
        channel=next(iter(channel_blocks), None),
        reasons=reasons,
        detail="; ".join(dict.fromkeys(b.detail for b in blocks)),
        suppressed_until=None if until is _NEVER or until is None else until,
    )


_NEVER = datetime.max.replace(tzinfo=UTC)


def _all_lift(blocks: Sequence[_Block]) -> datetime | None:
    """When every block has lifted: None if there are none, _NEVER if one is
    not lifted by the clock."""
    latest: datetime | None = None
    for block in blocks:
        if block.until is None:
            return _NEVER
        latest = block.until if latest is None else max(latest, block.until)
    return latest


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def _preference_order(candidate: Candidate, preferences: ContactPreferences | None) -> list[str]:
    channels = list(dict.fromkeys(candidate.contact_channels))
    preferred = preferences.preferred_channel if preferences is not None else None
    if preferred in channels:
        channels.remove(preferred)
        channels.insert(0, preferred)
    return channels


def _action_blocks(
    candidate: Candidate,
    preferences: ContactPreferences | None,
    past: Sequence[Contacted],
    rules: ContactRules,
    open_tickets: float | None,
    now: datetime,
) -> list[_Block]:
    blocks = []
    if candidate.automated and (preferences is None or preferences.wants_human):
        why = (
            "contact preferences could not be read; automated actions withheld"
            if preferences is None
            else "the customer wants a human; the action is automated"
        )
        blocks.append(_Block(Suppression.WANTS_HUMAN, why, None))
    if (
        rules.suppress_offers_while_ticket_open
        and candidate.kind in OFFER_KINDS
        and open_tickets is not None
        and open_tickets > 0
    ):
        count = int(open_tickets)
        noun = "ticket" if count == 1 else "tickets"
        blocks.append(_Block(Suppression.OPEN_TICKET, f"{count} open {noun}; no offers", None))
    same = [c for c in past if c.action_name == candidate.action_name]
    if candidate.cool_down is not None:
        recent = [c.proposed_at for c in same if c.proposed_at > now - candidate.cool_down]
        if recent:
            last = max(recent)
            blocks.append(
                _Block(
                    Suppression.COOL_DOWN,
                    f"proposed {_ago(now - last)}, cool-down {_span(candidate.cool_down)}",
                    last + candidate.cool_down,
                )
            )
    rejection = rules.cool_down_after_rejection
    declines = [
        c.declined_at for c in same if c.declined_at is not None and c.declined_at > now - rejection
    ]
    if declines:
        last = max(declines)
        blocks.append(
            _Block(
                Suppression.COOL_DOWN,
                f"declined {_ago(now - last)}, cool-down after a rejection {_span(rejection)}",
                last + rejection,
            )
        )
    return blocks


def _channel_blocks(
    channel: str,
    preferences: ContactPreferences | None,
    past: Sequence[Contacted],
    rules: ContactRules,
    zone: ZoneInfo,
    now: datetime,
) -> list[_Block]:
    blocks = []
    if preferences is None:
        blocks.append(
            _Block(Suppression.NO_CONSENT, "consent could not be read; no outbound contact", None)
        )
    else:
        if preferences.do_not_contact:
            blocks.append(
                _Block(Suppression.DO_NOT_CONTACT, "the customer asked for no contact", None)
            )
        if preferences.consents.get(channel, Consent.UNSPECIFIED) is not Consent.GRANTED:
            blocks.append(_Block(Suppression.NO_CONSENT, f"no consent for {channel}", None))
    for cap in rules.frequency_caps:
        if cap.channel not in (channel, "any"):
            continue
        counted = sorted(
            c.proposed_at
            for c in past
            if c.channel is not None
            and (cap.channel == "any" or c.channel == channel)
            and c.proposed_at > now - cap.window
        )
        if len(counted) < cap.max_contacts:
            continue
        # The cap lifts when enough of the counted contacts have left the
        # window for one more to fit; a cap of 0 never lifts.
        leaving = len(counted) - cap.max_contacts
        until = counted[leaving] + cap.window if cap.max_contacts > 0 else None
        blocks.append(
            _Block(
                Suppression.FREQUENCY_CAP,
                f"{len(counted)} {_contacts(cap.channel, len(counted))} in {_span(cap.window)}, "
                f"cap {cap.max_contacts}",
                until,
            )
        )
    quiet = rules.quiet_hours
    if quiet is not None and channel in quiet.channels:
        ends = quiet_hours_end(quiet, zone, now)
        if ends is not None:
            blocks.append(
                _Block(
                    Suppression.QUIET_HOURS,
                    f"quiet hours {quiet.start:%H:%M}-{quiet.end:%H:%M} {zone.key} for {channel}",
                    ends,
                )
            )
    return blocks


def in_quiet_hours(quiet: QuietHours, local: time) -> bool:
    """Whether a local wall-clock time falls in [start, end), wrapping midnight."""
    if quiet.start == quiet.end:
        return False
    if quiet.start < quiet.end:
        return quiet.start <= local < quiet.end
    return local >= quiet.start or local < quiet.end


def quiet_hours_end(quiet: QuietHours, zone: ZoneInfo, now: datetime) -> datetime | None:
    """When the quiet hours `now` falls in end (UTC); None when not in them.

    An end that a DST change skips (02:30 on a spring-forward night) is read
    with the offset before the change, so it lands after the gap: quiet hours
    never end early."""
    local = now.astimezone(zone)
    if not in_quiet_hours(quiet, local.time().replace(tzinfo=None)):
        return None
    end = datetime.combine(local.date(), quiet.end, tzinfo=zone)
    if end.astimezone(UTC) <= now:
        end = datetime.combine(local.date() + timedelta(days=1), quiet.end, tzinfo=zone)
    return end.astimezone(UTC)


def _zone(name: str | None, default: str) -> ZoneInfo:
    for candidate in (name, default):
        if candidate:
            try:
                return ZoneInfo(candidate)
            except (ZoneInfoNotFoundError, ValueError):
                continue
    return ZoneInfo("UTC")


_NOUNS = {
    "email": ("email", "emails"),
    "sms": ("SMS", "SMS"),
    "phone": ("call", "calls"),
    "push": ("push notification", "push notifications"),
    "in_app": ("in-app message", "in-app messages"),
    "any": ("contact", "contacts"),
}


def _contacts(channel: str, count: int) -> str:
    one, many = _NOUNS.get(channel, (channel, channel))
    return one if count == 1 else many


def _span(span: timedelta) -> str:
    """'7 days', '36 hours', '30 minutes': the largest whole unit."""
    seconds = int(span.total_seconds())
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds % size == 0 and seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'' if n == 1 else 's'}"
    return f"{seconds} seconds"


def _ago(span: timedelta) -> str:
    """'3 days ago', '5 hours ago': rounded down to the largest unit."""
    seconds = max(0, int(span.total_seconds()))
    for unit, size in (("day", 86_400), ("hour", 3_600), ("minute", 60)):
        if seconds >= size:
            n = seconds // size
            return f"{n} {unit}{'' if n == 1 else 's'} ago"
    return "just now"

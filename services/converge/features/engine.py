"""The feature registry and the one implementation of it, shared by live serving
and point-in-time training so that the two cannot disagree.

Both paths fold interactions (`Event`) into a `CustomerState` and read features
from it with `customer_features` / `ticket_features`: live serving keeps one
state per customer current as events arrive (in any order: late events are
normal); training builds the state of the events that occurred before each
cutoff (`features_at_cutoffs`). The state depends only on the multiset of
events applied, never on their order, so the two give identical values.

Windows are UTC calendar days, so that a state can be kept incrementally in
per-day buckets: a feature with a window of W days read at `as_of` covers the
events whose UTC day (days since 1970-01-01) lies in
[day(as_of) - (W - 1), day(as_of)]. Callers guarantee that a state read at
`as_of` holds only events that occurred before `as_of` (point in time:
strictly before). An event on day(as_of) - 7 is therefore outside the 7-day
window and inside the 30-day one. Windows are 7, 30 and 90 days, and 60 for
`usage_change_30d` (last 30 days minus the 30 before).

Bounds. A customer's state stays small whatever its history (20,000 products
and tickets once made a 3.7 MB state, rewritten on every event):
`CustomerState.prune(now)`, run at every write of a live state, drops
- the day buckets no window read at `now` or later reaches (90 days);
- resolved tickets and cancelled products with no interaction in those 90
  days (their ticket features then read as unknown);
- beyond the caps, the least recently active (ties by id): at most
  `MAX_OPEN_TICKETS` open and `MAX_CLOSED_TICKETS` other tickets,
  `MAX_HELD_PRODUCTS` held and `MAX_CANCELLED_PRODUCTS` cancelled products.
  `open_tickets` and `products_held` therefore saturate at their cap.
  Point-in-time reads apply the same caps at each cutoff (`cap()`).
Live and point-in-time features agree exactly for a customer within the caps
whose events arrive less than 90 days late for a resolved ticket or a
cancelled product (a late event about one already dropped starts it afresh:
a cancelled product's older purchase would count it as held again; the
pruned ticket's own features would miss its earlier history). Beyond the
caps both saturate, but which tickets were dropped can depend on the order
events came in, so a ticket's own features (and, rarely, a count) may differ.

Types no definition names (custom types) count only in the all-types and
per-channel features, until a feature-set version includes them.

Exactness: times are kept as integer microseconds since the epoch and summed
values (amounts, scores, sentiment) as integer nano-units (value * 10^9,
rounded once per event, matching `Money.nanos`), so sums, means and trends are
exact integer arithmetic until one final, correctly rounded division: the
same events give bit-identical features whatever the order, merges or
JSON round trips in between.

Values: counts are always present; a feature that `may_be_missing` is left out
of the result when it has no value (read it as NaN, never as 0). A CATEGORY
feature is the index into its `categories`; a value not in the list is
"other" (index = len(categories)). A COUNT definition with an `attribute` and
`categories` counts only interactions whose attribute is one of them (for
example action outcomes that were accepted).

`FEATURE_SET_VERSION` changes whenever any definition changes;
`STATE_VERSION` whenever the kept state changes shape, and a stored state of
another version must be rebuilt from the interactions
(`CustomerState.from_json` raises `StateVersionError`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, Literal, NamedTuple, TypeVar

# An attribute's value: text, a number, a flag or a tz-aware (UTC) time.
AttrValue = str | float | bool | datetime
# Ticket priorities, lowest first (the interactions service's catalogue uses these).
PRIORITIES: tuple[str, ...] = ("low", "normal", "high", "urgent")


Aggregation = Literal[
    "count",
    "sum",
    "mean",
    "last",
    "distinct_count",
    "time_since",
    "time_until",
    "trend",
    "current",
    "category",
]
Entity = Literal["customer", "ticket"]
Prediction = Literal["churn", "escalation", "cross_sell"]

# `converge.v1.Channel` names by number (index 0 is CHANNEL_UNSPECIFIED).
CHANNEL_NAMES: tuple[str, ...] = (
    "unspecified",
    "web",
    "mobile",
    "email",
    "chat",
    "phone",
    "social",
    "in_store",
    "service_desk",
    "product",
    "agent_desktop",
    "sms",
)
TICKET_CATEGORIES: tuple[str, ...] = (
    "billing",
    "technical",
    "account",
    "access",
    "network",
    "hardware",
    "software",
    "service_request",
    "delivery",
    "cancellation",
)
CONVERSATIONS = ("conversation.chat", "conversation.call", "conversation.email")
MARKETING = ("marketing.sent", "marketing.opened", "marketing.clicked", "marketing.unsubscribed")
HOLDING = (
    "purchase",
    "subscription.started",
    "subscription.upgraded",
    "subscription.downgraded",
    "subscription.renewed",
)
CANCELLING = ("subscription.cancelled",)
# Ticket types in the order of `_Ticket.counts`.
TICKET_KINDS: tuple[str, ...] = (
    "ticket.opened",
    "ticket.updated",
    "ticket.priority_changed",
    "ticket.reassigned",
    "ticket.escalated",
    "ticket.reopened",
    "ticket.resolved",
    "ticket.sla_breached",
)
_OPENED, _UPDATED, _PRIORITY_CHANGED, _REASSIGNED, _ESCALATED, _REOPENED, _RESOLVED, _BREACHED = (
    range(len(TICKET_KINDS))
)
# Ticket status codes, ordered so that on equal times the larger wins.
_STATUS_OF_KIND = {_OPENED: 0, _REOPENED: 1, _RESOLVED: 2}
_STATUS_RESOLVED = 2
_PRIORITY_RANK = {p: i for i, p in enumerate(PRIORITIES)}

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US_PER_HOUR = 3_600_000_000
_US_PER_DAY = 86_400_000_000
_NANO = 10**9
# Bumped by hand whenever the kept state's meaning changes without a selector change.
_STATE_LAYOUT = 2


@dataclass(slots=True)
class Event:
    """The feature engine's view of one stored interaction."""

    occurred_at: datetime  # tz-aware UTC
    type: str
    channel: int  # `converge.v1.Channel` number
    attributes: Mapping[str, AttrValue]
    ticket_id: str = ""
    product_id: str = ""
    # Major units of the reporting currency, e.g. 12.5; a Decimal (exact) from
    # requests and the store.
    amount: Decimal | float | None = None
    sentiment: float | None = None  # -1 .. 1; None when unknown


@dataclass(frozen=True)
class FeatureDefinition:
    """One feature of the registry, mirroring `converge.v1.FeatureDefinition`;
    `aggregation` is the lower-case suffix of `FeatureAggregation`."""

    name: str
    description: str
    entity: Entity
    aggregation: Aggregation
    window_days: int | None = None
    interaction_types: tuple[str, ...] = ()
    channel: int = 0
    attribute: str = ""
    unit: str = "count"
    categories: tuple[str, ...] = ()
    may_be_missing: bool = False
    used_by: tuple[Prediction, ...] = ()


# --- the registry ------------------------------------------------------------------

_ALL: tuple[Prediction, ...] = ("churn", "escalation", "cross_sell")
_CHURN_XSELL: tuple[Prediction, ...] = ("churn", "cross_sell")
_CHURN_ESC: tuple[Prediction, ...] = ("churn", "escalation")
_ESC: tuple[Prediction, ...] = ("escalation",)
_WINDOWS = (7, 30, 90)
_FAMILIES: tuple[tuple[str, tuple[str, ...], str, tuple[Prediction, ...]], ...] = (
    ("ticket_opened", ("ticket.opened",), "support tickets opened", _CHURN_ESC),
    ("conversation", CONVERSATIONS, "conversations (chat, call, email)", _ALL),
    ("complaint", ("complaint",), "complaints", _CHURN_ESC),
    ("login", ("product.login",), "product logins", _CHURN_XSELL),
    ("usage", ("product.usage",), "product feature uses", _CHURN_XSELL),
    ("purchase", ("purchase",), "purchases", _CHURN_XSELL),
    (
        "marketing",
        MARKETING,
        "marketing touches (sent, opened, clicked, unsubscribed)",
        _CHURN_XSELL,
    ),
)


def _customer(
    name: str, description: str, aggregation: Aggregation, **kw: Any
) -> FeatureDefinition:
    kw.setdefault("used_by", ("churn",))
    return FeatureDefinition(name, description, "customer", aggregation, **kw)


def _ticket(name: str, description: str, aggregation: Aggregation, **kw: Any) -> FeatureDefinition:
    kw.setdefault("used_by", _ESC)
    return FeatureDefinition(name, description, "ticket", aggregation, **kw)


def _build_registry() -> tuple[FeatureDefinition, ...]:
    defs: list[FeatureDefinition] = []
    for w in _WINDOWS:
        defs.append(
            _customer(f"count_{w}d_all", f"Interactions of any type in the last {w} days.", "count",
                      window_days=w, used_by=_ALL)
        )  # fmt: skip
    for family, types, label, used_by in _FAMILIES:
        for w in _WINDOWS:
            defs.append(
                _customer(f"count_{w}d_{family}", f"Number of {label} in the last {w} days.",
                          "count", window_days=w, interaction_types=types, used_by=used_by)
            )  # fmt: skip
    for w in _WINDOWS:
        defs.append(
            _customer(f"payment_failures_{w}d", f"Failed payments in the last {w} days.", "count",
                      window_days=w, interaction_types=("payment.failed",), used_by=_CHURN_XSELL)
        )  # fmt: skip
    for number, channel in enumerate(CHANNEL_NAMES):
        if number == 0:
            continue
        for w in _WINDOWS:
            defs.append(
                _customer(f"count_{w}d_channel_{channel}",
                          f"Interactions on the {channel} channel in the last {w} days.", "count",
                          window_days=w, channel=number, used_by=_CHURN_XSELL)
            )  # fmt: skip
    for w in (30, 90):
        defs.append(
            _customer(f"spend_{w}d", f"Sum of purchase amounts in the last {w} days.", "sum",
                      window_days=w, interaction_types=("purchase",), attribute="amount",
                      unit="reporting_currency", used_by=_CHURN_XSELL)
        )  # fmt: skip
    defs += [
        _customer("days_since_last_interaction", "Days since the latest interaction of any type.",
                  "time_since", unit="days", may_be_missing=True, used_by=_ALL),
        _customer("days_since_last_purchase", "Days since the latest purchase.", "time_since",
                  interaction_types=("purchase",), unit="days", may_be_missing=True,
                  used_by=_CHURN_XSELL),
        _customer("days_since_last_login", "Days since the latest product login.", "time_since",
                  interaction_types=("product.login",), unit="days", may_be_missing=True,
                  used_by=_CHURN_XSELL),
        _customer("tenure_days", "Days since the customer's first interaction.", "time_since",
                  unit="days", may_be_missing=True, used_by=_ALL),
    ]  # fmt: skip
    for survey, label in (("nps", "net promoter"), ("csat", "satisfaction"), ("ces", "effort")):
        types = (f"survey.{survey}",)
        defs += [
            _customer(f"{survey}_last", f"The latest {label} score ({survey.upper()}).", "last",
                      interaction_types=types, attribute="score", unit="points",
                      may_be_missing=True, used_by=_ALL),
            _customer(f"{survey}_mean_90d",
                      f"Mean {label} score ({survey.upper()}) over the last 90 days.", "mean",
                      window_days=90, interaction_types=types, attribute="score", unit="points",
                      may_be_missing=True, used_by=_ALL),
        ]  # fmt: skip
    defs += [
        _customer("open_tickets", "Support tickets open now (opened or reopened, not resolved).",
                  "current", interaction_types=("ticket.opened", "ticket.reopened",
                                                "ticket.resolved"), used_by=_ALL),
        _customer("escalations_90d", "Ticket escalations in the last 90 days.", "count",
                  window_days=90, interaction_types=("ticket.escalated",), used_by=_CHURN_ESC),
        _customer("reopens_90d", "Tickets reopened in the last 90 days.", "count", window_days=90,
                  interaction_types=("ticket.reopened",), used_by=_CHURN_ESC),
        _customer("sla_breaches_90d", "Ticket SLA breaches in the last 90 days.", "count",
                  window_days=90, interaction_types=("ticket.sla_breached",), used_by=_CHURN_ESC),
        _customer("priority_changes_90d", "Ticket priority changes in the last 90 days.", "count",
                  window_days=90, interaction_types=("ticket.priority_changed",),
                  used_by=_CHURN_ESC),
        _customer("reassignments_90d", "Ticket reassignments in the last 90 days.", "count",
                  window_days=90, interaction_types=("ticket.reassigned",), used_by=_CHURN_ESC),
        _customer("products_held",
                  "Distinct products whose latest purchase or subscription event is not a "
                  "cancellation.", "distinct_count", interaction_types=HOLDING + CANCELLING,
                  attribute="product_id", used_by=_CHURN_XSELL),
        _customer("subscription_upgrades_90d", "Subscription upgrades in the last 90 days.",
                  "count", window_days=90, interaction_types=("subscription.upgraded",),
                  used_by=_CHURN_XSELL),
        _customer("subscription_downgrades_90d", "Subscription downgrades in the last 90 days.",
                  "count", window_days=90, interaction_types=("subscription.downgraded",),
                  used_by=_CHURN_XSELL),
        _customer("subscription_cancellations_90d",
                  "Subscription cancellations in the last 90 days.", "count", window_days=90,
                  interaction_types=("subscription.cancelled",), used_by=_CHURN_XSELL),
        _customer("sentiment_mean_30d", "Mean known sentiment over the last 30 days (-1 to 1).",
                  "mean", window_days=30, attribute="sentiment", unit="sentiment",
                  may_be_missing=True, used_by=_ALL),
        _customer("sentiment_trend_30d",
                  "Least-squares slope of known sentiment per day over the last 30 days "
                  "(missing with fewer than 2 distinct days).", "trend", window_days=30,
                  attribute="sentiment", unit="sentiment_per_day", may_be_missing=True,
                  used_by=_ALL),
        _customer("usage_change_30d",
                  "Logins and feature uses in the last 30 days minus those in the 30 days "
                  "before.", "trend", window_days=60,
                  interaction_types=("product.login", "product.usage"), used_by=_CHURN_XSELL),
        _customer("marketing_clicks_30d", "Marketing messages clicked in the last 30 days.",
                  "count", window_days=30, interaction_types=("marketing.clicked",),
                  used_by=_CHURN_XSELL),
        _customer("marketing_unsubscribes_90d", "Marketing unsubscribes in the last 90 days.",
                  "count", window_days=90, interaction_types=("marketing.unsubscribed",),
                  used_by=_CHURN_XSELL),
    ]  # fmt: skip
    for outcome in ("accepted", "declined", "converted"):
        defs.append(
            _customer(f"actions_{outcome}_90d",
                      f"Recommended actions or alerts {outcome} in the last 90 days.", "count",
                      window_days=90, interaction_types=("action.outcome",), attribute="outcome",
                      categories=(outcome,), used_by=_ALL)
        )  # fmt: skip
    defs += [
        _ticket("ticket_age_hours", "Hours since the ticket was opened (or first seen, if never opened).",
                "time_since", interaction_types=("ticket.opened",), unit="hours"),
        _ticket("ticket_hours_since_last_activity",
                "Hours since the latest interaction about the ticket.", "time_since",
                unit="hours"),
        _ticket("ticket_open", "1 when the ticket is open (opened or reopened, not resolved).",
                "current", interaction_types=("ticket.opened", "ticket.reopened",
                                              "ticket.resolved")),
        _ticket("ticket_priority", "The ticket's current priority.", "category",
                interaction_types=("ticket.opened", "ticket.priority_changed"),
                attribute="priority", unit="", categories=PRIORITIES, may_be_missing=True),
        _ticket("ticket_priority_changes", "Priority changes of the ticket so far.", "current",
                interaction_types=("ticket.priority_changed",)),
        _ticket("ticket_reassignments", "Reassignments of the ticket so far.", "current",
                interaction_types=("ticket.reassigned",)),
        _ticket("ticket_updates", "Updates of the ticket so far.", "current",
                interaction_types=("ticket.updated",)),
        _ticket("ticket_escalations", "Escalations of the ticket so far.", "current",
                interaction_types=("ticket.escalated",)),
        _ticket("ticket_reopens", "Times the ticket was reopened so far.", "current",
                interaction_types=("ticket.reopened",)),
        _ticket("ticket_sla_breaches", "SLA breaches of the ticket so far.", "current",
                interaction_types=("ticket.sla_breached",)),
        _ticket("ticket_channel", "The channel the ticket was opened on.", "category",
                interaction_types=("ticket.opened",), attribute="channel", unit="",
                categories=CHANNEL_NAMES[1:], may_be_missing=True),
        _ticket("ticket_category", "The category the ticket was opened with.", "category",
                interaction_types=("ticket.opened",), attribute="category", unit="",
                categories=TICKET_CATEGORIES, may_be_missing=True),
        _ticket("ticket_last_sentiment",
                "The latest known sentiment of an interaction about the ticket.", "last",
                attribute="sentiment", unit="sentiment", may_be_missing=True),
        _ticket("ticket_sla_hours_left", "Hours until the ticket's SLA runs out; negative once "
                "passed.", "time_until", interaction_types=("ticket.opened",),
                attribute="sla_due_at", unit="hours", may_be_missing=True),
        _ticket("ticket_customer_open_tickets", "Support tickets the customer has open now.",
                "current", interaction_types=TICKET_KINDS),
    ]  # fmt: skip
    return tuple(defs)


REGISTRY: tuple[FeatureDefinition, ...] = _build_registry()
CUSTOMER_FEATURES: tuple[str, ...] = tuple(d.name for d in REGISTRY if d.entity == "customer")
TICKET_FEATURES: tuple[str, ...] = tuple(d.name for d in REGISTRY if d.entity == "ticket")


def _digest(data: object) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


FEATURE_SET_VERSION: str = "v1-" + _digest([asdict(d) for d in REGISTRY])


# --- what the state keeps, derived from the registry --------------------------------


class _Selector(NamedTuple):
    """Which interactions an aggregation looks at, and which value it takes."""

    types: tuple[str, ...]
    channel: int
    attribute: str = ""
    values: tuple[str, ...] = ()

    def matches(self, type_: str, channel: int) -> bool:
        return (not self.types or type_ in self.types) and (self.channel in (0, channel))

    @property
    def description(self) -> str:
        text = f"{'|'.join(self.types) or '*'}@{self.channel}"
        if self.attribute:
            text += f":{self.attribute}"
        if self.values:
            text += f"={'|'.join(self.values)}"
        return text


def _selector(d: FeatureDefinition) -> _Selector:
    if d.aggregation == "count" and d.attribute:
        return _Selector(d.interaction_types, d.channel, d.attribute, d.categories)
    return _Selector(d.interaction_types, d.channel, d.attribute)


# Customer features computed from more than their definition's selector.
_SPECIAL = frozenset({"tenure_days", "open_tickets", "products_held"})


def _collect_selectors() -> tuple[
    list[_Selector], list[_Selector], list[_Selector], list[_Selector]
]:
    """What the state keeps per day (counts; number and nano-sum of values) and
    overall (latest values; latest times), one entry per distinct selector."""
    counts: list[_Selector] = []
    values: list[_Selector] = []
    lasts: list[_Selector] = []
    times: list[_Selector] = []
    for d in REGISTRY:
        if d.entity != "customer" or d.name in _SPECIAL:
            continue
        if d.window_days is not None:
            valued = d.aggregation in ("sum", "mean", "trend") and d.attribute
            target = values if valued else counts
        elif d.aggregation == "last":
            target = lasts
        elif d.aggregation == "time_since":
            target = times
        else:
            raise AssertionError(f"feature {d.name} has no computation")
        selector = _selector(d)
        if selector not in target:
            target.append(selector)
    return counts, values, lasts, times


_COUNTS, _VALUES, _LASTS, _TIMES = _collect_selectors()
# Short state keys ("c3": a count, "v1": a value, as "n:v1" and "s:v1" in day
# buckets), so stored states stay small; STATE_VERSION hashes the descriptions.
_KEYS: dict[tuple[str, _Selector], str] = {
    (prefix, s): f"{prefix}{i}"
    for prefix, selectors in (("c", _COUNTS), ("v", _VALUES), ("l", _LASTS), ("t", _TIMES))
    for i, s in enumerate(selectors)
}
_MAX_WINDOW = max(d.window_days or 0 for d in REGISTRY)
# The state's bound (see "Bounds" above): the most tickets and products it
# keeps, each group its most recently active. Open tickets and held products
# are what `open_tickets` and `products_held` count, so these two saturate at
# their cap; at the caps a state is about 60 KB of JSON.
MAX_OPEN_TICKETS = 200
MAX_CLOSED_TICKETS = 200  # resolved (or never opened) within the longest window
MAX_HELD_PRODUCTS = 500
MAX_CANCELLED_PRODUCTS = 200  # cancelled within the longest window
_SNAPSHOTS = frozenset({d.window_days for d in REGISTRY if d.window_days} | {30})

STATE_VERSION: str = "s1-" + _digest(
    [_STATE_LAYOUT, [s.description for s in _COUNTS + _VALUES + _LASTS + _TIMES], TICKET_KINDS,
     PRIORITIES, HOLDING, CANCELLING, _MAX_WINDOW]
)  # fmt: skip


class _Plan(NamedTuple):
    """What apply() does for one (type, channel): computed once per pair."""

    counts: tuple[str, ...]
    filtered: tuple[tuple[str, str, frozenset[str]], ...]  # (key, attribute, values)
    values: tuple[tuple[str, str, str], ...]  # (number key, sum key, attribute)
    lasts: tuple[tuple[str, str], ...]  # (key, attribute)
    times: tuple[str, ...]
    ticket_kind: int  # index into TICKET_KINDS, -1 for other types
    product: int  # 0: none, 1: holds the product, 2: cancels it


def _make_plan(type_: str, channel: int) -> _Plan:
    counts = tuple(_KEYS["c", s] for s in _COUNTS if not s.values and s.matches(type_, channel))
    filtered = tuple(
        (_KEYS["c", s], s.attribute, frozenset(s.values))
        for s in _COUNTS
        if s.values and s.matches(type_, channel)
    )
    values = tuple(
        ("n:" + _KEYS["v", s], "s:" + _KEYS["v", s], s.attribute)
        for s in _VALUES
        if s.matches(type_, channel)
    )
    lasts = tuple((_KEYS["l", s], s.attribute) for s in _LASTS if s.matches(type_, channel))
    times = tuple(_KEYS["t", s] for s in _TIMES if s.matches(type_, channel))
    kind = TICKET_KINDS.index(type_) if type_ in TICKET_KINDS else -1
    product = 1 if type_ in HOLDING else 2 if type_ in CANCELLING else 0
    return _Plan(counts, filtered, values, lasts, times, kind, product)


_KNOWN_TYPES = frozenset(
    t for d in REGISTRY for t in d.interaction_types
) | frozenset(TICKET_KINDS + HOLDING + CANCELLING)  # fmt: skip
_PLANS: dict[tuple[str, int], _Plan] = {
    (t, c): _make_plan(t, c) for t in _KNOWN_TYPES for c in range(len(CHANNEL_NAMES))
}


def _plan(type_: str, channel: int) -> _Plan:
    """The plan of a pair not precomputed: a type no feature names (custom
    types share the plan of type "") or a channel number beyond the enum."""
    key = (type_ if type_ in _KNOWN_TYPES else "", channel)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _make_plan(*key)
    return plan


def _micros(at: datetime) -> int:
    """Microseconds since the epoch (exact; `at` must be tz-aware)."""
    delta = at - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _day(at: datetime) -> int:
    """The UTC day of `at`, in days since 1970-01-01."""
    return (at - _EPOCH).days


# The largest value folded, in nano-units: 1e9 major units, the most a Money
# may carry (`converge.runtime.fields.MAX_MONEY_UNITS`). Larger numbers (an
# attribute's) are not folded, as non-finite ones are not: the state keeps
# sums in 64-bit integers (it is stored through orjson), and a sum is held
# within them by saturating at `SUM_LIMIT` (9.2e9 major units a day; read
# such a sum as "at least").
MAX_FOLDED_NANOS = 10**18
SUM_LIMIT = 2**63 - 1


def _nanos(value: object) -> int | None:
    """A finite number of at most `MAX_FOLDED_NANOS` nano-units as integer
    nano-units (a Decimal amount exactly); None for anything else."""
    # (None first: most events carry no amount and no sentiment. A tuple, not
    # `int | float`, which builds a union object on every call.)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        scaled = value * 1e9
        if not math.isfinite(scaled):
            return None
        nanos = round(scaled)
    elif isinstance(value, Decimal):
        if not value.is_finite():
            return None
        nanos = int(value.scaleb(9).to_integral_value(ROUND_HALF_EVEN))
    else:
        return None
    return nanos if -MAX_FOLDED_NANOS <= nanos <= MAX_FOLDED_NANOS else None


def _saturated(total: int) -> int:
    return SUM_LIMIT if total > 0 else -SUM_LIMIT


def _value_nanos(event: Event, attribute: str) -> int | None:
    if attribute == "amount":
        return _nanos(event.amount)
    if attribute == "sentiment":
        return _nanos(event.sentiment)
    return _nanos(event.attributes.get(attribute))


# --- the state ---------------------------------------------------------------------


class StateVersionError(ValueError):
    """A stored state was kept by another STATE_VERSION; rebuild it from events."""


_Opened = tuple[int, int, str, int, int]  # (time, channel, category, has SLA, SLA due time)


@dataclass(slots=True)
class _Ticket:
    """One ticket's sub-state; every field combines order-independently."""

    first: int  # earliest time of any interaction about it
    last: int  # latest time of any interaction about it
    counts: list[int] = field(default_factory=lambda: [0] * len(TICKET_KINDS))
    opened: _Opened | None = None  # the earliest ticket.opened
    status: tuple[int, int] | None = None  # (time, status code), latest
    priority: tuple[int, int] | None = None  # (time, priority rank), latest
    sentiment: tuple[int, float] | None = None  # (time, sentiment), latest

    @property
    def known(self) -> bool:
        return any(self.counts)

    @property
    def open(self) -> bool:
        return self.status is not None and self.status[1] != _STATUS_RESOLVED

    def copy(self) -> _Ticket:
        return _Ticket(
            self.first, self.last, list(self.counts), self.opened, self.status, self.priority,
            self.sentiment,
        )  # fmt: skip

    def absorb(self, other: _Ticket) -> None:
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.opened = _min_opt(self.opened, other.opened)
        self.status = _max_opt(self.status, other.status)
        self.priority = _max_opt(self.priority, other.priority)
        self.sentiment = _max_opt(self.sentiment, other.sentiment)

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "last": self.last,
            "counts": list(self.counts),
            "opened": None if self.opened is None else list(self.opened),
            "status": None if self.status is None else list(self.status),
            "priority": None if self.priority is None else list(self.priority),
            "sentiment": None if self.sentiment is None else list(self.sentiment),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> _Ticket:
        opened = d["opened"]
        status, priority, sentiment = d["status"], d["priority"], d["sentiment"]
        return cls(
            first=int(d["first"]),
            last=int(d["last"]),
            counts=[int(c) for c in d["counts"]],
            opened=None
            if opened is None
            else (int(opened[0]), int(opened[1]), str(opened[2]), int(opened[3]), int(opened[4])),
            status=None if status is None else (int(status[0]), int(status[1])),
            priority=None if priority is None else (int(priority[0]), int(priority[1])),
            sentiment=None if sentiment is None else (int(sentiment[0]), float(sentiment[1])),
        )


_T = TypeVar("_T", bound=tuple[Any, ...])


def _min_opt(a: _T | None, b: _T | None) -> _T | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _max_opt(a: _T | None, b: _T | None) -> _T | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


@dataclass(slots=True)
class CustomerState:
    """The incremental feature state of one customer. `apply` is
    order-independent: the same multiset of events gives an equal state."""

    # Kept in the shapes JSON has (day numbers as strings, pairs as lists), so
    # a stored state is used as parsed and stored as it is: converting ~2 KB of
    # state per customer per ingest batch cost more than folding the events.
    days: dict[str, dict[str, int]] = field(default_factory=dict)  # str(day) -> key -> count/nanos
    first: int | None = None  # earliest interaction time (µs)
    times: dict[str, int] = field(default_factory=dict)  # key -> latest time (µs)
    lasts: dict[str, list[int]] = field(default_factory=dict)  # key -> [time, nanos]
    products: dict[str, list[int]] = field(default_factory=dict)  # id -> [time, 1 held|2]
    tickets: dict[str, _Ticket] = field(default_factory=dict)

    def apply(self, event: Event) -> None:
        """Folds one event in (on the ingest hot path: keep it lean)."""
        delta = event.occurred_at - _EPOCH
        day = delta.days
        t = (day * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        plan = _PLANS.get((event.type, event.channel)) or _plan(event.type, event.channel)
        day_key = str(day)
        bucket = self.days.get(day_key)
        if bucket is None:
            bucket = self.days[day_key] = {}
        for key in plan.counts:
            bucket[key] = bucket.get(key, 0) + 1
        if plan.filtered:
            attributes = event.attributes
            for key, attribute, allowed in plan.filtered:
                if attributes.get(attribute) in allowed:
                    bucket[key] = bucket.get(key, 0) + 1
        for n_key, s_key, attribute in plan.values:
            value = _value_nanos(event, attribute)
            if value is not None:
                bucket[n_key] = bucket.get(n_key, 0) + 1
                total = bucket.get(s_key, 0) + value
                bucket[s_key] = total if -SUM_LIMIT <= total <= SUM_LIMIT else _saturated(total)
        times = self.times
        for key in plan.times:
            if t > times.get(key, t - 1):
                times[key] = t
        if self.first is None or t < self.first:
            self.first = t
        for key, attribute in plan.lasts:
            value = _value_nanos(event, attribute)
            if value is not None:
                latest = [t, value]
                old = self.lasts.get(key)
                if old is None or latest > old:
                    self.lasts[key] = latest
        if plan.product and event.product_id:
            holding = [t, plan.product]
            old_holding = self.products.get(event.product_id)
            if old_holding is None or holding > old_holding:
                self.products[event.product_id] = holding
        if event.ticket_id:
            self._apply_ticket(event, t, plan.ticket_kind)

    def _apply_ticket(self, event: Event, t: int, kind: int) -> None:
        ticket = self.tickets.get(event.ticket_id)
        if ticket is None:
            ticket = self.tickets[event.ticket_id] = _Ticket(t, t)
        elif t < ticket.first:
            ticket.first = t
        elif t > ticket.last:
            ticket.last = t
        sentiment = event.sentiment
        if sentiment is not None and math.isfinite(sentiment):
            latest = (t, float(sentiment))
            if ticket.sentiment is None or latest > ticket.sentiment:
                ticket.sentiment = latest
        if kind < 0:
            return
        ticket.counts[kind] += 1
        status = _STATUS_OF_KIND.get(kind)
        if status is not None:
            new_status = (t, status)
            if ticket.status is None or new_status > ticket.status:
                ticket.status = new_status
        if kind in (_OPENED, _PRIORITY_CHANGED):
            raw = event.attributes.get("priority")
            if isinstance(raw, str):
                priority = (t, _PRIORITY_RANK.get(raw, len(PRIORITIES)))
                if ticket.priority is None or priority > ticket.priority:
                    ticket.priority = priority
        if kind == _OPENED:
            category = event.attributes.get("category")
            due = event.attributes.get("sla_due_at")
            has_due = isinstance(due, datetime) and due.tzinfo is not None
            opened: _Opened = (
                t,
                event.channel,
                category if isinstance(category, str) else "",
                1 if has_due else 0,
                _micros(due) if isinstance(due, datetime) and has_due else 0,
            )
            if ticket.opened is None or opened < ticket.opened:
                ticket.opened = opened

    def prune(self, now: datetime) -> None:
        """Drops what no feature read at `now` or later needs, and holds the
        state within its bound (see "Bounds" in the module's docstring): day
        buckets before the longest window; resolved tickets and cancelled
        products with no interaction since then; beyond the caps, the tickets
        and products least recently active."""
        horizon = _day(now) - (_MAX_WINDOW - 1)
        for day in [d for d in self.days if int(d) < horizon]:
            del self.days[day]
        cutoff = horizon * _US_PER_DAY
        tickets = self.tickets
        for ticket_id in [k for k, tk in tickets.items() if not tk.open and tk.last < cutoff]:
            del tickets[ticket_id]
        products = self.products
        for product_id in [k for k, (t, how) in products.items() if how != 1 and t < cutoff]:
            del products[product_id]
        self.cap()

    def cap(self) -> None:
        """Drops the least recently active tickets and products beyond the
        caps (point-in-time reads cap their state at each cutoff too)."""
        tickets, products = self.tickets, self.products
        if len(tickets) > min(MAX_OPEN_TICKETS, MAX_CLOSED_TICKETS):
            _keep_latest(tickets, MAX_OPEN_TICKETS, lambda tk: tk.last, lambda tk: tk.open)
            _keep_latest(tickets, MAX_CLOSED_TICKETS, lambda tk: tk.last, lambda tk: not tk.open)
        if len(products) > min(MAX_HELD_PRODUCTS, MAX_CANCELLED_PRODUCTS):
            _keep_latest(products, MAX_HELD_PRODUCTS, lambda p: p[0], lambda p: p[1] == 1)
            _keep_latest(products, MAX_CANCELLED_PRODUCTS, lambda p: p[0], lambda p: p[1] != 1)

    def tidy(self, now: datetime) -> None:
        """`prune`, once there is something to gain: the state holds more day
        buckets than the longest window, or tickets, or products. Reads ignore
        buckets outside their window, so an untidied state reads the same;
        ingest calls this for every state it writes, where a full prune cost
        as much as folding a dozen events."""
        if len(self.days) > _MAX_WINDOW or self.tickets or self.products:
            self.prune(now)

    def copy(self) -> CustomerState:
        return CustomerState(
            days={d: dict(b) for d, b in self.days.items()},
            first=self.first,
            times=dict(self.times),
            lasts=dict(self.lasts),
            products=dict(self.products),
            tickets={k: tk.copy() for k, tk in self.tickets.items()},
        )

    def merge(self, other: CustomerState) -> CustomerState:
        """The state of both customers' events together (a merged customer)."""
        merged = self.copy()
        for day, bucket in other.days.items():
            mine = merged.days.setdefault(day, {})
            for key, value in bucket.items():
                total = mine.get(key, 0) + value
                mine[key] = total if -SUM_LIMIT <= total <= SUM_LIMIT else _saturated(total)
        if other.first is not None and (merged.first is None or other.first < merged.first):
            merged.first = other.first
        for key, t in other.times.items():
            merged.times[key] = max(t, merged.times.get(key, t))
        for key, last in other.lasts.items():
            merged.lasts[key] = max(last, merged.lasts.get(key, last))
        for product, holding in other.products.items():
            merged.products[product] = max(holding, merged.products.get(product, holding))
        for ticket_id, ticket in other.tickets.items():
            mine_ticket = merged.tickets.get(ticket_id)
            if mine_ticket is None:
                merged.tickets[ticket_id] = ticket.copy()
            else:
                mine_ticket.absorb(ticket)
        return merged

    def open_ticket_ids(self) -> list[str]:
        """The customer's open tickets (opened or reopened, not resolved), sorted."""
        return sorted(k for k, tk in self.tickets.items() if tk.open)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form, sharing this state's dicts (serialise it
        before changing the state); see `from_json`."""
        return {
            "version": STATE_VERSION,
            "first": self.first,
            "days": self.days,
            "times": self.times,
            "lasts": self.lasts,
            "products": self.products,
            "tickets": {k: tk.to_json() for k, tk in self.tickets.items()},
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> CustomerState:
        """The state `to_json` described. Raises StateVersionError for a state
        kept by another STATE_VERSION (rebuild it from the interactions)."""
        if d.get("version") != STATE_VERSION:
            raise StateVersionError(
                f"state version {d.get('version')!r} is not {STATE_VERSION!r}; rebuild it"
            )
        # Takes the parsed dicts over as they are (the caller gives them up).
        return cls(
            days=d["days"],
            first=d["first"],
            times=d["times"],
            lasts=d["lasts"],
            products=d["products"],
            tickets={k: _Ticket.from_json(v) for k, v in d["tickets"].items()},
        )


_Entry = TypeVar("_Entry")


def _keep_latest(
    entries: dict[str, _Entry],
    limit: int,
    last: Callable[[_Entry], int],
    concerned: Callable[[_Entry], bool],
) -> None:
    """Keeps the `limit` most recently active of the `concerned` entries
    (latest activity first, ties by id, so the outcome does not depend on the
    order events came in); drops the others."""
    ids = [k for k, entry in entries.items() if concerned(entry)]
    if len(ids) <= limit:
        return
    ids.sort(key=lambda k: (last(entries[k]), k))
    for k in ids[: len(ids) - limit]:
        del entries[k]


def build_state(events: Iterable[Event]) -> CustomerState:
    """The state of `events`."""
    state = CustomerState()
    for event in events:
        state.apply(event)
    return state


# --- reading features --------------------------------------------------------------


class _Reading(NamedTuple):
    state: CustomerState
    now: int  # as_of, µs
    today: int  # day(as_of)
    windows: dict[int, dict[str, int]]  # window days -> key -> total


@functools.lru_cache(maxsize=8)
def _day_keys(today: int) -> tuple[str, ...]:
    """The bucket keys of `today` and the days before it, newest first: the
    same for every customer read at one time, made once."""
    return tuple(str(today - offset) for offset in range(_MAX_WINDOW))


def _window_totals(days: Mapping[str, Mapping[str, int]], today: int) -> dict[int, dict[str, int]]:
    running: dict[str, int] = {}
    totals: dict[int, dict[str, int]] = {}
    for offset, day_key in enumerate(_day_keys(today)):
        bucket = days.get(day_key)
        if bucket:
            for key, value in bucket.items():
                running[key] = running.get(key, 0) + value
        if offset + 1 in _SNAPSHOTS:
            totals[offset + 1] = dict(running)
    return totals


def _slope(r: _Reading, key: str, window: int) -> float | None:
    """Least-squares slope per day of the values under `key` (each event one
    point at its day), exact until the final division."""
    n_key, s_key = "n:" + key, "s:" + key
    n = sx = sxx = sy = sxy = 0
    day_keys = _day_keys(r.today)
    for offset in range(window):
        bucket = r.state.days.get(day_keys[offset])
        if bucket is None:
            continue
        count = bucket.get(n_key, 0)
        if count:
            total = bucket[s_key]
            n += count
            sx -= count * offset
            sxx += count * offset * offset
            sy += total
            sxy -= offset * total
    denominator = n * sxx - sx * sx
    if denominator == 0:
        return None
    return (n * sxy - sx * sy) / (denominator * _NANO)


def _open_tickets(state: CustomerState) -> int:
    return sum(1 for ticket in state.tickets.values() if ticket.open)


_Evaluator = Callable[[_Reading], float | None]


def _evaluator(d: FeatureDefinition) -> _Evaluator:
    """How one customer feature is read from a state (KeyError at import when
    the registry names something the state does not keep)."""
    per = _US_PER_HOUR if d.unit == "hours" else _US_PER_DAY
    if d.name == "tenure_days":
        return lambda r: None if r.state.first is None else (r.now - r.state.first) / per
    if d.name == "open_tickets":
        return lambda r: float(_open_tickets(r.state))
    if d.name == "products_held":
        return lambda r: float(sum(1 for _, how in r.state.products.values() if how == 1))
    valued = d.aggregation in ("sum", "mean", "trend") and bool(d.attribute)
    kind = {"last": "l", "time_since": "t"}.get(d.aggregation, "v" if valued else "c")
    key = _KEYS[kind, _selector(d)]
    window = d.window_days or 0
    if d.name == "usage_change_30d":
        return lambda r: float(2 * r.windows[30].get(key, 0) - r.windows[60].get(key, 0))
    if d.aggregation == "count":
        return lambda r: float(r.windows[window].get(key, 0))
    if d.aggregation == "sum":
        return lambda r: r.windows[window].get("s:" + key, 0) / _NANO

    if d.aggregation == "mean":

        def mean(r: _Reading) -> float | None:
            n = r.windows[window].get("n:" + key, 0)
            return r.windows[window]["s:" + key] / (n * _NANO) if n else None

        return mean
    if d.aggregation == "trend":
        return lambda r: _slope(r, key, window)
    if d.aggregation == "last":

        def last(r: _Reading) -> float | None:
            latest = r.state.lasts.get(key)
            return None if latest is None else latest[1] / _NANO

        return last
    if d.aggregation == "time_since":

        def since(r: _Reading) -> float | None:
            t = r.state.times.get(key)
            return None if t is None else (r.now - t) / per

        return since
    raise AssertionError(f"feature {d.name} has no computation")


_CUSTOMER_EVALUATORS: tuple[tuple[str, _Evaluator], ...] = tuple(
    (d.name, _evaluator(d)) for d in REGISTRY if d.entity == "customer"
)


def customer_features(state: CustomerState, as_of: datetime) -> dict[str, float]:
    """The customer features of `state` read at `as_of`; features without a
    value (and that may be missing) are left out."""
    today = _day(as_of)
    reading = _Reading(state, _micros(as_of), today, _window_totals(state.days, today))
    values: dict[str, float] = {}
    for name, evaluate in _CUSTOMER_EVALUATORS:
        value = evaluate(reading)
        if value is not None:
            values[name] = value
    return values


def _category(value: str, categories: tuple[str, ...]) -> float:
    value = value.strip().lower()
    return float(categories.index(value) if value in categories else len(categories))


def _ticket_values(ticket: _Ticket, state: CustomerState, now: int) -> dict[str, float | None]:
    """Every ticket feature by name, None where it has no value."""
    opened = ticket.opened
    channel = category = sla_left = None
    if opened is not None:
        number = opened[1]
        other = len(CHANNEL_NAMES) - 1  # categories are CHANNEL_NAMES[1:]
        channel = float(number - 1 if 1 <= number <= other else other)
        category = _category(opened[2], TICKET_CATEGORIES) if opened[2] else None
        sla_left = (opened[4] - now) / _US_PER_HOUR if opened[3] else None
    counts = ticket.counts
    return {
        "ticket_age_hours": (now - (opened[0] if opened else ticket.first)) / _US_PER_HOUR,
        "ticket_hours_since_last_activity": (now - ticket.last) / _US_PER_HOUR,
        "ticket_open": 1.0 if ticket.open else 0.0,
        "ticket_priority": None if ticket.priority is None else float(ticket.priority[1]),
        "ticket_priority_changes": float(counts[_PRIORITY_CHANGED]),
        "ticket_reassignments": float(counts[_REASSIGNED]),
        "ticket_updates": float(counts[_UPDATED]),
        "ticket_escalations": float(counts[_ESCALATED]),
        "ticket_reopens": float(counts[_REOPENED]),
        "ticket_sla_breaches": float(counts[_BREACHED]),
        "ticket_channel": channel,
        "ticket_category": category,
        "ticket_last_sentiment": None if ticket.sentiment is None else ticket.sentiment[1],
        "ticket_sla_hours_left": sla_left,
        "ticket_customer_open_tickets": float(_open_tickets(state)),
    }


def ticket_features(
    state: CustomerState, ticket_id: str, as_of: datetime
) -> dict[str, float] | None:
    """The features of one ticket of the customer read at `as_of`; None when
    no ticket.* interaction of that ticket is in the state."""
    ticket = state.tickets.get(ticket_id)
    if ticket is None or not ticket.known:
        return None
    computed = _ticket_values(ticket, state, _micros(as_of))
    values: dict[str, float] = {}
    for name in TICKET_FEATURES:  # KeyError here means the registry names an uncomputed feature
        value = computed[name]
        if value is not None:
            values[name] = value
    return values


def features_at_cutoffs(
    events: Sequence[Event],
    cutoffs: Sequence[datetime],
    ticket_ids: Sequence[str] | None = None,
) -> list[tuple[dict[str, float], dict[str, float] | None]]:
    """Point-in-time features of one customer at many cutoffs: per cutoff (in
    input order) the customer features and, when `ticket_ids` names a ticket
    for it (one entry per cutoff, "" for none), that ticket's features. Only
    events that occurred strictly before a cutoff count. Sorts the events once
    and folds them into one state as the cutoffs advance."""
    if ticket_ids is not None and len(ticket_ids) != len(cutoffs):
        raise ValueError("ticket_ids must have one entry per cutoff")
    ordered = sorted(events, key=lambda e: e.occurred_at)
    state = CustomerState()
    results: list[tuple[dict[str, float], dict[str, float] | None]] = [({}, None)] * len(cutoffs)
    position = 0
    for index in sorted(range(len(cutoffs)), key=lambda i: cutoffs[i]):
        cutoff = cutoffs[index]
        while position < len(ordered) and ordered[position].occurred_at < cutoff:
            state.apply(ordered[position])
            position += 1
        # Capped as live serving caps (see "Bounds"), so that a customer
        # beyond the caps reads the same saturated counts both ways.
        state.cap()
        ticket_id = ticket_ids[index] if ticket_ids is not None else ""
        results[index] = (
            customer_features(state, cutoff),
            ticket_features(state, ticket_id, cutoff) if ticket_id else None,
        )
    return results

"""The one implementation of feature definitions, shared by live serving and
point-in-time training so that the two cannot disagree.

A `FeatureSet` is a tuple of definitions (`converge.features.definitions`)
with everything derived from them computed once: which selectors the state
keeps, their short keys, a fold plan per (type, channel) and an evaluator
per feature. `FeatureSet.builtin()` is the built-in set; a configured one
comes from `converge.features.config.load_feature_set`. The module-level
names (`REGISTRY`, `FEATURE_SET_VERSION`, `STATE_VERSION`,
`customer_features`, `features_at_cutoffs`, ...) describe the built-in set,
for callers that never configure one.

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
window and inside the 30-day one. The built-in windows are 7, 30 and 90
days, and 60 for `usage_change_30d` (last 30 days minus the 30 before); a
configured set may use 1 to `MAX_WINDOW_DAYS` days, and its states keep day
buckets up to its longest window.

Bounds. A customer's state stays small whatever its history (20,000 products
and tickets once made a 3.7 MB state, rewritten on every event):
`CustomerState.prune(now)`, run at every write of a live state, drops
- the day buckets no window read at `now` or later reaches (the longest
  window: 90 days for the built-in set);
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
feature's value is text (the latest value of its attribute among the
interactions it selects: `str` in the returned dicts, every other value a
`float`); its categories are learned at training time. Filters
(`FeatureDefinition.filters`) restrict any aggregation to the interactions
whose attributes hold one of the listed values.

A set's `version` (`<name>-<digest of the definitions>`) changes whenever any
definition changes; its `state_version` whenever what the state keeps
changes (selectors, the longest window, the layout), and a stored state of
another version must be rebuilt from the interactions
(`FeatureSet.state_from_json` raises `StateVersionError`). Two sets that keep
the same selectors share a state version, so rewording a description never
rebuilds a state.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any, NamedTuple, TypeVar

from converge.features.definitions import (
    CANCELLING,
    CHANNEL_NAMES,
    CONVERSATIONS,
    HOLDING,
    MARKETING,
    PRIORITIES,
    TICKET_CATEGORIES,
    TICKET_KINDS,
    Aggregation,
    AttrValue,
    Entity,
    Event,
    FeatureDefinition,
    Prediction,
    attribute_text,
    builtin_definitions,
)

__all__ = [
    "CANCELLING",
    "CHANNEL_NAMES",
    "CONVERSATIONS",
    "CUSTOMER_FEATURES",
    "FEATURE_SET_VERSION",
    "HOLDING",
    "MARKETING",
    "PRIORITIES",
    "REGISTRY",
    "STATE_VERSION",
    "TICKET_CATEGORIES",
    "TICKET_FEATURES",
    "TICKET_KINDS",
    "Aggregation",
    "AttrValue",
    "CustomerState",
    "DayReading",
    "Entity",
    "Event",
    "FeatureDefinition",
    "FeatureSet",
    "FeatureValues",
    "Prediction",
    "StateVersionError",
    "StoredState",
    "TicketReading",
    "build_state",
    "customer_features",
    "features_at_cutoffs",
    "ticket_features",
]

# Feature values by name: text for CATEGORY features, a number for the others.
FeatureValues = dict[str, float | str]

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
_STATE_LAYOUT = 3
# The longest window a definition may have: a state keeps one day bucket per
# day of its set's longest window, so this bounds a state's size (a year of
# daily buckets of a few counts each is some tens of KB).
MAX_WINDOW_DAYS = 365


def _digest(data: object) -> str:
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


# The state's bound (see "Bounds" above): the most tickets and products it
# keeps, each group its most recently active. Open tickets and held products
# are what `open_tickets` and `products_held` count, so these two saturate at
# their cap; at the caps a state is about 60 KB of JSON.
MAX_OPEN_TICKETS = 200
MAX_CLOSED_TICKETS = 200  # resolved (or never opened) within the longest window
MAX_HELD_PRODUCTS = 500
MAX_CANCELLED_PRODUCTS = 200  # cancelled within the longest window


# --- what a state keeps, derived from the definitions -------------------------------

# (attribute, allowed values casefolded), sorted: an interaction passes when
# every attribute holds one of its values.
_Filters = tuple[tuple[str, tuple[str, ...]], ...]


class _Selector(NamedTuple):
    """Which interactions an aggregation looks at, and which value it takes."""

    types: tuple[str, ...]
    channel: int
    attribute: str = ""
    filters: _Filters = ()

    def matches(self, type_: str, channel: int) -> bool:
        return (not self.types or type_ in self.types) and (self.channel in (0, channel))

    @property
    def description(self) -> str:
        text = f"{'|'.join(self.types) or '*'}@{self.channel}"
        if self.attribute:
            text += f":{self.attribute}"
        for attribute, values in self.filters:
            text += f"[{attribute}={'|'.join(values)}]"
        return text


def _selector(d: FeatureDefinition) -> _Selector:
    filters = tuple(
        sorted(
            (attribute, tuple(sorted({v.strip().casefold() for v in values})))
            for attribute, values in d.filters
        )
    )
    attribute = "" if d.aggregation == "count" else d.attribute
    return _Selector(d.interaction_types, d.channel, attribute, filters)


def _holds(event: Event, filters: tuple[tuple[str, frozenset[str]], ...]) -> bool:
    for attribute, allowed in filters:
        text = attribute_text(event, attribute)
        if text is None or text.casefold() not in allowed:
            return False
    return True


# Built-in customer features computed from more than their definition's selector.
_SPECIAL_CUSTOMER = frozenset({"tenure_days", "open_tickets", "products_held", "usage_change_30d"})
# Built-in ticket features read from the ticket's fixed sub-state.
_SPECIAL_TICKET = frozenset(
    {
        "ticket_age_hours",
        "ticket_hours_since_last_activity",
        "ticket_open",
        "ticket_priority",
        "ticket_priority_changes",
        "ticket_reassignments",
        "ticket_updates",
        "ticket_escalations",
        "ticket_reopens",
        "ticket_sla_breaches",
        "ticket_last_sentiment",
        "ticket_sla_hours_left",
        "ticket_customer_open_tickets",
    }
)
_BUILTIN = builtin_definitions()
_BUILTIN_SPECIALS = frozenset(
    d for d in _BUILTIN if d.name in _SPECIAL_CUSTOMER or d.name in _SPECIAL_TICKET
)
# usage_change_30d reads as a 60-day count through the generic count key.
_COUNTED_SPECIALS = frozenset({"usage_change_30d"})


class _Part(NamedTuple):
    """What apply() does for the interactions that pass one group of filters."""

    counts: tuple[str, ...]
    values: tuple[tuple[str, str, str], ...]  # (number key, sum key, attribute)
    lasts: tuple[tuple[str, str], ...]  # (key, attribute)
    times: tuple[str, ...]
    categories: tuple[tuple[str, str], ...]  # (key, attribute)
    # Of the interaction's ticket (ticket features that are not built in):
    ticket_counts: tuple[str, ...]
    ticket_lasts: tuple[tuple[str, str], ...]
    ticket_categories: tuple[tuple[str, str], ...]

    @property
    def touches_ticket(self) -> bool:
        return bool(self.ticket_counts or self.ticket_lasts or self.ticket_categories)


class _Plan(NamedTuple):
    """What apply() does for one (type, channel): computed once per pair. The
    unconditional part is spread out in the first fields, so the hot path
    reads them without one more indirection."""

    counts: tuple[str, ...]
    values: tuple[tuple[str, str, str], ...]
    lasts: tuple[tuple[str, str], ...]
    times: tuple[str, ...]
    categories: tuple[tuple[str, str], ...]
    ticket_part: _Part | None  # the unconditional part, when it keeps something per ticket
    # (filters, part) applied when every filter holds (rare: a dozen a set).
    conditional: tuple[tuple[tuple[tuple[str, frozenset[str]], ...], _Part], ...]
    ticket_kind: int  # index into TICKET_KINDS, -1 for other types
    product: int  # 0: none, 1: holds the product, 2: cancels it


# The operations of a compiled read (FeatureSet._customer_step), and a step:
# (feature name, operation, state key, second key, window days, µs per unit).
_COUNT, _SUM, _MEAN, _TREND, _LAST, _SINCE, _TEXT, _TENURE, _OPEN, _HELD, _USAGE_CHANGE = range(11)
_Step = tuple[str, int, str, str, int, int]
# A ticket feature: built in (by name), or a set's own count, latest value or text.
_T_BUILTIN, _T_COUNT, _T_LAST, _T_TEXT = range(4)


# --- the set -----------------------------------------------------------------------


class FeatureSet:
    """A tuple of feature definitions, ready to fold interactions and read
    features: the state's selectors and keys, a fold plan per (type,
    channel), an evaluator per feature, computed once here."""

    def __init__(self, name: str, definitions: Sequence[FeatureDefinition]) -> None:
        self.name = name
        self.definitions: tuple[FeatureDefinition, ...] = tuple(definitions)
        names = [d.name for d in self.definitions]
        if len(set(names)) != len(names):
            raise ValueError("feature names must be unique")
        self.by_name = {d.name: d for d in self.definitions}
        self.version = f"{name}-{_digest([asdict(d) for d in self.definitions])}"
        self.customer_names = tuple(d.name for d in self.definitions if d.entity == "customer")
        # The features whose values are text (CATEGORY), the others are numbers.
        self.category_names = frozenset(
            d.name for d in self.definitions if d.aggregation == "category"
        )
        self.ticket_names = tuple(d.name for d in self.definitions if d.entity == "ticket")
        self._collect_selectors()
        self.max_window = max([d.window_days or 0 for d in self.definitions] + [1])
        self._snapshots = frozenset(
            {d.window_days for d in self.definitions if d.window_days}
            | ({30} if self._special("usage_change_30d") else set())
        )
        described = {
            kind: [s.description for s in selectors] for kind, selectors in self._selectors.items()
        }
        self.state_version = "s1-" + _digest(
            [_STATE_LAYOUT, described, TICKET_KINDS, PRIORITIES, HOLDING, CANCELLING,
             self.max_window]
        )  # fmt: skip
        self._known_types = frozenset(
            t for d in self.definitions for t in d.interaction_types
        ) | frozenset(TICKET_KINDS + HOLDING + CANCELLING)  # fmt: skip
        self.plans: dict[tuple[str, int], _Plan] = {
            (t, c): self._make_plan(t, c)
            for t in self._known_types
            for c in range(len(CHANNEL_NAMES))
        }
        # The reads compiled once: one step per feature, in definition order,
        # and the windows cut into bands of day offsets (see _window_totals).
        self._customer_plan = tuple(
            self._customer_step(d) for d in self.definitions if d.entity == "customer"
        )
        self._ticket_plan = tuple(
            self._ticket_step(d) for d in self.definitions if d.entity == "ticket"
        )
        self._bands = tuple(sorted(self._snapshots))
        self._band_of = tuple(
            next(i for i, w in enumerate(self._bands) if offset < w)
            for offset in range(self._bands[-1] if self._bands else 0)
        )
        self._day_key_cache: dict[int, tuple[str, ...]] = {}
        self._offset_cache: dict[int, tuple[dict[str, int], dict[str, int]]] = {}

    @classmethod
    def builtin(cls) -> FeatureSet:
        """The built-in set (one shared instance)."""
        return BUILTIN

    def __repr__(self) -> str:
        return f"FeatureSet({self.version!r}, {len(self.definitions)} features)"

    def _special(self, name: str) -> bool:
        d = self.by_name.get(name)
        return d is not None and d in _BUILTIN_SPECIALS

    def _is_special(self, d: FeatureDefinition) -> bool:
        return d in _BUILTIN_SPECIALS and d.name not in _COUNTED_SPECIALS

    def _selector_kind(self, d: FeatureDefinition) -> str:
        """Where the state keeps a definition's selector: c counts, v valued
        windows, l latest values, t latest times, a latest texts (customer);
        k counts, m latest values, x latest texts (per ticket)."""
        if d.entity == "ticket":
            return {"count": "k", "last": "m", "category": "x"}[d.aggregation]
        if d.window_days is not None:
            valued = d.aggregation in ("sum", "mean", "trend") and d.attribute
            return "v" if valued else "c"
        return {"last": "l", "time_since": "t", "category": "a"}[d.aggregation]

    def _collect_selectors(self) -> None:
        self._selectors: dict[str, list[_Selector]] = {k: [] for k in "cvltakmx"}
        for d in self.definitions:
            if self._is_special(d):
                continue
            try:
                kind = self._selector_kind(d)
            except KeyError:
                raise ValueError(
                    f"feature {d.name}: {d.entity} features cannot aggregate by {d.aggregation}"
                    + (" without a window" if d.entity == "customer" else "")
                ) from None
            selector = _selector(d)
            if selector not in self._selectors[kind]:
                self._selectors[kind].append(selector)
        # Short state keys ("c3": a count, "v1": a value, as "n:v1" and "s:v1"
        # in day buckets), so stored states stay small.
        self.keys: dict[tuple[str, _Selector], str] = {
            (kind, s): f"{kind}{i}"
            for kind, selectors in self._selectors.items()
            for i, s in enumerate(selectors)
        }

    def _make_plan(self, type_: str, channel: int) -> _Plan:
        groups: dict[_Filters, dict[str, list[Any]]] = {}
        for kind, selectors in self._selectors.items():
            for s in selectors:
                if not s.matches(type_, channel):
                    continue
                key = self.keys[kind, s]
                lists = groups.setdefault(s.filters, {k: [] for k in "cvltakmx"})
                if kind == "v":
                    lists[kind].append(("n:" + key, "s:" + key, s.attribute))
                elif kind in "lamx":
                    lists[kind].append((key, s.attribute))
                else:
                    lists[kind].append(key)

        def part(lists: dict[str, list[Any]]) -> _Part:
            return _Part(*(tuple(lists[k]) for k in "cvltakmx"))

        base = part(groups.get((), {k: [] for k in "cvltakmx"}))
        conditional = tuple(
            (tuple((a, frozenset(values)) for a, values in filters), part(lists))
            for filters, lists in sorted(groups.items())
            if filters
        )
        ticket_kind = TICKET_KINDS.index(type_) if type_ in TICKET_KINDS else -1
        product = 1 if type_ in HOLDING else 2 if type_ in CANCELLING else 0
        return _Plan(
            base.counts,
            base.values,
            base.lasts,
            base.times,
            base.categories,
            base if base.touches_ticket else None,
            conditional,
            ticket_kind,
            product,
        )

    def plan(self, type_: str, channel: int) -> _Plan:
        """The plan of a pair not precomputed: a type no feature names (custom
        types share the plan of type "") or a channel number beyond the enum."""
        key = (type_ if type_ in self._known_types else "", channel)
        plan = self.plans.get(key)
        if plan is None:
            plan = self.plans[key] = self._make_plan(*key)
        return plan

    def day_keys(self, today: int) -> tuple[str, ...]:
        """The bucket keys of `today` and the days before it, newest first: the
        same for every customer read at one time, made once."""
        keys = self._day_key_cache.get(today)
        if keys is None:
            if len(self._day_key_cache) >= 8:
                self._day_key_cache.clear()
            keys = self._day_key_cache[today] = tuple(
                str(today - offset) for offset in range(self.max_window)
            )
        return keys

    # --- states ------------------------------------------------------------------
    def new_state(self) -> CustomerState:
        return CustomerState(features=self)

    def build_state(self, events: Iterable[Event]) -> CustomerState:
        """The state of `events`."""
        state = CustomerState(features=self)
        for event in events:
            state.apply(event)
        return state

    def state_from_json(self, d: Mapping[str, Any]) -> CustomerState:
        """The state `CustomerState.to_json` described. Raises
        StateVersionError for a state kept by another state version (rebuild
        it from the interactions)."""
        if d.get("version") != self.state_version:
            raise StateVersionError(
                f"state version {d.get('version')!r} is not {self.state_version!r}; rebuild it"
            )
        # Takes the parsed dicts over as they are (the caller gives them up).
        return CustomerState(
            days=d["days"],
            first=d["first"],
            times=d["times"],
            lasts=d["lasts"],
            products=d["products"],
            tickets={k: _Ticket.from_json(v) for k, v in d["tickets"].items()},
            texts=d["texts"],
            features=self,
        )

    # --- reading -----------------------------------------------------------------
    def stored_state(self, d: Mapping[str, Any]) -> StoredState:
        """The state `CustomerState.to_json` described, as parsed, to read
        features from without building a `CustomerState` (the read path of
        live serving: a stored state is read far more often than changed).
        Raises StateVersionError as `state_from_json` does."""
        if d.get("version") != self.state_version:
            raise StateVersionError(
                f"state version {d.get('version')!r} is not {self.state_version!r}; rebuild it"
            )
        return StoredState(
            d["days"], d["first"], d["times"], d["lasts"], d["products"], d["tickets"], d["texts"]
        )

    def _customer_step(self, d: FeatureDefinition) -> _Step:
        """How one customer feature is read from a state: (name, operation,
        state key, second key, window, time unit)."""
        per = _US_PER_HOUR if d.unit == "hours" else _US_PER_DAY
        if self._is_special(d):
            op = {"tenure_days": _TENURE, "open_tickets": _OPEN, "products_held": _HELD}[d.name]
            return (d.name, op, "", "", 0, per)
        key = self.keys[self._selector_kind(d), _selector(d)]
        window = d.window_days or 0
        if d.name == "usage_change_30d" and d in _BUILTIN_SPECIALS:
            return (d.name, _USAGE_CHANGE, key, "", window, per)
        if d.aggregation == "count":
            return (d.name, _COUNT, key, "", window, per)
        if d.aggregation in ("sum", "mean", "trend"):
            op = {"sum": _SUM, "mean": _MEAN, "trend": _TREND}[d.aggregation]
            return (d.name, op, "n:" + key, "s:" + key, window, per)
        latest = {"last": _LAST, "time_since": _SINCE, "category": _TEXT}.get(d.aggregation)
        if latest is None:
            raise ValueError(f"feature {d.name} has no computation")
        return (d.name, latest, key, "", window, per)

    def _ticket_step(self, d: FeatureDefinition) -> tuple[str, int, str]:
        if self._is_special(d):
            return (d.name, _T_BUILTIN, d.name)
        key = self.keys[self._selector_kind(d), _selector(d)]
        op = {"count": _T_COUNT, "last": _T_LAST}.get(d.aggregation, _T_TEXT)
        return (d.name, op, key)

    def _day_offsets(self, today: int) -> tuple[dict[str, int], dict[str, int]]:
        """By bucket key, the day offsets from `today` within the longest
        window, and the band each falls in: the same for every customer read
        at one time, made once (parsing a bucket's key cost as much as
        adding it up)."""
        cached = self._offset_cache.get(today)
        if cached is None:
            if len(self._offset_cache) >= 8:
                self._offset_cache.clear()
            offsets = {str(today - offset): offset for offset in range(self.max_window)}
            limit = len(self._band_of)
            bands = {key: self._band_of[o] for key, o in offsets.items() if o < limit}
            cached = self._offset_cache[today] = (offsets, bands)
        return cached

    def _window_totals(
        self, days: Mapping[str, Mapping[str, int]], today: int
    ) -> dict[int, dict[str, int]]:
        """Per window read, each key's total over the days of that window.
        Each present bucket is added once, into the band of its day offset
        (days 0-6, 7-29, ... for windows 7, 30, ...), and the bands are
        accumulated: no walk over every day of the longest window."""
        band_of = self._day_offsets(today)[1]
        bands: list[dict[str, int]] = [{} for _ in self._bands]
        for day_key, bucket in days.items():
            index = band_of.get(day_key)
            if index is not None:
                band = bands[index]
                for key, value in bucket.items():
                    band[key] = band.get(key, 0) + value
        totals: dict[int, dict[str, int]] = {}
        running: dict[str, int] = {}
        for window, band in zip(self._bands, bands, strict=True):
            for key, value in band.items():
                running[key] = running.get(key, 0) + value
            totals[window] = running
            running = dict(running)
        return totals

    def customer_features(
        self, state: CustomerState | StoredState, as_of: datetime
    ) -> FeatureValues:
        """The customer features of `state` read at `as_of`; features without a
        value (and that may be missing) are left out."""
        return self._read_customer(state, as_of, None)

    def day_reading(self, state: CustomerState | StoredState, as_of: datetime) -> DayReading:
        """The customer features of `state` read at `as_of`, in a form that
        gives them at any other moment of the same UTC day (`DayReading.at`)
        without reading the state again."""
        counting: list[tuple[str, int, int]] = []
        values = self._read_customer(state, as_of, counting)
        return DayReading(_day(as_of), values, tuple(counting))

    def _read_customer(
        self,
        state: CustomerState | StoredState,
        as_of: datetime,
        counting: list[tuple[str, int, int]] | None,
    ) -> FeatureValues:
        """`customer_features`; with `counting`, also appends there the
        features that count time from an instant (name, instant, µs a unit)."""
        delta = as_of - _EPOCH
        today = delta.days
        now = (today * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        days = state.days
        windows = self._window_totals(days, today)
        values: FeatureValues = {}
        for name, op, key, key2, window, per in self._customer_plan:
            if op == _COUNT:
                values[name] = float(windows[window].get(key, 0))
            elif op == _SINCE:
                t = state.times.get(key)
                if t is not None:
                    values[name] = (now - t) / per
                    if counting is not None:
                        counting.append((name, t, per))
            elif op == _SUM:
                values[name] = windows[window].get(key2, 0) / _NANO
            elif op == _MEAN:
                totals = windows[window]
                n = totals.get(key, 0)
                if n:
                    values[name] = totals[key2] / (n * _NANO)
            elif op == _LAST:
                latest = state.lasts.get(key)
                if latest is not None:
                    values[name] = latest[1] / _NANO
            elif op == _TEXT:
                text = state.texts.get(key)
                if text is not None:
                    values[name] = str(text[1])
            elif op == _TREND:
                slope = _slope(days, self._day_offsets(today)[0], key, key2, window)
                if slope is not None:
                    values[name] = slope
            elif op == _USAGE_CHANGE:
                values[name] = float(2 * windows[30].get(key, 0) - windows[60].get(key, 0))
            elif op == _TENURE:
                if state.first is not None:
                    values[name] = (now - state.first) / per
                    if counting is not None:
                        counting.append((name, state.first, per))
            elif op == _OPEN:
                values[name] = float(state.open_ticket_count())
            else:  # _HELD
                values[name] = float(sum(1 for _, how in state.products.values() if how == 1))
        return values

    def ticket_features(
        self, state: CustomerState | StoredState, ticket_id: str, as_of: datetime
    ) -> FeatureValues | None:
        """The features of one ticket of the customer read at `as_of`; None when
        no ticket.* interaction of that ticket is in the state."""
        ticket = state.ticket(ticket_id)
        if ticket is None or not ticket.known:
            return None
        return self._read_ticket(ticket, state.open_ticket_count(), _micros(as_of))

    def ticket_reading(
        self, state: CustomerState | StoredState, ticket_id: str, as_of: datetime
    ) -> TicketReading:
        """The features of one ticket read from `state` at `as_of`, in a form
        that gives them at any other moment (`TicketReading.at`) without
        reading the state again: a ticket's features have no window, and the
        ones that count time count it from an instant of the ticket."""
        ticket = state.ticket(ticket_id)
        if ticket is None or not ticket.known:
            return TicketReading(None, ())
        values = self._read_ticket(ticket, state.open_ticket_count(), _micros(as_of))
        opened = ticket.opened
        counting = (
            ("ticket_age_hours", opened[0] if opened else ticket.first, 1),
            ("ticket_hours_since_last_activity", ticket.last, 1),
            ("ticket_sla_hours_left", opened[4] if opened and opened[3] else 0, -1),
        )
        return TicketReading(
            values,
            tuple(
                (name, instant, sign)
                for name, instant, sign in counting
                if name in values and self._special(name)
            ),
        )

    def _read_ticket(self, ticket: _Ticket, open_tickets: int, now: int) -> FeatureValues:
        builtin = _ticket_values(ticket, open_tickets, now)
        values: FeatureValues = {}
        for name, op, key in self._ticket_plan:
            value: float | str | None
            if op == _T_BUILTIN:
                value = builtin[key]
            elif op == _T_COUNT:
                value = float(ticket.extra.get(key, 0))
            else:
                latest = ticket.extra.get(key)
                if latest is None:
                    continue
                value = latest[1] / _NANO if op == _T_LAST else str(latest[1])
            if value is not None:
                values[name] = value
        return values

    def features_at_cutoffs(
        self,
        events: Sequence[Event],
        cutoffs: Sequence[datetime],
        ticket_ids: Sequence[str] | None = None,
    ) -> list[tuple[FeatureValues, FeatureValues | None]]:
        """Point-in-time features of one customer at many cutoffs: per cutoff (in
        input order) the customer features and, when `ticket_ids` names a ticket
        for it (one entry per cutoff, "" for none), that ticket's features. Only
        events that occurred strictly before a cutoff count. Sorts the events once
        and folds them into one state as the cutoffs advance."""
        if ticket_ids is not None and len(ticket_ids) != len(cutoffs):
            raise ValueError("ticket_ids must have one entry per cutoff")
        ordered = sorted(events, key=lambda e: e.occurred_at)
        state = CustomerState(features=self)
        results: list[tuple[FeatureValues, FeatureValues | None]] = [({}, None)] * len(cutoffs)
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
                self.customer_features(state, cutoff),
                self.ticket_features(state, ticket_id, cutoff) if ticket_id else None,
            )
        return results


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
    # What a feature set's own ticket features keep: "k<i>" a count, "m<i>"
    # [time, nanos] and "x<i>" [time, text] of the latest value.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def known(self) -> bool:
        return any(self.counts)

    @property
    def open(self) -> bool:
        return self.status is not None and self.status[1] != _STATUS_RESOLVED

    def copy(self) -> _Ticket:
        return _Ticket(
            self.first, self.last, list(self.counts), self.opened, self.status, self.priority,
            self.sentiment, dict(self.extra),
        )  # fmt: skip

    def absorb(self, other: _Ticket) -> None:
        self.first = min(self.first, other.first)
        self.last = max(self.last, other.last)
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.opened = _min_opt(self.opened, other.opened)
        self.status = _max_opt(self.status, other.status)
        self.priority = _max_opt(self.priority, other.priority)
        self.sentiment = _max_opt(self.sentiment, other.sentiment)
        for key, value in other.extra.items():
            mine = self.extra.get(key)
            if mine is None:
                self.extra[key] = value
            elif key[0] == "k":
                self.extra[key] = mine + value
            else:
                self.extra[key] = max(mine, value)

    def to_json(self) -> dict[str, Any]:
        return {
            "first": self.first,
            "last": self.last,
            "counts": list(self.counts),
            "opened": None if self.opened is None else list(self.opened),
            "status": None if self.status is None else list(self.status),
            "priority": None if self.priority is None else list(self.priority),
            "sentiment": None if self.sentiment is None else list(self.sentiment),
            "extra": self.extra,
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
            extra=dict(d["extra"]),
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


@dataclass(slots=True, frozen=True)
class DayReading:
    """A customer's features read from a state at one moment, and what makes
    them the features at any other moment of the same UTC day: every feature
    but the ones that count time from an instant (time since, tenure) is a
    function of the state and the day alone."""

    day: int  # days since 1970-01-01 (UTC)
    values: FeatureValues  # as read
    counting: tuple[tuple[str, int, int], ...]  # (name, instant µs, µs a unit)

    def covers(self, as_of: datetime) -> bool:
        """Whether `as_of` is on this reading's day."""
        return (as_of - _EPOCH).days == self.day

    def at(self, as_of: datetime) -> FeatureValues | None:
        """The features at `as_of`, as `FeatureSet.customer_features` reads
        them from the same state; None on another day."""
        delta = as_of - _EPOCH
        if delta.days != self.day:
            return None
        now = (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        values = dict(self.values)  # (keys already in place: their order is kept)
        for name, instant, per in self.counting:
            values[name] = (now - instant) / per
        return values


@dataclass(slots=True, frozen=True)
class TicketReading:
    """A ticket's features read from a state at one moment, and what makes
    them its features at any other moment while the state is unchanged: the
    built-in features that count hours from an instant of the ticket (its
    age, since its last activity, and to its SLA's due time) are read again
    from it, the others are a function of the state alone."""

    values: FeatureValues | None  # as read; None: the ticket is not in the state
    counting: tuple[tuple[str, int, int], ...]  # (name, instant µs, 1: since it, -1: until it)

    def at(self, as_of: datetime) -> FeatureValues | None:
        """The features at `as_of`, as `FeatureSet.ticket_features` reads them
        from the same state."""
        if self.values is None:
            return None
        now = _micros(as_of)
        values = dict(self.values)  # (keys already in place: their order is kept)
        for name, instant, sign in self.counting:
            # (the expressions of _ticket_values, so the floats are the same)
            values[name] = (
                (now - instant) / _US_PER_HOUR if sign > 0 else (instant - now) / _US_PER_HOUR
            )
        return values


@dataclass(slots=True, frozen=True)
class StoredState:
    """A stored live state as parsed from its JSON (`FeatureSet.stored_state`),
    read as it is: the same fields as a `CustomerState`, tickets left as
    parsed until one is asked for. Reading features from it gives exactly
    what reading the `CustomerState` it describes gives."""

    days: Mapping[str, Mapping[str, int]]
    first: int | None
    times: Mapping[str, int]
    lasts: Mapping[str, Sequence[int]]
    products: Mapping[str, Sequence[int]]
    tickets: Mapping[str, Mapping[str, Any]]  # ticket id -> `_Ticket.to_json()`
    texts: Mapping[str, Sequence[Any]]

    def open_ticket_count(self) -> int:
        return sum(1 for t in self.tickets.values() if _open_status(t["status"]))

    def open_ticket_ids(self) -> list[str]:
        """The customer's open tickets (opened or reopened, not resolved), sorted."""
        return sorted(k for k, t in self.tickets.items() if _open_status(t["status"]))

    def ticket(self, ticket_id: str) -> _Ticket | None:
        raw = self.tickets.get(ticket_id)
        return None if raw is None else _Ticket.from_json(raw)


def _open_status(status: Sequence[int] | None) -> bool:
    return status is not None and status[1] != _STATUS_RESOLVED


@dataclass(slots=True)
class CustomerState:
    """The incremental feature state of one customer under one feature set.
    `apply` is order-independent: the same multiset of events gives an equal
    state."""

    # Kept in the shapes JSON has (day numbers as strings, pairs as lists), so
    # a stored state is used as parsed and stored as it is: converting ~2 KB of
    # state per customer per ingest batch cost more than folding the events.
    days: dict[str, dict[str, int]] = field(default_factory=dict)  # str(day) -> key -> count/nanos
    first: int | None = None  # earliest interaction time (µs)
    times: dict[str, int] = field(default_factory=dict)  # key -> latest time (µs)
    lasts: dict[str, list[int]] = field(default_factory=dict)  # key -> [time, nanos]
    products: dict[str, list[int]] = field(default_factory=dict)  # id -> [time, 1 held|2]
    tickets: dict[str, _Ticket] = field(default_factory=dict)
    texts: dict[str, list[Any]] = field(default_factory=dict)  # key -> [time, text], latest
    # The set whose selectors the state keeps (the built-in one unless given).
    features: FeatureSet = field(default_factory=lambda: BUILTIN, compare=False, repr=False)

    def apply(self, event: Event) -> None:
        """Folds one event in (on the ingest hot path: keep it lean)."""
        delta = event.occurred_at - _EPOCH
        day = delta.days
        t = (day * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        features = self.features
        plan = features.plans.get((event.type, event.channel)) or features.plan(
            event.type, event.channel
        )
        day_key = str(day)
        bucket = self.days.get(day_key)
        if bucket is None:
            bucket = self.days[day_key] = {}
        for key in plan.counts:
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
        for key, attribute in plan.lasts:
            value = _value_nanos(event, attribute)
            if value is not None:
                latest = [t, value]
                old = self.lasts.get(key)
                if old is None or latest > old:
                    self.lasts[key] = latest
        if plan.categories:
            _fold_texts(self.texts, plan.categories, event, t)
        passed: tuple[_Part, ...] = ()
        if plan.conditional:
            passed = tuple(part for fs, part in plan.conditional if _holds(event, fs))
            for part in passed:
                self._apply_part(part, bucket, event, t)
        if self.first is None or t < self.first:
            self.first = t
        if plan.product and event.product_id:
            holding = [t, plan.product]
            old_holding = self.products.get(event.product_id)
            if old_holding is None or holding > old_holding:
                self.products[event.product_id] = holding
        if event.ticket_id:
            ticket = self._apply_ticket(event, t, plan.ticket_kind)
            if plan.ticket_part is not None:
                _apply_ticket_part(ticket, event, t, plan.ticket_part)
            for part in passed:
                if part.touches_ticket:
                    _apply_ticket_part(ticket, event, t, part)

    def _apply_part(self, part: _Part, bucket: dict[str, int], event: Event, t: int) -> None:
        """Folds in what an event's passing filters add (off the common path)."""
        for key in part.counts:
            bucket[key] = bucket.get(key, 0) + 1
        for n_key, s_key, attribute in part.values:
            value = _value_nanos(event, attribute)
            if value is not None:
                bucket[n_key] = bucket.get(n_key, 0) + 1
                total = bucket.get(s_key, 0) + value
                bucket[s_key] = total if -SUM_LIMIT <= total <= SUM_LIMIT else _saturated(total)
        times = self.times
        for key in part.times:
            if t > times.get(key, t - 1):
                times[key] = t
        for key, attribute in part.lasts:
            value = _value_nanos(event, attribute)
            if value is not None:
                latest = [t, value]
                old = self.lasts.get(key)
                if old is None or latest > old:
                    self.lasts[key] = latest
        if part.categories:
            _fold_texts(self.texts, part.categories, event, t)

    def _apply_ticket(self, event: Event, t: int, kind: int) -> _Ticket:
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
            return ticket
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
        return ticket

    def prune(self, now: datetime) -> None:
        """Drops what no feature read at `now` or later needs, and holds the
        state within its bound (see "Bounds" in the module's docstring): day
        buckets before the longest window; resolved tickets and cancelled
        products with no interaction since then; beyond the caps, the tickets
        and products least recently active."""
        horizon = _day(now) - (self.features.max_window - 1)
        for day in [d for d in self.days if int(d) < horizon]:
            del self.days[day]
        # Tickets and products are kept for at least the built-in 90 days
        # whatever the set's windows (their own features read all of them).
        cutoff = min(horizon, _day(now) - 89) * _US_PER_DAY
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
        if len(self.days) > self.features.max_window or self.tickets or self.products:
            self.prune(now)

    def copy(self) -> CustomerState:
        return CustomerState(
            days={d: dict(b) for d, b in self.days.items()},
            first=self.first,
            times=dict(self.times),
            lasts=dict(self.lasts),
            products=dict(self.products),
            tickets={k: tk.copy() for k, tk in self.tickets.items()},
            texts=dict(self.texts),
            features=self.features,
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
        for key, text in other.texts.items():
            merged.texts[key] = max(text, merged.texts.get(key, text))
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

    def open_ticket_count(self) -> int:
        return sum(1 for ticket in self.tickets.values() if ticket.open)

    def ticket(self, ticket_id: str) -> _Ticket | None:
        return self.tickets.get(ticket_id)

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable form, sharing this state's dicts (serialise it
        before changing the state); see `FeatureSet.state_from_json`."""
        return {
            "version": self.features.state_version,
            "first": self.first,
            "days": self.days,
            "times": self.times,
            "lasts": self.lasts,
            "products": self.products,
            "tickets": {k: tk.to_json() for k, tk in self.tickets.items()},
            "texts": self.texts,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], features: FeatureSet | None = None) -> CustomerState:
        """The state `to_json` described, under `features` (the built-in set
        when not given). Raises StateVersionError for a state kept by another
        state version (rebuild it from the interactions)."""
        return (features or BUILTIN).state_from_json(d)


def _fold_texts(
    texts: dict[str, Any], keys: tuple[tuple[str, str], ...], event: Event, t: int
) -> None:
    """Keeps, under each key, the latest [time, text] of its attribute (ties
    by text, so the order events come in does not matter)."""
    for key, attribute in keys:
        text = attribute_text(event, attribute)
        if text is not None:
            latest: list[Any] = [t, text]
            old = texts.get(key)
            if old is None or latest > old:
                texts[key] = latest


def _apply_ticket_part(ticket: _Ticket, event: Event, t: int, part: _Part) -> None:
    """Folds an event into what a set's own ticket features keep of its ticket."""
    extra = ticket.extra
    for key in part.ticket_counts:
        extra[key] = extra.get(key, 0) + 1
    for key, attribute in part.ticket_lasts:
        value = _value_nanos(event, attribute)
        if value is not None:
            latest = [t, value]
            old = extra.get(key)
            if old is None or latest > old:
                extra[key] = latest
    if part.ticket_categories:
        _fold_texts(extra, part.ticket_categories, event, t)


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


# --- reading features --------------------------------------------------------------


def _slope(
    days: Mapping[str, Mapping[str, int]],
    offsets: Mapping[str, int],
    n_key: str,
    s_key: str,
    window: int,
) -> float | None:
    """Least-squares slope per day of the values under `s_key` (each event
    one point at its day, `offsets` its days back from the day read), exact
    until the final division."""
    n = sx = sxx = sy = sxy = 0
    for day_key, bucket in days.items():
        offset = offsets.get(day_key, window)
        if offset < window:
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


def _ticket_values(ticket: _Ticket, open_tickets: int, now: int) -> dict[str, float | None]:
    """Every built-in ticket feature read from the fixed sub-state by name, None where it has no value."""
    opened = ticket.opened
    sla_left = None
    if opened is not None:
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
        "ticket_last_sentiment": None if ticket.sentiment is None else ticket.sentiment[1],
        "ticket_sla_hours_left": sla_left,
        "ticket_customer_open_tickets": float(open_tickets),
    }


# --- the built-in set, and names for callers that never configure one -------------

BUILTIN: FeatureSet = FeatureSet("builtin", _BUILTIN)
REGISTRY: tuple[FeatureDefinition, ...] = BUILTIN.definitions
CUSTOMER_FEATURES: tuple[str, ...] = BUILTIN.customer_names
TICKET_FEATURES: tuple[str, ...] = BUILTIN.ticket_names
FEATURE_SET_VERSION: str = BUILTIN.version
STATE_VERSION: str = BUILTIN.state_version
build_state = BUILTIN.build_state
customer_features = BUILTIN.customer_features
ticket_features = BUILTIN.ticket_features
features_at_cutoffs = BUILTIN.features_at_cutoffs

"""The feature reads as the engine computed them before they were compiled
into one plan per feature set (commit "GetFeatures in a millisecond budget"),
kept here verbatim as the reference the compiled reads must equal: a running
total over every day of the longest window, one closure per feature, and the
ticket's built-in features by name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime
from typing import NamedTuple

from converge.features.engine import (
    _BREACHED,
    _BUILTIN_SPECIALS,
    _ESCALATED,
    _NANO,
    _PRIORITY_CHANGED,
    _REASSIGNED,
    _REOPENED,
    _UPDATED,
    _US_PER_DAY,
    _US_PER_HOUR,
    CustomerState,
    FeatureDefinition,
    FeatureSet,
    FeatureValues,
    _day,
    _micros,
    _selector,
    _Ticket,
)


class _Reading(NamedTuple):
    state: CustomerState
    now: int
    today: int
    windows: dict[int, dict[str, int]]


def _day_keys(features: FeatureSet, today: int) -> tuple[str, ...]:
    return tuple(str(today - offset) for offset in range(features.max_window))


def _window_totals(
    features: FeatureSet, days: Mapping[str, Mapping[str, int]], today: int
) -> dict[int, dict[str, int]]:
    running: dict[str, int] = {}
    totals: dict[int, dict[str, int]] = {}
    snapshots = {d.window_days for d in features.definitions if d.window_days} | (
        {30} if features._special("usage_change_30d") else set()
    )
    for offset, day_key in enumerate(_day_keys(features, today)):
        bucket = days.get(day_key)
        if bucket:
            for key, value in bucket.items():
                running[key] = running.get(key, 0) + value
        if offset + 1 in snapshots:
            totals[offset + 1] = dict(running)
    return totals


def _slope(r: _Reading, key: str, window: int) -> float | None:
    n_key, s_key = "n:" + key, "s:" + key
    n = sx = sxx = sy = sxy = 0
    day_keys = _day_keys(r.state.features, r.today)
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


_Evaluator = Callable[[_Reading], float | str | None]


def _evaluator(features: FeatureSet, d: FeatureDefinition) -> _Evaluator:
    per = _US_PER_HOUR if d.unit == "hours" else _US_PER_DAY
    special = features._is_special(d)
    if d.name == "tenure_days" and special:
        return lambda r: None if r.state.first is None else (r.now - r.state.first) / per
    if d.name == "open_tickets" and special:
        return lambda r: float(_open_tickets(r.state))
    if d.name == "products_held" and special:
        return lambda r: float(sum(1 for _, how in r.state.products.values() if how == 1))
    key = features.keys[features._selector_kind(d), _selector(d)]
    window = d.window_days or 0
    if d.name == "usage_change_30d" and d in _BUILTIN_SPECIALS:
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
    assert d.aggregation == "category"

    def text(r: _Reading) -> str | None:
        latest = r.state.texts.get(key)
        return None if latest is None else str(latest[1])

    return text


def reference_customer_features(
    features: FeatureSet, state: CustomerState, as_of: datetime
) -> FeatureValues:
    today = _day(as_of)
    reading = _Reading(state, _micros(as_of), today, _window_totals(features, state.days, today))
    values: FeatureValues = {}
    for d in features.definitions:
        if d.entity == "customer":
            value = _evaluator(features, d)(reading)
            if value is not None:
                values[d.name] = value
    return values


def _ticket_values(ticket: _Ticket, state: CustomerState, now: int) -> dict[str, float | None]:
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
        "ticket_customer_open_tickets": float(_open_tickets(state)),
    }


def reference_ticket_features(
    features: FeatureSet, state: CustomerState, ticket_id: str, as_of: datetime
) -> FeatureValues | None:
    ticket = state.tickets.get(ticket_id)
    if ticket is None or not ticket.known:
        return None
    builtin = _ticket_values(ticket, state, _micros(as_of))
    values: FeatureValues = {}
    for d in features.definitions:
        if d.entity != "ticket":
            continue
        value: float | str | None
        if features._is_special(d):
            value = builtin[d.name]
        else:
            key = features.keys[features._selector_kind(d), _selector(d)]
            latest = ticket.extra.get(key)
            if d.aggregation == "count":
                value = float(latest or 0)
            elif latest is None:
                value = None
            elif d.aggregation == "last":
                value = latest[1] / _NANO
            else:
                value = str(latest[1])
        if value is not None:
            values[d.name] = value
    return values

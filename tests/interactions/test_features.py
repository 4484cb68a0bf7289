"""The feature engine: properties that make live and point-in-time features
agree (order independence, merges, JSON round trips, cutoffs, no leakage) and
hand-computed examples of the definitions."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.features.engine import (
    FEATURE_SET_VERSION,
    REGISTRY,
    CustomerState,
    Event,
    StateVersionError,
    build_state,
    customer_features,
    features_at_cutoffs,
    ticket_features,
)
from converge.interactions.types import BUILT_IN_TYPES, PRIORITIES, AttrValue

PROPERTY = settings(max_examples=50, deadline=None)
BASE = datetime(2025, 3, 1, tzinfo=UTC)
SPAN_US = 100 * 86_400 * 1_000_000
# A few fixed instants so that generated events often share a time (ties).
TIE_TIMES = [BASE + timedelta(days=d, hours=9) for d in (3, 40, 41, 95)]
TYPES = [*sorted(BUILT_IN_TYPES), "custom.loyalty.redeemed"]
# Types drawn more often, so that generated events collide on what they change.
HOT_TYPES = ["ticket.opened", "ticket.resolved", "ticket.reopened", "ticket.priority_changed",
             "survey.nps", "purchase", "subscription.cancelled", "conversation.chat"]  # fmt: skip
TICKETS = ["", "t1", "t2"]
PRODUCTS = ["", "p1", "p2"]


def at(day: int, hour: int = 12, minute: int = 0) -> datetime:
    """BASE's day `day` at the given UTC time."""
    return BASE + timedelta(days=day, hours=hour, minutes=minute)


def event(
    when: datetime,
    type_: str,
    attributes: dict[str, AttrValue] | None = None,
    *,
    channel: int = 1,
    ticket_id: str = "",
    product_id: str = "",
    amount: float | None = None,
    sentiment: float | None = None,
) -> Event:
    return Event(when, type_, channel, attributes or {}, ticket_id, product_id, amount, sentiment)


# --- strategies --------------------------------------------------------------------

times = st.one_of(
    st.sampled_from(TIE_TIMES),
    st.integers(0, SPAN_US).map(lambda us: BASE + timedelta(microseconds=us)),
)
floats = st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False)


@st.composite
def attributes_for(draw: st.DrawFn, type_: str, when: datetime) -> dict[str, AttrValue]:
    attrs: dict[str, AttrValue] = {}
    if type_ in ("ticket.opened", "ticket.priority_changed"):
        attrs["priority"] = draw(st.sampled_from([*PRIORITIES, "weird"]))
    if type_ == "ticket.opened":
        if draw(st.booleans()):
            attrs["category"] = draw(st.sampled_from(["billing", "Network ", "quantum"]))
        if draw(st.booleans()):
            attrs["sla_due_at"] = when + timedelta(minutes=draw(st.integers(-600, 6000)))
    if type_.startswith("survey."):
        attrs["score"] = draw(st.one_of(st.integers(0, 10).map(float), floats))
    if type_ == "action.outcome":
        attrs["outcome"] = draw(st.sampled_from(["accepted", "declined", "converted", "ignored"]))
    return attrs


@st.composite
def events(draw: st.DrawFn) -> Event:
    type_ = draw(st.sampled_from(HOT_TYPES) | st.sampled_from(TYPES))
    when = draw(times)
    return Event(
        occurred_at=when,
        type=type_,
        channel=draw(st.integers(0, 12)),
        attributes=draw(attributes_for(type_, when)),
        ticket_id=draw(st.sampled_from(TICKETS)),
        product_id=draw(st.sampled_from(PRODUCTS)),
        amount=draw(st.none() | floats),
        sentiment=draw(st.none() | st.floats(-1, 1)),
    )


event_lists = st.lists(events(), max_size=40)


def all_features(state: CustomerState, as_of: datetime) -> list[Any]:
    tickets = [ticket_features(state, t, as_of) for t in TICKETS if t]
    return [customer_features(state, as_of), *tickets]


# --- properties --------------------------------------------------------------------


@PROPERTY
@given(event_lists, st.randoms(use_true_random=False))
def test_apply_is_order_independent(evs: list[Event], rnd: random.Random) -> None:
    shuffled = list(evs)
    rnd.shuffle(shuffled)
    one, other = build_state(evs), build_state(shuffled)
    assert one == other
    assert one.to_json() == other.to_json()
    as_of = BASE + timedelta(days=101)
    assert all_features(one, as_of) == all_features(other, as_of)


@PROPERTY
@given(event_lists, event_lists)
def test_merge_is_commutative_and_equals_the_union(a: list[Event], b: list[Event]) -> None:
    state_a, state_b = build_state(a), build_state(b)
    before = state_a.to_json()
    merged = state_a.merge(state_b)
    assert merged == state_b.merge(state_a)
    assert merged == build_state(a + b)
    assert state_a.to_json() == before  # merge leaves its inputs alone


@PROPERTY
@given(event_lists)
def test_json_round_trip_is_exact(evs: list[Event]) -> None:
    state = build_state(evs)
    text = json.dumps(state.to_json(), allow_nan=False)
    restored = CustomerState.from_json(json.loads(text))
    assert restored == state
    assert restored.to_json() == state.to_json()


@PROPERTY
@given(event_lists, st.lists(times, min_size=1, max_size=6), st.data())
def test_features_at_cutoffs_equal_recomputation(
    evs: list[Event], cutoffs: list[datetime], data: st.DataObject
) -> None:
    tickets = data.draw(st.lists(st.sampled_from(TICKETS), min_size=len(cutoffs),
                                 max_size=len(cutoffs)))  # fmt: skip
    computed = features_at_cutoffs(evs, cutoffs, tickets)
    for cutoff, ticket_id, (customer, ticket) in zip(cutoffs, tickets, computed, strict=True):
        state = build_state([e for e in evs if e.occurred_at < cutoff])
        assert customer == customer_features(state, cutoff)
        assert ticket == (ticket_features(state, ticket_id, cutoff) if ticket_id else None)


@PROPERTY
@given(event_lists, times, st.lists(events(), min_size=1, max_size=5), st.sampled_from(TICKETS))
def test_events_after_the_cutoff_cannot_change_its_features(
    evs: list[Event], cutoff: datetime, late: list[Event], ticket_id: str
) -> None:
    future = [dataclasses.replace(e, occurred_at=max(e.occurred_at, cutoff)) for e in late]
    assert features_at_cutoffs(evs + future, [cutoff], [ticket_id]) == features_at_cutoffs(
        evs, [cutoff], [ticket_id]
    )


@PROPERTY
@given(event_lists, st.integers(0, 60), st.integers(0, 10))
def test_pruning_does_not_change_customer_features_from_then_on(
    evs: list[Event], prune_day: int, later_days: int
) -> None:
    now = BASE + timedelta(days=100, hours=23)
    state = build_state(evs)
    pruned = build_state(evs)
    pruned.prune(now - timedelta(days=prune_day))
    for as_of in (now, now + timedelta(days=later_days)):
        assert customer_features(pruned, as_of) == customer_features(state, as_of)
        assert pruned.open_ticket_ids() == state.open_ticket_ids()


@PROPERTY
@given(event_lists)
def test_only_features_that_may_be_missing_are_ever_left_out(evs: list[Event]) -> None:
    state = build_state(evs)
    as_of = BASE + timedelta(days=101)
    always = {d.name for d in REGISTRY if not d.may_be_missing}
    customer = customer_features(state, as_of)
    assert {d.name for d in REGISTRY if d.entity == "customer"} >= set(customer)
    assert always & {d.name for d in REGISTRY if d.entity == "customer"} <= set(customer)
    for ticket_id in TICKETS[1:]:
        ticket = ticket_features(state, ticket_id, as_of)
        if ticket is not None:
            assert always & {d.name for d in REGISTRY if d.entity == "ticket"} <= set(ticket)


# --- the registry ------------------------------------------------------------------


def test_registry_names_are_unique_described_and_prefixed_by_entity() -> None:
    names = [d.name for d in REGISTRY]
    assert len(names) == len(set(names))
    for d in REGISTRY:
        assert d.description and d.used_by, d.name
        assert d.name.startswith("ticket_") == (d.entity == "ticket"), d.name
        assert d.window_days in (None, 7, 30, 60, 90), d.name
    assert re.fullmatch(r"builtin-[0-9a-f]{12}", FEATURE_SET_VERSION)


def test_every_registered_feature_is_computed_for_a_busy_customer() -> None:
    evs = [
        event(at(1), "ticket.opened", {"priority": "high", "category": "billing",
              "sla_due_at": at(2)}, ticket_id="t1", sentiment=-0.5),
        event(at(2), "ticket.updated", ticket_id="t1", sentiment=0.1),
        event(at(2), "purchase", product_id="p1", amount=10.0),
        event(at(3), "survey.nps", {"score": 9.0}),
        event(at(3), "survey.csat", {"score": 4.0}),
        event(at(3), "survey.ces", {"score": 2.0}),
        event(at(3), "product.login"),
    ]  # fmt: skip
    state = build_state(evs)
    customer = customer_features(state, at(5))
    ticket = ticket_features(state, "t1", at(5))
    assert ticket is not None
    assert set(customer) | set(ticket) == {d.name for d in REGISTRY}


# --- hand-computed examples --------------------------------------------------------


def test_an_empty_state_has_zero_counts_and_no_unknown_values() -> None:
    values = customer_features(CustomerState(), at(0))
    assert values["count_30d_all"] == 0.0
    assert values["open_tickets"] == 0.0
    assert values["products_held"] == 0.0
    for missing in ("nps_last", "days_since_last_interaction", "tenure_days",
                    "sentiment_mean_30d", "sentiment_trend_30d"):  # fmt: skip
        assert missing not in values


def test_seven_day_window_edge_is_a_calendar_day() -> None:
    as_of = at(10, hour=12)
    evs = [
        event(at(3, hour=23, minute=59), "product.login", channel=9),  # day(as_of) - 7
        event(at(4, hour=0), "product.login", channel=9),  # day(as_of) - 6
    ]
    values = customer_features(build_state(evs), as_of)
    assert values["count_7d_login"] == 1.0
    assert values["count_30d_login"] == 2.0
    assert values["count_7d_channel_product"] == 1.0
    assert values["count_30d_channel_product"] == 2.0
    assert values["count_7d_channel_web"] == 0.0


def test_an_event_at_the_cutoff_is_not_counted() -> None:
    cutoff = at(10)
    evs = [event(at(9), "complaint", {"category": "x"}), event(cutoff, "complaint")]
    [(values, _)] = features_at_cutoffs(evs, [cutoff])
    assert values["count_7d_complaint"] == 1.0


def test_products_held_after_purchase_then_cancellation() -> None:
    evs = [
        event(at(1), "purchase", product_id="p1", amount=20.0),
        event(at(5), "subscription.cancelled", product_id="p1"),
        event(at(2), "subscription.started", product_id="p2"),
    ]
    assert customer_features(build_state(evs), at(6))["products_held"] == 1.0
    assert customer_features(build_state(reversed(evs)), at(6))["products_held"] == 1.0
    repurchase = event(at(7), "purchase", product_id="p1", amount=20.0)
    assert customer_features(build_state([*evs, repurchase]), at(8))["products_held"] == 2.0


def test_nps_last_is_the_latest_by_time_not_by_arrival() -> None:
    state = CustomerState()
    state.apply(event(at(20), "survey.nps", {"score": 3.0}))
    state.apply(event(at(10), "survey.nps", {"score": 9.0}))  # arrives late
    values = customer_features(state, at(21))
    assert values["nps_last"] == 3.0
    assert values["nps_mean_90d"] == 6.0
    assert "csat_last" not in values


def test_ticket_status_after_resolved_then_reopened() -> None:
    opened = event(at(1), "ticket.opened", {"priority": "low"}, ticket_id="t1")
    resolved = event(at(2), "ticket.resolved", ticket_id="t1")
    reopened = event(at(3), "ticket.reopened", ticket_id="t1")
    state = build_state([reopened, resolved, opened])
    assert state.open_ticket_ids() == ["t1"]
    ticket = ticket_features(state, "t1", at(4))
    assert ticket is not None
    assert ticket["ticket_open"] == 1.0
    assert ticket["ticket_reopens"] == 1.0
    assert ticket["ticket_customer_open_tickets"] == 1.0
    assert ticket["ticket_age_hours"] == 72.0
    assert customer_features(state, at(4))["open_tickets"] == 1.0
    state.apply(event(at(3, hour=18), "ticket.resolved", ticket_id="t1"))
    assert state.open_ticket_ids() == []
    assert customer_features(state, at(4))["open_tickets"] == 0.0


def test_sla_hours_left_counts_down_and_goes_negative() -> None:
    opened = event(at(1, hour=10), "ticket.opened",
                   {"priority": "high", "sla_due_at": at(1, hour=18)}, ticket_id="t1")  # fmt: skip
    state = build_state([opened])
    ticket = ticket_features(state, "t1", at(1, hour=12, minute=30))
    assert ticket is not None
    assert ticket["ticket_sla_hours_left"] == 5.5
    late = ticket_features(state, "t1", at(1, hour=20))
    assert late is not None
    assert late["ticket_sla_hours_left"] == -2.0
    no_sla = build_state([event(at(1), "ticket.opened", {"priority": "low"}, ticket_id="t2")])
    assert "ticket_sla_hours_left" not in (ticket_features(no_sla, "t2", at(2)) or {})


def test_a_ticket_opened_twice_ages_from_the_earliest_open_and_reads_the_latest_values() -> None:
    first = event(
        at(1),
        "ticket.opened",
        {"priority": "low", "category": "billing"},
        ticket_id="t1",
        channel=5,
    )
    second = event(at(2), "ticket.opened", {"priority": "high", "category": "network"},
                   ticket_id="t1", channel=3)  # fmt: skip
    before = event(at(0), "conversation.call", {"direction": "inbound"}, ticket_id="t1")
    for state in (build_state([first, second, before]), build_state([before, second, first])):
        ticket = ticket_features(state, "t1", at(3))
        assert ticket is not None
        # Category features are the latest value among the events they select.
        assert ticket["ticket_channel"] == "email"
        assert ticket["ticket_category"] == "network"
        assert ticket["ticket_priority"] == PRIORITIES.index("high")  # the latest priority
        assert ticket["ticket_age_hours"] == 48.0  # since the open, not the earlier call


def test_prune_keeps_exactly_the_longest_window() -> None:
    now = at(100, hour=6)
    state = build_state(
        [event(at(100 - 90), "product.login"), event(at(100 - 89, hour=0), "product.login")]
    )
    assert customer_features(state, now)["count_90d_all"] == 1.0
    state.prune(now)
    assert customer_features(state, now)["count_90d_all"] == 1.0
    assert len(state.to_json()["days"]) == 1
    assert customer_features(state, now)["tenure_days"] == 89.75  # kept beyond the windows


def test_ticket_categories_priority_and_channel() -> None:
    state = build_state(
        [
            event(at(1), "ticket.opened", {"priority": "low", "category": "Quantum"},
                  ticket_id="t1", channel=5),
            event(at(2), "ticket.priority_changed", {"priority": "urgent",
                  "previous_priority": "low"}, ticket_id="t1"),
            event(at(1), "ticket.opened", {"priority": "normal", "category": " Billing"},
                  ticket_id="t2", channel=0),
            event(at(1), "ticket.opened", {"priority": "normal"}, ticket_id="t3"),
        ]
    )  # fmt: skip
    t1, t2, t3 = (ticket_features(state, t, at(3)) for t in ("t1", "t2", "t3"))
    assert t1 is not None and t2 is not None and t3 is not None
    # Categories are text as sent (trimmed), learned at training time, so a
    # category nobody listed in advance is kept, not turned into "other".
    assert t1["ticket_category"] == "Quantum"
    assert t1["ticket_priority"] == PRIORITIES.index("urgent")  # an ordinal rank
    assert t1["ticket_priority_changes"] == 1.0
    assert t1["ticket_channel"] == "phone"
    assert t2["ticket_category"] == "Billing"
    assert "ticket_channel" not in t2  # unspecified: no value
    assert "ticket_category" not in t3


def test_ticket_last_sentiment_and_unknown_tickets() -> None:
    state = build_state(
        [
            event(at(1), "ticket.opened", {"priority": "low"}, ticket_id="t1", sentiment=-0.8),
            event(at(3), "conversation.chat", {"direction": "inbound"}, ticket_id="t1",
                  sentiment=0.25),
            event(at(2), "conversation.call", {"direction": "inbound"}, ticket_id="t1",
                  sentiment=-1.0),
            event(at(2), "conversation.call", {"direction": "inbound"}, ticket_id="t9"),
        ]
    )  # fmt: skip
    ticket = ticket_features(state, "t1", at(4))
    assert ticket is not None
    assert ticket["ticket_last_sentiment"] == 0.25
    assert ticket["ticket_hours_since_last_activity"] == 24.0
    assert ticket_features(state, "t9", at(4)) is None  # only mentioned, never a ticket.*
    assert ticket_features(state, "nope", at(4)) is None


def test_spend_is_exact_whatever_the_order() -> None:
    evs = [
        event(at(1), "purchase", product_id="p1", amount=0.1),
        event(at(2), "purchase", product_id="p1", amount=0.2),
    ]
    assert 0.1 + 0.2 != 0.3
    assert customer_features(build_state(evs), at(3))["spend_30d"] == 0.3


def test_sentiment_mean_and_trend() -> None:
    evs = [
        event(at(8), "conversation.chat", sentiment=-0.5),
        event(at(9), "conversation.chat", sentiment=0.0),
        event(at(10, hour=1), "complaint", {"category": "x"}, sentiment=0.25),
        event(at(10, hour=2), "complaint", {"category": "x"}, sentiment=0.75),
    ]
    values = customer_features(build_state(evs), at(10, hour=3))
    assert values["sentiment_mean_30d"] == 0.125
    # points (-2, -0.5), (-1, 0), (0, 0.25), (0, 0.75): slope 0.5 per day
    assert values["sentiment_trend_30d"] == 0.5
    one_day = customer_features(build_state(evs[2:]), at(10, hour=3))
    assert "sentiment_trend_30d" not in one_day
    assert one_day["sentiment_mean_30d"] == 0.5


def test_recency_tenure_and_usage_change() -> None:
    evs = [
        event(at(0), "marketing.sent", {"campaign_id": "c"}),
        event(at(20), "product.login", channel=9),
        event(at(50), "product.login", channel=9),
        event(at(55), "product.usage", {"feature": "export"}, channel=9),
        event(at(58), "product.login", channel=9),
    ]
    values = customer_features(build_state(evs), at(60))
    assert values["tenure_days"] == 60.0
    assert values["days_since_last_interaction"] == 2.0
    assert values["days_since_last_login"] == 2.0
    assert "days_since_last_purchase" not in values
    assert values["usage_change_30d"] == 3.0 - 1.0


def test_outcome_counts_and_ticket_lifecycle_counts() -> None:
    def outcome(day: int, value: str) -> Event:
        attrs: dict[str, AttrValue] = {"alert_id": "a", "action_kind": "k", "outcome": value}
        return event(at(day), "action.outcome", attrs)

    evs = [
        outcome(1, "accepted"),
        outcome(2, "accepted"),
        outcome(3, "declined"),
        outcome(4, "ignored"),
        event(at(5), "ticket.escalated", ticket_id="t1"),
        event(at(6), "ticket.sla_breached", {"sla": "resolution"}, ticket_id="t1"),
        event(at(7), "payment.failed", amount=30.0),
    ]
    values = customer_features(build_state(evs), at(8))
    assert values["actions_accepted_90d"] == 2.0
    assert values["actions_declined_90d"] == 1.0
    assert values["actions_converted_90d"] == 0.0
    assert values["escalations_90d"] == 1.0
    assert values["sla_breaches_90d"] == 1.0
    assert values["payment_failures_30d"] == 1.0
    assert values["open_tickets"] == 0.0  # never opened: not counted as open


def test_a_state_of_another_version_must_be_rebuilt() -> None:
    stored = build_state([event(at(1), "product.login")]).to_json()
    stored["version"] = "s1-000000000000"
    with pytest.raises(StateVersionError):
        CustomerState.from_json(stored)


def test_features_at_cutoffs_answers_in_input_order() -> None:
    evs = [event(at(d), "product.login") for d in range(10)]
    cutoffs = [at(9, hour=13), at(0, hour=13), at(4, hour=13)]
    counts = [c["count_30d_all"] for c, _ in features_at_cutoffs(evs, cutoffs)]
    assert counts == [10.0, 1.0, 5.0]
    with pytest.raises(ValueError):
        features_at_cutoffs(evs, cutoffs, ["t1"])

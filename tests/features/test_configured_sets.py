"""A configured feature set through the engine: attribute-filtered
aggregations, categorical features of customers and tickets read at a
cutoff, and the properties that make live and point-in-time features agree
(order independence, merges, JSON round trips, cutoffs)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from converge.features.definitions import AttrValue, Event
from converge.features.engine import CustomerState, FeatureSet, StateVersionError
from tests.features.sets import filtered_set

PROPERTY = settings(max_examples=60, deadline=None)
BASE = datetime(2025, 3, 1, tzinfo=UTC)
SET = filtered_set()
PHONE, WEB = 5, 1


def at(day: float) -> datetime:
    return BASE + timedelta(days=day)


def event(
    day: float,
    type_: str,
    attributes: dict[str, AttrValue] | None = None,
    *,
    channel: int = WEB,
    ticket_id: str = "",
    product_id: str = "",
    amount: Decimal | None = None,
) -> Event:
    return Event(at(day), type_, channel, attributes or {}, ticket_id, product_id, amount)


def read(events: list[Event], as_of: datetime, features: FeatureSet = SET) -> dict:
    return features.customer_features(features.build_state(events), as_of)


def test_a_count_counts_only_interactions_whose_attributes_pass_every_filter() -> None:
    events = [
        event(1, "ticket.opened", {"priority": "high", "category": "network"}, ticket_id="a"),
        event(2, "ticket.opened", {"priority": "urgent", "category": " Network "}, ticket_id="b"),
        event(3, "ticket.opened", {"priority": "low", "category": "network"}, ticket_id="c"),
        event(4, "ticket.opened", {"priority": "high", "category": "billing"}, ticket_id="d"),
        event(5, "ticket.opened", {"priority": "high"}, ticket_id="e"),  # no category: fails
        event(6, "ticket.updated", {"priority": "high", "category": "network"}, ticket_id="a"),
    ]
    features = read(events, at(10))
    assert features["network_tickets_30d"] == 2.0  # (text compared trimmed, case ignored)
    assert features["count_30d_ticket_opened"] == 5.0  # the built-in count is not filtered
    assert read(events, at(31))["network_tickets_30d"] == 1.0  # the 30-day window moved on


def test_filters_combine_with_the_channel_and_apply_to_means() -> None:
    events = [
        event(1, "conversation.call", {"direction": "inbound"}, channel=PHONE),
        event(1, "conversation.call", {"direction": "outbound"}, channel=PHONE),
        event(1, "conversation.call", {"direction": "inbound"}, channel=WEB),
        event(2, "purchase", product_id="tv", amount=Decimal("100")),
        event(3, "purchase", product_id="tv", amount=Decimal("50.5")),
        event(4, "purchase", product_id="phone", amount=Decimal("1000")),
    ]
    features = read(events, at(5))
    assert features["phone_calls_inbound_7d"] == 1.0
    assert features["tv_order_value_mean_365d"] == 75.25
    assert "tv_order_value_mean_365d" not in read(events[:3], at(5))  # no purchase: missing


def test_a_customer_category_is_the_latest_value_before_the_cutoff() -> None:
    events = [
        event(1, "ticket.opened", {"priority": "low", "category": "billing"}, ticket_id="a"),
        event(5, "ticket.opened", {"priority": "high", "category": "network"}, ticket_id="b"),
        event(9, "ticket.opened", {"priority": "normal", "category": "access"}, ticket_id="c"),
    ]
    before_any, early, middle, late = SET.features_at_cutoffs(events, [at(0), at(5), at(6), at(20)])
    assert "last_ticket_category" not in before_any[0]
    assert early[0]["last_ticket_category"] == "billing"  # (the day-5 open is not before 5)
    assert middle[0]["last_ticket_category"] == "network"
    assert middle[0]["last_network_ticket_priority"] == "high"
    assert late[0]["last_ticket_category"] == "access"
    assert late[0]["last_network_ticket_priority"] == "high"  # (filtered: access is not network)


def test_ticket_features_read_the_tickets_own_attributes_at_the_cutoff() -> None:
    events = [
        event(
            1,
            "ticket.opened",
            {"priority": "high", "category": "network", "assignment_group": "Group 1"},
            ticket_id="t1",
        ),
        event(
            2, "ticket.updated", {"urgency": "high", "assignment_group": "Group 2"}, ticket_id="t1"
        ),
        event(3, "ticket.updated", {"urgency": "high", "category": "hardware"}, ticket_id="t1"),
        event(4, "ticket.updated", {"urgency": "low"}, ticket_id="t1"),
        # Another ticket of the same customer changes nothing of t1's.
        event(
            2,
            "ticket.opened",
            {"priority": "low", "category": "billing", "assignment_group": "Group 9"},
            ticket_id="t2",
        ),
    ]
    cutoffs = [at(1.5), at(2.5), at(3.5), at(9)]
    read_at = SET.features_at_cutoffs(events, cutoffs, ["t1"] * len(cutoffs))
    tickets = [ticket for _, ticket in read_at]
    assert all(ticket is not None for ticket in tickets)
    assert [t["ticket_current_category"] for t in tickets if t] == [
        "network", "network", "hardware", "hardware"
    ]  # fmt: skip
    assert [t["ticket_assignment_group"] for t in tickets if t] == [
        "Group 1", "Group 2", "Group 2", "Group 2"
    ]  # fmt: skip
    assert [t["ticket_urgent_updates"] for t in tickets if t] == [0.0, 1.0, 2.0, 2.0]
    assert tickets[0] and tickets[0]["ticket_category"] == "network"  # the built-in one, text
    assert tickets[0] and tickets[0]["ticket_channel"] == "web"


def test_a_state_kept_under_another_set_must_be_rebuilt() -> None:
    kept = CustomerState().to_json()  # (the built-in set's)
    try:
        SET.state_from_json(kept)
    except StateVersionError:
        pass
    else:
        raise AssertionError("a state of another state version was taken")
    assert SET.state_from_json(SET.new_state().to_json()) == SET.new_state()


# --- properties --------------------------------------------------------------------

TYPES = ["ticket.opened", "ticket.updated", "ticket.resolved", "conversation.call", "purchase",
         "product.login", "custom.loyalty.redeemed"]  # fmt: skip
TICKETS = ["", "t1", "t2"]
times = st.one_of(
    st.sampled_from([at(3), at(40), at(41), at(95)]),  # ties
    st.integers(0, 100 * 86_400).map(lambda s: BASE + timedelta(seconds=s)),
)


@st.composite
def events(draw: st.DrawFn) -> Event:
    type_ = draw(st.sampled_from(TYPES))
    attributes: dict[str, AttrValue] = {}
    for name, values in (
        ("priority", ["low", "high", "URGENT", "weird"]),
        ("category", ["network", "Network ", "billing", ""]),
        ("urgency", ["high", "low"]),
        ("assignment_group", ["Group 1", "Group 2", "group 1"]),
        ("direction", ["inbound", "outbound"]),
    ):
        if draw(st.booleans()):
            attributes[name] = draw(st.sampled_from(values))
    if draw(st.booleans()):
        attributes["category"] = draw(st.sampled_from([1.0, 2.5, True]))  # (not text: as text)
    return Event(
        occurred_at=draw(times),
        type=type_,
        channel=draw(st.integers(0, 12)),
        attributes=attributes,
        ticket_id=draw(st.sampled_from(TICKETS)),
        product_id=draw(st.sampled_from(["", "tv", "phone"])),
        amount=draw(st.none() | st.decimals(-1000, 1000, places=2)),
    )


event_lists = st.lists(events(), max_size=40)


def everything(state: CustomerState, as_of: datetime) -> list[object]:
    return [SET.customer_features(state, as_of)] + [
        SET.ticket_features(state, t, as_of) for t in TICKETS if t
    ]


@PROPERTY
@given(event_lists, st.randoms(use_true_random=False))
def test_fold_order_does_not_change_a_configured_sets_state(
    evs: list[Event], rnd: random.Random
) -> None:
    shuffled = list(evs)
    rnd.shuffle(shuffled)
    one, other = SET.build_state(evs), SET.build_state(shuffled)
    assert one == other
    assert one.to_json() == other.to_json()
    assert everything(one, at(101)) == everything(other, at(101))


@PROPERTY
@given(event_lists, event_lists)
def test_merging_configured_states_equals_folding_the_union(a: list[Event], b: list[Event]) -> None:
    merged = SET.build_state(a).merge(SET.build_state(b))
    assert merged == SET.build_state(b).merge(SET.build_state(a))
    assert merged == SET.build_state(a + b)
    restored = SET.state_from_json(json.loads(json.dumps(merged.to_json(), allow_nan=False)))
    assert restored == merged


@PROPERTY
@given(event_lists, st.lists(times, min_size=1, max_size=5), st.data())
def test_configured_features_at_cutoffs_equal_a_live_state_of_the_earlier_events(
    evs: list[Event], cutoffs: list[datetime], data: st.DataObject
) -> None:
    tickets = data.draw(
        st.lists(st.sampled_from(TICKETS), min_size=len(cutoffs), max_size=len(cutoffs))
    )
    computed = SET.features_at_cutoffs(evs, cutoffs, tickets)
    for cutoff, ticket_id, (customer, ticket) in zip(cutoffs, tickets, computed, strict=True):
        live = SET.build_state([e for e in evs if e.occurred_at < cutoff])
        live.prune(cutoff)  # (as ingest tidies every state it writes)
        assert customer == SET.customer_features(live, cutoff)
        assert ticket == (SET.ticket_features(live, ticket_id, cutoff) if ticket_id else None)
        for name, value in customer.items():
            assert isinstance(value, str) == (SET.by_name[name].aggregation == "category")

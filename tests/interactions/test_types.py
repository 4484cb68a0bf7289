"""The interaction type registry: built-in types, validation field paths, and
the rules for changing a custom type compatibly."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.interactions import types
from converge.interactions.types import (
    BUILT_IN_TYPES,
    AttributeSpec,
    AttrValue,
    InteractionTypeSpec,
    check_compatible_change,
    validate_custom_type_name,
    validate_interaction,
    validate_type_spec,
)

DOCUMENTED_TYPES = {
    "ticket.opened",
    "ticket.updated",
    "ticket.priority_changed",
    "ticket.reassigned",
    "ticket.escalated",
    "ticket.reopened",
    "ticket.resolved",
    "ticket.sla_breached",
    "conversation.chat",
    "conversation.call",
    "conversation.email",
    "survey.nps",
    "survey.csat",
    "survey.ces",
    "product.login",
    "product.usage",
    "purchase",
    "subscription.started",
    "subscription.upgraded",
    "subscription.downgraded",
    "subscription.renewed",
    "subscription.cancelled",
    "payment.failed",
    "complaint",
    "marketing.sent",
    "marketing.opened",
    "marketing.clicked",
    "marketing.unsubscribed",
    "action.outcome",
}


def paths(violations: list[tuple[str, str]]) -> list[str]:
    return [path for path, _ in violations]


def check(
    type_name: str,
    attributes: Mapping[str, AttrValue] | None = None,
    *,
    ticket_id: str = "",
    product_id: str = "",
    amount: bool = False,
    sentiment: float | None = None,
) -> list[str]:
    return paths(
        validate_interaction(
            BUILT_IN_TYPES[type_name], attributes or {}, ticket_id, product_id, amount, sentiment
        )
    )


def test_built_in_types_are_exactly_the_documented_ones() -> None:
    assert set(BUILT_IN_TYPES) == DOCUMENTED_TYPES
    assert all(spec.built_in and spec.description for spec in BUILT_IN_TYPES.values())
    assert all(a.description for spec in BUILT_IN_TYPES.values() for a in spec.attributes)


def test_survey_score_ranges_match_the_documentation() -> None:
    bounds = {
        name: (spec.attributes[0].min_value, spec.attributes[0].max_value)
        for name, spec in BUILT_IN_TYPES.items()
        if name.startswith("survey.")
    }
    assert bounds == {"survey.nps": (0, 10), "survey.csat": (1, 5), "survey.ces": (1, 7)}


@pytest.mark.parametrize(
    ("type_name", "attributes", "fields"),
    [
        ("ticket.opened", {"priority": "urgent", "category": "billing"}, {"ticket_id": "t1"}),
        ("ticket.priority_changed", {"priority": "high", "previous_priority": "low"},
         {"ticket_id": "t1"}),
        ("ticket.resolved", {}, {"ticket_id": "t1"}),
        ("conversation.call", {"direction": "inbound", "duration_seconds": 30.0},
         {"sentiment": -0.4}),
        ("survey.nps", {"score": 0.0}, {}),
        ("survey.ces", {"score": 7.0}, {}),
        ("product.login", {}, {}),
        ("purchase", {}, {"product_id": "p1", "amount": True}),
        ("subscription.cancelled", {}, {"product_id": "p1"}),
        ("payment.failed", {"reason": "card expired"}, {"amount": True}),
        ("complaint", {"category": "billing"}, {}),
        ("marketing.clicked", {"campaign_id": "spring"}, {}),
        ("action.outcome", {"alert_id": "a1", "action_kind": "call_back", "outcome": "accepted"},
         {}),
    ],
)  # fmt: skip
def test_valid_interactions_have_no_violations(
    type_name: str, attributes: dict[str, str | float], fields: dict[str, object]
) -> None:
    assert check(type_name, attributes, **fields) == []


def test_a_survey_score_out_of_range_names_the_attribute() -> None:
    assert check("survey.nps", {"score": 11.0}) == ["attributes.score"]
    assert check("survey.csat", {"score": 0.0}) == ["attributes.score"]


def test_a_missing_required_attribute_names_the_attribute() -> None:
    assert check("survey.nps") == ["attributes.score"]
    assert check("complaint") == ["attributes.category"]


def test_a_value_of_the_wrong_type_names_the_attribute() -> None:
    assert check("survey.nps", {"score": "9"}) == ["attributes.score"]
    assert check("survey.nps", {"score": True}) == ["attributes.score"]
    assert check("survey.nps", {"score": float("nan")}) == ["attributes.score"]


def test_an_undeclared_attribute_is_rejected() -> None:
    assert check("product.login", {"transcript": "hello"}) == ["attributes.transcript"]


def test_a_value_outside_the_allowed_values_names_the_attribute() -> None:
    violations = validate_interaction(
        BUILT_IN_TYPES["ticket.opened"], {"priority": "critical"}, "t1", "", False, None
    )
    assert violations == [
        ("attributes.priority", "'critical' is not one of low, normal, high, urgent")
    ]


def test_a_naive_timestamp_is_rejected() -> None:
    fields: dict[str, AttrValue] = {"priority": "low", "sla_due_at": datetime(2025, 1, 1)}
    assert check("ticket.opened", fields, ticket_id="t1") == ["attributes.sla_due_at"]
    fields["sla_due_at"] = datetime(2025, 1, 1, tzinfo=UTC)
    assert check("ticket.opened", fields, ticket_id="t1") == []


def test_an_oversized_string_is_rejected() -> None:
    assert check("complaint", {"category": "x" * 4097}) == ["attributes.category"]


def test_missing_required_fields_are_named() -> None:
    assert check("ticket.resolved") == ["ticket_id"]
    assert check("purchase") == ["product_id", "amount"]
    assert check("payment.failed") == ["amount"]


def test_sentiment_outside_minus_one_to_one_is_rejected() -> None:
    assert check("product.login", sentiment=1.5) == ["sentiment"]
    assert check("product.login", sentiment=float("nan")) == ["sentiment"]
    assert check("product.login", sentiment=-1.0) == []


def test_an_action_outcome_needs_a_decision_or_an_alert() -> None:
    attributes = {"action_kind": "offer", "outcome": "declined"}
    assert check("action.outcome", attributes) == ["attributes.decision_id"]
    assert check("action.outcome", {**attributes, "decision_id": "d1"}) == []


def test_every_violation_is_reported() -> None:
    assert check("survey.nps", {"score": 12.0, "comment": "x"}, sentiment=2.0) == [
        "attributes.score",
        "attributes.comment",
        "sentiment",
    ]


BASE = InteractionTypeSpec(
    name="custom.loyalty.redeemed",
    description="Loyalty points redeemed.",
    attributes=(
        AttributeSpec("points", "number", True, "Points redeemed.", min_value=0, max_value=1000),
        AttributeSpec("tier", "string", False, "Tier.", allowed_values=("silver", "gold")),
        AttributeSpec("note", "string", False, "Note."),
    ),
    required_fields=frozenset(),
    built_in=False,
)


def with_attribute(spec: InteractionTypeSpec, name: str, **changes: object) -> InteractionTypeSpec:
    attributes = tuple(
        dataclasses.replace(a, **changes) if a.name == name else a for a in spec.attributes
    )
    return dataclasses.replace(spec, attributes=attributes)


def test_compatible_changes_have_no_reasons() -> None:
    assert check_compatible_change(BASE, BASE) == []
    looser = with_attribute(BASE, "points", min_value=None, max_value=5000.0, required=False)
    looser = with_attribute(looser, "tier", allowed_values=("silver", "gold", "platinum"))
    looser = dataclasses.replace(
        looser,
        description="Changed.",
        attributes=(*looser.attributes, AttributeSpec("channel", "string", False, "New.")),
    )
    assert check_compatible_change(BASE, looser) == []


@pytest.mark.parametrize(
    ("new", "reason"),
    [
        (dataclasses.replace(BASE, attributes=BASE.attributes[:2]), "attribute 'note' was removed"),
        (with_attribute(BASE, "note", type="number"), "changed type from string to number"),
        (with_attribute(BASE, "note", required=True), "attribute 'note' became required"),
        (dataclasses.replace(BASE, attributes=(*BASE.attributes,
                                               AttributeSpec("x", "bool", True, "New."))),
         "new attribute 'x' is required"),
        (with_attribute(BASE, "tier", allowed_values=("gold",)), "no longer allows silver"),
        (with_attribute(BASE, "note", allowed_values=("a",)), "now restricts its values"),
        (with_attribute(BASE, "points", min_value=1.0), "higher minimum"),
        (with_attribute(BASE, "points", max_value=999.0), "lower maximum"),
        (dataclasses.replace(BASE, required_fields=frozenset({"ticket_id"})),
         "field 'ticket_id' became required"),
    ],
)  # fmt: skip
def test_incompatible_changes_are_explained(new: InteractionTypeSpec, reason: str) -> None:
    reasons = check_compatible_change(BASE, new)
    assert len(reasons) == 1
    assert reason in reasons[0]


def test_adding_bounds_to_an_unbounded_number_is_incompatible() -> None:
    old = with_attribute(BASE, "points", min_value=None, max_value=None)
    assert len(check_compatible_change(old, BASE)) == 2


@pytest.mark.parametrize(
    "name", ["custom.loyalty", "custom.loyalty.points_redeemed", "custom.a1.b_2"]
)
def test_good_custom_type_names_pass(name: str) -> None:
    assert validate_custom_type_name(name) == []


@pytest.mark.parametrize(
    "name",
    ["custom", "custom.", "loyalty.points", "custom.Loyalty", "custom.1st", "custom..x",
     "ticket.opened", "custom." + "x" * 58],
)  # fmt: skip
def test_bad_custom_type_names_fail(name: str) -> None:
    assert validate_custom_type_name(name) != []


def test_type_spec_problems_name_the_attribute() -> None:
    spec = dataclasses.replace(
        BASE,
        attributes=(
            AttributeSpec("Bad", "string", False, ""),
            AttributeSpec("n", "number", False, "", allowed_values=("1",)),
            AttributeSpec("n", "string", False, "", min_value=1.0),
        ),
    )
    assert paths(validate_type_spec(spec)) == [
        "attributes[0].name",
        "attributes[1].allowed_values",
        "attributes[2].name",
        "attributes[2].min_value",
    ]
    assert validate_type_spec(BASE) == []


# The quick check ingest runs first must agree with the full check: a row it
# passes has no violations, and a row of plainly typed values it refuses has one.
_SOME_TYPES = sorted(BUILT_IN_TYPES)
attribute_values = st.one_of(
    st.sampled_from(["P1", "P2", "network", "", "x" * 20, "é" * 1100, "a" * 4097]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.integers(-5, 20),
    st.sampled_from([datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 1, 1)]),
)


Row = tuple[InteractionTypeSpec, dict[str, Any], tuple[str, str, bool, float | None]]


@st.composite
def rows(draw: st.DrawFn) -> Row:
    spec = BUILT_IN_TYPES[draw(st.sampled_from(_SOME_TYPES))]
    declared = [a.name for a in spec.attributes]
    names = draw(st.lists(st.sampled_from([*declared, "undeclared"]), max_size=6, unique=True))
    attributes = {name: draw(attribute_values) for name in names}
    for attr in spec.attributes:  # mostly the values a valid row would hold
        if attr.allowed_values and attr.name in attributes and draw(st.booleans()):
            attributes[attr.name] = draw(st.sampled_from(attr.allowed_values))
    fields = (
        draw(st.sampled_from(["", "T-1"])),
        draw(st.sampled_from(["", "P-1"])),
        draw(st.booleans()),
        draw(st.sampled_from([None, 0.5, -1.0, 1.5, math.nan])),
    )
    return spec, attributes, fields


@given(rows())
@settings(max_examples=400, deadline=None)
def test_the_quick_check_agrees_with_the_full_check(row: Row) -> None:
    spec, attributes, (ticket_id, product_id, amount_present, sentiment) = row
    rules = types._rules(spec)
    args = (attributes, ticket_id, product_id, amount_present, sentiment)
    full = types._violations(rules, *args)
    quick = types._plainly_valid(rules, *args)
    if quick:
        assert full == []
    elif not any(type(v) is int for v in attributes.values()):
        assert full != [], "the quick check refused a valid row"
    assert validate_interaction(spec, *args) == full

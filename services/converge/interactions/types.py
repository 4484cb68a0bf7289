"""The interaction type registry: the built-in types, their typed attributes,
validation of one interaction against its type, and the rules for changing a
custom type compatibly. Plain Python, no gRPC or SQL.

Field paths in violations are relative to the interaction ("attributes.score",
"ticket_id", "amount", "sentiment"); the caller prefixes them ("interaction.").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from converge.features.engine import PRIORITIES, AttrValue

AttributeType = Literal["string", "number", "bool", "timestamp"]
RequiredField = Literal["ticket_id", "product_id", "amount", "sentiment"]

MAX_ATTRIBUTES = 64
MAX_STRING_BYTES = 4096
MAX_TYPE_NAME_LENGTH = 64
ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
CUSTOM_TYPE_NAME = re.compile(r"^custom(\.[a-z][a-z0-9_]*)+$")
ACTION_OUTCOMES: tuple[str, ...] = (
    "presented",
    "accepted",
    "declined",
    "ignored",
    "converted",
    "not_delivered",
)


@dataclass(frozen=True)
class AttributeSpec:
    """One typed attribute of an interaction type (`InteractionAttributeSpec`)."""

    name: str
    type: AttributeType
    required: bool
    description: str
    allowed_values: tuple[str, ...] = ()
    min_value: float | None = None
    max_value: float | None = None
    unit: str = ""


@dataclass(frozen=True)
class InteractionTypeSpec:
    """One interaction type (`InteractionType` without its read-only fields)."""

    name: str
    description: str
    attributes: tuple[AttributeSpec, ...]
    required_fields: frozenset[RequiredField]
    built_in: bool


def _attr(
    name: str,
    type_: AttributeType,
    description: str,
    *,
    required: bool = True,
    allowed: tuple[str, ...] = (),
    min_value: float | None = None,
    max_value: float | None = None,
    unit: str = "",
) -> AttributeSpec:
    return AttributeSpec(name, type_, required, description, allowed, min_value, max_value, unit)


def _type(
    name: str,
    description: str,
    *attributes: AttributeSpec,
    required_fields: tuple[RequiredField, ...] = (),
) -> InteractionTypeSpec:
    return InteractionTypeSpec(name, description, attributes, frozenset(required_fields), True)


_TICKET: tuple[RequiredField, ...] = ("ticket_id",)
_PRODUCT: tuple[RequiredField, ...] = ("product_id",)
# The fields service desks keep on every incident, declared (optional text)
# on every ticket type, so that an export's updates can carry the values the
# ticket has at that moment and feature sets can read them ("the ticket's
# own attributes at the cutoff"). Other attributes still need a custom type.
SERVICE_DESK_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("category", "What the ticket is about."),
    ("subcategory", "The subcategory, within the category."),
    ("symptom", "The symptom reported."),
    ("location", "Where the problem is."),
    ("assignment_group", "The group the ticket is assigned to now."),
    ("contact_type", "How the ticket came in, as the service desk names it."),
    ("impact", "The impact, as the service desk rates it."),
    ("urgency", "The urgency, as the service desk rates it."),
    ("configuration_item", "The configuration item (system, device) concerned."),
)


def _ticket_type(name: str, description: str, *attributes: AttributeSpec) -> InteractionTypeSpec:
    declared = {a.name for a in attributes}
    common = tuple(
        _attr(field, "string", text, required=False)
        for field, text in SERVICE_DESK_ATTRIBUTES
        if field not in declared
    )
    return _type(name, description, *attributes, *common, required_fields=_TICKET)


def _conversation(medium: str) -> InteractionTypeSpec:
    return _type(
        f"conversation.{medium}",
        f"A {medium} conversation with the customer; sentiment when known.",
        _attr("direction", "string", "Who started it.", allowed=("inbound", "outbound")),
        _attr(
            "duration_seconds",
            "number",
            "How long it lasted.",
            required=False,
            min_value=0,
            unit="seconds",
        ),
    )


def _survey(name: str, label: str, low: float, high: float) -> InteractionTypeSpec:
    return _type(
        f"survey.{name}",
        f"A {label} survey answer.",
        _attr(
            "score", "number", f"The {label} score.", min_value=low, max_value=high, unit="points"
        ),
    )


def _subscription(change: str) -> InteractionTypeSpec:
    return _type(
        f"subscription.{change}",
        f"A subscription was {change}; `amount` is the new recurring amount when known.",
        required_fields=_PRODUCT,
    )


def _marketing(event: str) -> InteractionTypeSpec:
    return _type(
        f"marketing.{event}",
        f"A marketing message was {event}.",
        _attr("campaign_id", "string", "The campaign."),
    )


_BUILT_IN_LIST: tuple[InteractionTypeSpec, ...] = (
    _ticket_type(
        "ticket.opened",
        "A support ticket was opened.",
        _attr("priority", "string", "Initial priority.", allowed=PRIORITIES),
        _attr("category", "string", "What the ticket is about.", required=False),
        _attr("sla_due_at", "timestamp", "When the SLA runs out.", required=False),
    ),
    _ticket_type(
        "ticket.updated",
        "A support ticket was updated.",
        _attr("by", "string", "Who updated it.", required=False, allowed=("customer", "agent")),
    ),
    _ticket_type(
        "ticket.priority_changed",
        "A support ticket's priority changed.",
        _attr("priority", "string", "The new priority.", allowed=PRIORITIES),
        _attr("previous_priority", "string", "The priority before.", allowed=PRIORITIES),
    ),
    _ticket_type(
        "ticket.reassigned",
        "A support ticket moved to another team.",
        _attr("team", "string", "The team now assigned."),
        _attr("previous_team", "string", "The team before.", required=False),
    ),
    _ticket_type(
        "ticket.escalated",
        "A support ticket was escalated.",
        _attr("level", "number", "The escalation level reached.", required=False),
    ),
    _ticket_type("ticket.reopened", "A resolved support ticket was reopened."),
    _ticket_type("ticket.resolved", "A support ticket was resolved."),
    _ticket_type(
        "ticket.sla_breached",
        "A support ticket breached its SLA.",
        _attr("sla", "string", "Which SLA.", allowed=("first_response", "resolution")),
    ),
    _conversation("chat"),
    _conversation("call"),
    _conversation("email"),
    _survey("nps", "net promoter", 0, 10),
    _survey("csat", "customer satisfaction", 1, 5),
    _survey("ces", "customer effort", 1, 7),
    _type("product.login", "The customer logged in to the product."),
    _type(
        "product.usage",
        "The customer used a product feature.",
        _attr("feature", "string", "The feature used."),
        _attr("quantity", "number", "How much it was used.", required=False, min_value=0),
    ),
    _type(
        "purchase",
        "The customer bought a product.",
        _attr("quantity", "number", "Units bought.", required=False, min_value=0, unit="units"),
        required_fields=("product_id", "amount"),
    ),
    _subscription("started"),
    _subscription("upgraded"),
    _subscription("downgraded"),
    _subscription("renewed"),
    _subscription("cancelled"),
    _type(
        "payment.failed",
        "A payment failed; `amount` is the amount that failed.",
        _attr("reason", "string", "Why it failed.", required=False),
        required_fields=("amount",),
    ),
    _type(
        "complaint",
        "The customer complained; ticket and sentiment when known.",
        _attr("category", "string", "What the complaint is about."),
    ),
    _marketing("sent"),
    _marketing("opened"),
    _marketing("clicked"),
    _marketing("unsubscribed"),
    _type(
        "action.outcome",
        "The outcome of a recommended action or alert, written by the recommendation service.",
        _attr("decision_id", "string", "The decision (decision_id or alert_id).", required=False),
        _attr("alert_id", "string", "The alert (decision_id or alert_id).", required=False),
        _attr("action_id", "string", "The action.", required=False),
        _attr("action_kind", "string", "The kind of action."),
        _attr("outcome", "string", "What happened.", allowed=ACTION_OUTCOMES),
    ),
)

BUILT_IN_TYPES: dict[str, InteractionTypeSpec] = {spec.name: spec for spec in _BUILT_IN_LIST}

# Attribute groups of which at least one must be present, by type.
_ONE_OF: dict[str, tuple[str, ...]] = {"action.outcome": ("decision_id", "alert_id")}


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, datetime):
        return "timestamp"
    return type(value).__name__


def _check_value(spec: AttributeSpec, value: object) -> str | None:
    """Why `value` does not fit `spec`, or None."""
    actual = _type_name(value)
    if actual != spec.type:
        return f"must be a {spec.type}, not a {actual}"
    if isinstance(value, str):
        if len(value.encode()) > MAX_STRING_BYTES:
            return f"longer than {MAX_STRING_BYTES} bytes"
        if spec.allowed_values and value not in spec.allowed_values:
            return f"{value[:64]!r} is not one of {', '.join(spec.allowed_values)}"
    elif isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            return "must carry a time zone"
    elif isinstance(value, int | float):
        if not math.isfinite(value):
            return "must be a finite number"
        if spec.min_value is not None and value < spec.min_value:
            return f"{value:g} is below the minimum {spec.min_value:g}"
        if spec.max_value is not None and value > spec.max_value:
            return f"{value:g} is above the maximum {spec.max_value:g}"
    return None


@dataclass(frozen=True)
class _Rules:
    """A spec's checks in the shape a row is checked against."""

    spec: InteractionTypeSpec  # (held, so its id cannot be reused meanwhile)
    declared: dict[str, AttributeSpec]
    required: frozenset[str]  # attribute names
    allowed: dict[str, frozenset[str]]  # by attribute name, where restricted
    one_of: tuple[str, ...]


# Each spec's rules, built once per spec: ingest checks every row.
_RULES: dict[int, _Rules] = {}
_PYTHON_TYPES: dict[AttributeType, type] = {
    "string": str,
    "number": float,
    "bool": bool,
    "timestamp": datetime,
}


def _rules(spec: InteractionTypeSpec) -> _Rules:
    found = _RULES.get(id(spec))
    if found is None or found.spec is not spec:
        if len(_RULES) > 10_000:  # custom types reloaded many times over
            _RULES.clear()
        found = _RULES[id(spec)] = _Rules(
            spec,
            {a.name: a for a in spec.attributes},
            frozenset(a.name for a in spec.attributes if a.required),
            {a.name: frozenset(a.allowed_values) for a in spec.attributes if a.allowed_values},
            _ONE_OF.get(spec.name, ()),
        )
    return found


def _plainly_valid(
    rules: _Rules,
    attributes: Mapping[str, AttrValue],
    ticket_id: str,
    product_id: str,
    amount_present: bool,
    sentiment: float | None,
) -> bool:
    """Whether the row passes every check, in one pass over what it holds.
    False also for anything unusual (an int for a number, say): the full
    check then decides, and names the first problem."""
    if len(attributes) > MAX_ATTRIBUTES or not rules.required.issubset(attributes):
        return False
    declared = rules.declared
    for name, value in attributes.items():
        attr = declared.get(name)
        if attr is None or type(value) is not _PYTHON_TYPES[attr.type]:
            return False
        if type(value) is str:
            if len(value) * 4 > MAX_STRING_BYTES and len(value.encode()) > MAX_STRING_BYTES:
                return False
            allowed = rules.allowed.get(name)
            if allowed is not None and value not in allowed:
                return False
        elif type(value) is float:
            if not math.isfinite(value):
                return False
            if attr.min_value is not None and value < attr.min_value:
                return False
            if attr.max_value is not None and value > attr.max_value:
                return False
        elif type(value) is datetime and value.utcoffset() is None:
            return False
    if rules.one_of and not any(name in attributes for name in rules.one_of):
        return False
    required = rules.spec.required_fields
    if required and (
        ("ticket_id" in required and not ticket_id)
        or ("product_id" in required and not product_id)
        or ("amount" in required and not amount_present)
        or ("sentiment" in required and sentiment is None)
    ):
        return False
    return sentiment is None or (math.isfinite(sentiment) and -1.0 <= sentiment <= 1.0)


def validate_interaction(
    spec: InteractionTypeSpec,
    attributes: Mapping[str, AttrValue],
    ticket_id: str,
    product_id: str,
    amount_present: bool,
    sentiment: float | None,
) -> list[tuple[str, str]]:
    """The (field path, description) violations of one interaction of type
    `spec`; empty when it is valid."""
    rules = _rules(spec)
    if _plainly_valid(rules, attributes, ticket_id, product_id, amount_present, sentiment):
        return []
    return _violations(rules, attributes, ticket_id, product_id, amount_present, sentiment)


def _violations(
    rules: _Rules,
    attributes: Mapping[str, AttrValue],
    ticket_id: str,
    product_id: str,
    amount_present: bool,
    sentiment: float | None,
) -> list[tuple[str, str]]:
    """Every violation, in a stable order (attributes as declared, then
    undeclared ones by name, then the fields)."""
    spec = rules.spec
    violations: list[tuple[str, str]] = []
    if len(attributes) > MAX_ATTRIBUTES:
        violations.append(("attributes", f"at most {MAX_ATTRIBUTES} attributes"))
    for attr in spec.attributes:
        if attr.name not in attributes:
            if attr.required:
                violations.append((f"attributes.{attr.name}", f"required by {spec.name}"))
            continue
        problem = _check_value(attr, attributes[attr.name])
        if problem is not None:
            violations.append((f"attributes.{attr.name}", problem))
    undeclared = [key for key in attributes if key not in rules.declared]
    for key in sorted(undeclared):
        violations.append((f"attributes.{key[:80]}", f"not an attribute of {spec.name}"))
    group = rules.one_of
    if group and not any(name in attributes for name in group):
        violations.append((f"attributes.{group[0]}", f"one of {', '.join(group)} is required"))
    if spec.required_fields:
        fields: tuple[tuple[RequiredField, bool], ...] = (
            ("ticket_id", bool(ticket_id)),
            ("product_id", bool(product_id)),
            ("amount", amount_present),
            ("sentiment", sentiment is not None),
        )
        for name, present in fields:
            if name in spec.required_fields and not present:
                violations.append((name, f"required by {spec.name}"))
    if sentiment is not None and not (math.isfinite(sentiment) and -1.0 <= sentiment <= 1.0):
        violations.append(("sentiment", "must be between -1 and 1"))
    return violations


def validate_custom_type_name(name: str) -> list[str]:
    """Why `name` cannot name a custom type; empty when it can."""
    problems: list[str] = []
    if len(name) > MAX_TYPE_NAME_LENGTH:
        problems.append(f"at most {MAX_TYPE_NAME_LENGTH} characters")
    if not CUSTOM_TYPE_NAME.match(name):
        problems.append(
            'must be "custom." followed by lower-case dot-separated words '
            '(for example "custom.loyalty.points_redeemed")'
        )
    return problems


def validate_type_spec(spec: InteractionTypeSpec) -> list[tuple[str, str]]:
    """The (field path, description) problems of a custom type definition, with
    paths relative to `InteractionType`; empty when it can be registered."""
    problems = [("name", p) for p in validate_custom_type_name(spec.name)]
    if len(spec.attributes) > MAX_ATTRIBUTES:
        problems.append(("attributes", f"at most {MAX_ATTRIBUTES} attributes"))
    seen: set[str] = set()
    for i, attr in enumerate(spec.attributes):
        path = f"attributes[{i}]"
        if not ATTRIBUTE_NAME.match(attr.name):
            problems.append((f"{path}.name", "must match [a-z][a-z0-9_]{0,62}"))
        if attr.name in seen:
            problems.append((f"{path}.name", f"{attr.name!r} is declared twice"))
        seen.add(attr.name)
        if attr.type not in ("string", "number", "bool", "timestamp"):
            problems.append((f"{path}.type", "must be string, number, bool or timestamp"))
        if attr.allowed_values and attr.type != "string":
            problems.append((f"{path}.allowed_values", "only strings have allowed values"))
        bounded = attr.min_value is not None or attr.max_value is not None
        if bounded and attr.type != "number":
            problems.append((f"{path}.min_value", "only numbers have bounds"))
        for bound_name, bound in (("min_value", attr.min_value), ("max_value", attr.max_value)):
            if bound is not None and not math.isfinite(bound):
                problems.append((f"{path}.{bound_name}", "must be a finite number"))
        if (
            attr.min_value is not None
            and attr.max_value is not None
            and attr.min_value > attr.max_value
        ):
            problems.append((f"{path}.max_value", "below min_value"))
    return problems


def check_compatible_change(old: InteractionTypeSpec, new: InteractionTypeSpec) -> list[str]:
    """Why replacing `old` by `new` would reject interactions that `old`
    accepted (or change what stored attributes mean); empty when compatible.
    Compatible: new optional attributes, looser rules, new descriptions."""
    reasons: list[str] = []
    if old.name != new.name:
        reasons.append(f"the name changed from {old.name!r} to {new.name!r}")
    after = {a.name: a for a in new.attributes}
    before = {a.name for a in old.attributes}
    for was in old.attributes:
        now = after.get(was.name)
        if now is None:
            reasons.append(f"attribute {was.name!r} was removed")
            continue
        if now.type != was.type:
            reasons.append(f"attribute {was.name!r} changed type from {was.type} to {now.type}")
        if now.required and not was.required:
            reasons.append(f"attribute {was.name!r} became required")
        if now.allowed_values:
            lost = sorted(set(was.allowed_values) - set(now.allowed_values))
            if not was.allowed_values:
                reasons.append(f"attribute {was.name!r} now restricts its values")
            elif lost:
                reasons.append(f"attribute {was.name!r} no longer allows {', '.join(lost)}")
        if now.min_value is not None and (was.min_value is None or now.min_value > was.min_value):
            reasons.append(f"attribute {was.name!r} has a higher minimum")
        if now.max_value is not None and (was.max_value is None or now.max_value < was.max_value):
            reasons.append(f"attribute {was.name!r} has a lower maximum")
    for attr in new.attributes:
        if attr.name not in before and attr.required:
            reasons.append(f"new attribute {attr.name!r} is required")
    for field in sorted(new.required_fields - old.required_fields):
        reasons.append(f"field {field!r} became required")
    return reasons

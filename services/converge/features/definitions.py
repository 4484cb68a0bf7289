"""What a feature is: the definitions (`FeatureDefinition`), the interaction
types and names they refer to, the engine's view of an interaction (`Event`),
and the built-in set every deployment starts from (`builtin_definitions`).

A definition says which interactions count (types, channel and attribute
`filters`: every filter must hold, a filter's values are alternatives,
compared as text without regard to case) and how they are aggregated:
`count`, `sum`, `mean` and `trend` over a window of UTC days; `last`,
`time_since` and `category` over all history (customer) or the ticket's own
interactions (ticket). A CATEGORY feature is the raw text of the latest
value of its attribute; the categories themselves are learned from the data
at training time. The engine (`converge.features.engine`) turns a tuple of
definitions into a `FeatureSet`; `converge.features.config` reads one from
YAML.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any, Literal

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
    # (attribute, allowed values): an interaction counts only when every
    # filter's attribute holds one of its values (see `attribute_text`).
    filters: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # For CATEGORY features: a hint to training, values seen fewer times are grouped.
    min_category_count: int = 0


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


def builtin_definitions() -> tuple[FeatureDefinition, ...]:
    """The built-in feature set, what a deployment serves unless configured otherwise."""
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
                      window_days=90, interaction_types=("action.outcome",),
                      filters=(("outcome", (outcome,)),), used_by=_ALL)
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
        # An ordinal number (0 low .. 3 urgent, 4 any other text), not a
        # category: the order carries meaning a model should not relearn.
        _ticket("ticket_priority", "The ticket's current priority as a rank: 0 low, 1 normal, "
                "2 high, 3 urgent, 4 any other value.", "last",
                interaction_types=("ticket.opened", "ticket.priority_changed"),
                attribute="priority", unit="rank", categories=PRIORITIES, may_be_missing=True),
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
        _ticket("ticket_channel", "The channel the ticket was opened on (its name).", "category",
                interaction_types=("ticket.opened",), attribute="channel", unit="",
                may_be_missing=True),
        _ticket("ticket_category", "The category the ticket was opened with, as sent.",
                "category", interaction_types=("ticket.opened",), attribute="category", unit="",
                may_be_missing=True),
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


# Pseudo-attributes: fields of an interaction that filters and CATEGORY
# features may name like attributes.
FIELD_ATTRIBUTES = ("channel", "product_id", "ticket_id")


_FIELDS = frozenset(FIELD_ATTRIBUTES)


def attribute_text(event: Event, attribute: str) -> str | None:
    """An attribute's (or field's) value as text, as filters compare it and
    CATEGORY features report it: text stripped, numbers without a needless
    ".0", flags as true/false, times in ISO 8601; None when absent or empty.
    (On the fold's path for every categorical feature: text first.)"""
    if attribute in _FIELDS:
        if attribute == "channel":
            number = event.channel
            return CHANNEL_NAMES[number] if 0 < number < len(CHANNEL_NAMES) else None
        return (event.product_id if attribute == "product_id" else event.ticket_id) or None
    value = event.attributes.get(attribute)
    if type(value) is str:
        return value.strip() or None
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float | int):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)

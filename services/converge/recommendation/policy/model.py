"""The policy's shape: what a policy YAML document may say, as pydantic models.

A policy is data, versioned and activated at run time (see policy/service.py):
the actions the service may propose, the catalogue of offers and products with
their value and cost, eligibility rules, arbitration weights, the contact rules,
the teams alerts go to, alert thresholds and routing. Durations are ISO 8601
("P7D", "PT30M"). Every model refuses unknown keys, so a misspelt key is an
error naming its path, not a silently ignored line.

Reading guide for the other areas:
- decisions/ ranks `actions` for a customer (expected value = propensity of the
  action's `prediction` x value x `weight` - cost), applies `arbitration`;
- contact/ applies `contact` (consent, caps, cool-downs, quiet hours) and the
  "wants a human" rule (`ActionSpec.automated`);
- outcomes/ reads `ActionSpec.control_share` and `Policy.control_salt`;
- alerts/ reads `alerts`, `teams` and `routing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import time, timedelta
from decimal import Decimal
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

# Names people write in the YAML: the policy's own identifiers.
Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_.-]{0,62}$")]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Share = Annotated[float, Field(ge=0.0, le=0.5)]
Amount = Annotated[Decimal, Field(ge=0, le=Decimal("1e12"), max_digits=18, decimal_places=4)]

PredictionName = Literal["churn", "escalation", "cross_sell"]
ActionKindName = Literal[
    "retention_offer",
    "proactive_support_call",
    "escalate_to_human",
    "escalate_to_senior_agent",
    "cross_sell_offer",
    "do_nothing",
]
# The contact channels of common.proto's ContactChannel, lower case.
ContactChannelName = Literal["email", "sms", "phone", "push", "in_app"]
# The request channels of common.proto's Channel, lower case.
RequestChannelName = Literal[
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
]
AlertKindName = Literal["churn_risk", "escalation_risk", "cross_sell_moment"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Condition(Strict):
    """One test an eligibility rule makes; every condition of a rule must hold.

    Exactly one of `feature` (a live feature of the customer or ticket, after
    context features), `context` (a key of the request's context) or `profile`
    ("segment", "plan", "region", "owner_team" or "attributes.<name>") names
    what is tested. A missing value fails every test except `missing: true`.
    """

    feature: str | None = None
    context: str | None = None
    profile: str | None = None
    lt: float | None = None
    le: float | None = None
    gt: float | None = None
    ge: float | None = None
    equals: str | float | bool | None = None
    one_of: list[str] | None = None
    not_one_of: list[str] | None = None
    missing: bool | None = None


class Offer(Strict):
    """An offer of the catalogue (a discount, a credit, an upgrade)."""

    id: Name
    description: str = ""
    # What the company gains when the offer works (retained revenue, margin).
    value: Amount
    # What making the offer costs (the discount given, the agent's time).
    cost: Amount = Decimal(0)
    # How long an offer made stays valid; unset: no expiry.
    valid_for: timedelta | None = None


class Product(Strict):
    """A product of the catalogue, offered by cross-sell actions; `id` is the
    product id the cross-sell model scores."""

    id: Name
    description: str = ""
    value: Amount
    cost: Amount = Decimal(0)


class Catalogue(Strict):
    offers: list[Offer] = Field(default_factory=list)
    products: list[Product] = Field(default_factory=list)


class ActionSpec(Strict):
    """An action the service may propose."""

    name: Name
    kind: ActionKindName
    # The prediction whose probability is the action's propensity (unset for
    # do_nothing and for hand-overs driven by rules only).
    prediction: PredictionName | None = None
    # The offer made (retention offers); its value and cost apply.
    offer: Name | None = None
    # Cross-sell: the products it may offer (empty: every product of the
    # catalogue); one candidate per product, each scored.
    products: list[Name] = Field(default_factory=list)
    # Value and cost when no offer or product gives them (a support call's
    # value is the escalation it avoids; its cost the agent's time).
    value: Amount | None = None
    cost: Amount | None = None
    # Proposed only when the propensity is at least this.
    min_probability: Probability = 0.0
    # The business weight (Pega's "context weight" and levers): multiplies
    # propensity x value before the cost is taken away.
    weight: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    # Channels it reaches the customer on, in preference order; empty means it
    # happens in the current conversation (no outbound contact).
    contact_channels: list[ContactChannelName] = Field(default_factory=list)
    # Request channels it may be proposed on; empty means any.
    request_channels: list[RequestChannelName] = Field(default_factory=list)
    # Carried out by a bot or an automated flow (never offered to a customer
    # who wants a human).
    automated: bool = False
    # Sales or support: the arbitration across teams blocks sales actions
    # while a serious escalation or a complaint is open.
    team_kind: Literal["sales", "support", "retention", "none"] = "none"
    # Every condition must hold.
    eligibility: list[Condition] = Field(default_factory=list)
    # Not proposed again to the same customer within this long after it was
    # proposed (on any channel); after a rejection, `contact.cool_down_after_rejection`.
    cool_down: timedelta | None = None
    # Share of eligible customers held out at random to measure lift
    # (assignment deterministic per customer and action).
    control_share: Share = 0.0
    # Priority when proposed: by expected value above these amounts.
    urgent_above: Amount | None = None
    high_above: Amount | None = None
    # What the agent sees; no personal data.
    display_text: str = ""


class FrequencyCap(Strict):
    """At most `max_contacts` proposed contacts on `channel` ("any" counts
    every channel) in any rolling `window` ending now."""

    channel: ContactChannelName | Literal["any"]
    max_contacts: Annotated[int, Field(ge=0, le=10_000)]
    window: timedelta


def _calling_channels() -> list[ContactChannelName]:
    return ["sms", "phone", "push"]


class QuietHours(Strict):
    """No outbound contact between `start` and `end` in the customer's local
    time (profile attribute `time_zone`, an IANA name, else
    `contact.default_time_zone`); may wrap midnight."""

    start: time
    end: time
    channels: list[ContactChannelName] = Field(default_factory=_calling_channels)


class ContactRules(Strict):
    frequency_caps: list[FrequencyCap] = Field(default_factory=list)
    # After a customer declines an action, not proposed again for this long.
    cool_down_after_rejection: timedelta = timedelta(days=30)
    quiet_hours: QuietHours | None = None
    default_time_zone: str = "UTC"
    # No offer (retention or cross-sell) while a ticket of the customer is open.
    suppress_offers_while_ticket_open: bool = True
    # The live feature that counts the customer's open tickets.
    open_tickets_feature: str = "open_tickets"


class Arbitration(Strict):
    """One arbitration across sales and support."""

    # Most actions returned unless the request asks for fewer.
    max_actions: Annotated[int, Field(ge=1, le=20)] = 3
    # An open escalation at least this likely is "serious": no sales action.
    serious_escalation_probability: Probability = 0.6
    # A live feature counting the customer's recent complaints (a complaint
    # is "open" for the feature's window); above 0, no sales action.
    complaints_feature: str | None = "count_30d_complaint"
    # Churn at least this likely: retention actions rank before sales ones
    # and sales actions are withheld.
    retention_first_churn_probability: Probability = 0.5
    # Actions whose expected value is below this are not proposed (do_nothing
    # is then the answer).
    min_expected_value: Decimal = Decimal(0)


class Team(Strict):
    """A team that receives alerts."""

    name: Name
    # Alerts a day it can take (the day in `time_zone`); the rest wait ranked
    # by expected value or expire. Unset: no limit.
    daily_capacity: Annotated[int, Field(ge=0, le=1_000_000)] | None = None
    time_zone: str = "UTC"
    # Acknowledge within this long or the alert escalates to `lead_team`.
    ack_deadline: timedelta | None = None
    lead_team: Name | None = None


class AlertRule(Strict):
    """When a prediction raises an alert."""

    kind: AlertKindName
    prediction: PredictionName
    # Raised when the probability reaches this.
    threshold: Probability
    # Auto-resolved when it falls below this (unset: never auto-resolved).
    auto_resolve_below: Probability | None = None
    # The team when no routing rule matches.
    default_team: Name
    # The action suggested to the team (a name of `actions`).
    action: Name | None = None
    # Waiting alerts (over capacity) expire after this long.
    expire_after: timedelta | None = None
    # Duplicates within this window fold into the open alert.
    dedup_window: timedelta = timedelta(days=7)


class Route(Strict):
    """Sends alerts to `team` when every given field matches."""

    team: Name
    kinds: list[AlertKindName] = Field(default_factory=list)
    segments: list[str] = Field(default_factory=list)
    regions: list[str] = Field(default_factory=list)
    # The account owner's team (identity's `owner_team`); "*" means "the
    # customer's own owner team".
    owner_teams: list[str] = Field(default_factory=list)


class Policy(Strict):
    """A whole policy document."""

    # The document's format; the service refuses formats it does not know.
    schema_version: Literal[1] = 1
    description: str = ""
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "EUR"
    # Salt of the control-group assignment: changing it reshuffles the groups.
    control_salt: str = "converge"
    catalogue: Catalogue = Field(default_factory=Catalogue)
    actions: list[ActionSpec]
    arbitration: Arbitration = Field(default_factory=Arbitration)
    contact: ContactRules = Field(default_factory=ContactRules)
    teams: list[Team] = Field(default_factory=list)
    alerts: list[AlertRule] = Field(default_factory=list)
    routing: list[Route] = Field(default_factory=list)


@dataclass(frozen=True)
class ActivePolicy:
    """The policy a decision applies, with the version it names in the log."""

    version: str
    policy: Policy


class PolicySource(Protocol):
    """Where the areas read the active policy (policy/service.py's book, which
    follows activations on every replica; tests may pass a fixed one)."""

    def active(self) -> ActivePolicy: ...

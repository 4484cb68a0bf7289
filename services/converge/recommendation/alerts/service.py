"""The rules of alerts, with plain types (no gRPC, no SQL): which predictions
raise which alert for which team (the policy's `alerts`, `routing`, `teams`
and `arbitration`), what a duplicate, an auto-resolve, an escalation and the
team's daily capacity do, and the lifecycle people drive (acknowledge,
assign, resolve, dismiss).

The store applies what these functions decide inside one transaction; the
follower (follower.py) feeds them the scores of the customers a batch of
interactions touched."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Literal
from zoneinfo import ZoneInfo

from converge.recommendation.decisions import arbitration
from converge.recommendation.policy.model import ActionSpec, AlertRule, Policy, Route, Team
from converge.runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound

if TYPE_CHECKING:
    from converge.recommendation.alerts.feed import AlertFeed
    from converge.recommendation.alerts.store import AlertEventRow, AlertRow, AlertStore, ListFilter

PredictionName = Literal["churn", "escalation", "cross_sell"]
KINDS = ("churn_risk", "escalation_risk", "cross_sell_moment")

# Where an alert is in its life (AlertStatus in lower case), plus two states
# of the service's own: "waiting" (over the team's daily capacity, not
# announced yet) and "expired" (waited past the rule's expire_after).
LIVE = ("waiting", "open", "acknowledged", "assigned", "escalated")
FINAL = ("resolved", "dismissed", "expired")

# AlertEventType numbers (recommendation.proto), kept here so the rules and
# the store need no generated code.
CREATED, UPDATED, STATUS_CHANGED = 1, 2, 3
# ActionPriority numbers.
LOW, NORMAL, HIGH, URGENT = 1, 2, 3, 4


@dataclass(frozen=True)
class Reason:
    code: str
    feature: str
    value: float | None
    contribution: float
    text: str


@dataclass(frozen=True)
class Prediction:
    """One score of a customer as the scoring service returned it."""

    prediction: PredictionName
    probability: float
    risk_band: int
    ticket_id: str = ""
    product_id: str = ""
    reasons: tuple[Reason, ...] = ()


@dataclass(frozen=True)
class CustomerFacts:
    """What routing reads of a customer's profile."""

    customer_id: uuid.UUID
    segment: str = ""
    region: str = ""
    owner_team: str = ""


@dataclass(frozen=True)
class Candidate:
    """An alert the predictions call for; the store raises it, or folds it
    into the live alert with the same key."""

    kind: str
    team: str
    customer_id: uuid.UUID
    ticket_id: str
    product_id: str
    dedup_key: str
    probability: float
    risk_band: int
    reasons: tuple[Reason, ...]
    action_name: str
    expected_value: Decimal
    priority: int
    # Acknowledge within this long of announcing (the team's ack deadline).
    ack_deadline: timedelta | None
    expire_after: timedelta | None
    dedup_window: timedelta


@dataclass(frozen=True)
class DecisionDraft:
    """The decision behind the alerts one customer's assessment raises or
    updates: logged (trigger INTERACTION) in the batch's transaction, once the
    alerts it backs are known. `render(alert_ids, decided_at)` is the
    serialized Decision (built by convert.py from scoring's answers)."""

    decision_id: uuid.UUID
    customer_id: uuid.UUID
    render: Callable[[list[str], datetime], bytes]


@dataclass(frozen=True)
class Assessment:
    """What one customer's fresh scores call for."""

    raise_: tuple[Candidate, ...] = ()
    # Keys of live alerts whose risk fell below the rule's auto_resolve_below,
    # with the probability now.
    resolve: tuple[tuple[str, float], ...] = ()
    # Keys of live cross-sell alerts withdrawn because a serious escalation is
    # now open (dismissed as not actionable, so the dedup window holds them back).
    withdraw: tuple[str, ...] = ()


def dedup_key(kind: str, customer_id: uuid.UUID, subject: str) -> str:
    """The stable key of an alert: one live alert per key (the subject is the
    ticket for escalation risk, the product for cross-sell, empty for churn)."""
    return f"{kind}:{customer_id}:{subject}"


def _route(rule: AlertRule, facts: CustomerFacts, routes: Sequence[Route], teams: set[str]) -> str:
    """The team of an alert: the first routing rule whose every given field
    matches; else, for churn, the account owner's team when the policy knows
    it; else the rule's default team."""
    for route in routes:
        if route.kinds and rule.kind not in route.kinds:
            continue
        if route.segments and facts.segment not in route.segments:
            continue
        if route.regions and facts.region not in route.regions:
            continue
        if route.owner_teams and not (
            facts.owner_team in route.owner_teams or ("*" in route.owner_teams and facts.owner_team)
        ):
            continue
        return route.team
    if rule.kind == "churn_risk" and facts.owner_team in teams:
        return facts.owner_team
    return rule.default_team


def expected_value(
    action: ActionSpec | None, probability: float, policy: Policy, product_id: str = ""
) -> Decimal:
    """How much acting on the alert is worth, to spend a team's capacity on
    the best: the decisions' formula (propensity x value x weight - cost) for
    the rule's action; the probability alone when the rule names none."""
    if action is None:
        return Decimal(str(round(probability, 6)))
    return arbitration.expected_value(action, probability, policy, product_id)


_PRIORITIES = {"low": LOW, "normal": NORMAL, "high": HIGH, "urgent": URGENT}


def _priority(action: ActionSpec | None, value: Decimal) -> int:
    # The same thresholds as a recommended action; no action: normal.
    if action is None:
        return NORMAL
    return _PRIORITIES[arbitration.priority(action, value)]


_KIND_OF_PREDICTION = {
    "churn": "churn_risk",
    "escalation": "escalation_risk",
    "cross_sell": "cross_sell_moment",
}


def assess(
    policy: Policy,
    facts: CustomerFacts,
    predictions: Sequence[Prediction],
    *,
    open_escalation_probability: float = 0.0,
) -> Assessment:
    """The alerts one customer's fresh scores raise and those they resolve.

    No cross-sell alert while a serious escalation is open: an escalation
    score (fresh, or of a live escalation alert: `open_escalation_probability`)
    at least `arbitration.serious_escalation_probability` withholds it."""
    teams = {t.name for t in policy.teams}
    actions = {a.name: a for a in policy.actions}
    serious = policy.arbitration.serious_escalation_probability
    escalation = max(
        [open_escalation_probability]
        + [p.probability for p in predictions if p.prediction == "escalation"]
    )
    raised: list[Candidate] = []
    resolved: list[tuple[str, float]] = []
    withdrawn: list[str] = []
    for prediction in predictions:
        for rule in policy.alerts:
            if rule.prediction != prediction.prediction:
                continue
            subject = prediction.ticket_id if rule.kind == "escalation_risk" else ""
            subject = prediction.product_id if rule.kind == "cross_sell_moment" else subject
            key = dedup_key(rule.kind, facts.customer_id, subject)
            if prediction.probability < rule.threshold:
                if (
                    rule.auto_resolve_below is not None
                    and prediction.probability < rule.auto_resolve_below
                ):
                    resolved.append((key, prediction.probability))
                continue
            if rule.kind == "cross_sell_moment" and escalation >= serious:
                withdrawn.append(key)
                continue
            action = actions.get(rule.action) if rule.action else None
            value = expected_value(action, prediction.probability, policy, prediction.product_id)
            team = _route(rule, facts, policy.routing, teams)
            team_spec = next((t for t in policy.teams if t.name == team), None)
            raised.append(
                Candidate(
                    kind=rule.kind,
                    team=team,
                    customer_id=facts.customer_id,
                    ticket_id=prediction.ticket_id if rule.kind == "escalation_risk" else "",
                    product_id=prediction.product_id if rule.kind == "cross_sell_moment" else "",
                    dedup_key=key,
                    probability=prediction.probability,
                    risk_band=prediction.risk_band,
                    reasons=prediction.reasons,
                    action_name=rule.action or "",
                    expected_value=value,
                    priority=_priority(action, value),
                    ack_deadline=team_spec.ack_deadline if team_spec else None,
                    expire_after=rule.expire_after,
                    dedup_window=rule.dedup_window,
                )
            )
    return Assessment(tuple(raised), tuple(resolved), tuple(withdrawn))


def predictions_wanted(policy: Policy) -> set[PredictionName]:
    """The predictions some alert rule reads (nothing else is scored)."""
    return {rule.prediction for rule in policy.alerts}


def cross_sell_products(policy: Policy) -> list[str]:
    """The products a cross-sell moment may be about: those of the actions the
    cross-sell rules suggest, else the whole catalogue."""
    actions = {a.name: a for a in policy.actions}
    products: list[str] = []
    for rule in policy.alerts:
        if rule.prediction != "cross_sell":
            continue
        action = actions.get(rule.action) if rule.action else None
        products += action.products if action and action.products else []
    if not products:
        products = [p.id for p in policy.catalogue.products]
    return list(dict.fromkeys(products))[:100]


def day_start(now: datetime, team: Team | None) -> datetime:
    """The start of the team's day (in its time zone) that `now` falls in:
    its daily capacity counts alerts announced since."""
    zone = ZoneInfo(team.time_zone if team else "UTC")
    local = now.astimezone(zone)
    return datetime.combine(local.date(), time(0), tzinfo=zone)


# --- the lifecycle -----------------------------------------------------------------


@dataclass(frozen=True)
class AlertState:
    """What the lifecycle rules read and change of an alert."""

    alert_id: uuid.UUID
    status: str
    assignee: str = ""
    status_note: str = ""
    dismiss_reason: int = 0
    team: str = ""
    escalated_to_team: str = ""


Operation = Literal["acknowledge", "assign", "resolve", "dismiss"]


def apply_operation(
    state: AlertState,
    operation: Operation,
    *,
    assignee: str = "",
    note: str = "",
    dismiss_reason: int = 0,
) -> AlertState:
    """The alert after a person's change; FAILED_PRECONDITION when its state
    does not allow it (final states take no change; a resolved alert cannot be
    dismissed nor a dismissed one resolved)."""
    subject = str(state.alert_id)
    if state.status in FINAL:
        raise FailedPrecondition(
            f"alert {subject} is {state.status}: it takes no more changes",
            [("ALERT_STATUS", subject, f"the alert is {state.status}")],
        )
    if operation == "acknowledge":
        status = "assigned" if state.status == "assigned" else "acknowledged"
        return replace(state, status=status)
    if operation == "assign":
        return replace(state, status="assigned", assignee=assignee)
    if operation == "resolve":
        return replace(state, status="resolved", status_note=note)
    return replace(state, status="dismissed", status_note=note, dismiss_reason=dismiss_reason)


def key_bound_elsewhere(bound_sha256: bytes | None, request_sha256: bytes) -> bool:
    """Whether an idempotency key already used is bound to another request
    (the fingerprint of `convert.request_fingerprint`). A key kept without a
    fingerprint (before migration 0008) is accepted as before."""
    return bound_sha256 is not None and bound_sha256 != request_sha256


def key_reused() -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("idempotency_key", "already used for a different request")]
    )


def visible_to(team: str | None, alert_team: str, escalated_to_team: str) -> bool:
    """Whether a team sees an alert: its own, and those escalated to it. No
    team named (an operator's call): every alert."""
    return team is None or team in (alert_team, escalated_to_team)


# --- the area's operations (servicer.py calls these) -------------------------------


class Alerts:
    """Reads and people's changes, team-scoped: `team` None is an operator's
    call (every alert); a team sees its own alerts and those escalated to it,
    and any other alert is NOT_FOUND to it."""

    def __init__(self, store: AlertStore, feed: AlertFeed, clock: Callable[[], datetime]) -> None:
        self.store = store
        self.feed = feed
        self.clock = clock

    async def get(self, alert_id: uuid.UUID, team: str | None) -> AlertRow:
        row = await self.store.get(alert_id)
        if (
            row is None
            or row.status == "waiting"
            or not visible_to(team, row.team, row.escalated_to_team)
        ):
            raise NotFound("alert", str(alert_id))
        return row

    async def list_alerts(
        self, where: ListFilter, after: tuple[datetime, uuid.UUID] | None, limit: int
    ) -> list[AlertRow]:
        return await self.store.list_alerts(where, after, limit)

    async def change(
        self,
        alert_id: uuid.UUID,
        operation: Operation,
        *,
        team: str | None,
        idempotency_key: str,
        actor_name: str,
        actor_reason: str,
        request_sha256: bytes = b"",
        assignee: str = "",
        note: str = "",
        dismiss_reason: int = 0,
    ) -> AlertRow:
        def decide(state: AlertState) -> AlertState:
            if state.status == "waiting":
                raise NotFound("alert", str(alert_id))
            return apply_operation(
                state, operation, assignee=assignee, note=note, dismiss_reason=dismiss_reason
            )

        return await self.store.change(
            alert_id,
            operation,
            decide,
            idempotency_key=idempotency_key,
            request_sha256=request_sha256,
            actor_name=actor_name,
            actor_reason=actor_reason,
            visible=lambda row: visible_to(team, row.team, row.escalated_to_team),
            now=self.clock(),
        )

    async def start_position(self, position: tuple[int, int] | None) -> tuple[int, int]:
        """Where a subscription starts: after `position`, or (None) after the
        latest deliverable event now."""
        return await self.store.head() if position is None else position

    def events(
        self, team: str, start: tuple[int, int], kinds: Sequence[str]
    ) -> AsyncIterator[AlertEventRow]:
        """A team's events after `start`, each once, in order, for as long as
        the caller reads."""
        return self.feed.events(team, start, kinds)

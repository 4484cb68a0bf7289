"""RecordOutcome's rules, in plain types: which action of which decision an
outcome concerns (a proposed action, or one held out for its control group),
its checks against the decision, the "action.outcome" interaction written so
the next training learns from it, and the record attached to the decision.

Order of effects: the interaction first (it returns once durable, and its
idempotency key is derived from ours, so a retry after a failure between the
two writes finds the same interaction), then, in one transaction, the
outcome row, the idempotency key and the contact ledger's update.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Protocol

from converge.recommendation.outcomes.report import ActionReport, Exposure, OutcomeRow, build_report
from converge.recommendation.outcomes.store import (
    ARM_CONTROL,
    ARM_TREATMENT,
    DecisionGone,
    NewOutcome,
    OutcomeStore,
    StoredOutcome,
)
from converge.runtime.errors import FieldViolation, InvalidArgument, NotFound
from converge.runtime.values import PlainValue

CONVERTED = "converted"
# How far ahead of the service's clock an outcome may say it happened (the
# interactions service allows the same).
FUTURE_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class ProposedAction:
    """An action the decision proposed."""

    action_id: str
    rank: int
    action_name: str
    kind: str  # ActionKind's name in lower case, without its prefix
    product_id: str
    expected_value: float = 0.0


@dataclass(frozen=True)
class HeldOutAction:
    """An action the decision withheld because the customer is in its control group."""

    action_name: str
    kind: str
    product_id: str
    expected_value: float = 0.0


@dataclass(frozen=True)
class DecisionFacts:
    """What RecordOutcome reads of a logged decision."""

    decision_id: str
    customer_id: str
    policy_version: str
    decided_at: datetime
    channel: int  # common.Channel's number; 0 when the decision names none
    proposed: tuple[ProposedAction, ...]
    held_out: tuple[HeldOutAction, ...]


@dataclass(frozen=True)
class OutcomeRequest:
    """A checked RecordOutcome request (convert.py made it)."""

    decision_id: str  # "" when by alert
    alert_id: str  # "" when by decision
    action_id: str  # "" means the top-ranked action
    outcome: str  # "accepted", "converted"...
    occurred_at: datetime | None
    channel: int
    value: Decimal | None
    currency: str
    attributes: Mapping[str, PlainValue]
    idempotency_key: str
    fingerprint: bytes  # SHA-256 of the request without its key
    actor: str


@dataclass(frozen=True)
class OutcomeInteraction:
    """The "action.outcome" interaction to write."""

    customer_id: str
    occurred_at: datetime
    channel: int
    decision_id: str
    alert_id: str
    action_id: str
    action_kind: str
    outcome: str
    product_id: str
    value: Decimal | None
    currency: str
    idempotency_key: str


@dataclass(frozen=True)
class RecordedOutcome:
    interaction_id: str
    duplicate: bool


class DecisionSource(Protocol):
    async def decision(self, decision_id: str) -> DecisionFacts | None: ...


class InteractionWriter(Protocol):
    async def write(self, interaction: OutcomeInteraction) -> str:
        """Writes it and returns its interaction id once durable."""
        ...


@dataclass(frozen=True)
class AlertFacts:
    """What RecordOutcome reads of an alert: the decision behind it (its
    latest) and the action it suggests to the team."""

    decision_id: str
    kind: str  # "churn_risk", "escalation_risk", "cross_sell_moment"
    action_name: str  # the policy's suggested action; "" when none
    product_id: str


AlertLookup = Callable[[str], Awaitable[AlertFacts | None]]


class _AlertRow(Protocol):
    @property
    def decision_id(self) -> uuid.UUID: ...
    @property
    def kind(self) -> str: ...
    @property
    def action_name(self) -> str: ...
    @property
    def product_id(self) -> str: ...


class _AlertReader(Protocol):
    async def get(self, alert_id: uuid.UUID) -> _AlertRow | None: ...


def alert_lookup(alerts: _AlertReader) -> AlertLookup:
    """Reads alerts from the alerts area's store (alerts/store.py
    AlertStore.get); None for an unknown alert."""

    async def facts_of(alert_id: str) -> AlertFacts | None:
        try:
            key = uuid.UUID(alert_id)
        except ValueError:
            return None
        row = await alerts.get(key)
        if row is None:
            return None
        return AlertFacts(str(row.decision_id), row.kind, row.action_name, row.product_id)

    return facts_of


def _refuse(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


def resolve_action(
    decision: DecisionFacts, action_id: str
) -> tuple[str, ProposedAction | HeldOutAction]:
    """The arm and the action an outcome concerns: `action_id` names a
    proposed action by its id, or an action held out for its control group
    by its name (it was never proposed, so it has no id); empty means the
    top-ranked proposed action. NotFound when the decision has no such action."""
    if not action_id:
        if not decision.proposed:
            raise NotFound("action", f"{decision.decision_id}/(top-ranked)")
        return ARM_TREATMENT, min(decision.proposed, key=lambda a: a.rank)
    for proposed in decision.proposed:
        if proposed.action_id == action_id:
            return ARM_TREATMENT, proposed
    held = [a for a in decision.held_out if a.action_name == action_id]
    if held:
        products = {a.product_id for a in held}
        only = held[0]
        # One control assignment per (customer, action): every product of a
        # cross-sell action is held out together; name none when several.
        product = only.product_id if len(products) == 1 else ""
        return ARM_CONTROL, HeldOutAction(
            only.action_name, only.kind, product, max(a.expected_value for a in held)
        )
    raise NotFound("action", f"{decision.decision_id}/{action_id}")


class OutcomeService:
    def __init__(
        self,
        store: OutcomeStore,
        decisions: DecisionSource,
        interactions: InteractionWriter,
        clock: Callable[[], datetime],
        alerts: AlertLookup | None = None,
    ) -> None:
        self.store = store
        self.decisions = decisions
        self.interactions = interactions
        self.clock = clock
        # None until the alerts area is wired: outcomes by alert are then NOT_FOUND.
        self.alerts = alerts

    async def record(self, request: OutcomeRequest) -> RecordedOutcome:
        if request.idempotency_key:
            bound = await self.store.find_request(request.idempotency_key)
            # (a pending claim of this same request goes on below and adopts it)
            if bound is not None and (
                bound.interaction_id or bytes(bound.request_sha256) != request.fingerprint
            ):
                return self._replay(bound.request_sha256, bound.interaction_id, request)

        alert = await self._alert(request.alert_id) if request.alert_id else None
        decision_id = alert.decision_id if alert is not None else request.decision_id
        decision = await self.decisions.decision(decision_id)
        if decision is None:
            raise NotFound("decision", decision_id)
        action: ProposedAction | HeldOutAction
        if alert is not None and not decision.proposed:
            arm, action = ARM_TREATMENT, _alert_action(alert, request.action_id)
        else:
            arm, action = resolve_action(decision, request.action_id)
        action_id = action.action_id if isinstance(action, ProposedAction) else action.action_name

        now = self.clock()
        occurred_at = request.occurred_at or now
        if occurred_at > now + FUTURE_SKEW:
            raise _refuse("occurred_at", "must not be more than 5 minutes in the future")
        if occurred_at < decision.decided_at:
            raise _refuse("occurred_at", f"before the decision ({decision.decided_at.isoformat()})")
        channel = request.channel or decision.channel
        if not channel:
            raise _refuse("channel", "required: the decision names no channel")

        outcome_id = uuid.uuid4()
        if request.idempotency_key:
            bound = await self.store.claim(
                request.idempotency_key,
                request.fingerprint,
                outcome_id,
                uuid.UUID(decision.customer_id),
                now,
            )
            if bound is not None:
                if bound.interaction_id or bytes(bound.request_sha256) != request.fingerprint:
                    return self._replay(bound.request_sha256, bound.interaction_id, request)
                # The same request is pending elsewhere (or died between its
                # writes): write the same outcome; whichever finishes first
                # records it, the other answers it as a duplicate.
                outcome_id = bound.outcome_id
        # Derived from ours, so a retry reaches the same interaction.
        interaction_key = f"outcome:{request.idempotency_key or outcome_id}"
        interaction_id = await self.interactions.write(
            OutcomeInteraction(
                customer_id=decision.customer_id,
                occurred_at=occurred_at,
                channel=channel,
                decision_id=decision.decision_id,
                alert_id=request.alert_id,
                action_id=action_id,
                action_kind=action.kind,
                outcome=request.outcome,
                product_id=action.product_id,
                value=request.value,
                currency=request.currency,
                idempotency_key=interaction_key,
            )
        )
        try:
            recorded = await self.store.record(
                NewOutcome(
                    outcome_id=outcome_id,
                    decision_id=decision.decision_id,
                    alert_id=request.alert_id,
                    customer_id=uuid.UUID(decision.customer_id),
                    action_id=action_id,
                    action_name=action.action_name,
                    action_kind=action.kind,
                    product_id=action.product_id,
                    arm=arm,
                    outcome=request.outcome,
                    value=request.value,
                    currency=request.currency if request.value is not None else "",
                    occurred_at=occurred_at,
                    recorded_at=now,
                    interaction_id=interaction_id,
                    attributes=dict(request.attributes),
                    actor=request.actor,
                    policy_version=decision.policy_version,
                    decided_at=decision.decided_at,
                ),
                request.idempotency_key,
            )
        except DecisionGone:
            raise NotFound("decision", decision.decision_id) from None
        return RecordedOutcome(interaction_id, duplicate=not recorded)

    def _replay(
        self, bound_sha256: bytes, interaction_id: str, request: OutcomeRequest
    ) -> RecordedOutcome:
        if bytes(bound_sha256) != request.fingerprint:
            raise _refuse("idempotency_key", "already used for a different outcome")
        return RecordedOutcome(interaction_id, duplicate=True)

    async def _alert(self, alert_id: str) -> AlertFacts:
        found = await self.alerts(alert_id) if self.alerts is not None else None
        if found is None:
            raise NotFound("alert", alert_id)
        return found


def _alert_action(alert: AlertFacts, action_id: str) -> ProposedAction:
    """An alert's decision proposes no action to a customer: the outcome is
    of the action the alert suggested to its team (named by the policy's
    action name, else by the alert's kind); `action_id` may name it."""
    name = alert.action_name or alert.kind
    if action_id and action_id != name:
        raise NotFound("action", f"alert {alert.kind}/{action_id}")
    return ProposedAction(
        action_id=name, rank=1, action_name=name, kind=alert.kind, product_id=alert.product_id
    )


class ReportStore(Protocol):
    def decision_bodies(
        self, since: datetime, policy_version: str | None
    ) -> AsyncIterator[bytes]: ...
    async def for_report(
        self, since: datetime, policy_version: str | None
    ) -> Sequence[StoredOutcome]: ...


async def actions_report(
    store: ReportStore,
    facts_of: Callable[[bytes], DecisionFacts],
    since: datetime,
    policy_version: str | None = None,
) -> list[ActionReport]:
    """The report over decisions made since `since` (of one policy version):
    each decision's proposed and held-out actions are its exposures."""
    exposures: list[Exposure] = []
    async for body in store.decision_bodies(since, policy_version):
        facts = facts_of(body)
        for proposed in facts.proposed:
            exposures.append(_exposure(facts, proposed.action_name, ARM_TREATMENT, proposed))
        for held in {a.action_name: a for a in facts.held_out}.values():
            exposures.append(_exposure(facts, held.action_name, ARM_CONTROL, held))
    outcomes = [
        OutcomeRow(o.decision_id, o.action_name, o.arm, o.outcome)
        for o in await store.for_report(since, policy_version)
    ]
    return build_report(exposures, outcomes)


def _exposure(
    facts: DecisionFacts, name: str, arm: str, action: ProposedAction | HeldOutAction
) -> Exposure:
    return Exposure(
        decision_id=facts.decision_id,
        customer_id=facts.customer_id,
        action_name=name,
        arm=arm,
        expected_value=action.expected_value,
        decided_at=facts.decided_at,
        policy_version=facts.policy_version,
    )

"""Every protobuf conversion and request check of the outcomes area:
RecordOutcome's request and answer, the facts read from a logged Decision,
and the "action.outcome" interaction written to the interactions service."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC
from typing import Protocol

from converge.recommendation.outcomes.service import (
    CONVERTED,
    DecisionFacts,
    HeldOutAction,
    OutcomeInteraction,
    OutcomeRequest,
    ProposedAction,
    RecordedOutcome,
)
from converge.runtime.errors import Violations
from converge.runtime.fields import money_problem, parse_time, plain_attribute
from converge.runtime.values import (
    PlainValue,
    from_plain,
    money_from_decimal,
    money_to_decimal,
    money_to_float,
)
from converge.v1 import common_pb2, interactions_pb2
from converge.v1 import recommendation_pb2 as pb

MAX_ID_LENGTH = 128
MAX_KEY_LENGTH = 256
MAX_ACTOR_LENGTH = 256
MAX_ATTRIBUTES = 32
MAX_STRING_BYTES = 4096
_ATTRIBUTE_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_CURRENCY = re.compile(r"^[A-Z]{3}$")
# The interaction's own attributes: the caller's may not shadow them.
RESERVED_ATTRIBUTES = frozenset({"decision_id", "alert_id", "action_id", "action_kind", "outcome"})
INTERACTION_TYPE = "action.outcome"
INTERACTION_SOURCE = "recommendation"

_OUTCOME_PREFIX = "ACTION_OUTCOME_"
_KIND_PREFIX = "ACTION_KIND_"


def outcome_name(number: int) -> str:
    """ActionOutcome's name in lower case without its prefix ("converted")."""
    return pb.ActionOutcome.Name(number).removeprefix(_OUTCOME_PREFIX).lower()  # type: ignore[arg-type]


def kind_name(number: int) -> str:
    """ActionKind's name in lower case without its prefix ("retention_offer")."""
    return pb.ActionKind.Name(number).removeprefix(_KIND_PREFIX).lower()  # type: ignore[arg-type]


def _check_id(value: str, field: str, violations: Violations) -> None:
    violations.check(len(value) <= MAX_ID_LENGTH, field, f"at most {MAX_ID_LENGTH} characters")


def _attribute(
    name: str, value: common_pb2.AttributeValue, violations: Violations
) -> PlainValue | None:
    path = f"attributes[{name[:64]}]"
    if not _ATTRIBUTE_NAME.match(name):
        violations.add(path, "name must match [a-z][a-z0-9_]{0,62}")
        return None
    if name in RESERVED_ATTRIBUTES:
        violations.add(path, "set by the service; name it otherwise")
        return None
    plain = plain_attribute(value, path, violations)
    if isinstance(plain, str) and len(plain.encode()) > MAX_STRING_BYTES:
        violations.add(path, f"longer than {MAX_STRING_BYTES} bytes")
    return plain


def outcome_request(request: pb.RecordOutcomeRequest) -> OutcomeRequest:
    """The checked request; INVALID_ARGUMENT naming every bad field."""
    violations = Violations()
    subject = request.WhichOneof("subject")
    if subject is None:
        violations.add("subject", "set decision_id or alert_id")
    elif subject == "decision_id":
        violations.check(bool(request.decision_id), "decision_id", "required")
        _check_id(request.decision_id, "decision_id", violations)
    else:
        violations.check(bool(request.alert_id), "alert_id", "required")
        _check_id(request.alert_id, "alert_id", violations)
    _check_id(request.action_id, "action_id", violations)

    known_outcome = request.outcome in pb.ActionOutcome.values()
    if request.outcome == pb.ACTION_OUTCOME_UNSPECIFIED:
        violations.add("outcome", "required")
    elif not known_outcome:
        violations.add("outcome", f"unknown value {request.outcome}")
    outcome = outcome_name(request.outcome) if known_outcome else ""

    occurred_at = (
        parse_time(request.occurred_at, "occurred_at", violations)
        if request.HasField("occurred_at")
        else None
    )
    if request.channel not in common_pb2.Channel.values():
        violations.add("channel", f"unknown value {request.channel}")

    value = None
    currency = ""
    if request.HasField("value"):
        if known_outcome and outcome != CONVERTED:
            violations.add("value", "only for a CONVERTED outcome")
        problem = money_problem(request.value.units, request.value.nanos)
        if problem is not None:
            violations.add("value", problem)
        elif request.value.units < 0 or request.value.nanos < 0:
            violations.add("value", "must not be negative")
        else:
            value = money_to_decimal(request.value)
        if not _CURRENCY.match(request.value.currency_code):
            violations.add("value.currency_code", "an ISO 4217 code such as EUR")
        currency = request.value.currency_code

    if len(request.attributes) > MAX_ATTRIBUTES:
        violations.add("attributes", f"at most {MAX_ATTRIBUTES} attributes")
    attributes: dict[str, PlainValue] = {}
    for name, attribute in request.attributes.items():
        plain = _attribute(name, attribute, violations)
        if plain is not None:
            attributes[name] = plain

    violations.check(
        len(request.idempotency_key) <= MAX_KEY_LENGTH,
        "idempotency_key",
        f"at most {MAX_KEY_LENGTH} characters",
    )
    violations.check(
        len(request.actor.name) <= MAX_ACTOR_LENGTH,
        "actor.name",
        f"at most {MAX_ACTOR_LENGTH} characters",
    )
    violations.raise_if_any()
    return OutcomeRequest(
        decision_id=request.decision_id,
        alert_id=request.alert_id,
        action_id=request.action_id,
        outcome=outcome,
        occurred_at=occurred_at,
        channel=request.channel,
        value=value,
        currency=currency,
        attributes=attributes,
        idempotency_key=request.idempotency_key,
        fingerprint=fingerprint(request),
        actor=request.actor.name,
    )


def fingerprint(request: pb.RecordOutcomeRequest) -> bytes:
    """SHA-256 of the request without its idempotency key (deterministic
    serialization), what a key is bound to."""
    unkeyed = pb.RecordOutcomeRequest()
    unkeyed.CopyFrom(request)
    unkeyed.ClearField("idempotency_key")
    return hashlib.sha256(unkeyed.SerializeToString(deterministic=True)).digest()


def recorded(answer: RecordedOutcome) -> pb.RecordOutcomeResponse:
    return pb.RecordOutcomeResponse(
        interaction_id=answer.interaction_id, duplicate=answer.duplicate
    )


def decision_facts(decision: pb.Decision) -> DecisionFacts:
    """What RecordOutcome and the report read of a logged decision."""
    return DecisionFacts(
        decision_id=decision.decision_id,
        customer_id=decision.customer_id,
        policy_version=decision.policy_version,
        decided_at=decision.decided_at.ToDatetime(tzinfo=UTC),
        channel=decision.channel,
        proposed=tuple(
            ProposedAction(
                action_id=a.action_id,
                rank=a.rank,
                action_name=a.action_name,
                kind=kind_name(a.kind),
                product_id=a.product_id,
                expected_value=money_to_float(a.expected_value),
            )
            for a in decision.actions
        ),
        held_out=tuple(
            HeldOutAction(
                action_name=s.action_name,
                kind=kind_name(s.kind),
                product_id=s.product_id,
                expected_value=money_to_float(s.expected_value),
            )
            for s in decision.suppressed
            if pb.SUPPRESSION_REASON_CONTROL_GROUP in s.reasons
        ),
    )


def interaction_request(
    interaction: OutcomeInteraction,
) -> interactions_pb2.RecordInteractionRequest:
    """The "action.outcome" interaction, looked up only (never creates a customer)."""
    attributes = {
        "action_id": interaction.action_id,
        "action_kind": interaction.action_kind,
        "outcome": interaction.outcome,
    }
    if interaction.decision_id:
        attributes["decision_id"] = interaction.decision_id
    if interaction.alert_id:
        attributes["alert_id"] = interaction.alert_id
    written = interactions_pb2.InteractionInput(
        customer=common_pb2.CustomerRef(customer_id=interaction.customer_id),
        channel=interaction.channel,  # type: ignore[arg-type]
        type=INTERACTION_TYPE,
        attributes={name: from_plain(value) for name, value in attributes.items()},
        product_id=interaction.product_id,
        source=INTERACTION_SOURCE,
    )
    written.occurred_at.FromDatetime(interaction.occurred_at)
    if interaction.value is not None:
        written.amount.CopyFrom(money_from_decimal(interaction.value, interaction.currency))
    return interactions_pb2.RecordInteractionRequest(
        interaction=written, idempotency_key=interaction.idempotency_key, lookup_only=True
    )


class _StoredBody(Protocol):
    @property
    def body(self) -> bytes: ...


class _Stored(Protocol):
    @property
    def record(self) -> _StoredBody: ...


class _DecisionLog(Protocol):
    async def get(self, decision_id: str) -> _Stored | None: ...


class LoggedDecisions:
    """The decision log (decisions/store.py's DecisionStore) as the outcomes
    service reads it: the stored Decision message, opened here."""

    def __init__(self, log: _DecisionLog) -> None:
        self.log = log

    async def decision(self, decision_id: str) -> DecisionFacts | None:
        stored = await self.log.get(decision_id)
        if stored is None:
            return None
        return decision_facts(pb.Decision.FromString(stored.record.body))


class _InteractionsPeer(Protocol):
    async def record_interaction(
        self, request: interactions_pb2.RecordInteractionRequest, field_path: str = ""
    ) -> tuple[str, bool]: ...


class OutcomeInteractions:
    """Writes "action.outcome" interactions through the interactions peer
    (peers.py), which returns once the interaction is durable."""

    def __init__(self, peer: _InteractionsPeer) -> None:
        self.peer = peer

    async def write(self, interaction: OutcomeInteraction) -> str:
        interaction_id, _ = await self.peer.record_interaction(
            interaction_request(interaction), field_path="outcome"
        )
        return interaction_id


def facts_of_body(body: bytes) -> DecisionFacts:
    """A stored decision's facts (the decision log keeps the Decision message)."""
    return decision_facts(pb.Decision.FromString(body))

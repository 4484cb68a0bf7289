"""Every protobuf conversion and request check of alerts: requests become
plain values (INVALID_ARGUMENT naming the field), stored alerts and events
become `Alert` and `AlertEvent`."""

from __future__ import annotations

import base64
import hashlib
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from google.protobuf import json_format
from google.protobuf.message import Message

from converge.recommendation.alerts.store import AlertEventRow, AlertRow, ListFilter
from converge.runtime.cursors import parse_commit_cursor
from converge.runtime.errors import Violations
from converge.runtime.fields import parse_time, parse_uuid
from converge.runtime.values import money_from_decimal, timestamp
from converge.v1 import common_pb2, predictions_pb2, scoring_pb2
from converge.v1 import recommendation_pb2 as pb

KIND_NAMES = {
    pb.ALERT_KIND_CHURN_RISK: "churn_risk",
    pb.ALERT_KIND_ESCALATION_RISK: "escalation_risk",
    pb.ALERT_KIND_CROSS_SELL_MOMENT: "cross_sell_moment",
}
KIND_NUMBERS = {name: number for number, name in KIND_NAMES.items()}
STATUS_NAMES = {
    pb.ALERT_STATUS_OPEN: "open",
    pb.ALERT_STATUS_ACKNOWLEDGED: "acknowledged",
    pb.ALERT_STATUS_ASSIGNED: "assigned",
    pb.ALERT_STATUS_RESOLVED: "resolved",
    pb.ALERT_STATUS_DISMISSED: "dismissed",
    pb.ALERT_STATUS_ESCALATED: "escalated",
}
STATUS_NUMBERS = {name: number for number, name in STATUS_NAMES.items()}
# The service's own states, as callers see them: a waiting alert is not
# announced (not listed, not streamed); an expired one was never announced.
STATUS_NUMBERS["waiting"] = pb.ALERT_STATUS_UNSPECIFIED
STATUS_NUMBERS["expired"] = pb.ALERT_STATUS_DISMISSED

DEFAULT_PAGE, MAX_PAGE = 100, 1000
MAX_TEXT = 2000
# Team names as the policy writes them (policy.model.Name).
_TEAM_MAX = 63


def _team(value: str, field: str, violations: Violations) -> str:
    if not value:
        violations.add(field, "required")
    elif len(value) > _TEAM_MAX:
        violations.add(field, f"at most {_TEAM_MAX} characters")
    return value


def _kinds(values: list[int], field: str, violations: Violations) -> tuple[str, ...]:
    kinds = []
    for i, value in enumerate(values):
        name = KIND_NAMES.get(value)  # type: ignore[call-overload]
        if name is None:
            violations.add(f"{field}[{i}]", "not an alert kind")
        else:
            kinds.append(name)
    return tuple(kinds)


def _alert_id(value: str, violations: Violations) -> uuid.UUID:
    parsed = parse_uuid(value, "alert_id", violations)
    return uuid.UUID(parsed) if parsed else uuid.UUID(int=0)


def _text(value: str, field: str, violations: Violations) -> str:
    violations.check(len(value) <= MAX_TEXT, field, f"at most {MAX_TEXT} characters")
    return value


# --- requests ----------------------------------------------------------------------


@dataclass(frozen=True)
class Subscription:
    team: str
    position: tuple[int, int] | None  # None: from now
    kinds: tuple[str, ...]


def subscription(request: pb.SubscribeAlertsRequest) -> Subscription:
    violations = Violations()
    team = _team(request.team, "team", violations)
    position = parse_commit_cursor(request.from_cursor, "from_cursor", violations)
    kinds = _kinds(list(request.kinds), "kinds", violations)
    violations.raise_if_any()
    return Subscription(team, None if request.from_now else position, kinds)


@dataclass(frozen=True)
class ListQuery:
    where: ListFilter
    after: tuple[datetime, uuid.UUID] | None
    limit: int


def _utc(at: datetime) -> datetime:
    """A token's time in UTC. Tokens carry aware times; a naive one, or one out
    of range once in UTC (year 1 at +14:00), which would fail in the driver as
    INTERNAL, is refused here (ValueError, OverflowError)."""
    if at.tzinfo is None:
        raise ValueError("a token's time names its offset")
    return at.astimezone(UTC)


def _page_token(token: str, violations: Violations) -> tuple[datetime, uuid.UUID] | None:
    if not token:
        return None
    try:
        created, alert_id = base64.urlsafe_b64decode(token.encode()).decode().split("|")
        return _utc(datetime.fromisoformat(created)), uuid.UUID(alert_id)
    except (ValueError, UnicodeDecodeError, OverflowError):
        violations.add("page.page_token", "not a page token this service issued")
        return None


def next_page_token(alert: AlertRow) -> str:
    return base64.urlsafe_b64encode(
        f"{alert.created_at.isoformat()}|{alert.alert_id}".encode()
    ).decode()


def list_query(request: pb.ListAlertsRequest) -> ListQuery:
    violations = Violations()
    team = _team(request.team, "team", violations)
    statuses = []
    for i, value in enumerate(request.statuses):
        name = STATUS_NAMES.get(value)  # type: ignore[call-overload]
        if name is None:
            violations.add(f"statuses[{i}]", "not an alert status")
        else:
            statuses.append(name)
    if "dismissed" in statuses:
        statuses.append("expired")
    kinds = _kinds(list(request.kinds), "kinds", violations)
    customer_id = None
    if request.customer_id:
        parsed = parse_uuid(request.customer_id, "customer_id", violations)
        customer_id = uuid.UUID(parsed) if parsed else None
    created_from = created_to = None
    if request.created.HasField("start"):
        created_from = parse_time(request.created.start, "created.start", violations)
    if request.created.HasField("end"):
        created_to = parse_time(request.created.end, "created.end", violations)
    size = request.page.page_size
    violations.check(size >= 0, "page.page_size", "must not be negative")
    after = _page_token(request.page.page_token, violations)
    violations.raise_if_any()
    return ListQuery(
        ListFilter(
            team=team,
            statuses=tuple(statuses),
            kinds=kinds,
            customer_id=customer_id,
            assignee=request.assignee,
            created_from=created_from,
            created_to=created_to,
        ),
        after,
        min(size or DEFAULT_PAGE, MAX_PAGE),
    )


def alert_id(request: pb.GetAlertRequest) -> uuid.UUID:
    violations = Violations()
    parsed = _alert_id(request.alert_id, violations)
    violations.raise_if_any()
    return parsed


@dataclass(frozen=True)
class Change:
    alert_id: uuid.UUID
    operation: str
    idempotency_key: str
    actor_name: str
    actor_reason: str
    # What the idempotency key is bound to (request_fingerprint).
    request_sha256: bytes = b""
    assignee: str = ""
    note: str = ""
    dismiss_reason: int = 0


def request_fingerprint(request: Message) -> bytes:
    """What an idempotency key is bound to: the SHA-256 of the request
    without its key (deterministic serialization), prefixed by the message's
    full name so an acknowledgement and a resolution of one alert differ."""
    unkeyed = type(request)()
    unkeyed.CopyFrom(request)
    unkeyed.ClearField("idempotency_key")
    digest = hashlib.sha256(request.DESCRIPTOR.full_name.encode() + b"\0")
    digest.update(unkeyed.SerializeToString(deterministic=True))
    return digest.digest()


def _change(
    operation: str,
    request: pb.AcknowledgeAlertRequest
    | pb.AssignAlertRequest
    | pb.ResolveAlertRequest
    | pb.DismissAlertRequest,
    violations: Violations,
) -> Change:
    return Change(
        alert_id=_alert_id(request.alert_id, violations),
        operation=operation,
        idempotency_key=_text(request.idempotency_key, "idempotency_key", violations),
        actor_name=_text(request.actor.name, "actor.name", violations),
        actor_reason=_text(request.actor.reason, "actor.reason", violations),
        request_sha256=request_fingerprint(request),
    )


def acknowledge(request: pb.AcknowledgeAlertRequest) -> Change:
    violations = Violations()
    change = _change("acknowledge", request, violations)
    violations.raise_if_any()
    return change


def assign(request: pb.AssignAlertRequest) -> Change:
    violations = Violations()
    change = _change("assign", request, violations)
    if not request.assignee:
        violations.add("assignee", "required")
    _text(request.assignee, "assignee", violations)
    violations.raise_if_any()
    return Change(**{**change.__dict__, "assignee": request.assignee})


def resolve(request: pb.ResolveAlertRequest) -> Change:
    violations = Violations()
    change = _change("resolve", request, violations)
    note = _text(request.note, "note", violations)
    violations.raise_if_any()
    return Change(**{**change.__dict__, "note": note})


def dismiss(request: pb.DismissAlertRequest) -> Change:
    violations = Violations()
    change = _change("dismiss", request, violations)
    note = _text(request.note, "note", violations)
    reason = int(request.dismiss_reason)
    if reason == pb.ALERT_DISMISS_REASON_UNSPECIFIED:
        violations.add("dismiss_reason", "required")
    elif reason not in pb.AlertDismissReason.values():
        violations.add("dismiss_reason", "not a dismiss reason")
    violations.raise_if_any()
    return Change(**{**change.__dict__, "note": note, "dismiss_reason": reason})


# --- answers -----------------------------------------------------------------------


def alert_to_pb(row: AlertRow, currency: str) -> pb.Alert:
    reasons = [
        predictions_pb2.ReasonCode(
            code=r.code,
            feature=r.feature,
            contribution=r.contribution,
            text=r.text,
            **({"value": r.value} if r.value is not None else {}),
        )
        for r in row.reasons
    ]
    alert = pb.Alert(
        alert_id=str(row.alert_id),
        kind=KIND_NUMBERS[row.kind],  # type: ignore[arg-type]
        team=row.team,
        customer_id=str(row.customer_id),
        ticket_id=row.ticket_id,
        product_id=row.product_id,
        probability=row.probability,
        risk_band=row.risk_band,  # type: ignore[arg-type]
        reasons=reasons,
        status=STATUS_NUMBERS[row.status],  # type: ignore[arg-type]
        assignee=row.assignee,
        dedup_key=row.dedup_key,
        occurrences=row.occurrences,
        created_at=timestamp(row.created_at),
        updated_at=timestamp(row.updated_at),
        cursor=row.cursor,
        decision_id=str(row.decision_id),
        escalated_to_team=row.escalated_to_team,
        priority=row.priority,  # type: ignore[arg-type]
        status_note=row.status_note,
        dismiss_reason=row.dismiss_reason,  # type: ignore[arg-type]
    )
    if row.due_by is not None:
        alert.due_by.CopyFrom(timestamp(row.due_by))
    if row.action_name:
        alert.recommended_action.CopyFrom(
            pb.RecommendedAction(
                rank=1,
                action_name=row.action_name,
                product_id=row.product_id,
                ticket_id=row.ticket_id,
                expected_value=money_from_decimal(row.expected_value, currency),
                priority=row.priority,  # type: ignore[arg-type]
                reasons=reasons,
            )
        )
    return alert


def event_to_pb(row: AlertEventRow, currency: str) -> pb.AlertEvent:
    event = pb.AlertEvent(
        cursor=row.cursor,
        type=row.type,  # type: ignore[arg-type]
        alert=alert_to_pb(row.alert, currency),
        occurred_at=timestamp(row.occurred_at),
    )
    if row.actor_name or row.actor_reason:
        event.actor.CopyFrom(common_pb2.Actor(name=row.actor_name, reason=row.actor_reason))
    return event


def event_body(row: AlertEventRow, currency: str) -> bytes:
    """The body a webhook posts: the AlertEvent as proto3 JSON, UTF-8."""
    return json_format.MessageToJson(
        event_to_pb(row, currency), indent=None, sort_keys=True
    ).encode()


def decision_body(
    decision_id: uuid.UUID,
    customer_id: uuid.UUID,
    interaction_id: str,
    policy_version: str,
    scores: list[bytes],
    alert_ids: list[str],
    decided_at: datetime,
) -> bytes:
    """The Decision behind an alert (trigger INTERACTION), serialized as the
    decision log stores it: the interaction that led to it, the models, the
    scores with reasons and the features scoring used, the alerts it backs."""
    decision = pb.Decision(
        decision_id=str(decision_id),
        trigger=pb.DECISION_TRIGGER_INTERACTION,
        customer_id=str(customer_id),
        interaction_id=interaction_id,
        policy_version=policy_version,
        alert_ids=alert_ids,
        decided_at=timestamp(decided_at),
    )
    models: dict[tuple[str, str], predictions_pb2.ModelRef] = {}
    for raw in scores:
        answer = scoring_pb2.ScoreResponse.FromString(raw)
        decision.predictions.extend(answer.predictions)
        decision.features.extend(answer.features)
        for prediction in answer.predictions:
            if prediction.ticket_id and not decision.ticket_id:
                decision.ticket_id = prediction.ticket_id
            ref = prediction.model
            models.setdefault((ref.name, ref.version), ref)
    decision.models.extend(models.values())
    return decision.SerializeToString()

"""Protobuf <-> plain conversions of the decisions area: requests are checked
here (every bad field named at once), the Decision is built here from the
service's draft, and answers are read back from the stored Decision, so
what Recommend answers is exactly what GetDecision replays."""

from __future__ import annotations

import base64
import hashlib
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from google.protobuf import json_format

from converge.recommendation.decisions.service import DecisionDraft, RecommendQuery
from converge.recommendation.decisions.store import StoredDecision
from converge.recommendation.peers import Reason
from converge.runtime.errors import Violations
from converge.runtime.fields import check_identifier, parse_time, plain_attribute
from converge.runtime.values import (
    CustomerKey,
    PlainValue,
    from_plain,
    money_from_decimal,
    timestamp,
)
from converge.v1 import common_pb2, predictions_pb2, recommendation_pb2, scoring_pb2

MAX_KEY = 256
MAX_CONTEXT = 32
MAX_CONTEXT_FEATURES = 200
MAX_ACTIONS = 20
DEFAULT_PAGE = 20
MAX_PAGE = 100
_CONTEXT_KEY = re.compile(r"[a-z][a-z0-9_]{0,62}")
_TRIGGERS = {
    recommendation_pb2.DECISION_TRIGGER_RECOMMEND: "recommend",
    recommendation_pb2.DECISION_TRIGGER_INTERACTION: "interaction",
    recommendation_pb2.DECISION_TRIGGER_SCHEDULE: "schedule",
}
_TOKEN_PREFIX = "d1:"


def _enum_name(enum: Any, number: int, prefix: str) -> str | None:
    """A known, set enum value's name in lower case without its prefix."""
    if number == 0 or number not in enum.values():
        return None
    return str(enum.Name(number)).removeprefix(prefix).lower()


def _enum_number(enum: Any, prefix: str, name: str) -> int:
    return int(enum.Value(f"{prefix}{name.upper()}"))


def request_channel_name(number: int) -> str:
    return _enum_name(common_pb2.Channel, number, "CHANNEL_") or ""


def contact_channel_number(name: str | None) -> int:
    return 0 if not name else _enum_number(common_pb2.ContactChannel, "CONTACT_CHANNEL_", name)


# --- requests -----------------------------------------------------------------------


def customer_key(ref: common_pb2.CustomerRef, path: str, v: Violations) -> CustomerKey:
    which = ref.WhichOneof("ref")
    if which == "customer_id":
        try:
            return CustomerKey(customer_id=str(uuid.UUID(ref.customer_id)))
        except ValueError:
            v.add(f"{path}.customer_id", "not a customer id (a UUID)")
            return CustomerKey()
    if which == "identifier":
        check_identifier(ref.identifier, f"{path}.identifier", v, MAX_KEY)
        return CustomerKey(
            identifier_type=int(ref.identifier.type),
            identifier_value=ref.identifier.value,
            identifier_source=ref.identifier.source,
        )
    v.add(path, "required: set customer_id or identifier")
    return CustomerKey()


def recommend_query(request: recommendation_pb2.RecommendRequest) -> RecommendQuery:
    v = Violations()
    customer = customer_key(request.customer, "customer", v)
    v.check(
        request.channel == 0 or request.channel in common_pb2.Channel.values(),
        "channel",
        "unknown channel",
    )
    v.check(len(request.context) <= MAX_CONTEXT, "context", f"at most {MAX_CONTEXT} keys")
    context: dict[str, PlainValue] = {}
    for key, value in request.context.items():
        if not _CONTEXT_KEY.fullmatch(key):
            v.add(f"context[{key[:64]}]", "keys match [a-z][a-z0-9_]{0,62}")
            continue
        plain = plain_attribute(value, f"context[{key}]", v)
        if isinstance(plain, str) and len(plain) > 4096:
            v.add(f"context[{key}]", "at most 4096 characters")
        elif plain is not None:
            context[key] = plain
    v.check(
        len(request.context_features) <= MAX_CONTEXT_FEATURES,
        "context_features",
        f"at most {MAX_CONTEXT_FEATURES} features",
    )
    for name, number in request.context_features.items():
        if not math.isfinite(number):
            v.add(f"context_features[{name[:64]}]", "must be a finite number")
    v.check(len(request.ticket_id) <= MAX_KEY, "ticket_id", f"at most {MAX_KEY} characters")
    kinds: set[str] = set()
    for i, number in enumerate(request.kinds):
        kind = _enum_name(recommendation_pb2.ActionKind, number, "ACTION_KIND_")
        if kind is None:
            v.add(f"kinds[{i}]", "set a known action kind")
        else:
            kinds.add(kind)
    channels: set[str] = set()
    for i, number in enumerate(request.contact_channels):
        channel = _enum_name(common_pb2.ContactChannel, number, "CONTACT_CHANNEL_")
        if channel is None:
            v.add(f"contact_channels[{i}]", "set a known contact channel")
        else:
            channels.add(channel)
    v.check(
        0 <= request.max_actions <= MAX_ACTIONS,
        "max_actions",
        f"from 0 (the policy's default) to {MAX_ACTIONS}",
    )
    v.check(
        len(request.idempotency_key) <= MAX_KEY,
        "idempotency_key",
        f"at most {MAX_KEY} characters",
    )
    v.raise_if_any()
    return RecommendQuery(
        customer=customer,
        channel=request_channel_name(request.channel),
        channel_number=int(request.channel),
        context=context,
        context_features=dict(request.context_features),
        ticket_id=request.ticket_id,
        kinds=frozenset(kinds),
        contact_channels=frozenset(channels),
        max_actions=request.max_actions,
        dry_run=request.dry_run,
        idempotency_key=request.idempotency_key,
        request_sha256=request_fingerprint(request),
    )


def request_fingerprint(request: recommendation_pb2.RecommendRequest) -> bytes:
    """SHA-256 of the request without its key (deterministic serialization:
    map order does not change it)."""
    copy = recommendation_pb2.RecommendRequest()
    copy.CopyFrom(request)
    copy.idempotency_key = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).digest()


def decision_id(value: str) -> str:
    v = Violations()
    v.check(bool(value), "decision_id", "required")
    v.raise_if_any()
    return value


@dataclass(frozen=True)
class ListQuery:
    customer: CustomerKey
    since: datetime | None
    until: datetime | None
    triggers: tuple[str, ...]
    after: tuple[datetime, str] | None
    limit: int


def list_query(request: recommendation_pb2.ListDecisionsRequest) -> ListQuery:
    v = Violations()
    customer = customer_key(request.customer, "customer", v)
    since = until = None
    if request.decided.HasField("start"):
        since = parse_time(request.decided.start, "decided.start", v)
    if request.decided.HasField("end"):
        until = parse_time(request.decided.end, "decided.end", v)
    triggers: list[str] = []
    for i, number in enumerate(request.triggers):
        name = _TRIGGERS.get(number)
        if name is None:
            v.add(f"triggers[{i}]", "set a known decision trigger")
        elif name not in triggers:
            triggers.append(name)
    v.check(request.page.page_size >= 0, "page.page_size", "must not be negative")
    after = _page_after(request.page.page_token, v)
    v.raise_if_any()
    size = request.page.page_size or DEFAULT_PAGE
    return ListQuery(customer, since, until, tuple(triggers), after, min(size, MAX_PAGE))


def _utc(at: datetime) -> datetime:
    """A token's time in UTC. Tokens carry aware times; a naive one, or one out
    of range once in UTC (year 1 at +14:00), which would fail in the driver as
    INTERNAL, is refused here (ValueError, OverflowError)."""
    if at.tzinfo is None:
        raise ValueError("a token's time names its offset")
    return at.astimezone(UTC)


def _page_after(token: str, v: Violations) -> tuple[datetime, str] | None:
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
        if not text.startswith(_TOKEN_PREFIX):
            raise ValueError(text)
        at, decision = text.removeprefix(_TOKEN_PREFIX).split("|")
        return _utc(datetime.fromisoformat(at)), str(uuid.UUID(decision))
    except (ValueError, UnicodeError, OverflowError):
        v.add("page.page_token", "not a page token this service issued")
        return None


def page_token(decided_at: datetime, decision_id: str) -> str:
    text = f"{_TOKEN_PREFIX}{decided_at.isoformat()}|{decision_id}"
    return base64.urlsafe_b64encode(text.encode("utf-8")).decode("ascii")


# --- the decision -------------------------------------------------------------------


def _reason_pb(reason: Reason) -> predictions_pb2.ReasonCode:
    pb = predictions_pb2.ReasonCode(
        code=reason.code, feature=reason.feature, contribution=reason.contribution, text=reason.text
    )
    if reason.value is not None:
        pb.value = reason.value
    return pb


def _money(amount: Decimal, currency: str) -> common_pb2.Money:
    return money_from_decimal(amount, currency)


def _suppression_numbers(
    reasons: Sequence[str],
) -> list[recommendation_pb2.SuppressionReason.ValueType]:
    return [
        recommendation_pb2.SuppressionReason.Value(f"SUPPRESSION_REASON_{r.upper()}")
        for r in reasons
    ]


def decision_body(draft: DecisionDraft) -> bytes:
    """The Decision as logged (and answered), serialized."""
    return decision_pb(draft).SerializeToString()


def decision_pb(draft: DecisionDraft) -> recommendation_pb2.Decision:
    scored = scoring_pb2.ScoreResponse.FromString(draft.scores.raw)
    query = draft.query
    models: list[predictions_pb2.ModelRef] = []
    seen: set[tuple[str, str]] = set()
    for prediction in scored.predictions:
        key = (prediction.model.name, prediction.model.version)
        if key not in seen:
            seen.add(key)
            models.append(prediction.model)
    actions = []
    for proposed in draft.actions:
        pb = recommendation_pb2.RecommendedAction(
            action_id=proposed.action_id,
            rank=proposed.rank,
            kind=_enum_number(recommendation_pb2.ActionKind, "ACTION_KIND_", proposed.kind),  # type: ignore[arg-type]
            action_name=proposed.action_name,
            offer_id=proposed.offer_id,
            product_id=proposed.product_id,
            ticket_id=proposed.ticket_id,
            contact_channel=contact_channel_number(proposed.channel),  # type: ignore[arg-type]
            expected_value=_money(proposed.expected_value, draft.currency),
            priority=_enum_number(
                recommendation_pb2.ActionPriority, "ACTION_PRIORITY_", proposed.priority
            ),  # type: ignore[arg-type]
            reasons=[_reason_pb(r) for r in proposed.reasons],
            display_text=proposed.display_text,
        )
        if proposed.prediction_index is not None:
            pb.prediction.CopyFrom(scored.predictions[proposed.prediction_index])
        if proposed.valid_until is not None:
            pb.valid_until.CopyFrom(timestamp(proposed.valid_until))
        actions.append(pb)
    suppressed = []
    for withheld in draft.withheld:
        pb_s = recommendation_pb2.SuppressedAction(
            kind=_enum_number(recommendation_pb2.ActionKind, "ACTION_KIND_", withheld.kind),  # type: ignore[arg-type]
            action_name=withheld.action_name,
            offer_id=withheld.offer_id,
            product_id=withheld.product_id,
            ticket_id=withheld.ticket_id,
            contact_channel=contact_channel_number(withheld.channel),  # type: ignore[arg-type]
            reasons=_suppression_numbers(withheld.reasons),
            detail=withheld.detail,
            expected_value=_money(withheld.expected_value, draft.currency),
        )
        if withheld.suppressed_until is not None:
            pb_s.suppressed_until.CopyFrom(timestamp(withheld.suppressed_until))
        suppressed.append(pb_s)
    return recommendation_pb2.Decision(
        decision_id=draft.decision_id,
        trigger=recommendation_pb2.DECISION_TRIGGER_RECOMMEND,
        customer_id=draft.customer_id,
        ticket_id=query.ticket_id,
        channel=query.channel_number,  # type: ignore[arg-type]
        context={k: from_plain(value) for k, value in query.context.items()},
        policy_version=draft.policy_version,
        models=models,
        features=list(scored.features),
        context_features=dict(query.context_features),
        predictions=list(scored.predictions),
        actions=actions,
        suppressed=suppressed,
        decided_at=timestamp(draft.decided_at),
    )


def stored_decision_pb(stored: StoredDecision) -> recommendation_pb2.Decision:
    """The logged Decision with the outcomes recorded since."""
    decision = recommendation_pb2.Decision.FromString(stored.record.body)
    for outcome in stored.outcomes:
        decision.outcomes.append(
            recommendation_pb2.DecisionOutcome(
                action_id=outcome.action_id,
                outcome=_enum_number(
                    recommendation_pb2.ActionOutcome, "ACTION_OUTCOME_", outcome.outcome
                ),  # type: ignore[arg-type]
                occurred_at=timestamp(outcome.occurred_at),
                interaction_id=outcome.interaction_id,
            )
        )
    return decision


def recommend_response(body: bytes) -> recommendation_pb2.RecommendResponse:
    """What Recommend answers: read from the logged Decision itself."""
    decision = recommendation_pb2.Decision.FromString(body)
    return recommendation_pb2.RecommendResponse(
        decision_id=decision.decision_id,
        customer_id=decision.customer_id,
        actions=decision.actions,
        suppressed=decision.suppressed,
        policy_version=decision.policy_version,
        decided_at=decision.decided_at,
    )


def list_response(
    decisions: Sequence[StoredDecision], limit: int
) -> recommendation_pb2.ListDecisionsResponse:
    token = ""
    if len(decisions) == limit and decisions:
        last = decisions[-1].record
        token = page_token(last.decided_at, last.decision_id)
    return recommendation_pb2.ListDecisionsResponse(
        decisions=[stored_decision_pb(d) for d in decisions],
        page=common_pb2.PageResponse(next_page_token=token),
    )


def decision_json(body: bytes) -> dict[str, Any]:
    """A logged Decision as proto3 JSON (exports)."""
    return json_format.MessageToDict(recommendation_pb2.Decision.FromString(body))

"""Recommend's rules, in plain types (no gRPC, no SQL here).

One decision:
1. Identity (the customer, profile and contact preferences, read now) and
   scoring (churn, escalation of the ticket in hand, cross-sell of every
   candidate product, with features and reasons) are asked at once.
2. Candidates: each action of the active policy the request allows (its
   kinds, its request channel, its contact channels), one per product for
   cross-sell. An action resting on a prediction is a candidate when the
   prediction was scored and reaches `min_probability`; a rule-driven one
   (no prediction) when its eligibility conditions are set and hold, and a
   hand-over to a person also whenever the customer wants a human. Every
   eligibility condition must hold. Those are silent filters: a candidate
   that fails them was never in question.
3. Each candidate gets its expected value and priority (arbitration.py) and
   every reason to withhold it: the arbitration across teams (sales), its
   control group (outcomes/control.py), the contact rules (contact/: consent,
   do-not-contact, caps, cool-downs, quiet hours, open tickets, wants a
   human), applied to the customer's contact history, read beside the peers.
4. The allowed ones are ranked (hand-overs for a customer who wants a human
   first, then expected value, priority, name, product); one per kind; those
   worth less than the policy's minimum are dropped; at most `max_actions`.
   Nothing left: DO_NOTHING.
5. The decision is logged and its proposals counted in the contact ledger in
   one statement (one round trip, its own transaction: migration 0007's
   commit_decision) under the customer's contact lock, if the history is still
   the one the rules read; if another decision or outcome changed it in
   between, the decision is made again on the new history (after
   OPTIMISTIC_ATTEMPTS, in one transaction holding the lock throughout). A dry
   run writes nothing and takes no lock. What is answered is what was logged:
   the response is read from the stored bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Protocol, TypeVar

from converge.recommendation.contact import rules as contact_rules
from converge.recommendation.contact.rules import (
    Candidate,
    ContactPreferences,
    Verdict,
    history_horizon,
)
from converge.recommendation.decisions import arbitration
from converge.recommendation.decisions.store import (
    Committed,
    ContactHistory,
    DecisionRecord,
    DecisionStore,
    ProposedContact,
    is_uuid,
)
from converge.recommendation.outcomes.control import in_control_group
from converge.recommendation.peers import (
    CustomerView,
    Peers,
    Prediction,
    Reason,
    Scores,
)
from converge.recommendation.policy.model import (
    ActionSpec,
    ActivePolicy,
    Condition,
    Policy,
    PolicySource,
)
from converge.runtime.database import Connection
from converge.runtime.errors import FieldViolation, InvalidArgument, NotFound
from converge.runtime.periodic import Periodic
from converge.runtime.values import CustomerKey, PlainValue

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]
T = TypeVar("T")

MAX_ACTIONS = 20
HAND_OVER_KINDS = frozenset({"escalate_to_human", "escalate_to_senior_agent"})
SALES = "sales"
# Optimistic decisions tried before one is made under the customer's lock: a
# decision is stale only when another one (or an outcome) changed the same
# customer's contact history between its read and its write.
OPTIMISTIC_ATTEMPTS = 2


@dataclass(frozen=True)
class RecommendQuery:
    customer: CustomerKey
    # The request channel, lower case ("web"); "" when unspecified.
    channel: str = ""
    channel_number: int = 0
    context: Mapping[str, PlainValue] = field(default_factory=dict)
    context_features: Mapping[str, float] = field(default_factory=dict)
    ticket_id: str = ""
    # Policy kind names; empty: every kind.
    kinds: frozenset[str] = frozenset()
    # Contact channel names; empty: any.
    contact_channels: frozenset[str] = frozenset()
    # 0: the policy's.
    max_actions: int = 0
    dry_run: bool = False
    idempotency_key: str = ""
    # SHA-256 of the request without its key: what the key is bound to.
    request_sha256: bytes = b""


@dataclass(frozen=True)
class Proposed:
    action_id: str
    rank: int
    kind: str
    action_name: str
    offer_id: str
    product_id: str
    ticket_id: str
    channel: str | None
    expected_value: Decimal
    priority: str
    reasons: tuple[Reason, ...]
    prediction_index: int | None
    display_text: str
    valid_until: datetime | None


@dataclass(frozen=True)
class Withheld:
    kind: str
    action_name: str
    offer_id: str
    product_id: str
    ticket_id: str
    channel: str | None
    # SuppressionReason names without their prefix, in that enum's order.
    reasons: tuple[str, ...]
    detail: str
    suppressed_until: datetime | None
    expected_value: Decimal


@dataclass(frozen=True)
class DecisionDraft:
    """Everything behind one decision, before it is encoded for the log."""

    decision_id: str  # "" for a dry run
    customer_id: str
    decided_at: datetime
    policy_version: str
    currency: str
    query: RecommendQuery
    scores: Scores
    actions: tuple[Proposed, ...]
    withheld: tuple[Withheld, ...]


class ContactRules(Protocol):
    """The contact area's gate (contact/service.py ContactGate)."""

    async def assess(
        self,
        conn: Connection,
        customer_id: str,
        candidates: Sequence[Candidate],
        preferences: ContactPreferences | None,
        policy: Policy,
        *,
        time_zone: str | None,
        open_tickets: float | None,
        now: datetime,
    ) -> list[Verdict]: ...

    async def record(
        self,
        conn: Connection,
        customer_id: str,
        decision_id: str,
        proposed: Sequence[tuple[str, Verdict]],
        now: datetime,
    ) -> None: ...


class Database(Protocol):
    """What the service needs of the pool: a connection (asyncpg's Pool)."""

    def acquire(self) -> Any: ...


@dataclass
class _Candidate:
    action: ActionSpec
    product_id: str
    prediction: Prediction | None
    propensity: float
    expected_value: Decimal
    priority: str
    contact: Candidate
    blocks: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail)


class _KeyTaken(Exception):
    """Another call bound the idempotency key first (the transaction rolls back)."""


def condition_holds(condition: Condition, value: PlainValue | None) -> bool:
    """One eligibility test (policy/model.py's Condition). A missing value
    fails every test except `missing: true`."""
    if condition.missing is not None:
        return (value is None) == condition.missing
    if value is None:
        return False
    if condition.equals is not None:
        equal = (
            value == condition.equals
            if isinstance(condition.equals, bool) or isinstance(value, bool)
            else str(value) == str(condition.equals)
            if isinstance(condition.equals, str) or isinstance(value, str)
            else float(value) == float(condition.equals)  # type: ignore[arg-type]
        )
        if not equal:
            return False
    if condition.one_of is not None and str(value) not in condition.one_of:
        return False
    if condition.not_one_of is not None and str(value) in condition.not_one_of:
        return False
    bounds = (condition.lt, condition.le, condition.gt, condition.ge)
    if any(b is not None for b in bounds):
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        x = float(value)
        if condition.lt is not None and not x < condition.lt:
            return False
        if condition.le is not None and not x <= condition.le:
            return False
        if condition.gt is not None and not x > condition.gt:
            return False
        if condition.ge is not None and not x >= condition.ge:
            return False
    return True


def _condition_value(
    condition: Condition, scores: Scores, customer: CustomerView, context: Mapping[str, PlainValue]
) -> PlainValue | None:
    if condition.feature is not None:
        return scores.feature(condition.feature)
    if condition.context is not None:
        return context.get(condition.context)
    if condition.profile is not None:
        return customer.profile_value(condition.profile)
    return None


async def _both(first: Awaitable[T], second: Awaitable[Any]) -> tuple[T, Any]:
    """Runs two calls at once; the first failure cancels the other and is raised."""
    a = asyncio.ensure_future(first)
    b = asyncio.ensure_future(second)
    done, pending = await asyncio.wait((a, b), return_when=asyncio.FIRST_EXCEPTION)
    for task in pending:
        task.cancel()
    for task in (a, b):
        if task in done and task.exception() is not None:
            for other in pending:
                with contextlib.suppress(BaseException):  # (cancelled: the first error wins)
                    await other
            error = task.exception()
            assert error is not None
            raise error
    return a.result(), b.result()


class DecisionService:
    def __init__(
        self,
        *,
        peers: Peers,
        policies: PolicySource,
        store: DecisionStore,
        contact: ContactRules,
        pool: Database,
        encode: Callable[[DecisionDraft], bytes],
        clock: Clock,
    ) -> None:
        self.peers = peers
        self.policies = policies
        self.store = store
        self.contact = contact
        self.pool = pool
        self.encode = encode
        self.clock = clock

    # --- Recommend ----------------------------------------------------------------------

    async def recommend(self, query: RecommendQuery) -> bytes:
        """The logged decision (a serialized Decision without outcomes); for a
        dry run, the decision as it would have been logged, id empty."""
        if query.idempotency_key and not query.dry_run:
            earlier = await self.store.by_idempotency_key(query.idempotency_key)
            if earlier is not None:
                return self._replay(earlier, query)
        active = self.policies.active()
        policy = active.policy
        actions = self._actions_for(policy, query)
        products = sorted(
            {p for a in actions if a.kind == "cross_sell_offer" for p in self._products(a, policy)}
        )
        # Taken before the peers are asked: the contact history the rules need
        # (since `now` less the policy's longest look-back) is read beside them.
        now = self.clock()
        since = now - history_horizon(policy.contact, policy.actions)
        asked = (
            self.peers.customer(query.customer),
            self.peers.score(
                query.customer,
                ticket_id=query.ticket_id,
                products=products,
                context_features=query.context_features,
                channel=query.channel_number,
            ),
        )
        history: ContactHistory | None = None
        if is_uuid(query.customer.customer_id):
            (customer, scores), history = await _both(
                _both(*asked), self.store.contact_history(query.customer.customer_id, since)
            )
        else:  # (by identifier: the customer's id is identity's answer)
            customer, scores = await _both(*asked)
        if scores.customer_id != customer.customer_id:
            # (merged in between: the survivor scoring named is the customer)
            customer = await self.peers.customer(CustomerKey(customer_id=scores.customer_id))
        candidates = self._candidates(actions, policy, query, customer, scores)
        decision_id = "" if query.dry_run else str(uuid.uuid4())
        for _ in range(OPTIMISTIC_ATTEMPTS):
            if history is None or history.customer_id != customer.customer_id:
                history = await self.store.contact_history(customer.customer_id, since)
            verdicts = self._verdicts(history, customer, scores, policy, candidates, now)
            draft = self._decide(
                decision_id, active.version, policy, query, customer, scores, candidates,
                verdicts, now,
            )  # fmt: skip
            body = self.encode(draft)
            if query.dry_run:
                return body
            committed = await self.store.commit(
                self._record(draft, body, query), _contacts(draft, verdicts), history
            )
            if committed is Committed.WRITTEN:
                return body
            if committed is Committed.ERASED:
                raise NotFound("customer", query.customer.describe())
            if committed is Committed.KEY_TAKEN:
                return await self._replay_winner(query)
            history = None  # (stale: another decision or outcome came first; read again)
        # Still contended: decide under the customer's lock (waits, never stale).
        return await self._decide_locked(
            active.version, policy, query, customer, scores, candidates, decision_id, now
        )

    async def _decide_locked(
        self,
        policy_version: str,
        policy: Policy,
        query: RecommendQuery,
        customer: CustomerView,
        scores: Scores,
        candidates: Sequence[_Candidate],
        decision_id: str,
        now: datetime,
    ) -> bytes:
        """One transaction under the customer's contact lock: history, rules,
        the decision and its contacts (several round trips, never stale)."""
        async with self.pool.acquire() as conn:
            try:
                async with conn.transaction():
                    verdicts = await self._assess(conn, customer, scores, policy, candidates, now)
                    draft = self._decide(
                        decision_id, policy_version, policy, query, customer, scores, candidates,
                        verdicts, now,
                    )  # fmt: skip
                    body = self.encode(draft)
                    written = await self.store.insert(conn, self._record(draft, body, query))
                    if not written:
                        if query.idempotency_key:
                            raise _KeyTaken
                        raise NotFound("customer", query.customer.describe())  # (erased)
                    allowed = {v.candidate.key: v for v in verdicts if v.allowed}
                    await self.contact.record(
                        conn,
                        customer.customer_id,
                        decision_id,
                        [
                            (p.action_id, allowed[_key(p.action_name, p.product_id)])
                            for p in draft.actions
                            if _key(p.action_name, p.product_id) in allowed
                        ],
                        now,
                    )
            except _KeyTaken:
                return await self._replay_winner(query)
        return body

    @staticmethod
    def _record(draft: DecisionDraft, body: bytes, query: RecommendQuery) -> DecisionRecord:
        return DecisionRecord(
            decision_id=draft.decision_id,
            customer_id=draft.customer_id,
            decided_at=draft.decided_at,
            trigger="recommend",
            policy_version=draft.policy_version,
            body=body,
            idempotency_key=query.idempotency_key or None,
            request_sha256=query.request_sha256 if query.idempotency_key else None,
        )

    async def _replay_winner(self, query: RecommendQuery) -> bytes:
        earlier = await self.store.by_idempotency_key(query.idempotency_key)
        if earlier is None:  # (the other call's customer was erased)
            raise NotFound("customer", query.customer.describe()) from None
        return self._replay(earlier, query)

    def _replay(self, earlier: DecisionRecord, query: RecommendQuery) -> bytes:
        if earlier.request_sha256 != query.request_sha256:
            raise InvalidArgument(
                [
                    FieldViolation(
                        "idempotency_key",
                        "already used for another request; use a new key for a new request",
                    )
                ]
            )
        return earlier.body

    @staticmethod
    def _actions_for(policy: Policy, query: RecommendQuery) -> list[ActionSpec]:
        chosen = []
        for action in policy.actions:
            if action.kind == "do_nothing":
                continue
            if query.kinds and action.kind not in query.kinds:
                continue
            # An action limited to some request channels needs the request to name one of them.
            if action.request_channels and query.channel not in action.request_channels:
                continue
            chosen.append(action)
        return chosen

    @staticmethod
    def _products(action: ActionSpec, policy: Policy) -> list[str]:
        return list(action.products) or [p.id for p in policy.catalogue.products]

    def _candidates(
        self,
        actions: Sequence[ActionSpec],
        policy: Policy,
        query: RecommendQuery,
        customer: CustomerView,
        scores: Scores,
    ) -> list[_Candidate]:
        wants_human = customer.preferences.wants_human
        churn = scores.find("churn")
        escalation = scores.find("escalation")
        sales_blocks = arbitration.sales_blocks(
            policy,
            escalation=escalation.probability if escalation else None,
            churn=churn.probability if churn else None,
            features={**scores.customer_features, **scores.ticket_features},
        )
        found: list[_Candidate] = []
        for action in actions:
            channels = tuple(
                c
                for c in action.contact_channels
                if not query.contact_channels or c in query.contact_channels
            )
            if action.contact_channels and not channels:
                continue  # (the request allows none of its channels)
            if not all(
                condition_holds(c, _condition_value(c, scores, customer, query.context))
                for c in action.eligibility
            ):
                continue
            if action.prediction is None:
                driven_by_rules = bool(action.eligibility) or (
                    wants_human and action.kind in HAND_OVER_KINDS
                )
                if not driven_by_rules:
                    continue
                targets: list[tuple[str, Prediction | None]] = [("", None)]
            elif action.prediction == "cross_sell":
                targets = [
                    (p, scores.find("cross_sell", p)) for p in self._products(action, policy)
                ]
            else:
                targets = [("", scores.find(action.prediction))]
            for product_id, prediction in targets:
                if action.prediction is not None and prediction is None:
                    continue  # (not scored: no ticket in hand, or no such product)
                propensity = prediction.probability if prediction is not None else 1.0
                if propensity < action.min_probability:
                    continue
                expected = arbitration.expected_value(action, propensity, policy, product_id)
                candidate = _Candidate(
                    action=action,
                    product_id=product_id,
                    prediction=prediction,
                    propensity=propensity,
                    expected_value=expected,
                    priority=arbitration.priority(action, expected),
                    contact=Candidate(
                        key=_key(action.name, product_id),
                        action_name=action.name,
                        kind=action.kind,
                        contact_channels=channels,
                        automated=action.automated,
                        cool_down=action.cool_down,
                    ),
                )
                if action.team_kind == SALES:
                    candidate.blocks.extend((b.reason, b.detail) for b in sales_blocks)
                if in_control_group(
                    policy.control_salt, customer.customer_id, action.name, action.control_share
                ):
                    candidate.blocks.append(
                        (
                            "control_group",
                            f"held out at random to measure lift "
                            f"({action.control_share:.0%} of customers)",
                        )
                    )
                found.append(candidate)
        return found

    @staticmethod
    def _verdicts(
        history: ContactHistory,
        customer: CustomerView,
        scores: Scores,
        policy: Policy,
        candidates: Sequence[_Candidate],
        now: datetime,
    ) -> list[Verdict]:
        """The contact rules over a history read beforehand (what ContactGate
        applies under the lock, contact/service.py)."""
        open_tickets = scores.feature(policy.contact.open_tickets_feature)
        time_zone = customer.attributes.get("time_zone")
        return contact_rules.assess(
            [c.contact for c in candidates],
            customer.preferences,
            history.entries,
            policy.contact,
            time_zone=time_zone if isinstance(time_zone, str) else None,
            open_tickets=float(open_tickets) if isinstance(open_tickets, int | float) else None,
            now=now,
        )

    async def _assess(
        self,
        conn: Connection,
        customer: CustomerView,
        scores: Scores,
        policy: Policy,
        candidates: Sequence[_Candidate],
        now: datetime,
    ) -> list[Verdict]:
        open_tickets = scores.feature(policy.contact.open_tickets_feature)
        time_zone = customer.attributes.get("time_zone")
        return await self.contact.assess(
            conn,
            customer.customer_id,
            [c.contact for c in candidates],
            customer.preferences,
            policy,
            time_zone=time_zone if isinstance(time_zone, str) else None,
            open_tickets=float(open_tickets) if isinstance(open_tickets, int | float) else None,
            now=now,
        )

    def _decide(
        self,
        decision_id: str,
        policy_version: str,
        policy: Policy,
        query: RecommendQuery,
        customer: CustomerView,
        scores: Scores,
        candidates: Sequence[_Candidate],
        verdicts: Sequence[Verdict],
        now: datetime,
    ) -> DecisionDraft:
        withheld: list[Withheld] = []
        allowed: list[tuple[_Candidate, Verdict]] = []
        for candidate, verdict in zip(candidates, verdicts, strict=True):
            reasons = [r for r, _ in candidate.blocks]
            details = [d for _, d in candidate.blocks]
            if not verdict.allowed:
                reasons += [str(r).lower() for r in verdict.reasons]
                if verdict.detail:
                    details.append(verdict.detail)
            if reasons:
                withheld.append(_withheld(candidate, verdict, query, reasons, "; ".join(details)))
            else:
                allowed.append((candidate, verdict))
        allowed.sort(
            key=lambda cv: arbitration.rank_key(
                cv[1].must_rank_first,
                cv[0].expected_value,
                cv[0].priority,
                cv[0].action.name,
                cv[0].product_id,
            )
        )
        # The policy's most; a request may ask for fewer.
        limit = min(query.max_actions or MAX_ACTIONS, policy.arbitration.max_actions)
        chosen: list[tuple[_Candidate, Verdict]] = []
        kinds_taken: dict[str, _Candidate] = {}
        for candidate, verdict in allowed:
            first = verdict.must_rank_first
            if candidate.expected_value < policy.arbitration.min_expected_value and not first:
                continue  # (not worth it: never proposed)
            winner = kinds_taken.get(candidate.action.kind)
            if winner is not None:
                withheld.append(
                    _withheld(
                        candidate, verdict, query, ["arbitration"],
                        f"{_label(winner)} was chosen for {candidate.action.kind} "
                        f"(expected value {winner.expected_value} >= {candidate.expected_value})",
                    )
                )  # fmt: skip
                continue
            if len(chosen) >= limit:
                withheld.append(
                    _withheld(
                        candidate, verdict, query, ["arbitration"],
                        f"ranked below the {limit} action(s) asked for",
                    )
                )  # fmt: skip
                continue
            kinds_taken[candidate.action.kind] = candidate
            chosen.append((candidate, verdict))
        actions = tuple(
            _proposed(rank, candidate, verdict, policy, query, now)
            for rank, (candidate, verdict) in enumerate(chosen, start=1)
        )
        if not actions:
            actions = (_nothing(policy),)
        return DecisionDraft(
            decision_id=decision_id,
            customer_id=customer.customer_id,
            decided_at=now,
            policy_version=policy_version,
            currency=policy.currency,
            query=query,
            scores=scores,
            actions=actions,
            withheld=tuple(withheld),
        )

    # --- reads --------------------------------------------------------------------------

    async def resolve(self, key: CustomerKey, field_path: str) -> str:
        """The customer's id: as given, or identity's answer for an identifier."""
        if key.customer_id:
            return key.customer_id
        return (await self.peers.customer(key, field_path)).customer_id


def _key(action_name: str, product_id: str) -> str:
    return f"{action_name}:{product_id}" if product_id else action_name


def _contacts(draft: DecisionDraft, verdicts: Sequence[Verdict]) -> list[ProposedContact]:
    """The proposed actions the contact rules allowed (every one but DO_NOTHING)
    as the ledger records them: in-conversation actions too (channel None),
    their cool-downs and rejections count."""
    allowed = {v.candidate.key: v for v in verdicts if v.allowed}
    found = []
    for proposed in draft.actions:
        verdict = allowed.get(_key(proposed.action_name, proposed.product_id))
        if verdict is not None:
            found.append(
                ProposedContact(
                    action_id=proposed.action_id,
                    action_name=verdict.candidate.action_name,
                    action_kind=verdict.candidate.kind,
                    channel=verdict.channel,
                )
            )
    return found


def _label(candidate: _Candidate) -> str:
    name = candidate.action.name
    return f"{name} ({candidate.product_id})" if candidate.product_id else name


_REASON_ORDER = (
    "no_consent",
    "do_not_contact",
    "frequency_cap",
    "cool_down",
    "open_ticket",
    "wants_human",
    "control_group",
    "escalation_open",
    "team_at_capacity",
    "arbitration",
    "quiet_hours",
)


def _withheld(
    candidate: _Candidate, verdict: Verdict, query: RecommendQuery, reasons: list[str], detail: str
) -> Withheld:
    unique = sorted(
        set(reasons), key=lambda r: _REASON_ORDER.index(r) if r in _REASON_ORDER else 99
    )
    return Withheld(
        kind=candidate.action.kind,
        action_name=candidate.action.name,
        offer_id=candidate.action.offer or "",
        product_id=candidate.product_id,
        ticket_id=query.ticket_id if candidate.action.prediction == "escalation" else "",
        channel=verdict.channel,
        reasons=tuple(unique),
        detail=detail,
        suppressed_until=verdict.suppressed_until if not verdict.allowed else None,
        expected_value=candidate.expected_value,
    )


def _proposed(
    rank: int,
    candidate: _Candidate,
    verdict: Verdict,
    policy: Policy,
    query: RecommendQuery,
    now: datetime,
) -> Proposed:
    action = candidate.action
    value, cost = arbitration.value_and_cost(action, policy, candidate.product_id)
    reasons: list[Reason] = []
    if verdict.must_rank_first:
        reasons.append(
            Reason("policy.wants_human", "", None, 0.0, "The customer asked to deal with a person")
        )
    prediction = candidate.prediction
    if prediction is not None:
        reasons.append(
            Reason(
                f"policy.threshold.{prediction.kind}",
                "",
                None,
                0.0,
                f"{prediction.kind} probability {prediction.probability:.2f} >= "
                f"{action.min_probability:.2f}",
            )
        )
    elif action.eligibility:
        reasons.append(Reason("policy.eligibility", "", None, 0.0, "Every eligibility rule holds"))
    reasons.append(
        Reason(
            "policy.expected_value",
            "",
            None,
            0.0,
            f"{candidate.propensity:.2f} x {value} x {action.weight:g} - {cost} = "
            f"{candidate.expected_value} {policy.currency}",
        )
    )
    if prediction is not None:
        reasons.extend(prediction.reasons)
    valid_until: datetime | None = None
    if action.offer:
        offer = next((o for o in policy.catalogue.offers if o.id == action.offer), None)
        if offer is not None and offer.valid_for is not None:
            valid_until = now + offer.valid_for
    return Proposed(
        action_id=f"a{rank}",
        rank=rank,
        kind=action.kind,
        action_name=action.name,
        offer_id=action.offer or "",
        product_id=candidate.product_id,
        ticket_id=query.ticket_id if action.prediction == "escalation" else "",
        channel=verdict.channel,
        expected_value=candidate.expected_value,
        priority=candidate.priority,
        reasons=tuple(reasons),
        prediction_index=prediction.index if prediction is not None else None,
        display_text=action.display_text,
        valid_until=valid_until,
    )


def _nothing(policy: Policy) -> Proposed:
    spec = next((a for a in policy.actions if a.kind == "do_nothing"), None)
    return Proposed(
        action_id="a1",
        rank=1,
        kind="do_nothing",
        action_name=spec.name if spec is not None else "do_nothing",
        offer_id="",
        product_id="",
        ticket_id="",
        channel=None,
        expected_value=Decimal(0),
        priority="low",
        reasons=(
            Reason(
                "policy.nothing_worth_it",
                "",
                None,
                0.0,
                "No action is allowed and worth its cost now",
            ),
        ),
        prediction_index=None,
        display_text=spec.display_text if spec is not None else "",
        valid_until=None,
    )


class RetentionPurge:
    """Deletes decisions older than the retention horizon, every `interval_s`
    (the first purge at start), on the service's clock."""

    def __init__(
        self, store: DecisionStore, retention: timedelta, interval_s: float, clock: Clock
    ) -> None:
        self.store = store
        self.retention = retention
        self.interval_s = interval_s
        self.clock = clock
        self._periodic = Periodic("decision retention purge", interval_s, self.purge_once)

    async def purge_once(self) -> int:
        purged = await self.store.purge(self.clock() - self.retention)
        if purged:
            logger.info("purged %d decisions past retention", purged)
        return purged

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        await self._periodic.close()


@dataclass(frozen=True)
class FixedPolicy:
    """A policy that never changes (tests; the default until the policy area's
    book is wired)."""

    policy: ActivePolicy

    def active(self) -> ActivePolicy:
        return self.policy

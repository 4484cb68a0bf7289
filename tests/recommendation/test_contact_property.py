"""The contact policy, never broken: a property-based test (hypothesis, with a
controllable clock).

Level 1, the rules and the ledger (fast, many examples): generated contact
rules and generated sequences of clock moves, tickets opened and resolved,
preference changes (consent per channel, do-not-contact, preferred channel,
wants a human, unreadable preferences), time-zone changes, outcomes (declined,
not delivered, accepted) and decisions. Each decision runs as the decisions
side runs it: the customer's lock, the history from the real ledger
(PostgreSQL), the rules, the proposals recorded in the same transaction. Every
verdict is checked against an oracle written here from the README's meaning
of the rules, over the test's own log of what was proposed: nothing allowed
breaks consent, do-not-contact, a cap, a cool-down, quiet hours, the open
ticket rule or wants-a-human, the hand-over ranks first, and nothing is
withheld that the rules allow (the channel is the first allowed one).

Level 2 (below), end to end through the real services: Recommend on the real
recommendation service with identity, interactions and scoring running,
preferences changed with UpdateContactPreferences, outcomes with
RecordOutcome, the service's ManualClock moved between calls.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, time, timedelta
from importlib.resources import files
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from converge.recommendation.contact.convert import channel_name
from converge.recommendation.contact.rules import (
    Candidate,
    Consent,
    ContactPreferences,
    Suppression,
    Verdict,
)
from converge.recommendation.contact.service import ContactGate
from converge.recommendation.contact.store import ContactLedger
from converge.recommendation.decisions.service import FixedPolicy
from converge.recommendation.policy.model import (
    ActionSpec,
    ActivePolicy,
    ContactRules,
    FrequencyCap,
    Policy,
    QuietHours,
)
from converge.runtime.database import create_pool, load_migrations, migrate
from converge.runtime.values import timestamp
from converge.v1 import common_pb2, recommendation_pb2
from tests.conftest import Platform
from tests.interactions.builders import interaction, record, text
from tests.recommendation.conftest import StartRecommendation, make_customer, set_preferences

CHANNELS = ("email", "sms", "phone", "push", "in_app")
ZONES = (
    "Europe/Paris",
    "America/New_York",
    "Asia/Kolkata",  # +05:30
    "Australia/Lord_Howe",  # a 30-minute DST shift
    "Pacific/Chatham",  # +12:45 / +13:45
    "Mars/Olympus",  # not a zone: the policy's default applies
)
# Near Europe's spring DST change, so generated clock moves cross it.
START = datetime(2026, 3, 27, 18, 0, tzinfo=UTC)
OFFER_KINDS = {"retention_offer", "cross_sell_offer"}
HAND_OVERS = {"escalate_to_human", "escalate_to_senior_agent"}


def actions(cool_down_hours: list[int | None]) -> list[ActionSpec]:
    """A policy's actions like the default policy's, cool-downs generated."""
    c = [timedelta(hours=h) if h is not None else None for h in cool_down_hours]
    return [
        ActionSpec(name="retention", kind="retention_offer", contact_channels=["email", "in_app"],
                   cool_down=c[0]),
        ActionSpec(name="call", kind="proactive_support_call", contact_channels=["phone"],
                   cool_down=c[1]),
        ActionSpec(name="cross_sell", kind="cross_sell_offer", contact_channels=["in_app", "email"],
                   automated=True, cool_down=c[2]),
        ActionSpec(name="reminder", kind="proactive_support_call", contact_channels=["sms", "push"],
                   automated=True, cool_down=c[3]),
        # One channel each and no cool-down: contacts on several channels, so
        # the "any" caps count across them.
        ActionSpec(name="mail", kind="proactive_support_call", contact_channels=["email"]),
        ActionSpec(name="text", kind="proactive_support_call", contact_channels=["sms"]),
        ActionSpec(name="senior", kind="escalate_to_senior_agent", cool_down=c[4]),
        ActionSpec(name="human", kind="escalate_to_human"),
        ActionSpec(name="bot_offer", kind="retention_offer", automated=True),
        ActionSpec(name="do_nothing", kind="do_nothing"),
    ]  # fmt: skip


quarter_hours = st.integers(0, 95).map(lambda q: time(q // 4, q % 4 * 15))
caps = st.builds(
    FrequencyCap,
    channel=st.sampled_from([*CHANNELS, "any"]),
    max_contacts=st.integers(0, 3),
    window=st.integers(1, 240).map(lambda h: timedelta(hours=h)),
)
contact_rules = st.builds(
    ContactRules,
    frequency_caps=st.lists(caps, max_size=4),
    cool_down_after_rejection=st.integers(1, 720).map(lambda h: timedelta(hours=h)),
    quiet_hours=st.none()
    | st.builds(
        QuietHours,
        start=quarter_hours,
        end=quarter_hours,
        channels=st.lists(st.sampled_from(CHANNELS), unique=True),
    ),
    default_time_zone=st.sampled_from(ZONES[:3]),
    suppress_offers_while_ticket_open=st.booleans(),
)
policies = st.builds(
    lambda rules, cool_downs: Policy(actions=actions(cool_downs), contact=rules),
    contact_rules,
    st.lists(st.none() | st.integers(1, 200), min_size=5, max_size=5),
)

# One step of a customer's life.
steps = st.one_of(
    st.tuples(st.just("advance"), st.integers(1, 3 * 24 * 60)),  # minutes
    st.tuples(st.just("ticket"), st.sampled_from(["opened", "resolved"])),
    st.tuples(
        st.just("consent"),
        st.sampled_from(CHANNELS),
        st.sampled_from(list(Consent)),
    ),
    st.tuples(st.just("do_not_contact"), st.booleans()),
    st.tuples(st.just("wants_human"), st.booleans()),
    st.tuples(st.just("preferred"), st.none() | st.sampled_from(CHANNELS)),
    st.tuples(st.just("readable"), st.booleans()),
    st.tuples(st.just("time_zone"), st.none() | st.sampled_from(ZONES)),
    st.tuples(
        st.just("outcome"),
        st.integers(0, 1000),
        st.sampled_from(["declined", "not_delivered", "accepted"]),
    ),
    st.tuples(st.just("advance"), st.integers(1, 12 * 60)),
)
# Each step of the script is a life event, then a decision proposing at most
# that many of the allowed actions (0: no decision after it).
script_steps = st.tuples(steps, st.integers(0, 3))


@dataclass
class Proposal:
    """What the test itself remembers of a proposal (its own log, not the ledger)."""

    decision_id: str
    action_id: str
    action: str
    channel: str | None
    at: datetime
    declined_at: datetime | None = None
    not_delivered: bool = False


@dataclass
class World:
    now: datetime = START
    open_tickets: int = 0
    preferences: ContactPreferences = field(default_factory=ContactPreferences)
    readable: bool = True
    time_zone: str | None = None
    log: list[Proposal] = field(default_factory=list)


# --- the oracle: the README's rules, written again over the test's own log ----------


def _zone(world: World, rules: ContactRules) -> ZoneInfo:
    for name in (world.time_zone, rules.default_time_zone):
        if name and name != "Mars/Olympus":
            return ZoneInfo(name)
    raise AssertionError("the generated default zones are real")


def _quiet(rules: ContactRules, world: World, channel: str) -> bool:
    quiet = rules.quiet_hours
    if quiet is None or channel not in quiet.channels or quiet.start == quiet.end:
        return False
    local = world.now.astimezone(_zone(world, rules)).time()
    if quiet.start < quiet.end:
        return quiet.start <= local < quiet.end
    return local >= quiet.start or local < quiet.end


def _counted(world: World) -> list[Proposal]:
    return [p for p in world.log if not p.not_delivered]


def channel_allowed(world: World, rules: ContactRules, channel: str) -> bool:
    prefs = world.preferences
    if not world.readable or prefs.do_not_contact:
        return False
    if prefs.consents.get(channel) is not Consent.GRANTED:
        return False
    for cap in rules.frequency_caps:
        if cap.channel in (channel, "any"):
            sent = [
                p
                for p in _counted(world)
                if p.channel is not None
                and (cap.channel == "any" or p.channel == channel)
                and world.now - cap.window < p.at
            ]
            if len(sent) >= cap.max_contacts:
                return False
    return not _quiet(rules, world, channel)


def action_allowed(world: World, policy: Policy, spec: ActionSpec) -> bool:
    rules = policy.contact
    wants_human = not world.readable or world.preferences.wants_human
    if spec.automated and wants_human:
        return False
    if rules.suppress_offers_while_ticket_open and spec.kind in OFFER_KINDS and world.open_tickets:
        return False
    mine = [p for p in _counted(world) if p.action == spec.name]
    if spec.cool_down is not None and any(world.now - spec.cool_down < p.at for p in mine):
        return False
    rejection = rules.cool_down_after_rejection
    return not any(
        p.declined_at is not None and world.now - rejection < p.declined_at for p in mine
    )


def check(world: World, policy: Policy, verdict: Verdict) -> None:
    """Safety (nothing allowed breaks a rule) and exactness (nothing allowed is
    withheld; the channel is the first allowed one in preference order)."""
    spec = next(a for a in policy.actions if a.name == verdict.candidate.action_name)
    order = list(spec.contact_channels)
    preferred = world.preferences.preferred_channel if world.readable else None
    if preferred in order:
        order.remove(preferred)
        order.insert(0, preferred)
    open_channels = [c for c in order if channel_allowed(world, policy.contact, c)]
    expected = action_allowed(world, policy, spec) and (not order or bool(open_channels))
    where = f"{spec.name} at {world.now.isoformat()}: {verdict}"
    assert verdict.allowed is expected, where
    # What the examples exercised (pytest --hypothesis-show-statistics).
    event(f"{'outbound' if order else 'conversation'} allowed" if verdict.allowed else "withheld")
    for reason in verdict.reasons:
        event(f"withheld {reason.value}")
    if verdict.allowed:
        assert verdict.channel == (open_channels[0] if order else None), where
        assert not verdict.reasons, where
        wants_human = not world.readable or world.preferences.wants_human
        assert verdict.must_rank_first is (wants_human and spec.kind in HAND_OVERS), where
    else:
        assert verdict.reasons, where
        assert verdict.detail, where
        if verdict.suppressed_until is not None:
            assert verdict.suppressed_until > world.now, where
            permanent = {
                Suppression.NO_CONSENT,
                Suppression.DO_NOT_CONTACT,
                Suppression.OPEN_TICKET,
                Suppression.WANTS_HUMAN,
            }
            assert not set(verdict.reasons) <= permanent, where


# --- level 1: rules + ledger --------------------------------------------------------


@pytest.fixture
async def pool(database: str) -> AsyncIterator[asyncpg.Pool]:
    contact = [
        m
        for m in load_migrations(files("converge.recommendation") / "migrations")
        if m.version == 3
    ]
    connection = await asyncpg.connect(database)
    try:
        await migrate(connection, "recommendation", contact)
    finally:
        await connection.close()
    pool = await create_pool(database, "recommendation", application_name="test", max_size=2)
    yield pool
    await pool.close()


async def play(
    pool: asyncpg.Pool,
    policy: Policy,
    script: list[tuple[tuple[Any, ...], int]],
    granted: bool = False,
) -> int:
    """Plays one customer's life; checks every verdict; how many decisions."""
    ledger = ContactLedger(pool)
    gate = ContactGate(ledger)
    customer = str(uuid.uuid4())  # a new customer per example: the ledger is shared
    world = World()
    if granted:  # else consent comes only from the script's steps
        world.preferences = ContactPreferences(consents=dict.fromkeys(CHANNELS, Consent.GRANTED))
    candidates = [Candidate.of(a) for a in policy.actions]
    decisions = 0
    for step, proposals in script:
        kind = step[0]
        prefs = world.preferences
        if kind == "advance":
            world.now += timedelta(minutes=step[1])
        elif kind == "ticket":
            world.open_tickets = max(0, world.open_tickets + (1 if step[1] == "opened" else -1))
        elif kind == "consent":
            consents = {**prefs.consents, step[1]: step[2]}
            world.preferences = replace(prefs, consents=consents)
        elif kind == "do_not_contact":
            world.preferences = replace(prefs, do_not_contact=step[1])
        elif kind == "wants_human":
            world.preferences = replace(prefs, wants_human=step[1])
        elif kind == "preferred":
            world.preferences = replace(prefs, preferred_channel=step[1])
        elif kind == "readable":
            world.readable = step[1]
        elif kind == "time_zone":
            world.time_zone = step[1]
        elif kind == "outcome" and world.log:
            proposal = world.log[step[1] % len(world.log)]
            async with pool.acquire() as conn:
                await ledger.mark_outcome(
                    conn, proposal.decision_id, proposal.action_id, step[2], world.now
                )
            if step[2] == "declined":
                proposal.declined_at = max(proposal.declined_at or world.now, world.now)
            elif step[2] == "not_delivered":
                proposal.not_delivered = True
        if proposals:
            decisions += 1
            decision_id = str(uuid.uuid4())  # unique in the shared ledger
            async with pool.acquire() as conn, conn.transaction():
                verdicts = await gate.assess(
                    conn, customer, candidates, world.preferences if world.readable else None,
                    policy, time_zone=world.time_zone, open_tickets=world.open_tickets,
                    now=world.now,
                )  # fmt: skip
                for verdict in verdicts:
                    check(world, policy, verdict)
                # The decisions side proposes the best few: here the first allowed.
                chosen = [v for v in verdicts if v.allowed][:proposals]
                proposed = [(f"a{n}", v) for n, v in enumerate(chosen)]
                await gate.record(conn, customer, decision_id, proposed, world.now)
            world.log += [
                Proposal(decision_id, action_id, v.candidate.action_name, v.channel, world.now)
                for action_id, v in proposed
            ]
    return decisions


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    policy=policies, script=st.lists(script_steps, min_size=1, max_size=30), granted=st.booleans()
)
async def test_no_decision_ever_breaks_the_contact_policy(
    pool: asyncpg.Pool, policy: Policy, script: list[tuple[tuple[Any, ...], int]], granted: bool
) -> None:
    decisions = await play(pool, policy, script, granted)
    event("decisions: " + ("none" if not decisions else "1-3" if decisions < 4 else "4 or more"))


# --- level 2: end to end through the real services ------------------------------------

E2E_POLICY = Policy.model_validate(
    {
        "catalogue": {
            "offers": [{"id": "credit", "value": 100, "cost": 1}],
            "products": [{"id": "storage", "value": 100, "cost": 1}],
        },
        # min_probability 0 and positive values: every action is a candidate
        # whatever scoring's rule fallback answers, so the contact rules decide.
        "actions": [
            {"name": "retention", "kind": "retention_offer", "prediction": "churn",
             "offer": "credit", "contact_channels": ["sms", "phone", "email"]},
            {"name": "cross_sell", "kind": "cross_sell_offer", "prediction": "cross_sell",
             "products": ["storage"], "contact_channels": ["email", "sms"], "cool_down": "PT6H"},
            {"name": "nudge", "kind": "proactive_support_call", "prediction": "churn",
             "value": 100, "cost": 1, "contact_channels": ["push", "in_app"], "automated": True},
            {"name": "bot_chat", "kind": "proactive_support_call", "prediction": "churn",
             "value": 100, "cost": 1, "automated": True},
            {"name": "hand_over", "kind": "escalate_to_human", "value": 50, "cost": 10},
            {"name": "do_nothing", "kind": "do_nothing"},
        ],
        "arbitration": {"max_actions": 4, "complaints_feature": None,
                        "retention_first_churn_probability": 1.0,
                        "serious_escalation_probability": 1.0},
        "contact": {
            "frequency_caps": [
                {"channel": "email", "max_contacts": 2, "window": "P2D"},
                {"channel": "sms", "max_contacts": 1, "window": "PT12H"},
                {"channel": "any", "max_contacts": 3, "window": "P1D"},
            ],
            "cool_down_after_rejection": "P1D",
            "quiet_hours": {"start": "21:00", "end": "08:00", "channels": ["sms", "phone", "push"]},
            "default_time_zone": "Europe/Paris",
        },
    }
)  # fmt: skip
E2E_ACTIONS = {a.name: a for a in E2E_POLICY.actions}

e2e_steps = st.one_of(
    st.tuples(st.just("advance"), st.integers(1, 36 * 60)),
    st.tuples(st.just("consent"), st.sampled_from(CHANNELS), st.booleans()),
    st.tuples(st.just("do_not_contact"), st.booleans()),
    st.tuples(st.just("wants_human"), st.booleans()),
    st.tuples(st.just("ticket"), st.booleans()),  # opened / the open one resolved
    st.tuples(st.just("outcome"), st.integers(0, 100), st.sampled_from(["declined", "not_delivered"])),
)  # fmt: skip


def check_answer(
    world: World,
    answer: recommendation_pb2.RecommendResponse,
    open_tickets: int,
    wants_human: bool,
    dnc: bool,
) -> None:
    """Safety only (what scoring proposes is not the oracle's business):
    nothing the service proposed breaks a promise."""
    rules = E2E_POLICY.contact
    where = f"at {world.now.isoformat()}: {answer}"
    assert answer.actions, where
    handed_over = [p for p in _counted(world) if p.action == "hand_over"]
    rejection = rules.cool_down_after_rejection
    hand_over_declined = any(
        p.declined_at is not None and world.now - rejection < p.declined_at for p in handed_over
    )
    if wants_human and not hand_over_declined:
        assert answer.actions[0].action_name == "hand_over", where
    for action in answer.actions:
        spec = E2E_ACTIONS[action.action_name]
        assert not (wants_human and spec.automated), where
        assert not (open_tickets and spec.kind in OFFER_KINDS), where
        mine = [p for p in _counted(world) if p.action == spec.name]
        if spec.cool_down is not None:
            assert not any(world.now - spec.cool_down < p.at for p in mine), where
        rejection = rules.cool_down_after_rejection
        assert not any(
            p.declined_at is not None and world.now - rejection < p.declined_at for p in mine
        ), where
        channel = channel_name(action.contact_channel)
        assert (channel is None) is (not spec.contact_channels), where
        if channel is not None:
            assert not dnc, where
            assert channel_allowed(world, rules, channel), where


@settings(
    max_examples=int(os.environ.get("CONVERGE_CONTACT_E2E_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    script=st.lists(st.tuples(e2e_steps, st.booleans()), min_size=1, max_size=12),
    time_zone=st.none() | st.sampled_from(ZONES[:3]),
    granted=st.booleans(),
)
async def test_no_recommendation_ever_breaks_the_contact_policy_end_to_end(
    platform: Platform,
    start_recommendation: StartRecommendation,
    script: list[Any],
    time_zone: str | None,
    granted: bool,
) -> None:
    """Real Recommend, identity, interactions and scoring; preferences changed
    through UpdateContactPreferences, outcomes through RecordOutcome, the
    service's ManualClock moved between calls. (One service for every
    example: each example is a new customer.)"""
    service = _E2E_SERVICES.get(id(start_recommendation))
    if service is None:
        service = await start_recommendation(policy=FixedPolicy(ActivePolicy("e2e", E2E_POLICY)))
        _E2E_SERVICES[id(start_recommendation)] = service
    pb = recommendation_pb2
    numbers = {
        name: common_pb2.ContactChannel.Value(f"CONTACT_CHANNEL_{name.upper()}")
        for name in CHANNELS
    }
    tag = uuid.uuid4().hex[:10]
    # Every channel granted from the start, or none (consent comes from the steps).
    consents = None if granted else {}
    customer = await make_customer(platform, tag, consents=consents, time_zone=time_zone)
    # Outcomes become interactions at the service's clock, which interactions
    # refuses in its future: each example's life starts 20 days back (at most
    # 12 moves of 36 hours follow). Moving the clock back between examples is
    # harmless: each example is a new customer.
    service.clock.now = datetime.now(UTC) - timedelta(days=20)
    world = World(now=service.clock.now, time_zone=time_zone)
    if granted:
        world.preferences = ContactPreferences(consents=dict.fromkeys(CHANNELS, Consent.GRANTED))
    dnc = wants_human = False
    tickets: list[str] = []
    opened = 0
    for step, decide in script:
        kind = step[0]
        if kind == "advance":
            service.clock.advance(minutes=step[1])
            world.now = service.clock.now
        elif kind == "consent":
            await set_preferences(
                platform, customer.customer_id, consents={numbers[step[1]]: step[2]}
            )
            consents = {
                **world.preferences.consents,
                step[1]: Consent.GRANTED if step[2] else Consent.DENIED,
            }
            world.preferences = replace(world.preferences, consents=consents)
        elif kind == "do_not_contact":
            await set_preferences(platform, customer.customer_id, do_not_contact=step[1])
            dnc = step[1]
            world.preferences = replace(world.preferences, do_not_contact=dnc)
        elif kind == "wants_human":
            await set_preferences(platform, customer.customer_id, wants_human=step[1])
            wants_human = step[1]
            world.preferences = replace(world.preferences, wants_human=wants_human)
        elif kind == "ticket":
            opening = step[1] or not tickets
            opened += opening
            ticket = f"T-{tag}-{opened}" if opening else tickets.pop()
            if opening:
                tickets.append(ticket)
            await platform.interactions.RecordInteraction(record(interaction(
                customer.ref, "ticket.opened" if opening else "ticket.resolved",
                at=datetime.now(UTC), ticket_id=ticket,
                attributes={"priority": text("normal")} if opening else None,
            )))  # fmt: skip
        elif kind == "outcome" and world.log:
            proposal = world.log[step[1] % len(world.log)]
            outcome = (
                pb.ACTION_OUTCOME_DECLINED
                if step[2] == "declined"
                else pb.ACTION_OUTCOME_NOT_DELIVERED
            )
            await service.stub.RecordOutcome(pb.RecordOutcomeRequest(
                decision_id=proposal.decision_id, action_id=proposal.action_id,
                outcome=outcome, occurred_at=timestamp(world.now),
            ))  # fmt: skip
            if step[2] == "declined":
                proposal.declined_at = max(proposal.declined_at or world.now, world.now)
            else:
                proposal.not_delivered = True
        if decide:
            answer = await service.stub.Recommend(
                pb.RecommendRequest(customer=customer.ref, channel=common_pb2.CHANNEL_WEB)
            )
            check_answer(world, answer, len(tickets), wants_human, dnc)
            for action in answer.actions:
                if action.kind != pb.ACTION_KIND_DO_NOTHING:
                    world.log.append(Proposal(
                        answer.decision_id, action.action_id, action.action_name,
                        channel_name(action.contact_channel), world.now,
                    ))  # fmt: skip


_E2E_SERVICES: dict[int, Any] = {}

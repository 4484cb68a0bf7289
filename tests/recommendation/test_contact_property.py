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

from converge.recommendation.contact.rules import (
    Candidate,
    Consent,
    ContactPreferences,
    Suppression,
    Verdict,
)
from converge.recommendation.contact.service import ContactGate
from converge.recommendation.contact.store import ContactLedger
from converge.recommendation.policy.model import (
    ActionSpec,
    ContactRules,
    FrequencyCap,
    Policy,
    QuietHours,
)
from converge.runtime.database import create_pool, load_migrations, migrate

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

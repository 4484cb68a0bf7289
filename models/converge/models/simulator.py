"""A customer world for demos, tests and benchmarks, with its ground truth.

`simulate(customers, seed, start, end)` returns a `World`: every customer has
hidden traits (engagement, satisfaction, price sensitivity, an affinity per
product, support-proneness) and a profile (segment, plan, region, signup
date, owner team, custom attribute `contract`), and the traits drive
interactions of the built-in types with valid attributes:

- **churn** is a latent process: a customer starts "leaving" at a daily
  hazard set by the traits and the contract (about 3% of customers a month),
  and cancels every held product (`subscription.cancelled`) after a lag of 14
  to 56 days; meanwhile logins and feature uses fade (to 15%), sentiment,
  NPS and complaints worsen, payment failures rise, a third downgrade their
  plan, and tickets come more often;
- **tickets** (`ticket.opened` with priority, category, channel and
  `sla_due_at`; updates, reassignments, conversations about them with
  sentiment, `ticket.resolved`, CSAT/CES/NPS after): each ticket escalates
  with a hidden probability set by its priority and the customer (about 15%
  overall), after an exponential time (mean 30 h); escalated tickets breach
  their SLA with probability 0.6 a few hours later and are reassigned more;
- **cross-sell**: for a product not held, an "interest" episode starts at a
  rate set by the customer's affinity for it (product uses of its feature
  and marketing clicks rise), and ends, with probability 0.6, in a
  `subscription.started` and a `purchase` of the product after 3 to 25 days
  (a few % of (customer, product) pairs per 14 days); plans go up with some
  purchases.

Everything also has noise: conversations, complaints, surveys, marketing
sends/opens/clicks and payment failures at base rates.

Ground truth (`World.truth`): per customer the daily hazard of starting to
leave, the leaving and churn days; per ticket its escalation probability and
outcome; per (customer, product) the interest onset, completion and purchase
day. `churn_probability`, `escalation_probability` and
`cross_sell_probability` give the true probability of each label at a cutoff
from the hidden state (what an oracle that sees the traits could know), so
tests can compare a model's AUC with the best attainable.

Size and speed: customers are generated in chunks of `CHUNK` (numpy, every
process vectorised); `World.chunk(i)` regenerates chunk i deterministically
from (seed, i) and `World.events()` iterates them, so a million customers
never need to be in memory at once. Deterministic per seed.

Feeding (`feed`): each customer is resolved in identity by its CRM id
(`sim-<seed>-<index>`, BulkResolve with the initial profile; plan changes
follow with UpdateCustomer at their effective time) and its interactions are
sent with IngestInteractions in messages of 500 rows, each addressed by the
customer id identity returned (so the interactions service never creates
customers itself).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import numpy.typing as npt

from converge.features.engine import PRIORITIES, TICKET_CATEGORIES, Event

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

CHUNK = 20_000
PRODUCTS: tuple[str, ...] = ("tv", "phone", "internet", "cloud")
PRODUCT_FEATURE: tuple[str, ...] = ("streaming", "calling", "bandwidth", "storage")
PRICES = np.array([35.0, 20.0, 45.0, 10.0])
SEGMENTS = ("consumer", "smb", "enterprise")
PLANS = ("basic", "plus", "pro")
REGIONS = ("north", "south", "east", "west")
TEAMS = ("care", "growth", "retention", "enterprise")
CONTRACTS = ("month-to-month", "one_year", "two_year")
CONTRACT_HAZARD = np.array([1.8, 0.6, 0.25])
SLA_HOURS = np.array([120.0, 72.0, 24.0, 4.0])  # by priority low .. urgent
FEATURES_OTHER = ("dashboard", "reports", "api")
COMPLAINTS = ("billing", "service", "network")

# Latent processes (days).
CHURN_BASE_HAZARD = 0.0006
CHURN_LAG = (14.0, 56.0)
INTEREST_BASE_RATE = 0.008
INTEREST_LAG = (3.0, 25.0)
INTEREST_COMPLETES = 0.6
# Tickets (hours).
ESCALATION_MEAN_H = 30.0
RESOLUTION_MEAN_H = 30.0
BREACH_AFTER_ESCALATION = 0.6
BREACH_DELAY_MEAN_H = 3.0

# Channels (`converge.v1.Channel` numbers).
WEB, MOBILE, EMAIL, CHAT, PHONE, SERVICE_DESK, PRODUCT = 1, 2, 3, 4, 5, 8, 9

# Event type codes.
TYPES: tuple[str, ...] = (
    "ticket.opened",  # 0
    "ticket.updated",  # 1
    "ticket.reassigned",  # 2
    "ticket.escalated",  # 3
    "ticket.resolved",  # 4
    "ticket.sla_breached",  # 5
    "conversation.chat",  # 6
    "conversation.call",  # 7
    "conversation.email",  # 8
    "survey.nps",  # 9
    "survey.csat",  # 10
    "survey.ces",  # 11
    "product.login",  # 12
    "product.usage",  # 13
    "purchase",  # 14
    "subscription.started",  # 15
    "subscription.downgraded",  # 16
    "subscription.cancelled",  # 17
    "payment.failed",  # 18
    "complaint",  # 19
    "marketing.sent",  # 20
    "marketing.opened",  # 21
    "marketing.clicked",  # 22
)
T = {name: i for i, name in enumerate(TYPES)}
_US_PER_DAY = 86_400_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _sigmoid(x: FloatArray) -> FloatArray:
    return np.asarray(1.0 / (1.0 + np.exp(-x)), dtype=np.float64)


def _micros(at: datetime) -> int:
    return (at - _EPOCH) // timedelta(microseconds=1)


def _at(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


@dataclass
class Events:
    """Columnar interactions of one chunk, sorted by (customer, time).

    `customer` is the customer's index in the world; `code` is the type's
    small attribute (priority, category, feature, direction, campaign ...)
    and `value` its number (a survey score, a quantity, `sla_due_at` in
    microseconds): `to_events` turns them into attributes."""

    customer: IntArray
    at_us: IntArray
    type: IntArray
    channel: IntArray
    ticket: IntArray  # -1: none
    product: IntArray  # -1: none
    amount: FloatArray  # NaN: none
    sentiment: FloatArray  # NaN: none
    code: IntArray
    value: FloatArray

    def __len__(self) -> int:
        return len(self.customer)

    def take(self, index: npt.NDArray[Any]) -> Events:
        return Events(**{k: v[index] for k, v in self.__dict__.items()})

    @staticmethod
    def concat(parts: Sequence[Events]) -> Events:
        return Events(
            **{
                k: np.concatenate([getattr(p, k) for p in parts])
                for k in Events.__dataclass_fields__
            }
        )


@dataclass(frozen=True)
class PlanChange:
    customer: int
    at: datetime
    plan: str


@dataclass
class Chunk:
    """One chunk of customers: [first, first + n)."""

    first: int
    n: int
    events: Events
    plan_changes: list[PlanChange]
    # Ground truth, indexed by position in the chunk.
    leave_day: FloatArray  # days from start the customer starts leaving
    churn_day: FloatArray  # leave_day + lag; inf when beyond the end
    hazard: FloatArray  # daily hazard of starting to leave
    interest_rate: FloatArray  # (n, products) daily rate of an interest episode
    interest_day: FloatArray  # (n, products) onset (inf: none)
    interest_lag: FloatArray  # (n, products)
    buys: npt.NDArray[np.bool_]  # (n, products) whether the episode ends in a purchase
    held_initially: npt.NDArray[np.bool_]  # (n, products)
    ticket_ids: IntArray  # global ticket numbers of the chunk
    ticket_customer: IntArray
    ticket_opened_us: IntArray
    ticket_probability: FloatArray  # probability the ticket escalates at all
    ticket_escalated_us: IntArray  # -1: never
    ticket_breached_us: IntArray  # -1: never
    ticket_resolved_us: IntArray


@dataclass
class World:
    """The simulated customers; events are generated per chunk, on demand."""

    customers: int
    seed: int
    start: datetime
    end: datetime
    segment: IntArray
    plan: IntArray
    region: IntArray
    team: IntArray
    contract: IntArray
    signup: list[datetime]
    traits: dict[str, FloatArray]
    _cache: dict[int, Chunk] = field(default_factory=dict, repr=False)
    keep_chunks: bool = True

    @property
    def days(self) -> float:
        return (self.end - self.start) / timedelta(days=1)

    @property
    def n_chunks(self) -> int:
        return (self.customers + CHUNK - 1) // CHUNK

    def crm_id(self, index: int) -> str:
        return f"sim-{self.seed}-{index}"

    def chunk(self, i: int) -> Chunk:
        if i in self._cache:
            return self._cache[i]
        chunk = _simulate_chunk(self, i)
        if self.keep_chunks:
            self._cache[i] = chunk
        return chunk

    def chunks(self) -> Iterator[Chunk]:
        for i in range(self.n_chunks):
            yield self.chunk(i)

    def profile(self, index: int) -> dict[str, Any]:
        """The initial profile of a customer (plan changes: `plan_changes`)."""
        return {
            "segment": SEGMENTS[self.segment[index]],
            "plan": PLANS[self.plan[index]],
            "region": REGIONS[self.region[index]],
            "owner_team": TEAMS[self.team[index]],
            "signup_date": self.signup[index],
            "attributes": {"contract": CONTRACTS[self.contract[index]]},
        }

    def profile_history(self, index: int) -> list[tuple[datetime, dict[str, Any]]]:
        """(effective from, profile) for one customer, oldest first."""
        chunk = self.chunk(index // CHUNK)
        history = [(self.signup[index], self.profile(index))]
        for change in chunk.plan_changes:
            if change.customer == index:
                history.append((change.at, {**history[-1][1], "plan": change.plan}))
        return history

    def profile_histories(self) -> dict[str, list[tuple[datetime, dict[str, Any]]]]:
        """Every customer's profile history, keyed by CRM id."""
        out: dict[str, list[tuple[datetime, dict[str, Any]]]] = {}
        for chunk in self.chunks():
            out.update(self.chunk_profile_histories(chunk))
        return out

    def chunk_profile_histories(
        self, chunk: Chunk
    ) -> dict[str, list[tuple[datetime, dict[str, Any]]]]:
        """The profile histories of one chunk's customers, keyed by CRM id."""
        changes: dict[int, list[PlanChange]] = {}
        for change in chunk.plan_changes:
            changes.setdefault(change.customer, []).append(change)
        out: dict[str, list[tuple[datetime, dict[str, Any]]]] = {}
        for index in range(chunk.first, chunk.first + chunk.n):
            history = [(self.signup[index], self.profile(index))]
            for change in sorted(changes.get(index, []), key=lambda c: c.at):
                history.append((change.at, {**history[-1][1], "plan": change.plan}))
            out[self.crm_id(index)] = history
        return out

    def events_by_customer(self) -> dict[str, list[Event]]:
        """Every customer's interactions as the feature engine's `Event`s,
        keyed by CRM id (materialises all chunks: for tests and benchmarks)."""
        out: dict[str, list[Event]] = {}
        for chunk in self.chunks():
            out.update(to_events(self, chunk.events))
        return out

    # --- ground truth ---------------------------------------------------------------

    def _day(self, cutoff: datetime) -> float:
        return (cutoff - self.start) / timedelta(days=1)

    def churn_probability(self, cutoff: datetime, horizon_days: float = 30.0) -> FloatArray:
        """True probability, given the hidden state at `cutoff`, that each
        customer cancels its last product in [cutoff, cutoff + horizon);
        NaN for customers already gone."""
        c = self._day(cutoff)
        out = []
        for chunk in self.chunks():
            out.append(
                _onset_probability(
                    c, horizon_days, chunk.hazard, chunk.leave_day, CHURN_LAG, 1.0, chunk.churn_day
                )
            )
        return np.concatenate(out)

    def cross_sell_probability(self, cutoff: datetime, horizon_days: float = 14.0) -> FloatArray:
        """(customers, products) true probability of buying each product in
        [cutoff, cutoff + horizon) given the hidden state; NaN where the
        customer has already bought it."""
        c = self._day(cutoff)
        out = []
        for chunk in self.chunks():
            done = chunk.interest_day + chunk.interest_lag
            done = np.where(chunk.buys, done, np.inf)
            p = _onset_probability(
                c,
                horizon_days,
                chunk.interest_rate,
                chunk.interest_day,
                INTEREST_LAG,
                INTEREST_COMPLETES,
                done,
                failed=(chunk.interest_day + chunk.interest_lag <= c) & ~chunk.buys,
            )
            # Someone who will churn before the purchase never buys; the oracle
            # knows the leaving state: a leaving customer does not start buying.
            leaving = (chunk.leave_day <= c)[:, None]
            out.append(np.where(leaving & ~np.isnan(p), p * 0.0, p))
        return np.concatenate(out)

    def escalation_probability(self, ticket_numbers: Sequence[int], cutoff: datetime) -> FloatArray:
        """True probability that each ticket escalates or breaches its SLA in
        [cutoff, cutoff + 72 h), given its hidden escalation probability and
        what happened before the cutoff (exponential times: the posterior of
        escalating does not depend on the ticket's age, because escalation
        and resolution times have the same mean)."""
        c_us = _micros(cutoff)
        w = 72.0
        lookup: dict[int, tuple[float, int, int]] = {}
        for chunk in self.chunks():
            for k, t in enumerate(chunk.ticket_ids.tolist()):
                lookup[t] = (
                    float(chunk.ticket_probability[k]),
                    int(chunk.ticket_escalated_us[k]),
                    int(chunk.ticket_breached_us[k]),
                )
        out = np.empty(len(ticket_numbers))
        for i, t in enumerate(ticket_numbers):
            pi, esc, breach = lookup[int(t)]
            if 0 <= esc < c_us:  # escalated already: only a breach can follow
                if 0 <= breach < c_us:
                    out[i] = 0.0
                else:
                    since = (c_us - esc) / 3.6e9
                    pending = BREACH_AFTER_ESCALATION * np.exp(-since / BREACH_DELAY_MEAN_H)
                    out[i] = pending / (pending + 1 - BREACH_AFTER_ESCALATION)
            else:
                out[i] = pi * (1 - np.exp(-w / ESCALATION_MEAN_H))
        return out


def _uniform_cdf(x: FloatArray, lo: float, hi: float) -> FloatArray:
    return np.asarray(np.clip((x - lo) / (hi - lo), 0.0, 1.0), dtype=np.float64)


def _onset_probability(
    c: float,
    w: float,
    rate: FloatArray,
    onset: FloatArray,
    lag: tuple[float, float],
    completes: float,
    done: FloatArray,
    failed: npt.NDArray[np.bool_] | None = None,
) -> FloatArray:
    """P(completion in [c, c + w) | state at c) for a process that starts at
    `rate` per day, completes after a uniform `lag` with probability
    `completes`; NaN where it has already completed."""
    lo, hi = lag
    # Not started yet: integrate over the onset time u in [0, w).
    u: FloatArray = (np.arange(64, dtype=np.float64) + 0.5) * (w / 64)
    rate_: FloatArray = np.asarray(rate, dtype=np.float64)[..., None]
    density: FloatArray = rate_ * np.exp(-rate_ * u)
    not_started = completes * (density * _uniform_cdf(w - u, lo, hi)).sum(-1) * (w / 64)
    # Started at onset <= c, pending: lag > elapsed.
    elapsed = c - onset
    survive = 1 - _uniform_cdf(elapsed, lo, hi)
    within = _uniform_cdf(elapsed + w, lo, hi) - _uniform_cdf(elapsed, lo, hi)
    denominator = completes * survive + (1 - completes)
    with np.errstate(invalid="ignore", divide="ignore"):
        pending = np.where(denominator > 0, completes * within / denominator, 0.0)
    p = np.where(onset > c, not_started, pending)
    if failed is not None:
        p = np.where(failed, 0.0, p)
    return np.where(done < c, np.nan, p)


# --- simulation ---------------------------------------------------------------------


def simulate(customers: int, seed: int, start: datetime, end: datetime) -> World:
    """A world of `customers` (1,000 to 1,000,000) between `start` and `end`
    (tz-aware). Profiles and traits are drawn now; interactions per chunk
    when first asked for."""
    if not 1 <= customers <= 1_000_000:
        raise ValueError("customers must be between 1 and 1,000,000")
    if start.tzinfo is None or end <= start:
        raise ValueError("start must be tz-aware and before end")
    rng = np.random.default_rng([seed, 0])
    n = customers
    traits = {
        "engagement": rng.normal(0, 1, n),
        "satisfaction": rng.normal(0, 1, n),
        "price_sensitivity": rng.normal(0, 1, n),
        "support_proneness": rng.normal(0, 1, n),
    }
    affinity = rng.normal(0, 1, (n, len(PRODUCTS)))
    for k, name in enumerate(PRODUCTS):
        traits[f"affinity_{name}"] = affinity[:, k]
    segment = rng.choice(3, n, p=[0.72, 0.2, 0.08])
    plan_logit = -0.8 * traits["price_sensitivity"] + 0.6 * segment
    plan = np.digitize(plan_logit + rng.normal(0, 0.7, n), [-0.4, 0.8])
    contract = np.digitize(
        0.5 * traits["satisfaction"] + 0.5 * segment + rng.normal(0, 1, n), [0.3, 1.0]
    )
    signup_days = rng.uniform(30, 1500, n)
    signup = [start - timedelta(days=float(d)) for d in signup_days]
    return World(
        customers=n,
        seed=seed,
        start=start,
        end=end,
        segment=segment,
        plan=plan,
        region=rng.choice(4, n),
        team=np.where(segment == 2, 3, rng.choice(3, n)),
        contract=contract,
        signup=signup,
        traits=traits,
    )


def _poisson_times(
    rng: np.random.Generator,
    rate: FloatArray,
    lo: FloatArray,
    hi: FloatArray,
) -> tuple[IntArray, FloatArray]:
    """Events of a Poisson process with per-customer `rate` (per day) on
    [lo, hi): (customer position, time in days)."""
    length = np.maximum(hi - lo, 0.0)
    counts = rng.poisson(rate * length)
    who = np.repeat(np.arange(len(rate)), counts)
    times = lo[who] + rng.random(len(who)) * length[who]
    return who, times


class _Builder:
    def __init__(self, first: int, start_us: int) -> None:
        self.parts: list[Events] = []
        self.first = first
        self.start_us = start_us

    def add(
        self,
        who: IntArray,
        days: FloatArray,
        type_: int | IntArray,
        channel: int | IntArray,
        *,
        ticket: IntArray | int = -1,
        product: IntArray | int = -1,
        amount: FloatArray | float = np.nan,
        sentiment: FloatArray | float = np.nan,
        code: IntArray | int = -1,
        value: FloatArray | float = np.nan,
    ) -> None:
        m = len(who)
        if m == 0:
            return

        def full(x: Any, dtype: Any) -> Any:
            return np.broadcast_to(np.asarray(x, dtype=dtype), (m,)).copy()

        self.parts.append(
            Events(
                customer=(who + self.first).astype(np.int64),
                at_us=(self.start_us + np.round(days * _US_PER_DAY)).astype(np.int64),
                type=full(type_, np.int64),
                channel=full(channel, np.int64),
                ticket=full(ticket, np.int64),
                product=full(product, np.int64),
                amount=full(amount, np.float64),
                sentiment=full(sentiment, np.float64),
                code=full(code, np.int64),
                value=full(value, np.float64),
            )
        )

    def build(self) -> Events:
        events = Events.concat(self.parts)
        order = np.lexsort((events.type, events.at_us, events.customer))
        return events.take(order)


def _simulate_chunk(world: World, index: int) -> Chunk:
    rng = np.random.default_rng([world.seed, 1, index])
    first = index * CHUNK
    n = min(CHUNK, world.customers - first)
    sl = slice(first, first + n)
    e = world.traits["engagement"][sl]
    s = world.traits["satisfaction"][sl]
    p = world.traits["price_sensitivity"][sl]
    q = world.traits["support_proneness"][sl]
    aff = np.stack([world.traits[f"affinity_{k}"][sl] for k in PRODUCTS], axis=1)
    contract = world.contract[sl]
    days = world.days
    start_us = _micros(world.start)
    b = _Builder(first, start_us)
    everyone = np.arange(n)
    zeros = np.zeros(n)
    signup_day = np.array(
        [(world.signup[i] - world.start) / timedelta(days=1) for i in range(sl.start, sl.stop)]
    )

    # Products held at signup.
    base_hold = np.array([0.3, 0.45, 0.7, 0.12])
    held0 = rng.random((n, 4)) < _sigmoid(np.log(base_hold / (1 - base_hold)) + 0.8 * aff)
    none = ~held0.any(axis=1)
    held0[none, 2] = True
    who, prod = np.nonzero(held0)
    b.add(who, signup_day[who], T["subscription.started"], WEB, product=prod, amount=PRICES[prod])

    # Churn: start leaving at a hazard; cancel after a lag.
    hazard = (
        CHURN_BASE_HAZARD
        * np.exp(-0.6 * s - 0.4 * e + 0.4 * p - 0.3 * (held0.sum(1) - 1))
        * CONTRACT_HAZARD[contract]
    )
    leave = -CHURN_LAG[1] + rng.exponential(1.0 / hazard)
    lag = rng.uniform(*CHURN_LAG, n)
    churn = leave + lag
    churn_day = np.where(churn < days, churn, np.inf)
    gone = np.minimum(churn_day, days)  # no activity after churn
    np.clip(leave, 0, days)

    # Cross-sell interest episodes, for products not held initially.
    rate = INTEREST_BASE_RATE * np.exp(0.9 * aff + 0.3 * e[:, None] - 0.3 * p[:, None] - 0.4)
    interest = -INTEREST_LAG[1] + rng.exponential(1.0 / rate)
    interest = np.where(held0, np.inf, interest)
    ilag = rng.uniform(*INTEREST_LAG, (n, 4))
    buys = rng.random((n, 4)) < INTEREST_COMPLETES
    bought = interest + ilag
    # Leaving customers do not start buying; nothing happens after churn.
    buy_ok = buys & (bought >= 0) & (bought < gone[:, None]) & (interest < leave[:, None])
    buy_ok &= np.isfinite(interest)
    who, prod = np.nonzero(buy_ok)
    when = bought[who, prod]
    b.add(who, when, T["subscription.started"], WEB, product=prod, amount=PRICES[prod])
    b.add(
        who, when + 1e-4, T["purchase"], WEB, product=prod,
        amount=np.round(PRICES[prod] * rng.uniform(1.5, 4.0, len(who)), 2),
        value=1.0,
    )  # fmt: skip
    # Interest shows as uses of the product's feature and marketing clicks.
    for k in range(4):
        lo = np.clip(interest[:, k], 0, days)
        hi = np.minimum(np.where(buy_ok[:, k], bought[:, k], interest[:, k] + ilag[:, k]), gone)
        hi = np.where(np.isfinite(interest[:, k]), hi, 0.0)
        w, t = _poisson_times(rng, zeros + 0.3, lo, np.maximum(hi, lo))
        b.add(
            w,
            t,
            T["product.usage"],
            PRODUCT,
            code=10 + k,
            value=rng.integers(1, 5, len(w)).astype(np.float64),
        )
        w, t = _poisson_times(rng, zeros + 0.08, lo, np.maximum(hi, lo))
        b.add(w, t, T["marketing.clicked"], EMAIL, code=k)

    held_final = held0 | buy_ok
    # Cancellations at churn: every product held by then.
    churned = np.isfinite(churn_day)
    for k in range(4):
        had = churned & (held0[:, k] | (buy_ok[:, k] & (bought[:, k] < churn_day)))
        w = everyone[had]
        b.add(w, churn_day[w] + 1e-5 * k, T["subscription.cancelled"], WEB, product=k)
    del held_final

    # Plans: leaving customers often downgrade; some purchases upgrade.
    plan_changes: list[PlanChange] = []
    plan_now = world.plan[sl].copy()
    down = (rng.random(n) < 0.35) & (leave + lag * 0.3 < gone) & (leave + lag * 0.3 >= 0)
    down &= plan_now > 0
    for i in everyone[down]:
        day = leave[i] + lag[i] * rng.uniform(0.1, 0.5)
        if 0 <= day < gone[i]:
            plan_now[i] -= 1
            plan_changes.append(
                PlanChange(
                    int(first + i), world.start + timedelta(days=float(day)), PLANS[plan_now[i]]
                )
            )
            held_k = int(np.flatnonzero(held0[i])[0])
            b.add(np.array([i]), np.array([day]), T["subscription.downgraded"], WEB, product=held_k)
    up_who, up_prod = np.nonzero(buy_ok & (rng.random((n, 4)) < 0.3))
    for i, k in zip(up_who.tolist(), up_prod.tolist(), strict=True):
        if plan_now[i] < 2:
            plan_now[i] += 1
            at = world.start + timedelta(days=float(bought[i, k]) + 0.01)
            plan_changes.append(PlanChange(int(first + i), at, PLANS[plan_now[i]]))

    # Logins and uses: rate by engagement, fading while leaving (thinning).
    def fade(who: IntArray, t: FloatArray) -> FloatArray:
        frac = np.clip((t - leave[who]) / lag[who], 0.0, 1.0)
        return np.asarray(1.0 - 0.85 * frac, dtype=np.float64)

    login_rate = 0.12 * np.exp(0.5 * e)
    w, t = _poisson_times(rng, login_rate, zeros, gone)
    keep = rng.random(len(w)) < fade(w, t)
    w, t = w[keep], t[keep]
    b.add(w, t, T["product.login"], np.where(rng.random(len(w)) < 0.6, MOBILE, WEB))
    w, t = _poisson_times(rng, 0.08 * np.exp(0.5 * e), zeros, gone)
    keep = rng.random(len(w)) < fade(w, t)
    w, t = w[keep], t[keep]
    b.add(
        w,
        t,
        T["product.usage"],
        PRODUCT,
        code=rng.integers(0, 3, len(w)),
        value=rng.integers(1, 5, len(w)).astype(np.float64),
    )

    def leaving_at(who: IntArray, t: FloatArray) -> FloatArray:
        return np.asarray((t >= leave[who]) & (t < churn[who]), dtype=np.float64)

    # Payment failures, complaints, conversations, NPS: worse while leaving.
    w, t = _poisson_times(rng, 0.006 * np.exp(0.6 * p) * 3, zeros, gone)
    keep = rng.random(len(w)) < (1 + 2 * leaving_at(w, t)) / 3
    w, t = w[keep], t[keep]
    bill = (PRICES * held0).sum(1)
    b.add(w, t, T["payment.failed"], WEB, amount=np.round(bill[w], 2), code=0)
    w, t = _poisson_times(rng, 0.002 * np.exp(-0.5 * s) * 4, zeros, gone)
    keep = rng.random(len(w)) < (1 + 3 * leaving_at(w, t)) / 4
    w, t = w[keep], t[keep]
    b.add(
        w, t, T["complaint"], PHONE, code=rng.integers(0, 3, len(w)),
        sentiment=np.clip(np.tanh(-0.8 + 0.3 * s[w] + rng.normal(0, 0.4, len(w))), -1, 1),
    )  # fmt: skip
    w, t = _poisson_times(rng, zeros + 0.02, zeros, gone)
    kind = rng.integers(0, 3, len(w))
    senti = np.tanh(0.5 * s[w] - 1.0 * leaving_at(w, t) + rng.normal(0, 0.5, len(w)))
    b.add(
        w, t, T["conversation.chat"] + kind, np.array([CHAT, PHONE, EMAIL])[kind],
        sentiment=senti, code=rng.integers(0, 2, len(w)), value=rng.uniform(60, 900, len(w)).round(),
    )  # fmt: skip
    w, t = _poisson_times(rng, zeros + 0.006, zeros, gone)
    nps = np.clip(
        np.round(7 + 1.5 * s[w] - 3 * leaving_at(w, t) + rng.normal(0, 1.5, len(w))), 0, 10
    )
    b.add(w, t, T["survey.nps"], EMAIL, value=nps)
    # Marketing.
    w, t = _poisson_times(rng, zeros + 0.04, zeros, gone)
    campaign = rng.integers(0, 4, len(w))
    b.add(w, t, T["marketing.sent"], EMAIL, code=campaign)
    opened = rng.random(len(w)) < _sigmoid(-1.0 + 0.4 * e[w])
    b.add(w[opened], t[opened] + 0.1, T["marketing.opened"], EMAIL, code=campaign[opened])
    clicked = opened & (rng.random(len(w)) < 0.15)
    b.add(w[clicked], t[clicked] + 0.11, T["marketing.clicked"], EMAIL, code=campaign[clicked])

    # Tickets.
    w, t = _poisson_times(rng, 0.012 * np.exp(0.6 * q) * 2.5, zeros, gone)
    keep = rng.random(len(w)) < (1 + 1.5 * leaving_at(w, t)) / 2.5
    w, t = w[keep], t[keep]
    m = len(w)
    ticket_base = (world.seed % 1000) * 10**9 + index * 10**7
    tid = ticket_base + np.arange(m)
    prio = rng.choice(4, m, p=[0.3, 0.45, 0.18, 0.07])
    pi = _sigmoid(
        -2.4
        + np.array([-0.7, 0.0, 0.8, 1.5])[prio]
        + 0.5 * q[w]
        - 0.4 * s[w]
        + 0.8 * leaving_at(w, t)
        + rng.normal(0, 0.4, m)
    )
    escalates = rng.random(m) < pi
    h = 1 / 24
    t_esc = t + rng.exponential(ESCALATION_MEAN_H, m) * h
    t_res = np.where(
        escalates,
        t_esc + rng.exponential(24.0, m) * h,
        t + (0.5 + rng.exponential(RESOLUTION_MEAN_H, m)) * h,
    )
    breaches = escalates & (rng.random(m) < BREACH_AFTER_ESCALATION)
    t_breach = t_esc + rng.exponential(BREACH_DELAY_MEAN_H, m) * h
    breaches &= t_breach < t_res
    category = rng.integers(0, len(TICKET_CATEGORIES), m)
    channel = np.array([PHONE, CHAT, EMAIL, WEB, SERVICE_DESK])[rng.integers(0, 5, m)]
    sla_due = start_us + np.round((t + SLA_HOURS[prio] * h) * _US_PER_DAY)
    b.add(w, t, T["ticket.opened"], channel, ticket=tid, code=prio * 100 + category, value=sla_due)
    # Early signs: reassignments and an unhappy conversation about it.
    reassign = rng.random(m) < np.where(escalates, 0.55, 0.15)
    t_re = t + rng.exponential(5.0, m) * h
    ok = reassign & (t_re < np.minimum(t_res, t_esc))
    b.add(
        w[ok],
        t_re[ok],
        T["ticket.reassigned"],
        SERVICE_DESK,
        ticket=tid[ok],
        code=rng.integers(0, 4, int(ok.sum())),
    )
    talk = rng.random(m) < 0.6
    t_talk = t + rng.uniform(0.1, 6.0, m) * h
    ok = talk & (t_talk < t_res)
    senti = np.tanh(0.4 * s[w] - 0.9 * escalates + rng.normal(0, 0.5, m))
    b.add(
        w[ok],
        t_talk[ok],
        T["conversation.chat"],
        CHAT,
        ticket=tid[ok],
        sentiment=senti[ok],
        code=0,
        value=300.0,
    )
    upd = rng.random(m) < 0.7
    t_upd = t + rng.random(m) * (t_res - t)
    b.add(
        w[upd],
        t_upd[upd],
        T["ticket.updated"],
        SERVICE_DESK,
        ticket=tid[upd],
        code=rng.integers(0, 2, int(upd.sum())),
    )
    esc_ok = escalates & (t_esc < gone[w])
    b.add(
        w[esc_ok], t_esc[esc_ok], T["ticket.escalated"], SERVICE_DESK, ticket=tid[esc_ok], value=1.0
    )
    br_ok = breaches & (t_breach < gone[w])
    b.add(
        w[br_ok], t_breach[br_ok], T["ticket.sla_breached"], SERVICE_DESK, ticket=tid[br_ok], code=1
    )
    res_ok = t_res < gone[w]
    b.add(w[res_ok], t_res[res_ok], T["ticket.resolved"], SERVICE_DESK, ticket=tid[res_ok])
    # Surveys after resolution.
    after = t_res + rng.uniform(0.05, 2.0, m)
    mood = s[w] - 0.8 * escalates
    for type_, chance, low, high, centre in (
        ("survey.csat", 0.35, 1, 5, 3.8),
        ("survey.ces", 0.15, 1, 7, 3.0),
    ):
        ok = res_ok & (rng.random(m) < chance) & (after < gone[w])
        sign = -1.0 if type_ == "survey.ces" else 1.0
        score = np.clip(np.round(centre + sign * 0.8 * mood + rng.normal(0, 0.8, m)), low, high)
        b.add(w[ok], after[ok], T[type_], EMAIL, value=score[ok])

    events = b.build()
    # Keep what lies before the end (initial subscriptions may be older than start).
    end_us = _micros(world.end)
    events = events.take(events.at_us < end_us)

    def us(x: FloatArray) -> IntArray:
        return np.where(
            np.isfinite(x) & (x < days), start_us + np.round(x * _US_PER_DAY), -1
        ).astype(np.int64)

    return Chunk(
        first=first,
        n=n,
        events=events,
        plan_changes=sorted(plan_changes, key=lambda c: (c.customer, c.at)),
        leave_day=leave,
        churn_day=churn_day,
        hazard=hazard,
        interest_rate=np.where(held0, 0.0, rate),
        interest_day=interest,
        interest_lag=ilag,
        buys=buys,
        held_initially=held0,
        ticket_ids=tid,
        ticket_customer=w + first,
        ticket_opened_us=us(t),
        ticket_probability=pi,
        ticket_escalated_us=np.where(esc_ok, us(t_esc), -1),
        ticket_breached_us=np.where(br_ok, us(t_breach), -1),
        ticket_resolved_us=np.where(res_ok, us(t_res), -1),
    )


# --- to the feature engine and the services -------------------------------------------

_DIRECTIONS = ("inbound", "outbound")
_CAMPAIGNS = ("spring", "bundle", "upgrade", "loyalty")


def ticket_id(number: int) -> str:
    return f"T{number}"


def _attributes(type_: int, code: int, value: float) -> dict[str, Any]:
    name = TYPES[type_]
    if name == "ticket.opened":
        return {
            "priority": PRIORITIES[code // 100],
            "category": TICKET_CATEGORIES[code % 100],
            "sla_due_at": _at(int(value)),
        }
    if name == "ticket.updated":
        return {"by": ("customer", "agent")[code]}
    if name == "ticket.reassigned":
        return {"team": f"team-{code}"}
    if name == "ticket.escalated":
        return {"level": value}
    if name == "ticket.sla_breached":
        return {"sla": ("first_response", "resolution")[code]}
    if name.startswith("conversation."):
        return {"direction": _DIRECTIONS[code], "duration_seconds": value}
    if name.startswith("survey."):
        return {"score": value}
    if name == "product.usage":
        feature = FEATURES_OTHER[code] if code < 10 else PRODUCT_FEATURE[code - 10]
        return {"feature": feature, "quantity": value}
    if name == "purchase":
        return {"quantity": value}
    if name == "payment.failed":
        return {"reason": "card_declined"}
    if name == "complaint":
        return {"category": COMPLAINTS[code]}
    if name.startswith("marketing."):
        return {"campaign_id": _CAMPAIGNS[code]}
    return {}


def to_events(world: World, events: Events) -> dict[str, list[Event]]:
    """Columnar events as `Event`s by CRM id (rows already sorted by customer)."""
    out: dict[str, list[Event]] = {}
    cols = (
        events.customer.tolist(),
        events.at_us.tolist(),
        events.type.tolist(),
        events.channel.tolist(),
        events.ticket.tolist(),
        events.product.tolist(),
        events.amount.tolist(),
        events.sentiment.tolist(),
        events.code.tolist(),
        events.value.tolist(),
    )
    current = -1
    bucket: list[Event] = []
    for c, at, ty, ch, tk, pr, am, se, co, va in zip(*cols, strict=True):
        if c != current:
            bucket = out.setdefault(world.crm_id(c), [])
            current = c
        bucket.append(
            Event(
                occurred_at=_at(at),
                type=TYPES[ty],
                channel=ch,
                attributes=_attributes(ty, co, va),
                ticket_id=ticket_id(tk) if tk >= 0 else "",
                product_id=PRODUCTS[pr] if pr >= 0 else "",
                amount=None if am != am else am,
                sentiment=None if se != se else se,
            )
        )
    return out


@dataclass(frozen=True)
class FeedSummary:
    customers: int
    interactions: int
    stored: int
    rejected: int
    plan_changes: int
    customer_ids: Mapping[str, str]  # CRM id -> Converge customer id


FEED_BATCH = 500


async def feed(
    world: World,
    identity_address: str,
    interactions_address: str,
    progress: Any = None,
) -> FeedSummary:
    """Sends the world through the platform's own APIs: identity BulkResolve
    (CRM id + initial profile), UpdateCustomer for the profile effective from
    the signup date and for plan changes at their effective time, then IngestInteractions with 500 rows per message, each
    row addressed by the customer id identity returned. `progress(done,
    total)` is called after each interactions message."""

    from converge.runtime.channels import aio_channel
    from converge.runtime.errors import read_status
    from converge.runtime.values import from_plain, money_from_float, timestamp
    from converge.v1 import (
        common_pb2,
        identity_pb2,
        identity_pb2_grpc,
        interactions_pb2,
        interactions_pb2_grpc,
    )

    async with (
        aio_channel(identity_address) as ich,
        aio_channel(interactions_address) as xch,
    ):
        identity = identity_pb2_grpc.IdentityServiceStub(ich)
        interactions = interactions_pb2_grpc.InteractionsServiceStub(xch)

        def crm(index: int) -> common_pb2.Identifier:
            return common_pb2.Identifier(
                type=common_pb2.IDENTIFIER_TYPE_CRM_ID,
                value=world.crm_id(index),
                source="simulator",
            )

        def profile_pb(index: int) -> identity_pb2.Profile:
            prof = world.profile(index)
            return identity_pb2.Profile(
                display_name=f"Customer {index}",
                segment=prof["segment"],
                plan=prof["plan"],
                region=prof["region"],
                owner_team=prof["owner_team"],
                signup_date=timestamp(prof["signup_date"]),
                attributes={k: from_plain(v) for k, v in prof["attributes"].items()},
            )

        def resolve_requests() -> Iterator[identity_pb2.BulkResolveRequest]:
            for i in range(world.customers):
                yield identity_pb2.BulkResolveRequest(
                    row_ref=str(i),
                    resolve=identity_pb2.ResolveRequest(
                        identifiers=[crm(i)],
                        profile=profile_pb(i),
                        idempotency_key=f"sim-{world.seed}-resolve-{i}",
                    ),
                )

        await identity.BulkResolve(resolve_requests())
        # Resolve again (lookup only) to learn the ids, 500 at a time.
        ids: dict[str, str] = {}
        for lo in range(0, world.customers, 500):
            batch = range(lo, min(lo + 500, world.customers))
            answer = await identity.BatchResolve(
                identity_pb2.BatchResolveRequest(
                    requests=[
                        identity_pb2.ResolveRequest(identifiers=[crm(i)], lookup_only=True)
                        for i in batch
                    ]
                )
            )
            for i, result in zip(batch, answer.results, strict=True):
                if not result.customer_id:
                    raise RuntimeError(f"{world.crm_id(i)} was not resolved: {result.error}")
                ids[world.crm_id(i)] = result.customer_id
        # The profile as it was: the initial one effective from the signup
        # date, each plan change from when it happened (UpdateCustomer with
        # effective_at), so BatchGetCustomers(as_of=cutoff) sees history.
        from google.protobuf import field_mask_pb2

        updates: list[identity_pb2.UpdateCustomerRequest] = []
        for i in range(world.customers):
            prof = profile_pb(i)
            updates.append(
                identity_pb2.UpdateCustomerRequest(
                    customer_id=ids[world.crm_id(i)],
                    profile=prof,
                    update_mask=field_mask_pb2.FieldMask(
                        paths=[
                            "segment",
                            "plan",
                            "region",
                            "owner_team",
                            "signup_date",
                            *(f"attributes.{a}" for a in prof.attributes),
                        ]
                    ),
                    effective_at=timestamp(world.signup[i]),
                    idempotency_key=f"sim-{world.seed}-profile-{i}",
                )
            )
        n_changes = 0
        for chunk in world.chunks():
            for change in chunk.plan_changes:
                updates.append(
                    identity_pb2.UpdateCustomerRequest(
                        customer_id=ids[world.crm_id(change.customer)],
                        profile=identity_pb2.Profile(plan=change.plan),
                        update_mask=field_mask_pb2.FieldMask(paths=["plan"]),
                        effective_at=timestamp(change.at),
                        idempotency_key=f"sim-{world.seed}-plan-{change.customer}-{_micros(change.at)}",
                    )
                )
                n_changes += 1
        for lo in range(0, len(updates), 64):
            await asyncio.gather(*(identity.UpdateCustomer(u) for u in updates[lo : lo + 64]))
        total = sum(len(c.events) for c in world.chunks())
        stored = rejected = sent = 0

        def requests() -> Iterator[interactions_pb2.IngestInteractionsRequest]:
            nonlocal sent
            rows: list[interactions_pb2.IngestRow] = []
            for chunk in world.chunks():
                ev = chunk.events
                for k in range(len(ev)):
                    cid = ids[world.crm_id(int(ev.customer[k]))]
                    inp = interactions_pb2.InteractionInput(
                        customer=common_pb2.CustomerRef(customer_id=cid),
                        occurred_at=timestamp(_at(int(ev.at_us[k]))),
                        channel=int(ev.channel[k]),  # type: ignore[arg-type]
                        type=TYPES[int(ev.type[k])],
                        attributes={
                            a: from_plain(v)
                            for a, v in _attributes(
                                int(ev.type[k]), int(ev.code[k]), float(ev.value[k])
                            ).items()
                        },
                        ticket_id=ticket_id(int(ev.ticket[k])) if ev.ticket[k] >= 0 else "",
                        product_id=PRODUCTS[int(ev.product[k])] if ev.product[k] >= 0 else "",
                        source="simulator",
                    )
                    if not np.isnan(ev.amount[k]):
                        inp.amount.CopyFrom(money_from_float(float(ev.amount[k]), "USD"))
                    if not np.isnan(ev.sentiment[k]):
                        inp.sentiment = float(ev.sentiment[k])
                    key = f"sim-{world.seed}-{chunk.first}-{k}"
                    rows.append(
                        interactions_pb2.IngestRow(
                            row_ref=key, interaction=inp, idempotency_key=key
                        )
                    )
                    if len(rows) == FEED_BATCH:
                        sent += len(rows)
                        yield interactions_pb2.IngestInteractionsRequest(rows=rows)
                        rows = []
                        if progress is not None:
                            progress(sent, total)
            if rows:
                sent += len(rows)
                yield interactions_pb2.IngestInteractionsRequest(rows=rows)
                if progress is not None:
                    progress(sent, total)

        response = await interactions.IngestInteractions(requests())
        stored, rejected = int(response.stored + response.duplicates), int(response.rejected)
        if rejected:
            first = read_status(response.rejections[0].error) if response.rejections else None
            raise RuntimeError(
                f"the interactions service rejected {rejected} simulated rows"
                + (f" (first: {first.field}: {first.reason})" if first else "")
            )
        await asyncio.sleep(0)
    return FeedSummary(world.customers, total, stored, rejected, n_changes, ids)

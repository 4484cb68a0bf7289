"""The simulator: deterministic, valid interactions, realistic base rates,
and ground truth that agrees with what happens."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from converge.interactions.types import BUILT_IN_TYPES, validate_interaction
from converge.models.labels import churn_label, cross_sell_labels, escalation_labels
from converge.models.simulator import CHUNK, PRODUCTS, TYPES, World, simulate

START = datetime(2025, 1, 1, tzinfo=UTC)
END = datetime(2025, 9, 1, tzinfo=UTC)


@pytest.fixture(scope="module")
def world() -> World:
    return simulate(4000, 11, START, END)


def test_same_seed_same_world_other_seed_other_world() -> None:
    a = simulate(1000, 5, START, END).chunk(0).events
    b = simulate(1000, 5, START, END).chunk(0).events
    c = simulate(1000, 6, START, END).chunk(0).events
    for column in ("customer", "at_us", "type", "ticket", "product"):
        np.testing.assert_array_equal(getattr(a, column), getattr(b, column))
    assert len(a) != len(c) or not np.array_equal(a.at_us, c.at_us)


def test_every_interaction_is_valid_for_its_built_in_type(world: World) -> None:
    events = world.events_by_customer()
    seen = set()
    for customer_events in list(events.values())[:400]:
        for e in customer_events:
            spec = BUILT_IN_TYPES[e.type]
            problems = validate_interaction(
                spec, e.attributes, e.ticket_id, e.product_id, e.amount is not None, e.sentiment
            )
            assert problems == [], (e, problems)
            seen.add(e.type)
    assert seen == set(TYPES)


def test_base_rates_are_realistic(world: World) -> None:
    events = world.events_by_customer()
    cutoffs = [START + timedelta(days=d) for d in (60, 90, 120, 150)]
    churn = [churn_label(ev, c) for ev in events.values() for c in cutoffs]
    monthly_churn = np.mean([x for x in churn if x is not None])
    assert 0.02 <= monthly_churn <= 0.05, monthly_churn
    tickets = [
        lab for ev in events.values() for c in cutoffs for _, lab in escalation_labels(ev, c)
    ]
    chunk = world.chunk(0)
    escalated = (chunk.ticket_escalated_us >= 0).mean()
    assert 0.10 <= escalated <= 0.20, escalated
    assert len(tickets) > 200  # tickets open at 4 cutoffs among 4,000 customers
    pairs = [
        lab
        for ev in events.values()
        for c in cutoffs
        for _, lab in cross_sell_labels(ev, c, PRODUCTS)
    ]
    assert 0.005 <= np.mean(pairs) <= 0.06, np.mean(pairs)


def test_true_churn_probabilities_match_what_happens(world: World) -> None:
    """The oracle is calibrated: its mean over active customers is the
    observed 30-day churn rate, and it ranks far better than chance."""
    from sklearn.metrics import roc_auc_score

    events = world.events_by_customer()
    cutoff = START + timedelta(days=120)
    truth = world.churn_probability(cutoff)
    labels, probs = [], []
    for i in range(world.customers):
        label = churn_label(events[world.crm_id(i)], cutoff)
        if label is not None:
            labels.append(label)
            probs.append(truth[i])
    assert abs(np.mean(probs) - np.mean(labels)) < 0.35 * np.mean(labels)
    assert roc_auc_score(labels, probs) > 0.9


def test_a_chunk_of_customers_simulates_quickly() -> None:
    started = time.perf_counter()
    world = simulate(CHUNK, 3, START, START + timedelta(days=180))
    world.chunk(0)
    # 100,000 customers are five chunks: well under a minute at this pace.
    assert time.perf_counter() - started < 8.0

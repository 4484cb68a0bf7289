"""A customer's feature state stays bounded however long its history, and
live features still agree with point-in-time ones (issue 12, item 16)."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from converge.features.engine import (
    MAX_CLOSED_TICKETS,
    MAX_HELD_PRODUCTS,
    MAX_OPEN_TICKETS,
    CustomerState,
    Event,
    build_state,
    customer_features,
    features_at_cutoffs,
)
from converge.runtime.values import timestamp
from converge.v1 import common_pb2, interactions_pb2
from tests.interactions.builders import email_ref, interaction, record

NOW = datetime(2025, 6, 1, 15, tzinfo=UTC)
HORIZON = NOW - timedelta(days=89)  # (the longest window's first day starts before it)
TICKET_TYPES = ["ticket.opened", "ticket.updated", "ticket.resolved", "ticket.reopened"]
PRODUCT_TYPES = ["purchase", "subscription.started", "subscription.cancelled"]


# --- the rule, on plain states ------------------------------------------------------


@st.composite
def histories(draw: st.DrawFn) -> tuple[list[Event], list[Event]]:
    """Events up to 200 days old about a few tickets and products, split in
    those before the longest window and those within it."""
    found: list[Event] = []
    for _ in range(draw(st.integers(0, 60))):
        kind = draw(st.sampled_from([*TICKET_TYPES, *PRODUCT_TYPES, "product.login", "survey.nps"]))
        when = NOW - timedelta(minutes=draw(st.integers(1, 200 * 24 * 60)))
        found.append(
            Event(
                when,
                kind,
                draw(st.integers(1, 11)),
                {"score": float(draw(st.integers(0, 10)))} if kind == "survey.nps" else {},
                ticket_id=draw(st.sampled_from(["t1", "t2", "t3", "t4"]))
                if kind.startswith("ticket.")
                else "",
                product_id=draw(st.sampled_from(["p1", "p2", "p3"]))
                if kind in PRODUCT_TYPES
                else "",
            )
        )
    old = [e for e in found if e.occurred_at < HORIZON]
    return old, [e for e in found if e.occurred_at >= HORIZON]


@settings(max_examples=150, deadline=None)
@given(histories(), st.randoms(use_true_random=False))
def test_a_pruned_live_state_reads_as_point_in_time_and_the_full_history(
    history: tuple[list[Event], list[Event]], rnd: random.Random
) -> None:
    # Live: events arrive in any order, in batches, each batch's state pruned
    # when written; events from before the window arrive before its first
    # prune (the documented condition: nothing more than 90 days late about
    # a ticket or product already pruned).
    old, recent = history
    rnd.shuffle(old)
    rnd.shuffle(recent)
    live = CustomerState()
    arriving = old + recent
    position = 0
    while position < len(arriving):
        batch = arriving[position : position + rnd.randint(1, 8)]
        position += len(batch)
        for e in batch:
            live.apply(e)
        if position >= len(old):
            live.tidy(NOW)
    live.tidy(NOW)

    everything = old + recent
    point_in_time, _ = features_at_cutoffs(everything, [NOW])[0]
    assert customer_features(live, NOW) == point_in_time
    assert customer_features(live, NOW) == customer_features(build_state(everything), NOW)
    assert live.open_ticket_ids() == build_state(everything).open_ticket_ids()


def test_tickets_and_products_beyond_the_caps_saturate_alike_live_and_point_in_time() -> None:
    events = []
    for i in range(MAX_OPEN_TICKETS + 50):
        events.append(Event(NOW - timedelta(hours=i + 1), "ticket.opened", 8, {}, f"open-{i}"))
    for i in range(MAX_CLOSED_TICKETS + 50):
        opened = NOW - timedelta(days=10, hours=i)
        events.append(Event(opened, "ticket.opened", 8, {}, f"done-{i}"))
        events.append(Event(opened + timedelta(hours=1), "ticket.resolved", 8, {}, f"done-{i}"))
    for i in range(MAX_HELD_PRODUCTS + 50):
        events.append(Event(NOW - timedelta(hours=i + 1), "purchase", 1, {}, product_id=f"p{i}"))
    live = CustomerState()
    for e in random.Random(5).sample(events, len(events)):
        live.apply(e)
    live.tidy(NOW)
    assert len(live.tickets) == MAX_OPEN_TICKETS + MAX_CLOSED_TICKETS
    assert len(live.products) == MAX_HELD_PRODUCTS
    features = customer_features(live, NOW)
    assert features["open_tickets"] == MAX_OPEN_TICKETS
    assert features["products_held"] == MAX_HELD_PRODUCTS
    assert features_at_cutoffs(events, [NOW])[0][0] == features
    # The most recently active are the ones kept.
    assert "open-0" in live.tickets and f"open-{MAX_OPEN_TICKETS + 49}" not in live.tickets


# --- over gRPC and PostgreSQL --------------------------------------------------------

PRODUCTS_BOUGHT = 3_000
TICKETS_OPEN = 600
OLD_CANCELLED = 2_000
STATE_BOUND_BYTES = 100_000
PRICE = common_pb2.Money(currency_code="EUR", units=10)


def _row(item: interactions_pb2.InteractionInput, key: str) -> interactions_pb2.IngestRow:
    return interactions_pb2.IngestRow(interaction=item, idempotency_key=key, row_ref=key)


async def test_a_customer_with_thousands_of_products_and_tickets_keeps_a_bounded_state(
    platform: Any, database: str
) -> None:
    import asyncpg

    customer = email_ref("collector@example.com")
    first = await platform.interactions.RecordInteraction(record(interaction(customer), "first"))
    customer_id = first.interaction.customer_id
    ref = common_pb2.CustomerRef(customer_id=customer_id)
    now = datetime.now(UTC)
    rows: list[interactions_pb2.IngestRow] = []
    for i in range(PRODUCTS_BOUGHT):  # recent purchases: held
        rows.append(_row(interaction(ref, "purchase", days_ago=1 + i / 1000, product_id=f"p{i}", amount=PRICE), f"buy-{i}"))  # fmt: skip
    for i in range(OLD_CANCELLED):  # long ago, bought and cancelled
        rows.append(_row(interaction(ref, "purchase", days_ago=300, product_id=f"old{i}", amount=PRICE), f"ob-{i}"))  # fmt: skip
        rows.append(_row(interaction(ref, "subscription.cancelled", days_ago=299, product_id=f"old{i}"), f"oc-{i}"))  # fmt: skip
    for i in range(TICKETS_OPEN):
        opened = interaction(ref, "ticket.opened", days_ago=2 + i / 1000, ticket_id=f"t{i}")
        opened.attributes["priority"].string_value = "high"  # (required)
        rows.append(_row(opened, f"open-{i}"))
    messages = [
        interactions_pb2.IngestInteractionsRequest(rows=rows[i : i + 1000])
        for i in range(0, len(rows), 1000)
    ]
    summary = await platform.interactions.IngestInteractions(iter(messages))
    assert summary.stored == len(rows), summary
    await platform.interactions.RecordInteraction(record(interaction(customer), "last"))

    connection = await asyncpg.connect(database)
    try:
        size = await connection.fetchval(
            "SELECT octet_length(state) FROM interactions.customer_state WHERE customer_id = $1",
            uuid.UUID(customer_id),
        )
    finally:
        await connection.close()
    assert size <= STATE_BOUND_BYTES, size

    live = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(customers=[ref])
    )
    values = live.customers[0].values
    assert values["products_held"] == MAX_HELD_PRODUCTS
    assert values["open_tickets"] == MAX_OPEN_TICKETS
    replies = platform.interactions.GetPointInTimeFeatures(
        iter(
            [
                interactions_pb2.GetPointInTimeFeaturesRequest(
                    queries=[
                        interactions_pb2.PointInTimeQuery(
                            customer_id=customer_id, as_of=timestamp(now + timedelta(minutes=1))
                        )
                    ]
                )
            ]
        )
    )
    async for reply in replies:
        at_now = reply.results[0].customer.values
        for name in ("products_held", "open_tickets", "count_90d_purchase", "count_7d_all"):
            assert at_now[name] == values[name], name

"""Labels and training sets: labels only from after the cutoff, features only
from before it, through the real services; the service path and the
in-process path give the same values (one feature definition)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from converge.features.engine import Event
from converge.models.dataset import time_split
from converge.models.labels import churn_label, cross_sell_labels, escalation_labels, holdings
from converge.models.simulator import feed, simulate
from converge.models.trainingset import (
    build_from_events,
    build_from_services,
    point_in_time_features,
    stream_events,
)
from converge.runtime.values import from_plain, money_from_float, timestamp
from converge.v1 import common_pb2, interactions_pb2

C = datetime(2025, 3, 3, tzinfo=UTC)


def ev(at: datetime, type_: str, **kw: object) -> Event:
    return Event(occurred_at=at, type=type_, channel=1, attributes={}, **kw)  # type: ignore[arg-type]


def test_churn_is_the_cancellation_of_the_last_held_product_within_30_days() -> None:
    history = [
        ev(C - timedelta(days=100), "subscription.started", product_id="tv"),
        ev(C - timedelta(days=50), "subscription.started", product_id="phone"),
    ]
    one_product = [ev(C + timedelta(days=3), "subscription.cancelled", product_id="tv")]
    both = [*one_product, ev(C + timedelta(days=29), "subscription.cancelled", product_id="phone")]
    late = [*one_product, ev(C + timedelta(days=30), "subscription.cancelled", product_id="phone")]
    assert churn_label(history + one_product, C) == 0
    assert churn_label(history + both, C) == 1
    assert churn_label(history + late, C) == 0  # the window is [cutoff, cutoff + 30 days)
    assert churn_label(history + both, C + timedelta(days=40)) is None  # not active then
    assert holdings(history + both, C + timedelta(days=10)) == {"phone"}


def test_escalation_rows_are_the_tickets_open_at_the_cutoff() -> None:
    events = [
        ev(C - timedelta(hours=5), "ticket.opened", ticket_id="A"),
        ev(C - timedelta(hours=4), "ticket.opened", ticket_id="B"),
        ev(C - timedelta(hours=1), "ticket.resolved", ticket_id="B"),
        ev(C + timedelta(hours=71), "ticket.sla_breached", ticket_id="A"),
        ev(C + timedelta(hours=2), "ticket.opened", ticket_id="C"),
        ev(C + timedelta(hours=3), "ticket.escalated", ticket_id="C"),
    ]
    assert escalation_labels(events, C) == [("A", 1)]
    assert escalation_labels(events, C - timedelta(hours=2)) == [("A", 0), ("B", 0)]


def test_cross_sell_rows_are_the_products_not_held() -> None:
    events = [
        ev(C - timedelta(days=10), "subscription.started", product_id="internet"),
        ev(C + timedelta(days=13), "purchase", product_id="tv", amount=50.0),
        ev(C + timedelta(days=15), "subscription.started", product_id="cloud"),
    ]
    products = ("tv", "phone", "internet", "cloud")
    assert cross_sell_labels(events, C, products) == [("tv", 1), ("phone", 0), ("cloud", 0)]
    assert cross_sell_labels(events[1:], C, products) == []  # holds nothing: not a candidate


def _same(a: pd.DataFrame, b: pd.DataFrame, columns: list[str]) -> None:
    for name in columns:
        left, right = a[name], b[name]
        if isinstance(left.dtype, pd.CategoricalDtype):
            assert left.astype(str).tolist() == right.astype(str).tolist(), name
        else:
            np.testing.assert_allclose(left.to_numpy(float), right.to_numpy(float), err_msg=name)


async def test_an_event_after_the_cutoff_changes_the_label_but_never_the_features(
    platform,
) -> None:
    world = simulate(200, 21, datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 5, 1, tzinfo=UTC))
    summary = await feed(world, platform.identity_address, platform.interactions_address)
    crm_of = {cid: crm for crm, cid in summary.customer_ids.items()}
    ident, inter = platform.identity_address, platform.interactions_address

    before = await build_from_services(ident, inter, [C], "churn")
    names = list(before.feature_names)
    assert before.n_examples > 150

    # One definition: the in-process builder on the same interactions agrees.
    stored = await stream_events(inter, types=())
    histories = world.profile_histories()
    local = build_from_events(
        stored, {cid: histories[crm] for cid, crm in crm_of.items()}, [C], "churn"
    )
    key = ["entity_id"]
    _same(
        before.frame.sort_values(key).reset_index(drop=True),
        local.frame.sort_values(key).reset_index(drop=True),
        [*names, "label"],
    )

    row = before.frame[before.frame["label"] == 0].iloc[0]
    customer = str(row["customer"])
    held = sorted(holdings(stored[customer], C))
    pit_before, _, _ = await point_in_time_features(inter, [(customer, C + timedelta(days=2), "")])

    def interaction(at: datetime, type_: str, **kw: object) -> interactions_pb2.InteractionInput:
        return interactions_pb2.InteractionInput(
            customer=common_pb2.CustomerRef(customer_id=customer),
            occurred_at=timestamp(at),
            channel=common_pb2.CHANNEL_WEB,
            type=type_,
            source="leakage-test",
            **kw,  # type: ignore[arg-type]
        )

    planted = [
        # Exactly at the cutoff: "strictly before" leaves it to the label side.
        interaction(C, "payment.failed", amount=money_from_float(30.0, "USD")),
        interaction(
            C + timedelta(seconds=1),
            "ticket.opened",
            ticket_id="PLANTED-1",
            attributes={"priority": from_plain("urgent")},
        ),
        *[interaction(C + timedelta(days=1), "subscription.cancelled", product_id=p) for p in held],
    ]
    for i, message in enumerate(planted):
        await platform.interactions.RecordInteraction(
            interactions_pb2.RecordInteractionRequest(
                interaction=message, idempotency_key=f"planted-{i}"
            )
        )

    after = await build_from_services(ident, inter, [C], "churn")
    mine_before = before.frame[before.frame["customer"] == customer]
    mine_after = after.frame[after.frame["customer"] == customer]
    _same(mine_before, mine_after, names)
    assert int(mine_before["label"].iloc[0]) == 0
    assert int(mine_after["label"].iloc[0]) == 1
    # Everyone else's rows are untouched.
    others = after.frame["customer"] != customer
    _same(
        before.frame[before.frame["customer"] != customer], after.frame[others], [*names, "label"]
    )
    # The planted events are real: a later cutoff sees them.
    pit_after, _, _ = await point_in_time_features(inter, [(customer, C + timedelta(days=2), "")])
    assert pit_after[0]["payment_failures_7d"] == pit_before[0]["payment_failures_7d"] + 1
    assert pit_after[0]["open_tickets"] == pit_before[0]["open_tickets"] + 1


async def test_escalation_frame_splits_by_time_with_ticket_and_profile_features(platform) -> None:
    world = simulate(150, 22, datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC))
    await feed(world, platform.identity_address, platform.interactions_address)
    cutoffs = [datetime(2025, 2, 1, tzinfo=UTC) + timedelta(days=2 * k) for k in range(20)]
    frame = await build_from_services(
        platform.identity_address, platform.interactions_address, cutoffs, "escalation"
    )
    assert {"ticket_priority", "ticket_age_hours", "profile_plan", "profile_attr_contract"} <= set(
        frame.feature_names
    )
    # The priority is a rank (a number); the category is text, categorical.
    assert "ticket_priority" not in frame.categorical_features
    assert "ticket_category" in frame.categorical_features
    assert frame.frame["ticket_id"].str.startswith("T").all()
    split = time_split(frame)
    assert split.train.window[1] + timedelta(hours=72) <= split.valid.window[0]
    assert split.valid.window[1] + timedelta(hours=72) <= split.test.window[0]

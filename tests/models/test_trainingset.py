"""Labels and training sets: labels only from after the cutoff, features only
from before it, through the real services; the service path and the
in-process path give the same values (one feature definition)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

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
from tests.conftest import database_url

pytestmark = pytest.mark.slow

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


@asynccontextmanager
async def _platform_on(postgres_url: str) -> AsyncIterator[tuple[str, str]]:
    """Identity and interactions in-process over a database of their own
    (a second import of one export, with customer ids of its own); their
    addresses."""
    import asyncpg

    from converge.identity.app import SPEC as IDENTITY
    from converge.identity.settings import IdentitySettings
    from converge.interactions.app import SPEC as INTERACTIONS
    from converge.interactions.settings import InteractionsSettings
    from converge.runtime.server import ServiceRuntime

    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    url = database_url(postgres_url, name)
    identity = ServiceRuntime(IDENTITY, IdentitySettings(database_url=url, port=0))
    await identity.start()
    interactions = ServiceRuntime(
        INTERACTIONS,
        InteractionsSettings(
            database_url=url, port=0, identity_address=identity.address, ingest_batch_size=200
        ),
    )
    await interactions.start()
    try:
        yield identity.address, interactions.address
    finally:
        await interactions.stop(grace=1)
        await identity.stop(grace=1)
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


async def test_one_export_imported_twice_trains_the_same_model(platform, postgres_url: str) -> None:
    """Customer ids are minted at import, so two imports of one history give
    the same customers other ids (in another order when sorted by id). The
    training set is ordered by the source's identifiers, and training is
    seeded and deterministic: the same rows, the same split, the same model,
    the same figures."""
    from converge.models.definitions import load_definitions
    from converge.models.evaluation import evaluate
    from converge.models.pipeline import split_frame
    from converge.models.training import TrainingConfig, train
    from converge.models.trainingset import build_defined

    world = simulate(400, 31, datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 8, 1, tzinfo=UTC))
    defs = load_definitions(None)
    defs = defs.model_copy(update={"cutoffs": defs.cutoffs.model_copy(update={"weeks": 16})})
    # Sizes left to adapt to the data; fewer rounds than the default, to stay quick.
    config = TrainingConfig(max_rounds=300, early_stopping_rounds=30, num_threads=2)

    async def import_and_train(identity: str, interactions: str) -> tuple[Any, ...]:
        summary = await feed(world, identity, interactions)
        frame, report = await build_defined(identity, interactions, defs, "churn")
        split = split_frame(frame, defs, report)[0]
        model = train(split.train, split.valid, config)
        crm_of = {cid: crm for crm, cid in summary.customer_ids.items()}
        return frame, split, model, crm_of

    first = await import_and_train(platform.identity_address, platform.interactions_address)
    async with _platform_on(postgres_url) as (identity, interactions):
        second = await import_and_train(identity, interactions)

    (frame_a, split_a, model_a, crm_a), (frame_b, split_b, model_b, crm_b) = first, second
    # Two imports: the same customers under other ids.
    assert set(crm_a) != set(crm_b) and set(crm_a.values()) == set(crm_b.values())
    # ... whose order by id differs (else this test could not fail).
    by_id_a = [crm_a[c] for c in sorted(crm_a)]
    by_id_b = [crm_b[c] for c in sorted(crm_b)]
    assert by_id_a != by_id_b
    # The same rows in the same order, by the source's identifiers.
    assert frame_a.n_examples == frame_b.n_examples > 300
    assert [crm_a[c] for c in frame_a.frame["customer"]] == [
        crm_b[c] for c in frame_b.frame["customer"]
    ]
    assert frame_a.feature_names == frame_b.feature_names
    _same(frame_a.frame, frame_b.frame, [*frame_a.feature_names, "label"])
    # The same model: identical predictions on the same test rows, and figures.
    assert model_a.best_iteration == model_b.best_iteration
    np.testing.assert_array_equal(
        model_a.predict_proba(split_a.test.frame), model_b.predict_proba(split_a.test.frame)
    )
    assert model_a.booster.model_to_string() == model_b.booster.model_to_string()
    assert evaluate(model_a, split_a.test) == evaluate(model_b, split_b.test)

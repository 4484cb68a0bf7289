"""Prediction definitions as configuration: labels, the product catalogue,
prospects, the ticket closing policy, the end of history taken from the data,
validation errors that name line and key, too-little-data messages that say
what to change, and the input schema stored with each registered version."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from converge.features.engine import Event
from converge.features.transform import OTHER, InputSchema
from converge.models import cli
from converge.models.definitions import DefinitionError, load_definitions, parse_definitions
from converge.models.history import History, LabelRow, TicketCount, TooLittleData
from converge.models.registry import ModelRegistry
from converge.models.training import train
from converge.models.trainingset import assemble_columns, build_defined_events
from tests.models.conftest import FAST

pytestmark = pytest.mark.slow

# A fixed time, a year and more before any clock this suite runs on.
T0 = datetime(2024, 1, 1, tzinfo=UTC)


def ev(at: datetime, type_: str, **kw: object) -> Event:
    attributes = kw.pop("attributes", {})
    return Event(occurred_at=at, type=type_, channel=1, attributes=attributes, **kw)  # type: ignore[arg-type]


def history_of(defs_text: str, prediction: str, events: dict[str, list[Event]]) -> History:
    history = History(parse_definitions(defs_text), prediction)  # type: ignore[arg-type]
    for customer, mine in events.items():
        for e in mine:
            history.add(customer, e.occurred_at, e.type, e.product_id, e.ticket_id, e.attributes)
    return history


# --- validation ---------------------------------------------------------------------


def test_definition_errors_name_the_file_the_line_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "ours.yaml"
    path.write_text(
        "version: 1\n"
        "churn:\n"
        "  horizon_days: 0\n"
        "  label:\n"
        "    any_of_types: [account.closed]\n"
        "    none_of_types: [purchase]\n"
        "cross_sell:\n"
        "  prodcts: [gold]\n"
    )
    with pytest.raises(DefinitionError) as caught:
        load_definitions(path)
    message = str(caught.value)
    assert message.startswith(str(path))
    assert "line 3, churn.horizon_days" in message
    assert "line 4, churn.label: give exactly one of" in message
    assert "line 8, cross_sell.prodcts: unknown key" in message


def test_the_shipped_default_is_found_by_name_and_is_the_built_in_behaviour() -> None:
    shipped = load_definitions("default")
    assert shipped == load_definitions(None)
    assert shipped.churn.label.kind == "cancels_all_products"
    assert shipped.churn.horizon_days == 30 and shipped.escalation.horizon_hours == 72
    assert shipped.cross_sell.products == "from_data"
    assert shipped.cutoffs.end == "latest_complete"
    with pytest.raises(DefinitionError, match="no shipped definitions of that name"):
        load_definitions("no-such-definitions")


# --- labels and products from a file -----------------------------------------------

OURS = """
churn:
  horizon_days: 30
  population: with_history
  label:
    any_of_types: [account.closed]
    where: [{name: reason, in: [price, moved]}]
cross_sell:
  horizon_days: 14
  purchase_types: [purchase]
  products: from_data
  prospects: true
cutoffs: {every_days: 7, weeks: 4}
"""


def test_a_churn_label_and_a_product_catalogue_come_from_the_definitions_file() -> None:
    end = T0 + timedelta(days=120)
    events = {
        "a": [
            ev(T0, "purchase", product_id="gold"),
            ev(end - timedelta(days=40), "account.closed", attributes={"reason": "Price"}),
        ],
        "b": [
            ev(T0, "purchase", product_id="silver"),
            # Closed for a reason the definition does not count.
            ev(end - timedelta(days=40), "account.closed", attributes={"reason": "death"}),
        ],
        "c": [ev(end, "purchase", product_id="silver")],  # the latest interaction: the end
    }
    churn = history_of(OURS, "churn", events)
    # The end comes from the data: the last cutoff is a horizon before it.
    assert churn.cutoffs(None)[-1] == (end - timedelta(days=30)).replace(hour=0)
    labels = {(r.customer, r.cutoff): r.label for r in churn.rows()}
    cutoff = min(c for (who, c) in labels if who == "a" and c > end - timedelta(days=40 + 30))
    assert labels[("a", cutoff)] == 1
    assert labels[("b", cutoff)] == 0
    assert "c" not in {who for who, _ in labels}  # no history before any cutoff

    cross = history_of(OURS, "cross_sell", events)
    assert cross.products(cross.cutoffs(None)[-1]) == ("gold", "silver")  # not tv, phone, ...


def test_a_prospect_holding_nothing_gets_cross_sell_rows() -> None:
    end = T0 + timedelta(days=100)
    events = {
        "holder": [ev(T0, "purchase", product_id="gold")],
        # Holds nothing, has been in touch, and buys within the window.
        "prospect": [
            ev(T0 + timedelta(days=10), "ticket.opened", ticket_id="t1"),
            ev(end - timedelta(days=20), "purchase", product_id="silver"),
        ],
        "last": [ev(end, "purchase", product_id="gold")],
    }
    rows = list(history_of(OURS, "cross_sell", events).rows())
    prospect = [r for r in rows if r.customer == "prospect"]
    assert prospect, "a customer holding nothing is a candidate with prospects: true"
    assert {r.product for r in prospect} == {"gold", "silver"}
    assert any(r.label == 1 and r.product == "silver" for r in prospect)
    without = OURS.replace("prospects: true", "prospects: false")
    rows = list(history_of(without, "cross_sell", events).rows())
    assert not [r for r in rows if r.customer == "prospect" and r.cutoff < end - timedelta(days=20)]


# --- the ticket closing policy ------------------------------------------------------

POLICY = """
escalation:
  horizon_hours: 72
  cutoffs: {every_hours: 24}
  open_tickets: {inactive_days: 10, close_when_customer_left: true}
  outcome:
    types: [ticket.escalated]
    events:
      - {type: ticket.priority_changed, where: [{name: priority, in: [high, urgent]}]}
cutoffs: {weeks: 1}
"""


def test_the_closing_policy_leaves_out_departed_customers_and_stale_tickets_and_counts_them() -> (
    None
):
    end = T0 + timedelta(days=60)
    events = {
        # Left: cancelled its only product, its ticket never closed.
        "left": [
            ev(T0, "subscription.started", product_id="gold"),
            ev(T0 + timedelta(days=40), "ticket.opened", ticket_id="L"),
            ev(T0 + timedelta(days=45), "subscription.cancelled", product_id="gold"),
        ],
        # Stale: opened long ago, never touched again.
        "stale": [ev(T0 + timedelta(days=5), "ticket.opened", ticket_id="S")],
        # Live: a ticket updated every day, raised to high at the very end.
        "live": [
            ev(T0 + timedelta(days=40), "ticket.opened", ticket_id="A"),
            *[ev(T0 + timedelta(days=d), "ticket.updated", ticket_id="A") for d in range(41, 59)],
            ev(
                end - timedelta(hours=30),
                "ticket.priority_changed",
                ticket_id="A",
                attributes={"priority": "High"},
            ),
            ev(end, "ticket.updated", ticket_id="A"),  # the latest interaction: the end
        ],
    }
    count = TicketCount()
    rows = list(history_of(POLICY, "escalation", events).rows(None, count))
    assert {r.ticket_id for r in rows} == {"A"}
    assert count.counted == len(rows) > 0
    assert count.left_out_customer_left == 8 and count.left_out_inactive == 8
    # Raised to high within 72 hours of the last two cutoffs only.
    assert [r.label for r in rows][-3:] == [0, 1, 1]
    # Without the policy, the departed and stale tickets fill the set.
    open_forever = POLICY.replace(
        "{inactive_days: 10, close_when_customer_left: true}",
        "{inactive_days: null, close_when_customer_left: false}",
    )
    rows = list(history_of(open_forever, "escalation", events).rows())
    assert {r.ticket_id for r in rows} == {"A", "L", "S"}


# --- too little data ----------------------------------------------------------------


def test_too_little_data_names_the_label_the_counts_the_window_and_what_to_change() -> None:
    end = T0 + timedelta(days=120)
    events = {
        f"c{i}": [ev(T0, "purchase", product_id="gold"), ev(end, "purchase", product_id="gold")]
        for i in range(5)
    }
    defs = parse_definitions(OURS, "ours.yaml")
    with pytest.raises(TooLittleData) as caught:
        build_defined_events(events, {}, defs, "churn")
    message = str(caught.value)
    assert "churn (has any of account.closed within 30 days" in message
    assert "0 positive and" in message and "negative examples at 5 cutoffs from" in message
    assert f"to {(end - timedelta(days=30)):%Y-%m-%d}" in message
    assert "--until" in message and "--weeks" in message
    assert "churn.horizon_days: 30 in ours.yaml" in message


def test_the_cli_says_what_to_change_when_a_world_is_too_small(
    tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        ["train", "churn", "--simulated", "20", "--weeks", "2", "--tracking-uri", tracking_uri]
    )
    assert code == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "too little data for churn" in err and "--weeks" in err
    assert ModelRegistry(tracking_uri).versions("churn") == []


# --- the input schema -------------------------------------------------------------


def test_the_input_schema_stored_with_a_version_equals_training_and_groups_rare_plans(
    tracking_uri: str,
) -> None:
    rng = np.random.default_rng(0)
    n, cutoffs = 3000, [T0 + timedelta(days=7 * k) for k in range(10)]
    plans = rng.choice(["basic", "plus", "max"], size=n)
    plans[:5] = [f"rare{i}" for i in range(5)]  # each seen once: grouped as "other"
    usage = rng.normal(size=n)
    labels = (rng.random(n) < 1 / (1 + np.exp(-(2 * usage + (plans == "max") - 2)))).astype(int)
    rows = [LabelRow(f"c{i}", cutoffs[i % 10], int(labels[i])) for i in range(n)]
    profiles = [{"plan": str(p), "attributes": {}} for p in plans]
    frame = assemble_columns("churn", rows, {"usage": usage}, profiles, "test", "synthetic")
    schema = frame.input_schema
    assert schema.categories["profile_plan"] == ("basic", "max", "plus", OTHER)
    assert schema.names == ("usage", "profile_plan")
    assert list(frame.frame["profile_plan"][:5]) == [OTHER] * 5

    from converge.models.dataset import time_split

    split = time_split(frame, gap=timedelta(0))
    model = train(split.train, split.valid, FAST)
    registry = ModelRegistry(tracking_uri)
    from converge.models.evaluation import evaluate

    registered = registry.log_training(
        model, evaluate(model, split.test), {"train": split.train, "test": split.test}
    )
    loaded = registry.load_version("churn", registered.version)
    assert loaded.input_schema == schema
    stored = json.loads(json.dumps(loaded.model.input_schema))
    assert stored["inputs"][1] == {
        "name": "profile_plan",
        "kind": "categorical",
        "categories": ["basic", "max", "plus", OTHER],
    }
    # At serving, an unseen plan is "other", exactly like the rare ones in training.
    unseen = schema.vector({"usage": 0.5}, None, {"plan": "never-seen"}, T0)
    rare = schema.vector({"usage": 0.5}, None, {"plan": "rare1"}, T0)
    assert unseen.tolist() == rare.tolist() == [[0.5, 3.0]]
    assert InputSchema.from_json(schema.to_json()) == schema
    # One transform: the schema's matrix (no pandas) feeds the booster exactly
    # as training's frame did.
    test = split.test.frame
    matrix = schema.matrix(
        {"usage": test["usage"].to_numpy(), "profile_plan": list(test["profile_plan"])}, len(test)
    )
    np.testing.assert_allclose(
        loaded.model.booster.predict(matrix), loaded.model.predict_raw(test), rtol=1e-12
    )


# --- history that ended long ago, through the services -------------------------------


async def test_history_that_ended_a_year_ago_trains_through_the_services_without_the_clock(
    platform, tracking_uri: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    from converge.models.simulator import feed, simulate

    start, end = datetime(2023, 1, 1, tzinfo=UTC), datetime(2023, 8, 1, tzinfo=UTC)
    world = simulate(900, 11, start, end)
    await feed(world, platform.identity_address, platform.interactions_address)
    argv = [
        "train",
        "churn",
        "--from-services",
        "--identity",
        platform.identity_address,
        "--interactions",
        platform.interactions_address,
        "--weeks",
        "16",
        "--tracking-uri",
        tracking_uri,
        "--json",
    ]
    # The command runs its own event loop, as it does for a user.
    assert await asyncio.to_thread(cli.main, argv) == cli.EXIT_OK
    answer = json.loads(capsys.readouterr().out)
    assert answer["version"] == "1" and answer["n_positive"] > 0
    latest = max(e.occurred_at for es in world.events_by_customer().values() for e in es)
    last_cutoff = datetime.fromisoformat(answer["build"]["last_cutoff"])
    # The end is the data's, not the clock's: the last label window closes at
    # the latest interaction.
    assert latest - timedelta(days=31) <= last_cutoff <= latest - timedelta(days=30)


PER_TICKET = """
escalation:
  horizon_hours: 72
  outcome:
    types: [ticket.reassigned]
    attribute: {name: made_sla, equals: false}
  cutoffs: {after_events: 2, delay_minutes: 1}
cutoffs: {weeks: 4}
"""


def test_per_ticket_cutoffs_follow_the_second_event_and_need_a_complete_window() -> None:
    def ticket(tid: str, at: datetime, *later: tuple[float, str, dict[str, object]]) -> list[Event]:
        first = ev(at, "ticket.opened", ticket_id=tid, attributes={"made_sla": True})
        return [first] + [
            ev(at + timedelta(hours=h), t, ticket_id=tid, attributes=a) for h, t, a in later
        ]

    events = {
        "x": [
            *ticket("R", T0, (1, "ticket.updated", {}), (30, "ticket.reassigned", {})),
            *ticket("Q", T0, (2, "ticket.updated", {}), (200, "ticket.reassigned", {})),
            # Breached its SLA: the outcome column says so on its last row.
            *ticket(
                "M", T0, (3, "ticket.updated", {}), (300, "ticket.resolved", {"made_sla": False})
            ),
            # Its second event is too close to the end for a complete window.
            *ticket("N", T0 + timedelta(days=20), (1, "ticket.updated", {})),
        ]
    }
    rows = {r.ticket_id: r for r in history_of(PER_TICKET, "escalation", events).rows()}
    assert set(rows) == {"R", "Q", "M"}
    assert rows["R"].cutoff == T0 + timedelta(hours=1, minutes=1)
    assert (rows["R"].label, rows["Q"].label, rows["M"].label) == (1, 0, 1)

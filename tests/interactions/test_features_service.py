"""Live features through the service, and their parity with point-in-time
features computed at the same moment; no leakage past a cutoff."""

from __future__ import annotations

import random
from datetime import timedelta

import asyncpg
import grpc
import pytest

from converge.features.engine import STATE_VERSION
from converge.runtime.values import timestamp
from converge.v1 import common_pb2, interactions_pb2
from tests.interactions.builders import NOW, email_ref, interaction, number, record, text
from tests.waiting import wait_until

CHANNELS = [
    common_pb2.CHANNEL_WEB,
    common_pb2.CHANNEL_PHONE,
    common_pb2.CHANNEL_CHAT,
    common_pb2.CHANNEL_EMAIL,
]


def _random_history(rng: random.Random, customer: common_pb2.CustomerRef, tag: str) -> list:
    """A varied history, sent in shuffled order: late events are normal."""
    items = []
    for n in range(rng.randrange(5, 40)):
        days = rng.uniform(0.01, 120)
        kind = rng.choice(
            [
                "product.login",
                "survey.nps",
                "purchase",
                "ticket.opened",
                "ticket.resolved",
                "conversation.call",
                "payment.failed",
                "subscription.cancelled",
            ]
        )
        fields: dict = {}
        attributes: dict = {}
        if kind == "survey.nps":
            attributes = {"score": number(rng.randrange(0, 11))}
        elif kind == "purchase":
            fields = {
                "product_id": rng.choice(["tv", "phone"]),
                "amount": common_pb2.Money(currency_code="EUR", units=rng.randrange(5, 500)),
            }
        elif kind == "subscription.cancelled":
            fields = {"product_id": rng.choice(["tv", "phone"])}
        elif kind.startswith("ticket."):
            fields = {"ticket_id": f"{tag}-T{rng.randrange(3)}"}
            if kind == "ticket.opened":
                attributes = {"priority": text(rng.choice(["low", "normal", "high", "urgent"]))}
                if rng.random() < 0.7:
                    attributes["category"] = text(rng.choice(["network", "billing", "Quantum"]))
        elif kind == "conversation.call":
            attributes = {"direction": text("inbound")}
            fields = {"sentiment": rng.uniform(-1, 1)}
        elif kind == "payment.failed":
            fields = {"amount": common_pb2.Money(currency_code="EUR", units=20)}
        items.append(
            record(
                interaction(
                    customer,
                    kind,
                    days_ago=days,
                    channel=rng.choice(CHANNELS),
                    attributes=attributes,
                    **fields,
                ),
                f"{tag}-{n}",
            )
        )
    rng.shuffle(items)
    return items


async def test_live_features_follow_ingest(platform) -> None:
    customer = email_ref("gil@example.com")
    for day in (1, 2, 40):
        await platform.interactions.RecordInteraction(
            record(interaction(customer, "product.login", days_ago=day))
        )
    await platform.interactions.RecordInteraction(
        record(interaction(customer, "survey.nps", days_ago=3, attributes={"score": number(4)}))
    )
    await platform.interactions.RecordInteraction(
        record(interaction(customer, "survey.nps", days_ago=10, attributes={"score": number(9)}))
    )
    await platform.interactions.RecordInteraction(
        record(
            interaction(
                customer,
                "ticket.opened",
                days_ago=0.5,
                ticket_id="T-1",
                attributes={"priority": text("high")},
            )
        )
    )
    reply = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(customers=[customer], include_open_tickets=True)
    )
    [vector] = reply.customers
    values = vector.values
    assert vector.found
    assert values["count_7d_login"] == 2
    assert values["count_90d_login"] == 3
    assert values["nps_last"] == 4  # the latest by time, not by arrival
    assert values["open_tickets"] == 1
    assert 39 < values["tenure_days"] < 41
    assert "days_since_last_purchase" not in values  # missing, never 0
    [ticket] = reply.tickets
    assert ticket.ticket_id == "T-1"
    assert 11 < ticket.values["ticket_age_hours"] < 13


async def test_unknown_customer_is_not_found_and_unknown_feature_is_refused(platform) -> None:
    reply = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(customers=[email_ref("nobody@example.com")])
    )
    assert not reply.customers[0].found
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await platform.interactions.GetFeatures(
            interactions_pb2.GetFeaturesRequest(
                customers=[email_ref("x@example.com")], feature_names=["nope"]
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_live_features_equal_point_in_time_features_at_the_same_moment(platform) -> None:
    rng = random.Random(11)
    customers = [email_ref(f"parity-{i}@example.com") for i in range(12)]
    for i, customer in enumerate(customers):
        for request in _random_history(rng, customer, f"p{i}"):
            await platform.interactions.RecordInteraction(request)
    live = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(customers=customers, include_open_tickets=True)
    )
    queries = [
        interactions_pb2.PointInTimeQuery(row_ref=str(i), customer_id=v.customer_id, as_of=v.as_of)
        for i, v in enumerate(live.customers)
    ]
    replies = platform.interactions.GetPointInTimeFeatures(
        iter([interactions_pb2.GetPointInTimeFeaturesRequest(queries=queries)])
    )
    [pit] = [r async for r in replies]
    assert len(pit.results) == len(customers)
    for vector, result in zip(live.customers, pit.results, strict=True):
        assert dict(vector.values) == dict(result.customer.values)
        assert dict(vector.category_values) == dict(result.customer.category_values)
        assert len(vector.values) > 20

    ticket_queries = [
        interactions_pb2.PointInTimeQuery(
            row_ref=t.ticket_id, customer_id=t.customer_id, as_of=t.as_of, ticket_id=t.ticket_id
        )
        for t in live.tickets
    ]
    assert ticket_queries, "the random histories leave some tickets open"
    replies = platform.interactions.GetPointInTimeFeatures(
        iter([interactions_pb2.GetPointInTimeFeaturesRequest(queries=ticket_queries)])
    )
    [pit_tickets] = [r async for r in replies]
    for vector, result in zip(live.tickets, pit_tickets.results, strict=True):
        assert dict(vector.values) == dict(result.ticket.values)
        assert dict(vector.category_values) == dict(result.ticket.category_values)
    # Categorical features (text) are served both ways too; configured sets
    # with filters: test_feature_sets_service.py.
    assert any("ticket_category" in t.category_values for t in live.tickets)


async def test_an_event_after_a_cutoff_cannot_reach_that_cutoffs_features(platform) -> None:
    customer = email_ref("leak@example.com")
    first = await platform.interactions.RecordInteraction(
        record(interaction(customer, "product.login", days_ago=10))
    )
    cutoff = NOW - timedelta(days=5)
    query = interactions_pb2.GetPointInTimeFeaturesRequest(
        queries=[
            interactions_pb2.PointInTimeQuery(
                customer_id=first.interaction.customer_id, as_of=timestamp(cutoff)
            )
        ]
    )

    async def features() -> dict[str, float]:
        [reply] = [r async for r in platform.interactions.GetPointInTimeFeatures(iter([query]))]
        return dict(reply.results[0].customer.values)

    before = await features()
    # Planted after the cutoff: a purchase, a complaint, an NPS; and one at the cutoff itself.
    await platform.interactions.RecordInteraction(
        record(
            interaction(
                customer,
                "purchase",
                at=cutoff + timedelta(hours=1),
                product_id="tv",
                amount=common_pb2.Money(currency_code="EUR", units=99),
            )
        )
    )
    await platform.interactions.RecordInteraction(
        record(interaction(customer, "survey.nps", at=cutoff, attributes={"score": number(0)}))
    )
    await platform.interactions.RecordInteraction(
        record(interaction(customer, "product.login", days_ago=1))
    )
    assert await features() == before
    assert before["count_30d_login"] == 1


async def test_live_features_of_a_merged_customer_count_both_customers(platform) -> None:
    from converge.v1 import identity_pb2

    web = common_pb2.CustomerRef(
        identifier=common_pb2.Identifier(
            type=common_pb2.IDENTIFIER_TYPE_DEVICE_ID, value="dev-merge"
        )
    )
    crm = email_ref("merged-features@example.com")
    await platform.identity.Resolve(identity_pb2.ResolveRequest(identifiers=[crm.identifier]))
    await platform.identity.Resolve(identity_pb2.ResolveRequest(identifiers=[web.identifier]))
    await platform.identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[crm.identifier, web.identifier])
    )
    await platform.interactions.RecordInteraction(
        record(interaction(web, "product.login", days_ago=6))
    )
    await platform.interactions.RecordInteraction(
        record(interaction(crm, "product.login", days_ago=5))
    )
    for who in (crm, web):  # either identifier reaches the same merged customer

        async def logins(who: common_pb2.CustomerRef = who) -> float:
            reply = await platform.interactions.GetFeatures(
                interactions_pb2.GetFeaturesRequest(customers=[who])
            )
            return reply.customers[0].values["count_7d_login"]

        # The interactions service follows identity's event stream.
        await wait_until(logins, lambda n: n == 2, what="both customers' logins counted")


async def test_a_kept_state_of_an_old_feature_set_is_rebuilt_by_the_next_ingest(
    platform, database: str
) -> None:
    """A state written by another STATE_VERSION cannot be folded into; the next
    batch that touches its customer rebuilds it from the stored interactions."""
    customer = email_ref("rebuilt@example.com")

    async def stream(*days_ago: float, tag: str) -> None:
        rows = [
            interactions_pb2.IngestRow(
                interaction=interaction(customer, "product.login", days_ago=d),
                idempotency_key=f"{tag}-{i}",
            )
            for i, d in enumerate(days_ago)
        ]
        reply = await platform.interactions.IngestInteractions(
            iter([interactions_pb2.IngestInteractionsRequest(rows=rows)])
        )
        assert reply.stored == len(rows)

    await stream(1, 2, 3, tag="before")
    connection = await asyncpg.connect(database)
    try:
        changed = await connection.execute(
            "UPDATE interactions.customer_state SET state = convert_to($1, 'UTF8')",
            '{"version": "s1-000000000000"}',
        )
    finally:
        await connection.close()
    assert changed == "UPDATE 1"
    await stream(4, tag="after")
    connection = await asyncpg.connect(database)
    try:
        kept = await connection.fetchval(
            "SELECT convert_from(state, 'UTF8')::jsonb ->> 'version' FROM interactions.customer_state"
        )
    finally:
        await connection.close()
    assert kept == STATE_VERSION
    reply = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(customers=[customer])
    )
    assert reply.customers[0].values["count_7d_login"] == 4

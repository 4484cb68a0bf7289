"""Nothing of a forgotten customer survives in the interactions service's
schema, nor in identity's: ForgetCustomer as deployed (identity erases its
own data; interactions follows the forget event), for a person known by two
ids (one merged into the other), beside another such person who is kept.
Every column of every table of both schemas is read for the forgotten ids and
email (tests/erasure_sweep.py); the kept person's rows are all still there."""

from __future__ import annotations

import uuid

import asyncpg

from converge.v1 import common_pb2, identity_pb2
from tests.conftest import Platform
from tests.erasure_sweep import rows_naming, survivors, tables_with_column
from tests.interactions.builders import interaction, record
from tests.interactions.test_identity_follower import admin_connection, by_id, caught_up

EUR = common_pb2.Money(currency_code="EUR", units=20)

# The only tables allowed to name a forgotten customer, and why.
TOMBSTONES = {
    "interactions": {
        "erased_customers": "an ingest validated before the erasure refuses their rows after it",
    },
    "identity": {
        # Bare random ids, their identifiers cleared at the erasure (store.py
        # FORGET_REMOVED_IDENTIFIERS): the stream every follower replays, which
        # must still carry FORGOTTEN to a follower that reads it late.
        "identity_events": "the outbox of identity changes followers replay, ids only",
    },
}


async def person(platform: Platform, tag: str) -> tuple[str, str, str]:
    """A customer with a second id merged into it, both with interactions
    (so features too); (surviving id, merged id, email)."""
    email = f"{tag}-{uuid.uuid4().hex[:8]}@sweep.example"
    ids = []
    for n, value in enumerate((email, f"other-{email}")):
        created = await platform.identity.CreateCustomer(
            identity_pb2.CreateCustomerRequest(
                identifiers=[
                    common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=value)
                ]
            )
        )
        customer_id = created.customer.customer_id
        ids.append(customer_id)
        for i, item in enumerate(
            (
                interaction(by_id(customer_id), "product.login", days_ago=1),
                interaction(
                    by_id(customer_id), "purchase", days_ago=2, product_id="tv", amount=EUR
                ),
            )
        ):
            await platform.interactions.RecordInteraction(record(item, f"{tag}-{n}-{i}"))
    await platform.identity.MergeCustomers(
        identity_pb2.MergeCustomersRequest(surviving_customer_id=ids[0], merged_customer_id=ids[1])
    )
    return ids[0], ids[1], email


async def sweep(database: str, needles: list[str]) -> dict[str, dict[str, int]]:
    found = {}
    for schema in TOMBSTONES:
        conn: asyncpg.Connection = await admin_connection(database, schema)
        try:
            found[schema] = await rows_naming(conn, needles)
        finally:
            await conn.close()
    return found


async def test_nothing_of_a_forgotten_customer_survives_in_interactions_or_identity(
    platform: Platform, database: str
) -> None:
    gone = await person(platform, "gone")
    kept = await person(platform, "kept")
    await caught_up(platform)

    conn = await admin_connection(database, "interactions")
    try:
        holders = {
            table
            for column in ("customer_id", "merged_customer_id", "surviving_customer_id")
            for table in await tables_with_column(conn, column)
        } - TOMBSTONES["interactions"].keys()
    finally:
        await conn.close()
    gone_before = await sweep(database, list(gone))
    kept_before = await sweep(database, list(kept))
    # The fill reached every interactions table that holds customers.
    assert holders <= gone_before["interactions"].keys()
    assert holders <= kept_before["interactions"].keys()
    assert gone_before["identity"], "identity holds the person before"

    forgotten = await platform.identity.ForgetCustomer(
        identity_pb2.ForgetCustomerRequest(
            customer=by_id(gone[0]), actor=common_pb2.Actor(name="privacy-officer")
        )
    )
    assert forgotten.erasure_id
    await caught_up(platform)

    gone_after = await sweep(database, list(gone))
    for schema, tombstones in TOMBSTONES.items():
        assert survivors(gone_after[schema], tombstones) == {}, schema
    # The tombstone holds both ids, each once.
    assert gone_after["interactions"] == {"erased_customers": 2}
    assert set(gone_after["identity"]) == {"identity_events"}
    assert await sweep(database, list(kept)) == kept_before

"""BatchGetCustomers loads its customers in one statement; what it answers
must equal loading them one by one (the path it replaced)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from converge.identity.store import IdentityStore
from converge.runtime.database import create_pool
from converge.runtime.values import timestamp
from converge.v1 import identity_pb2
from tests.conftest import Platform
from tests.identity.helpers import CRM, EMAIL, ident


async def test_customers_loaded_together_equal_customers_loaded_one_by_one(
    platform: Platform, database: str
) -> None:
    rows = [
        identity_pb2.BulkResolveRequest(
            row_ref=str(i),
            resolve=identity_pb2.ResolveRequest(
                identifiers=[ident(CRM, f"c{i}")],
                profile=identity_pb2.Profile(plan="gold", region=f"r{i % 7}"),
                idempotency_key=f"k{i}",
            ),
        )
        for i in range(200)
    ]
    await platform.identity.BulkResolve(iter(rows))
    before = datetime.now(UTC)
    # A later change, an identifier more, and a merge.
    await platform.identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(CRM, "c0")], profile=identity_pb2.Profile(plan="platinum")
        )
    )
    first = await platform.identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(CRM, "c1"), ident(EMAIL, "a@example.com")])
    )
    second = await platform.identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, "b@example.com")])
    )
    await platform.identity.MergeCustomers(
        identity_pb2.MergeCustomersRequest(
            surviving_customer_id=first.customer.customer_id,
            merged_customer_id=second.customer.customer_id,
            idempotency_key="merge-1",
        )
    )
    pool = await create_pool(database, "identity", application_name="test", max_size=1)
    try:
        ids = [str(r[0]) for r in await pool.fetch("SELECT customer_id FROM customers")]
        store = IdentityStore(pool)
        async with store.reading() as tx:
            for as_of in (None, before):
                one = {c: await tx.load_customer(c, as_of) for c in ids}
                many = await tx.load_customers([*ids, str(uuid.uuid4())], as_of)
                assert many == {c: found for c, found in one.items() if found is not None}
            # As of before: no platinum; the stored form is {"s": text}; the
            # customer known by email only has no plan.
            plans = {(c.profile.get("plan") or {}).get("s") for c in many.values()}
            assert plans == {"gold", None}
    finally:
        await pool.close()
    answer = await platform.identity.BatchGetCustomers(
        identity_pb2.BatchGetCustomersRequest(customer_ids=ids, as_of=timestamp(before))
    )
    assert len(answer.customers) == len(ids)
    assert {c.profile.plan for c in answer.customers} == {"gold"}

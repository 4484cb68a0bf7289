"""The interactions service follows identity's event stream: every merge,
unmerge, erasure and identifier removal is applied, in whatever order their
transactions committed, and the follower outlives failures of its database."""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from converge.v1 import common_pb2, identity_pb2, interactions_pb2, privacy_pb2
from tests.identity.helpers import DEVICE, EMAIL, PHONE, ident, unique_email
from tests.interactions.builders import interaction, record
from tests.waiting import wait_until

FOLLOWER_LOGGER = "converge.interactions.identity_link"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def order(cursor: str) -> tuple[int, int]:
    """A stream cursor ("xid.event", or a bare event number) as a sortable pair."""
    head, _, tail = (cursor or "0").rpartition(".")
    return int(head or 0), int(tail)


async def identity_events(platform) -> list[identity_pb2.StreamIdentityEventsResponse]:
    call = platform.identity.StreamIdentityEvents(identity_pb2.StreamIdentityEventsRequest())
    return [event async for event in call]


async def sync_cursor(platform) -> tuple[int, int]:
    status = await platform.interactions.GetIdentitySyncStatus(
        interactions_pb2.GetIdentitySyncStatusRequest()
    )
    return order(status.cursor)


async def caught_up(platform) -> None:
    """Waits until interactions says it applied every event identity has."""
    latest = max((order(e.cursor) for e in await identity_events(platform)), default=(0, 0))
    await wait_until(
        lambda: sync_cursor(platform), lambda at: at >= latest, what="identity followed"
    )


def by_id(customer_id: str) -> common_pb2.CustomerRef:
    return common_pb2.CustomerRef(customer_id=customer_id)


def by_identifier(identifier: common_pb2.Identifier) -> common_pb2.CustomerRef:
    return common_pb2.CustomerRef(identifier=identifier)


async def timeline_keys(stub, customer: common_pb2.CustomerRef) -> set[str]:
    page = await stub.ListInteractions(interactions_pb2.ListInteractionsRequest(customer=customer))
    return {i.idempotency_key for i in page.interactions}


async def health(platform) -> int:
    """The interactions server's health status."""
    async with grpc.aio.insecure_channel(platform.interactions_address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        return int(reply.status)


async def admin_connection(database: str, schema: str) -> asyncpg.Connection:
    connection = await asyncpg.connect(database)
    await connection.execute(f"SET search_path = {schema}")
    return connection


# --- item 1: events committed out of order ------------------------------------
async def test_follower_applies_a_merge_that_committed_after_a_later_event(
    platform, database
) -> None:
    """A merge writes its MERGED event, then waits (another transaction holds
    one of its new identifiers) while a later create commits. The follower must
    still apply the merge once it commits: the survivor's timeline then shows
    the merged customer's interactions."""
    email = unique_email()
    crm = by_identifier(ident(EMAIL, email))
    web = by_identifier(ident(DEVICE, "d-late-merge"))
    await platform.interactions.RecordInteraction(record(interaction(crm), "crm-1"))
    await platform.interactions.RecordInteraction(record(interaction(web), "web-1"))
    bystander = await platform.identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
    )
    await caught_up(platform)
    held_email = unique_email()
    admin = await admin_connection(database, "identity")
    try:
        held = admin.transaction()
        await held.start()
        await admin.execute(
            "INSERT INTO identifiers (kind, source, value, customer_id) VALUES (1, '', $1, $2)",
            held_email,
            uuid.UUID(bystander.customer.customer_id),
        )
        joining = asyncio.ensure_future(
            platform.identity.Resolve(
                identity_pb2.ResolveRequest(
                    identifiers=[crm.identifier, web.identifier, ident(EMAIL, held_email)]
                )
            )
        )

        async def waiting_on_a_lock() -> int:
            found: int = await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE datname = current_database() AND wait_event_type = 'Lock'"
            )
            return found

        await wait_until(waiting_on_a_lock, lambda n: n > 0, what="the merge held open")
        later = await platform.identity.Resolve(
            identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
        )
        # Whatever the stream hands out meanwhile, the follower takes.
        handed_out = [
            e
            for e in await identity_events(platform)
            if e.customer_id == later.customer.customer_id
        ]
        if handed_out:
            await wait_until(
                lambda: sync_cursor(platform),
                lambda at: at >= order(handed_out[0].cursor),
                what="the later create followed",
            )
        await held.rollback()
        joined = await joining
    finally:
        await admin.close()
    assert len(joined.merges) == 1
    await caught_up(platform)
    assert await timeline_keys(platform.interactions, crm) == {"crm-1", "web-1"}


async def test_follower_applies_every_merge_unmerge_and_forget_beside_creates(
    platform, database
) -> None:
    """Many merges, unmerges and erasures run concurrently with creates; once
    GetIdentitySyncStatus says interactions caught up, its links equal
    identity's live merges and every customer's interactions show under the
    customer identity says they belong to."""
    customers = []
    for i in range(36):
        created = await platform.identity.Resolve(
            identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
        )
        customer_id = created.customer.customer_id
        await platform.interactions.RecordInteraction(
            record(interaction(by_id(customer_id)), f"own-{i}")
        )
        customers.append(customer_id)
    key_of = {customer_id: f"own-{i}" for i, customer_id in enumerate(customers)}
    forgotten = customers[30:36]

    async def merge(survivor: str, merged: str, undo: bool) -> None:
        reply = await platform.identity.MergeCustomers(
            identity_pb2.MergeCustomersRequest(
                surviving_customer_id=survivor, merged_customer_id=merged
            )
        )
        if undo:
            await platform.identity.UnmergeCustomers(
                identity_pb2.UnmergeCustomersRequest(merge_id=reply.merge.merge_id)
            )

    async def forget(customer_id: str) -> None:
        await platform.identity.ForgetCustomer(
            identity_pb2.ForgetCustomerRequest(
                customer=by_id(customer_id), actor=common_pb2.Actor(name="privacy-operator")
            )
        )

    async def create(n: int) -> None:
        for _ in range(n):
            await platform.identity.Resolve(
                identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
            )

    await asyncio.gather(
        *(merge(customers[2 * k], customers[2 * k + 1], undo=k % 3 == 0) for k in range(15)),
        *(forget(c) for c in forgotten),
        *(create(10) for _ in range(8)),
    )
    await caught_up(platform)

    admin = await asyncpg.connect(database)
    try:
        links = {
            tuple(map(str, r))
            for r in await admin.fetch(
                "SELECT merged_customer_id, surviving_customer_id, merge_id "
                "FROM interactions.customer_links"
            )
        }
        merges = {
            tuple(map(str, r))
            for r in await admin.fetch(
                "SELECT merged_customer_id, surviving_customer_id, merge_id "
                "FROM identity.merges WHERE unmerged_at IS NULL"
            )
        }
    finally:
        await admin.close()
    assert len(merges) == 10
    assert links == merges
    for customer_id in customers[:30]:
        found = await platform.identity.GetCustomer(
            identity_pb2.GetCustomerRequest(customer=by_id(customer_id))
        )
        root = found.customer
        expected = {key_of[c] for c in (root.customer_id, *root.merged_customer_ids)}
        assert await timeline_keys(platform.interactions, by_id(root.customer_id)) == expected
    for customer_id in forgotten:
        with pytest.raises(grpc.aio.AioRpcError):
            await platform.identity.GetCustomer(
                identity_pb2.GetCustomerRequest(customer=by_id(customer_id))
            )
        exported = await platform.interactions_privacy.ExportCustomerData(
            privacy_pb2.ExportCustomerDataRequest(customer_ids=[customer_id])
        )
        assert all(not section.records for section in exported.sections)


# --- item 2: the follower outlives a database failure ----------------------------
async def test_follower_logs_a_database_failure_and_resumes_after_it(
    platform, database, caplog
) -> None:
    """The follower's table disappears under it (as in a database blip): each
    failure is logged when it happens and health says NOT_SERVING; once the
    table is back, health says SERVING again and the follower applies the
    merges made meanwhile and later, without a restart."""
    caplog.set_level(logging.WARNING, logger=FOLLOWER_LOGGER)

    async def customer(tag: str) -> common_pb2.CustomerRef:
        ref = by_identifier(ident(DEVICE, f"d-{tag}-{uuid.uuid4().hex[:8]}"))
        await platform.interactions.RecordInteraction(record(interaction(ref), tag))
        return ref

    async def join(a: common_pb2.CustomerRef, b: common_pb2.CustomerRef) -> None:
        await platform.identity.Resolve(
            identity_pb2.ResolveRequest(identifiers=[a.identifier, b.identifier])
        )

    first, second, third = (
        await customer("first"),
        await customer("second"),
        await customer("third"),
    )
    await caught_up(platform)
    admin = await admin_connection(database, "interactions")
    try:
        await admin.execute("ALTER TABLE identity_sync RENAME TO identity_sync_away")
        await join(first, second)  # the follower cannot record it now

        async def failures() -> int:
            return sum(r.name == FOLLOWER_LOGGER for r in caplog.records)

        # More than one: it keeps retrying (and saying so) while the table is away.
        await wait_until(failures, lambda n: n >= 2, what="the follower's failures logged")
        await wait_until(lambda: health(platform), lambda s: s == NOT_SERVING, what="NOT_SERVING")
        await admin.execute("ALTER TABLE identity_sync_away RENAME TO identity_sync")
    finally:
        await admin.close()
    await wait_until(lambda: health(platform), lambda s: s == SERVING, what="SERVING again")
    await join(first, third)
    await caught_up(platform)
    assert await timeline_keys(platform.interactions, first) == {"first", "second", "third"}


# --- item 3: a removed identifier is routed afresh ------------------------------
async def test_a_removed_identifier_reaches_its_new_owner_on_every_replica(
    platform, second_replica
) -> None:
    """Both replicas routed an email to its first customer; identity removes it
    and it is attached to another customer. Each replica hears the removal and
    sends the next interaction with that email to the new owner."""
    email = ident(EMAIL, unique_email())
    replicas = (platform.interactions, second_replica)
    for n, replica in enumerate(replicas):
        await replica.RecordInteraction(record(interaction(by_identifier(email)), f"old-{n}"))
    old_owner = (
        await platform.identity.GetCustomer(
            identity_pb2.GetCustomerRequest(customer=by_identifier(email))
        )
    ).customer.customer_id
    await platform.identity.RemoveIdentifier(identity_pb2.RemoveIdentifierRequest(identifier=email))
    phone = ident(PHONE, "+33612345678")
    await platform.identity.Resolve(identity_pb2.ResolveRequest(identifiers=[phone]))
    moved = await platform.identity.Resolve(identity_pb2.ResolveRequest(identifiers=[phone, email]))
    new_owner = moved.customer.customer_id
    assert new_owner != old_owner

    for n, replica in enumerate(replicas):

        async def routed_to(replica=replica) -> str:
            page = await replica.ListInteractions(
                interactions_pb2.ListInteractionsRequest(customer=by_identifier(email))
            )
            return str(page.customer_id)

        await wait_until(routed_to, lambda owner: owner == new_owner, what="the removal heard")
        stored = await replica.RecordInteraction(
            record(interaction(by_identifier(email)), f"new-{n}")
        )
        assert stored.interaction.customer_id == new_owner
    assert await timeline_keys(platform.interactions, by_id(new_owner)) == {"new-0", "new-1"}
    assert await timeline_keys(platform.interactions, by_id(old_owner)) == {"old-0", "old-1"}


# --- item 4: an unmerge gives back what came from the other side ---------------------
async def test_unmerge_gives_back_identifiers_consents_and_interactions_added_through_the_merged_side(
    platform,
) -> None:
    email_a = ident(EMAIL, unique_email())
    phone_b = ident(PHONE, "+33698765432")
    email_b = ident(EMAIL, unique_email())
    await platform.interactions.RecordInteraction(
        record(interaction(by_identifier(email_a), "product.login"), "a-1")
    )
    await platform.interactions.RecordInteraction(
        record(interaction(by_identifier(phone_b), "product.login"), "b-1")
    )
    a = await platform.identity.GetCustomer(
        identity_pb2.GetCustomerRequest(customer=by_identifier(email_a))
    )
    b = await platform.identity.GetCustomer(
        identity_pb2.GetCustomerRequest(customer=by_identifier(phone_b))
    )
    joined = await platform.identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[email_a, phone_b])
    )
    [merge] = joined.merges
    assert merge.merged_customer_id == b.customer.customer_id

    # While merged, the phone's owner brings a new email, refuses SMS and calls.
    await platform.identity.Resolve(identity_pb2.ResolveRequest(identifiers=[phone_b, email_b]))
    await platform.identity.UpdateContactPreferences(
        identity_pb2.UpdateContactPreferencesRequest(
            customer=by_identifier(phone_b),
            consents=[
                identity_pb2.ChannelConsent(
                    channel=common_pb2.CONTACT_CHANNEL_SMS,
                    status=identity_pb2.CONSENT_STATUS_DENIED,
                )
            ],
        )
    )
    await platform.identity.UpdateContactPreferences(
        identity_pb2.UpdateContactPreferencesRequest(
            customer=by_id(b.customer.customer_id),
            preferences=identity_pb2.ContactPreferences(do_not_contact=True),
            update_mask=field_mask_pb2.FieldMask(paths=["do_not_contact"]),
        )
    )
    await caught_up(platform)
    await platform.interactions.RecordInteraction(
        record(interaction(by_identifier(email_b), "product.login"), "b-2")
    )
    assert await timeline_keys(platform.interactions, by_identifier(email_a)) == {
        "a-1",
        "b-1",
        "b-2",
    }

    await platform.identity.UnmergeCustomers(
        identity_pb2.UnmergeCustomersRequest(merge_id=merge.merge_id)
    )
    await caught_up(platform)
    after_a, after_b = [
        (
            await platform.identity.GetCustomer(
                identity_pb2.GetCustomerRequest(customer=by_id(c.customer.customer_id))
            )
        ).customer
        for c in (a, b)
    ]
    assert {i.identifier.value for i in after_a.identifiers} == {email_a.value}
    assert {i.identifier.value for i in after_b.identifiers} == {phone_b.value, email_b.value}
    assert list(after_a.contact_preferences.consents) == []
    assert not after_a.contact_preferences.do_not_contact
    assert [(c.channel, c.status) for c in after_b.contact_preferences.consents] == [
        (common_pb2.CONTACT_CHANNEL_SMS, identity_pb2.CONSENT_STATUS_DENIED)
    ]
    assert after_b.contact_preferences.do_not_contact
    assert await timeline_keys(platform.interactions, by_id(after_a.customer_id)) == {"a-1"}
    assert await timeline_keys(platform.interactions, by_id(after_b.customer_id)) == {"b-1", "b-2"}
    features = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(
            customers=[by_id(after_a.customer_id), by_id(after_b.customer_id)]
        )
    )
    assert [v.values["count_7d_login"] for v in features.customers] == [1, 2]

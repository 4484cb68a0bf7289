"""Right of access (ExportCustomer) and right to erasure (ForgetCustomer).

The other services that hold customer data (interactions, scoring,
recommendation) do not exist yet, so `RecordingDataSubject` stands in for them:
a real `converge.v1.DataSubjectService` on a real gRPC port that records what
identity asked of it. Full cross-service erasure is tested once they exist.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, struct_pb2

from converge.v1 import common_pb2, identity_pb2, privacy_pb2, privacy_pb2_grpc
from tests.identity.helpers import CRM, DEVICE, EMAIL, field_violations, ident, unique_email
from tests.interactions.test_export_and_pages import (
    GRPC_DEFAULT_RECEIVE,
    PAGE_BYTES,
    ingest_notes,
    register_note_type,
)

OPERATOR = common_pb2.Actor(name="privacy-operator", reason="GDPR art. 17 request")


class RecordingDataSubject(privacy_pb2_grpc.DataSubjectServiceServicer):
    """Stand-in for the interactions/scoring/recommendation services, which do
    not exist yet: records each request and answers like a service that holds
    a few interactions, or fails with UNAVAILABLE while `down` is set."""

    def __init__(self, service: str = "interactions") -> None:
        self.service = service
        self.erase_requests: list[privacy_pb2.EraseCustomerDataRequest] = []
        self.export_requests: list[privacy_pb2.ExportCustomerDataRequest] = []
        self.down = False

    async def EraseCustomerData(self, request, context):
        self.erase_requests.append(request)
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        return privacy_pb2.EraseCustomerDataResponse(
            service="interactions",
            erased_counts={"interactions": 3 * len(request.customer_ids), "features": 1},
        )

    async def ExportCustomerData(self, request, context):
        self.export_requests.append(request)
        if self.down:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        records = []
        for customer_id in request.customer_ids:
            record = struct_pb2.Struct()
            record.update({"customer_id": customer_id, "channel": "chat", "count": 2})
            records.append(record)
        return privacy_pb2.ExportCustomerDataResponse(
            service=self.service,
            sections=[privacy_pb2.ExportedRecords(kind="interactions", records=records)],
        )


@dataclass
class Peer:
    servicer: RecordingDataSubject
    address: str


@pytest.fixture
async def peer() -> AsyncIterator[Peer]:
    servicer = RecordingDataSubject()
    server = grpc.aio.server()
    privacy_pb2_grpc.add_DataSubjectServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Peer(servicer, f"127.0.0.1:{port}")
    await server.stop(grace=None)


@pytest.fixture
async def scoring_peer() -> AsyncIterator[Peer]:
    """A stand-in for scoring, the service after interactions by name."""
    servicer = RecordingDataSubject("scoring")
    server = grpc.aio.server()
    privacy_pb2_grpc.add_DataSubjectServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Peer(servicer, f"127.0.0.1:{port}")
    await server.stop(grace=None)


@pytest.fixture
async def identity_with_peer(identity_factory, peer: Peer):
    return await identity_factory(peer_services={"interactions": peer.address})


async def merged_customer(identity) -> tuple[str, str, str]:
    """A customer known by an email and a CRM id, with a web visitor merged in."""
    email = unique_email()
    crm = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(EMAIL, email), ident(CRM, "CRM-77")],
            profile=identity_pb2.Profile(display_name="Grace Hopper", segment="enterprise"),
        )
    )
    web = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(DEVICE, "dev-gh")], profile=identity_pb2.Profile(region="amer")
        )
    )
    joined = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email), ident(DEVICE, "dev-gh")])
    )
    assert joined.customer.customer_id == crm.customer.customer_id
    return crm.customer.customer_id, web.customer.customer_id, email


async def test_export_returns_profile_identifiers_changes_merges_and_peer_data(
    identity_with_peer, peer: Peer
) -> None:
    identity = identity_with_peer
    survivor, merged_away, email = await merged_customer(identity)
    await identity.UpdateCustomer(
        identity_pb2.UpdateCustomerRequest(
            customer_id=survivor,
            profile=identity_pb2.Profile(plan="premium"),
            update_mask=field_mask_pb2.FieldMask(paths=["plan"]),
        )
    )
    exported = await identity.ExportCustomer(
        identity_pb2.ExportCustomerRequest(
            customer=common_pb2.CustomerRef(identifier=ident(EMAIL, email)), actor=OPERATOR
        )
    )
    customer = exported.customer
    assert customer.customer_id == survivor
    assert (customer.profile.display_name, customer.profile.plan, customer.profile.region) == (
        "Grace Hopper",
        "premium",
        "amer",
    )
    assert {(i.identifier.type, i.identifier.value) for i in customer.identifiers} == {
        (EMAIL, email),
        (CRM, "CRM-77"),
        (DEVICE, "dev-gh"),
    }
    assert list(customer.merged_customer_ids) == [merged_away]
    fields = [c.field for c in exported.profile_changes]
    # Both customers' own changes, and the value the merge took over.
    assert sorted(fields) == sorted(["display_name", "segment", "region", "region", "plan"])
    assert any(c.actor.startswith("merge:") for c in exported.profile_changes)
    [merge] = exported.merges
    assert (merge.surviving_customer_id, merge.merged_customer_id) == (survivor, merged_away)

    assert list(exported.unavailable_services) == []
    [section] = [s for svc in exported.services for s in svc.sections]
    assert section.kind == "interactions"
    assert {r.fields["customer_id"].string_value for r in section.records} == {
        survivor,
        merged_away,
    }
    [asked] = peer.servicer.export_requests
    assert set(asked.customer_ids) == {survivor, merged_away}


async def test_export_lists_an_unreachable_peer_as_unavailable(
    identity_with_peer, peer: Peer
) -> None:
    survivor, _, _ = await merged_customer(identity_with_peer)
    peer.servicer.down = True
    exported = await identity_with_peer.ExportCustomer(
        identity_pb2.ExportCustomerRequest(customer=common_pb2.CustomerRef(customer_id=survivor))
    )
    assert exported.customer.customer_id == survivor
    assert list(exported.unavailable_services) == ["interactions"]
    assert list(exported.services) == []


async def export_pages(
    identity, customer: common_pb2.CustomerRef
) -> list[identity_pb2.ExportCustomerResponse]:
    """Every page of an export, as a privacy operator's tool fetches them."""
    pages = []
    token = ""
    while True:
        page = await identity.ExportCustomer(
            identity_pb2.ExportCustomerRequest(customer=customer, actor=OPERATOR, page_token=token)
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


async def test_an_export_of_9000_large_interactions_comes_whole_through_identity_in_pages(
    platform, identity_factory, scoring_peer: Peer
) -> None:
    """The real interactions service as a peer (and a stand-in after it): the
    export passes gRPC's 4 MB default limit many times over, yet every page
    reaches a default client and every interaction comes exactly once."""
    identity = await identity_factory(
        peer_services={
            "scoring": scoring_peer.address,
            "interactions": platform.interactions_address,
        }
    )
    email = unique_email()
    customer = common_pb2.CustomerRef(identifier=ident(EMAIL, email))
    await register_note_type(platform.interactions)
    await ingest_notes(platform.interactions, customer, 9000, 1, 1000, 1000)

    pages = await export_pages(identity, customer)

    assert all(p.ByteSize() < PAGE_BYTES + 64 * 1024 < GRPC_DEFAULT_RECEIVE for p in pages)
    first, *later = pages
    assert first.customer.customer_id
    assert all(not p.HasField("customer") and not p.profile_changes for p in later)
    assert all(len(p.services) == 1 and not p.unavailable_services for p in pages)
    interaction_ids = [
        record.fields["interaction_id"].string_value
        for page in pages
        for service in page.services
        if service.service == "interactions"
        for section in service.sections
        for record in section.records
    ]
    assert len(interaction_ids) == len(set(interaction_ids)) == 9000
    # Interactions' pages, then the next service by name, once.
    assert [p.services[0].service for p in pages][-2:] == ["interactions", "scoring"]
    [asked_scoring] = scoring_peer.servicer.export_requests
    assert list(asked_scoring.customer_ids) == [first.customer.customer_id]
    assert asked_scoring.page_token == ""


async def test_a_peer_down_on_a_later_page_is_listed_and_the_export_still_ends(
    identity_factory, peer: Peer, scoring_peer: Peer
) -> None:
    identity = await identity_factory(
        peer_services={"interactions": peer.address, "scoring": scoring_peer.address}
    )
    survivor, _, _ = await merged_customer(identity)
    scoring_peer.servicer.down = True
    first, second = await export_pages(identity, common_pb2.CustomerRef(customer_id=survivor))
    assert first.customer.customer_id == survivor
    assert [s.service for s in first.services] == ["interactions"]
    assert list(first.unavailable_services) == []
    assert (list(second.services), list(second.unavailable_services)) == ([], ["scoring"])
    assert not second.HasField("customer")


async def test_an_export_page_token_of_another_customer_or_not_issued_is_refused(
    identity_factory, peer: Peer, scoring_peer: Peer
) -> None:
    identity = await identity_factory(
        peer_services={"interactions": peer.address, "scoring": scoring_peer.address}
    )
    survivor, _, _ = await merged_customer(identity)
    other = (
        await identity.Resolve(
            identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
        )
    ).customer.customer_id
    others_export = await identity.ExportCustomer(
        identity_pb2.ExportCustomerRequest(customer=common_pb2.CustomerRef(customer_id=other))
    )
    assert others_export.next_page_token  # (scoring's page comes next)
    for token in ("garbage", "WyJhIl0=", others_export.next_page_token):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await identity.ExportCustomer(
                identity_pb2.ExportCustomerRequest(
                    customer=common_pb2.CustomerRef(customer_id=survivor), page_token=token
                )
            )
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(field_violations(error.value)) == ["page_token"]
    # Nobody was asked for the survivor's data with the other's position.
    assert all(survivor not in r.customer_ids for r in scoring_peer.servicer.export_requests)


async def test_forget_erases_everywhere_and_keeps_no_personal_data(
    identity_with_peer, peer: Peer, database: str
) -> None:
    identity = identity_with_peer
    survivor, merged_away, email = await merged_customer(identity)
    await identity.UpdateContactPreferences(
        identity_pb2.UpdateContactPreferencesRequest(
            customer=common_pb2.CustomerRef(customer_id=survivor),
            consents=[
                identity_pb2.ChannelConsent(
                    channel=common_pb2.CONTACT_CHANNEL_EMAIL,
                    status=identity_pb2.CONSENT_STATUS_GRANTED,
                )
            ],
        )
    )
    other = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
    )

    forgotten = await identity.ForgetCustomer(
        identity_pb2.ForgetCustomerRequest(
            customer=common_pb2.CustomerRef(identifier=ident(EMAIL, email)), actor=OPERATOR
        )
    )
    assert forgotten.complete
    outcomes = {s.service: s for s in forgotten.services}
    assert set(outcomes) == {"identity", "interactions"}
    assert all(s.done for s in outcomes.values())
    assert outcomes["identity"].erased_counts["customers"] == 2
    assert outcomes["interactions"].erased_counts["interactions"] == 6

    [asked] = peer.servicer.erase_requests
    assert set(asked.customer_ids) == {survivor, merged_away}
    assert asked.erasure_id == forgotten.erasure_id

    for ref in (
        common_pb2.CustomerRef(customer_id=survivor),
        common_pb2.CustomerRef(customer_id=merged_away),
        common_pb2.CustomerRef(identifier=ident(EMAIL, email)),
        common_pb2.CustomerRef(identifier=ident(DEVICE, "dev-gh")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await identity.GetCustomer(identity_pb2.GetCustomerRequest(customer=ref))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND

    # Other customers are untouched.
    listed = await identity.ListCustomers(identity_pb2.ListCustomersRequest())
    assert [c.customer_id for c in listed.customers] == [other.customer.customer_id]

    # The person may come back: the identifier resolves to a new customer.
    again = await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email)]))
    assert again.created
    assert again.customer.customer_id not in {survivor, merged_away}
    assert again.customer.profile == identity_pb2.Profile()

    connection = await asyncpg.connect(database)
    try:
        row = await connection.fetchval(
            "SELECT e::text FROM identity.erasures e WHERE erasure_id = $1::uuid",
            forgotten.erasure_id,
        )
        leftovers = await connection.fetchval(
            "SELECT count(*) FROM identity.profile_changes WHERE customer_id = ANY($1::uuid[])",
            [survivor, merged_away],
        )
    finally:
        await connection.close()
    assert row is not None
    assert forgotten.erasure_id in row
    for personal in (email, email.split("@")[0], "Grace Hopper", "CRM-77", "dev-gh"):
        assert personal.lower() not in row.lower()
    for customer_id in (survivor, merged_away):
        assert customer_id not in row
    assert leftovers == 0


async def test_forget_with_an_unavailable_peer_is_incomplete_and_can_be_retried(
    identity_with_peer, peer: Peer
) -> None:
    identity = identity_with_peer
    survivor, merged_away, email = await merged_customer(identity)
    peer.servicer.down = True
    request = identity_pb2.ForgetCustomerRequest(
        customer=common_pb2.CustomerRef(customer_id=merged_away),
        actor=OPERATOR,
        idempotency_key="forget-1",
    )
    failed = await identity.ForgetCustomer(request)
    assert not failed.complete
    outcomes = {s.service: s for s in failed.services}
    assert not outcomes["interactions"].done
    assert "UNAVAILABLE" in outcomes["interactions"].error
    assert not outcomes["identity"].done

    still_there = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(identifier=ident(EMAIL, email))
        )
    )
    assert still_there.customer.customer_id == survivor
    assert len(still_there.customer.identifiers) == 3

    # Once the service is back, the same request finishes the erasure.
    peer.servicer.down = False
    retried = await identity.ForgetCustomer(request)
    assert retried.complete
    assert len(peer.servicer.erase_requests) == 2
    assert set(peer.servicer.erase_requests[-1].customer_ids) == {survivor, merged_away}
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.GetCustomer(
            identity_pb2.GetCustomerRequest(customer=common_pb2.CustomerRef(customer_id=survivor))
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    # A repeat of the completed request has no second effect.
    repeated = await identity.ForgetCustomer(request)
    assert repeated.complete
    assert repeated.erasure_id == retried.erasure_id
    assert len(peer.servicer.erase_requests) == 2


async def test_forget_requires_an_actor_and_an_existing_customer(identity) -> None:
    email = unique_email()
    await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email)]))
    with pytest.raises(grpc.aio.AioRpcError) as anonymous:
        await identity.ForgetCustomer(
            identity_pb2.ForgetCustomerRequest(
                customer=common_pb2.CustomerRef(identifier=ident(EMAIL, email))
            )
        )
    assert anonymous.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await identity.ForgetCustomer(
            identity_pb2.ForgetCustomerRequest(
                customer=common_pb2.CustomerRef(identifier=ident(EMAIL, unique_email())),
                actor=OPERATOR,
            )
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    listed = await identity.ListCustomers(identity_pb2.ListCustomersRequest())
    assert len(listed.customers) == 1


async def test_an_idempotency_key_of_one_erasure_refuses_another_customer(
    identity_with_peer, peer: Peer
) -> None:
    """A key bound to an (unfinished) erasure of one customer, reused for
    another, is refused naming the key: the other customer stays, and the
    first request still finishes under its key with its own result."""
    identity = identity_with_peer
    first = (
        await identity.Resolve(
            identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
        )
    ).customer.customer_id
    other = (
        await identity.Resolve(
            identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())])
        )
    ).customer.customer_id

    def forget(customer_id: str) -> identity_pb2.ForgetCustomerRequest:
        return identity_pb2.ForgetCustomerRequest(
            customer=common_pb2.CustomerRef(customer_id=customer_id),
            actor=OPERATOR,
            idempotency_key="forget-shared",
        )

    peer.servicer.down = True
    unfinished = await identity.ForgetCustomer(forget(first))
    assert not unfinished.complete
    peer.servicer.down = False
    for _ in range(2):  # also once the first request completed
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await identity.ForgetCustomer(forget(other))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert list(field_violations(error.value)) == ["idempotency_key"]
        kept = await identity.GetCustomer(
            identity_pb2.GetCustomerRequest(customer=common_pb2.CustomerRef(customer_id=other))
        )
        assert kept.customer.customer_id == other
        finished = await identity.ForgetCustomer(forget(first))
        assert finished.complete
    assert all(other not in r.customer_ids for r in peer.servicer.erase_requests)
    replayed = await identity.ForgetCustomer(forget(first))
    assert replayed.erasure_id == finished.erasure_id

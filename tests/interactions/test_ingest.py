"""Ingest, validation, idempotency, the timeline and the change stream, over
real gRPC with identity resolving the identifiers."""

from __future__ import annotations

import uuid

import grpc
import pytest

from converge.runtime.errors import read_status
from converge.v1 import common_pb2, identity_pb2, interactions_pb2
from tests.identity.helpers import field_violations
from tests.interactions.builders import email_ref, interaction, number, record, text
from tests.waiting import wait_until


async def test_record_resolves_the_identifier_and_a_resend_is_stored_once(platform) -> None:
    item = interaction(email_ref("ann@example.com"), "product.login")
    first = await platform.interactions.RecordInteraction(record(item, "evt-1"))
    again = await platform.interactions.RecordInteraction(record(item, "evt-1"))
    assert not first.duplicate and again.duplicate
    assert again.interaction.interaction_id == first.interaction.interaction_id

    customer = await platform.identity.GetCustomer(
        identity_pb2.GetCustomerRequest(customer=email_ref("ANN@example.com"))
    )
    assert first.interaction.customer_id == customer.customer.customer_id
    timeline = await platform.interactions.ListInteractions(
        interactions_pb2.ListInteractionsRequest(customer=email_ref("ann@example.com"))
    )
    assert [i.interaction_id for i in timeline.interactions] == [first.interaction.interaction_id]
    # Ids are UUIDv7 (time first), so new ones land at the edge of their index.
    later = await platform.interactions.RecordInteraction(record(item, "evt-2"))
    ids = [uuid.UUID(r.interaction.interaction_id) for r in (first, later)]
    assert [i.version for i in ids] == [7, 7]
    assert ids[0].bytes[:6] <= ids[1].bytes[:6]  # (milliseconds since the epoch)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "no.such.type"}, "interaction.type"),
        ({"type": "survey.nps"}, "interaction.attributes.score"),
        ({"channel": common_pb2.CHANNEL_UNSPECIFIED}, "interaction.channel"),
        ({"source": ""}, "interaction.source"),
        ({"days_ago": -1}, "interaction.occurred_at"),
        ({"key": ""}, "idempotency_key"),
        (
            {"customer": common_pb2.CustomerRef(customer_id="nope")},
            "interaction.customer.customer_id",
        ),
        (
            {
                "customer": common_pb2.CustomerRef(
                    identifier=common_pb2.Identifier(type=1, value="not-an-email")
                )
            },
            "interaction.customer.identifier.value",
        ),
        (
            {"type": "survey.nps", "attributes": {"score": number(11)}},
            "interaction.attributes.score",
        ),
        (
            {"type": "ticket.opened", "attributes": {"priority": text("high")}},
            "interaction.ticket_id",
        ),
    ],
)
async def test_invalid_interactions_are_refused_naming_the_field_and_store_nothing(
    platform, change: dict, field: str
) -> None:
    customer = change.pop("customer", email_ref("bob@example.com"))
    key = change.pop("key", "k-1")
    days_ago = change.pop("days_ago", 1)
    fields = dict(change)
    kind = fields.pop("type", "product.login")
    source = fields.pop("source", "test")
    item = interaction(customer, kind, days_ago=days_ago, **fields)
    item.source = source
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await platform.interactions.RecordInteraction(
            interactions_pb2.RecordInteractionRequest(interaction=item, idempotency_key=key)
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in field_violations(error.value), field_violations(error.value)
    stream = platform.interactions.StreamInteractions(interactions_pb2.StreamInteractionsRequest())
    assert [m async for m in stream] == []


async def test_timeline_is_newest_first_filtered_and_paged(platform) -> None:
    customer = email_ref("cat@example.com")
    for day in range(1, 8):
        kind = "product.login" if day % 2 else "conversation.chat"
        attributes = {"direction": text("inbound")} if kind == "conversation.chat" else {}
        await platform.interactions.RecordInteraction(
            record(interaction(customer, kind, days_ago=day, attributes=attributes), f"t-{day}")
        )
    pages, token = [], ""
    while True:
        page = await platform.interactions.ListInteractions(
            interactions_pb2.ListInteractionsRequest(
                customer=customer, page=common_pb2.PageRequest(page_size=3, page_token=token)
            )
        )
        pages.append([i.idempotency_key for i in page.interactions])
        token = page.page.next_page_token
        if not token:
            break
    assert pages == [["t-1", "t-2", "t-3"], ["t-4", "t-5", "t-6"], ["t-7"]]
    chats = await platform.interactions.ListInteractions(
        interactions_pb2.ListInteractionsRequest(customer=customer, types=["conversation.*"])
    )
    assert [i.idempotency_key for i in chats.interactions] == ["t-2", "t-4", "t-6"]


async def test_bulk_ingest_stores_good_rows_reports_bad_ones_and_resends_safely(platform) -> None:
    def rows():
        for i in range(300):
            item = interaction(
                email_ref(f"bulk-{i % 30}@example.com"), "product.login", days_ago=1 + i / 100
            )
            if i % 50 == 7:
                item.type = "unknown.kind"
            yield interactions_pb2.IngestInteractionsRequest(
                row_ref=str(i), interaction=item, idempotency_key=f"bulk-{i}"
            )

    first = await platform.interactions.IngestInteractions(rows())
    assert (first.received, first.stored, first.duplicates, first.rejected) == (300, 294, 0, 6)
    assert first.customers_created == 30
    assert {r.row_ref for r in first.rejections} == {str(i) for i in range(300) if i % 50 == 7}
    assert {read_status(r.error).field for r in first.rejections} == {"interaction.type"}
    again = await platform.interactions.IngestInteractions(rows())
    assert (again.stored, again.duplicates, again.rejected, again.customers_created) == (
        0,
        294,
        6,
        0,
    )


async def test_stream_resumes_from_its_cursor_missing_and_repeating_nothing(platform) -> None:
    customer = email_ref("dan@example.com")
    for i in range(30):
        await platform.interactions.RecordInteraction(
            record(interaction(customer, days_ago=1 + i), f"s-{i}")
        )

    seen: list[str] = []
    cursor = ""
    stream = platform.interactions.StreamInteractions(
        interactions_pb2.StreamInteractionsRequest(follow=True)
    )
    async for message in stream:
        seen.append(message.interaction.idempotency_key)
        cursor = message.cursor
        if len(seen) == 12:
            stream.cancel()  # the consumer goes away mid-stream
            break

    for i in range(30, 40):  # more arrive while it is away
        await platform.interactions.RecordInteraction(
            record(interaction(customer, days_ago=1), f"s-{i}")
        )

    resumed = platform.interactions.StreamInteractions(
        interactions_pb2.StreamInteractionsRequest(from_cursor=cursor, follow=True)
    )
    async for message in resumed:
        seen.append(message.interaction.idempotency_key)
        if len(seen) == 40:
            resumed.cancel()
            break
    assert seen == [f"s-{i}" for i in range(40)]


async def test_merged_customers_share_a_timeline_until_unmerged(platform) -> None:
    web = common_pb2.CustomerRef(
        identifier=common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_DEVICE_ID, value="dev-9")
    )
    crm = email_ref("eve@example.com")
    await platform.interactions.RecordInteraction(record(interaction(web, days_ago=2), "web-1"))
    await platform.interactions.RecordInteraction(record(interaction(crm, days_ago=1), "crm-1"))
    joined = await platform.identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[web.identifier, crm.identifier])
    )
    [merge] = joined.merges

    async def keys() -> list[str]:
        page = await platform.interactions.ListInteractions(
            interactions_pb2.ListInteractionsRequest(customer=crm)
        )
        return [i.idempotency_key for i in page.interactions]

    # The service follows identity's event stream.
    await wait_until(keys, lambda found: found == ["crm-1", "web-1"], what="the merge applied")

    await platform.identity.UnmergeCustomers(
        identity_pb2.UnmergeCustomersRequest(merge_id=merge.merge_id)
    )
    await wait_until(keys, lambda found: found == ["crm-1"], what="the unmerge applied")


async def test_erasure_removes_interactions_and_features(platform) -> None:
    response = await platform.interactions.RecordInteraction(
        record(interaction(email_ref("fay@example.com"), days_ago=1))
    )
    customer_id = response.interaction.customer_id
    from converge.v1 import privacy_pb2

    exported = await platform.interactions_privacy.ExportCustomerData(
        privacy_pb2.ExportCustomerDataRequest(customer_ids=[customer_id])
    )
    assert len(exported.sections[0].records) == 1
    erased = await platform.interactions_privacy.EraseCustomerData(
        privacy_pb2.EraseCustomerDataRequest(
            customer_ids=[customer_id], erasure_id=str(uuid.uuid4())
        )
    )
    assert erased.erased_counts["interactions"] == 1
    assert erased.erased_counts["feature_states"] == 1
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await platform.interactions.GetInteraction(
            interactions_pb2.GetInteractionRequest(
                interaction_id=response.interaction.interaction_id
            )
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

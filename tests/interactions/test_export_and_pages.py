"""Pages bounded by bytes as well as rows: a timeline page of large rows and a
customer's whole export reach a default gRPC client (4 MB receive limit) a
page at a time, every row exactly once."""

from __future__ import annotations

import uuid
from datetime import timedelta

import grpc
import pytest
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.interactions.convert import BoundedPage
from converge.interactions.settings import InteractionsSettings
from converge.v1 import common_pb2, interactions_pb2, privacy_pb2
from tests.identity.helpers import field_violations
from tests.interactions.builders import NOW, email_ref, interaction, record, text

# What a default grpc client accepts in one message.
GRPC_DEFAULT_RECEIVE = 4 * 1024 * 1024
PAGE_BYTES = InteractionsSettings.model_fields["max_page_bytes"].default
# Room for what a page carries besides its rows (ids, token, timestamps).
PAGE_ENVELOPE = 1024
NOTE_TYPE = "custom.note"
NOTE_FIELDS = 16


async def register_note_type(interactions) -> None:
    """A type whose rows carry up to 16 long text attributes (64 KB a row)."""
    await interactions.RegisterInteractionType(
        interactions_pb2.RegisterInteractionTypeRequest(
            interaction_type=interactions_pb2.InteractionType(
                name=NOTE_TYPE,
                description="A long free-text note.",
                attributes=[
                    interactions_pb2.InteractionAttributeSpec(
                        name=f"part_{n:02d}",
                        type=interactions_pb2.INTERACTION_ATTRIBUTE_TYPE_STRING,
                    )
                    for n in range(NOTE_FIELDS)
                ],
            )
        )
    )


async def ingest_notes(
    interactions,
    customer: common_pb2.CustomerRef,
    count: int,
    parts: int,
    part_bytes: int,
    per_message: int,
) -> None:
    """`count` notes of `parts` attributes of `part_bytes` each, several
    sharing each `occurred_at` (so pages also end between equal times)."""

    def note(i: int) -> interactions_pb2.IngestRow:
        filler = (f"{i:08d}" * (part_bytes // 8 + 1))[:part_bytes]
        return interactions_pb2.IngestRow(
            row_ref=str(i),
            interaction=interaction(
                customer,
                NOTE_TYPE,
                at=NOW - timedelta(hours=1 + i // 7),
                attributes={f"part_{n:02d}": text(filler) for n in range(parts)},
            ),
            idempotency_key=f"note-{i}",
        )

    requests = [
        interactions_pb2.IngestInteractionsRequest(
            rows=[note(i) for i in range(start, min(start + per_message, count))]
        )
        for start in range(0, count, per_message)
    ]
    reply = await interactions.IngestInteractions(iter(requests))
    assert (reply.stored, reply.rejected) == (count, 0), reply.rejections[:3]


async def test_a_default_timeline_page_of_large_rows_reaches_a_default_client(platform) -> None:
    await register_note_type(platform.interactions)
    customer = email_ref(f"writer-{uuid.uuid4().hex[:8]}@example.com")
    # 120 rows of ~64 KB: 100 of them (a default page by rows) would be 6 MB.
    await ingest_notes(platform.interactions, customer, 120, NOTE_FIELDS, 4000, 10)

    ids: list[str] = []
    keys: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await platform.interactions.ListInteractions(
            interactions_pb2.ListInteractionsRequest(
                customer=customer, page=common_pb2.PageRequest(page_token=token)
            )
        )
        pages += 1
        assert page.ByteSize() <= PAGE_BYTES + PAGE_ENVELOPE < GRPC_DEFAULT_RECEIVE
        assert page.interactions, "a page is never empty while rows remain"
        ids += [i.interaction_id for i in page.interactions]
        keys += [i.idempotency_key for i in page.interactions]
        token = page.page.next_page_token
        if not token:
            break
    assert len(ids) == len(set(ids)) == 120
    assert pages > 2
    # Newest first (note i is 1 + i // 7 hours old), equal times latest stored
    # first: the order of one long page, wherever the bytes cut it.
    assert keys == [f"note-{i}" for i in sorted(range(120), key=lambda i: (i // 7, -i))]


async def test_an_export_of_9000_large_interactions_comes_whole_in_pages_under_the_bound(
    platform,
) -> None:
    await register_note_type(platform.interactions)
    email = f"exported-{uuid.uuid4().hex[:8]}@example.com"
    customer = email_ref(email)
    # ~1.3 KB a record as exported: about 12 MB in all, three times gRPC's limit.
    await ingest_notes(platform.interactions, customer, 9000, 1, 1000, 1000)
    listed = await platform.interactions.ListInteractions(
        interactions_pb2.ListInteractionsRequest(
            customer=customer, page=common_pb2.PageRequest(page_size=1)
        )
    )
    customer_id = listed.customer_id

    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await platform.interactions_privacy.ExportCustomerData(
            privacy_pb2.ExportCustomerDataRequest(customer_ids=[customer_id], page_token=token)
        )
        pages += 1
        assert page.service == "interactions"
        assert page.ByteSize() <= PAGE_BYTES + PAGE_ENVELOPE < GRPC_DEFAULT_RECEIVE
        [section] = page.sections
        assert section.kind == "interactions"
        seen += [r.fields["interaction_id"].string_value for r in section.records]
        assert all(r.fields["customer_id"].string_value == customer_id for r in section.records)
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == len(set(seen)) == 9000
    assert pages >= 10


@pytest.mark.parametrize("token", ["garbage", "after-seq:", "after-seq:-1", "after-seq:1x"])
async def test_an_export_page_token_not_issued_by_the_service_is_refused(platform, token) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await platform.interactions_privacy.ExportCustomerData(
            privacy_pb2.ExportCustomerDataRequest(
                customer_ids=[str(uuid.uuid4())], page_token=token
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["page_token"]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(min_value=0, max_value=40_000), min_size=1, max_size=40),
    bound=st.integers(min_value=1, max_value=200_000),
)
def test_a_bounded_page_counts_exactly_the_bytes_its_rows_take_on_the_wire(sizes, bound) -> None:
    page: BoundedPage[struct_pb2.Struct] = BoundedPage(bound)
    for n, size in enumerate(sizes):
        record = struct_pb2.Struct()
        record.update({"n": n, "text": "x" * size})
        if not page.add(record):
            break
    encoded = privacy_pb2.ExportedRecords(records=page.messages).ByteSize()
    assert page.size == encoded
    assert len(page.messages) >= 1  # however large the first row
    assert encoded <= bound or len(page.messages) == 1


async def test_an_exported_amount_is_exact(platform) -> None:
    """Money leaves an export as decimal text, never through a binary float
    (1,234,567.89 as a double is 1234567.889999...)."""
    customer = email_ref(f"exact-{uuid.uuid4().hex[:8]}@example.com")
    stored = await platform.interactions.RecordInteraction(
        record(
            interaction(
                customer,
                "purchase",
                product_id="tv",
                amount=common_pb2.Money(currency_code="EUR", units=1_234_567, nanos=890_000_000),
            )
        )
    )
    customer_id = stored.interaction.customer_id
    page = await platform.interactions_privacy.ExportCustomerData(
        privacy_pb2.ExportCustomerDataRequest(customer_ids=[customer_id])
    )
    amounts = [
        row.fields["amount"]
        for section in page.sections
        for row in section.records
        if row.fields["amount"].WhichOneof("kind") != "null_value"
    ]
    assert [a.string_value for a in amounts] == ["1234567.89"]

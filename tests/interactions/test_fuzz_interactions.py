"""The interactions service under fuzzed requests: every RPC of
InteractionsService and of its DataSubjectService gets valid requests mutated
in one to three fields (see tests/fuzzing.py), over real gRPC against real
PostgreSQL. No call may end UNKNOWN or INTERNAL, an INVALID_ARGUMENT names a
field, and afterwards the data reads back consistently: every interaction
acknowledged is there as acknowledged, and each customer's live features equal
their point-in-time recomputation from the stored interactions at the same
time.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converge.v1 import common_pb2, interactions_pb2, privacy_pb2
from tests.fuzzing import SERVICE_FUZZ_PHASES, assert_refused_properly, mutate
from tests.interactions.builders import email_ref, interaction, number, record, text

EMAILS = [f"fuzz-{i}@example.com" for i in range(3)]


def _purchase(email: str) -> interactions_pb2.InteractionInput:
    return interaction(
        email_ref(email),
        "purchase",
        days_ago=2,
        product_id="p-1",
        amount=common_pb2.Money(currency_code="EUR", units=12, nanos=500_000_000),
        attributes={"quantity": number(2)},
    )


def _ticket(email: str) -> interactions_pb2.InteractionInput:
    return interaction(
        email_ref(email),
        "ticket.opened",
        days_ago=3,
        ticket_id="t-1",
        sentiment=-0.5,
        attributes={"priority": text("high")},
    )


def _valid_inputs(email: str) -> list[interactions_pb2.InteractionInput]:
    return [
        _purchase(email),
        _ticket(email),
        interaction(email_ref(email), "survey.nps", attributes={"score": number(7)}),
    ]


def _base_requests(email: str, known_id: str, customer_id: str) -> dict[str, Message]:
    """A valid request for every RPC (by method name)."""
    item = _valid_inputs(email)[0]
    as_of = interactions_pb2.PointInTimeQuery(row_ref="q", customer_id=customer_id)
    as_of.as_of.GetCurrentTime()
    purge = interactions_pb2.PurgeInteractionsRequest(
        types=["purchase"], dry_run=True, actor=common_pb2.Actor(name="fuzzer")
    )
    purge.older_than.FromSeconds(946_684_800)  # 2000-01-01
    listed = interactions_pb2.ListInteractionsRequest(
        customer=email_ref(email), types=["purchase"], channels=[common_pb2.CHANNEL_WEB]
    )
    listed.page.page_size = 10
    return {
        "RecordInteraction": record(item),
        "IngestInteractions": interactions_pb2.IngestInteractionsRequest(
            rows=[
                interactions_pb2.IngestRow(
                    row_ref=str(i), interaction=row, idempotency_key=uuid.uuid4().hex
                )
                for i, row in enumerate(_valid_inputs(email))
            ]
        ),
        "GetInteraction": interactions_pb2.GetInteractionRequest(interaction_id=known_id),
        "ListInteractions": listed,
        "StreamInteractions": interactions_pb2.StreamInteractionsRequest(types=["ticket.*"]),
        "RegisterInteractionType": interactions_pb2.RegisterInteractionTypeRequest(
            interaction_type=interactions_pb2.InteractionType(
                name="custom.fuzz.loyalty",
                description="Loyalty points redeemed.",
                attributes=[
                    interactions_pb2.InteractionAttributeSpec(
                        name="points",
                        type=interactions_pb2.INTERACTION_ATTRIBUTE_TYPE_NUMBER,
                        min_value=0,
                        max_value=1000,
                    ),
                    interactions_pb2.InteractionAttributeSpec(
                        name="tier",
                        type=interactions_pb2.INTERACTION_ATTRIBUTE_TYPE_STRING,
                        allowed_values=["gold", "silver"],
                    ),
                ],
                required_fields=[interactions_pb2.INTERACTION_FIELD_PRODUCT_ID],
            )
        ),
        "ListInteractionTypes": interactions_pb2.ListInteractionTypesRequest(),
        "ListFeatureDefinitions": interactions_pb2.ListFeatureDefinitionsRequest(),
        "GetFeatures": interactions_pb2.GetFeaturesRequest(
            customers=[email_ref(email)],
            ticket_ids=["t-1"],
            include_open_tickets=True,
            feature_names=["count_7d_all"],
        ),
        "GetPointInTimeFeatures": interactions_pb2.GetPointInTimeFeaturesRequest(
            queries=[as_of], feature_names=["count_30d_all"]
        ),
        "PurgeInteractions": purge,
        "GetIdentitySyncStatus": interactions_pb2.GetIdentitySyncStatusRequest(),
        "EraseCustomerData": privacy_pb2.EraseCustomerDataRequest(
            customer_ids=[str(uuid.uuid4())], erasure_id=str(uuid.uuid4())
        ),
        "ExportCustomerData": privacy_pb2.ExportCustomerDataRequest(customer_ids=[customer_id]),
    }


async def _call(platform, method: str, request: Message) -> Any:
    if method in ("EraseCustomerData", "ExportCustomerData"):
        return await getattr(platform.interactions_privacy, method)(request, timeout=30)
    stub: Callable[..., Any] = getattr(platform.interactions, method)
    if method == "IngestInteractions":

        async def one():
            yield request

        return await stub(one(), timeout=30)
    if method == "GetPointInTimeFeatures":

        async def one_query():
            yield request

        return [reply async for reply in stub(one_query(), timeout=30)]
    if method == "StreamInteractions":
        return [reply async for reply in stub(request, timeout=30)]
    return await stub(request, timeout=30)


class _Seen:
    """What the fuzzer was told was stored."""

    def __init__(self) -> None:
        self.acknowledged: dict[str, interactions_pb2.Interaction] = {}
        self.customers: dict[str, str] = {}  # email -> customer id


async def _seed(platform, seen: _Seen) -> None:
    for email in EMAILS:
        for item in _valid_inputs(email):
            reply = await platform.interactions.RecordInteraction(record(item))
            seen.acknowledged[reply.interaction.interaction_id] = reply.interaction
            seen.customers[email] = reply.interaction.customer_id


async def _assert_consistent(platform, seen: _Seen) -> None:
    for email, customer_id in seen.customers.items():
        listed = await platform.interactions.ListInteractions(
            interactions_pb2.ListInteractionsRequest(
                customer=email_ref(email), page=common_pb2.PageRequest(page_size=1000)
            )
        )
        assert listed.customer_id == customer_id
        present = {i.interaction_id: i for i in listed.interactions}
        for interaction_id, acknowledged in seen.acknowledged.items():
            if acknowledged.customer_id == customer_id:
                assert present.get(interaction_id) == acknowledged
    live = await platform.interactions.GetFeatures(
        interactions_pb2.GetFeaturesRequest(customers=[email_ref(e) for e in EMAILS])
    )

    async def queries():
        yield interactions_pb2.GetPointInTimeFeaturesRequest(
            queries=[
                interactions_pb2.PointInTimeQuery(
                    row_ref=v.customer_id, customer_id=v.customer_id, as_of=v.as_of
                )
                for v in live.customers
            ]
        )

    (recomputed,) = [
        reply async for reply in platform.interactions.GetPointInTimeFeatures(queries())
    ]
    for vector, result in zip(live.customers, recomputed.results, strict=True):
        assert vector.found
        assert dict(vector.values) == dict(result.customer.values), vector.customer_id


METHODS = sorted(_base_requests("x@example.com", str(uuid.uuid4()), str(uuid.uuid4())))


@settings(
    max_examples=250,
    phases=SERVICE_FUZZ_PHASES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(method=st.sampled_from(METHODS), email=st.sampled_from(EMAILS), data=st.data())
async def test_fuzzed_requests_are_answered_or_refused_and_data_stays_consistent(
    platform, method: str, email: str, data: st.DataObject
) -> None:
    seen: _Seen = getattr(platform, "_fuzz_seen", None) or _Seen()
    if not seen.customers:
        await _seed(platform, seen)
        platform._fuzz_seen = seen  # (one platform for every example of this test)
    known_id = next(iter(seen.acknowledged))
    request = mutate(data, _base_requests(email, known_id, seen.customers[email])[method])
    if method == "StreamInteractions":
        request.follow = False  # (a follower would never end)
    if method == "PurgeInteractions":
        request.dry_run = True  # (a purge would take acknowledged rows away)
    try:
        reply = await _call(platform, method, request)
    except grpc.aio.AioRpcError as error:
        assert_refused_properly(error)
    else:
        if method == "RecordInteraction" and not request.validate_only:
            stored = reply.interaction
            seen.acknowledged.setdefault(stored.interaction_id, stored)
            read = await platform.interactions.GetInteraction(
                interactions_pb2.GetInteractionRequest(interaction_id=stored.interaction_id)
            )
            assert read.interaction == seen.acknowledged[stored.interaction_id]
        if method == "EraseCustomerData":
            assert set(request.customer_ids).isdisjoint(seen.customers.values())
    await _assert_consistent(platform, seen)

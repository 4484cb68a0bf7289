"""Profiles: create, partial update with field masks, history and reads as of a
past time, typed attributes, listing with filters and paging, batch reads."""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from google.protobuf import field_mask_pb2, timestamp_pb2

from converge.v1 import common_pb2, identity_pb2
from tests.identity.helpers import DEVICE, EMAIL, PHONE, field_violations, ident, unique_email


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def by_id(customer_id: str) -> common_pb2.CustomerRef:
    return common_pb2.CustomerRef(customer_id=customer_id)


async def get(identity, customer_id: str, as_of: datetime | None = None) -> identity_pb2.Customer:
    request = identity_pb2.GetCustomerRequest(customer=by_id(customer_id))
    if as_of is not None:
        request.as_of.CopyFrom(ts(as_of))
    return (await identity.GetCustomer(request)).customer


async def update(
    identity, customer_id: str, paths: list[str], effective_at: datetime | None = None, **fields
) -> identity_pb2.Customer:
    request = identity_pb2.UpdateCustomerRequest(
        customer_id=customer_id,
        profile=identity_pb2.Profile(**fields),
        update_mask=field_mask_pb2.FieldMask(paths=paths),
    )
    if effective_at is not None:
        request.effective_at.CopyFrom(ts(effective_at))
    return (await identity.UpdateCustomer(request)).customer


async def test_create_customer_keeps_profile_and_normalised_identifiers(identity) -> None:
    email = unique_email()
    signup = datetime(2023, 5, 17, 9, 30, tzinfo=UTC)
    created = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(
            profile=identity_pb2.Profile(
                display_name="Ada Lovelace",
                segment="enterprise",
                plan="premium",
                region="emea",
                signup_date=ts(signup),
                lifetime_value=common_pb2.Money(currency_code="EUR", units=1234, nanos=500_000_000),
                owner_team="key-accounts",
            ),
            identifiers=[ident(EMAIL, email.upper()), ident(PHONE, "+44 20 7946 0958")],
            actor=common_pb2.Actor(name="crm-import"),
        )
    )
    customer = created.customer
    uuid.UUID(customer.customer_id)
    fetched = await get(identity, customer.customer_id)
    for found in (customer, fetched):
        profile = found.profile
        assert (profile.display_name, profile.segment, profile.plan, profile.region) == (
            "Ada Lovelace",
            "enterprise",
            "premium",
            "emea",
        )
        assert profile.signup_date.ToDatetime(tzinfo=UTC) == signup
        assert (
            profile.lifetime_value.currency_code,
            profile.lifetime_value.units,
            profile.lifetime_value.nanos,
        ) == ("EUR", 1234, 500_000_000)
        assert profile.owner_team == "key-accounts"
        assert {(i.identifier.type, i.identifier.value) for i in found.identifiers} == {
            (EMAIL, email),
            (PHONE, "+442079460958"),
        }
    by_phone = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(identifier=ident(PHONE, "+442079460958"))
        )
    )
    assert by_phone.customer.customer_id == customer.customer_id


async def test_create_customer_with_an_identifier_of_another_customer_is_already_exists(
    identity,
) -> None:
    email = unique_email()
    first = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(identifiers=[ident(EMAIL, email)])
    )
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.CreateCustomer(
            identity_pb2.CreateCustomerRequest(
                profile=identity_pb2.Profile(segment="smb"),
                identifiers=[ident(DEVICE, "dev-new"), ident(EMAIL, f" {email.upper()}")],
            )
        )
    assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
    listed = await identity.ListCustomers(identity_pb2.ListCustomersRequest())
    assert [c.customer_id for c in listed.customers] == [first.customer.customer_id]
    with pytest.raises(grpc.aio.AioRpcError) as lookup:
        await identity.GetCustomer(
            identity_pb2.GetCustomerRequest(
                customer=common_pb2.CustomerRef(identifier=ident(DEVICE, "dev-new"))
            )
        )
    assert lookup.value.code() == grpc.StatusCode.NOT_FOUND


async def test_create_customer_with_a_repeated_idempotency_key_creates_one(identity) -> None:
    request = identity_pb2.CreateCustomerRequest(
        profile=identity_pb2.Profile(segment="smb"), idempotency_key="create-1"
    )
    first = await identity.CreateCustomer(request)
    second = await identity.CreateCustomer(request)
    assert first.customer.customer_id == second.customer.customer_id
    listed = await identity.ListCustomers(identity_pb2.ListCustomersRequest())
    assert len(listed.customers) == 1


async def test_update_customer_changes_only_masked_fields_and_clears_masked_unset_ones(
    identity,
) -> None:
    created = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(
            profile=identity_pb2.Profile(
                segment="smb",
                plan="premium",
                region="emea",
                owner_team="team-a",
                attributes={"nps": common_pb2.AttributeValue(number_value=7)},
            )
        )
    )
    customer_id = created.customer.customer_id
    updated = await update(
        identity,
        customer_id,
        ["segment", "plan", "attributes.nps", "attributes.tier_score"],
        segment="enterprise",
        region="apac",  # not masked: ignored
        attributes={"tier_score": common_pb2.AttributeValue(number_value=0.5)},
    )
    for customer in (updated, await get(identity, customer_id)):
        profile = customer.profile
        assert profile.segment == "enterprise"
        assert profile.plan == ""  # masked, left unset: cleared
        assert profile.region == "emea"  # not masked: kept
        assert profile.owner_team == "team-a"
        assert "nps" not in profile.attributes  # masked, left unset: cleared
        assert profile.attributes["tier_score"].number_value == 0.5


async def test_update_of_an_unknown_customer_is_not_found(identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await update(identity, str(uuid.uuid4()), ["segment"], segment="smb")
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_profile_reads_as_of_a_past_time_show_the_values_then(identity) -> None:
    created = await identity.CreateCustomer(identity_pb2.CreateCustomerRequest())
    customer_id = created.customer.customer_id
    now = datetime.now(UTC)
    t1, t2 = now - timedelta(hours=2), now - timedelta(hours=1)
    await update(identity, customer_id, ["segment"], effective_at=t1, segment="smb")
    await update(identity, customer_id, ["segment"], effective_at=t2, segment="enterprise")

    assert (await get(identity, customer_id)).profile.segment == "enterprise"
    between = await get(identity, customer_id, as_of=t1 + timedelta(minutes=30))
    assert between.profile.segment == "smb"
    assert between.as_of.ToDatetime(tzinfo=UTC) == t1 + timedelta(minutes=30)
    exactly_t2 = await get(identity, customer_id, as_of=t2)
    assert exactly_t2.profile.segment == "enterprise"
    before = await get(identity, customer_id, as_of=t1 - timedelta(minutes=1))
    assert before.profile.segment == ""
    assert before.profile == identity_pb2.Profile()

    # A late-arriving change dated between the two does not displace the newer value.
    await update(
        identity, customer_id, ["segment"], effective_at=t1 + timedelta(minutes=45), segment="mid"
    )
    assert (await get(identity, customer_id)).profile.segment == "enterprise"
    late = await get(identity, customer_id, as_of=t1 + timedelta(minutes=50))
    assert late.profile.segment == "mid"

    batch = await identity.BatchGetCustomers(
        identity_pb2.BatchGetCustomersRequest(
            customer_ids=[customer_id], as_of=ts(t1 + timedelta(minutes=30))
        )
    )
    assert [c.profile.segment for c in batch.customers] == ["smb"]


async def test_update_dated_in_the_future_is_rejected(identity) -> None:
    created = await identity.CreateCustomer(identity_pb2.CreateCustomerRequest())
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await update(
            identity,
            created.customer.customer_id,
            ["segment"],
            effective_at=datetime.now(UTC) + timedelta(days=1),
            segment="smb",
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_list_profile_changes_lists_oldest_first_and_pages(identity) -> None:
    created = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(
            profile=identity_pb2.Profile(segment="smb", plan="free"),
            actor=common_pb2.Actor(name="crm-import"),
        )
    )
    customer_id = created.customer.customer_id
    await update(identity, customer_id, ["plan"], plan="premium")
    await update(identity, customer_id, ["segment"])  # cleared
    await update(identity, customer_id, ["region"], region="emea")

    seen: list[tuple[str, str | None, str]] = []
    token, pages = "", 0
    while True:
        page = await identity.ListProfileChanges(
            identity_pb2.ListProfileChangesRequest(
                customer_id=customer_id,
                page=common_pb2.PageRequest(page_size=2, page_token=token),
            )
        )
        pages += 1
        assert len(page.changes) <= 2
        seen += [
            (c.field, c.value.string_value if c.HasField("value") else None, c.actor)
            for c in page.changes
        ]
        token = page.page.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == [
        ("segment", "smb", "crm-import"),
        ("plan", "free", "crm-import"),
        ("plan", "premium", ""),
        ("segment", None, ""),
        ("region", "emea", ""),
    ]


async def test_list_profile_changes_filters_by_effective_range(identity) -> None:
    created = await identity.CreateCustomer(identity_pb2.CreateCustomerRequest())
    customer_id = created.customer.customer_id
    now = datetime.now(UTC)
    for hours, segment in ((3, "a"), (2, "b"), (1, "c")):
        await update(
            identity,
            customer_id,
            ["segment"],
            effective_at=now - timedelta(hours=hours),
            segment=segment,
        )
    listed = await identity.ListProfileChanges(
        identity_pb2.ListProfileChangesRequest(
            customer_id=customer_id,
            effective=common_pb2.TimeRange(
                start=ts(now - timedelta(hours=2)), end=ts(now - timedelta(hours=1))
            ),
        )
    )
    assert [c.value.string_value for c in listed.changes] == ["b"]


async def test_typed_attributes_round_trip(identity) -> None:
    seen_at = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=UTC)
    attributes = {
        "favourite_product": common_pb2.AttributeValue(string_value="router-x"),
        "nps_last": common_pb2.AttributeValue(number_value=8.5),
        "open_tickets": common_pb2.AttributeValue(number_value=0),
        "is_partner": common_pb2.AttributeValue(bool_value=True),
        "churned": common_pb2.AttributeValue(bool_value=False),
        "last_login": common_pb2.AttributeValue(timestamp_value=ts(seen_at)),
    }
    created = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(profile=identity_pb2.Profile(attributes=attributes))
    )
    customer_id = created.customer.customer_id
    for customer in (created.customer, await get(identity, customer_id)):
        assert dict(customer.profile.attributes) == attributes
        got = customer.profile.attributes
        assert got["churned"].WhichOneof("value") == "bool_value"
        assert got["open_tickets"].WhichOneof("value") == "number_value"
        assert got["last_login"].timestamp_value.ToDatetime(tzinfo=UTC) == seen_at

    changed = await update(
        identity,
        customer_id,
        ["attributes.nps_last"],
        attributes={"nps_last": common_pb2.AttributeValue(string_value="n/a")},
    )
    assert changed.profile.attributes["nps_last"] == common_pb2.AttributeValue(string_value="n/a")
    history = await identity.ListProfileChanges(
        identity_pb2.ListProfileChangesRequest(customer_id=customer_id)
    )
    nps = [c.value for c in history.changes if c.field == "attributes.nps_last"]
    assert nps == [
        common_pb2.AttributeValue(number_value=8.5),
        common_pb2.AttributeValue(string_value="n/a"),
    ]


async def _create(identity, **profile) -> str:
    created = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(profile=identity_pb2.Profile(**profile))
    )
    return created.customer.customer_id


async def test_list_customers_filters_by_segment_owner_team_and_name_prefix(identity) -> None:
    ada = await _create(identity, display_name="Ada Lovelace", segment="smb", owner_team="north")
    adam = await _create(
        identity, display_name="ADAM Smith", segment="enterprise", owner_team="north"
    )
    bada = await _create(identity, display_name="Bada Bing", segment="smb", owner_team="south")
    percent = await _create(identity, display_name="100% Ada", segment="smb", owner_team="south")

    async def ids(**filters) -> set[str]:
        listed = await identity.ListCustomers(identity_pb2.ListCustomersRequest(**filters))
        return {c.customer_id for c in listed.customers}

    assert await ids() == {ada, adam, bada, percent}
    assert await ids(segment="smb") == {ada, bada, percent}
    assert await ids(owner_team="north") == {ada, adam}
    assert await ids(name_prefix="ada") == {ada, adam}
    assert await ids(name_prefix="ada", segment="smb") == {ada}
    assert await ids(name_prefix="100%") == {percent}
    assert await ids(name_prefix="%") == set()  # a LIKE wildcard is matched literally
    assert await ids(segment="nope") == set()


async def test_list_customers_pages_through_every_customer_once(identity) -> None:
    created = {await _create(identity, segment="smb") for _ in range(5)}
    seen: list[str] = []
    token, pages = "", 0
    while True:
        listed = await identity.ListCustomers(
            identity_pb2.ListCustomersRequest(
                page=common_pb2.PageRequest(page_size=2, page_token=token)
            )
        )
        pages += 1
        assert len(listed.customers) <= 2
        seen += [c.customer_id for c in listed.customers]
        token = listed.page.next_page_token
        if not token:
            break
    assert pages == 3
    assert len(seen) == len(set(seen)) == 5
    assert set(seen) == created
    assert seen == sorted(seen)


async def test_list_customers_leaves_out_merged_away_customers(identity) -> None:
    email = unique_email()
    await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email)]))
    await identity.Resolve(identity_pb2.ResolveRequest(identifiers=[ident(DEVICE, "d-merge")]))
    joined = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email), ident(DEVICE, "d-merge")])
    )
    listed = await identity.ListCustomers(identity_pb2.ListCustomersRequest())
    assert [c.customer_id for c in listed.customers] == [joined.customer.customer_id]


async def test_batch_get_returns_customers_in_request_order_and_lists_missing(identity) -> None:
    first = await _create(identity, segment="a")
    second = await _create(identity, segment="b")
    third = await _create(identity, segment="c")
    missing = str(uuid.uuid4())
    batch = await identity.BatchGetCustomers(
        identity_pb2.BatchGetCustomersRequest(customer_ids=[third, missing, first, second])
    )
    assert [c.customer_id for c in batch.customers] == [third, first, second]
    assert [c.profile.segment for c in batch.customers] == ["c", "a", "b"]
    assert list(batch.missing_customer_ids) == [missing]


async def test_remove_identifier_detaches_it_from_its_customer(identity) -> None:
    email = unique_email()
    resolved = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, email), ident(DEVICE, "shared-pc")])
    )
    customer_id = resolved.customer.customer_id
    removed = await identity.RemoveIdentifier(
        identity_pb2.RemoveIdentifierRequest(
            identifier=ident(DEVICE, "SHARED-PC"),
            actor=common_pb2.Actor(name="steward", reason="shared device"),
        )
    )
    assert removed.customer.customer_id == customer_id
    assert [i.identifier.value for i in removed.customer.identifiers] == [email]

    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.GetCustomer(
            identity_pb2.GetCustomerRequest(
                customer=common_pb2.CustomerRef(identifier=ident(DEVICE, "shared-pc"))
            )
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    again = await identity.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(DEVICE, "shared-pc")])
    )
    assert again.created
    assert again.customer.customer_id != customer_id

    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await identity.RemoveIdentifier(
            identity_pb2.RemoveIdentifierRequest(identifier=ident(DEVICE, "never-seen"))
        )
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


def _token(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "token",
    ["%%%", _token("abc"), _token("²"), _token("9" * 30), _token("-3")],
    ids=["not-base64", "letters", "superscript-digit", "beyond-bigint", "negative"],
)
async def test_list_profile_changes_with_a_forged_page_token_is_invalid_argument(
    identity, token: str
) -> None:
    customer_id = await _create(identity, segment="smb")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.ListProfileChanges(
            identity_pb2.ListProfileChangesRequest(
                customer_id=customer_id, page=common_pb2.PageRequest(page_token=token)
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["page.page_token"]


async def test_list_customers_with_a_forged_page_token_is_invalid_argument(identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.ListCustomers(
            identity_pb2.ListCustomersRequest(
                page=common_pb2.PageRequest(page_token=_token("not-a-uuid"))
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["page.page_token"]

"""Invalid requests: INVALID_ARGUMENT naming the exact field, and nothing changes.

The last tests are property tests of `converge.identity.identifiers.normalize`
itself (pure logic, no fakes): normalising is idempotent and insensitive to the
case and whitespace a source system happened to write.
"""

from __future__ import annotations

import grpc
import phonenumbers
import pytest
from google.protobuf import field_mask_pb2
from hypothesis import assume, given, reject, settings
from hypothesis import strategies as st

from converge.identity.identifiers import IdentifierError, IdentifierKind, normalize
from converge.v1 import common_pb2, identity_pb2
from tests.identity.helpers import DEVICE, EMAIL, PHONE, field_violations, ident, unique_email

EXTERNAL = common_pb2.IDENTIFIER_TYPE_EXTERNAL_ID


async def assert_no_customers(identity) -> None:
    listed = await identity.ListCustomers(identity_pb2.ListCustomersRequest())
    assert list(listed.customers) == []


async def rejected_resolve(identity, request: identity_pb2.ResolveRequest) -> dict[str, str]:
    """Sends a Resolve that must fail validation; its field violations."""
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.Resolve(request)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    return field_violations(error.value)


@pytest.mark.parametrize(
    ("identifier", "field"),
    [
        (ident(EMAIL, "not-an-email"), "identifiers[0].value"),
        (ident(EMAIL, "someone@nodot"), "identifiers[0].value"),
        (ident(PHONE, "call me maybe"), "identifiers[0].value"),
        (ident(PHONE, "+33 1"), "identifiers[0].value"),
        (ident(EMAIL, ""), "identifiers[0].value"),
        (ident(DEVICE, "   "), "identifiers[0].value"),
        (ident(DEVICE, "x" * 257), "identifiers[0].value"),
        (ident(DEVICE, "dev\x00ice"), "identifiers[0].value"),
        (ident(99, "whatever"), "identifiers[0].type"),
        (ident(common_pb2.IDENTIFIER_TYPE_UNSPECIFIED, "whatever"), "identifiers[0].type"),
        (ident(EXTERNAL, "42"), "identifiers[0].source"),
        (ident(EXTERNAL, "42", source="Bad Source!"), "identifiers[0].source"),
    ],
    ids=[
        "malformed-email",
        "email-domain-without-dot",
        "unparseable-phone",
        "too-short-phone",
        "empty-value",
        "blank-value",
        "oversized-value",
        "control-character",
        "unknown-type",
        "unspecified-type",
        "external-id-without-source",
        "external-id-with-bad-source",
    ],
)
async def test_invalid_identifier_is_rejected_naming_its_field_and_creates_nothing(
    identity, identifier: common_pb2.Identifier, field: str
) -> None:
    violations = await rejected_resolve(
        identity, identity_pb2.ResolveRequest(identifiers=[identifier])
    )
    assert list(violations) == [field]
    await assert_no_customers(identity)


async def test_one_bad_identifier_rejects_the_whole_request_including_the_good_ones(
    identity,
) -> None:
    good = unique_email()
    violations = await rejected_resolve(
        identity,
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, good), ident(PHONE, "nope")]),
    )
    assert list(violations) == ["identifiers[1].value"]
    await assert_no_customers(identity)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.GetCustomer(
            identity_pb2.GetCustomerRequest(
                customer=common_pb2.CustomerRef(identifier=ident(EMAIL, good))
            )
        )
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_resolve_without_identifiers_names_the_identifiers_field(identity) -> None:
    violations = await rejected_resolve(
        identity, identity_pb2.ResolveRequest(profile=identity_pb2.Profile(segment="smb"))
    )
    assert list(violations) == ["identifiers"]
    await assert_no_customers(identity)


async def test_national_phone_needs_a_default_region(identity_factory) -> None:
    national = "01 42 68 53 00"
    without_region = await identity_factory()
    violations = await rejected_resolve(
        without_region, identity_pb2.ResolveRequest(identifiers=[ident(PHONE, national)])
    )
    assert list(violations) == ["identifiers[0].value"]
    await assert_no_customers(without_region)

    french = await identity_factory(default_phone_region="FR")
    resolved = await french.Resolve(
        identity_pb2.ResolveRequest(identifiers=[ident(PHONE, national)])
    )
    assert resolved.created
    assert [(i.identifier.type, i.identifier.value) for i in resolved.customer.identifiers] == [
        (PHONE, "+33142685300")
    ]


@pytest.mark.parametrize(
    ("profile", "field"),
    [
        (
            identity_pb2.Profile(
                attributes={"note": common_pb2.AttributeValue(string_value="x" * 2049)}
            ),
            "profile.attributes[note]",
        ),
        (
            identity_pb2.Profile(
                attributes={f"a{i}": common_pb2.AttributeValue(bool_value=True) for i in range(101)}
            ),
            "profile.attributes",
        ),
        (
            identity_pb2.Profile(
                attributes={"Bad-Name": common_pb2.AttributeValue(number_value=1)}
            ),
            "profile.attributes[Bad-Name]",
        ),
        (
            identity_pb2.Profile(attributes={"nps": common_pb2.AttributeValue()}),
            "profile.attributes[nps]",
        ),
        (
            identity_pb2.Profile(
                attributes={"score": common_pb2.AttributeValue(number_value=float("nan"))}
            ),
            "profile.attributes[score]",
        ),
        (
            identity_pb2.Profile(lifetime_value=common_pb2.Money(currency_code="euro", units=5)),
            "profile.lifetime_value.currency_code",
        ),
        (identity_pb2.Profile(segment="s" * 257), "profile.segment"),
    ],
    ids=[
        "oversized-attribute-text",
        "too-many-attributes",
        "bad-attribute-name",
        "attribute-without-value",
        "non-finite-number",
        "bad-currency",
        "oversized-segment",
    ],
)
async def test_invalid_profile_is_rejected_naming_its_field_and_creates_nothing(
    identity, profile: identity_pb2.Profile, field: str
) -> None:
    violations = await rejected_resolve(
        identity,
        identity_pb2.ResolveRequest(identifiers=[ident(EMAIL, unique_email())], profile=profile),
    )
    assert list(violations) == [field]
    await assert_no_customers(identity)


async def test_attribute_text_at_the_limit_is_accepted(identity) -> None:
    resolved = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(EMAIL, unique_email())],
            profile=identity_pb2.Profile(
                attributes={"note": common_pb2.AttributeValue(string_value="x" * 2048)}
            ),
        )
    )
    assert len(resolved.customer.profile.attributes["note"].string_value) == 2048


async def test_create_customer_rejects_bad_identifiers_and_profile_together(identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.CreateCustomer(
            identity_pb2.CreateCustomerRequest(
                profile=identity_pb2.Profile(
                    lifetime_value=common_pb2.Money(currency_code="EUR", units=5, nanos=-1)
                ),
                identifiers=[ident(EMAIL, "@example.com")],
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert set(field_violations(error.value)) == {
        "profile.lifetime_value.nanos",
        "identifiers[0].value",
    }
    await assert_no_customers(identity)


async def test_every_bad_field_of_a_request_is_reported_at_once(identity) -> None:
    violations = await rejected_resolve(
        identity,
        identity_pb2.ResolveRequest(
            identifiers=[
                ident(EMAIL, "broken@"),
                ident(PHONE, "12"),
                ident(99, "x"),
                ident(EXTERNAL, "id-1"),
            ],
            profile=identity_pb2.Profile(
                lifetime_value=common_pb2.Money(currency_code="eur"),
                attributes={
                    "Bad": common_pb2.AttributeValue(bool_value=True),
                    "long": common_pb2.AttributeValue(string_value="y" * 5000),
                },
            ),
            idempotency_key="k" * 129,
        ),
    )
    assert set(violations) == {
        "identifiers[0].value",
        "identifiers[1].value",
        "identifiers[2].type",
        "identifiers[3].source",
        "profile.lifetime_value.currency_code",
        "profile.attributes[Bad]",
        "profile.attributes[long]",
        "idempotency_key",
    }
    await assert_no_customers(identity)


@pytest.mark.parametrize(
    "ref",
    [
        common_pb2.CustomerRef(customer_id="not-a-uuid"),
        common_pb2.CustomerRef(customer_id=""),
    ],
    ids=["malformed", "empty"],
)
async def test_get_customer_with_a_bad_customer_id_names_the_field(identity, ref) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.GetCustomer(identity_pb2.GetCustomerRequest(customer=ref))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["customer.customer_id"]


async def test_get_customer_without_a_reference_names_the_customer_field(identity) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.GetCustomer(identity_pb2.GetCustomerRequest())
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["customer"]


async def test_get_customer_by_a_malformed_identifier_names_the_identifier_value(
    identity,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.GetCustomer(
            identity_pb2.GetCustomerRequest(
                customer=common_pb2.CustomerRef(identifier=ident(EMAIL, "no at sign"))
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["customer.identifier.value"]


async def test_update_customer_with_an_unknown_mask_path_changes_nothing(identity) -> None:
    created = await identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(profile=identity_pb2.Profile(segment="smb"))
    )
    customer_id = created.customer.customer_id
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.UpdateCustomer(
            identity_pb2.UpdateCustomerRequest(
                customer_id=customer_id,
                profile=identity_pb2.Profile(segment="enterprise", plan="gold"),
                update_mask=field_mask_pb2.FieldMask(paths=["favourite_colour", "segment"]),
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["update_mask.paths[0]"]
    now = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(customer=common_pb2.CustomerRef(customer_id=customer_id))
    )
    assert now.customer.profile.segment == "smb"
    changes = await identity.ListProfileChanges(
        identity_pb2.ListProfileChangesRequest(customer_id=customer_id)
    )
    assert [c.field for c in changes.changes] == ["segment"]


async def test_update_customer_without_a_mask_names_the_update_mask(identity) -> None:
    created = await identity.CreateCustomer(identity_pb2.CreateCustomerRequest())
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await identity.UpdateCustomer(
            identity_pb2.UpdateCustomerRequest(
                customer_id=created.customer.customer_id,
                profile=identity_pb2.Profile(segment="enterprise"),
            )
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(field_violations(error.value)) == ["update_mask"]


# --- properties of normalisation (unit level, no server) ----------------------
_LOCAL = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._+-",
    min_size=1,
    max_size=30,
)
_LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=12)
_TLD = st.sampled_from(["com", "org", "net", "io", "fr", "de"])
_EMAILS = st.one_of(
    st.emails(),
    st.builds(lambda local, label, tld: f"{local}@{label}.{tld}", _LOCAL, _LABEL, _TLD),
)
_WHITESPACE = st.text(alphabet=" \t\n\r", max_size=3)
_REGIONS = sorted(phonenumbers.SUPPORTED_REGIONS)
_TYPES = [
    phonenumbers.PhoneNumberType.FIXED_LINE,
    phonenumbers.PhoneNumberType.MOBILE,
    phonenumbers.PhoneNumberType.TOLL_FREE,
]
_FORMATS = [
    phonenumbers.PhoneNumberFormat.E164,
    phonenumbers.PhoneNumberFormat.INTERNATIONAL,
    phonenumbers.PhoneNumberFormat.RFC3966,
]


def _accepted_email(value: str):
    try:
        return normalize(IdentifierKind.EMAIL, value)
    except IdentifierError:
        reject()  # only addresses the validator accepts have properties to check


@settings(max_examples=25, deadline=None)
@given(_EMAILS)
def test_email_normalisation_is_idempotent(value: str) -> None:
    once = _accepted_email(value)
    assert normalize(IdentifierKind.EMAIL, once.value) == once


@settings(max_examples=25, deadline=None)
@given(_EMAILS, _WHITESPACE, _WHITESPACE, st.booleans())
def test_case_and_whitespace_variants_of_an_email_normalise_equal(
    value: str, before: str, after: str, upper: bool
) -> None:
    once = _accepted_email(value)
    variant = before + (value.upper() if upper else value.swapcase()) + after
    assert normalize(IdentifierKind.EMAIL, variant) == once
    assert once.value == once.value.casefold().strip()


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(_REGIONS),
    st.sampled_from(_TYPES),
    st.sampled_from(_FORMATS),
    _WHITESPACE,
)
def test_phone_normalisation_gives_e164_and_is_idempotent(
    region: str, number_type: int, number_format: int, padding: str
) -> None:
    example = phonenumbers.example_number_for_type(region, number_type)
    assume(example is not None)
    expected = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.E164)
    written = padding + phonenumbers.format_number(example, number_format) + padding
    once = normalize(IdentifierKind.PHONE, written)
    assert once.value == expected
    assert normalize(IdentifierKind.PHONE, once.value) == once
    # Written nationally, it needs its region and then normalises the same.
    national = phonenumbers.format_number(example, phonenumbers.PhoneNumberFormat.NATIONAL)
    assert normalize(IdentifierKind.PHONE, national, default_phone_region=region) == once


@settings(max_examples=25, deadline=None)
@given(st.text(alphabet="0123456789 +-().", min_size=1, max_size=20))
def test_any_accepted_phone_string_normalises_idempotently(value: str) -> None:
    try:
        once = normalize(IdentifierKind.PHONE, value, default_phone_region="GB")
    except IdentifierError as error:
        assert error.part == "value"
        return
    assert once.value.startswith("+")
    assert normalize(IdentifierKind.PHONE, once.value) == once

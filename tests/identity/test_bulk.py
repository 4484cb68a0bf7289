"""BulkResolve: client-streamed imports from CRM and service-desk exports."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable

from google.protobuf import field_mask_pb2, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from converge.runtime.errors import read_status
from converge.v1 import common_pb2, identity_pb2
from tests.identity.helpers import CRM, DESK, EMAIL, PHONE, ident


def row(
    ref: str,
    *identifiers: common_pb2.Identifier,
    key: str = "",
    profile: identity_pb2.Profile | None = None,
    mask: list[str] | None = None,
) -> identity_pb2.BulkResolveRequest:
    return identity_pb2.BulkResolveRequest(
        row_ref=ref,
        resolve=identity_pb2.ResolveRequest(
            identifiers=list(identifiers),
            profile=profile,
            idempotency_key=key,
            actor=common_pb2.Actor(name="crm-import"),
        ),
        update_mask=field_mask_pb2.FieldMask(paths=mask or []),
    )


async def stream(rows: Iterable[identity_pb2.BulkResolveRequest]) -> AsyncIterator:
    for item in rows:
        yield item


def crm_export(run: str) -> list[identity_pb2.BulkResolveRequest]:
    """200 rows: 180 good customers, 10 repeating an earlier row's email, 10 broken."""
    rows = []
    for n in range(180):
        rows.append(
            row(
                f"r{n}",
                ident(EMAIL, f"Customer.{n}@Example.com"),
                ident(CRM, f"CRM-{n}"),
                key=f"{run}-r{n}",
                profile=identity_pb2.Profile(segment="smb" if n % 2 else "enterprise"),
            )
        )
    for n in range(10):
        # The same person again, known by a new phone number too.
        rows.append(
            row(
                f"dup{n}",
                ident(EMAIL, f"  customer.{n}@example.COM"),
                ident(PHONE, f"+44 20 7946 {n:04d}"),
                key=f"{run}-dup{n}",
            )
        )
    broken = [
        row("bad-email", ident(EMAIL, "not-an-email"), key=f"{run}-bad-email"),
        row("bad-phone", ident(PHONE, "12"), key=f"{run}-bad-phone"),
        row("empty-value", ident(DESK, ""), key=f"{run}-empty-value"),
        row("unknown-type", ident(99, "x"), key=f"{run}-unknown-type"),
        row("no-identifiers", key=f"{run}-no-identifiers"),
        row(
            "long-attribute",
            ident(EMAIL, "long.attr@example.com"),
            key=f"{run}-long-attribute",
            profile=identity_pb2.Profile(
                attributes={"note": common_pb2.AttributeValue(string_value="z" * 3000)}
            ),
        ),
        row(
            "bad-mask",
            ident(EMAIL, "bad.mask@example.com"),
            key=f"{run}-bad-mask",
            mask=["colour"],
        ),
        row("external-no-source", ident(common_pb2.IDENTIFIER_TYPE_EXTERNAL_ID, "e1")),
        # Two CRM ids for the customers of rows r0 and r1: merge protection refuses.
        row(
            "conflict",
            ident(EMAIL, "customer.0@example.com"),
            ident(EMAIL, "customer.1@example.com"),
            key=f"{run}-conflict",
        ),
        row("bad-key", ident(EMAIL, "bad.key@example.com"), key="k" * 200),
    ]
    return rows[:100] + broken + rows[100:]


EXPECTED_REJECTIONS = {
    "bad-email": "resolve.identifiers[0].value",
    "bad-phone": "resolve.identifiers[0].value",
    "empty-value": "resolve.identifiers[0].value",
    "unknown-type": "resolve.identifiers[0].type",
    "no-identifiers": "resolve.identifiers",
    "long-attribute": "resolve.profile.attributes[note]",
    "bad-mask": "update_mask.paths[0]",
    "external-no-source": "resolve.identifiers[0].source",
    "conflict": "",  # not a bad field: a refused merge
    "bad-key": "resolve.idempotency_key",
}


async def customer_count(identity) -> int:
    listed = await identity.ListCustomers(
        identity_pb2.ListCustomersRequest(page=common_pb2.PageRequest(page_size=1000))
    )
    return len(listed.customers)


async def test_bulk_resolve_counts_rows_and_names_rejected_rows_and_fields(identity) -> None:
    summary = await identity.BulkResolve(stream(crm_export("run")))
    assert summary.received == 200
    assert summary.created == 180
    assert summary.matched == 10
    assert summary.rejected == 10
    assert summary.merged == 0
    assert {r.row_ref: read_status(r.error).field for r in summary.rejections} == (
        EXPECTED_REJECTIONS
    )
    assert all(read_status(r.error).reason for r in summary.rejections)
    assert await customer_count(identity) == 180

    # Rows sharing an email resolved to one customer, which gained the phone.
    found = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(identifier=ident(PHONE, "+442079460003"))
        )
    )
    assert {(i.identifier.type, i.identifier.value) for i in found.customer.identifiers} == {
        (EMAIL, "customer.3@example.com"),
        (CRM, "CRM-3"),
        (PHONE, "+442079460003"),
    }
    assert found.customer.profile.segment == "smb"


async def test_rerunning_an_import_with_the_same_keys_creates_nothing_new(identity) -> None:
    first = await identity.BulkResolve(stream(crm_export("run")))
    assert first.created == 180
    again = await identity.BulkResolve(iter(crm_export("run")))
    assert again.received == 200
    assert again.created == 0
    assert again.matched == 190
    assert again.rejected == 10
    assert await customer_count(identity) == 180


async def test_rows_sharing_an_email_within_one_stream_make_one_customer(identity) -> None:
    summary = await identity.BulkResolve(
        stream(
            [
                row("a", ident(EMAIL, "same@example.com")),
                row("b", ident(EMAIL, "SAME@example.com"), ident(DESK, "u-1")),
                row("c", ident(DESK, "u-1"), ident(PHONE, "+33 1 42 68 53 00")),
            ]
        )
    )
    assert (summary.created, summary.matched, summary.rejected) == (1, 2, 0)
    listed = await identity.ListCustomers(identity_pb2.ListCustomersRequest())
    [customer] = listed.customers
    assert {i.identifier.value for i in customer.identifiers} == {
        "same@example.com",
        "u-1",
        "+33142685300",
    }


async def test_update_mask_upserts_profile_fields_on_existing_customers(identity) -> None:
    existing = await identity.Resolve(
        identity_pb2.ResolveRequest(
            identifiers=[ident(CRM, "CRM-9")],
            profile=identity_pb2.Profile(segment="smb", plan="free", region="emea"),
        )
    )
    summary = await identity.BulkResolve(
        stream(
            [
                row(
                    "upsert",
                    ident(CRM, "CRM-9"),
                    profile=identity_pb2.Profile(segment="enterprise", plan="premium"),
                    mask=["plan"],
                ),
                row(
                    "plain",
                    ident(CRM, "CRM-9"),
                    profile=identity_pb2.Profile(region="apac"),
                ),
                row(
                    "new",
                    ident(CRM, "CRM-10"),
                    profile=identity_pb2.Profile(segment="smb", owner_team="south"),
                    mask=["owner_team"],
                ),
            ]
        )
    )
    assert (summary.created, summary.matched, summary.rejected) == (1, 2, 0)
    after = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(customer_id=existing.customer.customer_id)
        )
    )
    profile = after.customer.profile
    # Only the masked field changes on a found customer; without a mask the
    # row's profile applies to new customers only.
    assert (profile.segment, profile.plan, profile.region) == ("smb", "premium", "emea")
    created = await identity.GetCustomer(
        identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(identifier=ident(CRM, "CRM-10"))
        )
    )
    assert (created.customer.profile.segment, created.customer.profile.owner_team) == (
        "smb",
        "south",
    )


async def test_empty_stream_is_an_empty_summary(identity) -> None:
    summary = await identity.BulkResolve(stream([]))
    assert summary == identity_pb2.BulkResolveResponse()


async def test_a_resent_row_with_a_changed_update_mask_is_not_taken_for_a_replay(identity) -> None:
    def row(mask: list[str]) -> identity_pb2.BulkResolveRequest:
        return identity_pb2.BulkResolveRequest(
            row_ref="1",
            resolve=identity_pb2.ResolveRequest(
                identifiers=[ident(EMAIL, "mask@example.com")],
                profile=identity_pb2.Profile(segment="smb", plan="gold"),
                idempotency_key="crm:row-1",
            ),
            update_mask=field_mask_pb2.FieldMask(paths=mask),
        )

    first = await identity.BulkResolve(iter([row(["segment"])]))
    replay = await identity.BulkResolve(iter([row(["segment"])]))
    changed = await identity.BulkResolve(iter([row(["segment", "plan"])]))
    assert (first.created, replay.rejected) == (1, 0)
    assert changed.rejected == 1 and read_status(changed.rejections[0].error).field.endswith(
        "idempotency_key"
    )


def bad_rows(run: str) -> dict[str, tuple[identity_pb2.BulkResolveRequest, str]]:
    """Rows that once failed a whole stream, each with the field it must be
    rejected for."""
    far = timestamp_pb2.Timestamp(seconds=10**13)
    return {
        "nul-name": (
            row(
                "nul-name",
                ident(EMAIL, f"nul.name.{run}@example.com"),
                profile=identity_pb2.Profile(display_name="Ada\x00"),
            ),
            "resolve.profile.display_name",
        ),
        "nul-attribute": (
            row(
                "nul-attribute",
                ident(EMAIL, f"nul.attr.{run}@example.com"),
                profile=identity_pb2.Profile(
                    attributes={"note": common_pb2.AttributeValue(string_value="\x00")}
                ),
            ),
            "resolve.profile.attributes[note]",
        ),
        "nul-identifier": (
            row("nul-identifier", ident(DESK, "desk\x00user")),
            "resolve.identifiers[0].value",
        ),
        "far-signup": (
            row(
                "far-signup",
                ident(EMAIL, f"far.{run}@example.com"),
                profile=identity_pb2.Profile(signup_date=far),
            ),
            "resolve.profile.signup_date",
        ),
        "huge-identifier": (
            row("huge-identifier", ident(DESK, "u" * 100_000)),
            "resolve.identifiers[0].value",
        ),
        "r" * 5000: (row("r" * 5000, ident(EMAIL, f"long.ref.{run}@example.com")), "row_ref"),
        # Same key as row "first-of-key" below, for another person.
        "second-of-key": (
            row("second-of-key", ident(EMAIL, f"second.{run}@example.com"), key=f"{run}-k"),
            "resolve.idempotency_key",
        ),
    }


async def test_bad_rows_are_rejected_one_by_one_and_the_stream_goes_on(identity) -> None:
    """Each bad row is rejected with its row reference and the field at fault;
    the good rows around them are stored; a resend gives the same answer and
    stores nothing twice."""
    bad = bad_rows("b")
    good = [row(f"g{n}", ident(EMAIL, f"good.{n}@example.com"), key=f"g{n}") for n in range(6)]
    first_of_key = row("first-of-key", ident(EMAIL, "first.b@example.com"), key="b-k")
    sent = [first_of_key, *good[:3], *(r for r, _ in bad.values()), *good[3:]]
    for attempt in range(2):
        reply = await identity.BulkResolve(stream(sent))
        assert reply.received == len(sent)
        assert (reply.created, reply.matched) == ((7, 0) if attempt == 0 else (0, 7))
        rejected = {r.row_ref: read_status(r.error).field for r in reply.rejections}
        assert rejected == {ref[:128]: field for ref, (_, field) in bad.items()}
    assert await customer_count(identity) == 7


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    texts=st.lists(st.text(max_size=300), min_size=1, max_size=6),
    keys=st.lists(st.sampled_from(["", "k1", "k2"]), min_size=6, max_size=6),
)
async def test_generated_rows_never_fail_a_stream(identity, texts: list[str], keys) -> None:
    """Whatever text lands in a row's identifiers, profile, actor or key, the
    stream answers: every row is counted once as created, matched or rejected."""
    run = uuid.uuid4().hex[:8]
    sent = []
    for n, text in enumerate(texts):
        sent.append(
            identity_pb2.BulkResolveRequest(
                row_ref=f"{run}-{n}",
                resolve=identity_pb2.ResolveRequest(
                    identifiers=[ident([DESK, EMAIL, PHONE][n % 3], text or "x")],
                    profile=identity_pb2.Profile(
                        display_name=text,
                        attributes={"note": common_pb2.AttributeValue(string_value=text)},
                    ),
                    actor=common_pb2.Actor(name=text[:200], reason=text),
                    idempotency_key=f"{run}-{keys[n]}" if keys[n] else "",
                ),
            )
        )
    for _ in range(2):  # a resend answers as well
        reply = await identity.BulkResolve(stream(sent))
        assert reply.received == len(sent)
        assert reply.created + reply.matched + reply.rejected == len(sent)
        assert {r.row_ref for r in reply.rejections} <= {s.row_ref for s in sent}
        nul = {s.row_ref for s, t in zip(sent, texts, strict=True) if "\x00" in t}
        assert nul <= {r.row_ref for r in reply.rejections}


async def test_a_call_of_5000_rows_lists_every_rejected_row(identity) -> None:
    """converge import streams calls of up to 5,000 rows and learns each
    rejected row's line from the answer: every rejection of such a call is
    listed (1,000 were, when calls were that small)."""
    rows = [row(f"bad-{n}", ident(EMAIL, f"not an email {n}")) for n in range(1500)]
    messages = [identity_pb2.BulkResolveRequest(rows=rows[i : i + 500]) for i in (0, 500, 1000)]
    summary = await identity.BulkResolve(iter(messages))
    assert (summary.received, summary.rejected) == (1500, 1500)
    assert {r.row_ref for r in summary.rejections} == {f"bad-{n}" for n in range(1500)}

"""A row is imported whole or rejected whole (issue 13, item 7): a CRM export
with a profile, an extra phone identifier and an interaction per row, through
the real identity and interactions services.

- A malformed optional phone is dropped with a warning (`on_invalid: drop`),
  and the row's profile and interaction are stored.
- With `on_invalid: reject`, the same row is rejected whole: no profile, no
  customer, no interaction.
- A row identity refuses for its profile sends no interaction either (they
  used to create the customer anyway), and the summary counts each row once."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from converge.connectors.importer import import_file
from converge.connectors.mapping import parse_mapping
from converge.v1 import common_pb2, identity_pb2, interactions_pb2

CSV = """crm_id,phone,plan,when
C-1,+33 6 12 34 56 78,fiber,2026-01-05T10:00:00Z
C-2,not a phone,dsl,2026-01-06T10:00:00Z
C-3,+44 20 7946 0958,dsl,2026-01-07T10:00:00Z
C-4,+1 202 555 0143,dsl,2026-01-08T10:00:00Z
"""

MAPPING = """
version: 1
description: CRM export with a login per row
source: crm
file: {{format: csv, header: true}}
missing_values: [""]
customer:
  identifier: {{type: CRM_ID, column: crm_id}}
  extra_identifiers:
    - {{type: PHONE, column: phone, on_invalid: {on_invalid}}}
profile:
  plan: {{column: plan}}
  display_name: {{template: "{{crm_id}}\\u0000"}}
interaction:
  type: {{value: product.login}}
  occurred_at: {{column: when, format: iso}}
  channel: {{value: WEB}}
  idempotency_key: "{{crm_id}}:{{when}}"
"""


def _mapping(on_invalid: str, *, poison_crm: str | None = None) -> str:
    text = MAPPING.format(on_invalid=on_invalid)
    if poison_crm is None:  # no NUL in any display name: every profile is valid
        return text.replace('  display_name: {template: "{crm_id}\\u0000"}\n', "")
    # Only the poisoned customer's display name carries a NUL, which identity refuses.
    return text.replace(
        'display_name: {template: "{crm_id}\\u0000"}',
        f'display_name: {{column: crm_id, map: {{"{poison_crm}": "bad\\u0000name"}}, unmapped: keep}}',
    )


async def _customer(platform, crm_id: str) -> identity_pb2.Customer | None:
    ref = common_pb2.CustomerRef(
        identifier=common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_CRM_ID, value=crm_id)
    )
    try:
        reply = await platform.identity.GetCustomer(identity_pb2.GetCustomerRequest(customer=ref))
    except grpc.aio.AioRpcError as error:
        assert error.code() == grpc.StatusCode.NOT_FOUND
        return None
    return reply.customer


async def _logins(platform, customer_id: str) -> int:
    page = await platform.interactions.ListInteractions(
        interactions_pb2.ListInteractionsRequest(
            customer=common_pb2.CustomerRef(customer_id=customer_id)
        )
    )
    return len(page.interactions)


async def _import(platform, tmp_path: Path, mapping_text: str, csv: str = CSV):
    path = tmp_path / "crm.csv"
    path.write_text(csv, encoding="utf-8")
    return await import_file(
        path,
        parse_mapping(mapping_text, "test-mapping"),
        identity_address=platform.identity_address,
        interactions_address=platform.interactions_address,
    )


async def test_a_malformed_optional_phone_is_dropped_and_the_row_kept_whole(
    platform, tmp_path: Path
) -> None:
    summary = await _import(platform, tmp_path, _mapping("drop"))
    assert (summary.read, summary.accepted, summary.rejected) == (4, 4, 0)
    assert summary.identifiers_dropped == 1
    [warning] = summary.warning_reasons
    assert "identifiers[1]" in warning and "dropped" in warning
    kept = await _customer(platform, "C-2")
    assert kept is not None and kept.profile.plan == "dsl"
    assert [i.identifier.type for i in kept.identifiers] == [common_pb2.IDENTIFIER_TYPE_CRM_ID]
    assert await _logins(platform, kept.customer_id) == 1
    other = await _customer(platform, "C-3")
    assert other is not None
    assert common_pb2.IDENTIFIER_TYPE_PHONE in {i.identifier.type for i in other.identifiers}

    # A re-run sends the same requests (the lighter row under its own key):
    # nothing is created twice and the row is still kept whole.
    again = await _import(platform, tmp_path, _mapping("drop"))
    assert (again.customers_created, again.stored, again.duplicates) == (0, 0, 4)
    assert (again.accepted, again.rejected) == (4, 0)


@pytest.mark.parametrize("how", ["on_invalid reject", "profile refused"])
async def test_a_rejected_row_writes_neither_profile_nor_interaction(
    platform, tmp_path: Path, how: str
) -> None:
    if how == "on_invalid reject":
        summary = await _import(platform, tmp_path, _mapping("reject"))
    else:  # a valid phone, but a profile value identity refuses
        summary = await _import(
            platform,
            tmp_path,
            _mapping("drop", poison_crm="C-2"),
            CSV.replace("C-2,not a phone", "C-2,+33 6 98 76 54 32"),
        )
    assert (summary.read, summary.accepted, summary.rejected) == (4, 3, 1)
    assert summary.customers_created == 3  # never "created 4" beside "rejected 1"
    assert summary.interactions_withheld == 1 and summary.stored == 3
    [rejection] = summary.rejections
    assert (rejection.line, rejection.by) == (3, "identity")
    assert await _customer(platform, "C-2") is None
    for crm_id in ("C-1", "C-3", "C-4"):
        found = await _customer(platform, crm_id)
        assert found is not None and await _logins(platform, found.customer_id) == 1

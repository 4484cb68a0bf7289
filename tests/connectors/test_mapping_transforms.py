"""Mappings that fit real exports (issue 13, item 6): value transforms
(decimal commas, grouping marks, scale, clamp, several time formats), fields
set only when a condition holds, and several interactions from one row.
Pure mapping: no service is called."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from converge.connectors.mapping import MappingError, parse_mapping
from converge.connectors.transform import MappedRow, MapResult, RejectedRow, map_file

BILLING = """\
account;when;status;fee;discount;tv;phone;internet
A-1;05/01/2026 10:00;paid;1.234,50;150;yes;no;yes
A-2;2026-01-06T09:30:00Z;open;12,00;-20;no;yes;no
A-3;07.01.2026;cancelled;99,90;40;yes;yes;yes
A-4;someday;paid;1,00;0;no;no;no
"""

MAPPING = """\
version: 1
description: Billing export with a cancellation row per account
source: billing
file: {format: csv, delimiter: ";", header: true}
customer:
  identifier: {type: CRM_ID, column: account}
interactions:
  - when: {column: status, equals: paid}
    type: {value: billing.invoice_paid}
    occurred_at: {column: when, format: ["%d/%m/%Y %H:%M", iso, "%d.%m.%Y"]}
    channel: {value: EMAIL}
    attributes:
      fee: {column: fee, type: number, decimal: ",", thousands: "."}
      discount_rate: {column: discount, type: number, scale: 0.01, clamp: [0, 1]}
      fee_when_open: {column: fee, type: number, decimal: ",", thousands: ".", when: {column: status, equals: open}}
    idempotency_key: "{account}:paid"
  - when: {column: status, equals: cancelled}
    type: {value: subscription.cancelled}
    occurred_at: {column: when, format: ["%d/%m/%Y %H:%M", iso, "%d.%m.%Y"]}
    channel: {value: PHONE}
    product_id: {value: tv}
    idempotency_key: "{account}:cancelled:tv"
  - when: {all: [{column: status, equals: cancelled}, {column: phone, equals: "yes"}]}
    type: {value: subscription.cancelled}
    occurred_at: {column: when, format: ["%d/%m/%Y %H:%M", iso, "%d.%m.%Y"]}
    channel: {value: PHONE}
    product_id: {value: phone}
    idempotency_key: "{account}:cancelled:phone"
"""


def _map(tmp_path: Path, mapping: str = MAPPING, data: str = BILLING) -> list[MapResult]:
    path = tmp_path / "billing.csv"
    path.write_text(data, encoding="utf-8")
    return list(map_file(path, parse_mapping(mapping, "billing"), origin="billing"))


def test_values_are_converted_as_the_export_writes_them(tmp_path: Path) -> None:
    results = _map(tmp_path)
    paid = next(r for r in results if isinstance(r, MappedRow) and r.line == 2)
    [invoice] = [i.interaction for i in paid.ingests]
    assert invoice.type == "billing.invoice_paid"
    assert invoice.attributes["fee"].number_value == 1234.5  # "1.234,50"
    assert invoice.attributes["discount_rate"].number_value == 1.0  # 150 % held to 1
    assert "fee_when_open" not in invoice.attributes  # its condition does not hold
    when = invoice.occurred_at.ToDatetime(tzinfo=UTC)
    assert when == datetime(2026, 1, 5, 10, 0, tzinfo=UTC)  # the first of the formats


def test_an_open_account_makes_no_interaction_and_a_bad_time_names_every_format(
    tmp_path: Path,
) -> None:
    results = {r.line: r for r in _map(tmp_path)}
    open_row = results[3]
    assert isinstance(open_row, MappedRow) and open_row.ingests == ()
    bad = results[5]
    assert isinstance(bad, RejectedRow)
    assert "someday" in bad.detail and "%d.%m.%Y" in bad.detail and "iso" in bad.detail


def test_a_cancellation_row_becomes_one_cancellation_per_product_held(tmp_path: Path) -> None:
    results = {r.line: r for r in _map(tmp_path)}
    cancelled = results[4]
    assert isinstance(cancelled, MappedRow)
    assert [(i.interaction.product_id, i.idempotency_key) for i in cancelled.ingests] == [
        ("tv", "A-3:cancelled:tv"),
        ("phone", "A-3:cancelled:phone"),
    ]
    assert cancelled.ingests[0].interaction.occurred_at.ToDatetime(tzinfo=UTC) == datetime(
        2026, 1, 7, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("scale: 0.01, clamp: [0, 1]", "scale: 0.01, clamp: [1, 0]", "clamp"),
        ("scale: 0.01", "scale: 0", "scale"),
        (
            'decimal: ",", thousands: "."}\n      discount',
            'decimal: ",", thousands: ","}\n      discount',
            "thousands",
        ),
        ("product_id: {value: tv}", "product_id: {value: tv, scale: 2}", "scale"),
        (
            "when: {column: status, equals: paid}",
            "when: {column: state, equals: paid}",
            "interactions[0].when",
        ),
    ],
)
def test_transform_errors_name_the_key(tmp_path: Path, old: str, new: str, expected: str) -> None:
    assert old in MAPPING
    with pytest.raises(MappingError) as raised:
        _map(tmp_path, MAPPING.replace(old, new, 1))
    assert expected in str(raised.value)


def test_interaction_and_interactions_together_are_refused() -> None:
    single = textwrap.dedent("""\
        interaction:
          type: {value: product.login}
          occurred_at: {column: when}
          channel: {value: WEB}
          idempotency_key: "{account}"
        """)
    with pytest.raises(MappingError, match="not both"):
        parse_mapping(MAPPING + single, "billing")

"""The importer's streaming client against the real identity and interactions
services: rows cut into calls, line numbers and keys on the wire, the
services' answers summed, their rejections counted by reason, and failures
reported with the service's address."""

from __future__ import annotations

from pathlib import Path

import pytest

from converge.connectors.importer import ServiceUnavailable, import_file
from converge.connectors.mapping import load_mapping
from converge.v1 import common_pb2, interactions_pb2
from tests.conftest import free_port


def purchases(tmp_path: Path) -> Path:
    path = tmp_path / "log.txt"
    rows = [f"{n:05d} 199701{(n % 28) + 1:02d} 1 {n}.50" for n in range(1, 11)]
    rows[1] = "00002 20990103 1 1.00"  # the service rejects it: in the future
    rows[3] = "00004 20990105 1 2.00"  # the service rejects it too
    rows[6] = "00007 1997-01-08 1 2.00"  # the mapping rejects it
    path.write_text("customer_id date number_of_cds dollar_value\n" + "\n".join(rows) + "\n")
    return path


async def test_rows_go_out_in_calls_with_line_numbers_and_the_answers_add_up(
    platform, tmp_path: Path
) -> None:
    path = purchases(tmp_path)
    mapping = load_mapping("cdnow_purchases")
    seen: list[tuple[str, int]] = []

    summary = await import_file(
        path,
        mapping,
        identity_address=platform.identity_address,
        interactions_address=platform.interactions_address,
        batch_size=4,
        progress=lambda phase, n: seen.append((phase, n)),
    )
    assert (summary.read, summary.mapped, summary.rejected_locally) == (10, 9, 1)
    assert (summary.sent, summary.stored, summary.duplicates) == (9, 7, 0)
    assert summary.interactions_rejected == 2
    assert summary.rejected == 3
    assert summary.rejection_reasons == {
        "date: not a time in format %Y%m%d": 1,
        "[interactions] interaction.occurred_at: in the future": 2,
    }
    assert {(r.line, r.by) for r in summary.rejections} == {
        (8, "mapping"),
        (3, "interactions"),
        (5, "interactions"),
    }
    assert seen[-1] == ("interactions", 10)

    stored = platform.interactions.StreamInteractions(interactions_pb2.StreamInteractionsRequest())
    keys = [m.interaction.idempotency_key async for m in stored]
    assert keys[0] == "00001:19970102:1"
    assert len(keys) == 7

    again = await import_file(
        path,
        mapping,
        identity_address=platform.identity_address,
        interactions_address=platform.interactions_address,
        batch_size=100,
    )
    assert (again.sent, again.stored, again.duplicates) == (9, 0, 7)
    timeline = await platform.interactions.ListInteractions(
        interactions_pb2.ListInteractionsRequest(
            customer=common_pb2.CustomerRef(
                identifier=common_pb2.Identifier(
                    type=common_pb2.IDENTIFIER_TYPE_EXTERNAL_ID, value="00005", source="cdnow"
                )
            )
        )
    )
    [purchase] = timeline.interactions
    assert (purchase.type, purchase.product_id, purchase.amount.units) == ("purchase", "cd", 5)


async def test_an_unreachable_service_is_reported_with_its_address(tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(ServiceUnavailable, match=address):
        await import_file(
            purchases(tmp_path),
            load_mapping("cdnow_purchases"),
            identity_address=address,
            interactions_address=address,
            connect_timeout=0.5,
        )

"""Profiles with their own time (issue 13, item 5): a mapping that names when
a row's values became true imports history as it was, so a profile read as
of an earlier time (what training does at each cutoff) shows the values of
that time; without it, the summary says the values take effect now."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from converge.connectors.importer import import_file
from converge.connectors.mapping import parse_mapping
from converge.runtime.values import timestamp
from converge.v1 import common_pb2, identity_pb2

SNAPSHOTS = """crm_id,plan,snapshot
C-1,dsl,2016-01-01
C-1,fiber,2016-06-01
C-1,dsl,2016-09-01
C-2,fiber,2016-03-01
"""

MAPPING = """
version: 1
description: Monthly CRM snapshots
source: crm
file: {format: csv, header: true}
customer:
  identifier: {type: CRM_ID, column: crm_id}
profile:
  plan: {column: plan}
  effective_at: {column: snapshot, format: "%Y-%m-%d"}
"""


async def _plan(platform, crm_id: str, as_of: datetime | None) -> str:
    request = identity_pb2.GetCustomerRequest(
        customer=common_pb2.CustomerRef(
            identifier=common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_CRM_ID, value=crm_id)
        )
    )
    if as_of is not None:
        request.as_of.CopyFrom(timestamp(as_of))
    reply = await platform.identity.GetCustomer(request)
    return reply.customer.profile.plan


async def _import(platform, tmp_path: Path, mapping: str):
    path = tmp_path / "snapshots.csv"
    path.write_text(SNAPSHOTS, encoding="utf-8")
    return await import_file(
        path,
        parse_mapping(mapping, "snapshots"),
        identity_address=platform.identity_address,
        interactions_address=platform.interactions_address,
    )


async def test_profile_values_are_read_as_they_were_at_each_time(platform, tmp_path: Path) -> None:
    summary = await _import(platform, tmp_path, MAPPING)
    assert (summary.rejected, summary.profiles_effective_now) == (0, False)
    day = lambda y, m, d: datetime(y, m, d, 12, tzinfo=UTC)  # noqa: E731
    assert await _plan(platform, "C-1", day(2015, 12, 1)) == ""  # before any snapshot
    assert await _plan(platform, "C-1", day(2016, 3, 1)) == "dsl"
    assert await _plan(platform, "C-1", day(2016, 7, 1)) == "fiber"
    assert await _plan(platform, "C-1", day(2016, 10, 1)) == "dsl"  # A, B, then A again
    assert await _plan(platform, "C-1", None) == "dsl"
    assert await _plan(platform, "C-2", day(2016, 2, 1)) == ""
    assert await _plan(platform, "C-2", day(2016, 4, 1)) == "fiber"

    again = await _import(platform, tmp_path, MAPPING)  # a re-run changes nothing
    assert (again.customers_created, again.rejected) == (0, 0)
    assert await _plan(platform, "C-1", day(2016, 7, 1)) == "fiber"


async def test_without_effective_at_the_summary_says_values_take_effect_now(
    platform, tmp_path: Path
) -> None:
    mapping = MAPPING.replace('  effective_at: {column: snapshot, format: "%Y-%m-%d"}\n', "")
    summary = await _import(platform, tmp_path, mapping)
    assert summary.profiles_effective_now
    assert summary.as_dict()["profiles_effective_now"] is True
    assert await _plan(platform, "C-2", datetime(2016, 4, 1, tzinfo=UTC)) == ""

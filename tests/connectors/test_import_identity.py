"""The Telco CRM table imported through the real identity service (a real
grpc.aio server on port 0 with the shared runtime, over a real PostgreSQL):
customers created once with their profiles, a re-run creates nothing, and a
changed row upserts its new values. The interactions side of the importer
is covered end to end by the interactions service's own tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import grpc
import pytest

from converge.connectors.importer import ImportSummary, import_file
from converge.connectors.mapping import load_mapping
from converge.identity.app import SPEC
from converge.identity.settings import IdentitySettings
from converge.runtime.server import ServiceRuntime
from converge.v1 import common_pb2, identity_pb2, identity_pb2_grpc
from tests.conftest import shared_dataset

ROWS = 400


@pytest.fixture
async def identity_address(database: str) -> AsyncIterator[str]:
    runtime = ServiceRuntime(SPEC, IdentitySettings(database_url=database, port=0))
    await runtime.start()
    yield runtime.address
    await runtime.stop(grace=1)


@pytest.fixture
def telco_sample(tmp_path: Path) -> Path:
    lines = (
        shared_dataset("telco_churn/Telco-Customer-Churn.csv")
        .read_text(encoding="utf-8")
        .splitlines(keepends=True)
    )
    sample = tmp_path / "telco.csv"
    sample.write_text("".join(lines[: ROWS + 1]), encoding="utf-8")
    return sample


def replace_in(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text
    path.write_text(text.replace(old, new), encoding="utf-8")


async def run(path: Path, address: str) -> ImportSummary:
    return await import_file(
        path,
        load_mapping("telco_customers"),
        origin="telco_customers",
        identity_address=address,
        interactions_address="127.0.0.1:1",  # never contacted: the mapping has no interactions
        batch_size=150,  # several streaming calls
    )


async def customer(address: str, crm_id: str) -> identity_pb2.Customer:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        ref = common_pb2.CustomerRef(
            identifier=common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_CRM_ID, value=crm_id)
        )
        response = await stub.GetCustomer(identity_pb2.GetCustomerRequest(customer=ref))
        return response.customer


async def test_telco_import_creates_each_customer_once_with_its_profile(
    identity_address: str, telco_sample: Path
) -> None:
    first = await run(telco_sample, identity_address)
    assert (first.read, first.mapped, first.rejected) == (ROWS, ROWS, 0)
    assert (first.profiles_sent, first.customers_created, first.customers_matched) == (
        ROWS,
        ROWS,
        0,
    )
    assert first.sent == 0  # profiles only

    found = await customer(identity_address, "7590-VHVEG")
    profile = found.profile
    assert (profile.segment, profile.plan) == ("consumer", "dsl")
    assert profile.attributes["contract"].string_value == "month_to_month"
    assert profile.attributes["tenure_months"].number_value == 1
    assert profile.attributes["churned"].bool_value is False
    assert (profile.lifetime_value.currency_code, profile.lifetime_value.units) == ("USD", 29)

    again = await run(telco_sample, identity_address)
    assert (again.customers_created, again.customers_matched, again.rejected) == (0, ROWS, 0)


async def test_a_changed_row_upserts_its_new_values_on_the_same_customer(
    identity_address: str, telco_sample: Path
) -> None:
    await run(telco_sample, identity_address)
    before = await customer(identity_address, "5575-GNVDE")
    replace_in(telco_sample, "5575-GNVDE,Male,0,No,No,34,", "5575-GNVDE,Male,0,No,No,35,")

    rerun = await run(telco_sample, identity_address)
    assert (rerun.customers_created, rerun.customers_matched, rerun.rejected) == (0, ROWS, 0)
    after = await customer(identity_address, "5575-GNVDE")
    assert after.customer_id == before.customer_id
    assert before.profile.attributes["tenure_months"].number_value == 34
    assert after.profile.attributes["tenure_months"].number_value == 35


async def test_a_reimport_of_the_same_file_writes_nothing_and_says_so(
    identity_address: str, telco_sample: Path, database: str
) -> None:
    """Every row of a re-run is a replay of its first run: no history, no
    event, no customer touched, and the summary counts them all as matched."""
    await run(telco_sample, identity_address)
    tables = ("customers", "identifiers", "profile_changes", "identity_events", "merges")

    async def snapshot() -> tuple[object, ...]:
        connection = await asyncpg.connect(database)
        try:
            counts = [
                await connection.fetchval(f"SELECT count(*) FROM identity.{table}")
                for table in tables
            ]
            touched = await connection.fetchval("SELECT max(updated_at) FROM identity.customers")
        finally:
            await connection.close()
        return (*counts, touched)

    before = await snapshot()
    again = await run(telco_sample, identity_address)
    assert (again.profiles_sent, again.customers_created, again.customers_matched) == (
        ROWS,
        0,
        ROWS,
    )
    assert (again.customers_merged, again.rejected) == (0, 0)
    assert await snapshot() == before


async def test_rows_streamed_in_one_call_are_each_rejected_with_their_line(
    identity_address: str, tmp_path: Path
) -> None:
    """The identity pass streams calls of up to 5,000 rows, 500 a message,
    mapped while they are sent: 1,200 rows identity refuses (an id longer
    than identifiers may be) go in one call, and every one is counted and
    known by its line, none left unlisted."""
    lines = (
        shared_dataset("telco_churn/Telco-Customer-Churn.csv")
        .read_text(encoding="utf-8")
        .splitlines(keepends=True)
    )
    body = [f"{'X' * 300}{n}{line[line.index(',') :]}" for n, line in enumerate(lines[1:1201])]
    export = tmp_path / "refused.csv"
    export.write_text(lines[0] + "".join(body), encoding="utf-8")

    summary = await import_file(
        export,
        load_mapping("telco_customers"),
        origin="telco_customers",
        identity_address=identity_address,
        interactions_address="127.0.0.1:1",
    )
    assert (summary.read, summary.rejected, summary.customers_created) == (1200, 1200, 0)
    assert not any("not listed" in reason for reason in summary.rejection_reasons)
    assert [r.line for r in summary.rejections] == list(range(2, 2 + len(summary.rejections)))

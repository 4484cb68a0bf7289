"""The three real datasets import through the connector with their shipped
mappings into the real services, and what landed matches the files."""

from __future__ import annotations

import csv
from collections import Counter

import asyncpg
import pytest

from converge.connectors.importer import import_file
from converge.connectors.mapping import load_mapping
from tests.conftest import shared_dataset

pytestmark = pytest.mark.slow


async def _import(platform, relative: str, mapping: str):
    return await import_file(
        shared_dataset(relative),
        load_mapping(mapping),
        identity_address=platform.identity_address,
        interactions_address=platform.interactions_address,
    )


async def test_telco_customers_import_as_profiles(platform, database: str) -> None:
    path = shared_dataset("telco_churn/Telco-Customer-Churn.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    summary = await _import(platform, "telco_churn/Telco-Customer-Churn.csv", "telco_customers")
    assert summary.rejected == 0
    connection = await asyncpg.connect(database)
    try:
        customers = await connection.fetchval("SELECT count(*) FROM identity.customers")
        churned = await connection.fetchval(
            "SELECT count(*) FROM identity.customers WHERE profile -> 'attributes.churned' ->> 'b' = 'true'"
        )
    finally:
        await connection.close()
    assert customers == len({r["customerID"] for r in rows}) == 7043
    assert churned == sum(r["Churn"] == "Yes" for r in rows)


async def test_itsm_incident_log_imports_as_tickets(platform, database: str) -> None:
    path = shared_dataset("itsm_incidents_sample/incident_events_first3000.csv")
    with path.open() as f:
        rows = list(csv.DictReader(f))
    summary = await _import(
        platform, "itsm_incidents_sample/incident_events_first3000.csv", "itsm_incidents"
    )
    unknown_callers = sum(r["caller_id"] == "?" for r in rows)
    assert summary.stored == len(rows) - unknown_callers
    assert summary.rejected == unknown_callers
    connection = await asyncpg.connect(database)
    try:
        tickets = await connection.fetch(
            "SELECT ticket_id, count(*) FILTER (WHERE type = 'ticket.opened') AS opened "
            "FROM interactions.interactions GROUP BY ticket_id"
        )
        callers = await connection.fetchval(
            "SELECT count(DISTINCT customer_id) FROM interactions.interactions"
        )
    finally:
        await connection.close()
    assert len(tickets) == len({r["number"] for r in rows}) == 3000
    assert {t["opened"] for t in tickets} == {1}
    assert callers == len({r["caller_id"] for r in rows if r["caller_id"] != "?"})

    again = await _import(
        platform, "itsm_incidents_sample/incident_events_first3000.csv", "itsm_incidents"
    )
    assert (again.stored, again.duplicates) == (0, summary.stored)


async def test_cdnow_purchase_log_imports_as_purchases(platform, database: str) -> None:
    path = shared_dataset("cdnow/CDNOW_master.txt")
    lines = path.read_text().split("\n")[1:]
    rows = [line.split() for line in lines if line.strip()]
    summary = await _import(platform, "cdnow/CDNOW_master.txt", "cdnow_purchases")
    assert (summary.stored, summary.rejected) == (len(rows), 0)
    connection = await asyncpg.connect(database)
    try:
        stored = await connection.fetchrow(
            "SELECT count(*) AS n, count(DISTINCT customer_id) AS customers, sum(amount) AS total "
            "FROM interactions.interactions WHERE type = 'purchase'"
        )
    finally:
        await connection.close()
    assert stored["n"] == len(rows) == 69659
    assert stored["customers"] == len(Counter(r[0] for r in rows)) == 23570
    assert round(float(stored["total"]), 2) == round(sum(float(r[3]) for r in rows), 2)

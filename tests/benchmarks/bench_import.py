"""Profiles through `converge import`: the Telco CRM table's 7,043 customers
with the shipped `telco_customers` mapping, as a user imports them.

The CLI's own `main()` runs in-process (in a thread: it starts its own event
loop), against the identity service started as a real process as every
benchmark starts it; the rows per second are the command's wall time from
parsing its arguments to its summary, so Python's own start (measured by
bench_cli) is left out. Beside it: the CPU seconds the command (client: read,
map, send), the identity service (server: check, resolve, write) and
PostgreSQL spent, to see which side a slow import waits on. Then the same
file again, which changes nothing and says so.

Beside them, in the same run, the floors the import sits on: the same file
only read and mapped (no network; what the command's own CPU allows), and the
same profiles written by hand with COPY into plain tables (a customer with
its profile, its identifier, one history row: no checks, no idempotency, no
events, no merges), which is what the database alone allows.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import time
import uuid
from pathlib import Path

import asyncpg
from google.protobuf import json_format
from rich.console import Console

from converge import cli
from converge.connectors.mapping import load_mapping
from converge.connectors.transform import MappedRow, map_file
from tests.benchmarks.harness import BenchEnv
from tests.conftest import SHARED_DATA

TELCO = SHARED_DATA / "telco_churn" / "Telco-Customer-Churn.csv"
TELCO_ROWS = 7043


def _process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _postgres_cpu_s(work_dir: Path) -> float:
    """User and system CPU seconds so far of the bench's PostgreSQL server
    (the one whose command line names `work_dir`) and of its backends (Linux /proc)."""
    parents: dict[int, int] = {}
    servers: list[int] = []
    cpu: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # (ended meanwhile)
        pid = int(entry.name)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        if b"postgres" in command and str(work_dir).encode() in command:
            servers.append(pid)
    return sum(c for pid, c in cpu.items() if pid in servers or parents[pid] in servers)


def _converge_import(identity: str) -> dict[str, object]:
    """`converge import <telco> --mapping telco_customers --json`; its summary."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(
            ["import", str(TELCO), "--mapping", "telco_customers", "--identity", identity, "--json"]
        )
    assert code == 0, out.getvalue()
    summary: dict[str, object] = json.loads(out.getvalue())
    return summary


def _mapped_rows_per_s() -> tuple[float, list[MappedRow]]:
    """The Telco file read and mapped with the shipped mapping, in this
    process: rows per second, and the rows."""
    mapping = load_mapping("telco_customers")
    started = time.perf_counter()
    rows = [r for r in map_file(TELCO, mapping) if isinstance(r, MappedRow)]
    return len(rows) / (time.perf_counter() - started), rows


async def _raw_copy_rows_per_s(database: str, rows: list[MappedRow]) -> float:
    """The same profiles COPYed into plain tables in one transaction: rows per second."""
    customers, identifiers, history = [], [], []
    for row in rows:
        assert row.resolve is not None
        customer_id = uuid.uuid4()
        profile = json.dumps(json_format.MessageToDict(row.resolve.resolve.profile))
        customers.append((customer_id, profile))
        identifiers.append((int(row.identifier.type), "", row.identifier.value, customer_id))
        history.append((customer_id, profile))
    connection = await asyncpg.connect(database)
    try:
        await connection.execute(
            """
            CREATE TABLE raw_customers (customer_id uuid PRIMARY KEY, profile jsonb NOT NULL,
                                        created_at timestamptz NOT NULL DEFAULT now());
            CREATE TABLE raw_identifiers (kind smallint, source text, value text, customer_id uuid,
                                          PRIMARY KEY (kind, source, value));
            CREATE TABLE raw_history (customer_id uuid NOT NULL, fields jsonb NOT NULL,
                                      effective_at timestamptz NOT NULL DEFAULT now());
            """
        )
        started = time.perf_counter()
        async with connection.transaction():
            await connection.copy_records_to_table(
                "raw_customers", records=customers, columns=["customer_id", "profile"]
            )
            await connection.copy_records_to_table(
                "raw_identifiers",
                records=identifiers,
                columns=["kind", "source", "value", "customer_id"],
            )
            await connection.copy_records_to_table(
                "raw_history", records=history, columns=["customer_id", "fields"]
            )
        return len(rows) / (time.perf_counter() - started)
    finally:
        await connection.close()


async def run(env: BenchEnv) -> dict[str, float]:
    if not TELCO.exists():
        Console(stderr=True).print(
            f"[yellow]skipping bench_import: {TELCO} is absent "
            "(the shared datasets are not on this machine)[/yellow]"
        )
        return {"connectors.import_profiles.rows_per_s": math.nan}
    database = await env.new_database()
    identity = await env.start("identity", database, log_level="WARNING")
    pid = identity.process.pid

    server_before, client_before = _process_cpu_s(pid), time.process_time()
    postgres_before = _postgres_cpu_s(env.work_dir)
    started = time.perf_counter()
    summary = await asyncio.to_thread(_converge_import, identity.address)
    elapsed = time.perf_counter() - started
    server_cpu = _process_cpu_s(pid) - server_before
    client_cpu = time.process_time() - client_before
    postgres_cpu = _postgres_cpu_s(env.work_dir) - postgres_before
    assert (summary["customers_created"], summary["rejected"]) == (TELCO_ROWS, 0), summary

    started = time.perf_counter()
    again = await asyncio.to_thread(_converge_import, identity.address)
    again_elapsed = time.perf_counter() - started
    assert (again["customers_created"], again["customers_matched"]) == (0, TELCO_ROWS), again

    map_rate, mapped = await asyncio.to_thread(_mapped_rows_per_s)
    raw_copy_rate = await _raw_copy_rows_per_s(database, mapped)
    return {
        "connectors.import_profiles.rows_per_s": TELCO_ROWS / elapsed,
        "connectors.import_profiles.map_only_rows_per_s": map_rate,
        "connectors.import_profiles.raw_copy_rows_per_s": raw_copy_rate,
        "connectors.import_profiles.vs_raw_copy": TELCO_ROWS / elapsed / raw_copy_rate,
        "connectors.import_profiles.client_cpu_s": client_cpu,
        "connectors.import_profiles.server_cpu_s": server_cpu,
        "connectors.import_profiles.postgres_cpu_s": postgres_cpu,
        "connectors.import_profiles.reimport_rows_per_s": TELCO_ROWS / again_elapsed,
    }

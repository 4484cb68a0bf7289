"""Profiles through `converge import`: the Telco CRM table's 7,043 customers
with the shipped `telco_customers` mapping, as a user imports them.

The CLI's own `main()` runs in-process (in a thread: it starts its own event
loop), against the identity service started as a real process as every
benchmark starts it; the rows per second are the command's wall time from
parsing its arguments to its summary, so Python's own start (measured by
bench_cli) is left out. Beside it: the CPU seconds the command (client: read,
map, send) and the identity service (server: check, resolve, write) spent,
to see which side a slow import waits on. Then the same file again, which
changes nothing and says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import time
from pathlib import Path

from rich.console import Console

from converge import cli
from tests.benchmarks.harness import BenchEnv
from tests.conftest import SHARED_DATA

TELCO = SHARED_DATA / "telco_churn" / "Telco-Customer-Churn.csv"
TELCO_ROWS = 7043


def _process_cpu_s(pid: int) -> float:
    """User and system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


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
    started = time.perf_counter()
    summary = await asyncio.to_thread(_converge_import, identity.address)
    elapsed = time.perf_counter() - started
    server_cpu = _process_cpu_s(pid) - server_before
    client_cpu = time.process_time() - client_before
    assert (summary["customers_created"], summary["rejected"]) == (TELCO_ROWS, 0), summary

    started = time.perf_counter()
    again = await asyncio.to_thread(_converge_import, identity.address)
    again_elapsed = time.perf_counter() - started
    assert (again["customers_created"], again["customers_matched"]) == (0, TELCO_ROWS), again
    return {
        "connectors.import_profiles.rows_per_s": TELCO_ROWS / elapsed,
        "connectors.import_profiles.client_cpu_s": client_cpu,
        "connectors.import_profiles.server_cpu_s": server_cpu,
        "connectors.import_profiles.reimport_rows_per_s": TELCO_ROWS / again_elapsed,
    }

"""`make bench`: runs every benchmark, prints a table, writes `BENCH_OUT` as
one JSON object of "figure.name": number."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import math
import os
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tests.benchmarks.harness import open_env

BENCHMARKS = ["tests.benchmarks.bench_identity", "tests.benchmarks.bench_interactions"]
BENCHMARKS.append("tests.benchmarks.bench_get_features")
BENCHMARKS.append("tests.benchmarks.bench_followers")
BENCHMARKS.append("tests.benchmarks.bench_contention")
BENCHMARKS.append("tests.benchmarks.bench_models")
BENCHMARKS.append("tests.benchmarks.bench_product_path")
BENCHMARKS.append("tests.benchmarks.bench_cli")
BENCHMARKS.append("tests.benchmarks.bench_import")
BENCHMARKS.append("tests.benchmarks.bench_scoring")
BENCHMARKS.append("tests.benchmarks.bench_prediction_log")
BENCHMARKS.append("tests.benchmarks.bench_webhooks")
BENCHMARKS.append("tests.benchmarks.bench_recommend")
BENCHMARKS.append("tests.benchmarks.bench_alerts")


async def run_all(selected: list[str]) -> tuple[dict[str, float], list[str]]:
    """The figures of every module that ran through, and the modules that
    failed: one failing module must not cost the figures of the others."""
    env, server = open_env()
    figures: dict[str, float] = {}
    failed: list[str] = []
    try:
        for name in selected:
            module = importlib.import_module(name)
            Console(stderr=True).print(f"[bold]running {name}[/bold]")
            try:
                figures.update(await module.run(env))
            except Exception:
                Console(stderr=True).print_exception()
                failed.append(name)
            env.stop_all()
    finally:
        env.stop_all()
        server.stop()
        # The database and the services' logs: about 1 GB after a full run.
        shutil.rmtree(env.work_dir, ignore_errors=True)
    return figures, failed


def main() -> None:
    parser = argparse.ArgumentParser(description="Run Converge's benchmarks.")
    parser.add_argument("--only", action="append", help="benchmark module suffix, e.g. identity")
    args = parser.parse_args()
    selected = [b for b in BENCHMARKS if not args.only or any(b.endswith(o) for o in args.only)]
    figures, failed = asyncio.run(run_all(selected))

    table = Table(title="Converge benchmarks")
    table.add_column("figure")
    table.add_column("value", justify="right")
    for name, value in figures.items():
        table.add_row(name, "n/a" if math.isnan(value) else f"{value:,.3f}")
    Console().print(table)

    out = Path(os.environ.get("BENCH_OUT", "bench-results.json"))
    existing = json.loads(out.read_text()) if out.exists() and args.only else {}
    out.write_text(json.dumps({**existing, **figures}, indent=2, sort_keys=True) + "\n")
    Console().print(f"wrote {len(figures)} figures to {out}")
    if failed:
        Console(stderr=True).print(f"[red]failed: {', '.join(failed)}[/red] (traceback above)")
        raise SystemExit(1)


if __name__ == "__main__":
    main()

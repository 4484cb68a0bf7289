"""The `converge` command as a user starts it: how long `converge --help`
and `converge models --help` take, end to end (a new Python process each
time), beside a bare `python -c pass` measured in the same run."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from tests.benchmarks.harness import BenchEnv

RUNS = 7
CONVERGE = Path(sys.executable).with_name("converge")


def _median_wall_s(argv: list[str]) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(argv, check=True, capture_output=True, timeout=120)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def run(env: BenchEnv) -> dict[str, float]:
    bare = _median_wall_s([sys.executable, "-c", "pass"])
    help_s = _median_wall_s([str(CONVERGE), "--help"])
    models_help_s = _median_wall_s([str(CONVERGE), "models", "--help"])
    return {
        "cli.help_s": help_s,
        "cli.models_help_s": models_help_s,
        "cli.python_start_s": bare,
    }

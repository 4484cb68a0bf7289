"""A dataset through the product's own path, as a user runs it, timed.

Identity and interactions run as separate processes (`python -m
converge.identity`, `python -m converge.interactions`, the interactions
service with `CONVERGE_INTERACTIONS_FEATURE_SET` naming the shipped feature
set), over a database of a PostgreSQL the caller started (the bench
harness's or the test session's embedded one); models go to a local MLflow
store in a temporary folder (`CONVERGE_DATA_DIR`, so the registry's default
SQLite store and its artifacts land there, never in the source tree). Then
the two commands a user types run as processes:

    converge import FILE --mapping NAME --json
    converge models train PREDICTION --from-services --definitions NAME --json

Nothing here knows a dataset: the dataset's name picks the shipped mapping,
feature set and definitions, all three called after it (see `RECIPES`).

Why it lives with the benchmarks and not in `converge.models`: it starts
services and databases to measure the product from outside, which the
product itself never does (the models package would otherwise depend on
how services are launched); the bench and tests/test_product_path.py both use
it.

Peak memory: the train command's own peak resident set, from `os.wait4` on
its process id (ru_maxrss, KiB on Linux). It counts that process and any
children it waited for, and nothing else (not the services, not an earlier
import), which `getrusage(RUSAGE_CHILDREN)` cannot say once two commands
have run.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.service_process import ServiceProcess, start_service, stop_process

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Recipe:
    """One dataset: its file, the shipped configuration it uses (a mapping,
    a feature set and prediction definitions, all of one name) and the
    prediction trained."""

    name: str
    relative_path: str
    prediction: str
    mapping: str
    feature_set: str
    definitions: str


RECIPES = {
    "telco": Recipe(
        "telco",
        "telco_churn/Telco-Customer-Churn.csv",
        "churn",
        "telco_customers",
        "telco_customers",
        "telco_customers",
    ),
    "cdnow": Recipe(
        "cdnow",
        "cdnow/CDNOW_master.txt",
        "churn",
        "cdnow_purchases",
        "cdnow_purchases",
        "cdnow_purchases",
    ),
    "itsm_sample": Recipe(
        "itsm_sample",
        "itsm_incidents_sample/incident_events_first3000.csv",
        "escalation",
        "itsm_incidents",
        "itsm_incidents",
        "itsm_incidents",
    ),
}


@dataclass(frozen=True)
class Step:
    """One command as it ran: what was typed, how long it took, its peak
    memory, its exit code and its JSON answer."""

    argv: tuple[str, ...]
    seconds: float
    peak_rss_mb: float
    exit_code: int
    answer: Any
    stderr: str

    def check(self, accepted: tuple[int, ...] = (0,)) -> Step:
        if self.exit_code not in accepted:
            raise CommandFailed(self)
        return self


class CommandFailed(RuntimeError):
    def __init__(self, step: Step) -> None:
        super().__init__(
            f"`{' '.join(step.argv)}` exited {step.exit_code}:\n{step.stderr[-4000:]}\n"
            f"answer: {step.answer!r}"
        )
        self.step = step


@dataclass
class ProductPath:
    """The running services and the local MLflow store of one dataset."""

    identity: ServiceProcess
    interactions: ServiceProcess
    work_dir: Path

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.work_dir / 'mlflow' / 'mlflow.db'}"

    def env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
        }
        env.update(
            CONVERGE_DATA_DIR=str(self.work_dir),
            CONVERGE_IDENTITY_ADDRESS=self.identity.address,
            CONVERGE_INTERACTIONS_ADDRESS=self.interactions.address,
            MLFLOW_DISABLE_TELEMETRY="true",
        )
        return env

    def converge(self, *args: str, timeout: float = 1800.0) -> Step:
        """`converge ARGS...` as a process (the installed command a user
        types), from a folder of its own."""
        argv = (str(Path(sys.executable).parent / "converge"), *args)
        return run_command(argv, self.env(), self.work_dir, timeout)

    def import_file(self, path: Path, mapping: str, limit: int | None = None) -> Step:
        extra = ("--limit", str(limit)) if limit is not None else ()
        return self.converge(
            "import", str(path), "--mapping", mapping, *self.addresses(), "--json", *extra
        )

    def addresses(self) -> tuple[str, ...]:
        return ("--identity", self.identity.address, "--interactions", self.interactions.address)

    def train(self, prediction: str, definitions: str, *extra: str) -> Step:
        return self.converge(
            "models",
            "train",
            prediction,
            "--from-services",
            *self.addresses(),
            "--definitions",
            definitions,
            "--json",
            *extra,
        )


def run_command(argv: Sequence[str], env: dict[str, str], cwd: Path, timeout: float) -> Step:
    """Runs one command to its end: wall time, exit code, its JSON answer
    (the last JSON value it printed; None when it printed none) and its peak
    resident set: the high-water mark of its own memory (`VmHWM` in
    /proc/PID/status, read while it runs; it only grows). Not `ru_maxrss` from
    `os.wait4`: Linux carries the pre-exec image into it, so a command forked
    from a bench process holding 2.7 GB reported 2.7 GB whatever it used.
    Where /proc is absent, `ru_maxrss` it is."""
    import subprocess

    out_path, err_path = cwd / "command.out", cwd / "command.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(list(argv), env=env, cwd=cwd, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        high_water_kb = 0
        while True:
            high_water_kb = max(high_water_kb, _high_water_kb(process.pid))
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid == process.pid:
                break
            if time.monotonic() > deadline:
                process.kill()
                pid, status, usage = os.wait4(process.pid, 0)
                break
            time.sleep(0.05)  # polls the child's end; it measures, never synchronises
        seconds = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return Step(
        tuple(argv),
        seconds,
        (high_water_kb or usage.ru_maxrss) / 1024,
        process.returncode,
        _last_json(out_path.read_text(errors="replace")),
        err_path.read_text(errors="replace"),
    )


def _high_water_kb(pid: int) -> int:
    """The process's peak resident set so far (kB), 0 when unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _last_json(text: str) -> Any:
    """The last JSON value of a command's output (the commands print one,
    possibly over several lines; anything before it is ignored)."""
    decoder = json.JSONDecoder()
    found: Any = None
    index = 0
    while (start := _next_open(text, index)) >= 0:
        try:
            found, index = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            index = start + 1
    return found


def _next_open(text: str, index: int) -> int:
    positions = [p for p in (text.find("{", index), text.find("[", index)) if p >= 0]
    return min(positions, default=-1)


@asynccontextmanager
async def product_path(
    database_url: str, feature_set: str = "", work_dir: Path | None = None
) -> AsyncIterator[ProductPath]:
    """Identity and interactions as processes over `database_url` (an empty
    database), the interactions service with `feature_set` (empty: the
    built-in set), and a temporary MLflow store; all stopped and removed at
    the end."""
    import shutil

    own_dir = work_dir is None
    folder = work_dir or Path(tempfile.mkdtemp(prefix="converge-product-path-"))
    identity = await start_service("identity", database_url, folder, log_level="WARNING")
    try:
        settings = {"feature_set": feature_set} if feature_set else {}
        interactions = await start_service(
            "interactions",
            database_url,
            folder,
            log_level="WARNING",
            identity_address=identity.address,
            **settings,
        )
        try:
            yield ProductPath(identity, interactions, folder)
        finally:
            stop_process(interactions)
    finally:
        stop_process(identity)
        if own_dir:
            shutil.rmtree(folder, ignore_errors=True)


@dataclass(frozen=True)
class Outcome:
    """A dataset imported then trained on: both steps as they ran."""

    recipe: Recipe
    imported: Step
    trained: Step

    @property
    def auc(self) -> float:
        return float(self.trained.answer["roc_auc"])


async def run_recipe(
    recipe: Recipe,
    database_url: str,
    data_dir: Path = SHARED_DATA,
    limit: int | None = None,
    work_dir: Path | None = None,
) -> Outcome:
    """Imports the dataset with its shipped mapping and trains its prediction
    from the services with its shipped definitions."""
    async with product_path(database_url, recipe.feature_set, work_dir) as path:
        imported = path.import_file(data_dir / recipe.relative_path, recipe.mapping, limit)
        imported.check(accepted=(0, 1))  # 1: some rows rejected, each with its reason
        trained = path.train(recipe.prediction, recipe.definitions).check()
        return Outcome(recipe, imported, trained)

"""Scoring: Score and ScoreBatch of the scoring service beside three
references, side by side in one run, all driven by one load generator
(`tests/benchmarks/load.py`: 4 channels, closed-loop callers, pre-built
requests).

The ground: a simulated world (`converge.models.simulator`) of `CUSTOMERS`
customers ending today; each prediction's model trained on it the fastest
honest way (the built-in definitions, in-process frames, a short training
config), logged and registered through `ModelRegistry.log_training` into a
fresh MLflow SQLite store (with everything serving checks) and promoted
through the gates; churn registered a second time (the same booster, a new
version) for the swap. Then
`SCORED_WORLD` new customers of the same population (another seed, the same
days) are resolved in a real identity service and their interactions
ingested into a real interactions service (`simulator.feed`), so Score
reads live features of customers the models never saw.

Figures:

- `scoring.raw_booster.rows_per_s`: the model ceiling. The churn champion's
  raw `lightgbm.Booster.predict` on its serving input matrix (the test
  part's rows as `serving_artifacts.input_matrix` builds them), in batches
  of the scoring service's coalescing size, with its LightGBM thread count
  (`ScoringSettings` defaults); `..contrib_rows_per_s` the same with
  `pred_contrib` (what reasons need).
- `scoring.grpc_echo.c16.calls_per_s`: the transport ceiling. A bare
  grpc.aio server in its own process answering Score with the bytes of a
  real Score answer (taken from the service), at 16 callers;
  `scoring.grpc_echo.stream.items_per_s` the same server answering each
  message of one ScoreBatch stream (the very items the service was sent)
  with the bytes of a real ScoreBatch answer: what a stream of one item per
  message costs the transport, the ceiling of `score_batch.customers_per_s`
  (`scoring.score_batch.vs_grpc_echo_stream`).
- `scoring.mlflow_serve.c16.calls_per_s`: `mlflow models serve` of the same
  churn version (`--env-manager local`, its default single worker), its
  `/invocations` JSON (one row of the model's inputs per call,
  `dataframe_split`) at 16 callers over HTTP keep-alive connections.
- The scoring service as a process of its own (`python -m converge.scoring`):
  Score of all three predictions (churn, the customer's latest ticket, two
  products they do not hold) with reasons at 1, 16 and 64 callers;
  ScoreBatch of churn with reasons over one stream (customers per second),
  against the raw booster; and the failed calls while a promotion swaps the
  churn champion under 16 callers (promoted through the registry, the
  service picks it up at its poll; the run ends `SWAP_AFTER_S` after
  `GetModelStatus` reports the new version). Where the time goes:
  `scoring.score.c16.cpu_ms_per_call.<process>`, the CPU each process of
  the chain (scoring, interactions, identity, this run's PostgreSQL) spent
  per Score call at 16 callers: on a machine shared with other work,
  latency is mostly waiting for a core, CPU per call is what a change moves.
- `scoring.oip.c16.calls_per_s`: the Open Inference Protocol's ModelInfer
  on the same port (model "churn", one customer a call) at 16 callers, and
  `scoring.oip.vs_score` over Score asking the same (churn alone, no
  reasons), measured back to back.

The bench reports; it asserts nothing about the targets, it prints them
beside the figures.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from converge.v1 import common_pb2, scoring_pb2
from tests.benchmarks.harness import BenchEnv
from tests.benchmarks.load import (
    SCORE_METHOD,
    LoadResult,
    drive,
    grpc_target,
    start_echo,
)
from tests.conftest import free_port
from tests.waiting import wait_until

if TYPE_CHECKING:
    import pandas as pd

    from converge.models.dataset import Split
    from converge.models.native import NativeModel
    from converge.models.registry import RegisteredVersion
    from converge.models.simulator import World

CUSTOMERS = 500  # the world the models train on
SEED = 14
SCORED_WORLD = 300  # the customers ingested into the services and scored
SCORED_CUSTOMERS = 100  # distinct Score requests, sent in turn
CANDIDATE_PRODUCTS = 2
RECENT_TICKET = timedelta(days=30)
WARMUP_S = 1.0
WINDOW_S = 4.0
BATCH_ITEMS = 3_000  # (at over 1,000 a second, a few seconds of stream)
BATCH_WARMUP_ITEMS = 64
RAW_BATCH = 64  # ScoringSettings.coalesce_max_batch's default
RAW_THREADS = 1  # ScoringSettings.lightgbm_threads' default
RAW_SECONDS = 1.5
OIP_INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
SWAP_AFTER_S = 1.0  # calls measured once the service reports the new version
# The registry's poll as the swap needs it (the service sees a promotion at its
# next poll); each poll reads the registered models through MLflow's SQL store
# (tens of ms of CPU), so a poll every 0.5 s would cost Score about 8 % of the
# scoring process's CPU: more than a deployment pays at the default of 30 s.
POLL_INTERVAL_S = "5"
SCORING_READY_TIMEOUT_S = 240.0
MLFLOW_ROWS = 64
REQUESTED_BY = "bench"

# Issue 14's targets: (figure, the target for people, whether a value meets it).
TARGETS: tuple[tuple[str, str, Callable[[float], bool]], ...] = (
    ("scoring.score.c1.p99_ms", "under 5 ms", lambda v: v < 5.0),
    ("scoring.vs_grpc_echo", "at least 0.40", lambda v: v >= 0.40),
    ("scoring.vs_mlflow_serve", "at least 20", lambda v: v >= 20.0),
    ("scoring.score_batch.vs_raw_booster", "at least 0.25", lambda v: v >= 0.25),
    ("scoring.swap.failed_calls", "0", lambda v: v == 0),
    ("scoring.oip.vs_score", "at least 0.80", lambda v: v >= 0.80),
)


def _ratio(a: float, b: float) -> float:
    """a / b; NaN (shown as n/a) when b is zero, as when no call completed."""
    return a / b if b else float("nan")


# --- the models ---------------------------------------------------------------------


@dataclass(frozen=True)
class Trained:
    """The registry's store and what the bench registered in it."""

    tracking_uri: str
    world: World
    versions: dict[str, RegisteredVersion]  # prediction -> its champion
    churn_split: Split
    spare_churn_version: str  # registered, no alias: the version the swap promotes


def _train_and_register(tracking_uri: str, end: datetime) -> Trained:
    """Trains the three predictions' models on a simulated world ending at
    `end` and registers each as champion, as `converge models train` and
    `promote` would (the built-in definitions, the promotion gates), with a
    shorter training (a higher learning rate, fewer rounds) to stay quick."""
    from converge.models.definitions import load_definitions
    from converge.models.evaluation import evaluate
    from converge.models.pipeline import SIM_DAYS, split_frame
    from converge.models.registry import ModelRegistry
    from converge.models.simulator import simulate
    from converge.models.training import TrainingConfig, train
    from converge.models.trainingset import build_defined_events

    world = simulate(CUSTOMERS, SEED, end - timedelta(days=SIM_DAYS), end)
    events, profiles = world.events_by_customer(), world.profile_histories()
    defs = load_definitions(None)
    # As `converge models train --simulated` does: the world spans SIM_DAYS.
    weeks = min(defs.cutoffs.weeks, SIM_DAYS // 7 - 9)
    defs = defs.model_copy(update={"cutoffs": defs.cutoffs.model_copy(update={"weeks": weeks})})
    config = TrainingConfig(learning_rate=0.1, max_rounds=300, early_stopping_rounds=30)
    registry = ModelRegistry(tracking_uri)
    versions: dict[str, RegisteredVersion] = {}
    churn_split = None
    spare = ""
    for prediction in ("churn", "escalation", "cross_sell"):
        frame, report = build_defined_events(events, profiles, defs, prediction)  # type: ignore[arg-type]
        split = split_frame(frame, defs, report)[0]
        model = train(split.train, split.valid, config)
        result = evaluate(model, split.test)
        parts = {"train": split.train, "valid": split.valid, "test": split.test}
        registered = registry.log_training(model, result, parts, requested_by=REQUESTED_BY)
        decision = registry.promote(prediction, registered.version, split.test, REQUESTED_BY)
        if not decision.promoted:
            raise RuntimeError(f"{prediction}: not promoted: {decision.reasons}")
        versions[prediction] = registered
        if prediction == "churn":
            churn_split = split
            # The same model once more: a new version the swap promotes; its
            # figures equal the champion's, so the gates pass it.
            spare = registry.log_training(model, result, parts, requested_by=REQUESTED_BY).version
    assert churn_split is not None
    return Trained(tracking_uri, world, versions, churn_split, spare)


def _churn_champion(trained: Trained) -> NativeModel:
    """The churn champion as serving loads it: natively, from the registry."""
    from converge.models.registry import ModelRegistry

    return ModelRegistry(trained.tracking_uri).load_champion("churn", num_threads=RAW_THREADS).model


def _raw_booster(model: NativeModel, frame: pd.DataFrame) -> dict[str, float]:
    """Rows per second of the model's booster on the serving input matrix of
    `frame`'s rows, in batches of `RAW_BATCH`, without and with
    contributions."""
    import numpy as np

    from converge.models.serving_artifacts import input_matrix

    matrix = input_matrix(model, frame)
    batches = [matrix[i : i + RAW_BATCH] for i in range(0, len(matrix) - RAW_BATCH + 1, RAW_BATCH)]
    booster = model.booster

    def rate(contrib: bool) -> float:
        rows, index = 0, 0
        booster.predict(batches[0], num_threads=RAW_THREADS, pred_contrib=contrib)  # warm-up
        started = time.perf_counter()
        while time.perf_counter() - started < RAW_SECONDS:
            out = booster.predict(
                batches[index % len(batches)], num_threads=RAW_THREADS, pred_contrib=contrib
            )
            rows += len(out)
            index += 1
        elapsed = time.perf_counter() - started
        assert np.isfinite(out).all()
        return rows / elapsed

    return {
        "scoring.raw_booster.rows_per_s": rate(False),
        "scoring.raw_booster.contrib_rows_per_s": rate(True),
    }


# --- the customers in the services ------------------------------------------------


@dataclass(frozen=True)
class Ingested:
    world: World  # the customers scored (not those the models trained on)
    identity_address: str
    interactions_address: str
    customer_ids: dict[str, str]  # CRM id -> customer id


async def _ingest(env: BenchEnv, trained: Trained) -> Ingested:
    """New customers of the same simulated population (another seed, the same
    days), resolved in identity and their interactions ingested: the
    customers the models score live."""
    from converge.models.simulator import feed, simulate

    world = await asyncio.to_thread(
        simulate, SCORED_WORLD, SEED + 1, trained.world.start, trained.world.end
    )

    identity = await env.start("identity", await env.new_database(), log_level="WARNING")
    interactions = await env.start(
        "interactions",
        await env.new_database(),
        log_level="WARNING",
        identity_address=identity.address,
    )
    summary = await feed(world, identity.address, interactions.address)
    return Ingested(world, identity.address, interactions.address, dict(summary.customer_ids))


def _score_requests(ingested: Ingested) -> list[scoring_pb2.ScoreRequest]:
    """All three predictions with reasons for `SCORED_CUSTOMERS` customers:
    churn, escalation of the customer's latest ticket (opened within
    `RECENT_TICKET`, so the live state still holds it), cross-sell of two
    products the customer did not hold at the start."""
    from converge.models.simulator import PRODUCTS, ticket_id

    world = ingested.world
    recent_us = int((world.end - RECENT_TICKET).timestamp() * 1e6)
    requests: list[scoring_pb2.ScoreRequest] = []
    for chunk in world.chunks():
        latest: dict[int, tuple[int, int]] = {}  # customer -> (opened, ticket number)
        for number, customer, opened in zip(
            chunk.ticket_ids, chunk.ticket_customer, chunk.ticket_opened_us, strict=True
        ):
            if opened >= recent_us:
                latest[int(customer)] = max(
                    latest.get(int(customer), (0, 0)), (int(opened), int(number))
                )
        for customer, (_, number) in sorted(latest.items()):
            held = chunk.held_initially[customer - chunk.first]
            candidates = [p for p, h in zip(PRODUCTS, held, strict=True) if not h]
            if len(candidates) < CANDIDATE_PRODUCTS:
                continue
            requests.append(
                scoring_pb2.ScoreRequest(
                    customer=common_pb2.CustomerRef(
                        customer_id=ingested.customer_ids[world.crm_id(customer)]
                    ),
                    ticket_id=ticket_id(number),
                    candidate_product_ids=candidates[:CANDIDATE_PRODUCTS],
                    channel=common_pb2.CHANNEL_CHAT,
                )
            )
            if len(requests) == SCORED_CUSTOMERS:
                return requests
    return requests


# --- the references ---------------------------------------------------------------


@dataclass(frozen=True)
class Answers:
    """Real answers of the service, for the echo to send back."""

    score: bytes  # one Score answer
    batch_item: bytes  # one ScoreBatch answer
    batch_items: list[scoring_pb2.ScoreBatchRequest]  # the stream the service was sent


async def _echo(
    work_dir: Path, answers: Answers, requests: Sequence[scoring_pb2.ScoreRequest]
) -> tuple[LoadResult, float]:
    """The echo at 16 Score callers, then one ScoreBatch stream of the same
    items the service was sent, answered with the service's own answer
    bytes: the transport's ceiling for each (items per second)."""
    response_file = work_dir / "echo-response.bin"
    response_file.write_bytes(answers.score)
    batch_file = work_dir / "echo-batch-response.bin"
    batch_file.write_bytes(answers.batch_item)
    echo = start_echo(response_file, batch_file)
    try:
        with grpc_target(echo.address) as target:
            unary = await drive(
                target.unary(SCORE_METHOD, requests, scoring_pb2.ScoreResponse),
                callers=16,
                warmup_s=WARMUP_S,
                window_s=WINDOW_S,
            )
        items = answers.batch_items
        await asyncio.to_thread(_stream, echo.address, items[:BATCH_WARMUP_ITEMS])
        stream_rate = (await asyncio.to_thread(_stream, echo.address, items))[0]
        return unary, stream_rate
    finally:
        echo.stop()


class _HttpFailure(Exception):
    pass


def _invocation_bodies(model: NativeModel, frame: pd.DataFrame) -> list[bytes]:
    """`/invocations` bodies of one row each: the model's inputs as its logged
    signature takes them (categories as text, missing as null)."""
    import pandas as pd

    frame = frame.head(MLFLOW_ROWS)
    columns = list(model.feature_names)
    bodies = []
    for _, row in frame.iterrows():
        values: list[Any] = []
        for name in columns:
            value = row[name]
            if value is None or (not isinstance(value, str) and pd.isna(value)):
                values.append(None)
            elif name in model.categorical_levels:
                values.append(str(value))
            else:
                values.append(float(value))
        bodies.append(
            json.dumps({"dataframe_split": {"columns": columns, "data": [values]}}).encode()
        )
    return bodies


@dataclass(frozen=True)
class MlflowServer:
    process: subprocess.Popen[bytes]
    port: int
    log: Path


@contextlib.contextmanager
def _mlflow_serve(trained: Trained, log: Path) -> Iterator[MlflowServer]:
    """`mlflow models serve` of the churn champion's version, in a process
    group of its own (its uvicorn worker is a child), stopped on leaving.
    Started early, so that its start (seconds of imports) overlaps the
    ingest rather than adding to the run; it idles until it is driven."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    # It runs `uvicorn` by name: the venv's, found on the PATH.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": trained.tracking_uri,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    command = [
        str(bin_dir / "mlflow"),
        *("models", "serve", "-m", trained.versions["churn"].model_uri),
        *("--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)),
    ]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=log.parent,
        )
    try:
        yield MlflowServer(process, port, log)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


async def _mlflow_reference(server: MlflowServer, bodies: list[bytes]) -> LoadResult:
    """16 callers on the server's `/invocations`, once its `/ping` answers."""
    process, port = server.process, server.port

    async def ping() -> int:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited:\n{server.log.read_text()[-3000:]}")

        def get() -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                    return int(r.status)
            except (urllib.error.URLError, OSError):
                return 0

        return await asyncio.to_thread(get)

    await wait_until(ping, lambda s: s == 200, timeout_s=300, what="mlflow models serve /ping")
    connections: dict[int, http.client.HTTPConnection] = {}
    headers = {"Content-Type": "application/json"}

    def call(caller: int, sequence: int) -> object:
        connection = connections.get(caller)
        if connection is None:
            connection = connections[caller] = http.client.HTTPConnection(
                "127.0.0.1", port, timeout=30
            )
        connection.request("POST", "/invocations", bodies[sequence % len(bodies)], headers)
        response = connection.getresponse()
        body = response.read()
        if response.status != 200:
            raise _HttpFailure(f"{response.status}: {body[:200]!r}")
        return body

    try:
        return await drive(call, callers=16, warmup_s=WARMUP_S, window_s=WINDOW_S)
    finally:
        for connection in connections.values():
            connection.close()


# --- the scoring service ----------------------------------------------------------


def _cpu_s(pid: int) -> float:
    import psutil

    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


def _postgres_cpu_s(work_dir: Path) -> float:
    """CPU of this run's PostgreSQL (its postmaster names the run's directory,
    and its backends are its children), not of other work on the machine."""
    import psutil

    total = 0.0
    for process in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.Error):
            command = process.info["cmdline"] or []
            if command and command[0].endswith("postgres") and str(work_dir) in " ".join(command):
                for member in [process, *process.children()]:
                    with contextlib.suppress(psutil.Error):
                        total += _cpu_s(member.pid)
    return total


async def _scoring_figures(
    env: BenchEnv,
    trained: Trained,
    ingested: Ingested,
    requests: list[scoring_pb2.ScoreRequest],
    raw: dict[str, float],
) -> tuple[dict[str, float], Answers]:
    """Score at 1, 16 and 64 callers, ScoreBatch, ModelInfer, the swap. Returns the
    figures and real answers (for the echo)."""
    import grpc

    from converge.v1 import predictions_pb2, scoring_pb2_grpc

    service = await env.start(
        "scoring",
        await env.new_database(),
        # It loads and checks three models before it serves: on this shared
        # 2-core machine that took over a minute when other work ran.
        ready_timeout_s=SCORING_READY_TIMEOUT_S,
        log_level="WARNING",
        interactions_address=ingested.interactions_address,
        identity_address=ingested.identity_address,
        tracking_uri=trained.tracking_uri,
        model_poll_interval_s=POLL_INTERVAL_S,
    )
    figures: dict[str, float] = {}
    with grpc.insecure_channel(service.address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        answer = stub.Score(requests[0], timeout=10)
        if len(answer.predictions) != 2 + CANDIDATE_PRODUCTS:
            raise RuntimeError(f"Score answered {len(answer.predictions)} predictions: {answer}")

    # Where the time goes: each process's CPU per call at 16 callers.
    pids = {"scoring": service.process.pid}
    for process in env.processes:
        for name, address in (
            ("interactions", ingested.interactions_address),
            ("identity", ingested.identity_address),
        ):
            if process.address == address:
                pids[name] = process.process.pid

    def cpu_now() -> dict[str, float]:
        spent = {name: _cpu_s(pid) for name, pid in pids.items()}
        spent["postgres"] = _postgres_cpu_s(env.work_dir)
        return spent

    with grpc_target(service.address) as target:
        score = target.unary(SCORE_METHOD, requests, scoring_pb2.ScoreResponse)
        by_callers: dict[int, LoadResult] = {}
        for callers in (1, 16, 64):
            before = cpu_now()
            by_callers[callers] = await drive(
                score, callers=callers, warmup_s=WARMUP_S, window_s=WINDOW_S
            )
            if callers == 16 and by_callers[16].calls_total:
                after = cpu_now()
                for name, spent in after.items():
                    figures[f"scoring.score.c16.cpu_ms_per_call.{name}"] = (
                        (spent - before[name]) / by_callers[16].calls_total * 1000
                    )
    figures["scoring.score.c1.p50_ms"] = by_callers[1].p(50)
    figures["scoring.score.c1.p99_ms"] = by_callers[1].p(99)
    figures["scoring.score.c16.p50_ms"] = by_callers[16].p(50)
    figures["scoring.score.c16.p99_ms"] = by_callers[16].p(99)
    figures["scoring.score.c64.p99_ms"] = by_callers[64].p(99)
    figures["scoring.score.c16.calls_per_s"] = by_callers[16].calls_per_s
    figures["scoring.score.c64.calls_per_s"] = by_callers[64].calls_per_s
    figures["scoring.score.failed_calls"] = float(sum(r.failed for r in by_callers.values()))
    for callers, result in by_callers.items():
        if result.failed:
            Console(stderr=True).print(
                f"[red]scoring: Score at {callers} callers: failed calls "
                f"{dict(result.failures)}[/red]"
            )

    # ScoreBatch: churn with reasons for each customer in turn, one stream.
    churn = predictions_pb2.PREDICTION_KIND_CHURN
    items = [
        scoring_pb2.ScoreBatchRequest(
            row_ref=str(i),
            score=scoring_pb2.ScoreRequest(
                customer=requests[i % len(requests)].customer, predictions=[churn]
            ),
        )
        for i in range(BATCH_ITEMS)
    ]
    await asyncio.to_thread(_stream, service.address, items[:BATCH_WARMUP_ITEMS])
    batch_rate, batch_errors, batch_answer = await asyncio.to_thread(
        _stream, service.address, items
    )
    figures["scoring.score_batch.customers_per_s"] = batch_rate
    figures["scoring.score_batch.failed_items"] = float(batch_errors)
    figures["scoring.score_batch.vs_raw_booster"] = _ratio(
        batch_rate, raw["scoring.raw_booster.rows_per_s"]
    )
    # The same over the booster computing contributions too, as reasons need.
    figures["scoring.score_batch.vs_raw_booster_contrib"] = _ratio(
        batch_rate, raw["scoring.raw_booster.contrib_rows_per_s"]
    )
    figures.update(await _oip_figures(service.address, requests))
    figures.update(await _swap(service.address, trained, requests))
    return figures, Answers(answer.SerializeToString(), batch_answer, items)


def _stream(address: str, sent: list[scoring_pb2.ScoreBatchRequest]) -> tuple[float, int, bytes]:
    """One ScoreBatch stream of `sent` (the sync API, as the other figures'
    callers): items answered per second, failed items, and the first answer's
    bytes."""
    import grpc

    from converge.v1 import scoring_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)
        started = time.perf_counter()
        answered = errors = 0
        first = b""
        for reply in stub.ScoreBatch(iter(sent), timeout=120):
            if not answered:
                first = reply.SerializeToString()
            answered += 1
            errors += reply.HasField("error")
        if answered != len(sent):
            raise RuntimeError(f"ScoreBatch answered {answered} of {len(sent)}")
        return answered / (time.perf_counter() - started), errors, first


async def _swap(
    address: str, trained: Trained, scored: Sequence[scoring_pb2.ScoreRequest]
) -> dict[str, float]:
    """16 callers score while the churn champion moves to the spare version
    in the registry; the run ends `SWAP_AFTER_S` after the service reports
    the new version, and every failed call of the run counts."""
    import grpc

    from converge.models.registry import ModelRegistry
    from converge.v1 import predictions_pb2, scoring_pb2_grpc

    churn = predictions_pb2.PREDICTION_KIND_CHURN
    swapped = threading.Event()
    registry = ModelRegistry(trained.tracking_uri)
    # Churn only: every call of the run is on the model that moves.
    requests = [scoring_pb2.ScoreRequest(customer=r.customer, predictions=[churn]) for r in scored]
    async with grpc.aio.insecure_channel(address) as channel:
        stub = scoring_pb2_grpc.ScoringServiceStub(channel)

        async def champion() -> str:
            status = await stub.GetModelStatus(
                scoring_pb2.GetModelStatusRequest(kind=churn), timeout=5
            )
            return str(status.champion.model.version)

        async def promote() -> float:
            # Starts with the callers; the service sees the move at its next
            # poll after the promotion (which loads and evaluates both
            # versions, seconds): well inside the load.
            decision = await asyncio.to_thread(
                registry.promote,
                "churn",
                trained.spare_churn_version,
                trained.churn_split.test,
                REQUESTED_BY,
                reason="bench: swap under load",
            )
            if not decision.promoted:
                swapped.set()
                raise RuntimeError(f"the spare churn version was refused: {decision.reasons}")
            promoted_at = time.perf_counter()
            await wait_until(
                champion,
                lambda v: v == trained.spare_churn_version,
                timeout_s=120,
                what="the scoring service serving the promoted churn version",
            )
            swapped.set()
            return time.perf_counter() - promoted_at

        with grpc_target(address) as target:
            load, seen_after_s = await asyncio.gather(
                drive(
                    target.unary(SCORE_METHOD, requests, scoring_pb2.ScoreResponse),
                    callers=16,
                    warmup_s=WARMUP_S,
                    window_s=SWAP_AFTER_S,
                    until=swapped,
                ),
                promote(),
            )
    return {
        "scoring.swap.failed_calls": float(load.failed),
        "scoring.swap.calls": float(load.calls_total),
        "scoring.swap.seen_after_s": seen_after_s,
    }


async def _oip_figures(
    address: str, scored: Sequence[scoring_pb2.ScoreRequest]
) -> dict[str, float]:
    """The Open Inference Protocol's ModelInfer (model "churn", one customer
    per call, by `customer_id`) at 16 callers, beside Score asking the same
    (churn alone, no reasons: what an OIP answer carries), in one run each,
    back to back."""
    from inference import open_inference_grpc_pb2 as oip

    from converge.v1 import predictions_pb2

    infer = [
        oip.ModelInferRequest(
            model_name="churn",
            inputs=[
                oip.ModelInferRequest.InferInputTensor(
                    name="customer_id",
                    datatype="BYTES",
                    shape=[1, 1],
                    contents=oip.InferTensorContents(
                        bytes_contents=[r.customer.customer_id.encode()]
                    ),
                )
            ],
        )
        for r in scored
    ]
    churn_only = [
        scoring_pb2.ScoreRequest(
            customer=r.customer,
            predictions=[predictions_pb2.PREDICTION_KIND_CHURN],
            omit_reasons=True,
        )
        for r in scored
    ]
    with grpc_target(address) as target:
        oip_run = await drive(
            target.unary(OIP_INFER_METHOD, infer, oip.ModelInferResponse),
            callers=16,
            warmup_s=WARMUP_S,
            window_s=WINDOW_S,
        )
        score_run = await drive(
            target.unary(SCORE_METHOD, churn_only, scoring_pb2.ScoreResponse),
            callers=16,
            warmup_s=WARMUP_S,
            window_s=WINDOW_S,
        )
    return {
        "scoring.oip.c16.calls_per_s": oip_run.calls_per_s,
        "scoring.oip.c16.p99_ms": oip_run.p(99),
        "scoring.oip.failed_calls": float(oip_run.failed),
        "scoring.score.churn_no_reasons.c16.calls_per_s": score_run.calls_per_s,
        "scoring.oip.vs_score": _ratio(oip_run.calls_per_s, score_run.calls_per_s),
    }


# --- the run ----------------------------------------------------------------------


def _targets_table(figures: dict[str, float]) -> Table:
    table = Table(title="Scoring: figures beside their targets")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("target")
    table.add_column("met")
    for name, target, met in TARGETS:
        value = figures.get(name)
        if value is None or math.isnan(value):
            table.add_row(name, "not measured", target, "-")
        else:
            table.add_row(name, f"{value:,.3f}", target, "yes" if met(value) else "NO")
    return table


@contextlib.contextmanager
def _stage(console: Console, what: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    console.print(f"scoring: {what} in {time.perf_counter() - started:.1f} s")


async def run(env: BenchEnv) -> dict[str, float]:
    console = Console(stderr=True)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    work_dir = Path(tempfile.mkdtemp(prefix="scoring-", dir=env.work_dir))
    tracking_uri = f"sqlite:///{work_dir / 'mlflow' / 'mlflow.db'}"
    end = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    with _stage(console, "models trained and registered"):
        trained = await asyncio.to_thread(_train_and_register, tracking_uri, end)
    with _mlflow_serve(trained, work_dir / "mlflow-serve.log") as mlflow_server:
        with _stage(console, "customers resolved and interactions ingested"):
            ingested = await _ingest(env, trained)
        return await measure(env, console, work_dir, trained, ingested, mlflow_server)


async def measure(
    env: BenchEnv,
    console: Console,
    work_dir: Path,
    trained: Trained,
    ingested: Ingested,
    mlflow_server: MlflowServer,
) -> dict[str, float]:
    requests = _score_requests(ingested)
    with _stage(console, "raw booster"):
        champion = _churn_champion(trained)
        figures = _raw_booster(champion, trained.churn_split.test.frame)
        bodies = _invocation_bodies(champion, trained.churn_split.test.frame)
    with _stage(console, "Score, ScoreBatch, ModelInfer and the swap"):
        scoring, answers = await _scoring_figures(env, trained, ingested, requests, figures)
    figures.update(scoring)
    with _stage(console, "gRPC echo"):
        echo, echo_stream_rate = await _echo(work_dir, answers, requests)
    figures["scoring.grpc_echo.stream.items_per_s"] = echo_stream_rate
    if "scoring.score_batch.customers_per_s" in figures:
        figures["scoring.score_batch.vs_grpc_echo_stream"] = _ratio(
            figures["scoring.score_batch.customers_per_s"], echo_stream_rate
        )
    figures["scoring.grpc_echo.c16.calls_per_s"] = echo.calls_per_s
    figures["scoring.grpc_echo.c16.p99_ms"] = echo.p(99)
    figures["scoring.grpc_echo.c16.client_cpu_us_per_call"] = echo.client_cpu_us_per_call
    with _stage(console, "mlflow models serve"):
        mlflow = await _mlflow_reference(mlflow_server, bodies)
    figures["scoring.mlflow_serve.c16.calls_per_s"] = mlflow.calls_per_s
    figures["scoring.mlflow_serve.c16.p99_ms"] = mlflow.p(99)
    figures["scoring.mlflow_serve.c16.failed_calls"] = float(mlflow.failed)
    for what, result in (("gRPC echo", echo), ("mlflow models serve", mlflow)):
        if result.failed:
            console.print(f"[red]scoring: {what}: failed calls {dict(result.failures)}[/red]")
    if "scoring.score.c16.calls_per_s" in figures:
        score_c16 = figures["scoring.score.c16.calls_per_s"]
        figures["scoring.vs_mlflow_serve"] = _ratio(score_c16, mlflow.calls_per_s)
        figures["scoring.vs_grpc_echo"] = _ratio(score_c16, echo.calls_per_s)
    console.print(_targets_table(figures))
    return figures

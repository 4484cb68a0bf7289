"""One cheap load generator for request/response benchmarks, and the bare
gRPC echo server that gives the transport ceiling.

`drive` runs `callers` closed-loop callers (each sends its next call when
the previous one answers) for a warm-up and then a measured window. Calls
that complete inside the window count towards the rate and the latency
percentiles (completions, not starts: a target slower than the window still
gets a rate); every failure of the whole run, warm-up included, is counted
by its kind, so a run that ends on a condition (a model swap seen by the
server) still counts all of them. The callers do as little Python per call
as possible: the request messages are built beforehand, a call is one
blocking call of the sync gRPC API on one of several channels
(`GrpcTarget`), and the bookkeeping is two clock reads and an append. Every
target (the echo, the scoring service, its Open Inference Protocol face,
MLflow's HTTP server) is driven by the same `drive`, so their figures
compare like with like.

Why threads of blocking sync-API calls and not `grpc.aio` coroutines:
`python -m tests.benchmarks.load compare ADDRESS` measures both against the
echo server, side by side, in alternating rounds. On this machine (2 cores
shared with other work) the threads cost 330-450 us of client CPU per call
against 445-570 us for `grpc.aio` (whose every call goes through the event
loop's tasks), and sent as many calls per second or more. Several channels,
because one HTTP/2 connection serialises its frames through one transport:
4 channels spread the callers over 4 connections, as 4 front-end pods would.

The echo server (`python -m tests.benchmarks.load echo RESPONSE_FILE`)
answers `converge.v1.ScoringService/Score` with the same bytes every time,
whatever it is sent: a generic handler without deserialiser or serialiser,
so it does no protobuf work at all. Fed the bytes of a real Score answer, it
is what Score would cost if scoring took no time: the ceiling of the
transport (a grpc.aio server in a process of its own, as the scoring
service runs, and this generator). It prints its port (bound on port 0) on
its first line of output.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

SCORE_METHOD = "/converge.v1.ScoringService/Score"
CHANNELS = 4


@dataclass(frozen=True)
class LoadResult:
    """What one run of callers measured."""

    callers: int
    window_s: float
    latencies_ms: list[float]  # of the calls that completed inside the window
    failures: collections.Counter[str] = field(default_factory=collections.Counter)
    calls_total: int = 0  # warm-up and the window, failed or not
    client_cpu_s: float = 0.0  # this process's CPU over the whole run

    @property
    def calls(self) -> int:
        return len(self.latencies_ms)

    @property
    def calls_per_s(self) -> float:
        return self.calls / self.window_s if self.window_s > 0 else float("nan")

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    @property
    def client_cpu_us_per_call(self) -> float:
        return self.client_cpu_s / self.calls_total * 1e6 if self.calls_total else float("nan")

    def p(self, q: float) -> float:
        """The q-th percentile of the latencies (ms), interpolated linearly
        as `harness.percentile` does (that module imports the test suite's
        fixtures, too heavy for the echo process that imports this one)."""
        if not self.latencies_ms:
            return float("nan")
        return float(np.percentile(self.latencies_ms, q))


def _failure_kind(error: BaseException) -> str:
    if isinstance(error, grpc.RpcError):
        code = error.code()  # type: ignore[attr-defined]
        return str(code.name if code is not None else "grpc")
    return type(error).__name__


class _Window:
    """The measured window, shared by the callers: its end moves from
    infinity to a time once a run that waits on an event sees it."""

    def __init__(self, start: float, end: float) -> None:
        self.start, self.end = start, end


def drive_threads(
    call: Callable[[int, int], object],
    *,
    callers: int,
    warmup_s: float,
    window_s: float,
    until: threading.Event | None = None,
) -> LoadResult:
    """`callers` threads each run blocking `call(caller, sequence)` back to
    back for `warmup_s`, then a measured window of `window_s` (with `until`:
    until that event is set, and then `window_s` more). A call that returns
    succeeded; any exception is a failed call."""
    clock = time.perf_counter
    cpu_started, started = time.process_time(), clock()
    window = _Window(started + warmup_s, float("inf") if until is not None else 0.0)
    if until is None:
        window.end = window.start + window_s
    latencies: list[list[float]] = [[] for _ in range(callers)]
    failures: collections.Counter[str] = collections.Counter()
    issued = [0] * callers
    lock = threading.Lock()

    def caller(index: int) -> None:
        mine = latencies[index]
        sequence = index
        while True:
            begun = clock()
            if begun >= window.end:
                return
            issued[index] += 1
            try:
                call(index, sequence)
            except Exception as e:
                with lock:
                    failures[_failure_kind(e)] += 1
            else:
                ended = clock()
                if window.start <= ended < window.end:
                    mine.append((ended - begun) * 1000)
            sequence += callers

    threads = [
        threading.Thread(target=caller, args=(i,), name=f"caller-{i}") for i in range(callers)
    ]
    for thread in threads:
        thread.start()
    if until is not None:
        until.wait()
        window.end = max(clock(), window.start) + window_s
    for thread in threads:
        thread.join()
    return LoadResult(
        callers,
        window.end - window.start,
        [x for mine in latencies for x in mine],
        failures,
        sum(issued),
        time.process_time() - cpu_started,
    )


async def drive(
    call: Callable[[int, int], object],
    *,
    callers: int,
    warmup_s: float,
    window_s: float,
    until: threading.Event | None = None,
) -> LoadResult:
    """`drive_threads` off the event loop, so that the bench's own coroutines
    (a promotion, a probe of the server) go on while the callers run."""
    return await asyncio.to_thread(
        drive_threads, call, callers=callers, warmup_s=warmup_s, window_s=window_s, until=until
    )


async def drive_aio(
    call: Callable[[int, int], Awaitable[object]],
    *,
    callers: int,
    warmup_s: float,
    window_s: float,
) -> LoadResult:
    """The same closed loop with `grpc.aio` callers as coroutines on this
    event loop: kept to compare the two client APIs (`compare`)."""
    clock = time.perf_counter
    cpu_started, started = time.process_time(), clock()
    window = _Window(started + warmup_s, started + warmup_s + window_s)
    latencies: list[float] = []
    failures: collections.Counter[str] = collections.Counter()
    issued = 0

    async def caller(index: int) -> None:
        nonlocal issued
        sequence = index
        while True:
            begun = clock()
            if begun >= window.end:
                return
            issued += 1
            try:
                await call(index, sequence)
            except Exception as e:
                failures[_failure_kind(e)] += 1
            else:
                ended = clock()
                if window.start <= ended < window.end:
                    latencies.append((ended - begun) * 1000)
            sequence += callers

    await asyncio.gather(*(caller(i) for i in range(callers)))
    return LoadResult(
        callers,
        window_s,
        latencies,
        failures,
        issued,
        time.process_time() - cpu_started,
    )


def _options(index: int) -> list[tuple[str, Any]]:
    # Distinct channel arguments keep gRPC from sharing one subchannel (one
    # TCP connection) between the channels.
    return [("converge.bench.channel", index)]


class GrpcTarget:
    """`CHANNELS` insecure channels of the sync API to one address;
    `unary(...)` gives a blocking call for `drive` that spreads the callers
    over them (caller i on channel i % channels) and sends pre-built
    requests in turn."""

    def __init__(self, address: str, channels: int = CHANNELS) -> None:
        self.channels = [
            grpc.insecure_channel(address, options=_options(i)) for i in range(channels)
        ]

    def unary(
        self,
        method: str,
        requests: Sequence[Any],
        response_type: Any,
        timeout_s: float = 10.0,
    ) -> Callable[[int, int], object]:
        callables = [
            channel.unary_unary(
                method,
                request_serializer=type(requests[0]).SerializeToString,
                response_deserializer=response_type.FromString,
            )
            for channel in self.channels
        ]
        n_channels, n_requests = len(callables), len(requests)

        def call(caller: int, sequence: int) -> object:
            return callables[caller % n_channels](
                requests[sequence % n_requests], timeout=timeout_s
            )

        return call

    def close(self) -> None:
        for channel in self.channels:
            channel.close()


@contextlib.contextmanager
def grpc_target(address: str, channels: int = CHANNELS) -> Iterator[GrpcTarget]:
    target = GrpcTarget(address, channels)
    try:
        yield target
    finally:
        target.close()


# --- the echo server --------------------------------------------------------------------


@dataclass
class EchoProcess:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def start_echo(response_file: Path, batch_response_file: Path | None = None) -> EchoProcess:
    """Starts the echo server as a process of its own (as the scoring
    service runs) and returns once it listens: it prints its port only after
    binding it and starting to serve. With `batch_response_file`, it also
    answers each message of a ScoreBatch stream with those bytes."""
    batch = [str(batch_response_file)] if batch_response_file is not None else []
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.benchmarks.load", "echo", str(response_file), *batch],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.strip().isdigit():
        process.kill()
        raise RuntimeError(f"the echo server did not start: {line!r}")
    return EchoProcess(process, int(line))


async def _serve_echo(response: bytes, batch_response: bytes) -> None:
    async def score(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return response

    async def score_batch(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        # One answer per message, in order: what a stream costs the transport.
        async for _ in requests:
            yield batch_response

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "converge.v1.ScoringService",
                {
                    "Score": grpc.unary_unary_rpc_method_handler(score),
                    "ScoreBatch": grpc.stream_stream_rpc_method_handler(score_batch),
                },
            )
        ]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


# --- choosing the client API --------------------------------------------------------


async def _compare(address: str, callers: int, seconds: float, rounds: int) -> None:
    """The echo driven by `grpc.aio` coroutines and by threads of blocking
    sync calls, alternately, `rounds` times: calls per second and client CPU
    per call of each."""
    from converge.v1 import common_pb2, scoring_pb2

    request = scoring_pb2.ScoreRequest(
        customer=common_pb2.CustomerRef(customer_id="00000000-0000-0000-0000-000000000001")
    )
    for _ in range(rounds):
        channels = [
            grpc.aio.insecure_channel(address, options=_options(i)) for i in range(CHANNELS)
        ]
        methods = [
            c.unary_unary(
                SCORE_METHOD,
                request_serializer=scoring_pb2.ScoreRequest.SerializeToString,
                response_deserializer=scoring_pb2.ScoreResponse.FromString,
            )
            for c in channels
        ]

        def aio_call(caller: int, sequence: int, methods: list[Any] = methods) -> Awaitable[object]:
            call: Awaitable[object] = methods[caller % CHANNELS](request, timeout=10.0)
            return call

        aio = await drive_aio(aio_call, callers=callers, warmup_s=1.0, window_s=seconds)
        for channel in channels:
            await channel.close(None)
        with grpc_target(address) as target:
            threads = await drive(
                target.unary(SCORE_METHOD, [request], scoring_pb2.ScoreResponse),
                callers=callers,
                warmup_s=1.0,
                window_s=seconds,
            )
        for name, result in (("grpc.aio coroutines", aio), ("sync API threads", threads)):
            print(
                f"{name:>20}, {CHANNELS} channels, {callers} callers: "
                f"{result.calls_per_s:7,.0f} calls/s, "
                f"{result.client_cpu_us_per_call:5,.0f} us client CPU per call, "
                f"p50 {result.p(50):6.2f} ms, p99 {result.p(99):6.2f} ms, failed {result.failed}"
            )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    echo = commands.add_parser("echo", help="serve Score with fixed answer bytes")
    echo.add_argument("response_file", type=Path)
    echo.add_argument("batch_response_file", type=Path, nargs="?")
    compare = commands.add_parser("compare", help="grpc.aio callers vs sync threads")
    compare.add_argument("address")
    compare.add_argument("--callers", type=int, default=16)
    compare.add_argument("--seconds", type=float, default=4.0)
    compare.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.command == "echo":
        batch = args.batch_response_file.read_bytes() if args.batch_response_file else b""
        asyncio.run(_serve_echo(args.response_file.read_bytes(), batch))
    else:
        asyncio.run(_compare(args.address, args.callers, args.seconds, args.rounds))


if __name__ == "__main__":
    main()

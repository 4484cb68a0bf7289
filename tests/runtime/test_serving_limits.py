"""Back-pressure, the CPU executor and deadlines, through a real grpc.aio server
built by the runtime (interceptors included) and a real client.

The service under test is a tiny one of raw-bytes methods: `Hold` waits on an
event the test controls, `Crunch` runs the test's job on the CPU executor,
`Deadline` reports what the runtime tells it about the caller's deadline.
Calls are held open by events, never by sleeps."""

from __future__ import annotations

import asyncio
import contextvars
import json
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import grpc
import prometheus_client
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from converge.runtime import deadlines, errors
from converge.runtime.executor import CpuExecutor, cgroup_cpu_limit, usable_cpu_count
from converge.runtime.interceptors import REQUEST_ID_METADATA_KEY
from converge.runtime.logs import request_id_var
from converge.runtime.server import ServiceContext, ServiceRuntime, ServiceSpec
from converge.runtime.settings import ServiceSettings
from tests.waiting import until

SERVICE = "converge.test.Load"
HOLD = f"/{SERVICE}/Hold"
CRUNCH = f"/{SERVICE}/Crunch"
DEADLINE = f"/{SERVICE}/Deadline"
COLLECT = f"/{SERVICE}/Collect"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# Only a failing test ever waits this long: a gate nobody opens.
GATE_TIMEOUT_S = 60.0


class Load:
    """The tiny service: its handlers and what the test observes of them."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = 0
        self.context: ServiceContext | None = None
        self.job: Callable[[], bytes] = lambda: b"done"
        self.executor_closed_after_job: list[bool] = []

    @property
    def executor(self) -> CpuExecutor:
        assert self.context is not None
        return self.context.executor

    async def hold(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        self.holding += 1
        try:
            await self.release.wait()
        finally:
            self.holding -= 1
        return b"held"

    async def collect(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> bytes:
        self.holding += 1
        try:
            await self.release.wait()
        finally:
            self.holding -= 1
        return b"collected"

    async def crunch(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        result = await self.executor.run(self.job)
        self.executor_closed_after_job.append(self.executor.closed)
        return result

    async def deadline(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        service = self.context
        assert service is not None
        report = {
            "time_remaining": service.time_remaining(),
            "downstream_5": service.downstream_timeout(5.0),
            "downstream_600": service.downstream_timeout(600.0),
            "downstream_unbounded": service.downstream_timeout(),
        }
        return json.dumps(report).encode()

    async def register(self, server: grpc.aio.Server, context: ServiceContext) -> list[str]:
        self.context = context
        handlers = {
            "Hold": grpc.unary_unary_rpc_method_handler(self.hold),
            "Crunch": grpc.unary_unary_rpc_method_handler(self.crunch),
            "Deadline": grpc.unary_unary_rpc_method_handler(self.deadline),
            "Collect": grpc.stream_unary_rpc_method_handler(self.collect),
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        return [SERVICE]


@asynccontextmanager
async def serving(database: str, load: Load, **settings: Any) -> AsyncIterator[ServiceRuntime]:
    spec = ServiceSpec("load", files("tests.runtime") / "empty_migrations", load.register)
    runtime = ServiceRuntime(spec, ServiceSettings(database_url=database, port=0, **settings))
    await runtime.start()
    try:
        yield runtime
    finally:
        load.release.set()
        await runtime.stop(grace=1)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def health_status(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(), timeout=30
    )
    return int(reply.status)


async def test_unary_calls_beyond_the_cap_are_resource_exhausted_and_health_still_answers(
    database: str,
) -> None:
    load = Load()
    async with (
        serving(database, load, max_concurrent_calls=2) as runtime,
        grpc.aio.insecure_channel(runtime.address) as channel,
    ):
        hold = channel.unary_unary(HOLD)
        held = [asyncio.ensure_future(hold(b"", timeout=GATE_TIMEOUT_S)) for _ in range(2)]
        await until(lambda: load.holding == 2, "two calls held open")
        refused_before = sample("converge_grpc_server_calls_refused_total", {"kind": "calls"})
        in_flight = sample("converge_grpc_server_calls_in_flight", {"kind": "calls"})
        assert in_flight >= 2

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            # (The deadline only ends the test if the cap is missing.)
            await hold(b"", timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many concurrent calls on this server (at most 2)" in (
            refused.value.details() or ""
        )
        assert (
            sample("converge_grpc_server_calls_refused_total", {"kind": "calls"})
            == refused_before + 1
        )

        # Health and reflection are never refused.
        assert await health_status(channel) == SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        listed = await reflection.read()
        assert SERVICE in {s.name for s in listed.list_services_response.service}
        reflection.cancel()

        # The held calls finish, and their places are free again.
        load.release.set()
        assert await asyncio.gather(*held) == [b"held", b"held"]
        assert await asyncio.gather(hold(b"", timeout=30), hold(b"", timeout=30)) == [
            b"held",
            b"held",
        ]


async def test_client_streams_count_against_the_streams_cap_not_the_calls_cap(
    database: str,
) -> None:
    load = Load()
    async with (
        serving(database, load, max_concurrent_streams=1, max_concurrent_calls=1) as runtime,
        grpc.aio.insecure_channel(runtime.address) as channel,
    ):
        collect = channel.stream_unary(COLLECT)
        open_stream = collect(iter([b"row"]), timeout=GATE_TIMEOUT_S)
        await until(lambda: load.holding == 1, "the client stream to be open")

        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await collect(iter([b"row"]), timeout=30)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many concurrent streams on this server (at most 1)" in (
            refused.value.details() or ""
        )
        # The unary call's own place is free while the stream holds its one.
        assert json.loads(await channel.unary_unary(DEADLINE)(b"", timeout=30))

        load.release.set()
        assert await open_stream == b"collected"


async def test_cpu_work_runs_on_a_worker_thread_while_the_loop_keeps_answering(
    database: str,
) -> None:
    load = Load()
    async with (
        serving(database, load, cpu_workers=2) as runtime,
        grpc.aio.insecure_channel(runtime.address) as channel,
    ):
        loop = asyncio.get_running_loop()
        loop_thread = threading.get_ident()
        seen: dict[str, Any] = {}

        def job() -> bytes:
            seen["thread"] = threading.get_ident()
            seen["thread_name"] = threading.current_thread().name
            seen["request_id"] = request_id_var.get()
            # Asks the event loop for a real gRPC call while the job still
            # runs: it answers only if the job does not hold the loop (run on
            # the loop, this would wait for itself until the timeout).
            status = asyncio.run_coroutine_threadsafe(health_status(channel), loop).result(
                timeout=GATE_TIMEOUT_S
            )
            return str(status).encode()

        load.job = job
        answer = await channel.unary_unary(CRUNCH)(
            b"", timeout=GATE_TIMEOUT_S, metadata=((REQUEST_ID_METADATA_KEY, "crunch-1"),)
        )
        assert int(answer) == SERVING
        assert seen["thread"] != loop_thread
        assert seen["thread_name"].startswith(load.executor.thread_name_prefix)
        assert seen["request_id"] == "crunch-1"  # the job's logs carry the call's request id
        assert load.executor.workers == 2


async def test_jobs_beyond_the_executor_queue_are_resource_exhausted(database: str) -> None:
    load = Load()
    gate = threading.Event()
    ran: list[int] = []

    def job() -> bytes:
        ran.append(1)
        gate.wait(GATE_TIMEOUT_S)
        return b"crunched"

    load.job = job
    try:
        async with (
            serving(database, load, cpu_workers=1, cpu_queue_limit=1) as runtime,
            grpc.aio.insecure_channel(runtime.address) as channel,
        ):
            crunch = channel.unary_unary(CRUNCH)
            executor = load.executor
            running = asyncio.ensure_future(crunch(b"", timeout=GATE_TIMEOUT_S))
            await until(lambda: executor.busy == 1, "the first job to run")
            waiting = asyncio.ensure_future(crunch(b"", timeout=GATE_TIMEOUT_S))
            await until(lambda: executor.queued == 1, "the second job to wait")
            assert sample("converge_cpu_executor_queued_jobs") >= 1
            assert sample("converge_cpu_executor_busy_workers") >= 1
            rejected_before = sample("converge_cpu_executor_rejected_total")

            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await crunch(b"", timeout=30)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "CPU workers are busy (1 running, 1 waiting)" in (refused.value.details() or "")
            assert sample("converge_cpu_executor_rejected_total") == rejected_before + 1

            gate.set()
            assert await asyncio.gather(running, waiting) == [b"crunched", b"crunched"]
            assert len(ran) == 2  # the refused job never ran
            assert (executor.busy, executor.queued) == (0, 0)
    finally:
        gate.set()


async def test_a_queued_job_whose_caller_cancels_never_runs(database: str) -> None:
    load = Load()
    gate = threading.Event()
    ran: list[int] = []

    def job() -> bytes:
        ran.append(1)
        gate.wait(GATE_TIMEOUT_S)
        return b"crunched"

    load.job = job
    try:
        async with (
            serving(database, load, cpu_workers=1, cpu_queue_limit=4) as runtime,
            grpc.aio.insecure_channel(runtime.address) as channel,
        ):
            crunch = channel.unary_unary(CRUNCH)
            executor = load.executor
            running = crunch(b"", timeout=GATE_TIMEOUT_S)
            await until(lambda: executor.busy == 1, "the first job to run")
            abandoned = crunch(b"", timeout=GATE_TIMEOUT_S)
            await until(lambda: executor.queued == 1, "the second job to wait")
            abandoned.cancel()
            await until(lambda: executor.queued == 0, "the abandoned job to leave the queue")
            gate.set()
            assert await running == b"crunched"
            assert len(ran) == 1
    finally:
        gate.set()


async def test_stop_lets_in_flight_jobs_finish_then_shuts_the_executor_down(
    database: str,
) -> None:
    load = Load()
    gate = threading.Event()
    load.job = lambda: b"finished" if gate.wait(GATE_TIMEOUT_S) else b"gate never opened"
    hook_saw_executor_closed: list[bool] = []
    spec = ServiceSpec("load", files("tests.runtime") / "empty_migrations", load.register)
    runtime = ServiceRuntime(spec, ServiceSettings(database_url=database, port=0))
    await runtime.start()
    executor = runtime.executor
    assert load.context is not None
    load.context.on_shutdown(lambda: _record(hook_saw_executor_closed, executor.closed))
    stopping: asyncio.Task[None] | None = None
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            in_flight = channel.unary_unary(CRUNCH)(b"", timeout=GATE_TIMEOUT_S)
            await until(lambda: executor.busy == 1, "the job to run")
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            stopping = asyncio.create_task(runtime.stop(grace=GATE_TIMEOUT_S))
            assert (await watch.read()).status == NOT_SERVING  # the stop has begun
            watch.cancel()
            assert not executor.closed
            gate.set()
            assert await in_flight == b"finished"
        await stopping
    finally:
        gate.set()
        if stopping is None:
            await runtime.stop(grace=1)

    assert load.executor_closed_after_job == [False]
    assert hook_saw_executor_closed == [False]  # hooks run before the executor closes
    assert executor.closed
    assert not [t for t in threading.enumerate() if t.name.startswith(executor.thread_name_prefix)]
    with pytest.raises(errors.Unavailable):
        await executor.run(lambda: b"too late")


async def _record(into: list[bool], value: bool) -> None:
    into.append(value)


async def test_time_remaining_reflects_the_callers_deadline(database: str) -> None:
    load = Load()
    async with (
        serving(database, load) as runtime,
        grpc.aio.insecure_channel(runtime.address) as channel,
    ):
        ask = channel.unary_unary(DEADLINE)
        bounded = json.loads(await ask(b"", timeout=30))
        assert 0 < bounded["time_remaining"] <= 30
        assert bounded["downstream_5"] == 5.0
        assert 0 < bounded["downstream_600"] <= 30
        assert 0 < bounded["downstream_unbounded"] <= 30

        unbounded = json.loads(await ask(b""))
        assert unbounded == {
            "time_remaining": None,
            "downstream_5": 5.0,
            "downstream_600": 600.0,
            "downstream_unbounded": None,
        }


async def test_a_passed_deadline_stops_work_with_deadline_exceeded() -> None:
    ran: list[int] = []
    executor = CpuExecutor(1, 0, name="deadline-test")

    async def in_a_call_whose_deadline_passed() -> None:
        deadlines.start_call(0.0)  # the caller's time is up
        assert deadlines.time_remaining() == 0.0
        with pytest.raises(errors.DeadlineExceeded) as checked:
            deadlines.check_deadline("scoring")
        assert checked.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "before scoring finished" in checked.value.message
        with pytest.raises(errors.DeadlineExceeded):
            deadlines.downstream_timeout(1.0)
        with pytest.raises(errors.DeadlineExceeded):
            await executor.run(lambda: ran.append(1))

    try:
        # In a task of its own, so the deadline stays in that task's context.
        await asyncio.create_task(
            in_a_call_whose_deadline_passed(), context=contextvars.copy_context()
        )
        assert deadlines.time_remaining() is None
        assert ran == []
        assert (executor.busy, executor.queued) == (0, 0)
    finally:
        await executor.close()


def test_worker_count_follows_the_containers_cpu_quota(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2) is None
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(v2) == 1.5
    (v2 / "cpu.max").write_text("50000 100000\n")
    assert usable_cpu_count(v2) == 1  # half a CPU still gets one worker

    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) == 1.0
    assert usable_cpu_count(v1) == 1

    affinity = usable_cpu_count(tmp_path / "absent")
    assert affinity >= 1
    (v2 / "cpu.max").write_text(f"{(affinity + 8) * 100000} 100000\n")
    assert usable_cpu_count(v2) == affinity  # a quota above the CPUs allowed changes nothing


def test_serving_limits_are_read_from_the_services_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from converge.identity.settings import IdentitySettings

    monkeypatch.setenv("CONVERGE_IDENTITY_MAX_CONCURRENT_CALLS", "7")
    monkeypatch.setenv("CONVERGE_IDENTITY_CPU_WORKERS", "3")
    monkeypatch.setenv("CONVERGE_IDENTITY_CPU_QUEUE_LIMIT", "0")
    settings = IdentitySettings()
    assert (settings.max_concurrent_calls, settings.cpu_workers, settings.cpu_queue_limit) == (
        7,
        3,
        0,
    )
    assert IdentitySettings.env_name("cpu_workers") == "CONVERGE_IDENTITY_CPU_WORKERS"

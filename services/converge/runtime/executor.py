"""A bounded thread pool for CPU-heavy work (model predictions, feature math on
large arrays), so that it never holds the event loop that answers every call.

The runtime creates one per service at start, sized by `cpu_workers` (by
default the CPUs this process may use), and hands it to the service as
`ServiceContext.executor`:

    probabilities = await context.executor.run(booster.predict, rows)

Beyond `cpu_workers` running jobs and `cpu_queue_limit` waiting ones, `run`
refuses at once with RESOURCE_EXHAUSTED rather than letting a backlog grow
that would answer every caller late (KServe's model server sizes its pool the
same way; the refusal is ours). A job keeps the caller's request id (for its
logs) and deadline: one whose caller stopped waiting while it was queued is
dropped (cancelled call) or refused with DEADLINE_EXCEEDED (deadline passed),
never run for nobody. The runtime shuts the pool down after in-flight calls
finished, waiting for the jobs that run.

Threads run Python code one at a time, so this pays off for work that releases
the GIL (LightGBM, numpy); pure-Python work only moves off the loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import functools
import math
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import prometheus_client

from converge.runtime import deadlines, errors

P = ParamSpec("P")
T = TypeVar("T")

CPU_WORKERS = prometheus_client.Gauge(
    "converge_cpu_executor_workers", "Threads of the CPU executor (the cpu_workers setting)."
)
CPU_BUSY_WORKERS = prometheus_client.Gauge(
    "converge_cpu_executor_busy_workers", "CPU executor threads running a job now."
)
CPU_QUEUED_JOBS = prometheus_client.Gauge(
    "converge_cpu_executor_queued_jobs", "Jobs waiting for a CPU executor thread."
)
CPU_REJECTED_JOBS = prometheus_client.Counter(
    "converge_cpu_executor_rejected_total",
    "Jobs refused with RESOURCE_EXHAUSTED because the CPU executor's queue was full.",
)

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT) -> float | None:
    """The CPUs the container's quota allows (cgroup v2 `cpu.max`, else v1
    `cpu.cfs_quota_us`/`cpu.cfs_period_us`), or None without a quota."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us


def usable_cpu_count(cgroup_root: Path = _CGROUP_ROOT) -> int:
    """The CPUs this process may use: its affinity mask, lowered to the
    container's CPU quota (rounded up) when there is one. A pod with a limit
    of 2 on a 64-core node gets 2 workers, not 64."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        count = os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root)
    if limit is not None:
        count = min(count, math.ceil(limit))
    return max(count, 1)


class CpuExecutor:
    """At most `workers` jobs running and `queue_limit` waiting; see the module doc."""

    def __init__(self, workers: int, queue_limit: int, *, name: str = "service") -> None:
        if workers < 1 or queue_limit < 0:
            raise ValueError(
                f"need workers >= 1 and queue_limit >= 0, got {workers}, {queue_limit}"
            )
        self.workers = workers
        self.queue_limit = queue_limit
        self.thread_name_prefix = f"converge-{name}-cpu"
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix=self.thread_name_prefix
        )
        # Jobs are admitted on the loop and end on worker threads.
        self._lock = threading.Lock()
        self._admitted = 0  # running or waiting
        self._running = 0
        self._closed = False
        CPU_WORKERS.inc(workers)

    @property
    def busy(self) -> int:
        """Jobs running now."""
        return self._running

    @property
    def queued(self) -> int:
        """Jobs admitted and waiting for a thread."""
        return self._admitted - self._running

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Runs `fn(*args, **kwargs)` on a worker thread and returns its result.

        ResourceExhausted when the queue is full, DeadlineExceeded when the
        caller's deadline passed before the job could begin, Unavailable once
        the executor is shut down."""
        deadlines.check_deadline("the job could begin")
        with self._lock:
            if self._closed:
                raise errors.Unavailable("the server is shutting down; retry on another replica")
            if self._admitted >= self.workers + self.queue_limit:
                full = True
            else:
                full = False
                self._admitted += 1
        if full:
            CPU_REJECTED_JOBS.inc()
            raise errors.ResourceExhausted(
                f"the server's CPU workers are busy ({self.workers} running, "
                f"{self.queue_limit} waiting); retry later or on another replica"
            )
        # The job runs in a copy of the caller's context: its request id and deadline.
        context = contextvars.copy_context()
        job = functools.partial(fn, *args, **kwargs)
        CPU_QUEUED_JOBS.inc()
        try:
            future: concurrent.futures.Future[T] = self._pool.submit(context.run, self._job, job)
        except RuntimeError:  # `close` began between the check above and now
            CPU_QUEUED_JOBS.dec()
            with self._lock:
                self._admitted -= 1
            raise errors.Unavailable(
                "the server is shutting down; retry on another replica"
            ) from None
        future.add_done_callback(self._forget_if_cancelled)
        # Awaiting through asyncio: a caller cancelled while its job still
        # waits cancels the job too.
        return await asyncio.wrap_future(future)

    def _job(self, job: Callable[[], T]) -> T:
        with self._lock:
            self._running += 1
        CPU_QUEUED_JOBS.dec()
        CPU_BUSY_WORKERS.inc()
        try:
            deadlines.check_deadline("the job could begin")
            return job()
        finally:
            CPU_BUSY_WORKERS.dec()
            with self._lock:
                self._running -= 1
                self._admitted -= 1

    def _forget_if_cancelled(self, future: concurrent.futures.Future[T]) -> None:
        # A job cancelled before it began never reached `_job`.
        if future.cancelled():
            CPU_QUEUED_JOBS.dec()
            with self._lock:
                self._admitted -= 1

    async def close(self) -> None:
        """Refuses new jobs, drops the waiting ones and waits for the running ones."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        await asyncio.to_thread(self._pool.shutdown, wait=True, cancel_futures=True)
        CPU_WORKERS.dec(self.workers)

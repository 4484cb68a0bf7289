"""What the benchmarks share: a throwaway PostgreSQL, services as real
processes, latency statistics."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from converge.runtime.embedded_postgres import EmbeddedPostgres
from tests.conftest import database_url
from tests.service_process import ServiceProcess, start_service, stop_process


@dataclass
class BenchEnv:
    postgres_url: str
    work_dir: Path
    processes: list[ServiceProcess] = field(default_factory=list)

    async def new_database(self) -> str:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        admin = await asyncpg.connect(self.postgres_url)
        try:
            await admin.execute(f"CREATE DATABASE {name}")
        finally:
            await admin.close()
        return database_url(self.postgres_url, name)

    async def start(
        self, service: str, database: str, ready_timeout_s: float = 60.0, **settings: str
    ) -> ServiceProcess:
        process = await start_service(service, database, self.work_dir, ready_timeout_s, **settings)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.processes:
            stop_process(process)


def open_env() -> tuple[BenchEnv, EmbeddedPostgres]:
    work_dir = Path(tempfile.mkdtemp(prefix="converge-bench-"))
    server = EmbeddedPostgres(work_dir)
    return BenchEnv(server.start(), work_dir), server


def percentile(samples: list[float], q: float) -> float:
    if not samples:
        return float("nan")
    return (
        statistics.quantiles(samples, n=1000, method="inclusive")[int(q * 10) - 1]
        if len(samples) > 1
        else samples[0]
    )


async def closed_loop(
    call: Callable[[int], Awaitable[object]], *, concurrency: int, total: int
) -> tuple[float, list[float]]:
    """`concurrency` callers issue `total` calls back to back.

    Returns (calls per second, latencies in milliseconds).
    """
    latencies: list[float] = []
    next_index = 0

    async def caller() -> None:
        nonlocal next_index
        while next_index < total:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            await call(index)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return total / elapsed, latencies

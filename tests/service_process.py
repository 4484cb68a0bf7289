"""Runs a service as a real process (`python -m converge.<name>`), as Kubernetes would."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import free_port


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    port: int
    metrics_port: int
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


async def start_service(
    name: str, database_url: str, log_dir: Path, ready_timeout_s: float = 60.0, **settings: str
) -> ServiceProcess:
    port, metrics_port = free_port(), free_port()
    prefix = f"CONVERGE_{name.upper()}_"
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        f"{prefix}PORT": str(port),
        f"{prefix}METRICS_PORT": str(metrics_port),
        **{f"{prefix}{key.upper()}": value for key, value in settings.items()},
    }
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", f"converge.{name}"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    service = ServiceProcess(process, port, metrics_port, log)
    try:
        await wait_until_serving(service, ready_timeout_s)
    except BaseException:
        # Nobody else holds the process yet: left running, it would outlive the run.
        stop_process(service)
        raise
    return service


async def wait_until_serving(service: ServiceProcess, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(service.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if service.process.poll() is not None:
                raise RuntimeError(f"service exited early:\n{service.log_text()}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"service not serving after {timeout}s:\n{service.log_text()}")


def stop_process(service: ServiceProcess) -> None:
    if service.process.poll() is None:
        service.process.kill()
        service.process.wait(10)

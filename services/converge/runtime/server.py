"""Bootstraps a service: database, migrations, the gRPC server with health,
reflection and interceptors, metrics, and graceful shutdown on SIGTERM/SIGINT.

Start order: settings -> logging -> PostgreSQL (external or embedded) -> pool
-> migrations -> servicers -> bind -> SERVING, then health follows the
database and the service's own checks (see `health`). Stop order (SIGTERM):
health NOT_SERVING for good -> stop accepting and let in-flight calls finish
within the grace period -> shutdown hooks -> CPU executor (its running jobs
finish) -> pool -> embedded PostgreSQL. Exit 0.

What serving under load gets from the runtime, through `ServiceContext`:

- Back-pressure: beyond `max_concurrent_calls` unary calls (or
  `max_concurrent_streams` streams) in flight, a new call is answered
  RESOURCE_EXHAUSTED at once, never queued; health and reflection always answer.
- CPU work off the event loop: `await context.executor.run(fn, *args)` runs
  `fn` on one of `cpu_workers` threads; beyond `cpu_queue_limit` waiting jobs,
  RESOURCE_EXHAUSTED (see `executor`).
- Deadlines: `context.time_remaining()` is the time left before the current
  call's caller stops waiting (None without a deadline). Give a downstream call
  `timeout=context.downstream_timeout(budget_s)` (the time left, at most the
  service's own budget), and call `context.check_deadline()` between steps to
  stop work nobody waits for: it raises DEADLINE_EXCEEDED once the deadline
  passed. gRPC itself cancels the handler's task when the caller gives up;
  these are for work between awaits and for sizing downstream calls (see
  `deadlines`, usable from service code that holds no context).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable

import asyncpg
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

from converge.runtime import deadlines
from converge.runtime.channels import SERVER_OPTIONS
from converge.runtime.database import create_pool, load_migrations, migrate, pending_migrations
from converge.runtime.embedded_postgres import EmbeddedPostgres
from converge.runtime.executor import CpuExecutor, usable_cpu_count
from converge.runtime.health import HealthCheck, HealthWatcher
from converge.runtime.interceptors import RuntimeInterceptor
from converge.runtime.logs import configure_logging
from converge.runtime.metrics import MetricsEndpoint
from converge.runtime.settings import ServiceSettings, SettingsT, load_settings

logger = logging.getLogger(__name__)

ShutdownHook = Callable[[], Awaitable[None]]

# The health service name a liveness probe asks: SERVING from start to
# shutdown, whatever the database does, so an outage takes replicas out of
# the endpoints (readiness, "") without the kubelet restarting them all.
LIVENESS_SERVICE = "liveness"

# The longest one step of a shutdown (a hook, closing the pool) may take.
SHUTDOWN_STEP_S = 15.0


@dataclass
class ServiceContext:
    """What a service's registration gets from the runtime."""

    settings: ServiceSettings
    pool: asyncpg.Pool
    executor: CpuExecutor
    shutdown_hooks: list[ShutdownHook] = field(default_factory=list)
    health_checks: dict[str, HealthCheck] = field(default_factory=dict)

    def on_shutdown(self, hook: ShutdownHook) -> None:
        """Runs `hook` after in-flight calls finished, before the pool closes."""
        self.shutdown_hooks.append(hook)

    def add_health_check(self, name: str, check: HealthCheck) -> None:
        """Health reports NOT_SERVING while `check()` (plain or async) is not
        true, beside the runtime's own database check; `name` appears in the
        log when it fails."""
        self.health_checks[name] = check

    @staticmethod
    def time_remaining() -> float | None:
        """Seconds left before the current call's caller stops waiting, or None
        when it set no deadline (or outside a call)."""
        return deadlines.time_remaining()

    @staticmethod
    def check_deadline(doing: str = "the call") -> None:
        """Raises DeadlineExceeded (DEADLINE_EXCEEDED) once the caller's deadline passed."""
        deadlines.check_deadline(doing)

    @staticmethod
    def downstream_timeout(at_most_s: float | None = None) -> float | None:
        """The timeout for a downstream call: the caller's time left, at most
        `at_most_s`; DeadlineExceeded when none is left."""
        return deadlines.downstream_timeout(at_most_s)


# Adds a service's servicers to the server; returns the full names of the gRPC
# services it added (for health and reflection).
Register = Callable[[grpc.aio.Server, ServiceContext], Awaitable[Sequence[str]]]


@dataclass(frozen=True)
class ServiceSpec:
    """What makes a service a service: its name (also its database schema),
    its migrations and how it registers its servicers."""

    name: str
    migrations: Traversable
    register: Register


class ServiceRuntime:
    """One running service. Tests start it in-process on port 0; `main` runs it
    as a process until SIGTERM."""

    def __init__(self, spec: ServiceSpec, settings: ServiceSettings) -> None:
        self.spec = spec
        self.settings = settings
        self.port: int = 0
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self._health_watcher: HealthWatcher | None = None
        self._context: ServiceContext | None = None
        self._embedded: EmbeddedPostgres | None = None
        self._metrics: MetricsEndpoint | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    @property
    def pool(self) -> asyncpg.Pool:
        assert self._context is not None, "service not started"
        return self._context.pool

    @property
    def executor(self) -> CpuExecutor:
        assert self._context is not None, "service not started"
        return self._context.executor

    async def start(self) -> None:
        settings = self.settings
        if settings.database_url is not None:
            dsn = settings.database_url.get_secret_value()
        else:
            self._embedded = EmbeddedPostgres(settings.data_dir)
            dsn = await asyncio.to_thread(self._embedded.start)
        pool = await create_pool(
            dsn,
            self.spec.name,
            application_name=f"converge-{self.spec.name}",
            min_size=settings.db_pool_min_size,
            max_size=settings.db_pool_max_size,
            command_timeout=settings.db_command_timeout_s,
            plan_cache_mode=settings.db_plan_cache_mode,
        )
        workers = settings.cpu_workers or usable_cpu_count()
        executor = CpuExecutor(workers, settings.cpu_queue_limit, name=self.spec.name)
        self._context = ServiceContext(settings=settings, pool=pool, executor=executor)
        migrations = load_migrations(self.spec.migrations)
        async with pool.acquire() as connection:
            if settings.migrate_on_start:
                await migrate(connection, self.spec.name, migrations)
            elif pending := await pending_migrations(connection, self.spec.name, migrations):
                # Serving an older schema would fail call by call; stop now, naming the fix.
                names = ", ".join(f"{m.version:04d}_{m.name}" for m in pending)
                raise RuntimeError(
                    f"{self.spec.name}: migrations pending ({names}) and "
                    f"{settings.env_name('migrate_on_start')} is false; run "
                    f"`python -m converge.{self.spec.name} migrate` first"
                )

        server = grpc.aio.server(
            interceptors=[
                RuntimeInterceptor(
                    max_concurrent_calls=settings.max_concurrent_calls,
                    max_concurrent_streams=settings.max_concurrent_streams,
                )
            ],
            options=[("grpc.so_reuseport", 0), *SERVER_OPTIONS],
        )
        service_names = list(await self.spec.register(server, self._context))
        self._health = health_aio.HealthServicer()
        # The stock servicer starts the server ("") as SERVING: not before the
        # port is bound and the checks below pass.
        await self._health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            [
                *service_names,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ],
            server,
        )
        self.port = server.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise RuntimeError(f"cannot bind gRPC port {settings.host}:{settings.port}")
        await server.start()
        self._server = server
        if settings.metrics_port is not None:
            self._metrics = MetricsEndpoint(settings.host, settings.metrics_port)
            self.metrics_port = self._metrics.port
        # Only now, with the database migrated and servicers in place.
        self._health_watcher = HealthWatcher(
            self._health,
            service_names,
            dsn,
            self._context.health_checks,
            interval_s=settings.health_check_interval_s,
            timeout_s=settings.health_check_timeout_s,
            application_name=f"converge-{self.spec.name}-health",
        )
        await self._health_watcher.start()
        logger.info(
            "%s serving on %s (metrics port %s, %d CPU workers)",
            self.spec.name,
            self.address,
            self.metrics_port,
            executor.workers,
        )

    async def wait_for_termination(self) -> None:
        assert self._server is not None
        await self._server.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        grace = self.settings.grace_period_s if grace is None else grace
        if self._health_watcher is not None:
            await self._health_watcher.stop()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(grace)
        if self._context is not None:
            # Every step is bounded: a hook or a connection that never finishes
            # must not keep a stopping process alive (the kubelet would kill it
            # mid-way); what overran is logged by name.
            # (asyncio.timeout, not wait_for: the step runs in this task, so
            # a cancel of `stop` itself is never lost as the step finishes,
            # CPython gh-86296; see runtime/tasks.py)
            for hook in reversed(self._context.shutdown_hooks):
                await _run_shutdown_hook(hook)
            await self._context.executor.close()
            try:
                async with asyncio.timeout(SHUTDOWN_STEP_S):
                    await self._context.pool.close()
            except TimeoutError:
                logger.error(
                    "database connections still in use after %.0f s; closing them", SHUTDOWN_STEP_S
                )
                self._context.pool.terminate()
        if self._metrics is not None:
            self._metrics.close()
        if self._embedded is not None:
            await asyncio.to_thread(self._embedded.stop)
        logger.info("%s stopped", self.spec.name)


async def _run_shutdown_hook(hook: Callable[[], Awaitable[object]]) -> None:
    """Runs one shutdown hook for at most `SHUTDOWN_STEP_S`. An overrun, a
    failure, or a cancel the hook raised of its own accord is logged by the
    hook's name and shutdown goes on; a cancel of the caller is raised."""
    name = getattr(hook, "__qualname__", hook)
    try:
        async with asyncio.timeout(SHUTDOWN_STEP_S) as bound:
            await hook()
    except TimeoutError:
        if not bound.expired():  # (the hook's own TimeoutError)
            logger.exception("shutdown hook %s failed", name)
            return
        logger.error("shutdown hook %s did not finish in %.0f s; going on", name, SHUTDOWN_STEP_S)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # (the caller is being cancelled)
        # (the rest of the shutdown, the pool and embedded PostgreSQL among
        # it, still has to run)
        logger.error("shutdown hook %s ended cancelled; going on", name)
    except Exception:
        logger.exception("shutdown hook %s failed", name)


def _tune_garbage_collector() -> None:
    """Fewer, cheaper cyclic collections for a request-serving process.

    Bulk ingest allocates millions of short-lived containers; with the default
    threshold (700) the collector ran thousands of times per second and took a
    fifth of the CPU of a streaming ingest (measured). What the service built
    at startup is frozen out of collections, and the young generation is
    collected every 50,000 allocations instead. Reference counting still frees
    almost everything at once; only cycles wait longer.
    """
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(50_000, middle, old)


async def serve(spec: ServiceSpec, settings: ServiceSettings) -> int:
    """Runs the service until SIGTERM or SIGINT; returns the exit code."""
    runtime = ServiceRuntime(spec, settings)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    try:
        await runtime.start()
    except Exception:
        logger.exception("%s failed to start", spec.name)
        await runtime.stop(grace=0)
        return 1
    _tune_garbage_collector()
    await stop_requested.wait()
    logger.info("%s shutting down, grace %.1fs", spec.name, settings.grace_period_s)
    # (not under suppress(CancelledError): nothing cancels this task but a
    # fault, and swallowing it would end a stop half done with exit code 0)
    await runtime.stop()
    return 0


async def migrate_and_exit(spec: ServiceSpec, settings: ServiceSettings) -> int:
    """Applies the service's pending migrations and returns the exit code.

    What a cluster's pre-install/pre-upgrade hook Job runs, once, before any pod
    of the new version starts. Safe to run again, and beside running replicas:
    the advisory lock in `migrate` serialises it with them.
    """
    embedded: EmbeddedPostgres | None = None
    if settings.database_url is not None:
        dsn = settings.database_url.get_secret_value()
    else:
        embedded = EmbeddedPostgres(settings.data_dir)
        dsn = await asyncio.to_thread(embedded.start)
    try:
        connection = await asyncpg.connect(
            dsn, server_settings={"application_name": f"converge-{spec.name}-migrate"}
        )
        try:
            applied = await migrate(connection, spec.name, load_migrations(spec.migrations))
        finally:
            await connection.close()
    except Exception:
        logger.exception("%s migrations failed", spec.name)
        return 1
    finally:
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)
    logger.info("%s schema up to date; %d migration(s) applied now", spec.name, len(applied))
    return 0


def main(
    spec: ServiceSpec, settings_class: type[SettingsT], argv: Sequence[str] | None = None
) -> None:
    """The entry point of `python -m converge.<service> [serve|migrate]`."""
    parser = argparse.ArgumentParser(
        prog=f"python -m converge.{spec.name}",
        description=(
            f"The {spec.name} service. Settings come from the environment "
            f"(DATABASE_URL, {settings_class.env_name('port')}, ...)."
        ),
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=("serve", "migrate"),
        default="serve",
        help="serve: run until SIGTERM (the default); migrate: apply pending migrations and exit",
    )
    command = parser.parse_args(argv).command
    settings = load_settings(settings_class)
    configure_logging(spec.name, settings.log_level)
    if command == "migrate":
        sys.exit(asyncio.run(migrate_and_exit(spec, settings)))
    sys.exit(asyncio.run(serve(spec, settings)))

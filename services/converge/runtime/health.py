"""Health that follows what a service needs: the database, and the checks the
service adds itself (for example that a follower still follows).

A watcher checks them every `health_check_interval_s` and flips the stock
`grpc.health.v1` servicer between SERVING and NOT_SERVING for the server ("")
and each of its services. Once graceful shutdown begins it never flips back.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence

import asyncpg
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from converge.runtime.tasks import stop_task

logger = logging.getLogger(__name__)

# A service's own check: True while healthy. May be a coroutine function.
HealthCheck = Callable[[], bool | Awaitable[bool]]

DATABASE_CHECK = "database"

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthWatcher:
    """Keeps the health servicer's statuses in line with the checks."""

    def __init__(
        self,
        servicer: health_aio.HealthServicer,
        service_names: Sequence[str],
        dsn: str,
        checks: Mapping[str, HealthCheck],
        *,
        interval_s: float,
        timeout_s: float,
        application_name: str,
    ) -> None:
        self._servicer = servicer
        self._names = ("", *service_names)
        self._dsn = dsn
        self._checks = checks
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._application_name = application_name
        # A connection of its own rather than one from the pool: a pool busy
        # with a burst of calls is not a database that is down, and a replica
        # reported NOT_SERVING under load would only push the load elsewhere.
        self._connection: asyncpg.Connection | None = None
        self._failing: tuple[str, ...] | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = False

    async def start(self) -> None:
        """Checks once, sets the statuses, then keeps checking in the background."""
        await self.check_once()
        self._task = asyncio.create_task(self._run(), name="health-watcher")

    async def stop(self) -> None:
        """Stops checking for good (graceful shutdown has begun)."""
        self._stopped = True
        await stop_task(self._task)
        if self._connection is not None:
            self._connection.terminate()
            self._connection = None

    async def _run(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the watcher must outlive any one bad check
                logger.exception("health check round failed")

    async def check_once(self) -> None:
        failing = [] if await self._database_ok() else [DATABASE_CHECK]
        for name, check in list(self._checks.items()):
            if not await _passes(name, check):
                failing.append(name)
        await self._apply(tuple(failing))

    async def _apply(self, failing: tuple[str, ...]) -> None:
        if self._stopped or failing == self._failing:
            return
        if failing:
            logger.warning("health: NOT_SERVING, failing checks: %s", ", ".join(failing))
        elif self._failing is not None:
            logger.info("health: SERVING again, every check passes")
        self._failing = failing
        status = _NOT_SERVING if failing else _SERVING
        for name in self._names:
            # The stock servicer ignores this once graceful shutdown began.
            await self._servicer.set(name, status)

    async def _database_ok(self) -> bool:
        try:
            if self._connection is None or self._connection.is_closed():
                self._connection = await asyncpg.connect(
                    self._dsn,
                    timeout=self._timeout_s,
                    server_settings={"application_name": self._application_name},
                )
            await self._connection.fetchval("SELECT 1", timeout=self._timeout_s)
            return True
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            logger.debug("database health check failed: %r", exc)
            if self._connection is not None:
                self._connection.terminate()
                self._connection = None
            return False


async def _passes(name: str, check: HealthCheck) -> bool:
    try:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        return bool(outcome)
    except Exception:
        logger.debug("health check %s raised", name, exc_info=True)
        return False

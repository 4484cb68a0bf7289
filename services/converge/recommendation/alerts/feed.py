"""One listener per process for new alert events, shared by every
SubscribeAlerts stream: a subscriber that has caught up waits on it and costs
no database work until an event is committed (NOTIFY at commit, migration
0005), instead of each polling the table."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

import asyncpg

from converge.recommendation.alerts.store import AlertEventRow, AlertStore, Listener
from converge.runtime.tasks import stop_task

logger = logging.getLogger(__name__)

PAGE = 200
# Without a listening connection (the database was away), and for events that
# become deliverable only when an older transaction elsewhere ends (nothing
# notifies then), subscribers look again after this long.
FALLBACK_S = 1.0
PENDING_RETRY_S = 0.01


class AlertFeed:
    def __init__(self, store: AlertStore) -> None:
        self.store = store
        self._generation = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._listening = False

    def _on_event(self) -> None:
        self._generation += 1
        asyncio.get_running_loop().create_task(self._notify_all())

    async def _notify_all(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._keep_listening(), name="alert-feed")

    async def _keep_listening(self) -> None:
        listener: Listener | None = None
        delay = 0.2
        try:
            while True:
                if listener is None or listener.is_closed():
                    if listener is not None:
                        with contextlib.suppress(Exception):
                            await self.store.stop_listening(listener)
                        listener = None
                    self._listening = False
                    try:
                        listener = await self.store.listen(self._on_event)
                        self._listening = True
                        delay = 0.2
                        self._on_event()  # (events may have come while nobody listened)
                    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                        logger.warning("alert feed cannot listen (retrying): %s", error)
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 5.0)
                        continue
                await asyncio.sleep(FALLBACK_S)
        finally:
            self._listening = False
            if listener is not None:
                with contextlib.suppress(Exception):
                    await self.store.stop_listening(listener)

    async def events(
        self, team: str, position: tuple[int, int], kinds: Sequence[str]
    ) -> AsyncIterator[AlertEventRow]:
        """A team's events after `position`, in order, for as long as the
        caller reads: each once."""
        self.start()
        while True:
            generation = self._generation
            rows, pending = await self.store.events_after(team, position, kinds, PAGE)
            for row in rows:
                position = row.position
                yield row
            if len(rows) == PAGE:
                continue
            if pending:
                await asyncio.sleep(PENDING_RETRY_S)
                continue
            async with self._changed:
                if self._generation == generation:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for
                    # swallows a cancel (the subscriber gone, the server
                    # stopping) that arrives as a notification ends the wait
                    # (gh-86296), and the stream would read on for nobody.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(FALLBACK_S):
                            await self._changed.wait()

    async def close(self) -> None:
        await stop_task(self._task)

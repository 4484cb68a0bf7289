"""Background work a service repeats on an interval (retention purges and the
like), run the same way everywhere: the first round at start, a failing round
logged with its traceback and tried again at the next interval (serving goes
on), cancelled on shutdown."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from converge.runtime.tasks import stop_task

logger = logging.getLogger(__name__)


class Periodic:
    """Runs `round` every `interval_s` seconds once started, until closed."""

    def __init__(
        self, name: str, interval_s: float, round: Callable[[], Awaitable[object]]
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self._round = round
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def _run(self) -> None:
        while True:
            try:
                await self._round()
            except Exception:  # (the next round tries again; serving goes on)
                logger.exception("%s failed; tried again in %.0f s", self.name, self.interval_s)
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)

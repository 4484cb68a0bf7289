"""Waiting for a wake-up and stopping background tasks without losing a cancel.

Python 3.11 loses cancels in two common patterns, so every service uses these
two helpers instead of writing them out:

- `asyncio.wait_for(event.wait(), t)` returns normally when a cancel arrives
  just as the event is set: the inner wait has finished, so wait_for hands
  back its result and drops the cancel (CPython gh-86296, fixed in 3.12). A
  loop cancelled at shutdown as it was woken then runs on, and whoever waits
  for it waits until the runtime's bound on a shutdown hook (bcb1609).
- `task.cancel()` followed by `await task` under
  `suppress(CancelledError)` also suppresses a cancel of the caller, such as
  the runtime cutting a shutdown hook off at its 15 s bound. The hook then
  looks as if it finished and the overrun is never logged.

`wait_event` waits under `asyncio.timeout`, which creates no inner task, so
nothing can finish between the cancel and its delivery. `stop_task` waits
with `asyncio.wait`, which raises a cancel of the caller and never that of
the task it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)


async def wait_event(event: asyncio.Event, timeout_s: float) -> bool:
    """Waits for `event` to be set, at most `timeout_s` seconds; returns
    whether it is set. A cancel of the caller is always raised."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancels a background task and waits until it has ended; logs the
    exception it ended with, if any. Cancelling the caller cancels this
    wait (the task stays cancelled and ends on its own)."""
    if task is not None:
        await stop_tasks((task,))


async def stop_tasks(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """`stop_task` for several tasks at once: all are cancelled before any
    is waited for."""
    stopping = set(tasks)
    if not stopping:
        return
    for task in stopping:
        task.cancel()
    await asyncio.wait(stopping)
    for task in stopping:
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("background task %s failed", task.get_name(), exc_info=error)

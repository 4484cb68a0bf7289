"""Natural batching: concurrent callers share one call of a batch function.

A caller's item is sent at once when fewer than `max_in_flight` calls are
running; otherwise it waits, and the next call to start takes every waiting
item (up to `max_batch`). No timer holds anything back, so an idle service
pays no added latency, and under load the batches grow by themselves with
the queue (the "smart batching" of Triton's and MLServer's dynamic batchers,
without their delay window).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from converge.runtime.tasks import stop_tasks

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

# Runs one batch: the items, and the time left (seconds) for the caller who
# may wait longest; returns one result (or an exception) per item, in order.
BatchFunction = Callable[[Sequence[ItemT], float], Awaitable[Sequence[ResultT | BaseException]]]


@dataclass
class _Waiting(Generic[ItemT, ResultT]):
    item: ItemT
    deadline: float  # loop time
    future: asyncio.Future[ResultT]


class Coalescer(Generic[ItemT, ResultT]):
    """Shares calls of `run` among concurrent `submit`s."""

    def __init__(
        self, run: BatchFunction[ItemT, ResultT], *, max_batch: int, max_in_flight: int
    ) -> None:
        self._run = run
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._queue: list[_Waiting[ItemT, ResultT]] = []
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.batches = 0  # calls of `run` so far (for tests and metrics)
        self.items = 0  # items through them

    async def submit(self, item: ItemT, timeout_s: float) -> ResultT:
        """The result for `item`; `TimeoutError` when it is not there in `timeout_s`."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(item, loop.time() + timeout_s, loop.create_future())
        self._queue.append(waiting)
        self._start_if_free()
        try:
            # The shared call goes on for the others when this caller gives up.
            # (asyncio.timeout, not wait_for, which on Python 3.11 drops a
            # cancel of the caller arriving as the result does; runtime/tasks.py)
            async with asyncio.timeout(timeout_s):
                return await asyncio.shield(waiting.future)
        except (TimeoutError, asyncio.CancelledError):
            waiting.future.cancel()  # (its result, when it comes, is dropped)
            raise

    def _start_if_free(self) -> None:
        while self._queue and self._in_flight < self._max_in_flight:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            batch = [w for w in batch if not w.future.done()]
            if not batch:
                continue
            self._in_flight += 1
            # A context of its own: the call serves many callers, and must
            # not carry the first one's request id or deadline.
            task = asyncio.create_task(self._call(batch), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _call(self, batch: list[_Waiting[ItemT, ResultT]]) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.batches += 1
            self.items += len(batch)
            time_left = max(w.deadline for w in batch) - loop.time()
            try:
                results = await self._run([w.item for w in batch], max(time_left, 0.0))
            except Exception as error:  # every caller of the batch learns it
                results = [error] * len(batch)
            for waiting, result in zip(batch, results, strict=True):
                if waiting.future.done():
                    continue
                if isinstance(result, BaseException):
                    waiting.future.set_exception(result)
                else:
                    waiting.future.set_result(result)
        finally:
            self._in_flight -= 1
            self._start_if_free()

    async def close(self) -> None:
        await stop_tasks(list(self._tasks))

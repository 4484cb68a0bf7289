"""runtime.tasks: waiting for a wake-up and stopping a background task never
lose a cancel, including one that arrives in the same loop step as the event
being set or the task ending (the Python 3.11 fault of `asyncio.wait_for`,
gh-86296, and of awaiting a task under `suppress(CancelledError)`).

No clock: the races are made by doing two things in one step of the event
loop, and `_run_ready` lets freshly started tasks reach their first real
wait (the loop runs ready callbacks in order, so a few turns suffice)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

import pytest

from converge.runtime.server import _run_shutdown_hook
from converge.runtime.tasks import stop_task, stop_tasks, wait_event

# Long enough that only a broken helper ever reaches it.
FOREVER_S = 3600.0


async def _run_ready(turns: int = 5) -> None:
    """Lets every task that is ready run on to its next real wait."""
    for _ in range(turns):
        await asyncio.sleep(0)


def _started(coroutine: Coroutine[Any, Any, Any], name: str = "") -> asyncio.Task[Any]:
    return asyncio.create_task(coroutine, name=name or None)


async def _ended(task: asyncio.Task[Any]) -> asyncio.Task[Any]:
    """The task once it has ended, however it ended (bounded: a hang fails)."""
    async with asyncio.timeout(60):
        await asyncio.wait({task})
    return task


class Stubborn:
    """A background task that, once cancelled, runs its cleanup until
    `release` is set (a follower closing its stream, a writer flushing)."""

    def __init__(self, fail_in_cleanup: bool = False) -> None:
        self.release = asyncio.Event()
        self.cleaning = False
        self.cleaned = False
        self.fail_in_cleanup = fail_in_cleanup

    async def run(self) -> None:
        try:
            await asyncio.Event().wait()  # (nothing sets it: runs until cancelled)
        finally:
            self.cleaning = True
            await self.release.wait()
            self.cleaned = True
            if self.fail_in_cleanup:
                raise ValueError("cleanup failed")


# --- wait_event ---------------------------------------------------------------------
async def test_wait_event_answers_whether_the_event_was_set() -> None:
    event = asyncio.Event()
    assert await wait_event(event, 0) is False, "not set: the timeout ends the wait"
    event.set()
    assert await wait_event(event, FOREVER_S) is True, "already set: answered at once"

    event.clear()
    waiter = _started(wait_event(event, FOREVER_S))
    await _run_ready()
    assert not waiter.done(), "waits while the event is clear"
    event.set()
    assert (await _ended(waiter)).result() is True


async def test_wait_event_raises_a_cancel_that_arrives_as_the_event_is_set() -> None:
    """On Python 3.11 `wait_for(event.wait(), t)` returns True here instead:
    its inner wait has finished when the cancel is delivered."""
    event = asyncio.Event()
    waiter = _started(wait_event(event, FOREVER_S))
    await _run_ready()
    assert not waiter.done()
    event.set()  # (the wake-up and the cancel in one step of the loop)
    waiter.cancel()
    assert (await _ended(waiter)).cancelled(), "the cancel was lost"


async def test_wait_event_raises_a_cancel_while_waiting() -> None:
    waiter = _started(wait_event(asyncio.Event(), FOREVER_S))
    await _run_ready()
    waiter.cancel()
    assert (await _ended(waiter)).cancelled()


# --- stop_task ----------------------------------------------------------------------
async def test_stop_task_cancels_the_task_and_returns_once_it_has_ended() -> None:
    work = Stubborn()
    task = _started(work.run())
    await _run_ready()
    stopper = _started(stop_task(task))
    await _run_ready()
    assert work.cleaning and not stopper.done(), "returned before the task ended"
    work.release.set()
    await _ended(stopper)
    assert stopper.result() is None
    assert work.cleaned and task.cancelled()


async def test_stop_task_raises_a_cancel_of_its_caller_while_the_task_still_runs() -> None:
    """The runtime's bound on a shutdown hook cancels the hook: awaiting the
    task under suppress(CancelledError) swallowed that cancel, and the hook
    looked as if it had finished."""
    work = Stubborn()
    task = _started(work.run())
    await _run_ready()
    stopper = _started(stop_task(task))
    await _run_ready()
    stopper.cancel()
    assert (await _ended(stopper)).cancelled(), "the caller's cancel was swallowed"
    assert not task.done(), "the task ends on its own time"
    work.release.set()
    assert (await _ended(task)).cancelled()


async def test_stop_task_raises_a_cancel_that_arrives_as_the_task_ends() -> None:
    work = Stubborn()
    task = _started(work.run())
    await _run_ready()
    stopper = _started(stop_task(task))
    await _run_ready()
    assert work.cleaning and not stopper.done()
    work.release.set()  # (the task's end and the caller's cancel in one step)
    stopper.cancel()
    assert (await _ended(stopper)).cancelled(), "the caller's cancel was lost"
    assert (await _ended(task)).cancelled() and work.cleaned


async def test_stop_task_logs_the_exception_a_task_ended_with(
    caplog: pytest.LogCaptureFixture,
) -> None:
    work = Stubborn(fail_in_cleanup=True)
    work.release.set()
    failing = _started(work.run(), name="the-failing-follower")

    async def fails_at_once() -> None:
        raise RuntimeError("failed before the stop")

    failed_before = _started(fails_at_once(), name="the-early-failure")
    quiet = _started(asyncio.Event().wait(), name="the-quiet-one")
    await _run_ready()
    assert failed_before.done()
    with caplog.at_level(logging.ERROR, logger="converge.runtime.tasks"):
        await stop_tasks([failing, failed_before, quiet])
    assert quiet.cancelled()
    logged = {r.getMessage(): r.exc_info[1] for r in caplog.records if r.exc_info}
    assert set(logged) == {
        "background task the-failing-follower failed",
        "background task the-early-failure failed",
    }
    assert isinstance(logged["background task the-failing-follower failed"], ValueError)
    assert isinstance(logged["background task the-early-failure failed"], RuntimeError)


async def test_stop_task_of_nothing_and_of_an_ended_task_returns_at_once() -> None:
    await stop_task(None)
    await stop_tasks([])

    async def done() -> int:
        return 1

    task = _started(done())
    await _ended(task)
    await stop_task(task)
    assert task.result() == 1


# --- the runtime's shutdown hooks ---------------------------------------------------
async def test_a_shutdown_hook_raises_a_cancel_of_the_stop_and_logs_a_cancel_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A cancel of the runtime's stop ends the hook it is running (so the
    process stops), while a hook that ends cancelled by itself is logged and
    the shutdown goes on to the pool and the embedded database."""
    never = asyncio.Event()

    async def hangs() -> None:
        await never.wait()

    running = _started(_run_shutdown_hook(hangs))
    await _run_ready()
    running.cancel()
    assert (await _ended(running)).cancelled(), "the stop's cancel was swallowed"

    async def ends_cancelled() -> None:
        raise asyncio.CancelledError

    with caplog.at_level(logging.ERROR, logger="converge.runtime.server"):
        await _run_shutdown_hook(ends_cancelled)
    assert any("ended cancelled" in r.getMessage() for r in caplog.records)

    async def times_out_itself() -> None:
        raise TimeoutError("the hook's own")

    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="converge.runtime.server"):
        await _run_shutdown_hook(times_out_itself)
    messages = [r.getMessage() for r in caplog.records]
    assert any("failed" in m for m in messages), messages
    assert not any("did not finish" in m for m in messages), "its own error is not an overrun"

"""Waiting on conditions, never on the clock: tests poll what they wait for
until it holds, with a generous deadline that only a real failure reaches."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE_S = 60.0
POLL_S = 0.02


async def wait_until(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool] = bool,
    *,
    timeout_s: float = DEADLINE_S,
    what: str = "condition",
) -> T:
    """Calls `probe` until `done` holds for its answer; returns that answer.

    The deadline is a failure, not a synchronisation: a slow machine only
    waits longer, it never passes or fails differently."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        answer = await probe()
        if done(answer):
            return answer
        if loop.time() > deadline:
            raise AssertionError(f"{what} not reached within {timeout_s:.0f} s (last: {answer!r})")
        await asyncio.sleep(POLL_S)


async def until(condition: Callable[[], bool], what: str, *, timeout_s: float = DEADLINE_S) -> None:
    """`wait_until` for a condition read without I/O (a counter, a flag)."""

    async def holds() -> bool:
        return condition()

    await wait_until(holds, timeout_s=timeout_s, what=what)

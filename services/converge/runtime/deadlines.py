"""The caller's deadline, readable by service code that holds no gRPC context.

The runtime's interceptor records the deadline of each call as it starts (each
call runs in its own task, so its own context); service code asks how much time
is left through `ServiceContext.time_remaining()` and
`ServiceContext.downstream_timeout()`, or these functions directly, and the
CPU executor refuses to begin a job whose caller's deadline has passed.
Deadlines are kept on the monotonic clock: a wall-clock step cannot shorten one.
"""

from __future__ import annotations

import time
from contextvars import ContextVar

from converge.runtime import errors

# Monotonic time at which the current call's caller stops waiting; None when
# the caller set no deadline, or outside a call.
_deadline: ContextVar[float | None] = ContextVar("converge_deadline", default=None)


def start_call(time_remaining_s: float | None) -> None:
    """Records the deadline of the call now starting (the interceptor's job)."""
    _deadline.set(None if time_remaining_s is None else time.monotonic() + time_remaining_s)


def deadline() -> float | None:
    """The current call's deadline on the `time.monotonic()` clock, or None."""
    return _deadline.get()


def time_remaining() -> float | None:
    """Seconds left before the caller stops waiting (never negative), or None
    when the caller set no deadline."""
    at = _deadline.get()
    return None if at is None else max(at - time.monotonic(), 0.0)


def check_deadline(doing: str = "the call") -> None:
    """Raises DeadlineExceeded once the caller's deadline has passed: a service
    calls it between steps so it stops work nobody waits for."""
    remaining = time_remaining()
    if remaining is not None and remaining <= 0:
        raise errors.DeadlineExceeded(f"the caller's deadline passed before {doing} finished")


def downstream_timeout(at_most_s: float | None = None, *, doing: str = "the call") -> float | None:
    """The timeout to give a downstream call: the caller's time left, capped at
    `at_most_s` (a service's own budget for that dependency). None when neither
    bounds it. DeadlineExceeded when no time is left."""
    check_deadline(doing)
    remaining = time_remaining()
    if remaining is None:
        return at_most_s
    return remaining if at_most_s is None else min(remaining, at_most_s)

"""One reader of the change stream per process, shared by every follower.

A `StreamInteractions` follower that has caught up used to poll the table on
its own; a thousand idle followers kept the pool busy and every other call
waited for a connection. Now a caught-up follower waits on the process's
`ChangeFeed` and costs no database work while nothing changes:

- One pool connection, taken out of the pool for as long as the feed runs,
  listens for the notification each ingest transaction sends at its commit
  (migration 0007).
- On a notification (or every `fallback_poll_s`, for rows that become
  deliverable only when an older transaction elsewhere ends, which nothing
  notifies), the feed alone reads the rows after its head, keeps the most
  recent ones in memory and wakes the followers that want one of them.
- A follower behind the feed's memory (a new one, or a slow one) reads from
  the database in pages, as before, until it has caught up.

So the database work of followers does not grow with their number; only
waking the followers a new row concerns does.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import asyncpg

from converge.interactions.store import InteractionsStore, Listener, StoredInteraction
from converge.runtime.tasks import stop_task, wait_event

logger = logging.getLogger(__name__)

Position = tuple[int, int]  # (xid, seq): where a row stands in the stream
PAGE = 500  # rows per read, by the feed and by a follower catching up
RECENT_ROWS = 5_000  # rows the feed keeps in memory for followers


def _position(row: StoredInteraction) -> Position:
    return row.xid, row.seq


def type_filter(types: Sequence[str]) -> Callable[[str], bool]:
    """Whether an interaction type is wanted: exact names and "prefix.*" ones;
    every type when none is given."""
    if not types:
        return lambda _: True
    exact = frozenset(t for t in types if not t.endswith(".*"))
    prefixes = tuple(t[:-1] for t in types if t.endswith(".*"))
    return lambda kind: kind in exact or kind.startswith(prefixes)


@dataclass(eq=False)
class _Follower:
    cursor: Position
    wants: Callable[[str], bool]
    woken: asyncio.Event = field(default_factory=asyncio.Event)


class ChangeFeed:
    def __init__(self, store: InteractionsStore, fallback_poll_s: float) -> None:
        self.store = store
        self.fallback_poll_s = fallback_poll_s
        self._following = 0  # open follow streams
        self._waiting: set[_Follower] = set()
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The recent rows, in stream order, and their positions: every row
        # after `_covered_from` up to `_head`. None: not read yet, or stale
        # (nobody followed for a while).
        self._rows: list[StoredInteraction] = []
        self._positions: list[Position] = []
        self._covered_from: Position | None = None
        self._head: Position = (0, 0)
        store.erasure_hooks.append(self.forget)

    # --- followers -----------------------------------------------------------------
    async def rows_after(
        self, cursor: Position, wants: Callable[[str], bool], keep_open: bool
    ) -> AsyncIterator[tuple[Position, StoredInteraction]]:
        """The wanted rows after `cursor`, each with its position; with
        `keep_open`, waits for new ones for as long as the caller reads."""
        follower = _Follower(cursor, wants)
        if keep_open:
            self._join()
        try:
            caught_up = False
            while True:
                rows = self._recent_after(follower.cursor) if caught_up else None
                if rows is None:
                    rows = await self.store.stream_after(follower.cursor, PAGE)
                    if not rows and not keep_open:
                        return
                    caught_up = keep_open and len(rows) < PAGE
                    if not rows:
                        # (Checked with no await before waiting, so nothing the
                        # feed read during the database read is missed.)
                        rows = self._recent_after(follower.cursor) or []
                for row in rows:
                    follower.cursor = _position(row)
                    if wants(row.type):
                        yield follower.cursor, row
                if rows:
                    continue
                follower.woken.clear()
                self._waiting.add(follower)
                try:
                    await follower.woken.wait()
                finally:
                    self._waiting.discard(follower)
        finally:
            if keep_open:
                self._following -= 1

    def _join(self) -> None:
        self._following += 1
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="interactions-change-feed")
        self._poked.set()

    def _recent_after(self, cursor: Position) -> list[StoredInteraction] | None:
        """The kept rows after `cursor` (a page at most); None when the kept
        rows do not reach back to it."""
        if self._covered_from is None or cursor < self._covered_from:
            return None
        if cursor >= self._head:
            return []
        start = bisect.bisect_right(self._positions, cursor)
        return self._rows[start : start + PAGE]

    def forget(self, customer_ids: Sequence[uuid.UUID]) -> None:
        """Drops the kept rows of erased customers."""
        erased = set(customer_ids)
        kept = [(p, r) for p, r in zip(self._positions, self._rows, strict=True)
                if r.customer_id not in erased]  # fmt: skip
        self._positions = [p for p, _ in kept]
        self._rows = [r for _, r in kept]

    # --- the reader ----------------------------------------------------------------
    def _on_stored(self) -> None:
        self._poked.set()

    async def _run(self) -> None:
        listener: Listener | None = None
        try:
            while True:
                if listener is None or listener.is_closed():
                    listener = await self._listen(listener)
                await wait_event(self._poked, self.fallback_poll_s)
                self._poked.clear()
                if not self._following:
                    self._covered_from = None  # (read afresh when someone follows again)
                    continue
                try:
                    await self._refresh()
                except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                    logger.warning("change feed could not read the stream: %s", error)
        finally:
            if listener is not None:
                with contextlib.suppress(Exception):
                    await self.store.stop_listening(listener)

    async def _listen(self, broken: Listener | None) -> Listener | None:
        if broken is not None:
            with contextlib.suppress(Exception):
                await self.store.stop_listening(broken)
        try:
            listener = await self.store.listen_for_stored(self._on_stored)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
            logger.warning("change feed cannot listen (polling meanwhile): %s", error)
            return None
        self._poked.set()  # (something may have been stored while nobody listened)
        return listener

    async def _refresh(self) -> None:
        """Reads what was stored since the head and wakes whom it concerns."""
        if self._covered_from is None:
            self._head = self._covered_from = await self.store.stream_head()
            self._rows, self._positions = [], []
            self._wake(self._head, [])
            return
        before = self._head
        new: list[StoredInteraction] = []
        while True:
            rows = await self.store.stream_after(self._head, PAGE)
            new += rows
            if rows:
                self._head = _position(rows[-1])
            if len(rows) < PAGE:
                break
        if not new:
            return
        self._rows += new
        self._positions += [_position(r) for r in new]
        if len(self._rows) > RECENT_ROWS:
            dropped = len(self._rows) - RECENT_ROWS
            self._covered_from = self._positions[dropped - 1]
            del self._rows[:dropped], self._positions[:dropped]
        self._wake(before, new)

    def _wake(self, before: Position, new: list[StoredInteraction]) -> None:
        """Wakes each waiting follower that wants one of the `new` rows (read
        after `before`); moves the others' cursors past them instead."""
        new_types = {r.type for r in new}
        for follower in list(self._waiting):
            if follower.cursor < before or (
                self._covered_from is not None and follower.cursor < self._covered_from
            ):
                wanted = True  # (it must read the rows between from the database)
            elif follower.cursor == before:
                wanted = any(follower.wants(t) for t in new_types)
            else:
                wanted = any(follower.wants(r.type) for r in new if _position(r) > follower.cursor)
            if wanted:
                self._waiting.discard(follower)
                follower.woken.set()
            elif new:
                follower.cursor = max(follower.cursor, self._head)

    async def close(self) -> None:
        await stop_task(self._task)

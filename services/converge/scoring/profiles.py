"""Profiles kept per replica: Score reads a customer's profile from identity
on every call, and it rarely changes, so each replica keeps the profiles it
read while identity's event stream says nothing happened to them.

Any event naming a customer (a profile change, a merge or unmerge, an
erasure, ...) drops its entry, and an entry is only kept when no event named
the customer since its read began (`ProfileCache.ticket`). Entries are only
taken while the follower is connected and has read the stream up to now: a
replica that loses the stream forgets everything and reads from identity
until it follows again. So a profile is served from memory at most the
stream's own delay (identity polls its outbox every 0.2 s) after it changed,
and an erased customer's profile is dropped when its erasure arrives (the
features, read from interactions on every call, refuse an erased customer
on their own).

The follower starts from the cursor interactions has applied
(`GetIdentitySyncStatus`), a recent point of the same stream, rather than
identity's whole history: the cache starts empty, so earlier events matter
to nobody, and it waits until it has caught up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc

from converge.runtime.tasks import stop_task
from converge.runtime.values import to_datetime
from converge.v1 import identity_pb2, identity_pb2_grpc, interactions_pb2, interactions_pb2_grpc

logger = logging.getLogger(__name__)

Profile = Mapping[str, Any]
# After this long with no event, the follower has read the stream up to now
# (identity sends its backlog in pages back to back).
QUIET_S = 0.5
FIRST_RETRY_S, MAX_RETRY_S = 0.2, 10.0
# Customers whose last drop is remembered (to refuse a read that overlapped it).
DROPS_KEPT = 10_000


@dataclass(frozen=True)
class Ticket:
    """Where the stream was when a read began."""

    events: int


class ProfileCache:
    """Profiles by customer id, least recently used dropped beyond `capacity`.
    Plain Python: the follower below feeds it events."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self._clock = clock
        self._entries: OrderedDict[str, Profile | None] = OrderedDict()
        self._events = 0  # events seen, and disconnections
        self._dropped: OrderedDict[str, int] = OrderedDict()  # customer -> event number
        self._forgotten_upto = 0  # the latest drop no longer in `_dropped`
        self._following = False
        self._caught_up = False
        self._last_event_at = 0.0
        self.hits = 0
        self.misses = 0

    @property
    def usable(self) -> bool:
        """Connected and read up to now (entries are then taken and served)."""
        if self._following and not self._caught_up:
            self._caught_up = self._clock() - self._last_event_at >= QUIET_S
        return self._following and self._caught_up and self.capacity > 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, customer_id: str) -> tuple[bool, Profile | None]:
        """(found, profile); a customer identity has no profile for is found as None."""
        if not self.usable or customer_id not in self._entries:
            self.misses += 1
            return False, None
        self._entries.move_to_end(customer_id)
        self.hits += 1
        return True, self._entries[customer_id]

    def ticket(self) -> Ticket | None:
        """Taken before a read: what `put` needs to tell whether an event
        overlapped it. None when entries are not taken now."""
        return Ticket(self._events) if self.usable else None

    def put(self, customer_id: str, profile: Profile | None, ticket: Ticket | None) -> None:
        if ticket is None or not self.usable:
            return
        if ticket.events < self._forgotten_upto:
            return  # (a drop since may have been forgotten: take no chance)
        if self._dropped.get(customer_id, 0) > ticket.events:
            return  # an event named the customer while the read was under way
        self._entries[customer_id] = profile
        self._entries.move_to_end(customer_id)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    # --- what the follower tells it -----------------------------------------

    def following(self, at_now: bool = False) -> None:
        """The stream is (again) open; `at_now` when it is known to be read up to now."""
        self._following = True
        self._caught_up = at_now
        self._last_event_at = self._clock()

    def event(self, *customer_ids: str, recent: bool = False) -> None:
        """An event named these customers; `recent` when it happened after
        the stream was opened (so the follower has caught up)."""
        self._events += 1
        self._last_event_at = self._clock()
        if recent:
            self._caught_up = True
        for customer_id in customer_ids:
            if not customer_id:
                continue
            self._entries.pop(customer_id, None)
            self._dropped[customer_id] = self._events
            self._dropped.move_to_end(customer_id)
        while len(self._dropped) > DROPS_KEPT:
            _, number = self._dropped.popitem(last=False)
            self._forgotten_upto = max(self._forgotten_upto, number)

    def lost(self) -> None:
        """The stream broke: nothing held can be trusted any more."""
        self._following = False
        self._caught_up = False
        self._entries.clear()
        self._events += 1
        self._forgotten_upto = self._events


class ProfileFollower:
    """Follows identity's event stream into a `ProfileCache`, from the point
    interactions has applied, retrying with a doubling delay when it breaks."""

    def __init__(
        self,
        cache: ProfileCache,
        identity: identity_pb2_grpc.IdentityServiceAsyncStub,
        interactions: interactions_pb2_grpc.InteractionsServiceAsyncStub,
        timeout_s: float,
    ) -> None:
        self.cache = cache
        self._identity = identity
        self._interactions = interactions
        self._timeout_s = timeout_s
        self._cursor: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None

    def start(self) -> None:
        if self._task is None and self.cache.capacity > 0:
            self._task = asyncio.create_task(self._follow(), name="profile follower")

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
        self.cache.lost()

    async def _follow(self) -> None:
        retry_s = FIRST_RETRY_S
        while True:
            try:
                await self._follow_stream()
                problem = "identity event stream ended"
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                problem = f"identity event stream: {error.code().name}"
            except Exception as error:
                problem = f"{type(error).__name__}: {error}"
                logger.exception("profile follower failed")
            self.cache.lost()
            if problem != self.last_error:
                logger.warning("profiles read from identity on every call (%s)", problem)
            self.last_error = problem
            await asyncio.sleep(retry_s)
            retry_s = min(retry_s * 2, MAX_RETRY_S)

    async def _follow_stream(self) -> None:
        if self._cursor is None:
            status = await self._interactions.GetIdentitySyncStatus(
                interactions_pb2.GetIdentitySyncStatusRequest(), timeout=self._timeout_s
            )
            self._cursor = status.cursor
        stream = self._identity.StreamIdentityEvents(
            identity_pb2.StreamIdentityEventsRequest(from_cursor=self._cursor, follow=True)
        )
        opened = time.time()
        self.cache.following()
        async for event in stream:
            recent = to_datetime(event.occurred_at).timestamp() >= opened
            self.cache.event(event.customer_id, event.other_customer_id, recent=recent)
            self._cursor = event.cursor
            if self.last_error is not None:
                logger.info("profiles kept again, identity's stream followed")
                self.last_error = None

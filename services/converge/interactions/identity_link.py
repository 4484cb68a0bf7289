"""The interactions service's link to the identity service: resolving the
identifiers sources send, and following merges, unmerges and erasures from
identity's event stream (from a cursor kept in this service's schema)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from converge.interactions.store import InteractionsStore
from converge.runtime.channels import aio_channel
from converge.runtime.errors import (
    ConvergeError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
    read_status,
)
from converge.runtime.tasks import stop_task
from converge.runtime.values import to_datetime
from converge.v1 import common_pb2, identity_pb2, identity_pb2_grpc

logger = logging.getLogger(__name__)

CACHE_SIZE = 100_000
BATCH = 1000  # identifiers per BatchResolve call
MERGED = identity_pb2.IDENTITY_EVENT_TYPE_MERGED
UNMERGED = identity_pb2.IDENTITY_EVENT_TYPE_UNMERGED
FORGOTTEN = identity_pb2.IDENTITY_EVENT_TYPE_FORGOTTEN
IDENTIFIER_REMOVED = identity_pb2.IDENTITY_EVENT_TYPE_IDENTIFIER_REMOVED
# The follower's retry delays after a failure: doubled each time up to the cap,
# back to the first after an event was applied.
FIRST_RETRY_S, MAX_RETRY_S = 0.2, 10.0


@dataclass(frozen=True)
class IdentifierRef:
    """An identifier as a source sent it (normalised by the identity service)."""

    type: int
    value: str
    source: str


IdentifierKey = tuple[int, str, str]
EraseCustomers = Callable[[list[uuid.UUID]], Awaitable[object]]


def _outcome(
    result: identity_pb2.BatchResolveResult,
) -> tuple[uuid.UUID | None, bool, ConvergeError | None]:
    """One batch item as (owner, created, error), identity's field paths
    re-pathed to ours (`identifiers[0].value` -> `customer.identifier.value`)."""
    if result.HasField("error"):
        error = read_status(result.error)
        if error.code == grpc.StatusCode.INVALID_ARGUMENT:
            path = error.field.replace("identifiers[0]", "customer.identifier", 1)
            violation = FieldViolation(path or "customer.identifier", error.reason)
            return None, False, InvalidArgument([violation])
        if error.code == grpc.StatusCode.NOT_FOUND:
            return None, False, NotFound("customer with identifier", "given")
        return None, False, FailedPrecondition(f"identity refused the identifier: {error.reason}")
    owner = (
        result.resolved_identifiers[0].customer_id
        if result.resolved_identifiers
        else result.customer_id
    )
    return uuid.UUID(owner), result.created, None


class IdentityLink:
    def __init__(self, address: str, timeout_s: float, store: InteractionsStore) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.store = store
        self.connected = False
        self._channel = aio_channel(address) if address else None
        self._stub = identity_pb2_grpc.IdentityServiceStub(self._channel) if self._channel else None
        # Raw identifier as sent -> the customer it is attached to. An owner
        # changes when its identifier is removed (IDENTIFIER_REMOVED drops the
        # entries of that customer) or the customer is erased (everything is
        # dropped). Each replica follows the stream itself, so each drops its own.
        self._owners: OrderedDict[IdentifierKey, uuid.UUID] = OrderedDict()
        # Bumped on every drop: an answer asked for before a drop is not cached.
        self._generation = 0
        self._follower: asyncio.Task[None] | None = None
        # Customer ids identity confirmed it issued (see missing_customers).
        self._issued: OrderedDict[uuid.UUID, None] = OrderedDict()
        # This replica's place in identity's stream once it has read the saved
        # one: replicas share the saved cursor, and a replica resuming from
        # another's would miss the removals its own cache must hear about.
        self._cursor: str | None = None
        self._retry_s = FIRST_RETRY_S
        self.last_error: str | None = None

    @property
    def healthy(self) -> bool:
        """False from a failure of the follower (why: `last_error`) until it
        follows again; a health check of the service can report it."""
        return self.last_error is None

    @property
    def checks_customers(self) -> bool:
        """Whether customer ids are checked with identity (not without one)."""
        return self._stub is not None

    async def missing_customers(self, customer_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        """The ids among `customer_ids` that identity never issued or has
        erased, asked in batches. Ids found are remembered: an issued id stays
        valid until it is erased, and this service refuses erased ids itself
        (its erased_customers table), whatever is remembered here."""
        missing: set[uuid.UUID] = set()
        asked = [c for c in dict.fromkeys(customer_ids) if c not in self._issued]
        for start in range(0, len(asked), BATCH):
            chunk = asked[start : start + BATCH]
            assert self._stub is not None
            try:
                reply = await self._stub.BatchGetCustomers(
                    identity_pb2.BatchGetCustomersRequest(customer_ids=[str(c) for c in chunk]),
                    timeout=self.timeout_s,
                )
            except grpc.aio.AioRpcError as failure:
                raise Unavailable(f"identity service: {failure.code().name}") from None
            missing.update(uuid.UUID(c) for c in reply.missing_customer_ids)
            self._issued.update((c, None) for c in chunk if c not in missing)
        while len(self._issued) > CACHE_SIZE:
            self._issued.popitem(last=False)
        return missing

    async def owner_of(self, ref: IdentifierRef, *, create: bool) -> tuple[uuid.UUID, bool]:
        """The customer an identifier belongs to, and whether it was created now."""
        [(owner, created, error)] = await self.owners_of([ref], create=create)
        if error is not None:
            raise error
        assert owner is not None
        return owner, created

    async def owners_of(
        self, refs: Sequence[IdentifierRef], *, create: bool
    ) -> list[tuple[uuid.UUID | None, bool, ConvergeError | None]]:
        """For each identifier: the customer it belongs to, whether it was
        created now, or why it could not be resolved. Unknown identifiers go to
        the identity service in batches, each distinct one once."""
        results: list[tuple[uuid.UUID | None, bool, ConvergeError | None]] = [
            (None, False, None)
        ] * len(refs)
        waiting: dict[IdentifierKey, list[int]] = {}
        for index, ref in enumerate(refs):
            key = (ref.type, ref.source, ref.value)
            cached = self._owners.get(key)
            if cached is not None:
                self._owners.move_to_end(key)
                results[index] = (cached, False, None)
            else:
                waiting.setdefault(key, []).append(index)
        if waiting and self._stub is None:
            raise FailedPrecondition(
                "this service runs without an identity service: give customers by customer_id"
            )
        keys = list(waiting)
        generation = self._generation
        for start in range(0, len(keys), BATCH):
            chunk = keys[start : start + BATCH]
            assert self._stub is not None
            try:
                reply = await self._stub.BatchResolve(
                    identity_pb2.BatchResolveRequest(
                        requests=[
                            identity_pb2.ResolveRequest(
                                identifiers=[
                                    common_pb2.Identifier(
                                        type=common_pb2.IdentifierType.ValueType(kind),
                                        value=value,
                                        source=source,
                                    )
                                ],
                                lookup_only=not create,
                            )
                            for kind, source, value in chunk
                        ]
                    ),
                    timeout=self.timeout_s,
                )
            except grpc.aio.AioRpcError as failure:
                raise Unavailable(f"identity service: {failure.code().name}") from None
            for key, result in zip(chunk, reply.results, strict=True):
                owner, created, problem = _outcome(result)
                for position, index in enumerate(waiting[key]):
                    results[index] = (owner, created and position == 0, problem)
                if owner is not None and generation == self._generation:
                    self._owners[key] = owner
        while len(self._owners) > CACHE_SIZE:
            self._owners.popitem(last=False)
        return results

    def start_following(self, erase: EraseCustomers) -> None:
        if self._stub is not None:
            self._follower = asyncio.create_task(self._follow(erase), name="identity-follower")

    async def _follow(self, erase: EraseCustomers) -> None:
        """Follows identity's events for as long as the service runs: any
        failure (identity unreachable, this service's database down) is logged
        when it happens and retried after a delay that doubles up to a cap."""
        while True:
            try:
                await self._follow_stream(erase)
                problem = "identity event stream ended"
            except asyncio.CancelledError:
                self.connected = False
                raise
            except grpc.aio.AioRpcError as error:
                problem = f"identity event stream: {error.code().name}"
            except Exception as error:
                problem = f"{type(error).__name__}: {error}"
                logger.exception("identity follower failed")
            self.connected = False
            self.last_error = problem
            logger.warning(
                "identity follower interrupted (%s); retrying in %.1f s", problem, self._retry_s
            )
            await asyncio.sleep(self._retry_s)
            self._retry_s = min(self._retry_s * 2, MAX_RETRY_S)

    async def _follow_stream(self, erase: EraseCustomers) -> None:
        assert self._stub is not None
        if self._cursor is None:
            status = await self.store.sync_status()
            self._cursor = status.cursor if status else ""
        stream = self._stub.StreamIdentityEvents(
            identity_pb2.StreamIdentityEventsRequest(from_cursor=self._cursor, follow=True)
        )
        self.connected = True
        self.last_error = None
        async for event in stream:
            await self._apply(event, erase)
            self._cursor = event.cursor
            self._retry_s = FIRST_RETRY_S

    async def _apply(
        self, event: identity_pb2.StreamIdentityEventsResponse, erase: EraseCustomers
    ) -> None:
        at = to_datetime(event.occurred_at)
        if event.type == MERGED:
            await self.store.apply_merge(
                uuid.UUID(event.other_customer_id),
                uuid.UUID(event.customer_id),
                uuid.UUID(event.merge_id),
                event.cursor,
                at,
            )
        elif event.type == UNMERGED:
            await self.store.apply_unmerge(uuid.UUID(event.merge_id), event.cursor, at)
        elif event.type == FORGOTTEN:
            self._drop_owners(lambda key, owner: True)
            await erase([uuid.UUID(event.customer_id)])
            await self.store.save_sync(event.cursor, at)
        elif event.type == IDENTIFIER_REMOVED:
            # The cache holds identifiers as sources wrote them and the event the
            # normalised one, so every entry of its former owner goes.
            former = uuid.UUID(event.customer_id)
            self._drop_owners(lambda key, owner: owner == former)
            await self.store.save_sync(event.cursor, at)
        else:
            await self.store.save_sync(event.cursor, at)

    def forget_customers(self, customer_ids: Sequence[uuid.UUID]) -> None:
        """Drops what is remembered of erased customers (an erasure hook), at
        once rather than when identity's forget event arrives: their
        identifiers resolve afresh, to whoever identity says owns them now,
        instead of to an id this service now refuses."""
        erased = set(customer_ids)
        self._drop_owners(lambda key, owner: owner in erased)
        for customer_id in erased:
            self._issued.pop(customer_id, None)

    def _drop_owners(self, doomed: Callable[[IdentifierKey, uuid.UUID], bool]) -> None:
        self._generation += 1
        for key in [k for k, owner in self._owners.items() if doomed(k, owner)]:
            del self._owners[key]

    async def close(self) -> None:
        await stop_task(self._follower)
        if self._channel is not None:
            await self._channel.close(None)

"""The interactions service's link to the identity service: resolving the
identifiers sources send, and following merges, unmerges and erasures from
identity's event stream (from a cursor kept in this service's schema)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc

from converge.interactions.store import InteractionsStore
from converge.runtime.errors import (
    ConvergeError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from converge.runtime.values import to_datetime
from converge.v1 import common_pb2, identity_pb2, identity_pb2_grpc

logger = logging.getLogger(__name__)

CACHE_SIZE = 100_000
BATCH = 1000  # identifiers per BatchResolve call
MERGED = identity_pb2.IDENTITY_EVENT_TYPE_MERGED
UNMERGED = identity_pb2.IDENTITY_EVENT_TYPE_UNMERGED
FORGOTTEN = identity_pb2.IDENTITY_EVENT_TYPE_FORGOTTEN


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
    if result.error_code == "INVALID_ARGUMENT":
        path = result.error_field.replace("identifiers[0]", "customer.identifier", 1)
        return (
            None,
            False,
            InvalidArgument([FieldViolation(path or "customer.identifier", result.error)]),
        )
    if result.error_code == "NOT_FOUND":
        return None, False, NotFound("customer with identifier", "given")
    if result.error_code:
        return None, False, FailedPrecondition(f"identity refused the identifier: {result.error}")
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
        self._channel = grpc.aio.insecure_channel(address) if address else None
        self._stub = identity_pb2_grpc.IdentityServiceStub(self._channel) if self._channel else None
        # Raw identifier as sent -> the customer it belongs to. Owners change only
        # when a customer is erased, and then the whole cache is dropped.
        self._owners: OrderedDict[IdentifierKey, uuid.UUID] = OrderedDict()
        self._follower: asyncio.Task[None] | None = None

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
                if owner is not None:
                    self._owners[key] = owner
        while len(self._owners) > CACHE_SIZE:
            self._owners.popitem(last=False)
        return results

    def start_following(self, erase: EraseCustomers) -> None:
        if self._stub is not None:
            self._follower = asyncio.create_task(self._follow(erase), name="identity-follower")

    async def _follow(self, erase: EraseCustomers) -> None:
        assert self._stub is not None
        backoff = 0.2
        while True:
            status = await self.store.sync_status()
            cursor = status["cursor"] if status else ""
            try:
                stream = self._stub.StreamIdentityEvents(
                    identity_pb2.StreamIdentityEventsRequest(from_cursor=cursor, follow=True)
                )
                self.connected = True
                async for event in stream:
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
                        self._owners.clear()
                        await erase([uuid.UUID(event.customer_id)])
                        await self.store.save_sync(event.cursor, at)
                    else:
                        await self.store.save_sync(event.cursor, at)
                    backoff = 0.2
            except grpc.aio.AioRpcError as error:
                self.connected = False
                logger.warning(
                    "identity event stream interrupted (%s); retrying", error.code().name
                )
            except asyncio.CancelledError:
                self.connected = False
                raise
            except Exception:
                self.connected = False
                logger.exception("identity event stream failed; retrying")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
        if self._channel is not None:
            await self._channel.close(None)

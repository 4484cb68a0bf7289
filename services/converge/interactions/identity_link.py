"""The interactions service's link to the identity service: resolving the
identifiers sources send, and following merges, unmerges and erasures from
identity's event stream (from a cursor kept in this service's schema)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from converge.interactions.store import InteractionsStore
from converge.runtime.errors import (
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


def _identifier_violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
    """Identity's field violations, re-pathed from its request to ours
    (`identifiers[0].value` -> `customer.identifier.value`)."""
    found = []
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # an AioRpcError is a Call
    for detail in status.details if status else []:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            for violation in bad.field_violations:
                path = violation.field.replace("identifiers[0]", "customer.identifier", 1)
                found.append(FieldViolation(path, violation.description))
    return found or [FieldViolation("customer.identifier", error.details() or "invalid identifier")]


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
        key = (ref.type, ref.source, ref.value)
        identifier = common_pb2.Identifier(
            type=common_pb2.IdentifierType.ValueType(ref.type), value=ref.value, source=ref.source
        )
        cached = self._owners.get(key)
        if cached is not None:
            self._owners.move_to_end(key)
            return cached, False
        if self._stub is None:
            raise FailedPrecondition(
                "this service runs without an identity service: give customers by customer_id"
            )
        try:
            reply = await self._stub.Resolve(
                identity_pb2.ResolveRequest(identifiers=[identifier], lookup_only=not create),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidArgument(_identifier_violations(error)) from None
            if error.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFound("customer with identifier", identifier.source or "given") from None
            raise Unavailable(f"identity service: {error.code().name}") from None
        owner = (
            uuid.UUID(reply.resolved_identifiers[0].customer_id)
            if reply.resolved_identifiers
            else uuid.UUID(reply.customer.customer_id)
        )
        self._owners[key] = owner
        if len(self._owners) > CACHE_SIZE:
            self._owners.popitem(last=False)
        return owner, reply.created

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

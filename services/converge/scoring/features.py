"""The feature source: live features from the interactions service
(`GetFeatures`, by customer id or any identifier, never creating a customer)
and the profile from identity (`BatchGetCustomers`, the fields training
reads), both through the shared channel factory.

Concurrent calls share reads (`batching.Coalescer`): calls that arrive while
a read is in flight go together into the next one, so under load one round
trip serves many callers. Each caller waits no longer than its own deadline
(capped by `features_timeout_s`): past it, UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import grpc

from converge.models.handle import KnownFeatures
from converge.runtime.channels import aio_channel
from converge.runtime.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from converge.runtime.values import CustomerKey, to_datetime
from converge.scoring.batching import Coalescer
from converge.scoring.profiles import Profile, ProfileCache, ProfileFollower
from converge.v1 import (
    identity_pb2,
    identity_pb2_grpc,
    interactions_pb2,
    interactions_pb2_grpc,
)

logger = logging.getLogger(__name__)

FeatureValue = float | str

# Statuses of a dependency that mean "not now", as opposed to a bad request.
_UNREACHABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
)


@dataclass(frozen=True)
class FeatureInfo:
    """What reasons need of a feature definition."""

    name: str
    description: str
    unit: str
    entity: str  # "customer" or "ticket"


@dataclass(frozen=True)
class FeatureCatalogue:
    """The feature set interactions serves."""

    version: str
    features: Mapping[str, FeatureInfo]
    categorical: frozenset[str] = frozenset()

    def known_features(self) -> KnownFeatures:
        """What a model version is checked against."""
        return KnownFeatures(self.version, frozenset(self.features), self.categorical)


@dataclass(frozen=True)
class LiveFeatures:
    """One customer's (and ticket's) features and profile at one moment."""

    customer_id: str
    as_of: datetime
    feature_set_version: str
    customer: Mapping[str, FeatureValue]
    ticket_id: str
    ticket: Mapping[str, FeatureValue] | None
    profile: Profile | None


@dataclass(frozen=True)
class _Read:
    customer: CustomerKey
    ticket_id: str


@dataclass(frozen=True)
class _Found:
    customer_id: str
    as_of: datetime
    version: str
    customer: Mapping[str, FeatureValue]
    ticket: Mapping[str, FeatureValue] | None


def _values(vector: Any) -> dict[str, FeatureValue]:
    values: dict[str, FeatureValue] = dict(vector.values)
    values.update(vector.category_values)
    return values


def _dependency_error(service: str, error: grpc.aio.AioRpcError) -> Exception:
    if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgument([FieldViolation("customer", str(error.details()))])
    if error.code() == grpc.StatusCode.NOT_FOUND:
        return NotFound("customer", str(error.details()))
    if error.code() not in _UNREACHABLE:
        logger.warning("%s answered %s: %s", service, error.code().name, error.details())
    return Unavailable(
        f"the {service} service cannot answer now ({error.code().name}), retry later"
    )


class FeatureSource:
    """Reads live features and profiles, sharing reads among concurrent calls."""

    def __init__(
        self,
        interactions_address: str,
        identity_address: str,
        *,
        timeout_s: float,
        max_batch: int,
        max_in_flight: int,
        profile_cache_size: int = 0,
    ) -> None:
        self.timeout_s = timeout_s
        self._interactions_channel = aio_channel(interactions_address)
        self._interactions = interactions_pb2_grpc.InteractionsServiceStub(
            self._interactions_channel
        )
        self._identity_channel = aio_channel(identity_address) if identity_address else None
        self._identity = (
            identity_pb2_grpc.IdentityServiceStub(self._identity_channel)
            if self._identity_channel is not None
            else None
        )
        self._features: Coalescer[_Read, _Found] = Coalescer(
            self._read_features, max_batch=max_batch, max_in_flight=max_in_flight
        )
        self._profiles: Coalescer[str, Profile | None] = Coalescer(
            self._read_profiles, max_batch=max_batch, max_in_flight=max_in_flight
        )
        self._catalogue: FeatureCatalogue | None = None
        # Profiles kept while identity's stream says they are unchanged (see profiles.py).
        self.profiles = ProfileCache(profile_cache_size if self._identity is not None else 0)
        self._profile_follower = (
            ProfileFollower(self.profiles, self._identity, self._interactions, timeout_s)
            if self._identity is not None
            else None
        )

    def start(self) -> None:
        """Starts following identity's events for the profile cache."""
        if self._profile_follower is not None:
            self._profile_follower.start()

    @property
    def feature_reads(self) -> Coalescer[_Read, _Found]:
        return self._features

    async def close(self) -> None:
        if self._profile_follower is not None:
            await self._profile_follower.close()
        await self._features.close()
        await self._profiles.close()
        await self._interactions_channel.close(None)
        if self._identity_channel is not None:
            await self._identity_channel.close(None)

    # --- what the service calls -------------------------------------------------------

    async def read(self, customer: CustomerKey, ticket_id: str, timeout_s: float) -> LiveFeatures:
        """The customer's live features (and the ticket's, when given) and
        profile. NOT_FOUND for an unknown customer or a ticket that is not
        the customer's; UNAVAILABLE when the answer does not come in time."""
        loop_timeout = min(timeout_s, self.timeout_s)
        # Named by id, the profile comes from the cache, or is asked at once,
        # beside the features: the two round trips overlap instead of adding up.
        early: asyncio.Future[Profile | None] | None = None
        kept, kept_profile = False, None
        if self._identity is not None and customer.customer_id:
            kept, kept_profile = self.profiles.get(customer.customer_id)
            if not kept:
                early = asyncio.ensure_future(
                    self._profiles.submit(customer.customer_id, loop_timeout)
                )
        try:
            try:
                found = await self._features.submit(_Read(customer, ticket_id), loop_timeout)
            except TimeoutError:
                raise Unavailable("the interactions service did not answer in time") from None
            profile: Profile | None = None
            if self._identity is not None:
                try:
                    same = found.customer_id == customer.customer_id
                    if kept and same:
                        profile = kept_profile
                    elif early is not None and same:
                        profile = await early
                    else:  # (by identifier, or the id now names a merged customer)
                        kept, profile = self.profiles.get(found.customer_id)
                        if not kept:
                            profile = await self._profiles.submit(found.customer_id, loop_timeout)
                except TimeoutError:
                    raise Unavailable("the identity service did not answer in time") from None
        finally:
            if early is not None:
                if not early.done():
                    early.cancel()
                elif not early.cancelled():
                    early.exception()  # (seen: an error the features' error outranks)
        return LiveFeatures(
            customer_id=found.customer_id,
            as_of=found.as_of,
            feature_set_version=found.version,
            customer=found.customer,
            ticket_id=ticket_id,
            ticket=found.ticket,
            profile=profile,
        )

    async def catalogue(self, timeout_s: float | None = None) -> FeatureCatalogue:
        """The served feature definitions (read once, and again when the
        served version changes)."""
        if self._catalogue is None:
            try:
                answer = await self._interactions.ListFeatureDefinitions(
                    interactions_pb2.ListFeatureDefinitionsRequest(),
                    timeout=min(timeout_s or self.timeout_s, self.timeout_s),
                )
            except grpc.aio.AioRpcError as error:
                raise _dependency_error("interactions", error) from error
            self._catalogue = FeatureCatalogue(
                answer.feature_set_version,
                {
                    d.name: FeatureInfo(
                        d.name,
                        d.description,
                        d.unit,
                        "ticket"
                        if d.entity == interactions_pb2.FEATURE_ENTITY_TICKET
                        else "customer",
                    )
                    for d in answer.definitions
                },
                frozenset(
                    d.name
                    for d in answer.definitions
                    if d.aggregation == interactions_pb2.FEATURE_AGGREGATION_CATEGORY
                ),
            )
        return self._catalogue

    @property
    def known_catalogue(self) -> FeatureCatalogue | None:
        """The catalogue if it was read already (no I/O)."""
        return self._catalogue

    # --- the shared reads -------------------------------------------------------------

    async def _read_features(
        self, reads: Sequence[_Read], time_left_s: float
    ) -> list[_Found | BaseException]:
        customers = list(dict.fromkeys(r.customer for r in reads))
        tickets = list(dict.fromkeys(r.ticket_id for r in reads if r.ticket_id))
        request = interactions_pb2.GetFeaturesRequest(
            customers=[c.to_pb() for c in customers], ticket_ids=tickets
        )
        try:
            answer = await self._interactions.GetFeatures(request, timeout=max(time_left_s, 0.001))
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT and len(reads) > 1:
                # One caller's bad identifier must not fail the others: alone, each learns its own.
                return [await self._read_alone(r, time_left_s) for r in reads]
            return [_dependency_error("interactions", error)] * len(reads)
        if self._catalogue is not None and answer.feature_set_version != self._catalogue.version:
            self._catalogue = None  # the served set changed: read the definitions again
        by_customer = dict(zip(customers, answer.customers, strict=True))
        by_ticket = dict(zip(tickets, answer.tickets, strict=True))
        results: list[_Found | BaseException] = []
        for read in reads:
            vector = by_customer[read.customer]
            if not vector.found:
                results.append(NotFound("customer", read.customer.describe()))
                continue
            ticket_values: dict[str, FeatureValue] | None = None
            if read.ticket_id:
                ticket = by_ticket[read.ticket_id]
                if not ticket.found or ticket.customer_id != vector.customer_id:
                    results.append(NotFound("ticket", read.ticket_id))
                    continue
                ticket_values = _values(ticket)
            results.append(
                _Found(
                    customer_id=vector.customer_id,
                    as_of=to_datetime(vector.as_of),
                    version=answer.feature_set_version,
                    customer=_values(vector),
                    ticket=ticket_values,
                )
            )
        return results

    async def _read_alone(self, read: _Read, time_left_s: float) -> _Found | BaseException:
        return (await self._read_features([read], time_left_s))[0]

    async def _read_profiles(
        self, customer_ids: Sequence[str], time_left_s: float
    ) -> list[Profile | BaseException | None]:
        from converge.models.trainingset import profile_from_pb  # (what training reads)

        assert self._identity is not None
        unique = list(dict.fromkeys(customer_ids))
        ticket = self.profiles.ticket()  # (before the read: events during it void it)
        try:
            answer = await self._identity.BatchGetCustomers(
                identity_pb2.BatchGetCustomersRequest(customer_ids=unique),
                timeout=max(time_left_s, 0.001),
            )
        except grpc.aio.AioRpcError as error:
            return [_dependency_error("identity", error)] * len(customer_ids)
        profiles = {c.customer_id: profile_from_pb(c) for c in answer.customers}
        for customer_id, profile in profiles.items():
            self.profiles.put(customer_id, profile, ticket)
        return [profiles.get(c) for c in customer_ids]

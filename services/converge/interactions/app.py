"""The interactions service's object graph, built in one place: settings ->
store -> identity link and change feed -> service -> servicers, with the
identity follower, health checks and shutdown hooks; and `SPEC`, what the
shared runtime runs (`python -m converge.interactions`, the tests)."""

from __future__ import annotations

from importlib.resources import files

import grpc

from converge.interactions.change_feed import ChangeFeed
from converge.interactions.identity_link import IdentityLink
from converge.interactions.service import InteractionsService
from converge.interactions.servicer import InteractionsDataSubjects, InteractionsServicer
from converge.interactions.settings import InteractionsSettings
from converge.interactions.store import InteractionsStore
from converge.runtime.server import ServiceContext, ServiceSpec
from converge.v1 import interactions_pb2, interactions_pb2_grpc, privacy_pb2, privacy_pb2_grpc


async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
    settings = context.settings
    assert isinstance(settings, InteractionsSettings)
    store = InteractionsStore(context.pool, settings.state_cache_size)
    identity = IdentityLink(settings.identity_address, settings.identity_timeout_s, store)
    changes = ChangeFeed(store, settings.stream_fallback_poll_s)
    context.on_shutdown(changes.close)
    service = InteractionsService(store, identity, settings, changes)
    await service.load_types()
    interactions_pb2_grpc.add_InteractionsServiceServicer_to_server(
        InteractionsServicer(service, settings.max_page_bytes), server
    )
    privacy_pb2_grpc.add_DataSubjectServiceServicer_to_server(
        InteractionsDataSubjects(service, settings.max_page_bytes), server
    )
    # An erasure also drops the customer from the identity link's caches; the
    # follower applies identity's forgets as erasures.
    store.erasure_hooks.append(identity.forget_customers)
    identity.start_following(store.erase)
    context.add_health_check("identity follower", lambda: identity.healthy)
    context.on_shutdown(identity.close)
    return [
        interactions_pb2.DESCRIPTOR.services_by_name["InteractionsService"].full_name,
        privacy_pb2.DESCRIPTOR.services_by_name["DataSubjectService"].full_name,
    ]


SPEC = ServiceSpec(
    name="interactions", migrations=files("converge.interactions") / "migrations", register=register
)

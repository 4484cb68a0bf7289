"""The interactions service's object graph, built in one place: settings ->
store -> identity link and change feed -> service -> servicers, with the
identity follower, health checks and shutdown hooks; and `SPEC`, what the
shared runtime runs (`python -m converge.interactions`, the tests)."""

from __future__ import annotations

import asyncio
import logging
from importlib.resources import files

import grpc

from converge.features.config import load_feature_set
from converge.interactions.change_feed import ChangeFeed
from converge.interactions.identity_link import IdentityLink
from converge.interactions.service import InteractionsService
from converge.interactions.servicer import InteractionsDataSubjects, InteractionsServicer
from converge.interactions.settings import InteractionsSettings
from converge.interactions.store import InteractionsStore
from converge.runtime.server import ServiceContext, ServiceSpec
from converge.runtime.tasks import stop_task
from converge.v1 import interactions_pb2, interactions_pb2_grpc, privacy_pb2, privacy_pb2_grpc

logger = logging.getLogger(__name__)


async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
    settings = context.settings
    assert isinstance(settings, InteractionsSettings)
    store = InteractionsStore(context.pool, settings.state_cache_size)
    identity = IdentityLink(settings.identity_address, settings.identity_timeout_s, store)
    changes = ChangeFeed(store, settings.stream_fallback_poll_s)
    context.on_shutdown(changes.close)
    feature_set = load_feature_set(settings.feature_set)  # (validated with the settings)
    logger.info("serving feature set %s", feature_set.version)
    service = InteractionsService(store, identity, settings, changes, feature_set)
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
    # States kept under another feature set are rebuilt beside ingest and
    # reads (which rebuild a stale state they touch themselves); health is
    # not held back by it.
    rebuild = asyncio.create_task(_rebuild_states(service), name="feature-state-rebuild")

    async def stop_rebuild() -> None:
        await stop_task(rebuild)

    context.on_shutdown(stop_rebuild)
    return [
        interactions_pb2.DESCRIPTOR.services_by_name["InteractionsService"].full_name,
        privacy_pb2.DESCRIPTOR.services_by_name["DataSubjectService"].full_name,
    ]


async def _rebuild_states(service: InteractionsService) -> None:
    try:
        await service.rebuild_stale_states()
    except asyncio.CancelledError:
        raise
    except Exception:  # (reads and ingest still rebuild the states they touch)
        logger.exception("background rebuild of live feature states stopped")


SPEC = ServiceSpec(
    name="interactions", migrations=files("converge.interactions") / "migrations", register=register
)

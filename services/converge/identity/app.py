"""Builds the identity service's object graph: settings -> store -> service
(with its peer services) -> servicer, and the shutdown hook that closes the
peers' channels. `SPEC` is what `python -m converge.identity` and the tests run."""

from __future__ import annotations

from importlib.resources import files

import grpc

from converge.identity.peers import PeerServices
from converge.identity.service import IdentityService
from converge.identity.servicer import IdentityServicer
from converge.identity.settings import IdentitySettings
from converge.identity.store import IdentityStore
from converge.runtime.server import ServiceContext, ServiceSpec
from converge.v1 import identity_pb2, identity_pb2_grpc


async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
    settings = context.settings
    assert isinstance(settings, IdentitySettings)
    peers = PeerServices(settings.peer_services, settings.peer_timeout_s)
    service = IdentityService(IdentityStore(context.pool), settings, peers)
    identity_pb2_grpc.add_IdentityServiceServicer_to_server(
        IdentityServicer(service, settings), server
    )
    context.on_shutdown(peers.close)
    return [identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].full_name]


SPEC = ServiceSpec(
    name="identity", migrations=files("converge.identity") / "migrations", register=register
)

"""gRPC client channels, made one way for every caller.

HTTP/2 keeps one connection per client, so a Service's virtual IP would
balance connections, not calls: one busy client would load one replica.
Channels here resolve every address of a target through DNS (in a cluster,
the headless Service's name lists each ready pod) and spread calls over them
with the `round_robin` policy. Servers bound the age of a connection
(`SERVER_OPTIONS`), so clients reconnect and re-resolve now and then and
find replicas added since. Keepalive pings notice a pod that vanished
without closing its connections.

    async with channels.aio_channel("identity.converge.svc:50051") as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import grpc

# Large enough for a page of interactions or one customer's export (services
# keep their pages below 3 MB), with room to spare.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
# A server closes a connection (GOAWAY) after about this long; calls in flight
# finish on it, new calls go through a new connection to a freshly resolved
# address list.
MAX_CONNECTION_AGE_MS = 300_000

SERVICE_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})

# Schemes gRPC resolves itself; anything else is a plain host:port.
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")

Options = Sequence[tuple[str, Any]]

CHANNEL_OPTIONS: Options = (
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
    ("grpc.keepalive_permit_without_calls", 1),
    # Pods come and go: resolve again soon after a connection fails.
    ("grpc.dns_min_time_between_resolutions_ms", 5_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)

# What servers need for the channels above: accept their keepalive pings (the
# default policy answers pings more frequent than 5 minutes with GOAWAY
# "too_many_pings") and age connections so clients re-resolve.
# Servers keep gRPC's 4 MB limit on what they receive: requests stay small.
SERVER_OPTIONS: Options = (
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
    ("grpc.http2.max_ping_strikes", 0),
    ("grpc.max_connection_age_ms", MAX_CONNECTION_AGE_MS),
)


def target(address: str) -> str:
    """`host:port` as a `dns:///host:port` target; a target with a scheme as is."""
    if address.startswith(_SCHEMES):
        return address
    return f"dns:///{address}"


def aio_channel(
    address: str,
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    options: Options = (),
) -> grpc.aio.Channel:
    """An asyncio channel balancing calls over every address `address` resolves to.

    `options` are added after (and so override) the shared ones.
    """
    return grpc.aio.insecure_channel(
        target(address), options=[*CHANNEL_OPTIONS, *options], interceptors=interceptors
    )


def channel(address: str, *, options: Options = ()) -> grpc.Channel:
    """The blocking counterpart of `aio_channel`, for command-line tools."""
    return grpc.insecure_channel(target(address), options=[*CHANNEL_OPTIONS, *options])

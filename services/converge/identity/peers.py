"""The other services identity asks to erase and export a customer
(`CONVERGE_IDENTITY_PEER_SERVICES`), through their generated gRPC clients.
Built in `app.py`; `service.py` sees them as `Peers`, in plain types."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import grpc

from converge.identity.domain import PeerErasure, PeerExport
from converge.runtime.channels import aio_channel
from converge.v1 import privacy_pb2, privacy_pb2_grpc


class PeerServices:
    """One channel per peer service, opened at start and closed at shutdown."""

    def __init__(self, targets: Mapping[str, str], timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._peers: dict[str, privacy_pb2_grpc.DataSubjectServiceAsyncStub] = {}
        self._channels: list[grpc.aio.Channel] = []
        for name, target in targets.items():
            channel = aio_channel(target)
            self._channels.append(channel)
            self._peers[name] = privacy_pb2_grpc.DataSubjectServiceStub(channel)

    @property
    def names(self) -> list[str]:
        return list(self._peers)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)

    async def erase(self, name: str, customer_ids: Sequence[str], erasure_id: str) -> PeerErasure:
        try:
            reply = await self._peers[name].EraseCustomerData(
                privacy_pb2.EraseCustomerDataRequest(
                    customer_ids=customer_ids, erasure_id=erasure_id
                ),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as error:
            return PeerErasure(name, False, {}, f"{error.code().name}: {error.details()}")
        return PeerErasure(name, True, dict(reply.erased_counts), "")

    async def export(self, name: str, customer_ids: Sequence[str], page_token: str) -> PeerExport:
        try:
            reply = await self._peers[name].ExportCustomerData(
                privacy_pb2.ExportCustomerDataRequest(
                    customer_ids=customer_ids, page_token=page_token
                ),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError:
            return PeerExport(name, False, None, "")
        return PeerExport(name, True, reply, reply.next_page_token)

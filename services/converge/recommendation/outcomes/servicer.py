"""RecordOutcome's gRPC face: protobuf in, checked by convert.py, recorded by
the service, protobuf out."""

from __future__ import annotations

import grpc

from converge.recommendation.outcomes import convert
from converge.recommendation.outcomes.service import OutcomeService
from converge.v1 import recommendation_pb2 as pb


class OutcomeRpcs:
    def __init__(self, service: OutcomeService) -> None:
        self.service = service

    async def record_outcome(
        self, request: pb.RecordOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordOutcomeResponse:
        return convert.recorded(await self.service.record(convert.outcome_request(request)))

"""The scoring service's gRPC face: each handler converts the request
(`convert.py`), calls one method of `service.py`, and converts the answer
back. Wiring is in `app.py`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from converge.runtime.errors import ConvergeError
from converge.runtime.fields import checked_requests
from converge.scoring.convert import (
    batch_item,
    batch_response,
    drift_query,
    drift_response,
    erase_request,
    export_request,
    export_response,
    loaded_models,
    model_status_response,
    optional_kinds,
    reload_response,
    required_kind,
    score_query,
    score_response,
)
from converge.scoring.prediction_log import PredictionLog
from converge.scoring.service import ScoreQuery, ScoringService
from converge.v1 import privacy_pb2, privacy_pb2_grpc, scoring_pb2, scoring_pb2_grpc


@checked_requests
class ScoringServicer(scoring_pb2_grpc.ScoringServiceServicer):
    def __init__(self, service: ScoringService, log: PredictionLog) -> None:
        self.service = service
        self.log = log

    async def Score(
        self, request: scoring_pb2.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ScoreResponse:
        query = score_query(request, context.time_remaining())
        result = await self.service.score(query)
        return score_response(result, request.include_features)

    async def ScoreBatch(
        self,
        request_iterator: AsyncIterator[scoring_pb2.ScoreBatchRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[scoring_pb2.ScoreBatchResponse]:
        async def items() -> AsyncIterator[tuple[tuple[str, bool], ScoreQuery | ConvergeError]]:
            async for message in request_iterator:
                row_ref, query = batch_item(message, context.time_remaining())
                yield (row_ref, message.score.include_features), query

        async for (row_ref, include_features), outcome in self.service.score_stream(items()):
            yield batch_response(row_ref, outcome, include_features)

    async def ListModels(
        self, request: scoring_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ListModelsResponse:
        wanted = optional_kinds(request.kind, "kind")
        return scoring_pb2.ListModelsResponse(
            models=[
                model
                for kind in wanted
                for model in loaded_models(self.service.model_status(kind), request.include_refused)
            ],
            replica=self.service.replica,
        )

    async def GetModelStatus(
        self, request: scoring_pb2.GetModelStatusRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.GetModelStatusResponse:
        kind = required_kind(request.kind, "kind")
        return model_status_response(self.service.model_status(kind), self.service.replica)

    async def ReloadModels(
        self, request: scoring_pb2.ReloadModelsRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.ReloadModelsResponse:
        wanted = optional_kinds(request.kind, "kind")
        outcome = await self.service.reload(wanted)
        return reload_response(
            outcome, [self.service.model_status(k) for k in wanted], self.service.replica
        )

    async def GetDriftReport(
        self, request: scoring_pb2.GetDriftReportRequest, context: grpc.aio.ServicerContext
    ) -> scoring_pb2.GetDriftReportResponse:
        report = await self.log.drift_report(drift_query(request))
        return drift_response(report)


class ScoringDataSubjects(privacy_pb2_grpc.DataSubjectServiceServicer):
    """Erasure and export of what scoring holds on a customer: its prediction log."""

    def __init__(self, log: PredictionLog, max_page_bytes: int) -> None:
        self.log = log
        self.max_page_bytes = max_page_bytes

    async def EraseCustomerData(
        self, request: privacy_pb2.EraseCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.EraseCustomerDataResponse:
        erased = await self.log.erase(erase_request(request))
        return privacy_pb2.EraseCustomerDataResponse(service="scoring", erased_counts=erased)

    async def ExportCustomerData(
        self, request: privacy_pb2.ExportCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.ExportCustomerDataResponse:
        ids, after = export_request(request)
        return await export_response(
            self.log.export(ids, after), after, self.max_page_bytes, self.log.clock()
        )

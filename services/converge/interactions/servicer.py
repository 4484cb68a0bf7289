"""The interactions service's gRPC face: each handler checks and converts the
request (`convert.py`), calls one method of `service.py`, and converts the
answer back. Wiring is in `app.py`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from converge.interactions.convert import (
    erase_request,
    export_request,
    export_response,
    ingest_response,
    interaction_pb,
    purge_request,
    read_ingest_message,
    record_request,
    required_interaction_id,
    stream_request,
    sync_status_pb,
    timeline_request,
    timeline_response,
    type_pb,
    type_spec_of,
)
from converge.interactions.feature_convert import (
    definitions_response,
    features_request,
    features_response,
    point_in_time_request,
    point_in_time_response,
)
from converge.interactions.service import InteractionsService
from converge.runtime.cursors import commit_cursor
from converge.runtime.fields import checked_requests
from converge.v1 import (
    interactions_pb2,
    interactions_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
)


@checked_requests
class InteractionsServicer(interactions_pb2_grpc.InteractionsServiceServicer):
    def __init__(self, service: InteractionsService, max_page_bytes: int) -> None:
        self.service = service
        self.max_page_bytes = max_page_bytes

    async def RecordInteraction(
        self, request: interactions_pb2.RecordInteractionRequest, context: grpc.aio.ServicerContext
    ) -> interactions_pb2.RecordInteractionResponse:
        draft = record_request(request)
        result = await self.service.record(draft, validate_only=request.validate_only)
        return interactions_pb2.RecordInteractionResponse(
            interaction=interaction_pb(result.as_row()), duplicate=result.outcome == "duplicate"
        )

    async def IngestInteractions(
        self,
        request_iterator: AsyncIterator[interactions_pb2.IngestInteractionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> interactions_pb2.IngestInteractionsResponse:
        async with self.service.ingest_stream() as stream:
            received = 0
            async for message in request_iterator:
                received = read_ingest_message(message, received, stream.add, stream.reject)
                await stream.flush_if_full()
            summary = await stream.finish(received)
        return ingest_response(summary)

    async def GetInteraction(
        self, request: interactions_pb2.GetInteractionRequest, context: grpc.aio.ServicerContext
    ) -> interactions_pb2.GetInteractionResponse:
        interaction_id = required_interaction_id(request.interaction_id, "interaction_id")
        row = await self.service.get_interaction(interaction_id)
        return interactions_pb2.GetInteractionResponse(interaction=interaction_pb(row))

    async def ListInteractions(
        self, request: interactions_pb2.ListInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> interactions_pb2.ListInteractionsResponse:
        query, size = timeline_request(request)
        root, rows = await self.service.timeline(query)
        return timeline_response(root, rows, size, self.max_page_bytes)

    async def StreamInteractions(
        self, request: interactions_pb2.StreamInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[interactions_pb2.StreamInteractionsResponse]:
        cursor = stream_request(request)
        async for position, row in self.service.stream(cursor, list(request.types), request.follow):
            yield interactions_pb2.StreamInteractionsResponse(
                cursor=commit_cursor(*position), interaction=interaction_pb(row)
            )

    async def RegisterInteractionType(
        self,
        request: interactions_pb2.RegisterInteractionTypeRequest,
        context: grpc.aio.ServicerContext,
    ) -> interactions_pb2.RegisterInteractionTypeResponse:
        spec = type_spec_of(request.interaction_type)
        registered, row, created = await self.service.register_type(spec)
        return interactions_pb2.RegisterInteractionTypeResponse(
            interaction_type=type_pb(registered, row), created=created
        )

    async def ListInteractionTypes(
        self,
        request: interactions_pb2.ListInteractionTypesRequest,
        context: grpc.aio.ServicerContext,
    ) -> interactions_pb2.ListInteractionTypesResponse:
        types = await self.service.list_types(request.custom_only)
        return interactions_pb2.ListInteractionTypesResponse(
            interaction_types=[type_pb(spec, row) for spec, row in types]
        )

    async def ListFeatureDefinitions(
        self,
        request: interactions_pb2.ListFeatureDefinitionsRequest,
        context: grpc.aio.ServicerContext,
    ) -> interactions_pb2.ListFeatureDefinitionsResponse:
        return definitions_response(request, self.service.feature_set)

    async def GetFeatures(
        self, request: interactions_pb2.GetFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> interactions_pb2.GetFeaturesResponse:
        refs, names = features_request(request, self.service.feature_set)
        as_of, customers, tickets = await self.service.features(
            refs, list(request.ticket_ids), request.include_open_tickets
        )
        return features_response(as_of, customers, tickets, names, self.service.feature_set)

    async def GetPointInTimeFeatures(
        self,
        request_iterator: AsyncIterator[interactions_pb2.GetPointInTimeFeaturesRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[interactions_pb2.GetPointInTimeFeaturesResponse]:
        async for request in request_iterator:
            features = self.service.feature_set
            queries, names = point_in_time_request(request, features)
            computed = await self.service.point_in_time(queries, request.as_recorded)
            yield point_in_time_response(request, queries, computed, names, features)

    async def PurgeInteractions(
        self, request: interactions_pb2.PurgeInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> interactions_pb2.PurgeInteractionsResponse:
        older_than = purge_request(request)
        purged = await self.service.purge(
            older_than,
            list(request.types),
            allow_feature_loss=request.allow_feature_loss,
            dry_run=request.dry_run,
        )
        return interactions_pb2.PurgeInteractionsResponse(
            purged=sum(purged.values()), purged_by_type=purged, older_than=request.older_than
        )

    async def GetIdentitySyncStatus(
        self,
        request: interactions_pb2.GetIdentitySyncStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> interactions_pb2.GetIdentitySyncStatusResponse:
        connected, status = await self.service.sync_status()
        return sync_status_pb(connected, status)


@checked_requests
class InteractionsDataSubjects(privacy_pb2_grpc.DataSubjectServiceServicer):
    """Erasure and export of what this service holds on a customer."""

    def __init__(self, service: InteractionsService, max_page_bytes: int) -> None:
        self.service = service
        self.max_page_bytes = max_page_bytes

    async def EraseCustomerData(
        self, request: privacy_pb2.EraseCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.EraseCustomerDataResponse:
        ids = erase_request(request)
        erased = await self.service.erase(ids)
        return privacy_pb2.EraseCustomerDataResponse(service="interactions", erased_counts=erased)

    async def ExportCustomerData(
        self, request: privacy_pb2.ExportCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.ExportCustomerDataResponse:
        ids, after = export_request(request)
        return await export_response(self.service.export(ids, after), after, self.max_page_bytes)

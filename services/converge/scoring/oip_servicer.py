"""The scoring service's Open Inference Protocol face
(`inference.GRPCInferenceService`, on the same port as ScoringService): each
handler converts the request (`oip_convert.py`), calls `inference.py`, and
converts the answer back. Wiring is in `app.py`."""

from __future__ import annotations

from importlib import metadata

import grpc
from inference import open_inference_grpc_pb2 as oip
from inference import open_inference_grpc_pb2_grpc as oip_grpc

from converge.runtime.fields import checked_requests
from converge.scoring.inference import OpenInference
from converge.scoring.oip_convert import infer_query, infer_response, model_metadata_response

SERVER_NAME = "converge-scoring"
Context = grpc.aio.ServicerContext


def _server_version() -> str:
    try:
        return metadata.version("converge")
    except metadata.PackageNotFoundError:  # (sources on the path, not installed)
        return "0+unknown"


@checked_requests
class OpenInferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    def __init__(self, inference: OpenInference) -> None:
        self.inference = inference
        self.version = _server_version()

    async def ServerLive(
        self,
        request: oip.ServerLiveRequest,
        context: Context[oip.ServerLiveRequest, oip.ServerLiveResponse],
    ) -> oip.ServerLiveResponse:
        return oip.ServerLiveResponse(live=True)  # (it answers: it lives)

    async def ServerReady(
        self,
        request: oip.ServerReadyRequest,
        context: Context[oip.ServerReadyRequest, oip.ServerReadyResponse],
    ) -> oip.ServerReadyResponse:
        return oip.ServerReadyResponse(ready=self.inference.server_ready())

    async def ModelReady(
        self,
        request: oip.ModelReadyRequest,
        context: Context[oip.ModelReadyRequest, oip.ModelReadyResponse],
    ) -> oip.ModelReadyResponse:
        return oip.ModelReadyResponse(
            ready=self.inference.model_ready(request.name, request.version)
        )

    async def ServerMetadata(
        self,
        request: oip.ServerMetadataRequest,
        context: Context[oip.ServerMetadataRequest, oip.ServerMetadataResponse],
    ) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=[])

    async def ModelMetadata(
        self,
        request: oip.ModelMetadataRequest,
        context: Context[oip.ModelMetadataRequest, oip.ModelMetadataResponse],
    ) -> oip.ModelMetadataResponse:
        return model_metadata_response(self.inference.model(request.name, request.version))

    async def ModelInfer(
        self,
        request: oip.ModelInferRequest,
        context: Context[oip.ModelInferRequest, oip.ModelInferResponse],
    ) -> oip.ModelInferResponse:
        query = infer_query(request, context.time_remaining())
        inferred = await self.inference.infer(query)
        return infer_response(inferred, request.id, [o.name for o in request.outputs])

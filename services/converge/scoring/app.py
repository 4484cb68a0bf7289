"""The scoring service's object graph, built in one place: settings -> feature
source (interactions, identity) and model slots (the MLflow registry) ->
service -> servicer, with health (SERVING once the registry was read, so
every prediction has its champion or its fallback decided) and shutdown
hooks; and `SPEC`, what the shared runtime runs (`python -m
converge.scoring`, the tests)."""

from __future__ import annotations

import logging
import os
import socket
from datetime import timedelta
from importlib.resources import files

import grpc
from inference import open_inference_grpc_pb2, open_inference_grpc_pb2_grpc

from converge.models.handle import KnownFeatures
from converge.models.registry import tracking_uri_default
from converge.runtime.server import ServiceContext, ServiceSpec
from converge.scoring.features import FeatureSource
from converge.scoring.inference import OpenInference
from converge.scoring.models import ModelSlots, RegistrySource
from converge.scoring.oip_servicer import OpenInferenceServicer
from converge.scoring.prediction_log import PredictionLog
from converge.scoring.service import ScoringService
from converge.scoring.servicer import ScoringDataSubjects, ScoringServicer
from converge.scoring.settings import ScoringSettings
from converge.scoring.store import ScoringStore
from converge.v1 import privacy_pb2, privacy_pb2_grpc, scoring_pb2, scoring_pb2_grpc

logger = logging.getLogger(__name__)


def replica_name() -> str:
    """The pod's name in a cluster (HOSTNAME), the host's name elsewhere."""
    return os.environ.get("HOSTNAME") or socket.gethostname()


async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
    settings = context.settings
    assert isinstance(settings, ScoringSettings)
    features = FeatureSource(
        settings.interactions_address,
        settings.identity_address,
        timeout_s=settings.features_timeout_s,
        max_batch=settings.coalesce_max_batch,
        max_in_flight=settings.coalesce_max_in_flight,
        profile_cache_size=settings.profile_cache_size,
    )
    features.start()
    context.on_shutdown(features.close)
    try:
        catalogue = await features.catalogue()
        logger.info("interactions serves feature set %s", catalogue.version)
    except Exception as error:  # (checked again at each load; scoring starts anyway)
        logger.warning("interactions unreachable at start, versions load unchecked: %s", error)

    def served_features() -> KnownFeatures | None:
        # What versions are checked against: the set interactions serves, once known.
        known = features.known_catalogue
        return known.known_features() if known is not None else None

    tracking_uri = settings.tracking_uri or tracking_uri_default(settings.data_dir)
    source = RegistrySource(tracking_uri, settings.lightgbm_threads, served_features)
    slots = ModelSlots(source, poll_interval_s=settings.model_poll_interval_s)
    await slots.start()
    context.on_shutdown(slots.close)
    context.add_health_check("model registry read", lambda: slots.ready)
    log = PredictionLog(
        ScoringStore(context.pool),
        slots,
        context.executor,
        sample_rate=settings.prediction_log_sample_rate,
        queue_size=settings.prediction_log_queue_size,
        batch_size=settings.prediction_log_batch_size,
        flush_interval_s=settings.prediction_log_flush_interval_s,
        retention=timedelta(days=settings.prediction_log_retention_days),
        purge_interval_s=settings.prediction_log_purge_interval_s,
    )
    log.start()
    # (after the calls finished, before the pool closes: what is queued is written)
    context.on_shutdown(log.close)
    service = ScoringService(
        features,
        slots,
        context.executor,
        max_batch=settings.coalesce_max_batch,
        max_in_flight=settings.coalesce_max_in_flight,
        replica=replica_name(),
        # (no sampling: Score never reaches the log)
        prediction_log=log if settings.prediction_log_sample_rate > 0 else None,
    )
    scoring_pb2_grpc.add_ScoringServiceServicer_to_server(ScoringServicer(service, log), server)
    privacy_pb2_grpc.add_DataSubjectServiceServicer_to_server(
        ScoringDataSubjects(log, settings.max_page_bytes), server
    )
    # The Open Inference Protocol on the same port, over the same service.
    open_inference_grpc_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(
        OpenInferenceServicer(OpenInference(service, lambda: slots.ready)), server
    )
    return [
        scoring_pb2.DESCRIPTOR.services_by_name["ScoringService"].full_name,
        privacy_pb2.DESCRIPTOR.services_by_name["DataSubjectService"].full_name,
        open_inference_grpc_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    ]


SPEC = ServiceSpec(
    name="scoring", migrations=files("converge.scoring") / "migrations", register=register
)

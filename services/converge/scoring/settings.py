"""Settings of the scoring service (environment prefix `CONVERGE_SCORING_`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from converge.runtime.settings import ServiceSettings


class ScoringSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CONVERGE_SCORING_")

    port: int = Field(default=50053, ge=0, le=65535)
    interactions_address: str = Field(
        default="127.0.0.1:50052",
        description="The interactions service, for live features (GetFeatures).",
    )
    identity_address: str = Field(
        default="127.0.0.1:50051",
        description="The identity service, for the profile inputs (BatchGetCustomers); empty "
        "scores without a profile (profile inputs missing).",
    )
    tracking_uri: str = Field(
        default="",
        description="The MLflow tracking store holding the registered models; empty means "
        "MLFLOW_TRACKING_URI, else the SQLite store under the data directory (as "
        "`converge models` uses).",
    )
    model_poll_interval_s: float = Field(
        default=30.0,
        gt=0,
        description="Seconds between checks of the registry aliases (ReloadModels checks at once).",
    )
    lightgbm_threads: int = Field(
        default=1,
        ge=1,
        le=64,
        description="LightGBM threads per predict call (calls run on the runtime's CPU workers, "
        "CONVERGE_SCORING_CPU_WORKERS); batches are small, so 1 is usually best.",
    )
    features_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="Longest wait for interactions or identity when the caller sets no "
        "shorter deadline; past it the call fails UNAVAILABLE.",
    )
    # Calls that arrive while a read (or a predict) is in flight wait for the
    # next one and share it: no timer, so an idle service answers at once.
    coalesce_max_batch: int = Field(
        default=64,
        ge=1,
        le=1000,
        description="Most customers read from interactions (or rows predicted) in one shared call.",
    )
    coalesce_max_in_flight: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Shared reads (or predicts per model) in flight at once.",
    )
    profile_cache_size: int = Field(
        default=50_000,
        ge=0,
        description="Customers' profiles kept in memory while identity's event stream says "
        "they are unchanged (about 1 KB each); 0 reads the profile from identity on every call.",
    )
    # On by default, so a drift report has a window to read on day one: at 1 %,
    # the 100 samples a PSI needs come with 10,000 Score calls, and a sample
    # costs the call about 15 µs (it is written off the request path).
    prediction_log_sample_rate: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Share of Score answers written to the prediction log (all their "
        "predictions, with their inputs), for drift reports; 0 logs nothing.",
    )
    prediction_log_queue_size: int = Field(
        default=10_000,
        ge=1,
        description="Predictions waiting to be written at most; past it new samples are "
        "dropped (and counted) rather than slowing Score.",
    )
    prediction_log_batch_size: int = Field(
        default=500, ge=1, description="Predictions written in one COPY."
    )
    prediction_log_flush_interval_s: float = Field(
        default=1.0, gt=0, description="Longest wait before queued predictions are written."
    )
    prediction_log_retention_days: float = Field(
        default=90.0,
        gt=0,
        description="Days a logged prediction is kept; older ones are purged.",
    )
    prediction_log_purge_interval_s: float = Field(
        default=3600.0, gt=0, description="Seconds between retention purges."
    )
    # gRPC clients refuse a message over 4 MB by default: an export page stays
    # well under it.
    max_page_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=3 * 1024 * 1024,
        description="Serialized bytes of records per ExportCustomerData page.",
    )

"""Settings of the interactions service (environment prefix `CONVERGE_INTERACTIONS_`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from converge.runtime.settings import ServiceSettings


class InteractionsSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CONVERGE_INTERACTIONS_")

    port: int = Field(default=50052, ge=0, le=65535)
    identity_address: str = Field(
        default="127.0.0.1:50051",
        description="The identity service, for identifiers and merges; empty runs without it "
        "(then only customer ids are accepted).",
    )
    identity_timeout_s: float = Field(default=5.0, gt=0)
    max_future_skew_s: float = Field(
        default=300.0, ge=0, description="How far in the future an occurred_at may be."
    )
    retention_days: int | None = Field(
        default=None,
        ge=1,
        description="Interactions older than this many days are refused at ingest (and may be "
        "purged); unset keeps and accepts any history, as backfills of old exports need.",
    )
    # 20,000 rather than 10,000: a batch rewrites the feature state of each
    # customer it touches once, so a stream's customers cost half as much per
    # event. Measured on a 100k-event stream: 26-32k -> 36-42k events/s (40,000
    # gave ~42k on the bench's 300k-event stream). A single RecordInteraction
    # waits behind a batch in flight (the ingest lock): measured during a
    # stream, up to 0.66 s at 20,000 rows (p90 0.5 s) against 0.39 s at 10,000.
    ingest_batch_size: int = Field(
        default=20_000, ge=1, le=50_000, description="Rows per ingest transaction."
    )
    state_cache_size: int = Field(
        default=10_000,
        ge=0,
        description="Live feature states kept in memory between ingest batches (about 10 KB "
        "each); 0 reads every state from the database for every batch.",
    )
    purge_batch_size: int = Field(
        default=5_000, ge=1, le=100_000, description="Interactions deleted per purge transaction."
    )
    stream_poll_interval_s: float = Field(default=0.1, gt=0)

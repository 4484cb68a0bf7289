"""Settings of the interactions service (environment prefix `CONVERGE_INTERACTIONS_`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from converge.features.config import FeatureSetError, load_feature_set
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
    # Generic plans: PostgreSQL's own choice (auto) kept planning GetFeatures'
    # read (store.LIVE_READS, a recursive statement it cannot estimate) afresh
    # on every call, 1.1-1.4 ms of planning for 0.8 ms of execution; its
    # generic plan reads by the same keys (planning 0.05-0.2 ms; one customer
    # 0.9 ms, one with a ticket 1.2 ms, 100 customers 3.2 ms against 6.7 ms
    # planned each time). The service's other statements read by key under
    # either plan (each checked with EXPLAIN under force_generic_plan).
    db_plan_cache_mode: Literal["auto", "force_generic_plan", "force_custom_plan"] = Field(
        default="force_generic_plan",
        description="PostgreSQL's plan_cache_mode for the service's connections.",
    )
    max_future_skew_s: float = Field(
        default=300.0, ge=0, description="How far in the future an occurred_at may be."
    )
    retention_days: int | None = Field(
        default=None,
        ge=1,
        description="Interactions older than this many days are refused at ingest (and may be "
        "purged); unset keeps and accepts any history, as backfills of old exports need.",
    )
    # A batch rewrites the feature state of each customer it touches once, so
    # larger batches cost less per event: on the bench's 300k-event stream
    # over 2,000 customers, 34.6k events/s at 20,000 against 39.1k at 40,000.
    # Batches no longer hold other ingests back (see store.INGEST_LOCK): a
    # RecordInteraction during such a stream took p90 ~0.2 s, max ~0.4 s at
    # either size (the service's CPU is the wait, not the batch). The price
    # of size is memory (about three batches in flight per stream) and the
    # change stream's delay: it delivers a row once every transaction older
    # than its own has ended, so up to a batch's commit time (~1 s here).
    ingest_batch_size: int = Field(
        default=40_000, ge=1, le=50_000, description="Rows per ingest transaction."
    )
    state_cache_size: int = Field(
        default=10_000,
        ge=0,
        description="Live feature states kept in memory between ingest batches (about 10 KB "
        "each); 0 reads every state from the database for every batch.",
    )
    feature_cache_size: int = Field(
        default=20_000,
        ge=0,
        description="Customers whose live features read today (and their tickets' features "
        "read since their state last changed) are kept in memory, to answer GetFeatures "
        "without reading their state again while it is unchanged (about 8 KB each, and 1 KB "
        "a ticket); 0 reads every state for every call.",
    )
    # gRPC clients refuse a message over 4 MB by default: a timeline page of
    # 100 large rows, or one customer's whole export, could pass it. Pages
    # stop below this bound instead (always at least one row, and one row is
    # at most about 300 KB), leaving room for the rest of the message.
    max_page_bytes: int = Field(
        default=1_048_576,
        ge=65_536,
        le=3_145_728,
        description="Serialized bytes of rows per ListInteractions or export page.",
    )
    purge_batch_size: int = Field(
        default=5_000, ge=1, le=100_000, description="Interactions deleted per purge transaction."
    )
    # Followers of the change stream are woken by a notification at each
    # ingest commit. A stored row may become deliverable only later, when an
    # older transaction elsewhere ends (see store.STREAM_AFTER), which nothing
    # notifies: one shared read per process at this interval picks those up.
    stream_fallback_poll_s: float = Field(
        default=2.0,
        gt=0,
        description="Seconds between the change feed's reads when no notification came.",
    )
    # Which features are served and kept live. Changing it rebuilds the live
    # states in the background at the next start (see service.py,
    # rebuild_stale_states); ingest and reads go on meanwhile.
    feature_set: str = Field(
        default="",
        description="The feature set served: a shipped set's name (itsm_incidents, "
        "cdnow_purchases, telco_customers) or the path of a YAML file; empty serves the "
        "built-in set.",
    )
    state_rebuild_batch: int = Field(
        default=500,
        ge=1,
        le=10_000,
        description="Customers whose live state the background rebuild redoes per transaction.",
    )

    @field_validator("feature_set")
    @classmethod
    def _loads(cls, value: str) -> str:
        """Loaded once here so that a wrong file stops the start, naming its line."""
        try:
            load_feature_set(value)
        except FeatureSetError as error:
            raise ValueError(str(error)) from None
        return value

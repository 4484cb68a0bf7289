"""Settings of the recommendation service (environment prefix
`CONVERGE_RECOMMENDATION_`). Grouped by area; each area's settings are read
only by its own wiring in `app.py`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from converge.runtime.settings import ServiceSettings


class RecommendationSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CONVERGE_RECOMMENDATION_")

    port: int = Field(default=50054, ge=0, le=65535)

    # -- Peers.
    identity_address: str = Field(
        default="127.0.0.1:50051",
        description="The identity service: customers, identifiers and contact preferences "
        "(read on every decision, never cached: a withdrawn consent holds at once).",
    )
    interactions_address: str = Field(
        default="127.0.0.1:50052",
        description="The interactions service: outcomes are written there, alerts follow its "
        "change stream.",
    )
    scoring_address: str = Field(
        default="127.0.0.1:50053",
        description="The scoring service: churn, escalation and cross-sell scores with reasons.",
    )
    peer_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="Longest wait for a peer when the caller sets no shorter deadline; past it "
        "the call fails UNAVAILABLE.",
    )

    # -- Policy (policy/).

    # -- Decisions and contact rules (decisions/, contact/).
    decision_retention_days: float = Field(
        default=400.0,
        gt=0,
        description="Days a logged decision is kept (GetDecision replays it until then); "
        "older ones are purged.",
    )
    decision_purge_interval_s: float = Field(
        default=3600.0, gt=0, description="Seconds between purges of decisions past retention."
    )
    max_page_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        le=3 * 1024 * 1024,
        description="Serialized bytes of records per ExportCustomerData page (under gRPC's "
        "4 MB limit).",
    )

    # -- Outcomes and control groups (outcomes/).

    # -- Alerts (alerts/).

    # -- Webhooks (webhooks/).

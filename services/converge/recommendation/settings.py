"""Settings of the recommendation service (environment prefix
`CONVERGE_RECOMMENDATION_`). Grouped by area; each area's settings are read
only by its own wiring in `app.py`."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from converge.recommendation.webhooks.secrets import SecretsSetting
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
    policy_poll_interval_s: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="How often each replica re-reads the active policy version, a safety net: "
        "activations reach every replica at once by LISTEN/NOTIFY.",
    )

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
    contact_retention_days: float = Field(
        default=90.0,
        gt=0,
        description="Days the contact ledger keeps a proposal at least; longer when the active "
        "policy's longest cap window or cool-down is longer (a policy activated later with a "
        "longer window finds its history up to this).",
    )
    contact_purge_interval_s: float = Field(
        default=3600.0, gt=0, description="Seconds between purges of the contact ledger."
    )

    # -- Outcomes and control groups (outcomes/).

    # -- Alerts (alerts/).
    alerts_follow: bool = Field(
        default=True,
        description="Follow the interactions change stream and raise alerts (one replica leads, "
        "the others stand by).",
    )
    alerts_batch_size: int = Field(
        default=200,
        ge=1,
        le=5000,
        description="Most interactions of the change stream re-scored and applied in one "
        "transaction.",
    )
    alerts_standby_retry_s: float = Field(
        default=2.0,
        gt=0,
        description="How often a replica standing by tries to take over following.",
    )
    alerts_max_retry_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait of the follower before retrying after a failure (the wait "
        "doubles from 0.2 s up to this).",
    )
    alerts_due_work_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often escalations, waiting alerts and retention are looked at.",
    )
    alerts_retention_days: int = Field(
        default=365,
        ge=1,
        description="Alert events, and finished alerts untouched for longer, are deleted.",
    )

    # -- Webhooks (webhooks/).
    webhook_secrets: SecretsSetting = Field(
        default_factory=dict,
        description="The webhook secret store, JSON: secret name (a webhook's secret_id) -> "
        "one or more Standard Webhooks secrets ('whsec_' + base64 of 24 to 64 random bytes). "
        "Several under one name during a key rotation: each delivery is signed with every one. "
        "Read at start (rotate with a rolling restart); a value that is no whsec_ secret stops "
        "the service.",
    )
    webhook_allow_http: bool = Field(
        default=False,
        description="Allow plain http webhook URLs (development only); https only otherwise.",
    )
    webhook_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="Longest wait for a receiver's answer, the whole attempt included "
        "(the specification recommends 15 to 30 s); past it the attempt failed.",
    )
    webhook_retry_schedule_s: list[float] = Field(
        default_factory=lambda: [
            5.0,
            300.0,
            1800.0,
            7200.0,
            18000.0,
            36000.0,
            50400.0,
            72000.0,
            86400.0,
        ],
        min_length=0,
        description="Delays between attempts, in seconds: after the immediate first attempt, "
        "one retry per entry, then a dead letter. The default is the specification's example: "
        "5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h (10 attempts over about 3 days).",
    )
    webhook_retry_jitter: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="Each retry delay is stretched or shrunk at random by up to this fraction.",
    )
    webhook_max_in_flight: int = Field(
        default=32, ge=1, description="Deliveries one replica attempts at once."
    )
    webhook_poll_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="How often the dispatcher looks for retries falling due (new deliveries "
        "wake it at once through a PostgreSQL notification).",
    )
    webhook_delivered_retention_days: float = Field(
        default=7, gt=0, description="Delivered deliveries are purged after this many days."
    )
    webhook_dead_letter_retention_days: float = Field(
        default=30, gt=0, description="Dead letters are purged after this many days."
    )

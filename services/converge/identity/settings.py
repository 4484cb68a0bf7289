"""Settings of the identity service (environment prefix `CONVERGE_IDENTITY_`)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from converge.runtime.settings import ServiceSettings


class SurvivorPolicy(StrEnum):
    """Which customer remains when a Resolve joins two customers."""

    OLDEST = "oldest"  # the customer created first: its id is the one other systems saw longest
    NEWEST = "newest"


class IdentitySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="CONVERGE_IDENTITY_")

    port: int = Field(default=50051, ge=0, le=65535)
    default_phone_region: str | None = Field(
        default=None,
        description="ISO region for phone numbers written without +country code, e.g. 'FR'; "
        "unset requires international numbers.",
    )
    auto_merge: bool = Field(
        default=True,
        description="Resolve merges customers its identifiers join; off, it refuses instead.",
    )
    merge_survivor: SurvivorPolicy = SurvivorPolicy.OLDEST
    unique_identifier_types: frozenset[str] = Field(
        default=frozenset({"CRM_ID", "SERVICE_DESK_USER_ID"}),
        description="Identifier kinds a customer has at most one of; customers carrying two "
        "different values of such a kind are never merged.",
    )
    peer_services: dict[str, str] = Field(
        default_factory=dict,
        description='Services asked to erase and export a customer, as JSON {"name": "host:port"}.',
    )
    peer_timeout_s: float = Field(default=10.0, gt=0)

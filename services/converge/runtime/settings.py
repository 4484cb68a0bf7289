"""Typed settings read from environment variables, validated once at start."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

SettingsT = TypeVar("SettingsT", bound="ServiceSettings")


class ServiceSettings(BaseSettings):
    """Settings every service has.

    Platform-wide settings (`DATABASE_URL`, `CONVERGE_DATA_DIR`,
    `CONVERGE_LOG_LEVEL`) carry one name for all services; the rest take the
    service's prefix, for example `CONVERGE_IDENTITY_PORT`.
    """

    model_config = SettingsConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    database_url: SecretStr | None = Field(
        default=None,
        validation_alias="DATABASE_URL",
        description="PostgreSQL URL; unset starts an embedded server under the data directory.",
    )
    data_dir: Path = Field(
        default=Path("var"),
        validation_alias="CONVERGE_DATA_DIR",
        description="Where local state lives: the embedded PostgreSQL, the MLflow store.",
    )
    log_level: str = Field(default="INFO", validation_alias="CONVERGE_LOG_LEVEL")
    host: str = Field(default="127.0.0.1", description="Address the gRPC server binds.")
    port: int = Field(default=50051, ge=0, le=65535, description="gRPC port; 0 picks a free one.")
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus /metrics port; unset disables."
    )
    grace_period_s: float = Field(
        default=10.0, gt=0, description="How long in-flight calls may run after SIGTERM."
    )
    db_pool_min_size: int = Field(default=1, ge=0)
    db_pool_max_size: int = Field(default=10, ge=1)
    db_command_timeout_s: float = Field(default=30.0, gt=0)
    db_plan_cache_mode: Literal["auto", "force_generic_plan", "force_custom_plan"] = Field(
        default="auto",
        description=(
            "PostgreSQL's plan_cache_mode for the service's connections: how its prepared "
            "statements are planned (auto: PostgreSQL chooses per statement)."
        ),
    )
    health_check_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often health checks the database (and the service's own checks).",
    )
    health_check_timeout_s: float = Field(
        default=2.0, gt=0, description="How long one database check may take before it fails."
    )
    migrate_on_start: bool = Field(
        default=True,
        description=(
            "Apply pending migrations at start. Clusters set it false and migrate once, "
            "before the pods start (`python -m converge.<service> migrate`), so replicas "
            "never race; a service that finds migrations pending then refuses to start."
        ),
    )
    max_concurrent_calls: int = Field(
        default=1000,
        ge=1,
        description=(
            "Unary calls in flight at once on this server; beyond it a new one is answered "
            "RESOURCE_EXHAUSTED at once instead of queueing. Health and reflection are not counted."
        ),
    )
    max_concurrent_streams: int = Field(
        default=2000,
        ge=1,
        description=(
            "Streaming calls (either direction) open at once; beyond it, RESOURCE_EXHAUSTED. "
            "Health Watch and reflection are not counted."
        ),
    )
    cpu_workers: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Threads of the executor that runs CPU-heavy work (model predictions) off the "
            "event loop. Unset: the CPUs the process may use (its affinity, lowered to the "
            "container's CPU quota)."
        ),
    )
    cpu_queue_limit: int = Field(
        default=64,
        ge=0,
        description=(
            "Jobs that may wait for a CPU worker; beyond it a call needing one is answered "
            "RESOURCE_EXHAUSTED rather than queued without bound."
        ),
    )

    @classmethod
    def env_name(cls, field_name: str) -> str:
        """The environment variable that sets a field, for error messages and docs."""
        field = cls.model_fields[field_name]
        if isinstance(field.validation_alias, str):
            return field.validation_alias
        return f"{cls.model_config.get('env_prefix', '')}{field_name}".upper()


def load_settings(settings_class: type[SettingsT]) -> SettingsT:
    """Reads settings from the environment; a wrong one stops the process naming the variable."""
    try:
        return settings_class()
    except ValidationError as error:
        for problem in error.errors():
            location = str(problem["loc"][0]) if problem["loc"] else "?"
            name = location if location.isupper() else settings_class.env_name(location)
            print(f"invalid setting {name}: {problem['msg']}", file=sys.stderr)
        raise SystemExit(2) from error

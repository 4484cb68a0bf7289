"""Fixtures of the scoring tests: identity and interactions running for real
(the `platform` fixture), one customer with a history, small real models
registered once per session in a real MLflow SQLite store, and the scoring
service on a real port over a copy of that store (so each test moves
aliases on its own)."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest

from converge.models.registry import REGISTERED_MODEL_NAMES, ModelRegistry
from converge.runtime.server import ServiceRuntime
from converge.runtime.values import timestamp
from converge.scoring.app import SPEC as SCORING
from converge.scoring.settings import ScoringSettings
from converge.v1 import common_pb2, identity_pb2, scoring_pb2_grpc
from tests.conftest import Platform
from tests.interactions.builders import email_ref, interaction, number, record, text
from tests.scoring.training import register_version

SIGNED_UP = datetime(2024, 3, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Versions:
    """What the session store holds, by prediction: version numbers."""

    churn: str
    churn_flipped: str  # another churn model answering differently (for promotions)
    churn_other_feature_set: str  # trained on another feature set: must be refused
    churn_corrupt: str  # its booster file is garbage: must be refused
    escalation: str
    cross_sell: str


@dataclass(frozen=True)
class ModelStore:
    db: Path
    versions: Versions


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelStore]:
    """Every version the tests use, trained and registered once."""
    before = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    root = tmp_path_factory.mktemp("scoring-mlflow")
    db = root / "mlflow.db"
    registry = ModelRegistry(tracking_uri=f"sqlite:///{db}")
    churn = register_version(registry, "churn", 1).version
    flipped = register_version(registry, "churn", 2, flip=True).version
    other = register_version(
        registry, "churn", 3, feature_set_version="another-set-000000000000"
    ).version
    corrupt = register_version(registry, "churn", 4).version
    for booster in _version_files(registry, corrupt).rglob("booster.txt"):
        booster.write_text("this is not a LightGBM model\n")
    escalation = register_version(registry, "escalation", 5).version
    cross_sell = register_version(registry, "cross_sell", 6).version
    yield ModelStore(db, Versions(churn, flipped, other, corrupt, escalation, cross_sell))
    if before is None:
        os.environ.pop("MLFLOW_DISABLE_TELEMETRY", None)
    else:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = before


def _version_files(registry: ModelRegistry, version: str) -> Path:
    """Where a churn version's files are stored (a local store: a directory)."""
    from urllib.parse import urlsplit

    uri = registry.client.get_model_version_download_uri(REGISTERED_MODEL_NAMES["churn"], version)
    path = Path(urlsplit(uri).path) if uri.startswith("file:") else Path(uri)
    assert path.is_dir(), f"expected the version's files on disk, found {uri}"
    return path


@pytest.fixture
def tracking_uri(model_store: ModelStore, tmp_path: Path) -> str:
    """A copy of the session's store for one test (the artifacts stay shared, read only)."""
    copy = tmp_path / "mlflow.db"
    shutil.copy(model_store.db, copy)
    return f"sqlite:///{copy}"


@pytest.fixture
def versions(model_store: ModelStore) -> Versions:
    return model_store.versions


def set_champion(tracking_uri: str, prediction: str, version: str) -> None:
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=tracking_uri).set_registered_model_alias(
        REGISTERED_MODEL_NAMES[prediction], "champion", version
    )  # type: ignore[no-untyped-call]


@dataclass(frozen=True)
class Scoring:
    stub: scoring_pb2_grpc.ScoringServiceStub
    runtime: ServiceRuntime
    platform: Platform
    tracking_uri: str


def scoring_settings(platform: Platform, database: str, tracking_uri: str) -> ScoringSettings:
    return ScoringSettings(
        database_url=database,
        port=0,
        interactions_address=platform.interactions_address,
        identity_address=platform.identity_address,
        tracking_uri=tracking_uri,
        model_poll_interval_s=3600,  # (tests reload with ReloadModels)
        cpu_workers=2,
    )


@pytest.fixture
async def start_scoring(
    platform: Platform, database: str, tracking_uri: str
) -> AsyncIterator[object]:
    """Starts the scoring service (call it once the champions are set)."""
    started: list[tuple[ServiceRuntime, grpc.aio.Channel]] = []

    async def start() -> Scoring:
        runtime = ServiceRuntime(SCORING, scoring_settings(platform, database, tracking_uri))
        await runtime.start()
        channel = grpc.aio.insecure_channel(runtime.address)
        started.append((runtime, channel))
        return Scoring(
            scoring_pb2_grpc.ScoringServiceStub(channel), runtime, platform, tracking_uri
        )

    yield start
    for runtime, channel in started:
        await channel.close()
        await runtime.stop(grace=1)


@dataclass(frozen=True)
class Customer:
    customer_id: str
    email: str
    ticket_id: str


async def make_customer(platform: Platform, tag: str = "a") -> Customer:
    """A customer with a profile and a recent history: failed payments, a
    low NPS, complaints, logins, a purchase and an open ticket."""
    email = f"{tag}@scoring.example"
    created = await platform.identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(
            profile=identity_pb2.Profile(
                display_name="Pat Example",
                segment="smb",
                plan="basic",
                signup_date=timestamp(SIGNED_UP),
            ),
            identifiers=[common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=email)],
        )
    )
    customer_id = created.customer.customer_id
    ref = common_pb2.CustomerRef(customer_id=customer_id)
    ticket = f"T-{tag}"
    now = datetime.now(UTC)
    items = [
        interaction(ref, "payment.failed", days_ago=3, amount=common_pb2.Money(currency_code="EUR", units=20)),
        interaction(ref, "payment.failed", days_ago=9, amount=common_pb2.Money(currency_code="EUR", units=20)),
        interaction(ref, "survey.nps", days_ago=5, attributes={"score": number(2)}),
        interaction(ref, "complaint", days_ago=4, attributes={"category": text("billing")}),
        interaction(ref, "product.login", days_ago=2),
        interaction(ref, "purchase", days_ago=8, product_id="tv", amount=common_pb2.Money(currency_code="EUR", units=99)),
        interaction(
            ref,
            "ticket.opened",
            at=now - timedelta(hours=30),
            ticket_id=ticket,
            attributes={"priority": text("high"), "category": text("billing")},
        ),
        interaction(ref, "ticket.reassigned", at=now - timedelta(hours=20), ticket_id=ticket, attributes={"team": text("second-line")}),
    ]  # fmt: skip
    for item in items:
        await platform.interactions.RecordInteraction(record(item))
    return Customer(customer_id, email, ticket)


def by_email(email: str) -> common_pb2.CustomerRef:
    return email_ref(email)

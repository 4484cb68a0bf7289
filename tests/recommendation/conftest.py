"""Fixtures of the recommendation tests: every peer running for real.

Which fixture gives what:
- `platform` (tests/conftest.py): identity and interactions on real ports,
  over the test's database.
- `scoring`: the scoring service on its rule fallback (an empty MLflow store:
  no model registered, so `converge.models.fallback` answers and says so).
  Cheap and deterministic; enough for every rule of the recommendation
  service. Cross-sell rules do not depend on the product: every product gets
  the same propensity, so ties are broken by the documented order.
- `scoring_with_models`: scoring serving the small real LightGBM champions of
  tests/scoring/conftest.py's session store (churn, escalation, cross_sell).
  Use it only when a test needs real models' answers.
- `clock`: a `ManualClock` the recommendation service reads for every
  time-dependent rule (caps, cool-downs, quiet hours, retention); tests move
  it with `clock.advance(...)`. Peers keep the wall clock (features are
  computed at the real now).
- `start_recommendation(policy=None, **settings)`: starts one replica on port
  0 against the peers above (a fixed `PolicySource` when given, else the
  stored, activated policies; extra settings by name). `recommendation` is
  one replica started with the defaults over the rule fallback.

Helpers: `make_customer(platform, tag, ...)` creates a customer with a recent
history (at risk, or quiet) and contact preferences; `make_treated_customer`
one that a policy holds out of none of the named actions' control groups;
`set_preferences(...)` changes them as a customer would (UpdateContactPreferences).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import field_mask_pb2

from converge.recommendation.app import build_spec
from converge.recommendation.outcomes.control import in_control_group
from converge.recommendation.policy.model import Policy, PolicySource
from converge.recommendation.settings import RecommendationSettings
from converge.runtime.server import ServiceRuntime
from converge.runtime.values import timestamp
from converge.scoring.app import SPEC as SCORING
from converge.scoring.settings import ScoringSettings
from converge.v1 import (
    common_pb2,
    identity_pb2,
    privacy_pb2_grpc,
    recommendation_pb2_grpc,
    scoring_pb2_grpc,
)
from tests.conftest import Platform
from tests.interactions.builders import interaction, number, record, text
from tests.scoring.conftest import (  # noqa: F401  (fixtures, used by name)
    ModelStore,
    model_store,
    set_champion,
    tracking_uri,
)

SIGNED_UP = datetime(2024, 3, 1, tzinfo=UTC)
# Where a ManualClock starts: a weekday at 10:00 UTC, outside usual quiet hours.
CLOCK_START = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)

EMAIL = common_pb2.CONTACT_CHANNEL_EMAIL
SMS = common_pb2.CONTACT_CHANNEL_SMS
PHONE = common_pb2.CONTACT_CHANNEL_PHONE
PUSH = common_pb2.CONTACT_CHANNEL_PUSH
IN_APP = common_pb2.CONTACT_CHANNEL_IN_APP
EVERY_CHANNEL = (EMAIL, SMS, PHONE, PUSH, IN_APP)


class ManualClock:
    """A clock tests move by hand: `clock()` is now, `advance(...)` moves it."""

    def __init__(self, start: datetime = CLOCK_START) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, by: timedelta | None = None, **parts: float) -> datetime:
        self.now += by if by is not None else timedelta(**parts)
        return self.now


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


# --- scoring ------------------------------------------------------------------------


@dataclass(frozen=True)
class Scoring:
    stub: scoring_pb2_grpc.ScoringServiceStub
    runtime: ServiceRuntime

    @property
    def address(self) -> str:
        return self.runtime.address


async def _start_scoring(platform: Platform, database: str, uri: str) -> ServiceRuntime:
    runtime = ServiceRuntime(
        SCORING,
        ScoringSettings(
            database_url=database,
            port=0,
            interactions_address=platform.interactions_address,
            identity_address=platform.identity_address,
            tracking_uri=uri,
            model_poll_interval_s=3600,
            prediction_log_sample_rate=0.0,
            cpu_workers=1,
        ),
    )
    await runtime.start()
    return runtime


async def _scoring(runtime: ServiceRuntime) -> AsyncIterator[Scoring]:
    channel = grpc.aio.insecure_channel(runtime.address)
    try:
        yield Scoring(scoring_pb2_grpc.ScoringServiceStub(channel), runtime)
    finally:
        await channel.close()
        await runtime.stop(grace=1)


@pytest.fixture
async def scoring(platform: Platform, database: str, tmp_path: Path) -> AsyncIterator[Scoring]:
    """Scoring on its rule fallback: an empty model store, no champion."""
    runtime = await _start_scoring(platform, database, f"sqlite:///{tmp_path / 'empty.db'}")
    async for started in _scoring(runtime):
        yield started


@pytest.fixture
async def scoring_with_models(
    platform: Platform,
    database: str,
    tracking_uri: str,  # noqa: F811  (the fixture of tests/scoring/conftest.py)
    model_store: ModelStore,  # noqa: F811
) -> AsyncIterator[Scoring]:
    """Scoring serving real LightGBM champions for churn, escalation and cross_sell."""
    set_champion(tracking_uri, "churn", model_store.versions.churn)
    set_champion(tracking_uri, "escalation", model_store.versions.escalation)
    set_champion(tracking_uri, "cross_sell", model_store.versions.cross_sell)
    runtime = await _start_scoring(platform, database, tracking_uri)
    async for started in _scoring(runtime):
        yield started


# --- the recommendation service -----------------------------------------------------


@dataclass(frozen=True)
class Recommendation:
    stub: recommendation_pb2_grpc.RecommendationServiceStub
    privacy: privacy_pb2_grpc.DataSubjectServiceStub
    runtime: ServiceRuntime
    clock: ManualClock
    platform: Platform


StartRecommendation = Callable[..., Awaitable[Recommendation]]


def recommendation_settings(
    platform: Platform, database: str, scoring_address: str, **overrides: Any
) -> RecommendationSettings:
    fields: dict[str, Any] = {
        "database_url": database,
        "port": 0,
        "identity_address": platform.identity_address,
        "interactions_address": platform.interactions_address,
        "scoring_address": scoring_address,
        "cpu_workers": 1,
    }
    fields.update(overrides)
    return RecommendationSettings(**fields)


@pytest.fixture
async def start_recommendation(
    platform: Platform, database: str, scoring: Scoring, clock: ManualClock
) -> AsyncIterator[StartRecommendation]:
    """Starts a replica: `await start_recommendation(policy=..., scoring_address=..., **settings)`."""
    started: list[tuple[ServiceRuntime, grpc.aio.Channel]] = []

    async def start(
        policy: PolicySource | None = None, scoring_address: str | None = None, **settings: Any
    ) -> Recommendation:
        runtime = ServiceRuntime(
            build_spec(clock=clock, policy=policy),
            recommendation_settings(
                platform, database, scoring_address or scoring.address, **settings
            ),
        )
        await runtime.start()
        channel = grpc.aio.insecure_channel(runtime.address)
        started.append((runtime, channel))
        return Recommendation(
            recommendation_pb2_grpc.RecommendationServiceStub(channel),
            privacy_pb2_grpc.DataSubjectServiceStub(channel),
            runtime,
            clock,
            platform,
        )

    yield start
    for runtime, channel in reversed(started):
        await channel.close()
        await runtime.stop(grace=1)


@pytest.fixture
async def recommendation(start_recommendation: StartRecommendation) -> Recommendation:
    """One replica with the default settings and the stored policies."""
    return await start_recommendation()


# --- customers ----------------------------------------------------------------------


@dataclass(frozen=True)
class Customer:
    customer_id: str
    email: str
    ticket_id: str  # the open ticket of an at-risk history; "" for a quiet one

    @property
    def ref(self) -> common_pb2.CustomerRef:
        return common_pb2.CustomerRef(customer_id=self.customer_id)

    @property
    def by_email(self) -> common_pb2.CustomerRef:
        return common_pb2.CustomerRef(
            identifier=common_pb2.Identifier(
                type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=self.email
            )
        )


def _at_risk_history(ref: common_pb2.CustomerRef, ticket: str) -> list[Any]:
    """Failed payments, a low NPS, a complaint, an escalated open ticket: high
    churn and escalation on the rules, and a complaint in the last 30 days."""
    now = datetime.now(UTC)
    eur = common_pb2.Money(currency_code="EUR", units=20)
    return [
        interaction(ref, "payment.failed", days_ago=3, amount=eur),
        interaction(ref, "payment.failed", days_ago=9, amount=eur),
        interaction(ref, "survey.nps", days_ago=5, attributes={"score": number(2)}),
        interaction(ref, "complaint", days_ago=4, attributes={"category": text("billing")}),
        interaction(
            ref,
            "ticket.opened",
            at=now - timedelta(hours=30),
            ticket_id=ticket,
            attributes={"priority": text("urgent"), "category": text("billing")},
        ),
        interaction(ref, "ticket.reassigned", at=now - timedelta(hours=20), ticket_id=ticket,
                    attributes={"team": text("second-line")}),
        interaction(ref, "ticket.reassigned", at=now - timedelta(hours=10), ticket_id=ticket,
                    attributes={"team": text("third-line")}),
    ]  # fmt: skip


def _quiet_history(ref: common_pb2.CustomerRef) -> list[Any]:
    """A happy, active customer: logins, purchases, a high NPS, no ticket."""
    eur = common_pb2.Money(currency_code="EUR", units=99)
    return [
        *[interaction(ref, "product.login", days_ago=d) for d in (1, 2, 3, 5, 8, 11, 13, 15, 20)],
        interaction(ref, "purchase", days_ago=6, product_id="tv", amount=eur),
        interaction(ref, "survey.nps", days_ago=7, attributes={"score": number(10)}),
    ]


async def make_customer(
    platform: Platform,
    tag: str,
    *,
    at_risk: bool = False,
    consents: Mapping[int, bool] | None = None,
    do_not_contact: bool = False,
    wants_human: bool = False,
    time_zone: str | None = None,
    segment: str = "smb",
) -> Customer:
    """A customer with a history (`at_risk`: see `_at_risk_history`, else a
    quiet one) and contact preferences: `consents` maps ContactChannel numbers
    to granted (True) or denied (False); by default every channel is granted."""
    email = f"{tag}@recommendation.example"
    attributes = {"time_zone": text(time_zone)} if time_zone else {}
    created = await platform.identity.CreateCustomer(
        identity_pb2.CreateCustomerRequest(
            profile=identity_pb2.Profile(
                display_name="Sam Example",
                segment=segment,
                plan="basic",
                region="emea",
                owner_team="accounts",
                signup_date=timestamp(SIGNED_UP),
                attributes=attributes,
            ),
            identifiers=[common_pb2.Identifier(type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=email)],
        )
    )
    customer_id = created.customer.customer_id
    ref = common_pb2.CustomerRef(customer_id=customer_id)
    ticket = f"T-{tag}" if at_risk else ""
    for item in _at_risk_history(ref, ticket) if at_risk else _quiet_history(ref):
        await platform.interactions.RecordInteraction(record(item))
    await set_preferences(
        platform,
        customer_id,
        consents={c: True for c in EVERY_CHANNEL} if consents is None else consents,
        do_not_contact=do_not_contact,
        wants_human=wants_human,
    )
    return Customer(customer_id, email, ticket)


async def make_treated_customer(
    platform: Platform, tag: str, policy: Policy, actions: Collection[str], **options: Any
) -> Customer:
    """`make_customer(platform, tag, **options)`, made again under a new tag
    until `policy` holds the customer out of none of `actions`.

    Control groups hash the customer id, which identity draws at random: a
    test expecting one of those actions from a customer made once would see
    it held out (another action or do_nothing answering instead) in
    `control_share` of its runs: 5 to 10 % per action under the default
    policy. The customers passed over stay, with their histories."""
    shares = {action.name: action.control_share for action in policy.actions}
    assert set(actions) <= shares.keys(), f"not in the policy: {set(actions) - shares.keys()}"
    attempt = 0
    while True:
        customer = await make_customer(platform, f"{tag}-{attempt}" if attempt else tag, **options)
        if not any(
            in_control_group(policy.control_salt, customer.customer_id, name, shares[name])
            for name in actions
        ):
            return customer
        attempt += 1


async def set_preferences(
    platform: Platform,
    customer_id: str,
    *,
    consents: Mapping[int, bool] | None = None,
    do_not_contact: bool | None = None,
    wants_human: bool | None = None,
) -> identity_pb2.ContactPreferences:
    """Changes a customer's contact preferences through identity (only what is given)."""
    mask: list[str] = []
    preferences = identity_pb2.ContactPreferences()
    if do_not_contact is not None:
        mask.append("do_not_contact")
        preferences.do_not_contact = do_not_contact
    if wants_human is not None:
        mask.append("wants_human")
        preferences.wants_human = wants_human
    answer = await platform.identity.UpdateContactPreferences(
        identity_pb2.UpdateContactPreferencesRequest(
            customer=common_pb2.CustomerRef(customer_id=customer_id),
            consents=[
                identity_pb2.ChannelConsent(
                    channel=channel,  # type: ignore[arg-type]
                    status=identity_pb2.CONSENT_STATUS_GRANTED
                    if granted
                    else identity_pb2.CONSENT_STATUS_DENIED,
                    source="test",
                )
                for channel, granted in (consents or {}).items()
            ],
            update_mask=field_mask_pb2.FieldMask(paths=mask),
            preferences=preferences,
        )
    )
    return answer.contact_preferences

"""The sampled prediction log over real gRPC and PostgreSQL: Score answers
written off the request path with their inputs, a customer's entries
exported and erased through `DataSubjectService` (also when identity's
ForgetCustomer fans out to scoring), the retention purge on a controlled
clock, a full queue dropping rather than waiting, and what is queued
written at shutdown."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from converge.identity.app import SPEC as IDENTITY
from converge.identity.settings import IdentitySettings
from converge.models.handle import ModelRef
from converge.runtime.server import ServiceRuntime
from converge.scoring import prediction_log
from converge.scoring.app import SPEC as SCORING
from converge.scoring.prediction_log import PredictionLog
from converge.scoring.service import Scored, ScoreResult
from converge.scoring.store import LoggedPrediction, ScoringStore
from converge.v1 import (
    common_pb2,
    identity_pb2,
    identity_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)
from tests.conftest import Platform
from tests.scoring.conftest import (
    Versions,
    by_email,
    make_customer,
    scoring_settings,
    set_champion,
)
from tests.scoring.test_score import bad_fields, champions_everywhere, full_request
from tests.waiting import wait_until

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@dataclass(frozen=True)
class LoggingScoring:
    runtime: ServiceRuntime
    scoring: scoring_pb2_grpc.ScoringServiceStub
    privacy: privacy_pb2_grpc.DataSubjectServiceStub


StartLogging = Callable[..., Awaitable[LoggingScoring]]


@pytest.fixture
async def start_logging(
    platform: Platform, database: str, tracking_uri: str
) -> AsyncIterator[StartLogging]:
    """Starts scoring with the prediction log sampling every answer (call it
    once the champions are set); `**settings` override."""
    started: list[tuple[ServiceRuntime, grpc.aio.Channel]] = []

    async def start(**settings: Any) -> LoggingScoring:
        base = scoring_settings(platform, database, tracking_uri)
        values = {
            **base.model_dump(),
            "prediction_log_sample_rate": 1.0,
            "prediction_log_flush_interval_s": 0.05,
            **settings,
        }
        runtime = ServiceRuntime(SCORING, type(base).model_validate(values))
        await runtime.start()
        channel = grpc.aio.insecure_channel(runtime.address)
        started.append((runtime, channel))
        return LoggingScoring(
            runtime,
            scoring_pb2_grpc.ScoringServiceStub(channel),
            privacy_pb2_grpc.DataSubjectServiceStub(channel),
        )

    yield start
    for runtime, channel in started:
        await channel.close()
        if runtime._context is not None:  # (not stopped by the test itself)
            await runtime.stop(grace=1)


async def export_all(
    privacy: privacy_pb2_grpc.DataSubjectServiceStub, customer_ids: list[str]
) -> tuple[list[dict[str, Any]], int]:
    """Every exported prediction log record, following page tokens; and the pages read."""
    records: list[dict[str, Any]] = []
    token = ""
    pages = 0
    while True:
        reply = await privacy.ExportCustomerData(
            privacy_pb2.ExportCustomerDataRequest(customer_ids=customer_ids, page_token=token)
        )
        pages += 1
        assert reply.service == "scoring"
        for section in reply.sections:
            assert section.kind == "prediction_log"
            records += [json_format.MessageToDict(r) for r in section.records]
        token = reply.next_page_token
        if not token:
            return records, pages


async def logged(
    privacy: privacy_pb2_grpc.DataSubjectServiceStub, customer_id: str, at_least: int
) -> list[dict[str, Any]]:
    """Waits until the writer stored `at_least` entries of the customer."""

    async def probe() -> list[dict[str, Any]]:
        return (await export_all(privacy, [customer_id]))[0]

    return await wait_until(
        probe, lambda r: len(r) >= at_least, what=f"{at_least} logged predictions"
    )


async def test_a_sampled_answer_is_logged_with_its_versions_inputs_and_channel(
    start_logging: StartLogging, platform: Platform, tracking_uri: str, versions: Versions
) -> None:
    champions_everywhere(tracking_uri, versions)
    customer = await make_customer(platform)
    service = await start_logging()
    answer = await service.scoring.Score(
        full_request(customer, channel=common_pb2.CHANNEL_CHAT, include_features=True)
    )
    assert len(answer.predictions) == 4  # churn, escalation, two cross-sell candidates
    records = await logged(service.privacy, customer.customer_id, 4)

    assert len(records) == 4
    assert {r["score_id"] for r in records} == {answer.score_id}
    by_position = sorted(records, key=lambda r: r["position"])
    for record, scored in zip(by_position, answer.predictions, strict=True):
        assert record["customer_id"] == customer.customer_id
        assert record["channel"] == "chat"
        assert record["model_version"] == scored.model.version
        assert record["model_name"] == scored.model.name
        assert record["probability"] == pytest.approx(scored.probability)
        assert record["ticket_id"] == scored.ticket_id
        assert record["product_id"] == scored.product_id
    churn = by_position[0]
    assert churn["prediction"] == "churn"
    # The inputs by name, as the model read them: live numbers, profile categories.
    live = {k: v for f in answer.features for k, v in f.values.items()}
    assert churn["features"]["payment_failures_30d"] == live["payment_failures_30d"] == 2.0
    assert churn["features"]["profile_plan"] == "basic"
    assert by_position[2]["features"]["candidate_product"] == "phone"


async def test_export_pages_follow_their_tokens_and_each_entry_comes_once(
    start_logging: StartLogging, platform: Platform, tracking_uri: str, versions: Versions
) -> None:
    set_champion(tracking_uri, "churn", versions.churn)
    customer = await make_customer(platform)
    other = await make_customer(platform, tag="b")
    service = await start_logging(max_page_bytes=1024)
    score_ids = set()
    for _ in range(12):
        reply = await service.scoring.Score(
            scoring_pb2.ScoreRequest(customer=by_email(customer.email))
        )
        score_ids.add(reply.score_id)
    await service.scoring.Score(scoring_pb2.ScoreRequest(customer=by_email(other.email)))
    await logged(service.privacy, customer.customer_id, 12)
    await logged(service.privacy, other.customer_id, 1)

    records, pages = await export_all(service.privacy, [customer.customer_id])
    assert pages > 1  # a 1 KiB page holds a few entries only
    assert sorted(r["score_id"] for r in records) == sorted(score_ids)


async def test_bad_data_subject_requests_name_the_field(
    start_logging: StartLogging, tracking_uri: str, versions: Versions
) -> None:
    service = await start_logging()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.privacy.ExportCustomerData(
            privacy_pb2.ExportCustomerDataRequest(
                customer_ids=[str(uuid.uuid4())], page_token="after-seq:12"
            )
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == ["page_token"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.privacy.EraseCustomerData(
            privacy_pb2.EraseCustomerDataRequest(customer_ids=["not-an-id"])
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == ["customer_ids[0]"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.privacy.EraseCustomerData(privacy_pb2.EraseCustomerDataRequest())
    assert bad_fields(caught.value) == ["customer_ids"]


async def test_identity_forget_customer_reaches_the_prediction_log(
    start_logging: StartLogging,
    platform: Platform,
    database: str,
    tracking_uri: str,
    versions: Versions,
) -> None:
    set_champion(tracking_uri, "churn", versions.churn)
    customer = await make_customer(platform)
    kept = await make_customer(platform, tag="kept")
    service = await start_logging()
    for who in (customer, kept, customer):
        await service.scoring.Score(scoring_pb2.ScoreRequest(customer=by_email(who.email)))
    await logged(service.privacy, customer.customer_id, 2)
    await logged(service.privacy, kept.customer_id, 1)

    # Identity as deployed: scoring among the peers it asks to erase.
    identity = ServiceRuntime(
        IDENTITY,
        IdentitySettings(
            database_url=database,
            port=0,
            peer_services={"scoring": service.runtime.address},
        ),
    )
    await identity.start()
    try:
        async with grpc.aio.insecure_channel(identity.address) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            # Identity's ExportCustomer carries the log's entries, page after page.
            exported: list[Any] = []
            token = ""
            while True:
                page = await stub.ExportCustomer(
                    identity_pb2.ExportCustomerRequest(
                        customer=common_pb2.CustomerRef(customer_id=customer.customer_id),
                        actor=common_pb2.Actor(name="privacy-officer"),
                        page_token=token,
                    )
                )
                assert "scoring" not in page.unavailable_services
                exported += [
                    record
                    for part in page.services
                    if part.service == "scoring"
                    for section in part.sections
                    if section.kind == "prediction_log"
                    for record in section.records
                ]
                token = page.next_page_token
                if not token:
                    break
            assert len(exported) == 2
            assert {r["customer_id"] for r in exported} == {customer.customer_id}
            reply = await stub.ForgetCustomer(
                identity_pb2.ForgetCustomerRequest(
                    customer=common_pb2.CustomerRef(customer_id=customer.customer_id),
                    actor=common_pb2.Actor(name="privacy-officer"),
                )
            )
    finally:
        await identity.stop(grace=1)
    assert reply.complete
    scoring_peer = [s for s in reply.services if s.service == "scoring"]
    assert len(scoring_peer) == 1 and scoring_peer[0].erased_counts["prediction_log"] == 2
    assert (await export_all(service.privacy, [customer.customer_id]))[0] == []
    assert len((await export_all(service.privacy, [kept.customer_id]))[0]) == 1
    # Idempotent: a repeat erases nothing and succeeds.
    again = await service.privacy.EraseCustomerData(
        privacy_pb2.EraseCustomerDataRequest(customer_ids=[customer.customer_id])
    )
    assert dict(again.erased_counts) == {"prediction_log": 0}


async def test_what_is_queued_is_written_at_shutdown(
    start_logging: StartLogging, platform: Platform, tracking_uri: str, versions: Versions
) -> None:
    set_champion(tracking_uri, "churn", versions.churn)
    customer = await make_customer(platform)
    # The writer would wait an hour: only the shutdown writes the answer.
    service = await start_logging(
        prediction_log_flush_interval_s=3600, prediction_log_batch_size=1000
    )
    reply = await service.scoring.Score(scoring_pb2.ScoreRequest(customer=by_email(customer.email)))
    store = ScoringStore(service.runtime.pool)
    assert [r async for r in store.export([uuid.UUID(customer.customer_id)], 0)] == []
    await service.runtime.stop(grace=1)

    restarted = await start_logging()
    records, _ = await export_all(restarted.privacy, [customer.customer_id])
    assert [r["score_id"] for r in records] == [reply.score_id]


# --- the log itself, on a controlled clock -------------------------------------------


class Clock:
    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


def answer(customer_id: uuid.UUID, at: datetime) -> ScoreResult:
    """A Score answer of one churn prediction, as the service builds it."""
    ref = ModelRef("converge-churn", "1", "run", "champion", "set")
    scored = Scored(
        prediction="churn",
        ticket_id="",
        product_id="",
        probability=0.5,
        band="medium",
        model=ref,
        reasons=(),
        fallback_reason="",
        inputs=None,
    )
    return ScoreResult(
        customer_id=str(customer_id),
        predictions=(scored,),
        features=None,  # type: ignore[arg-type]  # (the log does not read them)
        score_id=uuid.uuid4().hex,
        scored_at=at,
    )


def entry(customer_id: uuid.UUID, at: datetime) -> LoggedPrediction:
    return LoggedPrediction(
        score_id=uuid.uuid4().hex,
        position=0,
        customer_id=customer_id,
        prediction="churn",
        ticket_id="",
        product_id="",
        model_name="converge-churn",
        model_version="1",
        features={"nps_last": 3.0},
        probability=0.5,
        band="medium",
        channel="web",
        scored_at=at,
    )


@pytest.fixture
async def scoring_pool(
    platform: Platform, database: str, tracking_uri: str
) -> AsyncIterator[ServiceRuntime]:
    """A scoring service for its pool (its schema migrated) and its slots."""
    runtime = ServiceRuntime(SCORING, scoring_settings(platform, database, tracking_uri))
    await runtime.start()
    yield runtime
    await runtime.stop(grace=1)


def log_over(runtime: ServiceRuntime, clock: Clock, **overrides: Any) -> PredictionLog:
    settings: dict[str, Any] = {
        "sample_rate": 1.0,
        "queue_size": 1000,
        "batch_size": 100,
        "flush_interval_s": 3600.0,
        "retention": timedelta(days=30),
        "purge_interval_s": 3600.0,
        **overrides,
    }
    return PredictionLog(
        ScoringStore(runtime.pool),
        slots=None,  # type: ignore[arg-type]  # (no drift reports here)
        executor=runtime.executor,
        clock=clock,
        rng=random.Random(7),
        **settings,
    )


async def test_retention_purges_entries_past_the_horizon_only(
    scoring_pool: ServiceRuntime,
) -> None:
    clock = Clock(T0)
    log = log_over(scoring_pool, clock)
    who = uuid.uuid4()
    store = ScoringStore(scoring_pool.pool)
    await store.append(
        [
            entry(who, T0 - timedelta(days=31)),
            entry(who, T0 - timedelta(days=30, seconds=1)),
            entry(who, T0 - timedelta(days=29)),
            entry(who, T0),
        ]
    )
    assert await log.purge() == 2
    left = [r.scored_at async for r in store.export([who], 0)]
    assert left == [T0 - timedelta(days=29), T0]

    clock.now = T0 + timedelta(days=29, seconds=1)  # a day later than the horizon moved
    assert await log.purge() == 1
    assert [r.scored_at async for r in store.export([who], 0)] == [T0]


async def test_a_full_queue_drops_new_samples_and_counts_them(
    scoring_pool: ServiceRuntime,
) -> None:
    log = log_over(scoring_pool, Clock(T0), queue_size=3)
    who = uuid.uuid4()
    dropped = prediction_log.DROPPED.labels("queue_full")
    before = dropped._value.get()
    for _ in range(5):
        log.offer(answer(who, T0), "web", {})  # never waits, full or not
    assert log.queued == 3
    assert dropped._value.get() - before == 2
    assert await log.flush() == 3
    assert len([r async for r in ScoringStore(scoring_pool.pool).export([who], 0)]) == 3


async def test_sampling_keeps_about_the_configured_share_of_answers(
    scoring_pool: ServiceRuntime,
) -> None:
    log = log_over(scoring_pool, Clock(T0), sample_rate=0.25, queue_size=10_000)
    for _ in range(4000):
        log.offer(answer(uuid.uuid4(), T0), "web", {})
    # Binomial(4000, 0.25): mean 1000, sd 27; the seed is fixed, the bound wide.
    assert 850 < log.queued < 1150
    off = log_over(scoring_pool, Clock(T0), sample_rate=0.0)
    off.offer(answer(uuid.uuid4(), T0), "web", {})
    assert off.queued == 0


async def test_erasing_also_drops_what_is_still_queued(scoring_pool: ServiceRuntime) -> None:
    log = log_over(scoring_pool, Clock(T0))
    who, other = uuid.uuid4(), uuid.uuid4()
    await ScoringStore(scoring_pool.pool).append([entry(who, T0)])
    log.offer(answer(who, T0), "web", {})
    log.offer(answer(other, T0), "web", {})
    assert await log.erase([who]) == {"prediction_log": 2}
    await log.flush()
    store = ScoringStore(scoring_pool.pool)
    assert [r async for r in store.export([who], 0)] == []
    assert len([r async for r in store.export([other], 0)]) == 1


def test_logged_inputs_carry_names_and_category_labels() -> None:
    from converge.features.transform import InputSchema

    schema = InputSchema(
        names=("nps_last", "profile_plan"), categories={"profile_plan": ("basic", "pro", "other")}
    )
    named = prediction_log._named(np.array([3.0, 1.0]), schema)
    assert named == {"nps_last": 3.0, "profile_plan": "pro"}
    assert prediction_log._named(np.array([np.nan, np.nan]), schema) == {
        "nps_last": None,
        "profile_plan": None,
    }


async def test_an_answer_written_after_its_customer_was_erased_does_not_come_back(
    scoring_pool: ServiceRuntime,
) -> None:
    """A Score that resolved the customer just before the erasure offers its
    answer just after it (here: after the erasure returned)."""
    log = log_over(scoring_pool, Clock(T0))
    who, other = uuid.uuid4(), uuid.uuid4()
    assert await log.erase([who]) == {"prediction_log": 0}
    log.offer(answer(who, T0), "web", {})
    log.offer(answer(other, T0), "web", {})
    assert await log.flush() == 2
    store = ScoringStore(scoring_pool.pool)
    assert [r async for r in store.export([who], 0)] == []
    assert len([r async for r in store.export([other], 0)]) == 1

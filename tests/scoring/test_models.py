"""Versions under load: a promotion under 16 concurrent callers, refused
versions, and ScoreBatch against one-by-one Score."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import grpc
import prometheus_client
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from converge.runtime.errors import read_status
from converge.v1 import common_pb2, predictions_pb2, scoring_pb2, scoring_pb2_grpc
from tests.conftest import Platform
from tests.scoring.conftest import Scoring, Versions, by_email, make_customer, set_champion
from tests.waiting import until

StartScoring = Callable[[], Awaitable[Scoring]]
CHURN = predictions_pb2.PREDICTION_KIND_CHURN
CALLERS = 16


def refused_count() -> float:
    value = prometheus_client.REGISTRY.get_sample_value(
        "converge_scoring_models_refused_total", {"prediction": "churn", "alias": "champion"}
    )
    return value or 0.0


async def test_a_promotion_under_16_callers_switches_every_later_call_without_a_failure(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    customer = await make_customer(platform)
    set_champion(tracking_uri, "churn", versions.churn)
    scoring = await start_scoring()
    request = scoring_pb2.ScoreRequest(
        customer=common_pb2.CustomerRef(customer_id=customer.customer_id), predictions=[CHURN]
    )
    old = (await scoring.stub.Score(request)).predictions[0]
    answers: list[tuple[bool, str, float]] = []
    failures: list[grpc.StatusCode] = []
    promoted = False
    stop = False

    async def caller() -> None:
        while not stop:
            started_after_promotion = promoted
            try:
                answer = await scoring.stub.Score(request)
            except grpc.aio.AioRpcError as error:
                failures.append(error.code())
                continue
            scored = answer.predictions[0]
            answers.append((started_after_promotion, scored.model.version, scored.probability))

    callers = [asyncio.create_task(caller()) for _ in range(CALLERS)]
    await until(lambda: len(answers) >= 3 * CALLERS, "callers under way")
    set_champion(tracking_uri, "churn", versions.churn_flipped)
    reloaded = await scoring.stub.ReloadModels(scoring_pb2.ReloadModelsRequest(kind=CHURN))
    promoted = True
    seen = len(answers)
    await until(lambda: len(answers) >= seen + 3 * CALLERS, "calls after the promotion")
    stop = True
    await asyncio.gather(*callers)
    new = (await scoring.stub.Score(request)).predictions[0]

    assert [r.version for r in reloaded.swapped_in] == [versions.churn_flipped]
    assert failures == []
    assert (old.model.version, new.model.version) == (versions.churn, versions.churn_flipped)
    assert old.probability != new.probability  # (the flipped model answers differently)
    # No answer mixes versions: each is exactly the old one's or the new one's.
    allowed = {(old.model.version, old.probability), (new.model.version, new.probability)}
    assert {(version, p) for _, version, p in answers} <= allowed
    assert any(version == versions.churn for _, version, _ in answers)
    # Every call that started once ReloadModels had answered got the new version.
    later = [version for after, version, _ in answers if after]
    assert later and set(later) == {versions.churn_flipped}


async def test_a_corrupt_or_mismatched_version_is_refused_and_the_old_one_keeps_serving(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    customer = await make_customer(platform)
    set_champion(tracking_uri, "churn", versions.churn)
    scoring = await start_scoring()
    request = scoring_pb2.ScoreRequest(customer=by_email(customer.email), predictions=[CHURN])
    before = (await scoring.stub.Score(request)).predictions[0]
    refusals_before = refused_count()

    set_champion(tracking_uri, "churn", versions.churn_corrupt)
    corrupt = await scoring.stub.ReloadModels(scoring_pb2.ReloadModelsRequest(kind=CHURN))
    after_corrupt = (await scoring.stub.Score(request)).predictions[0]
    set_champion(tracking_uri, "churn", versions.churn_other_feature_set)
    mismatched = await scoring.stub.ReloadModels(scoring_pb2.ReloadModelsRequest())
    after_mismatch = (await scoring.stub.Score(request)).predictions[0]
    status = await scoring.stub.GetModelStatus(scoring_pb2.GetModelStatusRequest(kind=CHURN))
    listed = await scoring.stub.ListModels(scoring_pb2.ListModelsRequest(include_refused=True))

    assert not corrupt.swapped_in and not mismatched.swapped_in
    assert [r.model.version for r in corrupt.refused] == [versions.churn_corrupt]
    assert "LightGBM" in corrupt.refused[0].error or "model" in corrupt.refused[0].error.lower()
    assert [r.model.version for r in mismatched.refused] == [versions.churn_other_feature_set]
    assert "feature set" in mismatched.refused[0].error
    for answer in (after_corrupt, after_mismatch):
        assert (answer.model.version, answer.probability) == (
            before.model.version,
            before.probability,
        )
        assert not answer.fallback_used
    assert status.champion.model.version == versions.churn and not status.fallback_active
    assert [r.model.version for r in status.refused] == [
        versions.churn_other_feature_set,
        versions.churn_corrupt,
    ]
    assert all(r.state == scoring_pb2.MODEL_STATE_REFUSED and r.error for r in status.refused)
    assert sum(m.state == scoring_pb2.MODEL_STATE_REFUSED for m in listed.models) == 2
    assert refused_count() == refusals_before + 2


async def test_a_refused_first_champion_leaves_the_rules_answering_and_saying_why(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    customer = await make_customer(platform)
    set_champion(tracking_uri, "churn", versions.churn_corrupt)
    scoring = await start_scoring()

    answer = await scoring.stub.Score(
        scoring_pb2.ScoreRequest(customer=by_email(customer.email), predictions=[CHURN])
    )

    scored = answer.predictions[0]
    assert scored.fallback_used and scored.model.name == "converge-rules-churn"
    assert f"version {versions.churn_corrupt} was refused" in scored.fallback_reason


async def test_score_batch_equals_one_by_one_score_and_a_failing_item_does_not_end_it(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    first = await make_customer(platform, "first")
    second = await make_customer(platform, "second")
    set_champion(tracking_uri, "churn", versions.churn)
    set_champion(tracking_uri, "escalation", versions.escalation)
    set_champion(tracking_uri, "cross_sell", versions.cross_sell)
    scoring = await start_scoring()
    items = [
        scoring_pb2.ScoreRequest(
            customer=by_email(first.email),
            ticket_id=first.ticket_id,
            candidate_product_ids=["tv", "phone"],
        ),
        scoring_pb2.ScoreRequest(customer=by_email("nobody@scoring.example")),
        scoring_pb2.ScoreRequest(
            customer=common_pb2.CustomerRef(customer_id=second.customer_id), max_reasons=5
        ),
        scoring_pb2.ScoreRequest(customer=by_email(second.email), predictions=[2]),
        scoring_pb2.ScoreRequest(customer=by_email(second.email), ticket_id=second.ticket_id),
    ] * 3

    async def requests() -> AsyncIterator[scoring_pb2.ScoreBatchRequest]:
        for n, item in enumerate(items):
            yield scoring_pb2.ScoreBatchRequest(row_ref=f"row-{n}", score=item)

    answers = [a async for a in scoring.stub.ScoreBatch(requests())]

    assert [a.row_ref for a in answers] == [f"row-{n}" for n in range(len(items))]
    for item, answer in zip(items, answers, strict=True):
        try:
            alone = await scoring.stub.Score(item)
        except grpc.aio.AioRpcError as error:
            assert answer.WhichOneof("result") == "error"
            problem = read_status(answer.error)
            assert problem.code == error.code()
            continue
        assert answer.WhichOneof("result") == "score"
        assert answer.score.customer_id == alone.customer_id
        # Equal but for the values that move with the clock between the two
        # calls (days since the last interaction): each within a minute's worth.
        batch, single = timeless(answer.score.predictions), timeless(alone.predictions)
        assert [p for p, _ in batch] == [p for p, _ in single]
        for (_, batch_values), (_, single_values) in zip(batch, single, strict=True):
            assert batch_values == pytest.approx(single_values, abs=1e-3)
    errors = [read_status(a.error) for a in answers if a.WhichOneof("result") == "error"]
    assert {(e.code, e.field) for e in errors} == {
        (grpc.StatusCode.NOT_FOUND, ""),
        (grpc.StatusCode.INVALID_ARGUMENT, "ticket_id"),
    }


def timeless(
    predictions: Sequence[predictions_pb2.ScoredPrediction],
) -> list[tuple[predictions_pb2.ScoredPrediction, list[float]]]:
    """Each prediction without its reasons' values, and those values."""
    out = []
    for prediction in predictions:
        copy = predictions_pb2.ScoredPrediction()
        copy.CopyFrom(prediction)
        values = [r.value for r in copy.reasons]
        for reason in copy.reasons:
            reason.ClearField("value")
        out.append((copy, values))
    return out


@pytest.mark.parametrize("kind", [0, CHURN])
async def test_list_models_shows_the_champions(
    platform: Platform,
    start_scoring: StartScoring,
    tracking_uri: str,
    versions: Versions,
    kind: int,
) -> None:
    set_champion(tracking_uri, "churn", versions.churn)
    scoring = await start_scoring()

    listed = await scoring.stub.ListModels(scoring_pb2.ListModelsRequest(kind=kind))  # type: ignore[arg-type]
    async with grpc.aio.insecure_channel(scoring.runtime.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    assert [(m.model.name, m.model.version, m.state) for m in listed.models] == [
        ("converge-churn", versions.churn, scoring_pb2.MODEL_STATE_SERVING)
    ]
    assert listed.models[0].feature_count > 0
    assert health.status == health_pb2.HealthCheckResponse.SERVING  # (the registry was read)
    assert listed.replica


async def test_an_unreachable_registry_at_a_poll_changes_nothing_and_the_next_poll_recovers(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    customer = await make_customer(platform)
    set_champion(tracking_uri, "churn", versions.churn)
    scoring = await start_scoring()
    request = scoring_pb2.ScoreRequest(customer=by_email(customer.email), predictions=[CHURN])
    store = Path(tracking_uri.removeprefix("sqlite:///"))
    failures_before = prometheus_client.REGISTRY.get_sample_value(
        "converge_scoring_registry_failures_total"
    )

    os.rename(store, store.with_suffix(".away"))  # (the store cannot be read)
    during = await scoring.stub.ReloadModels(scoring_pb2.ReloadModelsRequest(kind=CHURN))
    answer = (await scoring.stub.Score(request)).predictions[0]
    os.rename(store.with_suffix(".away"), store)
    set_champion(tracking_uri, "churn", versions.churn_flipped)
    after = await scoring.stub.ReloadModels(scoring_pb2.ReloadModelsRequest(kind=CHURN))

    assert not during.swapped_in and not during.refused
    assert (answer.model.version, answer.fallback_used) == (versions.churn, False)
    assert (
        prometheus_client.REGISTRY.get_sample_value("converge_scoring_registry_failures_total")
        == (failures_before or 0) + 1
    )
    assert [r.version for r in after.swapped_in] == [versions.churn_flipped]


async def test_the_challenger_scores_in_shadow_when_asked_and_never_answers(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    from mlflow import MlflowClient

    customer = await make_customer(platform)
    set_champion(tracking_uri, "churn", versions.churn)
    MlflowClient(tracking_uri=tracking_uri).set_registered_model_alias(
        "converge-churn", "challenger", versions.churn_flipped
    )
    scoring = await start_scoring()
    request = scoring_pb2.ScoreRequest(customer=by_email(customer.email), predictions=[CHURN])

    plain = (await scoring.stub.Score(request)).predictions[0]
    request.include_shadow = True
    shadowed = (await scoring.stub.Score(request)).predictions[0]

    assert not plain.HasField("shadow")
    assert (shadowed.model.version, shadowed.probability) == (
        plain.model.version,
        plain.probability,
    )
    assert shadowed.shadow.model.version == versions.churn_flipped
    assert shadowed.shadow.model.alias == predictions_pb2.MODEL_ALIAS_CHALLENGER
    assert shadowed.shadow.probability != shadowed.probability
    assert shadowed.shadow.risk_band != predictions_pb2.RISK_BAND_UNSPECIFIED


async def test_health_waits_for_a_registry_read_and_the_rules_say_the_registry_is_unreachable(
    platform: Platform, database: str, tmp_path: Path
) -> None:
    from converge.runtime.server import ServiceRuntime
    from converge.scoring.app import SPEC as SCORING
    from tests.scoring.conftest import scoring_settings

    customer = await make_customer(platform)
    broken = tmp_path / "mlflow.db"
    broken.write_text("not a database\n")  # (a store that cannot be read)
    runtime = ServiceRuntime(SCORING, scoring_settings(platform, database, f"sqlite:///{broken}"))
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="")
            )
            answer = await scoring_pb2_grpc.ScoringServiceStub(channel).Score(
                scoring_pb2.ScoreRequest(customer=by_email(customer.email), predictions=[CHURN])
            )
    finally:
        await runtime.stop(grace=1)

    assert health.status == health_pb2.HealthCheckResponse.NOT_SERVING
    scored = answer.predictions[0]
    assert scored.fallback_used
    assert "registry cannot be reached" in scored.fallback_reason

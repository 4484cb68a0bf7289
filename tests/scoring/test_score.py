"""Score over real gRPC: real identity and interactions, real PostgreSQL,
models from a real MLflow store, real LightGBM."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import pandas as pd
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from converge.features.transform import CANDIDATE, profile_values
from converge.models.registry import ModelRegistry
from converge.models.trainingset import profile_from_pb
from converge.runtime.values import to_datetime
from converge.v1 import common_pb2, identity_pb2, predictions_pb2, scoring_pb2
from tests.conftest import Platform
from tests.scoring.conftest import (
    Customer,
    Scoring,
    Versions,
    by_email,
    make_customer,
    set_champion,
)

StartScoring = Callable[[], Awaitable[Scoring]]
CHURN = predictions_pb2.PREDICTION_KIND_CHURN
ESCALATION = predictions_pb2.PREDICTION_KIND_ESCALATION
CROSS_SELL = predictions_pb2.PREDICTION_KIND_CROSS_SELL


def champions_everywhere(tracking_uri: str, versions: Versions) -> None:
    set_champion(tracking_uri, "churn", versions.churn)
    set_champion(tracking_uri, "escalation", versions.escalation)
    set_champion(tracking_uri, "cross_sell", versions.cross_sell)


def full_request(customer: Customer, **fields: Any) -> scoring_pb2.ScoreRequest:
    return scoring_pb2.ScoreRequest(
        customer=by_email(customer.email),
        ticket_id=customer.ticket_id,
        candidate_product_ids=["phone", "broadband"],
        **fields,
    )


def bad_fields(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields += [v.field for v in bad_request.field_violations]
    return fields


def product_path_probability(
    tracking_uri: str, prediction: str, version: str, vectors: Any, profile: Any, product: str = ""
) -> float:
    """What training's own (pandas) path gives for the same values: the
    `NativeModel.predict_proba` that evaluation and MLflow's pyfunc use."""
    loaded = ModelRegistry(tracking_uri=tracking_uri).load_version(prediction, version)
    row: dict[str, Any] = {}
    for vector in vectors:
        row.update(dict(vector.values))
        row.update(dict(vector.category_values))
    row.update(profile_values(profile, to_datetime(vectors[0].as_of)))
    if product:
        row[CANDIDATE] = product
    frame = pd.DataFrame([{name: row.get(name, np.nan) for name in loaded.model.feature_names}])
    return float(loaded.model.predict_proba(frame)[0])


async def test_scores_churn_escalation_and_cross_sell_with_reasons(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    customer = await make_customer(platform)
    champions_everywhere(tracking_uri, versions)
    scoring = await start_scoring()

    answer = await scoring.stub.Score(full_request(customer, include_features=True))

    assert answer.customer_id == customer.customer_id
    kinds = [(p.kind, p.ticket_id, p.product_id) for p in answer.predictions]
    assert kinds == [
        (CHURN, "", ""),
        (ESCALATION, customer.ticket_id, ""),
        (CROSS_SELL, "", "phone"),
        (CROSS_SELL, "", "broadband"),
    ]
    expected_versions = [
        versions.churn,
        versions.escalation,
        versions.cross_sell,
        versions.cross_sell,
    ]
    names = ["converge-churn", "converge-escalation", "converge-cross-sell", "converge-cross-sell"]
    for scored, version, name in zip(answer.predictions, expected_versions, names, strict=True):
        assert not scored.fallback_used and scored.fallback_reason == ""
        assert (scored.model.name, scored.model.version) == (name, version)
        assert scored.model.alias == predictions_pb2.MODEL_ALIAS_CHAMPION
        assert scored.model.run_id
        assert 0 < scored.probability < 1
        assert scored.risk_band != predictions_pb2.RISK_BAND_UNSPECIFIED
        assert 1 <= len(scored.reasons) <= 3
        contributions = [abs(r.contribution) for r in scored.reasons]
        assert contributions == sorted(contributions, reverse=True)
        for reason in scored.reasons:
            assert reason.code.startswith(reason.feature + ".")
            assert reason.text.endswith(")") and "Pat" not in reason.text
            assert customer.email not in reason.text
    # Churn: the model leans on failed payments and the NPS of 2.
    churn_codes = {r.feature for r in answer.predictions[0].reasons}
    assert churn_codes & {"payment_failures_30d", "nps_last", "profile_plan"}
    # The features used come back; the probability is what training's own path gives.
    customer_vector, ticket_vector = answer.features
    assert customer_vector.values["payment_failures_30d"] == 2
    assert ticket_vector.ticket_id == customer.ticket_id
    identity = await platform.identity.BatchGetCustomers(
        identity_pb2.BatchGetCustomersRequest(customer_ids=[customer.customer_id])
    )
    profile = profile_from_pb(identity.customers[0])
    assert answer.predictions[0].probability == pytest.approx(
        product_path_probability(tracking_uri, "churn", versions.churn, [customer_vector], profile),
        abs=1e-12,
    )
    assert answer.predictions[1].probability == pytest.approx(
        product_path_probability(
            tracking_uri,
            "escalation",
            versions.escalation,
            [customer_vector, ticket_vector],
            profile,
        ),
        abs=1e-12,
    )
    assert answer.predictions[3].probability == pytest.approx(
        product_path_probability(
            tracking_uri, "cross_sell", versions.cross_sell, [customer_vector], profile, "broadband"
        ),
        abs=1e-12,
    )


async def test_omitting_reasons_changes_no_probability_and_gives_none(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    """Reasons cost LightGBM's contributions; probabilities never come from
    them, so asking for reasons or not answers the same numbers to the bit."""
    customer = await make_customer(platform)
    champions_everywhere(tracking_uri, versions)
    scoring = await start_scoring()

    with_reasons = await scoring.stub.Score(full_request(customer))
    without = await scoring.stub.Score(full_request(customer, omit_reasons=True))
    together = await asyncio.gather(
        *(scoring.stub.Score(full_request(customer, omit_reasons=n % 2 == 0)) for n in range(8))
    )

    expected = [(p.probability, p.risk_band) for p in with_reasons.predictions]
    assert len(expected) == 4 and all(p.reasons for p in with_reasons.predictions)
    assert [(p.probability, p.risk_band) for p in without.predictions] == expected
    assert all(not p.reasons for p in without.predictions)
    # Concurrent calls share predict calls, with and without reasons mixed.
    for n, answer in enumerate(together):
        assert [(p.probability, p.risk_band) for p in answer.predictions] == expected
        assert all(bool(p.reasons) == (n % 2 == 1) for p in answer.predictions)


async def test_by_id_and_by_identifier_score_the_same_inputs(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    """Named by id, the profile is read beside the features; by identifier,
    after them: both paths feed the models the same row."""
    customer = await make_customer(platform)
    champions_everywhere(tracking_uri, versions)
    scoring = await start_scoring()

    by_identifier = await scoring.stub.Score(full_request(customer))
    request = full_request(customer)
    request.customer.CopyFrom(common_pb2.CustomerRef(customer_id=customer.customer_id))
    by_id = await scoring.stub.Score(request)

    assert by_id.customer_id == by_identifier.customer_id == customer.customer_id
    # The profile is an input (plan, tenure): a missing one would move these.
    assert [(p.probability, [r.code for r in p.reasons]) for p in by_id.predictions] == [
        (p.probability, [r.code for r in p.reasons]) for p in by_identifier.predictions
    ]


async def test_rules_answer_before_any_model_and_say_so(
    platform: Platform, start_scoring: StartScoring
) -> None:
    customer = await make_customer(platform)
    scoring = await start_scoring()

    answer = await scoring.stub.Score(full_request(customer))

    assert len(answer.predictions) == 4
    for scored in answer.predictions:
        assert scored.fallback_used
        assert "no model version" in scored.fallback_reason
        assert scored.model.name.startswith("converge-rules-")
        assert scored.model.alias == predictions_pb2.MODEL_ALIAS_UNSPECIFIED
    assert answer.predictions[0].model.name == "converge-rules-churn"
    # Two failed payments and an NPS of 2 fire churn rules.
    assert {r.feature for r in answer.predictions[0].reasons} >= {"payment_failures_30d"}
    status = await scoring.stub.GetModelStatus(scoring_pb2.GetModelStatusRequest(kind=CHURN))
    assert status.fallback_active and not status.HasField("champion")
    assert status.HasField("registry_checked_at")


async def test_context_features_replace_live_ones(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    customer = await make_customer(platform)
    champions_everywhere(tracking_uri, versions)
    scoring = await start_scoring()
    churn_only = {"predictions": [CHURN], "include_features": True}

    live = await scoring.stub.Score(full_request(customer, **churn_only))
    happy = await scoring.stub.Score(
        full_request(customer, context_features={"nps_last": 10.0}, **churn_only)
    )

    assert live.features[0].values["nps_last"] == 2
    assert happy.features[0].values["nps_last"] == 10
    assert happy.predictions[0].probability < live.predictions[0].probability


async def test_unknown_customer_or_ticket_is_not_found_and_nothing_is_created(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    customer = await make_customer(platform)
    champions_everywhere(tracking_uri, versions)
    scoring = await start_scoring()
    stranger = scoring_pb2.ScoreRequest(customer=by_email("nobody@scoring.example"))

    for _ in range(2):  # (a first call that created the customer would let the second pass)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await scoring.stub.Score(stranger)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.stub.Score(
            scoring_pb2.ScoreRequest(
                customer=common_pb2.CustomerRef(customer_id="00000000-0000-4000-8000-000000000001")
            )
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.stub.Score(
            scoring_pb2.ScoreRequest(customer=by_email(customer.email), ticket_id="T-unknown")
        )
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert "T-unknown" in (caught.value.details() or "")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"predictions": [ESCALATION]}, "ticket_id"),
        ({"predictions": [CROSS_SELL]}, "candidate_product_ids"),
        ({"candidate_product_ids": [f"p{i}" for i in range(101)]}, "candidate_product_ids"),
        ({"context_features": {"no_such_feature": 1.0}}, 'context_features["no_such_feature"]'),
        ({"max_reasons": 21}, "max_reasons"),
        ({"predictions": [7]}, "predictions[0]"),
    ],
)
async def test_bad_requests_are_invalid_argument_naming_the_field(
    platform: Platform,
    start_scoring: StartScoring,
    tracking_uri: str,
    versions: Versions,
    fields: dict[str, Any],
    field: str,
) -> None:
    customer = await make_customer(platform)
    champions_everywhere(tracking_uri, versions)
    scoring = await start_scoring()

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.stub.Score(
            scoring_pb2.ScoreRequest(customer=by_email(customer.email), **fields)
        )

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_fields(caught.value)


async def test_a_request_without_a_customer_names_the_field(
    platform: Platform, start_scoring: StartScoring
) -> None:
    scoring = await start_scoring()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await scoring.stub.Score(scoring_pb2.ScoreRequest())
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert bad_fields(caught.value) == ["customer"]


async def test_converge_score_prints_the_scores_and_reasons(
    platform: Platform,
    start_scoring: StartScoring,
    tracking_uri: str,
    versions: Versions,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from converge import cli

    monkeypatch.setenv("COLUMNS", "240")  # (rich wraps to the terminal's width)
    customer = await make_customer(platform)
    champions_everywhere(tracking_uri, versions)
    scoring = await start_scoring()
    address = scoring.runtime.address
    base = ["score", f"email:{customer.email}", "--scoring", address]
    capsys.readouterr()

    # (the command blocks on its own channel: off this test's event loop, which serves)
    as_json = await asyncio.to_thread(
        cli.main, [*base, "--ticket", customer.ticket_id, "--products", "tv,phone", "--json"]
    )
    printed = json.loads(capsys.readouterr().out)
    as_table = await asyncio.to_thread(cli.main, base)
    table = capsys.readouterr().out
    unknown = await asyncio.to_thread(
        cli.main, ["score", "email:nobody@scoring.example", "--scoring", address]
    )

    assert (as_json, as_table, unknown) == (0, 0, 4)
    assert printed["customerId"] == customer.customer_id
    assert [p["kind"] for p in printed["predictions"]] == [
        "PREDICTION_KIND_CHURN",
        "PREDICTION_KIND_ESCALATION",
        "PREDICTION_KIND_CROSS_SELL",
        "PREDICTION_KIND_CROSS_SELL",
    ]
    assert all(p["reasons"] for p in printed["predictions"])
    assert "churn" in table and "converge-churn" in table and "churn risk" in table

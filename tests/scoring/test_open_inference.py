"""The Open Inference Protocol on the scoring port, driven by tritonclient's
gRPC client unchanged (in a process of its own: see triton_driver.py), over
real identity and interactions, real PostgreSQL, models from a real MLflow
store and real LightGBM."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from inference import open_inference_grpc_pb2 as oip
from inference import open_inference_grpc_pb2_grpc as oip_grpc

from converge.scoring.oip_convert import model_infer_request
from converge.v1 import common_pb2, predictions_pb2, scoring_pb2
from tests.conftest import ROOT, Platform
from tests.scoring.conftest import Scoring, Versions, make_customer, set_champion

StartScoring = Callable[[], Awaitable[Scoring]]


async def triton(address: str, steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each step's result through tritonclient.grpc.InferenceServerClient."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.scoring.triton_driver",
        address,
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate(json.dumps(steps).encode())
    assert process.returncode == 0, err.decode()
    results: list[dict[str, Any]] = json.loads(out)
    assert len(results) == len(steps)
    return results


def bytes_input(name: str, values: list[str]) -> dict[str, Any]:
    return {"name": name, "datatype": "BYTES", "shape": [len(values)], "values": values}


async def score(scoring: Scoring, kind: int, ref: common_pb2.CustomerRef, **fields: Any) -> Any:
    answer = await scoring.stub.Score(
        scoring_pb2.ScoreRequest(customer=ref, predictions=[kind], **fields)
    )
    (prediction,) = answer.predictions
    return prediction


def band_name(band: int) -> str:
    return predictions_pb2.RiskBand.Name(band).removeprefix("RISK_BAND_").lower()  # type: ignore[arg-type]


async def test_tritonclient_reads_health_metadata_and_the_same_scores_as_score(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    first = await make_customer(platform, "oip-a")
    second = await make_customer(platform, "oip-b")
    set_champion(tracking_uri, "churn", versions.churn)
    set_champion(tracking_uri, "escalation", versions.escalation)
    set_champion(tracking_uri, "cross_sell", versions.cross_sell)
    scoring = await start_scoring()

    results = await triton(
        scoring.runtime.address,
        [
            {"call": "is_server_live"},
            {"call": "is_server_ready"},
            {"call": "is_model_ready", "model": "churn"},
            {"call": "is_model_ready", "model": "churn", "version": versions.churn},
            {"call": "is_model_ready", "model": "churn", "version": versions.churn_flipped},
            {"call": "get_model_metadata", "model": "escalation"},
            {"call": "get_server_metadata"},
            # Two customers in one call: one by id, one by an identifier.
            {
                "call": "infer",
                "model": "churn",
                "id": "req-1",
                "inputs": [
                    bytes_input("identifier", [f"email:{first.email}", f"EMAIL:{second.email}"])
                ],
            },
            {
                "call": "infer",
                "model": "escalation",
                "version": versions.escalation,
                "inputs": [
                    bytes_input("customer_id", [first.customer_id]),
                    bytes_input("ticket_id", [first.ticket_id]),
                ],
                "outputs": ["risk_band"],
            },
            {
                "call": "infer",
                "model": "cross_sell",
                "inputs": [
                    bytes_input("customer_id", [first.customer_id, first.customer_id]),
                    bytes_input("product_id", ["phone", "broadband"]),
                ],
            },
        ],
    )
    values = [r["ok"] for r in results]
    live, ready, churn_ready, churn_version_ready, flipped_ready = values[:5]
    assert (live, ready, churn_ready, churn_version_ready) == (True, True, True, True)
    assert flipped_ready is False  # a version that is not loaded is not ready
    metadata = values[5]
    assert metadata["name"] == "escalation"
    assert metadata["versions"] == [versions.escalation]
    assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [
        ("customer_id", "BYTES"),
        ("identifier", "BYTES"),
        ("ticket_id", "BYTES"),
    ]
    assert [(o["name"], o["datatype"]) for o in metadata["outputs"]] == [
        ("probability", "FP64"),
        ("risk_band", "BYTES"),
    ]
    assert values[6]["name"] == "converge-scoring"

    churn, escalation, cross_sell = values[7:]
    # The same probability and band as Score, to the last bit.
    first_ref = common_pb2.CustomerRef(customer_id=first.customer_id)
    second_ref = common_pb2.CustomerRef(customer_id=second.customer_id)
    expected = [
        await score(scoring, predictions_pb2.PREDICTION_KIND_CHURN, first_ref),
        await score(scoring, predictions_pb2.PREDICTION_KIND_CHURN, second_ref),
    ]
    assert churn["model_version"] == versions.churn
    assert churn["id"] == "req-1"
    assert churn["probability.dtype"] == "float64"
    assert churn["probability"] == [p.probability for p in expected]
    assert churn["risk_band"] == [band_name(p.risk_band) for p in expected]

    expected_escalation = await score(
        scoring, predictions_pb2.PREDICTION_KIND_ESCALATION, first_ref, ticket_id=first.ticket_id
    )
    assert escalation["model_version"] == versions.escalation
    assert escalation["output_names"] == ["risk_band"]  # only what was asked for
    assert escalation["risk_band"] == [band_name(expected_escalation.risk_band)]

    for n, product in enumerate(["phone", "broadband"]):
        expected_offer = await score(
            scoring,
            predictions_pb2.PREDICTION_KIND_CROSS_SELL,
            first_ref,
            candidate_product_ids=[product],
        )
        assert cross_sell["probability"][n] == expected_offer.probability
    assert cross_sell["model_version"] == versions.cross_sell


async def test_tritonclient_gets_the_protocols_error_codes(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    customer = await make_customer(platform, "oip-errors")
    set_champion(tracking_uri, "churn", versions.churn)
    set_champion(tracking_uri, "escalation", versions.escalation)
    scoring = await start_scoring()
    unknown_customer = "00000000-0000-4000-8000-000000000000"

    results = await triton(
        scoring.runtime.address,
        [
            # escalation without its ticket_id
            {
                "call": "infer",
                "model": "escalation",
                "inputs": [bytes_input("customer_id", [customer.customer_id])],
            },
            # the customer named as a number
            {
                "call": "infer",
                "model": "churn",
                "inputs": [
                    {"name": "customer_id", "datatype": "INT64", "shape": [1], "values": [7]}
                ],
            },
            # an input no model reads
            {
                "call": "infer",
                "model": "churn",
                "inputs": [
                    bytes_input("customer_id", [customer.customer_id]),
                    bytes_input("favourite_colour", ["blue"]),
                ],
            },
            {
                "call": "infer",
                "model": "fraud",
                "inputs": [bytes_input("customer_id", [customer.customer_id])],
            },
            {"call": "get_model_metadata", "model": "fraud"},
            {"call": "is_model_ready", "model": "fraud"},
            {
                "call": "infer",
                "model": "churn",
                "version": versions.churn_flipped,
                "inputs": [bytes_input("customer_id", [customer.customer_id])],
            },
            {
                "call": "infer",
                "model": "churn",
                "inputs": [bytes_input("customer_id", [unknown_customer])],
            },
        ],
    )
    errors = [r.get("error") for r in results]
    assert all(errors), results
    statuses = [e["status"] for e in errors if e]
    assert statuses == [
        "StatusCode.INVALID_ARGUMENT",
        "StatusCode.INVALID_ARGUMENT",
        "StatusCode.INVALID_ARGUMENT",
        "StatusCode.NOT_FOUND",
        "StatusCode.NOT_FOUND",
        "StatusCode.NOT_FOUND",
        "StatusCode.NOT_FOUND",
        "StatusCode.NOT_FOUND",
    ]
    messages = [e["message"] for e in errors if e]
    assert "ticket_id" in messages[0]
    assert "inputs[0].datatype" in messages[1]
    assert "inputs[1].name" in messages[2] and "favourite_colour" in messages[2]
    assert "fraud" in messages[3]
    assert versions.churn_flipped in messages[6]
    assert unknown_customer in messages[7]


async def test_model_infer_answers_every_output_as_raw_contents(
    platform: Platform, start_scoring: StartScoring, tracking_uri: str, versions: Versions
) -> None:
    # The protocol: when raw contents are used, every output uses them. Read
    # with the vendored stub, which this process can hold (tritonclient cannot).
    customer = await make_customer(platform, "oip-raw")
    set_champion(tracking_uri, "churn", versions.churn)
    scoring = await start_scoring()
    async with grpc.aio.insecure_channel(scoring.runtime.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        answer = await stub.ModelInfer(model_infer_request("churn", [customer.customer_id]))
        # Contents (not raw) in the request are read too.
        by_contents = await stub.ModelInfer(
            oip.ModelInferRequest(
                model_name="churn",
                inputs=[
                    oip.ModelInferRequest.InferInputTensor(
                        name="customer_id",
                        datatype="BYTES",
                        shape=[1, 1],
                        contents=oip.InferTensorContents(
                            bytes_contents=[customer.customer_id.encode()]
                        ),
                    )
                ],
            )
        )
    for response in (answer, by_contents):
        assert [o.name for o in response.outputs] == ["probability", "risk_band"]
        assert len(response.raw_output_contents) == 2
        assert not any(o.HasField("contents") for o in response.outputs)
        assert len(response.raw_output_contents[0]) == 8  # one FP64
    assert by_contents.raw_output_contents == answer.raw_output_contents


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ([], "inputs"),
        (
            [
                oip.ModelInferRequest.InferInputTensor(
                    name="customer_id", datatype="BYTES", shape=[2]
                )
            ],
            "inputs[0].shape",
        ),
    ],
)
async def test_model_infer_names_the_bad_input(
    platform: Platform,
    start_scoring: StartScoring,
    tracking_uri: str,
    versions: Versions,
    inputs: list[oip.ModelInferRequest.InferInputTensor],
    field: str,
) -> None:
    set_champion(tracking_uri, "churn", versions.churn)
    scoring = await start_scoring()
    async with grpc.aio.insecure_channel(scoring.runtime.address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.ModelInfer(oip.ModelInferRequest(model_name="churn", inputs=inputs))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (raised.value.details() or "")

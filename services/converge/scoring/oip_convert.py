"""Open Inference Protocol <-> plain conversions of the scoring service:
ModelInfer requests are checked for shape here (every bad input named at
once), answers are built here; the rules live in `inference.py`.

A model's inputs are BYTES tensors of one value per customer (shape [N] or
[N, 1], the batch dimension first), as contents or as raw contents:

- `customer_id` (a UUID) or `identifier` ("TYPE:value", the type as in
  `converge.v1.IdentifierType` without its prefix: "email:pat@example.com");
- `ticket_id` for escalation; `product_id` (the candidate) for cross-sell.

Outputs: `probability` (FP64, the calibrated probability Score answers) and
`risk_band` (BYTES: low, medium, high, critical), always as
`raw_output_contents`, so every client library reads them.
"""

from __future__ import annotations

import math
import struct
import uuid
from collections.abc import Sequence

import numpy as np
from inference import open_inference_grpc_pb2 as oip

from converge.models.predictions import PREDICTIONS, Prediction
from converge.runtime.errors import NotFound, Violations
from converge.runtime.values import CustomerKey
from converge.scoring.inference import PLATFORM, InferQuery, Inferred, ModelInfo
from converge.scoring.service import ScoreQuery
from converge.v1 import common_pb2

MAX_ROWS = 1000
MAX_KEY = 256
CUSTOMER_INPUTS = ("customer_id", "identifier")
ENTITY_INPUT: dict[Prediction, str] = {"escalation": "ticket_id", "cross_sell": "product_id"}
OUTPUTS = ("probability", "risk_band")
_OUTPUT_TYPES = {"probability": "FP64", "risk_band": "BYTES"}
_LENGTH = struct.Struct(
    "<I"
)  # BYTES elements are sent as a 4-byte little-endian length, then the bytes


def _prediction(name: str) -> Prediction:
    if name not in PREDICTIONS:
        raise NotFound("model", name)
    return name  # type: ignore[return-value]


def inputs_of(prediction: Prediction) -> tuple[str, ...]:
    entity = ENTITY_INPUT.get(prediction)
    return (*CUSTOMER_INPUTS, *((entity,) if entity else ()))


# --- requests -----------------------------------------------------------------------


def infer_query(request: oip.ModelInferRequest, timeout_s: float | None) -> InferQuery:
    """The plain query of a ModelInferRequest: NOT_FOUND for an unknown model,
    INVALID_ARGUMENT naming every bad input."""
    prediction = _prediction(request.model_name)
    allowed = inputs_of(prediction)
    v = Violations()
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        v.add("raw_input_contents", "one entry per input, in the order of inputs")
        v.raise_if_any()
    values: dict[str, list[str]] = {}
    for i, tensor in enumerate(request.inputs):
        path = f"inputs[{i}]"
        if tensor.name not in allowed:
            v.add(
                f"{path}.name", f"{tensor.name[:80]!r} is not an input of {prediction}: {allowed}"
            )
            continue
        if tensor.name in values:
            v.add(f"{path}.name", f"{tensor.name} given twice")
            continue
        if tensor.datatype != "BYTES":
            v.add(f"{path}.datatype", f"{tensor.name} is BYTES, not {tensor.datatype[:20]!r}")
            continue
        if raw and tensor.HasField("contents"):
            v.add(f"{path}.contents", "not with raw_input_contents")
            continue
        found = _strings(raw[i] if raw else None, tensor, path, v)
        if found is not None:
            values[tensor.name] = found
    given = [name for name in CUSTOMER_INPUTS if name in values]
    if len(given) != 1 and not v.found:
        v.add("inputs", "name the customers: one of customer_id or identifier")
    entity = ENTITY_INPUT.get(prediction)
    if entity is not None and entity not in values and not v.found:
        v.add("inputs", f"{entity} is required to score {prediction}")
    counts = {len(column) for column in values.values()}
    if len(counts) > 1:
        v.add("inputs", "every input has one value per row (the same batch size)")
    v.raise_if_any()
    customers = values[given[0]]
    entities = values[entity] if entity is not None else None
    rows = []
    for n, text in enumerate(customers):
        customer = _customer(given[0], text, n, v)
        ticket_id = entities[n] if prediction == "escalation" and entities else ""
        product_id = entities[n] if prediction == "cross_sell" and entities else ""
        rows.append(
            ScoreQuery(
                customer=customer,
                predictions=(prediction,),
                ticket_id=ticket_id,
                candidate_product_ids=(product_id,) if product_id else (),
                omit_reasons=True,
                timeout_s=math.inf if timeout_s is None else timeout_s,
            )
        )
    for i, requested in enumerate(request.outputs):
        v.check(
            requested.name in OUTPUTS,
            f"outputs[{i}].name",
            f"{requested.name[:80]!r} is not an output: {OUTPUTS}",
        )
    v.raise_if_any()
    return InferQuery(prediction, request.model_version, tuple(rows))


def _strings(
    raw: bytes | None, tensor: oip.ModelInferRequest.InferInputTensor, path: str, v: Violations
) -> list[str] | None:
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or not 0 < shape[0] <= MAX_ROWS:
        v.add(f"{path}.shape", f"[rows] or [rows, 1], with 1 to {MAX_ROWS} rows")
        return None
    if raw is not None:
        elements = _split_bytes(raw)
        if elements is None:
            v.add(f"{path}", "raw contents are not BYTES elements (4-byte length, then the bytes)")
            return None
    else:
        elements = list(tensor.contents.bytes_contents)
    if len(elements) != shape[0]:
        v.add(f"{path}.shape", f"says {shape[0]} rows, the contents hold {len(elements)}")
        return None
    out = []
    for n, element in enumerate(elements):
        try:
            text = element.decode()
        except UnicodeDecodeError:
            v.add(f"{path}[{n}]", "not UTF-8 text")
            return None
        if not 0 < len(text) <= MAX_KEY or "\x00" in text:
            v.add(f"{path}[{n}]", f"1 to {MAX_KEY} characters, no NUL")
            return None
        out.append(text)
    return out


def _split_bytes(raw: bytes) -> list[bytes] | None:
    elements = []
    at = 0
    while at < len(raw):
        if at + _LENGTH.size > len(raw):
            return None
        (length,) = _LENGTH.unpack_from(raw, at)
        at += _LENGTH.size
        if at + length > len(raw):
            return None
        elements.append(raw[at : at + length])
        at += length
    return elements


def _customer(input_name: str, text: str, row: int, v: Violations) -> CustomerKey:
    if input_name == "customer_id":
        try:
            uuid.UUID(text)
        except ValueError:
            v.add(f"customer_id[{row}]", "not a customer id (a UUID)")
        return CustomerKey(customer_id=text.lower())
    kind, _, value = text.partition(":")
    type_name = f"IDENTIFIER_TYPE_{kind.strip().upper()}"
    number = common_pb2.IdentifierType.DESCRIPTOR.values_by_name.get(type_name)
    if number is None or number.number == 0 or not value.strip():
        v.add(
            f"identifier[{row}]", 'write "TYPE:value" with a known type, as "email:pat@example.com"'
        )
        return CustomerKey()
    return CustomerKey(identifier_type=number.number, identifier_value=value)


# --- answers ------------------------------------------------------------------------


def _tensor_metadata(name: str, datatype: str) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=[-1])


def model_metadata_response(info: ModelInfo) -> oip.ModelMetadataResponse:
    return oip.ModelMetadataResponse(
        name=info.prediction,
        versions=[info.version] if info.version else [],
        platform=PLATFORM,
        inputs=[_tensor_metadata(name, "BYTES") for name in inputs_of(info.prediction)],
        outputs=[_tensor_metadata(name, _OUTPUT_TYPES[name]) for name in OUTPUTS],
    )


def infer_response(
    inferred: Inferred, request_id: str, requested: Sequence[str]
) -> oip.ModelInferResponse:
    """Every output as raw contents (the protocol: all of them or none)."""
    names = list(requested) or list(OUTPUTS)
    rows = len(inferred.probabilities)
    raw = {
        "probability": np.asarray(inferred.probabilities, dtype="<f8").tobytes(),
        "risk_band": b"".join(
            _LENGTH.pack(len(b)) + b for b in (s.encode() for s in inferred.bands)
        ),
    }
    return oip.ModelInferResponse(
        model_name=inferred.prediction,
        model_version=inferred.version,
        id=request_id,
        outputs=[
            oip.ModelInferResponse.InferOutputTensor(
                name=name, datatype=_OUTPUT_TYPES[name], shape=[rows]
            )
            for name in names
        ],
        raw_output_contents=[raw[name] for name in names],
    )


# --- for clients (benches, tests) ---------------------------------------------------


def model_infer_request(
    model: str,
    customer_ids: Sequence[str],
    *,
    entity_ids: Sequence[str] = (),
    request_id: str = "",
) -> oip.ModelInferRequest:
    """A ModelInfer request as tritonclient builds it (raw BYTES inputs): one
    row per customer id; `entity_ids` are the ticket ids (escalation) or the
    product ids (cross-sell), row by row."""
    columns = [("customer_id", list(customer_ids))]
    entity = ENTITY_INPUT.get(model)  # type: ignore[call-overload]
    if entity is not None:
        columns.append((entity, list(entity_ids)))
    return oip.ModelInferRequest(
        model_name=model,
        id=request_id,
        inputs=[
            oip.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=[len(values)])
            for name, values in columns
        ],
        raw_input_contents=[
            b"".join(_LENGTH.pack(len(b)) + b for b in (v.encode() for v in values))
            for _, values in columns
        ],
    )

"""Drives an Open Inference Protocol server with tritonclient's gRPC client,
unchanged, in a process of its own:

    python -m tests.scoring.triton_driver HOST:PORT < steps.json > results.json

Steps are a JSON list of {"call": ..., ...}; each result is {"ok": value} or
{"error": {"status": "StatusCode.X", "message": ...}}.

Why a process of its own: tritonclient's generated code declares the same
protobuf package (`inference`) and messages as the vendored protocol the
scoring service serves, from another file, and one process's descriptor pool
refuses the second definition ("duplicate symbol
'inference.ServerLiveRequest'"). KServe and MLServer vendor the protocol the
same way, so a server and tritonclient never share a process.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException, triton_to_np_dtype


def _input(spec: dict[str, Any]) -> triton.InferInput:
    tensor = triton.InferInput(spec["name"], spec["shape"], spec["datatype"])
    if spec["datatype"] == "BYTES":
        data = np.array([v.encode() for v in spec["values"]], dtype=np.object_)
    else:
        data = np.array(spec["values"], dtype=triton_to_np_dtype(spec["datatype"]))
    tensor.set_data_from_numpy(data.reshape(spec["shape"]))
    return tensor


def run(client: triton.InferenceServerClient, step: dict[str, Any]) -> Any:
    call = step["call"]
    if call == "is_server_live":
        return client.is_server_live()
    if call == "is_server_ready":
        return client.is_server_ready()
    if call == "is_model_ready":
        return client.is_model_ready(step["model"], step.get("version", ""))
    if call == "get_server_metadata":
        return client.get_server_metadata(as_json=True)
    if call == "get_model_metadata":
        return client.get_model_metadata(step["model"], step.get("version", ""), as_json=True)
    if call == "infer":
        outputs = [triton.InferRequestedOutput(name) for name in step.get("outputs", [])]
        result = client.infer(
            step["model"],
            [_input(spec) for spec in step["inputs"]],
            model_version=step.get("version", ""),
            outputs=outputs or None,
            request_id=step.get("id", ""),
        )
        response = result.get_response(as_json=True)
        answer: dict[str, Any] = {
            "model_version": response.get("model_version", ""),
            "id": response.get("id", ""),
            "output_names": [o["name"] for o in response["outputs"]],
        }
        for name in answer["output_names"]:
            values = result.as_numpy(name)
            assert values is not None, name
            answer[name] = [v.decode() if isinstance(v, bytes) else float(v) for v in values]
            answer[f"{name}.dtype"] = str(values.dtype)
        return answer
    raise ValueError(f"unknown call {call}")


def main() -> None:
    address = sys.argv[1]
    steps = json.load(sys.stdin)
    client = triton.InferenceServerClient(url=address)
    results = []
    for step in steps:
        try:
            results.append({"ok": run(client, step)})
        except InferenceServerException as error:
            results.append({"error": {"status": error.status(), "message": error.message()}})
    client.close()
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()

"""Generated protobuf code is never hand-edited and never stale."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from google.protobuf import descriptor_pb2

from converge.v1 import (
    common_pb2,
    identity_pb2,
    interactions_pb2,
    predictions_pb2,
    privacy_pb2,
    recommendation_pb2,
    scoring_pb2,
)
from tests.conftest import ROOT

GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def test_generated_code_matches_the_protos(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    committed_dir = ROOT / "protos"
    committed = {
        p.relative_to(committed_dir): p.read_bytes()
        for p in committed_dir.rglob("*")
        if p.is_file() and p.name.endswith(GENERATED_SUFFIXES)
    }
    assert fresh.keys() == committed.keys(), "run `make protos`: generated files differ"
    stale = [str(path) for path, content in fresh.items() if committed[path] != content]
    assert not stale, f"run `make protos`: stale generated code in {stale}"


def test_api_follows_the_proto_conventions() -> None:
    for module in (
        common_pb2,
        identity_pb2,
        interactions_pb2,
        predictions_pb2,
        privacy_pb2,
        recommendation_pb2,
        scoring_pb2,
    ):
        proto = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(proto)
        assert proto.package == "converge.v1"
        for enum in [*proto.enum_type, *(e for m in proto.message_type for e in m.enum_type)]:
            assert enum.value[0].number == 0
            assert enum.value[0].name.endswith("_UNSPECIFIED"), enum.name
        for service in proto.service:
            request_types = [m.input_type for m in service.method]
            response_types = [m.output_type for m in service.method]
            # One request and one response message per RPC, named after it.
            for method in service.method:
                assert method.input_type.endswith(f".{method.name}Request"), method.name
                assert method.output_type.endswith(f".{method.name}Response"), method.name
            assert len(set(request_types)) == len(request_types)
            assert len(set(response_types)) == len(response_types)


def test_every_proto_element_is_commented() -> None:
    missing = []
    for path in sorted((ROOT / "protos" / "converge" / "v1").glob("*.proto")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            stripped = line.strip()
            declares = stripped.startswith(("message ", "enum ", "service ", "rpc ", "oneof ")) or (
                stripped.endswith(";")
                and "=" in stripped
                and not stripped.startswith(("syntax", "option"))
            )
            if declares and not lines[number - 1].strip().startswith("//"):
                missing.append(f"{path.name}:{number + 1}: {stripped}")
    assert not missing, "uncommented proto elements:\n" + "\n".join(missing)


def test_prediction_messages_are_shared_not_owned_by_scoring() -> None:
    # Moved into predictions.proto under the same package: full names (and so
    # the wire and JSON forms) are unchanged.
    shared = predictions_pb2.DESCRIPTOR
    by_name = {**shared.message_types_by_name, **shared.enum_types_by_name}
    moved = ("FeatureVector", "ModelRef", "ModelAlias", "RiskBand", "ReasonCode")
    for name in (*moved, "ScoredPrediction", "PredictionKind"):
        assert by_name[name].full_name == f"converge.v1.{name}"
    # Recommendation needs only the shared vocabulary, not the scoring service.
    imported = {d.name for d in recommendation_pb2.DESCRIPTOR.dependencies}
    assert "converge/v1/scoring.proto" not in imported
    assert "converge/v1/interactions.proto" not in imported

"""Generates the Python code of the v1 API (and of the vendored Open Inference
Protocol) from the .proto files.

    python protos/generate.py            # into protos/ (what `make protos` does)
    python protos/generate.py --out DIR  # elsewhere (the staleness test)

The code lands beside the sources, so its Python path equals the proto package
(`converge.v1`; `inference` for the Open Inference Protocol, vendored as
published in `inference/`) and no import is ever rewritten. Never edit the output.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from google import rpc as google_rpc
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent


def proto_files() -> list[Path]:
    return sorted([*PROTO_ROOT.glob("converge/**/*.proto"), *PROTO_ROOT.glob("inference/*.proto")])


def generate(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    # mypy-protobuf's plugins live beside this interpreter, maybe not on PATH.
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    well_known = Path(protoc.__file__).parent / "_proto"
    # google/rpc/*.proto (per-item errors are `google.rpc.Status`) ship with
    # googleapis-common-protos, the package whose generated code they import.
    googleapis = Path(next(iter(google_rpc.__path__))).parent.parent
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"-I{googleapis}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        f"--mypy_out={out}",
        f"--mypy_grpc_out={out}",
        *(str(p.relative_to(PROTO_ROOT)) for p in proto_files()),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=PROTO_ROOT)
    generate(parser.parse_args().out)


if __name__ == "__main__":
    main()

"""`make demo`'s main job end to end: PostgreSQL and every service start, the
scenario runs over gRPC, and everything stops leaving no process behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from rich.console import Console

from converge.demo import Demo

pytestmark = pytest.mark.slow


def _processes_under(path: Path) -> list[str]:
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if str(path) in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(cmdline)
    return found


def test_demo_runs_the_scenario_and_leaves_no_process(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "converge.demo",
            "--once",
            "--data-dir",
            str(tmp_path),
            "--port-offset",
            "1000",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "127.0.0.1:51051" in result.stdout  # identity, shifted by the offset
    assert "merged" in result.stdout.lower()
    assert "127.0.0.1:51052" in result.stdout  # interactions
    # The live features count the web visit of the customer merged into Ada.
    login_row = next(line for line in result.stdout.splitlines() if "count_7d_login" in line)
    assert "2.00" in login_row
    assert "Everything stopped." in result.stdout
    assert (tmp_path / "logs" / "identity.log").exists()
    assert (tmp_path / "logs" / "interactions.log").exists()
    assert not _processes_under(tmp_path)


def test_the_demo_tells_identity_which_running_services_to_erase_and_export_with(
    tmp_path: Path,
) -> None:
    demo = Demo(Console(), tmp_path, port_offset=7)
    [identity] = [s for s in demo.services if s.name == "identity"]
    interactions = next(s for s in demo.services if s.name == "interactions")
    peers = json.loads(demo.child_env(identity)["CONVERGE_IDENTITY_PEER_SERVICES"])
    running = {s.name for s in demo.services}
    assert peers["interactions"] == f"127.0.0.1:{interactions.port}"
    assert set(peers) <= running  # never a service the demo does not start

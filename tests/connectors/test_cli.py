"""`converge import` and `converge mappings` as a user runs them: a real
subprocess, its exit code and its output. No service is needed: dry runs
call none, and the unreachable case points at a port nobody listens on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import free_port, shared_dataset


def converge(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "120", "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "converge.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )


def test_dry_run_json_maps_the_itsm_log_without_calling_a_service(tmp_path: Path) -> None:
    path = shared_dataset("itsm_incidents_sample/incident_events_first3000.csv")
    result = converge(
        "import", str(path), "--mapping", "itsm_incidents", "--dry-run", "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["dry_run"] is True
    assert summary["read"] == summary["mapped"] == 21453
    assert summary["rejected"] == 0 and summary["rejection_reasons"] == {}
    assert summary["sent"] == 0
    assert len(summary["samples"]) == 5
    first = summary["samples"][0]["ingest"]
    assert first["rowRef"] == "2"
    assert first["idempotencyKey"] == "INC0000045:0:29/2/2016 01:23"
    assert first["interaction"]["type"] == "ticket.opened"


def test_dry_run_with_a_limit_and_a_mapping_file_path(tmp_path: Path) -> None:
    path = shared_dataset("cdnow/CDNOW_master.txt")
    shown = converge("mappings", "--show", "cdnow_purchases", cwd=tmp_path)
    assert shown.returncode == 0
    mine = tmp_path / "my_purchases.yaml"
    mine.write_text(shown.stdout.replace("source: cdnow\n", "source: my_shop\n"))
    result = converge(
        "import",
        str(path),
        "--mapping",
        str(mine),
        "--dry-run",
        "--json",
        "--limit",
        "100",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["read"], summary["mapped"], summary["source"]) == (100, 100, "my_shop")
    assert summary["samples"][0]["ingest"]["interaction"]["source"] == "my_shop"


def test_dry_run_table_reports_rejections_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text(
        "customer_id date number_of_cds dollar_value\n"
        "1 19970101 1 1.00\n"
        "2 1997-01-01 1 1.00\n"
        "3 1997-01-02 1 1.00\n"
    )
    result = converge(
        "import", str(path), "--mapping", "cdnow_purchases", "--dry-run", cwd=tmp_path
    )
    assert result.returncode == 1, result.stderr
    assert "Dry run" in result.stdout
    assert "date: not a time in format %Y%m%d" in result.stdout
    assert "line 3: date = '1997-01-01'" in result.stdout


def test_a_bad_mapping_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("customer_id date number_of_cds dollar_value\n1 19970101 1 1.00\n")
    mapping = tmp_path / "bad.yaml"
    mapping.write_text(
        converge("mappings", "--show", "cdnow_purchases", cwd=tmp_path).stdout.replace(
            "value: WEB", "value: WWW"
        )
    )
    result = converge("import", str(path), "--mapping", str(mapping), "--dry-run", cwd=tmp_path)
    assert result.returncode == 2
    assert "interaction.channel.value: unknown channel 'WWW'" in result.stderr

    missing = converge("import", str(path), "--mapping", "nope", "--json", cwd=tmp_path)
    assert missing.returncode == 2
    assert "cdnow_purchases" in json.loads(missing.stdout)["details"][0]

    usage = converge("import", str(path), cwd=tmp_path)  # no --mapping
    assert usage.returncode == 2
    assert "--mapping" in usage.stderr


def test_an_unreachable_service_exits_3_naming_its_address(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("customer_id date number_of_cds dollar_value\n1 19970101 1 1.00\n")
    address = f"127.0.0.1:{free_port()}"
    result = converge(
        "import",
        str(path),
        "--mapping",
        "cdnow_purchases",
        "--interactions",
        address,
        "--timeout",
        "1",
        "--json",
        cwd=tmp_path,
    )
    assert result.returncode == 3
    assert f"the interactions service at {address} is unreachable" in result.stderr
    assert json.loads(result.stdout)["exit_code"] == 3


def test_mappings_lists_the_shipped_mappings(tmp_path: Path) -> None:
    result = converge("mappings", "--json", cwd=tmp_path)
    assert result.returncode == 0
    listed = {m["name"]: m for m in json.loads(result.stdout)}
    assert set(listed) == {"telco_customers", "itsm_incidents", "cdnow_purchases"}
    assert listed["telco_customers"]["imports"] == ["profile"]
    assert listed["itsm_incidents"]["imports"] == ["interaction"]


def test_help_loads_neither_lightgbm_mlflow_nor_pandas(tmp_path: Path) -> None:
    """`converge --help` and `converge models --help` answer at once: building
    the parser imports none of the heavy libraries (they took 6-12 s)."""
    probe = (
        "import sys, converge.cli as c; c.build_parser(); "
        "print(','.join(m for m in ('lightgbm', 'mlflow', 'pandas', 'sklearn') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    models_help = converge("models", "--help", cwd=tmp_path)
    assert models_help.returncode == 0
    for command in ("train", "retrain", "compare", "promote", "rollback", "versions"):
        assert command in models_help.stdout
    assert "register_command" not in models_help.stdout  # no developers' notes for users
    assert max(len(line) for line in models_help.stdout.splitlines()) <= 100

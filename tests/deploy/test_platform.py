"""`converge platform` against a recording stand-in for the Kubernetes API.

No API server can run on this machine (no container runtime, no kind or k3s),
so tests/deploy/fake_kubernetes.py answers as one would and records what the
official `kubernetes` client sends; the assertions are on those requests:
the exact restart patch, the exact Job made from the CronJob, the label
selectors, and how a failed rollout or Job ends the command.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest

from converge.cli import main
from converge.platform import (
    connect,
    follow_job,
    rollout,
    start_retrain_job,
)
from converge.runtime.server import ServiceContext, ServiceRuntime, ServiceSpec
from converge.runtime.settings import ServiceSettings
from tests.deploy.fake_kubernetes import FakeKubernetes, fake_kubernetes, self_signed_certificate

NS = "converge"
NOW = datetime(2026, 12, 2, 7, 30, 5, tzinfo=UTC)
DEPLOYMENTS = f"/apis/apps/v1/namespaces/{NS}/deployments"
SCORING = f"{DEPLOYMENTS}/prod-converge-scoring"
CRONJOBS = f"/apis/batch/v1/namespaces/{NS}/cronjobs"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PODS = f"/api/v1/namespaces/{NS}/pods"
SELECTOR_SCORING = (
    "app.kubernetes.io/part-of=converge,app.kubernetes.io/instance=prod,"
    "app.kubernetes.io/component=scoring"
)


def labels(component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "converge",
        "app.kubernetes.io/instance": "prod",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "converge",
    }


def deployment(
    component: str, *, hot_swap: str | None = None, generation: int = 1, **state: Any
) -> dict[str, Any]:
    annotations = {} if hot_swap is None else {"converge.io/model-hot-swap": hot_swap}
    selector = {k: v for k, v in labels(component).items() if k != "app.kubernetes.io/part-of"}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": f"prod-converge-{component}",
            "namespace": NS,
            "labels": labels(component),
            "annotations": annotations,
            "generation": generation,
        },
        "spec": {"replicas": 3, "selector": {"matchLabels": selector}},
        "status": {"observedGeneration": generation, **state},
    }


def listing(*items: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "List", "apiVersion": "v1", "metadata": {}, "items": list(items)}


@pytest.fixture
def fake() -> Iterator[FakeKubernetes]:
    with fake_kubernetes() as server:
        yield server


@pytest.fixture
def kubeconfig(fake: FakeKubernetes, tmp_path: Path) -> Path:
    return fake.kubeconfig(tmp_path)


def no_sleep(_: float) -> None:
    """Polls advance through the recorded answers, not through time."""


# --- credentials ---------------------------------------------------------------------
def test_kubeconfig_credentials_and_namespace_are_used(
    fake: FakeKubernetes, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    cluster = connect(str(kubeconfig))
    assert cluster.namespace == NS  # the context's namespace
    fake.on("GET", DEPLOYMENTS, (200, listing()))
    cluster.call(cluster.apps.list_namespaced_deployment, NS)
    assert fake.requests[-1].authorization == "Bearer test-token"


def test_in_cluster_credentials_are_used_inside_a_pod(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside a pod: the ServiceAccount's token and CA, the API at
    KUBERNETES_SERVICE_HOST over HTTPS, the pod's namespace; no kubeconfig."""
    from kubernetes.config import incluster_config

    import converge.platform

    certificate, key = self_signed_certificate(tmp_path)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text("pod-token")
    (account / "namespace").write_text(NS)
    monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(account / "token"))
    monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(certificate))
    monkeypatch.setattr(converge.platform, "SERVICE_ACCOUNT_NAMESPACE", account / "namespace")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with fake_kubernetes(tls=(certificate, key)) as fake:
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", fake.url.rsplit(":", 1)[1])
        fake.on("GET", DEPLOYMENTS, (200, listing()))
        cluster = connect()
        assert cluster.namespace == NS
        cluster.call(cluster.apps.list_namespaced_deployment, NS)
        assert (fake.requests[-1].authorization or "").lower() == "bearer pod-token"


# --- rollout -------------------------------------------------------------------------
def test_rollout_patches_the_pod_template_and_waits_for_every_replica(
    fake: FakeKubernetes, kubeconfig: Path
) -> None:
    fake.on("GET", DEPLOYMENTS, (200, listing(deployment("scoring", hot_swap="false"))))
    fake.on("PATCH", SCORING, (200, deployment("scoring", generation=2)))
    fake.on(
        "GET",
        SCORING,
        [
            (200, deployment("scoring", generation=2, observedGeneration=1)),
            (200, deployment("scoring", generation=2, replicas=4, updatedReplicas=1)),
            (
                200,
                deployment(
                    "scoring", generation=2, replicas=3, updatedReplicas=3, availableReplicas=2
                ),
            ),
            (
                200,
                deployment(
                    "scoring", generation=2, replicas=3, updatedReplicas=3, availableReplicas=3
                ),
            ),
        ],
    )
    seen: list[str] = []
    result = rollout(
        connect(str(kubeconfig)),
        "scoring",
        "prod",
        reason="promote churn v4",
        now=lambda: NOW,
        sleep=no_sleep,
        progress=seen.append,
    )
    assert result.restarted and result.deployment == "prod-converge-scoring"
    (listed,) = fake.sent("GET", DEPLOYMENTS)
    assert listed.query["labelSelector"] == [SELECTOR_SCORING]
    (patch,) = fake.sent("PATCH", SCORING)
    assert patch.content_type == "application/strategic-merge-patch+json"
    assert patch.body == {
        "spec": {
            "template": {
                "metadata": {
                    "annotations": {
                        "kubectl.kubernetes.io/restartedAt": "2026-12-02T07:30:05Z",
                        "converge.io/restart-reason": "promote churn v4",
                    }
                }
            }
        }
    }
    assert seen == [
        "waiting for the controller to see the change",
        "1 of 3 replicas updated",
        "2 of 3 updated replicas available",
        "3 of 3 replicas updated and available",
    ]


def test_rollout_is_skipped_when_replicas_swap_models_themselves(
    fake: FakeKubernetes, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.on("GET", DEPLOYMENTS, (200, listing(deployment("scoring", hot_swap="true"))))
    code = main(
        ["platform", "rollout", "scoring", "--kubeconfig", str(kubeconfig), "--release", "prod"]
    )
    assert code == 0
    assert not fake.sent("PATCH", SCORING)
    assert "hot swap is on" in capsys.readouterr().out


def test_a_failed_rollout_exits_1_naming_the_reason(
    fake: FakeKubernetes, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.on("GET", DEPLOYMENTS, (200, listing(deployment("scoring", hot_swap="false"))))
    fake.on("PATCH", SCORING, (200, deployment("scoring", generation=2)))
    stuck = deployment(
        "scoring",
        generation=2,
        replicas=4,
        updatedReplicas=1,
        conditions=[
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "prod-converge-scoring-7d9" has timed out progressing.',
            }
        ],
    )
    fake.on("GET", SCORING, (200, stuck))
    code = main(
        ["platform", "rollout", "scoring", "--kubeconfig", str(kubeconfig), "--release", "prod"]
    )
    assert code == 1
    error = capsys.readouterr().err
    assert "rollout of prod-converge-scoring failed" in error and "timed out progressing" in error
    (patch,) = fake.sent("PATCH", SCORING)
    assert (
        patch.body["spec"]["template"]["metadata"]["annotations"]["converge.io/restart-reason"]
        == "promote"
    )


def test_no_scoring_deployment_exits_4_and_access_refused_exits_3(
    fake: FakeKubernetes, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.on("GET", DEPLOYMENTS, (200, listing()))
    assert main(["platform", "rollout", "scoring", "--kubeconfig", str(kubeconfig)]) == 4
    assert "no scoring deployment in namespace 'converge'" in capsys.readouterr().err
    fake.on("GET", DEPLOYMENTS, (403, {"kind": "Status", "reason": "Forbidden", "code": 403}))
    assert main(["platform", "rollout", "scoring", "--kubeconfig", str(kubeconfig)]) == 3


# --- retraining Job ------------------------------------------------------------------
CRONJOB = {
    "apiVersion": "batch/v1",
    "kind": "CronJob",
    "metadata": {
        "name": "prod-converge-retraining",
        "namespace": NS,
        "uid": "5b1f-cron-uid",
        "labels": labels("retraining"),
    },
    "spec": {
        "schedule": "0 3 * * 0",
        "jobTemplate": {
            "metadata": {"labels": labels("retraining")},
            "spec": {
                "backoffLimit": 1,
                "template": {
                    "metadata": {"labels": labels("retraining")},
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "retrain",
                                "image": "ghcr.io/converge/converge-models:0.1.0",
                                "command": [
                                    "python",
                                    "-m",
                                    "converge.models",
                                    "retrain",
                                    "--from-services",
                                ],
                            }
                        ],
                    },
                },
            },
        },
    },
}
JOB_NAME = "prod-converge-retraining-manual-20261202073005"


def pod(phase: str, name: str = "retrain-abc12") -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": "2026-12-02T07:30:06Z",
            "labels": {"job-name": JOB_NAME},
        },
        "status": {"phase": phase},
    }


def job(condition: str | None) -> dict[str, Any]:
    conditions = [] if condition is None else [{"type": condition, "status": "True"}]
    return {"metadata": {"name": JOB_NAME}, "status": {"conditions": conditions}}


def test_retrain_job_is_the_cronjobs_template_started_by_hand_and_followed(
    fake: FakeKubernetes, kubeconfig: Path
) -> None:
    fake.on("GET", CRONJOBS, (200, listing(CRONJOB)))
    fake.on("POST", JOBS, lambda request: (201, request.body))
    fake.on(
        "GET",
        PODS,
        [(200, listing()), (200, listing(pod("Pending"))), (200, listing(pod("Running")))],
    )
    fake.on(
        "GET", f"{PODS}/retrain-abc12/log", (200, "training churn\nchurn v4 registered, promoted\n")
    )
    fake.on(
        "GET", f"{JOBS}/{JOB_NAME}", [(200, job(None)), (200, job(None)), (200, job("Complete"))]
    )
    cluster = connect(str(kubeconfig))
    created = start_retrain_job(cluster, "prod", now=lambda: NOW)
    (post,) = fake.sent("POST", JOBS)
    assert post.body == {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": JOB_NAME,
            "namespace": NS,
            "labels": labels("retraining"),
            "annotations": {"cronjob.kubernetes.io/instantiate": "manual"},
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "CronJob",
                    "name": "prod-converge-retraining",
                    "uid": "5b1f-cron-uid",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": CRONJOB["spec"]["jobTemplate"]["spec"],  # type: ignore[index]
    }
    assert created["metadata"]["name"] == JOB_NAME
    out = io.StringIO()
    assert follow_job(cluster, JOB_NAME, out, poll_s=0, sleep=no_sleep) is True
    assert out.getvalue() == (
        "retrain-abc12 | training churn\nretrain-abc12 | churn v4 registered, promoted\n"
    )
    (log,) = fake.sent("GET", f"{PODS}/retrain-abc12/log")
    assert log.query["follow"] == ["true"]
    assert {r.query["labelSelector"][0] for r in fake.sent("GET", PODS)} == {f"job-name={JOB_NAME}"}


def test_a_failed_retrain_job_exits_1(
    fake: FakeKubernetes, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake.on("GET", CRONJOBS, (200, listing(CRONJOB)))
    fake.on(
        "POST",
        JOBS,
        lambda request: (
            201,
            {**request.body, "metadata": {**request.body["metadata"], "name": JOB_NAME}},
        ),
    )
    fake.on("GET", PODS, (200, listing(pod("Failed"))))
    fake.on("GET", f"{PODS}/retrain-abc12/log", (200, "not enough labelled examples\n"))
    fake.on("GET", f"{JOBS}/{JOB_NAME}", (200, job("Failed")))
    code = main(["platform", "retrain-job", "--kubeconfig", str(kubeconfig), "--release", "prod"])
    assert code == 1
    captured = capsys.readouterr()
    assert "retrain-abc12 | not enough labelled examples" in captured.out
    assert f"job {JOB_NAME} failed" in captured.err


# --- status --------------------------------------------------------------------------
def test_status_shows_pods_ready_per_component_and_model_versions(
    fake: FakeKubernetes, kubeconfig: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    versions = json.dumps({"converge-churn": "4", "converge-escalation": "2"})
    scoring_pods = [
        {
            "metadata": {
                "name": f"prod-converge-scoring-{i}",
                "labels": labels("scoring"),
                "annotations": {"converge.io/model-versions": versions} if i else {},
            },
            "status": {
                "phase": "Running",
                "containerStatuses": [{"ready": bool(i), "restartCount": i}],
            },
        }
        for i in range(2)
    ]
    fake.on(
        "GET",
        DEPLOYMENTS,
        (
            200,
            listing(
                deployment("identity", readyReplicas=3, updatedReplicas=3),
                deployment("scoring", readyReplicas=1, updatedReplicas=2),
            ),
        ),
    )
    fake.on("GET", PODS, (200, listing(*scoring_pods)))
    code = main(["platform", "status", "--kubeconfig", str(kubeconfig), "--json"])
    assert code == 0
    shown = json.loads(capsys.readouterr().out)
    assert [(c["component"], c["ready"], c["desired"]) for c in shown] == [
        ("identity", 3, 3),
        ("scoring", 1, 3),
    ]
    scoring = shown[1]["pods"]
    assert scoring[0]["model_versions"] is None and scoring[0]["ready"] is False
    assert scoring[1]["model_versions"] == {"converge-churn": "4", "converge-escalation": "2"}
    (listed,) = fake.sent("GET", DEPLOYMENTS)
    assert listed.query["labelSelector"] == ["app.kubernetes.io/part-of=converge"]
    assert main(["platform", "status", "--kubeconfig", str(kubeconfig)]) == 0
    table = capsys.readouterr().out
    assert "converge-churn v4" in table and "not reported" in table


# --- health (what `helm test` runs) ----------------------------------------------------
async def _no_services(server: Any, context: ServiceContext) -> list[str]:
    return []


async def test_health_command_passes_only_when_every_address_serves(
    database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import asyncio

    spec = ServiceSpec("healthy", files("tests.runtime") / "empty_migrations", _no_services)
    runtime = ServiceRuntime(spec, ServiceSettings(database_url=database, port=0))
    await runtime.start()
    try:
        code = await asyncio.to_thread(main, ["platform", "health", runtime.address])
        assert code == 0, capsys.readouterr()
        assert f"{runtime.address}: SERVING" in capsys.readouterr().out
        closed = "127.0.0.1:1"  # nothing listens on port 1
        code = await asyncio.to_thread(
            main, ["platform", "health", runtime.address, closed, "--timeout", "2"]
        )
        assert code == 1
        lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
        assert lines[runtime.address] == "SERVING"
        assert lines[closed].startswith(("UNAVAILABLE", "DEADLINE_EXCEEDED")), lines
    finally:
        await runtime.stop(grace=0)

"""charts/converge rendered by Helm's own engine (the helm-python-sdk wheel
binds Helm's Go SDK; no helm binary, no cluster), linted by Helm, and every
manifest validated strictly against the schemas of a current Kubernetes."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from converge.demo import SERVICES
from converge.identity.settings import IdentitySettings
from converge.interactions.settings import InteractionsSettings
from converge.models.registry import tracking_uri_default
from converge.recommendation.settings import RecommendationSettings
from converge.runtime.settings import ServiceSettings
from converge.scoring.settings import ScoringSettings
from tests.conftest import ROOT

CHART = ROOT / "charts" / "converge"
VALUES = Path(__file__).parent / "values"
KUBERNETES = latest_version()
RELEASE = "prod"
NAMESPACE = "converge"
REQUIRED = {"database": {"existingSecret": "converge-database"}}
VALUE_SETS = {
    "default": REQUIRED,
    **{path.stem: yaml.safe_load(path.read_text()) for path in sorted(VALUES.glob("*.yaml"))},
}
PORTS = {service.name: (service.port, service.metrics_port) for service in SERVICES}
SETTINGS: dict[str, type[ServiceSettings]] = {
    "identity": IdentitySettings,
    "interactions": InteractionsSettings,
    "scoring": ScoringSettings,
    "recommendation": RecommendationSettings,
}
# Custom resources: not in Kubernetes' own schemas, checked by shape below.
CUSTOM_KINDS = {"ServiceMonitor"}


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)
    manifests = []
    for path, text in rendered.items():
        if path.endswith("NOTES.txt"):
            continue
        manifests.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return manifests


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def value_set(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any], list[dict[str, Any]]]:
    values = VALUE_SETS[request.param]
    return request.param, values, render(values)


def of_kind(manifests: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [m for m in manifests if m["kind"] == kind]


def by_component(manifests: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m for m in of_kind(manifests, kind)
    }


def pod_specs(manifests: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for m in manifests:
        name = f"{m['kind']}/{m['metadata']['name']}"
        if m["kind"] in {"Deployment", "StatefulSet", "Job"}:
            yield name, m["spec"]["template"]["spec"]
        elif m["kind"] == "CronJob":
            yield name, m["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif m["kind"] == "Pod":
            yield name, m["spec"]


def enabled_services(values: dict[str, Any]) -> list[str]:
    defaults = {"identity": True, "interactions": True, "scoring": True, "recommendation": True}
    return [n for n, on in defaults.items() if values.get(n, {}).get("enabled", on)]


# --- Helm's lint and Kubernetes' schemas ------------------------------------------
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_is_clean(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_every_manifest_validates_strictly_against_kubernetes(value_set: Any) -> None:
    _, _, manifests = value_set
    assert manifests
    for manifest in manifests:
        if manifest["kind"] in CUSTOM_KINDS:
            continue
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


def test_service_monitors_select_the_metrics_port(value_set: Any) -> None:
    _, values, manifests = value_set
    monitors = by_component(manifests, "ServiceMonitor")
    wanted = values.get("serviceMonitor", {}).get("enabled", False)
    assert sorted(monitors) == (sorted(enabled_services(values)) if wanted else [])
    services = by_component(manifests, "Service")
    for component, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["spec"]["selector"]["matchLabels"].items() <= (
            services[component]["metadata"]["labels"].items()
        )
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


# --- services: ports, probes, settings ---------------------------------------------
def test_each_enabled_service_has_its_full_set_of_resources(value_set: Any) -> None:
    _, values, manifests = value_set
    services = enabled_services(values)
    assert sorted(by_component(manifests, "Deployment")) == sorted(
        [*services, *(["mlflow"] if values.get("mlflow", {}).get("enabled", True) else [])]
    )
    for kind in ("ConfigMap", "ServiceAccount"):
        assert set(services) <= set(by_component(manifests, kind)), kind
    autoscaled = [
        s for s in services if values.get(s, {}).get("autoscaling", {}).get("enabled", True)
    ]
    assert sorted(by_component(manifests, "HorizontalPodAutoscaler")) == sorted(autoscaled)
    deployments = by_component(manifests, "Deployment")
    for service in services:
        has_replicas = "replicas" in deployments[service]["spec"]
        assert has_replicas == (service not in autoscaled), "HPA owns replicas, or the chart does"


def test_ports_probes_and_config_match_the_services_settings(value_set: Any) -> None:
    _, values, manifests = value_set
    deployments = by_component(manifests, "Deployment")
    services = by_component(manifests, "Service")
    configs = by_component(manifests, "ConfigMap")
    for name in enabled_services(values):
        grpc_port, metrics_port = PORTS[name]
        if name in SETTINGS:  # the settings class exists: its default is the truth
            assert SETTINGS[name].model_fields["port"].default == grpc_port
        container = deployments[name]["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", f"converge.{name}", "serve"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"grpc": grpc_port, "metrics": metrics_port}
        assert container["readinessProbe"]["grpc"] == {"port": grpc_port}
        assert container["livenessProbe"]["grpc"] == {"port": grpc_port, "service": "liveness"}
        assert container["startupProbe"]["grpc"]["port"] == grpc_port
        service = services[name]
        assert service["spec"]["clusterIP"] == "None", "headless: clients balance calls"
        assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
        data = configs[name]["data"]
        prefix = f"CONVERGE_{name.upper()}_"
        assert data[f"{prefix}PORT"] == str(grpc_port)
        assert data[f"{prefix}METRICS_PORT"] == str(metrics_port)


def test_each_configmap_is_settings_its_service_accepts(
    value_set: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Settings refuse unknown variables: a wrong key would stop every pod."""
    _, values, manifests = value_set
    configs = by_component(manifests, "ConfigMap")
    for name, settings_class in SETTINGS.items():
        if name not in configs:
            continue
        for variable in [v for v in os.environ if v.startswith("CONVERGE_")]:
            monkeypatch.delenv(variable)
        for key, value in configs[name]["data"].items():
            monkeypatch.setenv(key, value)
        monkeypatch.setenv("DATABASE_URL", "postgresql://from-the-secret/converge")
        settings = settings_class()
        assert settings.host == "0.0.0.0"
        assert settings.migrate_on_start is bool(values.get("postgresql", {}).get("enabled"))
        if isinstance(settings, ScoringSettings):  # the registry scoring's app resolves
            registry = settings.tracking_uri or tracking_uri_default(settings.data_dir)
            assert (
                registry == f"http://{RELEASE}-converge-mlflow.{NAMESPACE}.svc.cluster.local:5000"
            )


def test_services_call_each_other_through_dns_round_robin_targets(value_set: Any) -> None:
    _, values, manifests = value_set
    configs = by_component(manifests, "ConfigMap")
    if "interactions" in configs:
        target = configs["interactions"]["data"]["CONVERGE_INTERACTIONS_IDENTITY_ADDRESS"]
        assert target == f"dns:///{RELEASE}-converge-identity.{NAMESPACE}.svc.cluster.local:50051"
    if "identity" in configs:
        peers = json.loads(configs["identity"]["data"]["CONVERGE_IDENTITY_PEER_SERVICES"])
        assert sorted(peers) == sorted(set(enabled_services(values)) - {"identity"})
        for peer, address in peers.items():
            assert address.startswith(f"dns:///{RELEASE}-converge-{peer}.")


# --- security ----------------------------------------------------------------------
def test_every_pod_runs_restricted(value_set: Any) -> None:
    _, _, manifests = value_set
    for name, spec in pod_specs(manifests):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["readOnlyRootFilesystem"] is True, name
            assert context["capabilities"] == {"drop": ["ALL"]}, name
            assert "resources" in container and container["resources"]["limits"], name
            assert ":latest" not in container["image"] and ":" in container["image"], name


def test_no_secret_value_appears_in_any_manifest(value_set: Any) -> None:
    _, values, manifests = value_set
    assert not of_kind(manifests, "Secret"), "the chart renders no Secret: credentials stay out"
    text = yaml.safe_dump_all(manifests)
    assert "postgresql://" not in text and "password:" not in text.lower()
    secret = values["database"]["existingSecret"]
    for name, spec in pod_specs(manifests):
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            for env in container.get("env", []):
                if env["name"] in {
                    "DATABASE_URL",
                    "MLFLOW_BACKEND_STORE_URI",
                    "POSTGRES_PASSWORD",
                }:
                    assert "value" not in env, f"{name}: {env['name']} in plain text"
                    assert env["valueFrom"]["secretKeyRef"]["name"] == secret
                if env["name"] == "CONVERGE_RECOMMENDATION_WEBHOOK_SECRETS":
                    assert "value" not in env, f"{name}: the webhook secrets in plain text"
                    assert env["valueFrom"]["secretKeyRef"] == {
                        "name": values["webhookSecrets"]["existingSecret"],
                        "key": values["webhookSecrets"].get("key", "webhook-secrets"),
                    }
    for config in of_kind(manifests, "ConfigMap"):
        assert "WEBHOOK_SECRETS" not in " ".join(config["data"]), "secrets stay out of ConfigMaps"


# --- labels and selectors ----------------------------------------------------------
def test_selectors_match_the_labels_of_the_pods_they_mean(value_set: Any) -> None:
    _, _, manifests = value_set
    workloads = {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m["spec"]["template"]["metadata"][
            "labels"
        ]
        for m in manifests
        if m["kind"] in {"Deployment", "StatefulSet"}
    }
    for kind in ("Deployment", "StatefulSet"):
        for m in of_kind(manifests, kind):
            assert m["spec"]["selector"]["matchLabels"].items() <= (
                m["spec"]["template"]["metadata"]["labels"].items()
            )
    for kind in ("Service", "PodDisruptionBudget", "NetworkPolicy"):
        for m in of_kind(manifests, kind):
            component = m["metadata"]["labels"]["app.kubernetes.io/component"]
            selector = m["spec"]["selector"] if kind == "Service" else None
            if kind == "PodDisruptionBudget":
                selector = m["spec"]["selector"]["matchLabels"]
            if kind == "NetworkPolicy":
                selector = m["spec"]["podSelector"]["matchLabels"]
            assert selector and selector.items() <= workloads[component].items(), m["metadata"]
            others = [c for c, labels in workloads.items() if c != component]
            assert not any(selector.items() <= workloads[c].items() for c in others)
    for hpa in of_kind(manifests, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        assert target["name"] in {m["metadata"]["name"] for m in of_kind(manifests, "Deployment")}
    for m in manifests:
        labels = m["metadata"]["labels"]
        for key in ("name", "instance", "component", "version", "managed-by", "part-of"):
            assert f"app.kubernetes.io/{key}" in labels, (m["kind"], m["metadata"]["name"], key)


def test_network_policies_admit_only_the_intended_callers(value_set: Any) -> None:
    _, values, manifests = value_set
    policies = by_component(manifests, "NetworkPolicy")
    if not values.get("networkPolicy", {}).get("enabled", True):
        assert not policies
        return
    for name in enabled_services(values):
        grpc_rule = next(
            r for r in policies[name]["spec"]["ingress"] if r["ports"][0]["port"] == "grpc"
        )
        own = grpc_rule["from"][0]["podSelector"]
        assert own["matchLabels"]["app.kubernetes.io/instance"] == RELEASE
        callers = set(own["matchExpressions"][0]["values"])
        assert name not in callers and "test" in callers
        extra = grpc_rule["from"][1:]
        assert extra == values.get(name, {}).get("allowedClients", [])
    assert "identity" in set(
        policies["interactions"]["spec"]["ingress"][0]["from"][0]["podSelector"][
            "matchExpressions"
        ][0]["values"]
    ), "identity asks interactions to erase and export"
    if values.get("postgresql", {}).get("enabled"):
        callers = policies["postgresql"]["spec"]["ingress"][0]["from"][0]["podSelector"][
            "matchExpressions"
        ][0]["values"]
        assert "migrations" in callers and "retraining" not in callers


# --- hooks, jobs, tests --------------------------------------------------------------
def hooks(manifests: list[dict[str, Any]]) -> list[tuple[int, str, str, dict[str, str]]]:
    found = []
    for m in manifests:
        annotations = m["metadata"].get("annotations", {})
        if "helm.sh/hook" in annotations:
            found.append(
                (
                    int(annotations.get("helm.sh/hook-weight", "0")),
                    m["kind"],
                    m["metadata"]["name"],
                    annotations,
                )
            )
    return sorted(found, key=lambda h: h[0])


def test_migrations_run_once_per_service_in_order_before_pods_start(value_set: Any) -> None:
    _, values, manifests = value_set
    migration_hooks = [h for h in hooks(manifests) if h[3]["helm.sh/hook"] != "test"]
    if values.get("postgresql", {}).get("enabled"):
        assert not migration_hooks, "no database before install: services migrate at start"
        return
    kinds = [kind for _, kind, _, _ in migration_hooks]
    assert kinds[0] == "ServiceAccount" and set(kinds[1:]) == {"Job"}
    weights = [weight for weight, *_ in migration_hooks]
    assert weights == sorted(set(weights)), "each hook its own weight, in order"
    assert weights[0] < weights[1]
    jobs = [name for _, kind, name, _ in migration_hooks if kind == "Job"]
    services = enabled_services(values)
    assert jobs == [f"{RELEASE}-converge-migrate-{s}" for s in services], "start order"
    for _, _, _, hook_annotations in migration_hooks:
        assert hook_annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    for job in of_kind(manifests, "Job"):
        service = job["metadata"]["name"].rsplit("-", 1)[1]
        container = job["spec"]["template"]["spec"]["containers"][0]
        assert container["command"] == ["python", "-m", f"converge.{service}", "migrate"]
        assert job["metadata"]["annotations"]["helm.sh/hook-delete-policy"] == (
            "before-hook-creation,hook-succeeded"
        ), "a failed migration stays for its logs"


def test_helm_test_checks_every_enabled_service_over_grpc(value_set: Any) -> None:
    _, values, manifests = value_set
    (pod,) = of_kind(manifests, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    command = pod["spec"]["containers"][0]["command"]
    assert command[:3] == ["converge", "platform", "health"]
    assert command[3:] == [
        f"{RELEASE}-converge-{s}.{NAMESPACE}.svc.cluster.local:{PORTS[s][0]}"
        for s in enabled_services(values)
    ]


def test_retraining_cronjob_runs_converge_models_retrain(value_set: Any) -> None:
    _, values, manifests = value_set
    cronjobs = of_kind(manifests, "CronJob")
    if not values.get("retraining", {}).get("enabled", True):
        assert not cronjobs
        return
    (cronjob,) = cronjobs
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    container = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:5] == [
        "python",
        "-m",
        "converge.models",
        "retrain",
        "--from-services",
    ]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"].startswith(f"http://{RELEASE}-converge-mlflow.")
    assert env["CONVERGE_IDENTITY_ADDRESS"].startswith("dns:///")


def test_mlflow_keeps_its_registry_in_postgresql_and_artifacts_on_a_volume_or_s3(
    value_set: Any,
) -> None:
    _, values, manifests = value_set
    deployment = by_component(manifests, "Deployment")["mlflow"]
    args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--backend-store-uri=$(MLFLOW_BACKEND_STORE_URI)" in args
    (hosts,) = [a.split("=", 1)[1].split(",") for a in args if a.startswith("--allowed-hosts=")]
    # In-cluster clients send the Service's name as Host; MLflow refuses names it does not allow.
    assert f"{RELEASE}-converge-mlflow.*" in hosts and "localhost:*" in hosts
    assert set(values.get("mlflow", {}).get("allowedHosts", [])) <= set(hosts)
    bucket = values.get("mlflow", {}).get("artifacts", {}).get("s3", {}).get("bucket")
    claims = of_kind(manifests, "PersistentVolumeClaim")
    if bucket:
        assert f"--artifacts-destination=s3://{bucket}" in args and not claims
    else:
        assert "--artifacts-destination=/mlartifacts" in args and len(claims) == 1


def test_scoring_deployment_says_whether_it_swaps_models_itself() -> None:
    manifests = render(VALUE_SETS["everything-on"])
    scoring = by_component(manifests, "Deployment")["scoring"]
    assert scoring["metadata"]["annotations"]["converge.io/model-hot-swap"] == "false"


# --- wrong values ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({**REQUIRED, "identity": {"replicas": -1}}, "/identity/replicas"),
        ({"identity": {"replicas": 2}}, "/database/existingSecret"),
        ({**REQUIRED, "identiy": {"replicas": 2}}, "identiy"),
        ({**REQUIRED, "scoring": {"port": 70000}}, "/scoring/port"),
        ({**REQUIRED, "interactions": {"autoscaling": {"maxReplicas": 0}}}, "maxReplicas"),
        ({**REQUIRED, "mlflow": {"workers": "two"}}, "/mlflow/workers"),
        ({**REQUIRED, "identity": {"setings": {}}}, "setings"),
    ],
)
def test_wrong_values_are_refused_naming_the_value(values: dict[str, Any], named: str) -> None:
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmError, match=named):
            chart.validate_schema(values)
        with pytest.raises(helm.HelmError, match=named):
            chart.render(values=values, name=RELEASE, namespace=NAMESPACE)


# --- scoring: on by default, wired to its peers and to the release's MLflow ----------
def grpc_callers(policy: dict[str, Any]) -> set[str]:
    """Components of this release the policy admits to the gRPC port."""
    rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "grpc")
    return set(rule["from"][0]["podSelector"]["matchExpressions"][0]["values"])


def http_callers(policy: dict[str, Any]) -> set[str]:
    return set(
        policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"]
    )


def test_scoring_runs_by_default_with_its_peers_and_the_releases_mlflow() -> None:
    manifests = render(REQUIRED)
    data = by_component(manifests, "ConfigMap")["scoring"]["data"]
    suffix = f"{NAMESPACE}.svc.cluster.local"
    assert data["CONVERGE_SCORING_INTERACTIONS_ADDRESS"] == (
        f"dns:///{RELEASE}-converge-interactions.{suffix}:50052"
    )
    assert data["CONVERGE_SCORING_IDENTITY_ADDRESS"] == (
        f"dns:///{RELEASE}-converge-identity.{suffix}:50051"
    )
    assert data["MLFLOW_TRACKING_URI"] == f"http://{RELEASE}-converge-mlflow.{suffix}:5000"
    # The runtime sizes its predict threads from the CPU quota: no fixed count here,
    # and a CPU limit for it to read.
    assert "CONVERGE_SCORING_CPU_WORKERS" not in data
    deployment = by_component(manifests, "Deployment")["scoring"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/converge/converge-scoring:0.1.0"
    assert container["resources"]["requests"]["cpu"] == "1"
    assert container["resources"]["limits"]["cpu"] == "2"
    assert "CONVERGE_SCORING_CPU_WORKERS" not in {e["name"] for e in container["env"]}
    assert deployment["metadata"]["annotations"]["converge.io/model-hot-swap"] == "true"
    peers = json.loads(
        by_component(manifests, "ConfigMap")["identity"]["data"]["CONVERGE_IDENTITY_PEER_SERVICES"]
    )
    assert peers["scoring"] == f"dns:///{RELEASE}-converge-scoring.{suffix}:50053", (
        "identity erases and exports with scoring's prediction log"
    )
    assert peers["recommendation"] == f"dns:///{RELEASE}-converge-recommendation.{suffix}:50054"


@pytest.mark.parametrize("name", ["default", "everything-on"])
def test_network_policies_let_scoring_reach_its_peers_and_identity_reach_scoring(
    name: str,
) -> None:
    policies = by_component(render(VALUE_SETS[name]), "NetworkPolicy")
    for callee in ("interactions", "identity"):
        assert "scoring" in grpc_callers(policies[callee]), f"scoring -> {callee}"
    assert "scoring" in http_callers(policies["mlflow"]), "scoring -> mlflow (the registry)"
    assert "identity" in grpc_callers(policies["scoring"]), "identity -> scoring (erase, export)"
    assert "recommendation" in grpc_callers(policies["scoring"])
    if name == "everything-on":
        assert "scoring" in http_callers(policies["postgresql"])


def test_a_scoring_migration_job_runs_after_identity_and_interactions() -> None:
    manifests = render(REQUIRED)
    jobs = {
        m["metadata"]["name"]: m
        for m in of_kind(manifests, "Job")
        if m["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    }
    job = jobs[f"{RELEASE}-converge-migrate-scoring"]
    weight = int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    for earlier in ("identity", "interactions"):
        other = jobs[f"{RELEASE}-converge-migrate-{earlier}"]
        assert int(other["metadata"]["annotations"]["helm.sh/hook-weight"]) < weight
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["python", "-m", "converge.scoring", "migrate"]
    assert container["image"] == "ghcr.io/converge/converge-scoring:0.1.0"


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_the_startup_probe_waits_for_scoring_to_load_its_models(name: str) -> None:
    """Scoring opens its port after the registry read and the model loads (imports
    alone take about 10 s): its startup probe allows minutes, not the two of the
    other services, and readiness then follows the server's health."""
    values = VALUE_SETS[name]
    deployments = by_component(render(values), "Deployment")
    budgets = {}
    for service in enabled_services(values):
        container = deployments[service]["spec"]["template"]["spec"]["containers"][0]
        probe = container["startupProbe"]
        budgets[service] = probe["periodSeconds"] * probe["failureThreshold"]
        assert container["readinessProbe"]["grpc"] == {"port": PORTS[service][0]}
    if "scoring" in budgets:
        assert budgets["scoring"] >= 300
        assert budgets["scoring"] > max(b for s, b in budgets.items() if s != "scoring")
    assert budgets["identity"] == 120


def test_the_startup_budget_is_a_value_of_each_service() -> None:
    values = {**REQUIRED, "scoring": {"startupTimeoutSeconds": 601}}
    container = by_component(render(values), "Deployment")["scoring"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 601
    assert probe["periodSeconds"] * (probe["failureThreshold"] - 1) < 601


def test_scoring_disabled_renders_nothing_of_it() -> None:
    manifests = render(VALUE_SETS["scoring-off"])
    text = yaml.safe_dump_all(manifests)
    assert "scoring" not in text, [
        f"{m['kind']}/{m['metadata']['name']}" for m in manifests if "scoring" in yaml.safe_dump(m)
    ]
    configs = by_component(manifests, "ConfigMap")
    peers = json.loads(configs["identity"]["data"]["CONVERGE_IDENTITY_PEER_SERVICES"])
    assert sorted(peers) == ["interactions"]


def test_scoring_takes_a_registry_or_peer_named_in_its_settings() -> None:
    values = {
        **REQUIRED,
        "mlflow": {"enabled": False},
        "interactions": {"enabled": False},
        "scoring": {
            "settings": {
                "tracking_uri": "https://mlflow.example.com",
                "identity_address": "",
                "interactions_address": "interactions.shared.example.com:443",
            }
        },
        "recommendation": {"enabled": False},
    }
    data = by_component(render(values), "ConfigMap")["scoring"]["data"]
    assert data["CONVERGE_SCORING_INTERACTIONS_ADDRESS"] == "interactions.shared.example.com:443"
    with helm.Chart.load(CHART) as chart:
        text = chart.render(values=values, name=RELEASE, namespace=NAMESPACE)[
            "converge/templates/configmap.yaml"
        ]
    for key in ("INTERACTIONS_ADDRESS", "IDENTITY_ADDRESS"):  # (YAML keeps the last of two)
        assert text.count(f"CONVERGE_SCORING_{key}:") == 1, key
    assert data["CONVERGE_SCORING_TRACKING_URI"] == "https://mlflow.example.com"
    assert "MLFLOW_TRACKING_URI" not in data
    assert data["CONVERGE_SCORING_IDENTITY_ADDRESS"] == "", "the setting, not the chart's target"


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({**REQUIRED, "mlflow": {"enabled": False}}, "scoring.settings.tracking_uri"),
        ({**REQUIRED, "interactions": {"enabled": False}}, "scoring.settings.interactions_address"),
    ],
)
def test_scoring_without_a_registry_or_interactions_is_refused(
    values: dict[str, Any], named: str
) -> None:
    with pytest.raises(helm.HelmError, match=named):
        render(values)


# --- recommendation: on by default, wired to its peers, webhook secrets from a Secret --
def test_recommendation_runs_by_default_wired_to_identity_interactions_and_scoring() -> None:
    manifests = render(REQUIRED)
    suffix = f"{NAMESPACE}.svc.cluster.local"
    data = by_component(manifests, "ConfigMap")["recommendation"]["data"]
    for peer, port in (("identity", 50051), ("interactions", 50052), ("scoring", 50053)):
        assert data[f"CONVERGE_RECOMMENDATION_{peer.upper()}_ADDRESS"] == (
            f"dns:///{RELEASE}-converge-{peer}.{suffix}:{port}"
        )
    deployment = by_component(manifests, "Deployment")["recommendation"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/converge/converge-recommendation:0.1.0"
    assert container["command"] == ["python", "-m", "converge.recommendation", "serve"]
    # No secret store named: no variable, and the service starts with none.
    assert "CONVERGE_RECOMMENDATION_WEBHOOK_SECRETS" not in {e["name"] for e in container["env"]}
    policies = by_component(manifests, "NetworkPolicy")
    for callee in ("identity", "interactions", "scoring"):
        assert "recommendation" in grpc_callers(policies[callee]), f"recommendation -> {callee}"
    assert "identity" in grpc_callers(policies["recommendation"]), "identity -> erase, export"
    jobs = {m["metadata"]["name"] for m in of_kind(manifests, "Job")}
    assert f"{RELEASE}-converge-migrate-recommendation" in jobs


def test_recommendation_reads_its_webhook_secrets_from_the_named_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = {**REQUIRED, "webhookSecrets": {"existingSecret": "converge-webhooks", "key": "hooks"}}
    manifests = render(values)
    container = by_component(manifests, "Deployment")["recommendation"]["spec"]["template"]["spec"][
        "containers"
    ][0]
    (env,) = [e for e in container["env"] if e["name"] == "CONVERGE_RECOMMENDATION_WEBHOOK_SECRETS"]
    assert env == {
        "name": "CONVERGE_RECOMMENDATION_WEBHOOK_SECRETS",
        "valueFrom": {"secretKeyRef": {"name": "converge-webhooks", "key": "hooks"}},
    }
    # What the Secret holds, the service accepts (and the ConfigMap beside it).
    for variable in [v for v in os.environ if v.startswith("CONVERGE_")]:
        monkeypatch.delenv(variable)
    for key, value in by_component(manifests, "ConfigMap")["recommendation"]["data"].items():
        monkeypatch.setenv(key, value)
    secret = "whsec_" + base64.b64encode(bytes(range(32))).decode()
    monkeypatch.setenv(env["name"], json.dumps({"crm": [secret]}))
    settings = RecommendationSettings()
    assert [s.get_secret_value() for s in settings.webhook_secrets["crm"]] == [secret]


@pytest.mark.parametrize("peer", ["identity", "interactions", "scoring"])
def test_recommendation_without_a_peer_is_refused_unless_named_in_its_settings(peer: str) -> None:
    values: dict[str, Any] = {**REQUIRED, peer: {"enabled": False}}
    if peer == "interactions":  # (scoring needs interactions too)
        values["scoring"] = {"settings": {"interactions_address": "dns:///elsewhere:50052"}}
    with pytest.raises(Exception, match=f"recommendation.settings.{peer}_address"):
        render(values)
    values["recommendation"] = {"settings": {f"{peer}_address": "dns:///elsewhere:1"}}
    data = by_component(render(values), "ConfigMap")["recommendation"]["data"]
    assert data[f"CONVERGE_RECOMMENDATION_{peer.upper()}_ADDRESS"] == "dns:///elsewhere:1"

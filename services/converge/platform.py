"""`converge platform`: Converge on Kubernetes, through the official client.

    converge platform status [--release R] [--json]
    converge platform rollout scoring [--force] [--timeout S]
    converge platform retrain-job [--timeout S]
    converge platform health ADDRESS...

`status` shows each component's pods (ready of desired) and, for scoring, the
model versions each replica serves, as its pods report them in the
annotation `converge.io/model-versions` (a JSON object, prediction to
version). `rollout scoring` is what follows `converge models promote`: it
restarts the scoring Deployment only when the release says replicas do not
swap models themselves (the chart's `modelHotSwap`, on the Deployment as
`converge.io/model-hot-swap`), waits for the rollout and reports it.
`retrain-job` starts a Job from the retraining CronJob's template now (as
`kubectl create job --from=cronjob/...` does) and follows it to the end with
its logs. `health` asks each address's grpc.health.v1 (what `helm test` runs).

Components are found by their labels (app.kubernetes.io/part-of=converge,
instance=<release>, component=<name>), not by names, so any release name
works. Credentials: inside a pod its ServiceAccount (in-cluster), elsewhere
the kubeconfig (--kubeconfig, $KUBECONFIG, ~/.kube/config) and --context.

Exit codes: 0 done; 1 the rollout, the Job or a health check failed; 2 usage;
3 the cluster (or a service) unreachable or access refused; 4 not found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from converge.cli import Subparsers

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4

PART_OF = "app.kubernetes.io/part-of=converge"
HOT_SWAP_ANNOTATION = "converge.io/model-hot-swap"
MODEL_VERSIONS_ANNOTATION = "converge.io/model-versions"
RESTARTED_AT_ANNOTATION = "kubectl.kubernetes.io/restartedAt"
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


class PlatformError(Exception):
    """A failure with its exit code and a message for people."""

    exit_code = EXIT_FAILED


class NotFound(PlatformError):
    exit_code = EXIT_NOT_FOUND


class Ambiguous(PlatformError):
    exit_code = EXIT_USAGE


class Unreachable(PlatformError):
    exit_code = EXIT_UNREACHABLE


# --- the cluster ---------------------------------------------------------------------
class Cluster:
    """The Kubernetes API for one namespace, answering plain JSON documents.

    Documents are read as the server sent them (`_preload_content=False`), not
    through the client's typed models, so fields newer than the client
    survive a read-modify-create such as a Job made from a CronJob.
    """

    def __init__(self, api_client: Any, namespace: str) -> None:
        from kubernetes import client

        self.api_client = api_client
        self.namespace = namespace
        self.apps = client.AppsV1Api(api_client)
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)

    def call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        try:
            response = method(*args, _preload_content=False, **kwargs)
        except ApiException as error:
            if error.status == 404:
                raise NotFound(f"not found: {error.reason} ({method.__name__})") from error
            if error.status in (401, 403):
                raise Unreachable(
                    f"the cluster refused access ({error.status} {error.reason}); check the "
                    "credentials and their RBAC rights"
                ) from error
            raise PlatformError(f"the API answered {error.status} {error.reason}") from error
        except HTTPError as error:
            raise Unreachable(f"cannot reach the Kubernetes API: {error}") from error
        document: dict[str, Any] = json.loads(response.data)
        return document

    def find(self, kind: str, component: str, release: str | None) -> dict[str, Any]:
        """The one `kind` (deployments, cronjobs) of `component` in the release."""
        listing = {
            "deployments": self.apps.list_namespaced_deployment,
            "cronjobs": self.batch.list_namespaced_cron_job,
        }[kind]
        selector = _selector(release, component)
        items = self.call(listing, self.namespace, label_selector=selector)["items"]
        if not items:
            raise NotFound(
                f"no {component} {kind[:-1]} in namespace {self.namespace!r}"
                + (f" for release {release!r}" if release else "")
            )
        if len(items) > 1:
            releases = sorted(
                i["metadata"]["labels"].get("app.kubernetes.io/instance", "?") for i in items
            )
            raise Ambiguous(f"several releases have a {component}: {releases}; pass --release")
        found: dict[str, Any] = items[0]
        return found


def _selector(release: str | None, component: str | None = None) -> str:
    parts = [PART_OF]
    if release:
        parts.append(f"app.kubernetes.io/instance={release}")
    if component:
        parts.append(f"app.kubernetes.io/component={component}")
    return ",".join(parts)


def connect(
    kubeconfig: str | None = None, context: str | None = None, namespace: str | None = None
) -> Cluster:
    """In a pod (and no kubeconfig named), its ServiceAccount; else the kubeconfig."""
    from kubernetes import client, config
    from kubernetes.config.config_exception import ConfigException

    try:
        if kubeconfig is None and context is None and "KUBERNETES_SERVICE_HOST" in os.environ:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
            if namespace is None and SERVICE_ACCOUNT_NAMESPACE.exists():
                namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        else:
            api_client = config.new_client_from_config(config_file=kubeconfig, context=context)
            if namespace is None:
                _, active = config.list_kube_config_contexts(config_file=kubeconfig)
                chosen = active
                if context is not None:
                    contexts, _ = config.list_kube_config_contexts(config_file=kubeconfig)
                    chosen = next(c for c in contexts if c["name"] == context)
                namespace = chosen.get("context", {}).get("namespace")
    except (ConfigException, OSError, StopIteration) as error:
        raise Unreachable(f"no Kubernetes credentials: {error}") from error
    return Cluster(api_client, namespace or "default")


# --- status --------------------------------------------------------------------------
@dataclass(frozen=True)
class PodStatus:
    name: str
    ready: bool
    phase: str
    restarts: int
    model_versions: dict[str, str] | None  # scoring pods only, as they report them


@dataclass(frozen=True)
class ComponentStatus:
    component: str
    desired: int
    ready: int
    updated: int
    pods: list[PodStatus] = field(default_factory=list)


def _pod_status(pod: dict[str, Any]) -> PodStatus:
    statuses = pod.get("status", {}).get("containerStatuses", [])
    versions = None
    raw = pod["metadata"].get("annotations", {}).get(MODEL_VERSIONS_ANNOTATION)
    if raw is not None:
        try:
            parsed = json.loads(raw)
            versions = {str(k): str(v) for k, v in parsed.items()}
        except (ValueError, AttributeError):
            versions = {"?": raw}
    return PodStatus(
        name=pod["metadata"]["name"],
        ready=bool(statuses) and all(s.get("ready") for s in statuses),
        phase=pod.get("status", {}).get("phase", "Unknown"),
        restarts=sum(s.get("restartCount", 0) for s in statuses),
        model_versions=versions,
    )


def status(cluster: Cluster, release: str | None) -> list[ComponentStatus]:
    """Each Deployment of the release with its pods, in name order."""
    selector = _selector(release)
    deployments = cluster.call(
        cluster.apps.list_namespaced_deployment, cluster.namespace, label_selector=selector
    )["items"]
    pods = cluster.call(
        cluster.core.list_namespaced_pod, cluster.namespace, label_selector=selector
    )["items"]
    found = []
    for deployment in sorted(deployments, key=lambda d: d["metadata"]["name"]):
        component = deployment["metadata"]["labels"].get("app.kubernetes.io/component", "?")
        wanted = deployment["spec"]["selector"]["matchLabels"]
        own = [
            _pod_status(p)
            for p in pods
            if wanted.items() <= p["metadata"].get("labels", {}).items()
            and p.get("status", {}).get("phase") != "Succeeded"
        ]
        state = deployment.get("status", {})
        found.append(
            ComponentStatus(
                component=component,
                desired=deployment["spec"].get("replicas", 1),
                ready=state.get("readyReplicas", 0),
                updated=state.get("updatedReplicas", 0),
                pods=sorted(own, key=lambda p: p.name),
            )
        )
    return found


# --- rollout -------------------------------------------------------------------------
@dataclass(frozen=True)
class RolloutResult:
    deployment: str
    restarted: bool
    detail: str


def restart_patch(now: datetime, reason: str) -> dict[str, Any]:
    """What `kubectl rollout restart` sends: a new pod-template annotation."""
    return {
        "spec": {
            "template": {
                "metadata": {
                    "annotations": {
                        RESTARTED_AT_ANNOTATION: now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                        "converge.io/restart-reason": reason,
                    }
                }
            }
        }
    }


def _rollout_state(deployment: dict[str, Any]) -> tuple[bool, str]:
    """(done, what is awaited), as `kubectl rollout status` reads it; a rollout
    past its progress deadline raises."""
    spec, state = deployment["spec"], deployment.get("status", {})
    if deployment["metadata"].get("generation", 0) > state.get("observedGeneration", 0):
        return False, "waiting for the controller to see the change"
    for condition in state.get("conditions", []):
        if condition.get("type") == "Progressing" and (
            condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            raise PlatformError(
                f"rollout of {deployment['metadata']['name']} failed: "
                f"{condition.get('message', 'progress deadline exceeded')}"
            )
    desired = spec.get("replicas", 1)
    updated = state.get("updatedReplicas", 0)
    if updated < desired:
        return False, f"{updated} of {desired} replicas updated"
    if state.get("replicas", 0) > updated:
        return False, f"{state.get('replicas', 0) - updated} old replicas terminating"
    available = state.get("availableReplicas", 0)
    if available < updated:
        return False, f"{available} of {updated} updated replicas available"
    return True, f"{updated} of {desired} replicas updated and available"


def rollout(
    cluster: Cluster,
    component: str,
    release: str | None,
    *,
    reason: str,
    force: bool = False,
    timeout_s: float = 600.0,
    poll_s: float = 2.0,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    progress: Callable[[str], None] = lambda _: None,
) -> RolloutResult:
    """Restarts `component`'s Deployment unless its replicas swap models
    themselves (and `force` is off), then waits until every replica is new."""
    deployment = cluster.find("deployments", component, release)
    name = deployment["metadata"]["name"]
    hot_swap = deployment["metadata"].get("annotations", {}).get(HOT_SWAP_ANNOTATION)
    if hot_swap == "true" and not force:
        return RolloutResult(
            name, False, "hot swap is on: replicas load the new champion themselves"
        )
    cluster.call(
        cluster.apps.patch_namespaced_deployment,
        name,
        cluster.namespace,
        restart_patch(now(), reason),
        _content_type=STRATEGIC_MERGE_PATCH,
    )
    deadline = clock() + timeout_s
    while True:
        current = cluster.call(cluster.apps.read_namespaced_deployment, name, cluster.namespace)
        done, detail = _rollout_state(current)
        progress(detail)
        if done:
            return RolloutResult(name, True, detail)
        if clock() > deadline:
            raise PlatformError(f"rollout of {name} not done within {timeout_s:.0f} s: {detail}")
        sleep(poll_s)


# --- retraining Job ------------------------------------------------------------------
def job_from_cronjob(cronjob: dict[str, Any], now: datetime) -> dict[str, Any]:
    """The Job `kubectl create job --from=cronjob/NAME` makes: the CronJob's
    template, marked as started by hand and owned by the CronJob."""
    template = cronjob["spec"]["jobTemplate"]
    meta = cronjob["metadata"]
    suffix = "-manual-" + now.astimezone(UTC).strftime("%Y%m%d%H%M%S")
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": meta["name"][: 63 - len(suffix)].rstrip("-") + suffix,
            "namespace": meta["namespace"],
            "labels": dict(template.get("metadata", {}).get("labels", {})),
            "annotations": {
                **template.get("metadata", {}).get("annotations", {}),
                "cronjob.kubernetes.io/instantiate": "manual",
            },
            "ownerReferences": [
                {
                    "apiVersion": "batch/v1",
                    "kind": "CronJob",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": template["spec"],
    }


def _job_outcome(job: dict[str, Any]) -> str | None:
    for condition in job.get("status", {}).get("conditions", []):
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return str(condition["type"])
    return None


def start_retrain_job(
    cluster: Cluster, release: str | None, now: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> dict[str, Any]:
    cronjob = cluster.find("cronjobs", "retraining", release)
    body = job_from_cronjob(cronjob, now())
    return cluster.call(cluster.batch.create_namespaced_job, cluster.namespace, body)


def follow_job(
    cluster: Cluster,
    name: str,
    out: IO[str],
    *,
    timeout_s: float = 6 * 3600.0,
    poll_s: float = 2.0,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Streams each pod's log as it starts, until the Job completes (True) or fails."""
    followed: set[str] = set()
    deadline = clock() + timeout_s
    while True:
        pods = cluster.call(
            cluster.core.list_namespaced_pod, cluster.namespace, label_selector=f"job-name={name}"
        )["items"]
        for pod in sorted(pods, key=lambda p: p["metadata"].get("creationTimestamp", "")):
            pod_name = pod["metadata"]["name"]
            if pod_name in followed or pod.get("status", {}).get("phase", "Pending") == "Pending":
                continue
            followed.add(pod_name)
            _stream_log(cluster, pod_name, out)
        job = cluster.call(cluster.batch.read_namespaced_job, name, cluster.namespace)
        outcome = _job_outcome(job)
        if outcome is not None:
            return outcome == "Complete"
        if clock() > deadline:
            raise PlatformError(f"job {name} not finished within {timeout_s:.0f} s")
        sleep(poll_s)


def _stream_log(cluster: Cluster, pod: str, out: IO[str]) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        response = cluster.core.read_namespaced_pod_log(
            pod, cluster.namespace, follow=True, _preload_content=False
        )
    except ApiException as error:  # the pod went away: its Job's status tells the rest
        out.write(f"[no log for {pod}: {error.status} {error.reason}]\n")
        return
    pending = b""
    for chunk in response.stream(8192):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            out.write(f"{pod} | {line.decode(errors='replace')}\n")
    if pending:
        out.write(f"{pod} | {pending.decode(errors='replace')}\n")
    out.flush()


# --- health --------------------------------------------------------------------------
def check_health(addresses: Iterable[str], timeout_s: float) -> list[tuple[str, str]]:
    """Each address's grpc.health.v1 status for the whole server ("")."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from converge.runtime import channels

    answers = []
    for address in addresses:
        with channels.channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
                answers.append(
                    (address, health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
                )
            except grpc.RpcError as error:
                answers.append((address, f"{error.code().name}: {error.details()}"))
    return answers


# --- the commands --------------------------------------------------------------------
def _cluster(args: argparse.Namespace) -> Cluster:
    return connect(args.kubeconfig, args.context, args.namespace)


def _run_status(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    components = status(_cluster(args), args.release)
    if args.json:
        print(json.dumps([asdict(c) for c in components], indent=2, sort_keys=True))
        return EXIT_OK
    console = Console()
    if not components:
        console.print("No Converge Deployment found (check --namespace and --release).")
        return EXIT_NOT_FOUND
    table = Table(title="Converge on Kubernetes", box=box.SIMPLE)
    for column in ("component", "ready", "updated", "pods"):
        table.add_column(column)
    for c in components:
        pods = ", ".join(
            f"{p.name} ({'ready' if p.ready else p.phase.lower()}"
            + (f", {p.restarts} restarts" if p.restarts else "")
            + ")"
            for p in c.pods
        )
        style = None if c.ready >= c.desired else "yellow"
        table.add_row(c.component, f"{c.ready}/{c.desired}", str(c.updated), pods, style=style)
    console.print(table)
    scoring = [c for c in components if c.component == "scoring"]
    if not scoring:
        console.print("Model versions: no scoring Deployment in this release (it serves them).")
    for c in scoring:
        models = Table(title="Models each scoring replica serves", box=box.SIMPLE)
        models.add_column("pod")
        models.add_column("versions")
        for p in c.pods:
            versions = (
                ", ".join(f"{k} v{v}" for k, v in sorted(p.model_versions.items()))
                if p.model_versions
                else "not reported"
            )
            models.add_row(p.name, versions)
        console.print(models)
    return EXIT_OK


def _run_rollout(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    result = rollout(
        _cluster(args),
        args.component,
        args.release,
        reason=args.reason,
        force=args.force,
        timeout_s=args.timeout,
        progress=lambda detail: console.print(f"  {detail}", highlight=False),
    )
    verb = "rolled out" if result.restarted else "not restarted"
    console.print(f"[green]{result.deployment} {verb}:[/] {result.detail}", highlight=False)
    return EXIT_OK


def _run_retrain_job(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    cluster = _cluster(args)
    job = start_retrain_job(cluster, args.release)
    name = job["metadata"]["name"]
    console.print(f"started job {name}; following its logs", highlight=False)
    if args.no_follow:
        return EXIT_OK
    if follow_job(cluster, name, sys.stdout, timeout_s=args.timeout):
        console.print(f"[green]job {name} completed[/]", highlight=False)
        return EXIT_OK
    console.print(f"[red]job {name} failed[/] (kubectl describe job {name})", highlight=False)
    return EXIT_FAILED


def _run_health(args: argparse.Namespace) -> int:
    answers = check_health(args.addresses, args.timeout)
    for address, answer in answers:
        print(f"{address}: {answer}")
    return EXIT_OK if all(answer == "SERVING" for _, answer in answers) else EXIT_FAILED


def _guarded(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def guarded(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except PlatformError as error:
            print(f"converge platform: {error}", file=sys.stderr)
            return error.exit_code
        except ModuleNotFoundError as error:  # an install without the `platform` extra
            print(
                f"converge platform needs {error.name}: pip install 'converge[platform]'",
                file=sys.stderr,
            )
            return EXIT_USAGE

    return guarded


def register(subparsers: Subparsers) -> None:
    """Adds `converge platform ...`; the kubernetes package loads only when one runs."""
    platform = subparsers.add_parser(
        "platform",
        help="operate Converge on Kubernetes: status, rollouts, retraining jobs, health",
        description=(
            "Operate a Converge release with the Kubernetes API: in a pod with its "
            "ServiceAccount, elsewhere with the kubeconfig. Exit codes: 0 done; 1 a rollout, "
            "job or health check failed; 2 usage; 3 cluster unreachable or access refused; "
            "4 not found."
        ),
    )
    commands = platform.add_subparsers(dest="platform_command", metavar="COMMAND", required=True)

    def cluster_options(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-n", "--namespace", help="default: the context's, else 'default'")
        parser.add_argument(
            "--release", help="the Helm release (needed when several share a namespace)"
        )
        parser.add_argument("--kubeconfig", help="default: $KUBECONFIG, else ~/.kube/config")
        parser.add_argument("--context", help="kubeconfig context (default: the current one)")

    show = commands.add_parser("status", help="pods ready per component; model versions served")
    cluster_options(show)
    show.add_argument("--json", action="store_true", help="one JSON document for scripts")
    show.set_defaults(run=_guarded(_run_status))

    roll = commands.add_parser(
        "rollout",
        help="restart a Deployment and wait for it (after `converge models promote`)",
        description=(
            "Restarts the component's Deployment and waits until every replica is new. For "
            "scoring this is what follows a promotion: skipped (exit 0) when the release "
            "runs with model hot swap, unless --force."
        ),
    )
    roll.add_argument(
        "component", choices=("scoring", "recommendation", "identity", "interactions")
    )
    cluster_options(roll)
    roll.add_argument("--force", action="store_true", help="restart even with hot swap on")
    roll.add_argument("--reason", default="promote", help="recorded on the pod template")
    roll.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    roll.set_defaults(run=_guarded(_run_rollout))

    retrain = commands.add_parser(
        "retrain-job",
        help="start the retraining CronJob's Job now and follow its logs",
    )
    cluster_options(retrain)
    retrain.add_argument("--no-follow", action="store_true", help="start it and return")
    retrain.add_argument("--timeout", type=float, default=6 * 3600.0, metavar="SECONDS")
    retrain.set_defaults(run=_guarded(_run_retrain_job))

    health = commands.add_parser(
        "health", help="check each address's grpc.health.v1 (what `helm test` runs)"
    )
    health.add_argument("addresses", nargs="+", metavar="HOST:PORT")
    health.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS")
    health.set_defaults(run=_guarded(_run_health))

"""`python -m converge.demo` (`make demo`): the platform on one machine.

Starts one embedded PostgreSQL (or uses `DATABASE_URL` when set), then every
service that exists so far as a child process with its JSON logs in
`<data dir>/logs/<service>.log`, waits until each answers the gRPC health check
with SERVING, prints what runs where and how to call it, and plays a short
scenario against the identity service: a CRM customer, the same person on the
phone, a web visitor who logs in (two customers merged), consent, a read.

It then serves until Ctrl-C or SIGTERM, or until a service dies, and stops
everything: SIGTERM to each service (SIGKILL after 15 s), then PostgreSQL.
`--once` stops right after the scenario. Exit code 0 when all went well, 1 when
a service could not start or died, a port was taken, or (with `--once`) a
scenario step failed. The demo data is made up.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import grpc
from google.protobuf import field_mask_pb2, timestamp_pb2
from google.rpc import error_details_pb2  # type: ignore[import-untyped]
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from rich import box
from rich.console import Console, Group
from rich.measure import Measurement
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from converge.runtime.embedded_postgres import EmbeddedPostgres
from converge.v1 import (
    common_pb2,
    identity_pb2,
    identity_pb2_grpc,
    interactions_pb2,
    interactions_pb2_grpc,
    predictions_pb2,
    recommendation_pb2,
    recommendation_pb2_grpc,
    scoring_pb2,
    scoring_pb2_grpc,
)


@dataclass(frozen=True)
class DemoService:
    """One service the demo starts: package `converge.<name>`, environment
    prefix `CONVERGE_<NAME>_`, database schema `<name>`."""

    name: str
    port: int
    metrics_port: int
    # Services it calls, given to it as CONVERGE_<NAME>_<NEED>_ADDRESS.
    needs: tuple[str, ...] = ()
    # Services asked to erase and export a customer's data with it, given as
    # CONVERGE_<NAME>_PEER_SERVICES (those the demo runs).
    data_peers: tuple[str, ...] = ()

    @property
    def env_prefix(self) -> str:
        return f"CONVERGE_{self.name.upper()}_"


# Every service of the platform, in start order (a service may call those above
# it). Those without a `converge.<name>.__main__` module yet are skipped.
SERVICES: tuple[DemoService, ...] = (
    DemoService(
        "identity",
        port=50051,
        metrics_port=9151,
        data_peers=("interactions", "scoring", "recommendation"),
    ),
    DemoService("interactions", port=50052, metrics_port=9152, needs=("identity",)),
    DemoService("scoring", port=50053, metrics_port=9153, needs=("identity", "interactions")),
    DemoService(
        "recommendation",
        port=50054,
        metrics_port=9154,
        needs=("identity", "interactions", "scoring"),
    ),
)

HOST = "127.0.0.1"
HEALTH_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 15.0
RPC_TIMEOUT_S = 10.0
# How long the demo waits for an alert to arrive (step 11).
ALERT_WAIT_S = 20.0
LOG_TAIL_LINES = 30
EXIT_OK = 0
EXIT_FAILED = 1


def available_services(port_offset: int = 0) -> list[DemoService]:
    """The services whose package has a `__main__` module, ports shifted by `port_offset`."""
    found = []
    for service in SERVICES:
        service = replace(
            service,
            port=service.port + port_offset,
            metrics_port=service.metrics_port + port_offset,
        )
        try:
            spec = importlib.util.find_spec(f"converge.{service.name}.__main__")
        except ModuleNotFoundError:  # the package itself does not exist yet
            spec = None
        if spec is not None:
            found.append(service)
    return found


def port_in_use(host: str, port: int) -> bool:
    """True when `port` cannot be bound on `host` (as the services will bind it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of a log file, or a note that it is empty or missing."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else f"({path} is empty)"


def describe_exit(code: int) -> str:
    """A child's return code in words."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def show_path(path: Path) -> str:
    """A path relative to the current directory when it is under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def redact_url(url: str) -> str:
    """A database URL with its password hidden, for printing."""
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


@dataclass
class RunningService:
    """A started child process and where it writes."""

    service: DemoService
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]

    @property
    def address(self) -> str:
        return f"{HOST}:{self.service.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{HOST}:{self.service.metrics_port}/metrics"


class Demo:
    """Starts, watches and stops PostgreSQL and the services."""

    def __init__(self, console: Console, data_dir: Path, port_offset: int = 0) -> None:
        self.console = console
        self.data_dir = data_dir.resolve()
        self.log_dir = self.data_dir / "logs"
        self.services = available_services(port_offset)
        self.running: list[RunningService] = []
        self.postgres: EmbeddedPostgres | None = None
        self.database_url = ""
        self.stop_requested = False
        self.stop_signal = ""
        self.failed = False

    # Signals ---------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Ctrl-C and SIGTERM only raise a flag; every wait below checks it, so
        the shutdown always runs to the end (a second Ctrl-C does not cut it short)."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if not self.stop_requested:
            self.stop_requested = True
            self.stop_signal = signal.Signals(signum).name

    def sleep(self, seconds: float) -> bool:
        """Sleeps in short steps; False as soon as a stop is requested."""
        deadline = time.monotonic() + seconds
        while not self.stop_requested:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            time.sleep(min(left, 0.2))
        return False

    # Start -----------------------------------------------------------------

    def check_ports(self) -> bool:
        taken = [
            (service, kind, port)
            for service in self.services
            for kind, port in (("gRPC", service.port), ("metrics", service.metrics_port))
            if port_in_use(HOST, port)
        ]
        for service, kind, port in taken:
            self.failed = True
            self.console.print(
                f"[bold red]Port {port} on {HOST} is already in use[/] (the {service.name} "
                f"{kind} port). Is another `make demo` still running? Stop whatever holds "
                f"port {port} and try again."
            )
        return not taken

    def start_database(self) -> bool:
        external = os.environ.get("DATABASE_URL")
        if external:
            self.database_url = external
            self.console.print("Using the PostgreSQL server named by DATABASE_URL.")
            return True
        self.postgres = EmbeddedPostgres(self.data_dir)
        try:
            with self.console.status(f"Starting PostgreSQL under {self.postgres.pgdata} ..."):
                self.database_url = self.postgres.start()
        except Exception as error:
            self.failed = True
            self.console.print(
                f"[bold red]PostgreSQL did not start:[/] {error!r}. "
                f"Its log: {self.postgres.pgdata / 'log'}"
            )
            return False
        return True

    def child_env(self, service: DemoService) -> dict[str, str]:
        env = dict(os.environ)
        env["DATABASE_URL"] = self.database_url
        env["CONVERGE_DATA_DIR"] = str(self.data_dir)
        env[f"{service.env_prefix}HOST"] = HOST
        env[f"{service.env_prefix}PORT"] = str(service.port)
        env[f"{service.env_prefix}METRICS_PORT"] = str(service.metrics_port)
        ports = {s.name: s.port for s in self.services}
        for need in service.needs:
            env[f"{service.env_prefix}{need.upper()}_ADDRESS"] = f"{HOST}:{ports[need]}"
        if service.data_peers:
            env[f"{service.env_prefix}PEER_SERVICES"] = json.dumps(
                {peer: f"{HOST}:{ports[peer]}" for peer in service.data_peers if peer in ports}
            )
        return env

    def start_service(self, service: DemoService) -> RunningService:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{service.name}.log"
        log_file = log_path.open("wb")
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", f"converge.{service.name}"],
                env=self.child_env(service),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            log_file.close()
            raise
        running = RunningService(service, process, log_path, log_file)
        self.running.append(running)
        return running

    def wait_serving(self, running: RunningService) -> bool:
        """Polls grpc.health.v1 Health/Check until SERVING; False on timeout,
        on the process exiting, or on a stop request."""
        name = running.service.name
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        with (
            self.console.status(f"Waiting for {name} on {running.address} ..."),
            grpc.insecure_channel(running.address) as channel,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            while not self.stop_requested:
                code = running.process.poll()
                if code is not None and not self.stop_requested:
                    self.report_failure(running, f"{name} {describe_exit(code)} while starting")
                    return False
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return True
                except grpc.RpcError:
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    self.report_failure(
                        running, f"{name} did not report SERVING within {HEALTH_TIMEOUT_S:.0f} s"
                    )
                    return False
                self.sleep(0.25)
        return False

    def start_all(self) -> bool:
        if not self.services:
            self.failed = True
            self.console.print("[bold red]No service has a __main__ module yet; nothing to run.")
            return False
        if not self.check_ports() or not self.start_database():
            return False
        for service in self.services:
            if self.stop_requested:
                return False
            running = self.start_service(service)
            if not self.wait_serving(running):
                return False
        return not self.stop_requested

    # Watch -----------------------------------------------------------------

    def report_failure(self, running: RunningService, message: str) -> None:
        self.failed = True
        running.log_file.flush()
        self.console.print(f"[bold red]{message}.[/] Last lines of {running.log_path}:")
        self.console.print(
            log_tail(running.log_path), markup=False, highlight=False, soft_wrap=True
        )

    def first_dead(self) -> RunningService | None:
        for running in self.running:
            if running.process.poll() is not None:
                return running
        return None

    def serve_until_stopped(self) -> int:
        self.console.print("\n[bold]Serving.[/] Press Ctrl-C to stop everything.")
        while self.sleep(0.5):
            dead = self.first_dead()
            if dead is not None and not self.stop_requested:
                how = describe_exit(dead.process.returncode)
                self.report_failure(dead, f"{dead.service.name} stopped unexpectedly ({how})")
                return EXIT_FAILED
        return EXIT_OK

    # Stop ------------------------------------------------------------------

    def stop_all(self) -> None:
        """Stops the services in reverse start order, then PostgreSQL."""
        if self.running or self.postgres is not None:
            reason = f" ({self.stop_signal})" if self.stop_signal else ""
            self.console.print(f"\nStopping everything{reason} ...")
        for running in reversed(self.running):
            self.stop_service(running)
        self.running.clear()
        if self.postgres is not None:
            self.postgres.stop()
            self.console.print("  postgresql stopped")
            self.postgres = None

    def stop_service(self, running: RunningService) -> None:
        process = running.process
        name = running.service.name
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.console.print(
                    f"  [yellow]{name} still running after {STOP_TIMEOUT_S:.0f} s; killing it"
                )
                process.kill()
                process.wait()
        running.log_file.close()
        self.console.print(f"  {name} stopped ({describe_exit(process.returncode)})")

    # Tell ------------------------------------------------------------------

    def print_overview(self) -> None:
        """What runs where: a wide table when the terminal is wide enough,
        otherwise one block per service."""
        rows: list[tuple[str, str, str, str]] = [
            (r.service.name, r.address, r.metrics_url, show_path(r.log_path)) for r in self.running
        ]
        if self.postgres is not None:
            log = show_path(self.postgres.pgdata / "log")
            rows.append(("postgresql", "Unix socket (URL below)", "", log))
        title = "Converge is running"
        wide = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
        for column in ("Service", "Address", "Metrics", "Log"):
            wide.add_column(column, no_wrap=True)
        for row in rows:
            wide.add_row(*row)
        unbounded = self.console.options.update_width(10_000)
        if Measurement.get(self.console, unbounded, wide).maximum <= self.console.width:
            table = wide
        else:
            table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, show_header=False)
            table.add_column(style="bold")
            table.add_column()
            table.add_column(overflow="fold")
            for name, address, metrics, log in rows:
                details = (("address", address), ("metrics", metrics), ("log", log))
                for index, (label, value) in enumerate(d for d in details if d[1]):
                    table.add_row(name if index == 0 else "", label, value)
                table.add_section()
        self.console.print()
        self.console.print(table)
        where = "embedded, stopped with the demo" if self.postgres else "external, DATABASE_URL"
        self.console.print(
            f"PostgreSQL ({where}): {redact_url(self.database_url)}",
            highlight=False,
            soft_wrap=True,
        )
        self.console.print("Each service keeps its data in its own schema, named after it.")

    def print_how_to_call(self, identity: RunningService) -> None:
        snippet = f'''\
import grpc
from converge.v1 import (
    common_pb2,
    identity_pb2,
    identity_pb2_grpc,
    interactions_pb2,
    interactions_pb2_grpc,
)

with grpc.insecure_channel("{identity.address}") as channel:
    identity = identity_pb2_grpc.IdentityServiceStub(channel)
    email = common_pb2.Identifier(
        type=common_pb2.IDENTIFIER_TYPE_EMAIL, value="grace@example.com"
    )
    request = identity_pb2.ResolveRequest(identifiers=[email])
    reply = identity.Resolve(request, timeout=5)
    print(reply.customer.customer_id, "created" if reply.created else "found")
'''
        self.console.print()
        self.console.rule("How to call identity")
        self.console.print("Save as call.py and run .venv/bin/python call.py:")
        self.console.print(Syntax(snippet, "python", theme="ansi_dark", word_wrap=True))
        tips = Table.grid(padding=(0, 2))
        tips.add_column(style="bold", no_wrap=True)
        tips.add_column(overflow="fold")
        tips.add_row("API", "protos/converge/v1/identity.proto and common.proto")
        tips.add_row(
            "Reflection",
            f"on, so tools that read it need no .proto files, e.g. "
            f"grpcurl -plaintext {identity.address} list",
        )
        tips.add_row("Metrics", f"curl -s {identity.metrics_url} | grep grpc_server_handled")
        tips.add_row("Logs", f"tail -f {show_path(identity.log_path)}  (JSON lines)")
        if self.postgres is not None:
            tips.add_row("SQL", f'psql "{self.database_url}"  then  \\dt identity.*')
        tips.add_row("Stop", "Ctrl-C stops every service, then PostgreSQL")
        self.console.print(tips)


# The scenario -----------------------------------------------------------------


def _ident(kind: common_pb2.IdentifierType.ValueType, value: str) -> common_pb2.Identifier:
    return common_pb2.Identifier(type=kind, value=value)


def _enum_label(name: str, prefix: str) -> str:
    return name.removeprefix(prefix).lower()


def _identifier_label(identifier: common_pb2.Identifier) -> str:
    kind = _enum_label(common_pb2.IdentifierType.Name(identifier.type), "IDENTIFIER_TYPE_")
    source = f" ({identifier.source})" if identifier.source else ""
    return f"{kind} {identifier.value}{source}"


def _time(stamp: timestamp_pb2.Timestamp) -> str:
    if stamp.seconds == 0 and stamp.nanos == 0:
        return ""
    return stamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _cursor_order(cursor: str) -> tuple[int, int]:
    """A stream cursor ("xid.seq", or a bare sequence number) as a sortable
    pair; the demo only compares cursors, it never builds one."""
    head, _, tail = (cursor or "0").rpartition(".")
    return int(head or 0), int(tail)


def _now() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.GetCurrentTime()
    return stamp


def _facts(rows: Sequence[tuple[str, str]]) -> Table:
    """A two-column grid of labels and values, skipping empty values."""
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, value in rows:
        if value:
            grid.add_row(label, value)
    return grid


def customer_panel(customer: identity_pb2.Customer, title: str) -> Panel:
    """A customer as people read it: profile, identifiers, consent."""
    profile = customer.profile
    facts = _facts(
        [
            ("customer id", customer.customer_id),
            ("name", profile.display_name),
            ("segment", profile.segment),
            ("plan", profile.plan),
            ("region", profile.region),
            ("owner team", profile.owner_team),
            ("created", _time(customer.created_at)),
            ("merged in", "\n".join(customer.merged_customer_ids)),
        ]
    )

    identifiers = Table(title="Identifiers", title_justify="left", box=box.SIMPLE_HEAD)
    identifiers.add_column("Identifier", overflow="fold")
    identifiers.add_column("Attached at", no_wrap=True)
    identifiers.add_column("Came with customer", overflow="fold")
    for attached in customer.identifiers:
        origin = attached.customer_id
        identifiers.add_row(
            _identifier_label(attached.identifier),
            _time(attached.attached_at),
            origin if origin != customer.customer_id else "",
        )

    preferences = customer.contact_preferences
    consent = Table(title="Consent", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("Channel", "Status", "Source", "Updated at"):
        consent.add_column(column, overflow="fold")
    for item in preferences.consents:
        consent.add_row(
            _enum_label(common_pb2.ContactChannel.Name(item.channel), "CONTACT_CHANNEL_"),
            _enum_label(identity_pb2.ConsentStatus.Name(item.status), "CONSENT_STATUS_"),
            item.source,
            _time(item.updated_at),
        )
    preferred = _enum_label(
        common_pb2.ContactChannel.Name(preferences.preferred_channel), "CONTACT_CHANNEL_"
    )
    wishes = _facts(
        [
            ("wants a human", "yes" if preferences.wants_human else "no"),
            ("do not contact", "yes" if preferences.do_not_contact else "no"),
            ("preferred channel", preferred),
        ]
    )
    return Panel(
        Group(facts, "", identifiers, consent, wishes),
        title=title,
        title_align="left",
        expand=False,
    )


def merge_panel(merge: identity_pb2.MergeRecord) -> Panel:
    """One MergeRecord, field by field."""
    facts = _facts(
        [
            ("merge id", merge.merge_id),
            ("surviving customer", merge.surviving_customer_id),
            ("merged customer", merge.merged_customer_id),
            ("joined by", "\n".join(_identifier_label(i) for i in merge.joining_identifiers)),
            ("policy", merge.policy),
            (
                "actor",
                merge.actor.name + (f" ({merge.actor.reason})" if merge.actor.reason else ""),
            ),
            ("merged at", _time(merge.merged_at)),
        ]
    )
    return Panel(facts, title="MergeRecord", title_align="left", expand=False)


def describe_rpc_error(error: grpc.RpcError) -> str:
    """The status code, message and `google.rpc` details of a failed call."""
    if not isinstance(error, grpc.Call):
        return repr(error)
    lines = [f"{error.code().name}: {error.details()}"]
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            lines += [f"  field {v.field}: {v.description}" for v in bad_request.field_violations]
        elif detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            lines += [f"  {v.type} {v.subject}: {v.description}" for v in failure.violations]
        elif detail.Is(error_details_pb2.RequestInfo.DESCRIPTOR):
            info = error_details_pb2.RequestInfo()
            detail.Unpack(info)
            lines.append(f"  request id {info.request_id}")
    return "\n".join(lines)


# Ofcom's ranges reserved for drama: numbers that look real and belong to no one.
_FICTIONAL_PHONE_PREFIXES = (
    "+44 20 7946 0",
    "+44 113 496 0",
    "+44 117 496 0",
    "+44 118 496 0",
    "+44 121 496 0",
    "+44 131 496 0",
    "+44 141 496 0",
    "+44 151 496 0",
    "+44 161 496 0",
    "+44 191 498 0",
)


def fictional_phone(tag: str) -> str:
    """A fictional UK number picked by `tag`, so runs on a kept database rarely collide."""
    number = int(tag, 16)
    prefix = _FICTIONAL_PHONE_PREFIXES[number % len(_FICTIONAL_PHONE_PREFIXES)]
    return f"{prefix}{number // len(_FICTIONAL_PHONE_PREFIXES) % 1000:03d}"


class Scenario:
    """A short story told against the identity service; each step stands on its
    own (customers are referred to by identifier), so one failing step does not
    stop the others."""

    def __init__(
        self,
        console: Console,
        channel: grpc.Channel,
        demo: Demo,
        interactions_channel: grpc.Channel | None = None,
        scoring_channel: grpc.Channel | None = None,
        recommendation_channel: grpc.Channel | None = None,
    ) -> None:
        self.console = console
        self.identity = identity_pb2_grpc.IdentityServiceStub(channel)
        self.interactions = (
            interactions_pb2_grpc.InteractionsServiceStub(interactions_channel)
            if interactions_channel is not None
            else None
        )
        self.scoring = (
            scoring_pb2_grpc.ScoringServiceStub(scoring_channel)
            if scoring_channel is not None
            else None
        )
        self.recommendation = (
            recommendation_pb2_grpc.RecommendationServiceStub(recommendation_channel)
            if recommendation_channel is not None
            else None
        )
        self.demo = demo
        # A tag per run, so every run tells the whole story on a kept database.
        self.tag = secrets.token_hex(3)
        self.email = _ident(common_pb2.IDENTIFIER_TYPE_EMAIL, f"ada.{self.tag}@example.com")
        self.crm_id = _ident(common_pb2.IDENTIFIER_TYPE_CRM_ID, f"CRM-{self.tag.upper()}")
        self.phone = _ident(common_pb2.IDENTIFIER_TYPE_PHONE, fictional_phone(self.tag))
        self.device = _ident(common_pb2.IDENTIFIER_TYPE_DEVICE_ID, f"web-{self.tag}-7f3a")
        self.failed: list[str] = []
        self._calls = 0

    def metadata(self) -> tuple[tuple[str, str], ...]:
        self._calls += 1
        return (("x-request-id", f"demo-{self.tag}-{self._calls}"),)

    def run(self) -> bool:
        self.console.print()
        self.console.rule(f"A customer's story (run {self.tag})")
        self.console.print(
            f"Each call carries x-request-id demo-{self.tag}-<n>; find them in the identity log."
        )
        steps: list[tuple[str, Callable[[], None]]] = [
            ("1. The CRM knows Ada by email and CRM id", self.crm_import),
            ("2. Ada calls from her phone, giving her email", self.phone_call),
            ("3. A web visitor logs in as Ada: two customers become one", self.web_login),
            ("4. Ada sets her contact preferences", self.consent),
            ("5. Any channel reads Ada, here by her phone number", self.read_back),
        ]
        if self.interactions is not None:
            steps += [
                ("6. A rough week: every channel records what happened", self.record_week),
                ("7. Live features, as the models will see them", self.live_features),
            ]
        if self.interactions is not None and self.scoring is not None:
            steps.append(("8. Scores, and the reasons behind them", self.scores))
        if self.interactions is not None and self.recommendation is not None:
            steps += [
                ("9. Next best actions for Ada, who wants a person", self.recommend_ada),
                ("10. Grace withdraws her consent: the next call honours it", self.recommend_grace),
                ("11. Ada's ticket escalates: support hears of it live", self.alerts_live),
            ]
        for title, step in steps:
            if self.demo.stop_requested:
                break
            self.console.print(f"\n[bold cyan]{title}[/]")
            try:
                step()
            except grpc.RpcError as error:
                self.failed.append(title)
                self.console.print(
                    f"[red]call failed[/] {describe_rpc_error(error)}", highlight=False
                )
        if self.failed:
            self.console.print(f"\n[yellow]{len(self.failed)} step(s) failed; still serving.")
        return not self.failed

    def resolve(
        self,
        identifiers: Sequence[common_pb2.Identifier],
        actor: str,
        profile: identity_pb2.Profile | None = None,
    ) -> identity_pb2.ResolveResponse:
        request = identity_pb2.ResolveRequest(
            identifiers=identifiers,
            profile=profile,
            actor=common_pb2.Actor(name=actor, reason="converge demo"),
        )
        reply: identity_pb2.ResolveResponse = self.identity.Resolve(
            request, timeout=RPC_TIMEOUT_S, metadata=self.metadata()
        )
        verb = "created" if reply.created else "found"
        attached = ", ".join(_identifier_label(i) for i in reply.attached_identifiers)
        self.console.print(
            f"Resolve({', '.join(_identifier_label(i) for i in identifiers)}) -> "
            f"{verb} customer [bold]{reply.customer.customer_id}[/]"
            + (f"; attached {attached}" if attached else ""),
            highlight=False,
        )
        return reply

    def crm_import(self) -> None:
        profile = identity_pb2.Profile(
            display_name="Ada Lovelace",
            segment="enterprise",
            plan="premium",
            region="emea",
            owner_team="accounts-emea",
        )
        reply = self.resolve([self.email, self.crm_id], "crm-import", profile)
        got = reply.customer.profile
        self.console.print(f"profile: segment {got.segment!r}, plan {got.plan!r}", highlight=False)

    def phone_call(self) -> None:
        self.resolve([self.phone, self.email], "ivr")

    def web_login(self) -> None:
        self.console.print("An anonymous visitor browses the pricing page:")
        visitor = self.resolve([self.device], "web")
        self.console.print("Later, on the same device, the visitor logs in with Ada's email:")
        reply = self.resolve([self.email, self.device], "web-login")
        for merge in reply.merges:
            self.console.print(merge_panel(merge))
        if not reply.merges:
            self.console.print(
                f"[yellow]no merge reported[/] (visitor was {visitor.customer.customer_id})"
            )

    def consent(self) -> None:
        now = _now()
        request = identity_pb2.UpdateContactPreferencesRequest(
            customer=common_pb2.CustomerRef(identifier=self.email),
            consents=[
                identity_pb2.ChannelConsent(
                    channel=common_pb2.CONTACT_CHANNEL_EMAIL,
                    status=identity_pb2.CONSENT_STATUS_GRANTED,
                    updated_at=now,
                    source="web-preference-centre",
                ),
                identity_pb2.ChannelConsent(
                    channel=common_pb2.CONTACT_CHANNEL_SMS,
                    status=identity_pb2.CONSENT_STATUS_DENIED,
                    updated_at=now,
                    source="web-preference-centre",
                ),
            ],
            update_mask=field_mask_pb2.FieldMask(paths=["wants_human", "preferred_channel"]),
            preferences=identity_pb2.ContactPreferences(
                wants_human=True, preferred_channel=common_pb2.CONTACT_CHANNEL_EMAIL
            ),
            actor=common_pb2.Actor(name="web-preference-centre", reason="converge demo"),
        )
        reply: identity_pb2.UpdateContactPreferencesResponse = (
            self.identity.UpdateContactPreferences(
                request, timeout=RPC_TIMEOUT_S, metadata=self.metadata()
            )
        )
        preferences = reply.contact_preferences
        self.console.print(
            f"UpdateContactPreferences -> customer {reply.customer_id}: email granted, "
            f"sms denied, wants a human: {preferences.wants_human}",
            highlight=False,
        )

    def read_back(self) -> None:
        request = identity_pb2.GetCustomerRequest(
            customer=common_pb2.CustomerRef(identifier=self.phone)
        )
        reply: identity_pb2.GetCustomerResponse = self.identity.GetCustomer(
            request, timeout=RPC_TIMEOUT_S, metadata=self.metadata()
        )
        title = f"GetCustomer(phone {self.phone.value})"
        self.console.print(customer_panel(reply.customer, title))

    def wait_for_identity_sync(self) -> None:
        """Merges reach the interactions service through identity's event
        stream; wait until it has applied the latest one (normally well under
        a second)."""
        assert self.interactions is not None
        events = self.identity.StreamIdentityEvents(
            identity_pb2.StreamIdentityEventsRequest(), timeout=RPC_TIMEOUT_S
        )
        latest = max((_cursor_order(e.cursor) for e in events), default=(0, 0))
        deadline = time.monotonic() + RPC_TIMEOUT_S
        while time.monotonic() < deadline:
            status = self.interactions.GetIdentitySyncStatus(
                interactions_pb2.GetIdentitySyncStatusRequest(), timeout=RPC_TIMEOUT_S
            )
            if _cursor_order(status.cursor) >= latest:
                return
            time.sleep(0.05)
        self.console.print("[yellow]interactions has not caught up with identity's merges yet")

    def record_week(self) -> None:
        assert self.interactions is not None
        self.wait_for_identity_sync()
        now = datetime.now(UTC)
        ticket = f"INC-{self.tag.upper()}"

        def at(hours_ago: float) -> timestamp_pb2.Timestamp:
            ts = timestamp_pb2.Timestamp()
            ts.FromDatetime(now - timedelta(hours=hours_ago))
            return ts

        week: list[
            tuple[str, int, common_pb2.Identifier, float, dict[str, str | float], dict[str, Any]]
        ] = [
            # At most 144 hours (six days) ago, so it stays inside the 7-day
            # window (today and the six days before) at any time of day.
            ("product.login", common_pb2.CHANNEL_WEB, self.device, 140, {}, {}),
            ("product.login", common_pb2.CHANNEL_MOBILE, self.email, 120, {}, {}),
            (
                "ticket.opened",
                common_pb2.CHANNEL_PHONE,
                self.phone,
                30,
                {"priority": "high", "category": "billing"},
                {"ticket_id": ticket},
            ),
            (
                "conversation.chat",
                common_pb2.CHANNEL_CHAT,
                self.email,
                20,
                {"direction": "inbound"},
                {"ticket_id": ticket, "sentiment": -0.6},
            ),
            (
                "ticket.reassigned",
                common_pb2.CHANNEL_SERVICE_DESK,
                self.crm_id,
                10,
                {"team": "billing-l2"},
                {"ticket_id": ticket},
            ),
            ("survey.nps", common_pb2.CHANNEL_EMAIL, self.email, 2, {"score": 3.0}, {}),
        ]
        for n, (kind, channel, who, hours, attributes, fields) in enumerate(week):
            item = interactions_pb2.InteractionInput(
                customer=common_pb2.CustomerRef(identifier=who),
                occurred_at=at(hours),
                channel=channel,  # type: ignore[arg-type]
                type=kind,
                source="demo",
                attributes={
                    k: common_pb2.AttributeValue(number_value=v)
                    if isinstance(v, float)
                    else common_pb2.AttributeValue(string_value=v)
                    for k, v in attributes.items()
                },
                **fields,  # type: ignore[arg-type]
            )
            self.interactions.RecordInteraction(
                interactions_pb2.RecordInteractionRequest(
                    interaction=item, idempotency_key=f"demo-{self.tag}-{n}"
                ),
                timeout=RPC_TIMEOUT_S,
                metadata=self.metadata(),
            )
            self.console.print(
                f"RecordInteraction({kind} via {common_pb2.Channel.Name(common_pb2.Channel.ValueType(channel))}, "
                f"{_identifier_label(who)})",
                highlight=False,
            )
        timeline = self.interactions.ListInteractions(
            interactions_pb2.ListInteractionsRequest(
                customer=common_pb2.CustomerRef(identifier=self.email)
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=self.metadata(),
        )
        self.console.print(
            f"Ada's timeline, newest first, one customer across {len(week)} records and "
            f"4 identifiers: {', '.join(i.type for i in timeline.interactions)}",
            highlight=False,
        )

    def live_features(self) -> None:
        assert self.interactions is not None
        reply = self.interactions.GetFeatures(
            interactions_pb2.GetFeaturesRequest(
                customers=[common_pb2.CustomerRef(identifier=self.email)],
                include_open_tickets=True,
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=self.metadata(),
        )
        table = Table(title=f"GetFeatures (feature set {reply.feature_set_version})")
        table.add_column("feature")
        table.add_column("value", justify="right")
        vectors = [*reply.customers, *reply.tickets]
        for vector in vectors:
            for name, value in sorted(vector.values.items()):
                if value:
                    table.add_row(name, f"{value:,.2f}")
        self.console.print(table)

    def scores(self) -> None:
        """Churn, escalation of Ada's open ticket and cross-sell, as an agent
        would ask mid-conversation: the trained champions once `converge
        models train` and `promote` ran, the documented rules before."""
        assert self.interactions is not None and self.scoring is not None
        ada = common_pb2.CustomerRef(identifier=self.email)
        features = self.interactions.GetFeatures(
            interactions_pb2.GetFeaturesRequest(customers=[ada], include_open_tickets=True),
            timeout=RPC_TIMEOUT_S,
            metadata=self.metadata(),
        )
        ticket = next((t.ticket_id for t in features.tickets), "")
        answer = self.scoring.Score(
            scoring_pb2.ScoreRequest(
                customer=ada, ticket_id=ticket, candidate_product_ids=["broadband-plus"]
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=self.metadata(),
        )
        table = Table(title="Score (scoring service)")
        for column in ("prediction", "probability", "band", "model", "reasons"):
            table.add_column(column)
        for scored in answer.predictions:
            kind = predictions_pb2.PredictionKind.Name(scored.kind)
            band = predictions_pb2.RiskBand.Name(scored.risk_band)
            table.add_row(
                _enum_label(kind, "PREDICTION_KIND_"),
                f"{scored.probability:.1%}",
                _enum_label(band, "RISK_BAND_"),
                f"{scored.model.name} {scored.model.version}",
                "\n".join(r.text for r in scored.reasons),
            )
        self.console.print(table)
        if any(s.fallback_used for s in answer.predictions):
            self.console.print(
                "Rules answer until models are trained and promoted "
                "(`converge models train`, `converge models promote`); the service "
                "picks them up at its next registry poll."
            )

    def _recommend(
        self, customer: common_pb2.Identifier, channel: int, ticket: str = "", dry_run: bool = False
    ) -> recommendation_pb2.RecommendResponse:
        from converge.recommendation.decisions.cli import print_answer

        assert self.recommendation is not None
        answer: recommendation_pb2.RecommendResponse = self.recommendation.Recommend(
            recommendation_pb2.RecommendRequest(
                customer=common_pb2.CustomerRef(identifier=customer),
                channel=channel,  # type: ignore[arg-type]
                ticket_id=ticket,
                dry_run=dry_run,
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=self.metadata(),
        )
        print_answer(answer, self.console)
        return answer

    def recommend_ada(self) -> None:
        """Ada asked for a person (step 4): the hand-over wins and no automated
        action is offered, whatever else the policy would propose."""
        assert self.interactions is not None
        features = self.interactions.GetFeatures(
            interactions_pb2.GetFeaturesRequest(
                customers=[common_pb2.CustomerRef(identifier=self.email)],
                include_open_tickets=True,
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=self.metadata(),
        )
        ticket = next((t.ticket_id for t in features.tickets), "")
        self.console.print("Ada is in the chat about her open ticket:")
        self._recommend(self.email, common_pb2.CHANNEL_CHAT, ticket)

    def recommend_grace(self) -> None:
        """A second customer at risk of leaving: a retention offer by email,
        until she withdraws her email consent; the very next decision
        withholds it (consent is read from identity on every decision)."""
        assert self.interactions is not None
        grace = _ident(common_pb2.IDENTIFIER_TYPE_EMAIL, f"grace.{self.tag}@example.com")
        self.resolve(
            [grace],
            "crm-import",
            identity_pb2.Profile(display_name="Grace Hopper", segment="smb", plan="basic"),
        )
        self._set_email_consent(grace, identity_pb2.CONSENT_STATUS_GRANTED)
        now = datetime.now(UTC)
        rough = [
            ("payment.failed", 72.0, {}, common_pb2.Money(currency_code="EUR", units=30)),
            ("payment.failed", 200.0, {}, common_pb2.Money(currency_code="EUR", units=30)),
            ("survey.nps", 48.0, {"score": common_pb2.AttributeValue(number_value=2)}, None),
            (
                "complaint",
                24.0,
                {"category": common_pb2.AttributeValue(string_value="billing")},
                None,
            ),
        ]
        for n, (kind, hours, attributes, amount) in enumerate(rough):
            stamp = timestamp_pb2.Timestamp()
            stamp.FromDatetime(now - timedelta(hours=hours))
            self.interactions.RecordInteraction(
                interactions_pb2.RecordInteractionRequest(
                    interaction=interactions_pb2.InteractionInput(
                        customer=common_pb2.CustomerRef(identifier=grace),
                        occurred_at=stamp,
                        channel=common_pb2.CHANNEL_WEB,
                        type=kind,
                        source="demo",
                        attributes=attributes,
                        amount=amount,
                    ),
                    idempotency_key=f"demo-{self.tag}-grace-{n}",
                ),
                timeout=RPC_TIMEOUT_S,
                metadata=self.metadata(),
            )
        self.console.print("What the service would propose for Grace now (a dry run, not logged):")
        self._recommend(grace, common_pb2.CHANNEL_WEB, dry_run=True)
        self._set_email_consent(grace, identity_pb2.CONSENT_STATUS_DENIED)
        self.console.print("Grace withdrew her email consent; the very next call:")
        self._recommend(grace, common_pb2.CHANNEL_WEB)

    def alerts_live(self) -> None:
        """Follows the support teams' and sales' alert streams (as `converge
        alerts tail` does) while Ada's ticket is escalated and reopened: the
        re-scored escalation risk crosses the policy's threshold and the alert
        arrives live, once, with its reasons, at the team the policy routes it
        to (Ada is an enterprise customer: the default policy sends her
        escalations to support_leads). Sales alerts come the same way when a
        cross-sell score crosses its threshold; the demo's rule-based scores
        stay below the default policy's 0.8."""
        import queue
        import threading

        assert self.interactions is not None and self.recommendation is not None
        ticket = f"INC-{self.tag.upper()}"
        teams = ("support", "support_leads", "sales")
        streams = [
            self.recommendation.SubscribeAlerts(
                recommendation_pb2.SubscribeAlertsRequest(team=team, from_now=True),
                timeout=ALERT_WAIT_S,
                metadata=self.metadata(),
            )
            for team in teams
        ]
        for stream in streams:
            stream.initial_metadata()  # (following from now on)
        arrived: queue.Queue[Any] = queue.Queue()

        def read(stream: Any) -> None:
            with contextlib.suppress(grpc.RpcError):
                for answer in stream:
                    arrived.put(answer.event)

        readers = [threading.Thread(target=read, args=(s,), daemon=True) for s in streams]
        for reader in readers:
            reader.start()
        self.console.print(f"Following the alerts of {', '.join(teams)} from now on.")
        started = time.monotonic()
        for n, kind in enumerate(("ticket.escalated", "ticket.reopened")):
            self.interactions.RecordInteraction(
                interactions_pb2.RecordInteractionRequest(
                    interaction=interactions_pb2.InteractionInput(
                        customer=common_pb2.CustomerRef(identifier=self.phone),
                        occurred_at=_now(),
                        channel=common_pb2.CHANNEL_SERVICE_DESK,
                        type=kind,
                        ticket_id=ticket,
                        source="demo",
                    ),
                    idempotency_key=f"demo-{self.tag}-alert-{n}",
                ),
                timeout=RPC_TIMEOUT_S,
                metadata=self.metadata(),
            )
            self.console.print(f"RecordInteraction({kind}, {ticket})", highlight=False)
        from converge.recommendation.alerts.cli import _print_event

        try:
            while True:
                left = ALERT_WAIT_S - (time.monotonic() - started)
                event = arrived.get(timeout=max(left, 0.01))
                if event.alert.ticket_id == ticket:
                    self.console.print(
                        f"{event.alert.team} received it {time.monotonic() - started:.2f} s "
                        "after the first interaction was sent:"
                    )
                    _print_event(event, self.console)
                    break
        except queue.Empty:
            self.console.print(
                f"[yellow]no alert for {ticket} within {ALERT_WAIT_S:.0f} s[/] (its escalation "
                "score stayed under the policy's threshold)"
            )
        finally:
            for stream in streams:
                stream.cancel()  # type: ignore[no-untyped-call]

    def _set_email_consent(
        self, who: common_pb2.Identifier, status: identity_pb2.ConsentStatus.ValueType
    ) -> None:
        self.identity.UpdateContactPreferences(
            identity_pb2.UpdateContactPreferencesRequest(
                customer=common_pb2.CustomerRef(identifier=who),
                consents=[
                    identity_pb2.ChannelConsent(
                        channel=common_pb2.CONTACT_CHANNEL_EMAIL,
                        status=status,
                        updated_at=_now(),
                        source="web-preference-centre",
                    )
                ],
                actor=common_pb2.Actor(name="web-preference-centre", reason="converge demo"),
            ),
            timeout=RPC_TIMEOUT_S,
            metadata=self.metadata(),
        )
        self.console.print(
            f"UpdateContactPreferences({_identifier_label(who)}): email "
            f"{_enum_label(identity_pb2.ConsentStatus.Name(status), 'CONSENT_STATUS_')}",
            highlight=False,
        )


# Entry point ------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m converge.demo",
        description="Start PostgreSQL and every Converge service, show what runs where, "
        "play a short scenario, and serve until Ctrl-C.",
        epilog="Exit codes: 0 all went well; 1 a port was taken, a service failed to start "
        "or died, or (with --once) a scenario step failed.",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("CONVERGE_DATA_DIR") or "var"),
        help="local state: embedded PostgreSQL, service logs "
        "(default: $CONVERGE_DATA_DIR or ./var)",
    )
    parser.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="add this to every port, to run beside another demo (default: 0)",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="stop everything right after the scenario (for tests)",
    )
    return parser.parse_args(argv)


def run(demo: Demo, once: bool) -> int:
    if not demo.start_all():
        return EXIT_FAILED if demo.failed else EXIT_OK
    demo.print_overview()
    identity = next((r for r in demo.running if r.service.name == "identity"), None)
    scenario_ok = True
    interactions = next((r for r in demo.running if r.service.name == "interactions"), None)
    scoring = next((r for r in demo.running if r.service.name == "scoring"), None)
    recommendation = next((r for r in demo.running if r.service.name == "recommendation"), None)
    if identity is not None:
        demo.print_how_to_call(identity)
        with contextlib.ExitStack() as channels:
            channel = channels.enter_context(grpc.insecure_channel(identity.address))
            interactions_channel = (
                channels.enter_context(grpc.insecure_channel(interactions.address))
                if interactions is not None
                else None
            )
            scoring_channel = (
                channels.enter_context(grpc.insecure_channel(scoring.address))
                if scoring is not None
                else None
            )
            recommendation_channel = (
                channels.enter_context(grpc.insecure_channel(recommendation.address))
                if recommendation is not None
                else None
            )
            scenario_ok = Scenario(
                demo.console,
                channel,
                demo,
                interactions_channel,
                scoring_channel,
                recommendation_channel,
            ).run()
    if once or demo.stop_requested:
        return EXIT_OK if scenario_ok or demo.stop_requested else EXIT_FAILED
    return demo.serve_until_stopped()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # pgserver keeps its lock under the XDG runtime dir and falls back to /tmp
    # when it is unset (CI, containers); the fallback works, the warning is noise.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    console = Console()
    demo = Demo(console, args.data_dir, args.port_offset)
    demo.install_signal_handlers()
    try:
        code = run(demo, args.once)
    finally:
        demo.stop_all()
    console.print("Everything stopped." if code == EXIT_OK else "Stopped, with errors.")
    return code


if __name__ == "__main__":
    sys.exit(main())

"""`converge alerts tail --team support`: shows a team's alerts as they
arrive (SubscribeAlerts), one line each with its reasons, or JSON lines
(`--json`); `--from-cursor` resumes after a cursor it printed. `converge
alerts ack ID`: acknowledges an alert, naming who and why.

Registering the commands imports nothing heavy: gRPC, protobuf and rich are
imported when they run. Exit codes: 0 done (tail: stopped by Ctrl-C), 2 bad
request, 3 the service unreachable, 4 no such alert, 5 the alert's state
does not allow it (resolved or dismissed)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from converge.cli_errors import EXIT_OK, EXIT_USAGE, report_rpc_error

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_RECOMMENDATION = "127.0.0.1:50054"
KINDS = ("churn_risk", "escalation_risk", "cross_sell_moment")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "alerts",
        help="follow a team's alerts as they arrive, acknowledge them",
        description="A team's predicted alerts: `tail` follows them live, `ack` acknowledges one.",
    )
    commands = parser.add_subparsers(dest="alerts_command", metavar="COMMAND", required=True)

    tail = commands.add_parser(
        "tail",
        help="show a team's alerts as they arrive, with reasons (Ctrl-C stops)",
        description=(
            "Follows the team's alert stream from now on (or after --from-cursor), printing "
            "each event: created, updated, status changed. Each line ends with the event's "
            "cursor: pass it as --from-cursor to resume after it."
        ),
    )
    tail.add_argument("--team", required=True, help="the team, as named in the policy")
    tail.add_argument("--from-cursor", default="", metavar="CURSOR", help="resume after it")
    tail.add_argument(
        "--kinds", default="", metavar="K,...", help=f"only these kinds ({', '.join(KINDS)})"
    )
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    _service(tail)
    tail.set_defaults(run=_run_tail)

    ack = commands.add_parser(
        "ack",
        help="acknowledge an alert (stops its escalation)",
        description="Acknowledges the alert ID. Repeating the command is safe.",
    )
    ack.add_argument("alert_id", metavar="ID")
    ack.add_argument("--by", default="", metavar="NAME", help="who acknowledges it")
    ack.add_argument("--reason", default="", help="why, for people; no personal data")
    ack.add_argument("--team", default="", help="act as this team (another team's alert: 4)")
    ack.add_argument("--json", action="store_true", help="print the alert as JSON")
    _service(ack)
    ack.set_defaults(run=_run_ack)


def _service(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recommendation",
        default=DEFAULT_RECOMMENDATION,
        metavar="HOST:PORT",
        help=f"the recommendation service (default {DEFAULT_RECOMMENDATION})",
    )


def _failure(error: Any, address: str, console: Console) -> int:
    return report_rpc_error(error, f"the recommendation service at {address}", console)


def _run_tail(args: argparse.Namespace) -> int:
    import json

    import grpc
    from google.protobuf import json_format
    from rich.console import Console

    from converge.runtime.channels import channel
    from converge.v1 import recommendation_pb2 as pb
    from converge.v1 import recommendation_pb2_grpc

    err, out = Console(stderr=True), Console(highlight=False)
    kinds = [k.strip().lower() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        err.print(f"[red]Unknown kinds:[/] {', '.join(unknown)}; one of {', '.join(KINDS)}")
        return EXIT_USAGE
    request = pb.SubscribeAlertsRequest(
        team=args.team,
        from_cursor=args.from_cursor,
        from_now=not args.from_cursor,
        kinds=[pb.AlertKind.Value(f"ALERT_KIND_{k.upper()}") for k in kinds],
    )
    try:
        with channel(args.recommendation) as connection:
            stub = recommendation_pb2_grpc.RecommendationServiceStub(connection)
            stream = stub.SubscribeAlerts(request)
            stream.initial_metadata()  # (answered once the stream's start is fixed)
            err.print(f"following the alerts of team {args.team} (Ctrl-C stops)")
            for answer in stream:
                if args.json:
                    print(json.dumps(json_format.MessageToDict(answer.event)), flush=True)
                else:
                    _print_event(answer.event, out)
    except grpc.RpcError as error:
        return _failure(error, args.recommendation, err)
    return EXIT_OK


def _print_event(event: Any, console: Console) -> None:
    from converge.v1 import recommendation_pb2 as pb

    alert = event.alert
    what = pb.AlertEventType.Name(event.type).removeprefix("ALERT_EVENT_TYPE_").lower()
    kind = pb.AlertKind.Name(alert.kind).removeprefix("ALERT_KIND_").lower()
    status = pb.AlertStatus.Name(alert.status).removeprefix("ALERT_STATUS_").lower()
    subject = alert.ticket_id or alert.product_id
    at = event.occurred_at.ToDatetime().strftime("%H:%M:%S")
    console.print(
        f"[bold]{at} {what}[/bold] {kind} p={alert.probability:.2f} customer {alert.customer_id}"
        + (f" ({subject})" if subject else "")
        + f" -> {alert.team} \\[{status}]"
        + (f" escalated to {alert.escalated_to_team}" if alert.escalated_to_team else "")
        + f"  alert {alert.alert_id}  cursor {event.cursor}"
    )
    for reason in alert.reasons[:3]:
        console.print(f"    {reason.text or reason.code} ({reason.contribution:+.2f})")


def _run_ack(args: argparse.Namespace) -> int:
    import json

    import grpc
    from google.protobuf import json_format
    from rich.console import Console

    from converge.runtime.channels import channel
    from converge.v1 import common_pb2, recommendation_pb2_grpc
    from converge.v1 import recommendation_pb2 as pb

    err = Console(stderr=True)
    metadata = (("converge-team", args.team),) if args.team else ()
    request = pb.AcknowledgeAlertRequest(
        alert_id=args.alert_id,
        actor=common_pb2.Actor(name=args.by, reason=args.reason),
        idempotency_key=f"cli-ack-{args.alert_id}-{args.by}",
    )
    try:
        with channel(args.recommendation) as connection:
            stub = recommendation_pb2_grpc.RecommendationServiceStub(connection)
            answer = stub.AcknowledgeAlert(request, timeout=10, metadata=metadata)
    except grpc.RpcError as error:
        return _failure(error, args.recommendation, err)
    if args.json:
        print(json.dumps(json_format.MessageToDict(answer.alert), indent=2, sort_keys=True))
    else:
        status = pb.AlertStatus.Name(answer.alert.status).removeprefix("ALERT_STATUS_").lower()
        Console(highlight=False).print(f"alert {answer.alert.alert_id} is {status}")
    return EXIT_OK

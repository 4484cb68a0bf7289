"""`converge recommend CUSTOMER --channel web`: asks the recommendation
service for a customer's next best actions and prints them ranked, with the
actions withheld and every reason, as a table or as JSON (`--json`).

Registering the command imports nothing heavy: gRPC, protobuf and rich are
imported when it runs."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from converge.cli_errors import EXIT_OK, report_rpc_error
from converge.features.definitions import CHANNEL_NAMES

if TYPE_CHECKING:
    from rich.console import Console

DEFAULT_RECOMMENDATION = "127.0.0.1:50054"
# The names people type, lower case: common.proto's Channel (the feature
# package's list, light to import), ContactChannel and recommendation.proto's
# ActionKind. Copies, so that registering the command imports neither
# protobuf nor the policy's pydantic model; tests/test_enum_names.py holds
# them to the protos.
REQUEST_CHANNELS = CHANNEL_NAMES[1:]
CONTACT_CHANNELS = ("email", "sms", "phone", "push", "in_app")
ACTION_KINDS = (
    "retention_offer",
    "proactive_support_call",
    "escalate_to_human",
    "escalate_to_senior_agent",
    "cross_sell_offer",
    "do_nothing",
)


def _names(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        names = [n.strip().lower() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)}; one of {', '.join(allowed)}"
            )
        return names

    return parse


def _context(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    return key, value


def register(subparsers: Any) -> None:
    """`converge recommend CUSTOMER [--channel C] [--ticket T] [--json] ...`."""
    from converge.lookup import parse_ref

    parser = subparsers.add_parser(
        "recommend",
        help="the next best actions for one customer, with the actions withheld and why",
        description=(
            "Ask the recommendation service what to do for one customer now: the actions "
            "ranked by expected value under the active policy and the contact rules, and "
            "the actions withheld with every reason (consent, caps, cool-downs, open "
            "tickets, a wish to talk to a person, control groups, arbitration). CUSTOMER "
            "is a customer id or TYPE:VALUE (email:ada@example.com); it is never created. "
            "Unless --dry-run, the decision is logged and its contacts count against the "
            "customer's caps. Exit codes: 0 answered, 2 bad request, 3 the service "
            "unreachable, 4 no such customer, 5 refused in the service's present state."
        ),
    )
    parser.add_argument("customer", type=parse_ref, metavar="CUSTOMER")
    parser.add_argument(
        "--channel",
        choices=REQUEST_CHANNELS,
        default="web",
        help="where the request comes from (default web)",
    )
    parser.add_argument("--ticket", default="", metavar="T", help="the ticket in hand, if any")
    parser.add_argument(
        "--kinds",
        type=_names(ACTION_KINDS),
        default=[],
        metavar="K,...",
        help="only these kinds of action, comma separated",
    )
    parser.add_argument(
        "--contact-channels",
        type=_names(CONTACT_CHANNELS),
        default=[],
        metavar="C,...",
        help="only contact on these channels, comma separated",
    )
    parser.add_argument(
        "--context",
        type=_context,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a fact about the situation for the policy's rules (repeatable), e.g. intent=cancel",
    )
    parser.add_argument(
        "--max-actions", type=int, default=0, metavar="N", help="actions to return (default 3)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="evaluate without logging or counting contacts"
    )
    parser.add_argument(
        "--recommendation",
        default=DEFAULT_RECOMMENDATION,
        metavar="HOST:PORT",
        help=f"the recommendation service (default {DEFAULT_RECOMMENDATION})",
    )
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="(default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format
    from rich.console import Console

    from converge.runtime.channels import channel
    from converge.v1 import common_pb2, recommendation_pb2, recommendation_pb2_grpc

    err = Console(stderr=True)
    request = recommendation_pb2.RecommendRequest(
        customer=args.customer,
        channel=common_pb2.Channel.Value(f"CHANNEL_{args.channel.upper()}"),
        ticket_id=args.ticket,
        kinds=[recommendation_pb2.ActionKind.Value(f"ACTION_KIND_{k.upper()}") for k in args.kinds],
        contact_channels=[
            common_pb2.ContactChannel.Value(f"CONTACT_CHANNEL_{c.upper()}")
            for c in args.contact_channels
        ],
        context={k: common_pb2.AttributeValue(string_value=v) for k, v in args.context},
        max_actions=args.max_actions,
        dry_run=args.dry_run,
    )
    try:
        with channel(args.recommendation) as connection:
            stub = recommendation_pb2_grpc.RecommendationServiceStub(connection)
            answer = stub.Recommend(request, timeout=args.timeout)
    except grpc.RpcError as error:
        return report_rpc_error(error, f"the recommendation service at {args.recommendation}", err)
    if args.json:
        print(json.dumps(json_format.MessageToDict(answer), indent=2, sort_keys=True))
    else:
        print_answer(answer, Console())
    return EXIT_OK


def _money(money: Any) -> str:
    from converge.runtime.values import money_to_decimal

    return f"{money_to_decimal(money):.2f} {money.currency_code}".strip()


def _name(enum: Any, number: int, prefix: str) -> str:
    return str(enum.Name(number)).removeprefix(prefix).lower() if number else ""


def print_answer(answer: Any, console: Console) -> None:
    """The ranked actions, then the withheld ones with their reasons."""
    from rich import box
    from rich.table import Table

    from converge.v1 import common_pb2, recommendation_pb2

    decided = answer.decision_id or "dry run, not logged"
    ranked = Table(
        title=f"Next best actions for customer {answer.customer_id} "
        f"(policy {answer.policy_version}, decision {decided})",
        box=box.SIMPLE,
    )
    for column in ("#", "action", "kind", "for", "channel", "expected value", "priority", "why"):
        ranked.add_column(column, justify="right" if column in ("#", "expected value") else "left")
    for action in answer.actions:
        ranked.add_row(
            str(action.rank),
            action.action_name,
            _name(recommendation_pb2.ActionKind, action.kind, "ACTION_KIND_"),
            action.product_id or action.offer_id or action.ticket_id,
            _name(common_pb2.ContactChannel, action.contact_channel, "CONTACT_CHANNEL_")
            or "in conversation",
            _money(action.expected_value),
            _name(recommendation_pb2.ActionPriority, action.priority, "ACTION_PRIORITY_"),
            "\n".join(r.text for r in action.reasons[:4]),
        )
    console.print(ranked)
    if not answer.suppressed:
        console.print("Nothing withheld.")
        return
    withheld = Table(title="Withheld", box=box.SIMPLE)
    for column in ("action", "for", "channel", "reasons", "until", "expected value", "detail"):
        withheld.add_column(column, justify="right" if column == "expected value" else "left")
    for item in answer.suppressed:
        withheld.add_row(
            item.action_name,
            item.product_id or item.offer_id or item.ticket_id,
            _name(common_pb2.ContactChannel, item.contact_channel, "CONTACT_CHANNEL_"),
            ", ".join(
                _name(recommendation_pb2.SuppressionReason, r, "SUPPRESSION_REASON_")
                for r in item.reasons
            ),
            item.suppressed_until.ToDatetime().isoformat(timespec="minutes")
            if item.HasField("suppressed_until")
            else "",
            _money(item.expected_value),
            item.detail,
        )
    console.print(withheld)

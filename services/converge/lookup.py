"""`converge customer REF`: one customer as the services hold them, so that
nobody writes Python to look one up.

    converge customer 0b7e...-uuid             by customer id
    converge customer email:ada@example.com    by any identifier (TYPE:VALUE)
    converge customer crm_id:C-1042 --json

Shows the profile, the identifiers (merged customers' included), contact
preferences, the most recent interactions and the live features. It only
reads: an unknown identifier is "not found", never a new customer.

Exit codes: 0 shown; 2 bad usage; 3 a service unreachable; 4 no such customer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from converge.cli_errors import EXIT_OK, report_rpc_error

if TYPE_CHECKING:
    from converge.v1 import common_pb2, identity_pb2, interactions_pb2, predictions_pb2

TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CustomerView:
    """What `converge customer` shows, as the services answered it."""

    customer: identity_pb2.Customer
    timeline: list[interactions_pb2.Interaction]
    features: predictions_pb2.FeatureVector | None


def parse_ref(text: str) -> common_pb2.CustomerRef:
    """A customer id, or TYPE:VALUE for an identifier (`email:ada@example.com`)."""
    from converge.connectors.mapping import identifier_type_names, identifier_type_number
    from converge.v1 import common_pb2

    try:
        return common_pb2.CustomerRef(customer_id=str(uuid.UUID(text)))
    except ValueError:
        pass
    kind, sep, value = text.partition(":")
    number = identifier_type_number(kind) if sep and value else None
    if number is None:
        names = ", ".join(n.lower() for n in identifier_type_names())
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a customer id nor TYPE:VALUE with TYPE one of {names}"
        )
    return common_pb2.CustomerRef(
        identifier=common_pb2.Identifier(
            type=common_pb2.IdentifierType.ValueType(number), value=value
        )
    )


async def fetch(
    ref: common_pb2.CustomerRef, identity: str, interactions: str, recent: int
) -> CustomerView:
    """Reads the customer from identity, then its timeline and live features
    from interactions. Raises grpc.aio.AioRpcError as the services answer."""

    from converge.runtime.channels import aio_channel
    from converge.v1 import (
        common_pb2,
        identity_pb2,
        identity_pb2_grpc,
        interactions_pb2,
        interactions_pb2_grpc,
    )

    async with (
        aio_channel(identity) as identity_channel,
        aio_channel(interactions) as interactions_channel,
    ):
        found = await identity_pb2_grpc.IdentityServiceStub(identity_channel).GetCustomer(
            identity_pb2.GetCustomerRequest(customer=ref), timeout=TIMEOUT_S
        )
        customer = found.customer
        by_id = common_pb2.CustomerRef(customer_id=customer.customer_id)
        stub = interactions_pb2_grpc.InteractionsServiceStub(interactions_channel)
        timeline = await stub.ListInteractions(
            interactions_pb2.ListInteractionsRequest(
                customer=by_id, page=common_pb2.PageRequest(page_size=recent)
            ),
            timeout=TIMEOUT_S,
        )
        features = await stub.GetFeatures(
            interactions_pb2.GetFeaturesRequest(customers=[by_id]), timeout=TIMEOUT_S
        )
    vector = features.customers[0] if features.customers and features.customers[0].found else None
    return CustomerView(customer, list(timeline.interactions), vector)


def as_dict(view: CustomerView) -> dict[str, Any]:
    from google.protobuf import json_format

    return {
        "customer": json_format.MessageToDict(view.customer),
        "recent_interactions": [json_format.MessageToDict(i) for i in view.timeline],
        "features": dict(view.features.values) if view.features is not None else None,
        "feature_set_version": view.features.feature_set_version if view.features else None,
    }


def show(view: CustomerView) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from converge.v1 import common_pb2

    console = Console()
    customer = view.customer
    profile = Table(title=f"Customer {customer.customer_id}", box=box.SIMPLE, show_header=False)
    profile.add_column("field")
    profile.add_column("value")
    p = customer.profile
    for name in ("display_name", "segment", "plan", "region", "owner_team"):
        if getattr(p, name):
            profile.add_row(name, getattr(p, name))
    if p.HasField("signup_date"):
        profile.add_row("signup_date", p.signup_date.ToDatetime().date().isoformat())
    for name, value in sorted(p.attributes.items()):
        profile.add_row(name, str(getattr(value, value.WhichOneof("value") or "string_value")))
    prefs = customer.contact_preferences
    if prefs.do_not_contact or prefs.wants_human:
        profile.add_row("contact", "do not contact" if prefs.do_not_contact else "wants a human")
    console.print(profile)

    identifiers = Table(title="Identifiers", box=box.SIMPLE)
    identifiers.add_column("type")
    identifiers.add_column("value")
    for attached in customer.identifiers:
        kind = common_pb2.IdentifierType.Name(attached.identifier.type)
        identifiers.add_row(
            kind.removeprefix("IDENTIFIER_TYPE_").lower(), attached.identifier.value
        )
    console.print(identifiers)

    timeline = Table(title=f"Recent interactions ({len(view.timeline)})", box=box.SIMPLE)
    for column in ("when (UTC)", "type", "channel", "ticket / product"):
        timeline.add_column(column)
    for item in view.timeline:
        channel = common_pb2.Channel.Name(item.channel).removeprefix("CHANNEL_").lower()
        timeline.add_row(
            item.occurred_at.ToDatetime().strftime("%Y-%m-%d %H:%M"),
            item.type,
            channel,
            item.ticket_id or item.product_id,
        )
    console.print(timeline)

    if view.features is None:
        console.print("No live features yet.")
        return
    features = Table(
        title=f"Live features (set {view.features.feature_set_version}, non-zero)", box=box.SIMPLE
    )
    features.add_column("feature")
    features.add_column("value", justify="right")
    for feature, number in sorted(view.features.values.items()):
        if number:
            features.add_row(feature, f"{number:,.2f}")
    console.print(features)


def _run(args: argparse.Namespace) -> int:
    import grpc
    from rich.console import Console

    err = Console(stderr=True)
    try:
        view = asyncio.run(fetch(args.ref, args.identity, args.interactions, args.recent))
    except grpc.aio.AioRpcError as error:
        called = f"identity at {args.identity} or interactions at {args.interactions}"
        return report_rpc_error(error, called, err, not_found="No such customer")
    if args.json:
        print(json.dumps(as_dict(view), indent=2, sort_keys=True))
    else:
        show(view)
    return EXIT_OK


def register(subparsers: Any) -> None:
    """Adds `converge customer`."""
    from converge.connectors import DEFAULT_IDENTITY, DEFAULT_INTERACTIONS

    parser = subparsers.add_parser(
        "customer",
        help="show one customer: profile, identifiers, recent interactions, live features",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("ref", type=parse_ref, metavar="ID|TYPE:VALUE")
    parser.add_argument("--identity", default=DEFAULT_IDENTITY, metavar="HOST:PORT")
    parser.add_argument("--interactions", default=DEFAULT_INTERACTIONS, metavar="HOST:PORT")
    parser.add_argument(
        "--recent", type=int, default=10, metavar="N", help="interactions shown (default 10)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(run=_run)

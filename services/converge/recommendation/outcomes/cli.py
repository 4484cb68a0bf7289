"""`converge actions report`: per action, offered, followed, outcomes,
conversion in treatment and control, lift with its 95 % interval (Newcombe's
hybrid score), uplift at 30 % and the Qini coefficient.

    converge actions report                         the last 30 days
    converge actions report --since 2026-11-01 --policy-version 3
    converge actions report --since 7d --json

It reads the recommendation service's database (DATABASE_URL, or
--database-url), read only: the report is analytics over the decision log
and the outcomes recorded against it, not a call any client makes.

Exit codes: 0 shown; 2 bad usage; 3 the database unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from converge.recommendation.outcomes.report import ActionReport

EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE = 0, 2, 3
DEFAULT_WINDOW = timedelta(days=30)
_RELATIVE = re.compile(r"^(\d{1,5})([dh])$")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """An ISO 8601 date or time (UTC when it names no zone), or a window back
    from now: "30d", "12h"."""
    now = now or datetime.now(UTC)
    relative = _RELATIVE.match(text)
    if relative:
        amount, unit = int(relative.group(1)), relative.group(2)
        return now - (timedelta(days=amount) if unit == "d" else timedelta(hours=amount))
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 date or time nor a window such as 30d or 12h"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def register(subparsers: Any) -> None:
    """`converge actions report`."""
    actions = subparsers.add_parser(
        "actions", help="what the recommended actions achieved (offered, followed, lift)"
    )
    commands = actions.add_subparsers(dest="actions_command", metavar="COMMAND", required=True)
    report = commands.add_parser(
        "report",
        help="per action: offered, followed, outcomes, lift over the control group",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    report.add_argument(
        "--since",
        type=parse_since,
        default=None,
        help="decisions made from this time (ISO 8601, or 30d, 12h); default the last 30 days",
    )
    report.add_argument("--policy-version", help="only decisions of this policy version")
    report.add_argument("--json", action="store_true", help="print JSON instead of a table")
    report.add_argument(
        "--database-url",
        default=None,
        help="the recommendation service's database; default $DATABASE_URL",
    )
    report.set_defaults(run=run_report)


async def load_report(
    database_url: str, since: datetime, policy_version: str | None
) -> list[ActionReport]:
    import asyncpg

    from converge.recommendation.outcomes.convert import facts_of_body
    from converge.recommendation.outcomes.service import actions_report
    from converge.recommendation.outcomes.store import OutcomeStore
    from converge.runtime.database import create_pool

    pool: asyncpg.Pool = await create_pool(
        database_url, schema="recommendation", application_name="converge-actions-report"
    )
    try:
        return await actions_report(OutcomeStore(pool), facts_of_body, since, policy_version)
    finally:
        await pool.close()


def run_report(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    database_url = args.database_url or os.environ.get("DATABASE_URL")
    if not database_url:
        console.print("[red]No database:[/] set DATABASE_URL or pass --database-url")
        return EXIT_USAGE
    since = args.since or datetime.now(UTC) - DEFAULT_WINDOW
    try:
        reports = asyncio.run(load_report(database_url, since, args.policy_version))
    except (OSError, ConnectionError) as error:
        console.print(f"[red]The database cannot be reached:[/] {error}")
        return EXIT_UNREACHABLE
    if args.json:
        json.dump(
            {
                "since": since.isoformat(),
                "policy_version": args.policy_version,
                "lift_interval": "95 %, Newcombe's hybrid score (1998, method 10)",
                "actions": [asdict(r) for r in reports],
            },
            sys.stdout,
            indent=2,
        )
        sys.stdout.write("\n")
        return EXIT_OK
    _print_table(reports, since, args.policy_version)
    return EXIT_OK


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def _print_table(reports: list[ActionReport], since: datetime, policy_version: str | None) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    scope = f"since {since:%Y-%m-%d %H:%M} UTC" + (
        f", policy version {policy_version}" if policy_version else ""
    )
    if not reports:
        console.print(f"No decisions {scope}.")
        return
    table = Table(title=f"Actions {scope}", box=box.SIMPLE_HEAVY)
    for column in (
        "action",
        "offered",
        "followed",
        "held out",
        "converted (treated)",
        "converted (control)",
        "lift [95 % CI]",
        "uplift@30%",
        "Qini",
        "outcomes",
    ):
        table.add_column(column, justify="left" if column in ("action", "outcomes") else "right")
    for r in reports:
        interval = (
            f" [{r.lift_interval.low:+.1%}, {r.lift_interval.high:+.1%}]" if r.lift_interval else ""
        )
        table.add_row(
            r.action_name,
            str(r.offered),
            str(r.followed),
            str(r.held_out),
            f"{r.converted_treated}/{r.treated_customers} {_percent(r.conversion_treated)}",
            f"{r.converted_control}/{r.control_customers} {_percent(r.conversion_control)}",
            ("-" if r.lift is None else f"{r.lift:+.1%}") + interval,
            _number(r.uplift_at_30),
            _number(r.qini),
            ", ".join(f"{k} {v}" for k, v in r.outcomes.items()) or "-",
        )
    console.print(table)
    for r in reports:
        for note in r.notes:
            console.print(f"[yellow]{r.action_name}:[/] {note}", highlight=False)
    console.print(
        "Conversion and lift count customers (a customer is converted when a CONVERTED "
        "outcome was recorded for the action); the interval is Newcombe's hybrid score.",
        style="dim",
    )

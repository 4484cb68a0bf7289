"""`converge`: the command-line tool.

    converge import FILE --mapping MAPPING [--identity HOST:PORT]
                         [--interactions HOST:PORT] [--dry-run] [--limit N] [--json]
    converge mappings [--show NAME] [--json]

`import` maps an exported file with a mapping (a path, or the name of a
shipped mapping such as "itsm_incidents") and streams it to the identity and
interactions services; `--dry-run` only maps it and shows what would be sent.
A progress bar and a summary table by default; `--json` prints one JSON
document for scripts instead.

Exit codes: 0 all rows accepted (duplicates of earlier runs included); 1 some
rows rejected; 2 usage, file or mapping error (nothing sent); 3 a service is
unreachable or refused the import (the message names its address; re-running
the same command is safe).

Subcommands come from the table `SUBCOMMANDS`: each entry adds its parsers
to the shared subparsers and sets `run` on them, so another module (a future
`converge models ...`) plugs in with one line there.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from converge.cli_errors import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, report_rpc_error

if TYPE_CHECKING:
    from rich.console import Console

    from converge.connectors.importer import ImportSummary

EXIT_REJECTED = 1  # `converge import`: rows were rejected

Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
# Adds one or more subcommands; each parser gets `run` (namespace -> exit code)
# with set_defaults. Keep registration cheap: import heavy modules inside `run`.
Registrar = Callable[[Subparsers], None]


# --- converge import / converge mappings ----------------------------------------
def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number above 0")
    return int(text)


def register_connector_commands(subparsers: Subparsers) -> None:
    """`converge import` and `converge mappings`."""
    from converge.connectors import DEFAULT_IDENTITY, DEFAULT_INTERACTIONS

    parser = subparsers.add_parser(
        "import",
        help="import a file exported by another system, with a mapping",
        description=(
            "Map FILE's rows with MAPPING and stream them to Converge: profile upserts to the "
            "identity service, interactions to the interactions service. Re-running the same "
            "import is safe: every row carries the same idempotency key each time. "
            "Exit codes: 0 all accepted, 1 some rows rejected, 2 usage or mapping error, "
            "3 a service unreachable."
        ),
    )
    parser.add_argument(
        "file", type=Path, metavar="FILE", help="the CSV, whitespace or JSON-lines file"
    )
    parser.add_argument(
        "--mapping",
        required=True,
        metavar="MAPPING",
        help="a mapping file, or the name of a shipped one (see `converge mappings`)",
    )
    parser.add_argument(
        "--identity",
        type=_address,
        default=DEFAULT_IDENTITY,
        metavar="HOST:PORT",
        help=f"the identity service (default {DEFAULT_IDENTITY})",
    )
    parser.add_argument(
        "--interactions",
        type=_address,
        default=DEFAULT_INTERACTIONS,
        metavar="HOST:PORT",
        help=f"the interactions service (default {DEFAULT_INTERACTIONS})",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="map the file and show the summary and the first rows; call no service",
    )
    parser.add_argument("--limit", type=_positive, metavar="N", help="only the first N data rows")
    parser.add_argument(
        "--batch-size",
        type=_positive,
        default=5000,
        metavar="N",
        help="rows per streaming call (default 5000)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for a service to answer before giving up (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="print a JSON summary, no progress bar")
    parser.set_defaults(run=_run_import)

    shipped = subparsers.add_parser(
        "mappings",
        help="list the shipped mappings (or print one to copy and edit)",
        description="List the mappings shipped with Converge; --show NAME prints one.",
    )
    shipped.add_argument("--show", metavar="NAME", help="print this mapping's file")
    shipped.add_argument("--json", action="store_true", help="print JSON")
    shipped.set_defaults(run=_run_mappings)


def _run_mappings(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from converge.connectors.mapping import MappingError, parse_mapping, shipped_mappings

    out, err = Console(), Console(stderr=True)
    shipped = shipped_mappings()
    if args.show is not None:
        name = str(args.show).removesuffix(".yaml")
        if name not in shipped:
            err.print(f"[red]no shipped mapping {name!r}[/] (shipped: {', '.join(shipped)})")
            return EXIT_USAGE
        sys.stdout.write(shipped[name].read_text(encoding="utf-8"))
        return EXIT_OK
    rows: list[dict[str, Any]] = []
    for name, entry in shipped.items():
        try:
            mapping = parse_mapping(entry.read_text(encoding="utf-8"), name)
        except MappingError as e:  # a broken shipped file is a bug; say so, list the rest
            rows.append({"name": name, "error": str(e)})
            continue
        imports = [
            *(["profile"] if mapping.profile is not None else []),
            *(["interaction"] if mapping.records_interactions else []),
        ]
        rows.append(
            {
                "name": name,
                "source": mapping.source,
                "format": mapping.file.format,
                "imports": imports,
                "description": mapping.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    table = Table(title="Shipped mappings (converge import FILE --mapping NAME)")
    for column in ("name", "source", "format", "imports", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            row.get("source", ""),
            row.get("format", ""),
            ", ".join(row.get("imports", [])),
            row.get("description", row.get("error", "")),
        )
    out.print(table)
    out.print("Copy one to edit it: converge mappings --show NAME > my_mapping.yaml")
    return EXIT_OK


def _run_import(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from converge.connectors.importer import ServiceFailed, ServiceUnavailable, import_file
    from converge.connectors.mapping import MappingError, load_mapping
    from converge.connectors.reader import FileError, count_lines

    out, err = Console(), Console(stderr=True)
    path: Path = args.file

    def fail(code: int, message: str, details: Sequence[str] = ()) -> int:
        """Says what went wrong on stderr (and as JSON on stdout with --json)."""
        err.print(f"[red]{message}[/]", highlight=False)
        for line in details:
            err.print(f"  {line}", markup=False, highlight=False)
        if args.json:
            print(json.dumps({"error": message, "details": list(details), "exit_code": code}))
        return code

    try:
        mapping = load_mapping(args.mapping)
    except MappingError as e:
        return fail(EXIT_USAGE, f"mapping error in {e.origin}:", e.problems)
    if not path.is_file():
        return fail(EXIT_USAGE, f"no such file: {path}")

    total = max(count_lines(path) - (1 if mapping.file.header else 0), 0)
    if args.limit is not None:
        total = min(total, args.limit)
    progress = Progress(
        TextColumn("{task.description:<13}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("rows"),
        TimeElapsedColumn(),
        console=err,
        disable=bool(args.json),
    )
    tasks: dict[str, Any] = {}

    def advance(phase: str, rows_read: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(phase, total=total)
        progress.update(tasks[phase], completed=rows_read)

    try:
        with progress:
            summary = asyncio.run(
                import_file(
                    path,
                    mapping,
                    origin=str(args.mapping),
                    identity_address=args.identity,
                    interactions_address=args.interactions,
                    dry_run=args.dry_run,
                    limit=args.limit,
                    progress=advance,
                    batch_size=args.batch_size,
                    connect_timeout=args.timeout,
                )
            )
    except MappingError as e:
        return fail(EXIT_USAGE, f"mapping error in {e.origin}:", e.problems)
    except FileError as e:
        return fail(EXIT_USAGE, f"cannot read the file: {e}")
    except (ServiceUnavailable, ServiceFailed) as e:
        return fail(
            EXIT_UNREACHABLE,
            str(e),
            ["Rows already stored are kept; re-run the same command once the service is back."],
        )

    if args.json:
        print(json.dumps(summary.as_dict(), indent=2, ensure_ascii=False))
    else:
        _print_summary(
            out,
            summary,
            identity=mapping.needs_identity,
            interactions=mapping.records_interactions,
        )
    return EXIT_REJECTED if summary.rejected else EXIT_OK


def _print_summary(
    console: Console, summary: ImportSummary, *, identity: bool, interactions: bool
) -> None:
    from rich import box
    from rich.json import JSON
    from rich.table import Table

    title = "Dry run (nothing sent)" if summary.dry_run else "Import"
    table = Table(
        title=title,
        caption=f"{summary.file} with mapping {summary.mapping}",
        box=box.SIMPLE_HEAVY,
    )
    table.add_column("rows", justify="left")
    table.add_column("count", justify="right")
    table.add_row("read", f"{summary.read:,}")
    table.add_row("skipped by the mapping", f"{summary.skipped:,}")
    table.add_row(
        "rejected by the mapping",
        f"{summary.rejected_locally:,}",
        style="red" if summary.rejected_locally else None,
    )
    if summary.dry_run:
        table.add_row("mapped (would be sent)", f"{summary.mapped:,}", style="green")
    if identity and not summary.dry_run:
        table.add_row("profiles sent (identity)", f"{summary.profiles_sent:,}")
        table.add_row("  customers created", f"{summary.customers_created:,}")
        table.add_row("  customers matched", f"{summary.customers_matched:,}")
        table.add_row("  customers merged", f"{summary.customers_merged:,}")
        table.add_row(
            "  rejected by identity",
            f"{summary.profiles_rejected:,}",
            style="red" if summary.profiles_rejected else None,
        )
        if summary.identifiers_dropped:
            table.add_row(
                "  extra identifiers dropped (warnings)",
                f"{summary.identifiers_dropped:,}",
                style="yellow",
            )
    if interactions and not summary.dry_run:
        table.add_row("interactions sent", f"{summary.sent:,}")
        table.add_row("  accepted, newly stored", f"{summary.stored:,}", style="green")
        table.add_row("  accepted, duplicates (stored before)", f"{summary.duplicates:,}")
        table.add_row(
            "  rejected by interactions",
            f"{summary.interactions_rejected:,}",
            style="red" if summary.interactions_rejected else None,
        )
        if summary.interactions_withheld:
            table.add_row(
                "not sent: their profile was rejected by identity",
                f"{summary.interactions_withheld:,}",
                style="red",
            )
    if not summary.dry_run:
        table.add_row("rows accepted whole", f"{summary.accepted:,}", style="green")
        table.add_row(
            "rows rejected whole",
            f"{summary.rejected:,}",
            style="red" if summary.rejected else None,
        )
    console.print(table)

    if summary.profiles_effective_now:
        console.print(
            "[yellow]Profile values take effect now:[/] the mapping names no "
            "profile.effective_at, so a profile read as of an earlier time (training) "
            "does not show them."
        )
    if summary.warning_reasons:
        warnings = Table(title="Warnings (rows kept)", box=box.SIMPLE)
        warnings.add_column("rows", justify="right")
        warnings.add_column("warning")
        for reason, count in summary.warning_reasons.most_common(10):
            warnings.add_row(f"{count:,}", reason)
        console.print(warnings)
    if summary.rejection_reasons:
        reasons = Table(title="Top rejection reasons", box=box.SIMPLE)
        reasons.add_column("rows", justify="right")
        reasons.add_column("reason")
        for reason, count in summary.rejection_reasons.most_common(10):
            reasons.add_row(f"{count:,}", reason)
        console.print(reasons)
        examples = Table(title="First rejected rows", box=box.SIMPLE)
        examples.add_column("line", justify="right")
        examples.add_column("by")
        examples.add_column("detail")
        for rejection in summary.rejections[:5]:
            examples.add_row(str(rejection.line), rejection.by, rejection.detail)
        console.print(examples)
    if summary.samples:
        console.print(f"First {len(summary.samples)} mapped rows:")
        for sample in summary.samples:
            console.print(JSON.from_data(sample, indent=None))


# --- converge score ---------------------------------------------------------------
DEFAULT_SCORING = "127.0.0.1:50053"


def register_score_command(subparsers: Subparsers) -> None:
    """`converge score CUSTOMER [--ticket T] [--products P,...] [--json]`."""
    from converge.lookup import parse_ref

    parser = subparsers.add_parser(
        "score",
        help="score one customer: churn, escalation of a ticket, cross-sell, with reasons",
        description=(
            "Ask the scoring service for one customer's scores and the reasons behind them: "
            "churn always, escalation with --ticket, cross-sell with --products. CUSTOMER is "
            "a customer id or TYPE:VALUE (email:ada@example.com); it is never created. "
            "Exit codes: 0 scored, 2 bad request, 3 the service unreachable, 4 no such "
            "customer or ticket, 5 refused in the service's present state."
        ),
    )
    parser.add_argument("customer", type=parse_ref, metavar="CUSTOMER")
    parser.add_argument("--ticket", default="", metavar="T", help="an open ticket to score")
    parser.add_argument(
        "--products",
        default="",
        metavar="P,...",
        help="candidate products for cross-sell, comma separated",
    )
    parser.add_argument(
        "--reasons", type=_positive, default=3, metavar="N", help="reasons per score (default 3)"
    )
    parser.add_argument(
        "--scoring",
        type=_address,
        default=DEFAULT_SCORING,
        metavar="HOST:PORT",
        help=f"the scoring service (default {DEFAULT_SCORING})",
    )
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS", help="(default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(run=_run_score)


def _run_score(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf import json_format
    from rich.console import Console

    from converge.runtime.channels import channel
    from converge.v1 import scoring_pb2, scoring_pb2_grpc

    err = Console(stderr=True)
    request = scoring_pb2.ScoreRequest(
        customer=args.customer,
        ticket_id=args.ticket,
        candidate_product_ids=[p.strip() for p in args.products.split(",") if p.strip()],
        max_reasons=min(args.reasons, 20),
    )
    try:
        with channel(args.scoring) as connection:
            stub = scoring_pb2_grpc.ScoringServiceStub(connection)
            answer = stub.Score(request, timeout=args.timeout)
    except grpc.RpcError as error:
        return report_rpc_error(error, f"the scoring service at {args.scoring}", err)
    if args.json:
        print(json.dumps(json_format.MessageToDict(answer), indent=2, sort_keys=True))
    else:
        _print_scores(answer, Console())
    return EXIT_OK


def _print_scores(answer: Any, console: Console) -> None:
    from rich import box
    from rich.table import Table

    from converge.v1 import predictions_pb2

    table = Table(title=f"Scores of customer {answer.customer_id}", box=box.SIMPLE)
    for column in ("prediction", "for", "probability", "band", "model", "reasons"):
        table.add_column(column, justify="right" if column == "probability" else "left")
    for scored in answer.predictions:
        kind = predictions_pb2.PredictionKind.Name(scored.kind).removeprefix("PREDICTION_KIND_")
        band = predictions_pb2.RiskBand.Name(scored.risk_band).removeprefix("RISK_BAND_")
        model = f"{scored.model.name} v{scored.model.version}"
        if scored.fallback_used:
            model += " (rules)"
        table.add_row(
            kind.lower(),
            scored.ticket_id or scored.product_id,
            f"{scored.probability:.1%}",
            band.lower(),
            model,
            "\n".join(r.text for r in scored.reasons),
        )
    console.print(table)
    fallbacks = {s.fallback_reason for s in answer.predictions if s.fallback_used}
    for reason in sorted(fallbacks):
        console.print(f"[yellow]Rules answered:[/] {reason}", highlight=False)


# --- the command table ------------------------------------------------------------
# Each entry adds subcommands: a registrar function, or "module:function" imported
# when the parser is built (so `converge models` can live in its own package).
SUBCOMMANDS: tuple[Registrar | str, ...] = (
    register_connector_commands,
    "converge.lookup:register",
    "converge.models.cli:add_subcommands",
    "converge.platform:register",
    register_score_command,
    "converge.recommendation.outcomes.cli:register",
    "converge.recommendation.decisions.cli:register",
    "converge.recommendation.alerts.cli:register",
)


def _registrar(entry: Registrar | str) -> Registrar:
    if callable(entry):
        return entry
    module_name, _, function = entry.partition(":")
    found: Registrar = getattr(importlib.import_module(module_name), function)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="converge",
        description="Converge: predictive customer engagement. Command-line tools.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for entry in SUBCOMMANDS:
        _registrar(entry)(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits with 2 on a usage error
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except KeyboardInterrupt:
        print("interrupted; re-running the same command is safe", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

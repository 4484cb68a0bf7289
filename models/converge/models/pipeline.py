"""`converge models train / retrain / compare`: the steps that build sets.

`converge.models.cli` adds these three commands from `COMMANDS` when it
builds its parser (importing this module registers nothing and loads
neither LightGBM nor pandas):

    converge models train PREDICTION (--from-services | --simulated N) [--until DATE]
    converge models retrain (--from-services | --simulated N) [--until DATE]
    converge models compare PREDICTION V1 V2 [--frame F | --from-services | --simulated N]

Where the examples come from, always said explicitly (a model trained on the
simulator by accident would be registered like any other):

- `--from-services`: the running identity and interactions services
  (`--identity`, `--interactions`, defaults from `CONVERGE_IDENTITY_ADDRESS`
  and `CONVERGE_INTERACTIONS_ADDRESS`), with `trainingset.build_from_services`;
- `--simulated N`: a simulated world (`converge.models.simulator`, `--seed`)
  of 210 days up to the end date, built in-process with
  `trainingset.build_from_events`.

Cutoffs: weekly for churn and cross-sell, every two days for escalation,
over `--weeks` (26) weeks, the latest one horizon before the end date (its
label window must be complete). The end date is `--until DATE` (history
exported last year, or in 2016, trains as well as today's), else today.
Split by time (`dataset.time_split`).

`train` builds, trains (default `TrainingConfig`), evaluates on the test
period, logs the run and registers a version (no alias: promotion is a
separate step). `retrain` does that for all three predictions and then runs
the promotion gates for each new version against its champion on the same
test period, promoting only when they pass, printing every decision.
`compare` evaluates two versions on one recent test frame.

Exit codes (as `converge.models.cli`): 0 done; 1 a retrain promoted nothing
(gates refused every candidate, or none had enough data: each such
prediction is reported and skipped, the others go on); 2 bad usage or too little data;
3 MLflow or a service unreachable; 4 no such model or version.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from converge.models import cli
from converge.models.predictions import HORIZONS, PREDICTIONS, Prediction

if TYPE_CHECKING:
    from converge.models.dataset import Split, TrainingFrame
    from converge.models.definitions import Definitions
    from converge.models.trainingset import BuildReport

DEFAULT_SIMULATED = 3000
SIM_DAYS = 210


def _progress(console: Any) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def cutoffs_until(now: datetime, prediction: str, weeks: int) -> list[datetime]:
    """Cutoffs over `weeks` weeks, the latest one horizon before `now` (the
    built-in definitions' grid)."""
    from converge.models.trainingset import weekly_cutoffs

    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    last = day - HORIZONS[prediction]  # type: ignore[index]
    first = last - timedelta(weeks=weeks)
    step = timedelta(days=2) if prediction == "escalation" else timedelta(days=7)
    return weekly_cutoffs(first, last, step)


@lru_cache(maxsize=2)
def _world(customers: int, seed: int, end_day: datetime) -> tuple[Any, Any]:
    from converge.models.simulator import simulate

    world = simulate(customers, seed, end_day - timedelta(days=SIM_DAYS), end_day)
    return world.events_by_customer(), world.profile_histories()


def definitions_of(args: argparse.Namespace) -> Definitions:
    """The definitions `args` name (default: the built-in ones), with
    `--weeks` applied."""
    from converge.models.definitions import load_definitions

    defs = load_definitions(getattr(args, "definitions", None))
    weeks = getattr(args, "weeks", None)
    if not args.from_services:
        # The simulated world spans SIM_DAYS: leave room for the horizon and gaps.
        weeks = min(weeks or defs.cutoffs.weeks, SIM_DAYS // 7 - 9)
    if weeks is not None:
        defs = defs.model_copy(update={"cutoffs": defs.cutoffs.model_copy(update={"weeks": weeks})})
    return defs


def build_frame(
    args: argparse.Namespace,
    prediction: str,
    until: datetime | None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[TrainingFrame, BuildReport]:
    """The labelled frame `args` asks for, by its definitions, the history
    ending at `until` (None: where the data ends)."""
    from converge.models.trainingset import build_defined, build_defined_events

    defs = definitions_of(args)
    p = check(prediction)
    if args.from_services:
        return asyncio.run(
            build_defined(args.identity, args.interactions, defs, p, until, progress=progress)
        )
    end = until or datetime.now(UTC)  # the simulator needs a day to end its world on
    end_day = end.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    events, profiles = _world(args.simulated or DEFAULT_SIMULATED, args.seed, end_day)
    return build_defined_events(
        events,
        profiles,
        defs,
        p,
        until,
        progress=progress,
        source=f"simulated:{args.simulated or DEFAULT_SIMULATED}:seed{args.seed}",
    )


def check(prediction: str) -> Prediction:
    if prediction not in PREDICTIONS:
        raise cli.UsageError(f"unknown prediction {prediction!r}")
    return prediction  # type: ignore[return-value]


def split_frame(frame: TrainingFrame, defs: Definitions, report: BuildReport) -> list[Split]:
    """Train, validation and test parts as the definitions say: `auto` splits
    by time when the rows have more than one cutoff, else stratified (a
    snapshot), in `split.folds` cross-validation folds when more than one;
    too few examples in a part says what to change. The first split is the
    one whose model is registered."""
    from converge.models.dataset import stratified_folds, stratified_split, time_split
    from converge.models.history import TooLittleData
    from converge.models.training import shortfalls
    from converge.models.trainingset import too_little_message

    method = defs.split.method
    if method == "auto":
        method = "time" if frame.n_cutoffs > 1 else "stratified"
    if defs.split.folds > 1 and method != "stratified":
        raise cli.UsageError(
            f"{defs.origin or 'the definitions'}: split.folds applies to snapshot (stratified) "
            "splits only; rows at several cutoffs are split by time"
        )
    if method == "stratified":
        folds = defs.split.folds
        splits = (
            stratified_folds(frame, folds, seed=0)
            if folds > 1
            else [stratified_split(frame, seed=0)]
        )
    else:
        gap = defs.horizon(frame.prediction) if defs.split.gap == "horizon" else timedelta(0)
        splits = [time_split(frame, gap=gap)]
    for split in splits:
        missing = shortfalls(split.train, split.valid)
        if missing:
            raise TooLittleData(
                too_little_message(report, defs, f"after a {method} split: {'; '.join(missing)}")
            )
    return splits


def _source_args(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--simulated",
        type=int,
        metavar="N",
        default=None,
        help="build from a simulated world of N customers (a demonstration, not your data)",
    )
    where.add_argument(
        "--from-services",
        action="store_true",
        help="build from the history held by the running identity and interactions services",
    )
    parser.add_argument("--seed", type=int, default=1, help="simulator seed (default 1)")
    parser.add_argument(
        "--definitions",
        default=None,
        metavar="NAME|PATH",
        help="what churn, escalation and a purchase mean: a YAML file or the name of a "
        "shipped one (default: the built-in definitions)",
    )
    parser.add_argument(
        "--weeks",
        type=_weeks,
        default=None,
        metavar="N",
        help="weeks of cutoffs (default: the definitions', 26)",
    )
    parser.add_argument(
        "--until",
        type=_day,
        default=None,
        metavar="DATE",
        help="the end of the history to train on, YYYY-MM-DD (default: the latest complete "
        "label window in the data, never the clock); the last cutoff is one label horizon "
        "before it",
    )
    parser.add_argument(
        "--identity",
        default=os.environ.get("CONVERGE_IDENTITY_ADDRESS", "127.0.0.1:50051"),
        help="identity service address",
    )
    parser.add_argument(
        "--interactions",
        default=os.environ.get("CONVERGE_INTERACTIONS_ADDRESS", "127.0.0.1:50052"),
        help="interactions service address",
    )


def _weeks(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 520:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of weeks from 1 to 520")
    return int(text)


def _day(text: str) -> datetime:
    try:
        day = datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date as YYYY-MM-DD") from None
    return day.replace(tzinfo=UTC)


def _require_source(args: argparse.Namespace) -> None:
    """The source of examples is never implied."""
    if not args.from_services and args.simulated is None:
        raise cli.UsageError(
            "say where the examples come from: --from-services (your history in the running "
            "services) or --simulated N (a simulated world, for trying Converge out)"
        )
    definitions_of(args)  # a bad definitions file stops here, before any work


def _end(args: argparse.Namespace) -> datetime | None:
    """The end of the history to train on: --until, else (None) where the
    data ends."""
    until: datetime | None = args.until
    return until


def _who(args: argparse.Namespace) -> str:
    import getpass

    if getattr(args, "requested_by", None):
        return str(args.requested_by)
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _build_and_train(
    args: argparse.Namespace, ctx: cli.Context, prediction: str, until: datetime | None
) -> tuple[Any, Any, Split, list[Path], BuildReport]:
    import numpy as np

    from converge.models.evaluation import evaluate, evaluate_scores, save_plots
    from converge.models.training import train

    with _progress(ctx.console) as bar:
        task = bar.add_task(f"{prediction}: reading the history", total=None)

        def step(done: int, total: int) -> None:
            # total 0: streaming the history, its size not known yet.
            if total:
                bar.update(
                    task,
                    completed=done,
                    total=total,
                    description=f"{prediction}: point-in-time features",
                )
            else:
                bar.update(task, description=f"{prediction}: reading the history ({done:,})")

        frame, report = build_frame(args, prediction, until, step)
        bar.update(task, description=f"{prediction}: training on {frame.n_examples} rows")
        splits = split_frame(frame, definitions_of(args), report)
        split = splits[0]
        rows = frame.n_examples
        fold = ""

        def round_done(done: int, most: int, auc: float) -> None:
            # Early stopping usually ends well before `most` rounds.
            bar.update(
                task,
                completed=done,
                total=most,
                description=f"{prediction}: training on {rows} rows{fold}, "
                f"validation AUC {auc:.3f}",
            )

        model = train(split.train, split.valid, progress=round_done)
        result = evaluate(model, split.test)
        if len(splits) > 1:
            # Cross-validation: the first fold's model is the one registered;
            # the figures are those of every fold's out-of-fold predictions.
            labels = [split.test.labels]
            scores = [model.predict_proba(split.test.frame)]
            for k, other in enumerate(splits[1:], start=2):
                fold = f" (fold {k} of {len(splits)})"
                fold_model = train(other.train, other.valid, progress=round_done)
                labels.append(other.test.labels)
                scores.append(fold_model.predict_proba(other.test.frame))
            result = evaluate_scores(np.concatenate(labels), np.concatenate(scores))
            report.cross_validation_folds = len(splits)
    plots_dir = Path(tempfile.mkdtemp(prefix=f"converge-{prediction}-plots-"))
    plots = save_plots(model, result, plots_dir, title=prediction)
    return model, result, split, plots, report


def _summary(
    ctx: cli.Context, prediction: str, version: str, result: Any, split: Split, report: BuildReport
) -> None:
    table = Table(title=f"{prediction}: registered version {version}")
    table.add_column("")
    table.add_column("value", justify="right")
    for label, value in (
        ("training rows", split.train.n_examples),
        ("validation rows", split.valid.n_examples),
        (
            "test rows"
            if report.cross_validation_folds == 1
            else f"test rows ({report.cross_validation_folds} folds)",
            result.n,
        ),
        ("test positives", result.n_positive),
        ("ROC AUC", f"{result.roc_auc:.4f}"),
        ("PR AUC", f"{result.pr_auc:.4f}"),
        ("ECE", f"{result.ece:.4f}"),
        ("Brier", f"{result.brier:.4f}"),
        ("lift top decile", f"{result.lift_top_decile:.2f}"),
        ("history ends", f"{report.latest:%Y-%m-%d}" if report.latest else "-"),
        ("cutoffs", report.window()),
        *(
            (what.replace("_", " "), count)
            for what, count in (report.tickets.as_dict() if report.tickets else {}).items()
        ),
    ):
        table.add_row(label, str(value))
    table.caption = report.label
    ctx.console.print(table)


def _unreachable(ctx: cli.Context, e: Exception) -> int:
    ctx.console.print(f"[red]A service is unreachable:[/red] {e}")
    ctx.console.print("Start the services or pass --identity / --interactions.")
    return cli.EXIT_UNREACHABLE


def _register(
    registry: Any,
    model: Any,
    result: Any,
    split: Split,
    plots: list[Path],
    who: str,
    description: str,
    report: BuildReport,
) -> Any:
    """Logs the training run and registers its version (no alias); the plots'
    temporary folder is removed once MLflow holds copies of them."""
    try:
        return registry.log_training(
            model,
            result,
            {"train": split.train, "valid": split.valid, "test": split.test},
            plots,
            params={"source": split.train.source, **report.as_dict()},
            requested_by=who,
            description=description,
        )
    finally:
        for folder in {plot.parent for plot in plots}:
            shutil.rmtree(folder, ignore_errors=True)


def _cmd_train(args: argparse.Namespace, ctx: cli.Context) -> int:
    registry = ctx.registry  # fails early (exit 3) when MLflow is unreachable
    from converge.models.trainingset import ServiceUnavailable

    _require_source(args)
    until = _end(args)
    try:
        model, result, split, plots, report = _build_and_train(args, ctx, args.prediction, until)
    except ServiceUnavailable as e:
        return _unreachable(ctx, e)
    registered = _register(
        registry,
        model,
        result,
        split,
        plots,
        _who(args),
        f"converge models train {args.prediction}",
        report,
    )
    if args.save_test_frame:
        split.test.frame.to_parquet(args.save_test_frame)
    if args.json:
        ctx.emit(
            {
                "version": registered.version,
                "run_id": registered.run_id,
                **result.to_dict(),
                **(report.tickets.as_dict() if report.tickets else {}),
                "build": report.as_dict(),
            }
        )
    else:
        _summary(ctx, args.prediction, registered.version, result, split, report)
    return cli.EXIT_OK


def _cmd_retrain(args: argparse.Namespace, ctx: cli.Context) -> int:
    registry = ctx.registry
    from converge.models.dataset import SplitError
    from converge.models.history import TooLittleData
    from converge.models.training import InsufficientData
    from converge.models.trainingset import ServiceUnavailable

    _require_source(args)
    until = _end(args)
    who = _who(args)
    decisions = []
    for prediction in PREDICTIONS:
        try:
            model, result, split, plots, report = _build_and_train(args, ctx, prediction, until)
        except ServiceUnavailable as e:
            return _unreachable(ctx, e)
        except (InsufficientData, SplitError, TooLittleData) as e:
            # One prediction short of data does not stop the others; its
            # champion (or the rule-based fallback) keeps answering.
            ctx.console.print(f"{prediction}: [yellow]not trained[/yellow]: {e}")
            continue
        registered = _register(
            registry, model, result, split, plots, who, "converge models retrain", report
        )
        decision = registry.promote(
            prediction,
            registered.version,
            split.test,
            requested_by=who,
            margin_auc=args.margin_auc,
            margin_ece=args.margin_ece,
            reason="scheduled retrain",
        )
        decisions.append(decision)
        if not args.json:
            verdict = "[green]PROMOTED[/green]" if decision.promoted else "[red]REFUSED[/red]"
            ctx.console.print(
                f"{prediction}: v{registered.version} AUC {result.roc_auc:.4f} ECE "
                f"{result.ece:.4f} -> {verdict}"
            )
            for reason in decision.reasons:
                ctx.console.print(f"  - {reason}")
    if args.json:
        ctx.emit([d.to_dict() for d in decisions])
    return cli.EXIT_OK if any(d.promoted for d in decisions) else cli.EXIT_REFUSED


def _cmd_compare(args: argparse.Namespace, ctx: cli.Context) -> int:
    from converge.models.evaluation import evaluate

    registry = ctx.registry
    first = registry.load_version(args.prediction, args.v1)
    second = registry.load_version(args.prediction, args.v2)
    if args.frame is not None:
        frame = cli._load_frame(args, first.model.feature_names)
    else:
        from converge.models.trainingset import ServiceUnavailable

        _require_source(args)
        try:
            with ctx.console.status("Building a recent test frame..."):
                built, report = build_frame(args, args.prediction, _end(args))
                frame = split_frame(built, definitions_of(args), report)[0].test
        except ServiceUnavailable as e:
            return _unreachable(ctx, e)
    results = {v.version: evaluate(v.model, frame) for v in (first, second)}
    if args.json:
        ctx.emit({version: r.to_dict() for version, r in results.items()})
        return cli.EXIT_OK
    table = Table(
        title=f"{args.prediction} on {frame.n_examples} rows ({frame.window[0]:%Y-%m-%d} .. {frame.window[1]:%Y-%m-%d})"
    )
    table.add_column("metric")
    for version in results:
        table.add_column(f"v{version}", justify="right")
    for key in ("roc_auc", "pr_auc", "log_loss", "brier", "ece", "lift_top_decile"):
        table.add_row(key, *(f"{getattr(r, key):.4f}" for r in results.values()))
    ctx.console.print(table)
    return cli.EXIT_OK


def _configure_train(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prediction", choices=PREDICTIONS)
    _source_args(parser)
    parser.add_argument(
        "--save-test-frame", type=Path, default=None, help="write the test part (Parquet)"
    )
    parser.add_argument("--requested-by", default=None)


def _configure_retrain(parser: argparse.ArgumentParser) -> None:
    _source_args(parser)
    parser.add_argument("--margin-auc", type=float, default=0.01)
    parser.add_argument("--margin-ece", type=float, default=0.02)
    parser.add_argument("--requested-by", default=None)


def _configure_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prediction", choices=PREDICTIONS)
    parser.add_argument("v1")
    parser.add_argument("v2")
    parser.add_argument("--frame", type=Path, default=None, help="Parquet test frame")
    _source_args(parser)


# (name, help, add its arguments, run it): `converge.models.cli` adds them.
COMMANDS: tuple[tuple[str, str, Callable[[argparse.ArgumentParser], None], cli.Handler], ...] = (
    ("train", "build a training set, train, evaluate, register", _configure_train, _cmd_train),
    (
        "retrain",
        "train all three; promote each only when its gates pass",
        _configure_retrain,
        _cmd_retrain,
    ),
    ("compare", "evaluate two versions on one recent test frame", _configure_compare, _cmd_compare),
)

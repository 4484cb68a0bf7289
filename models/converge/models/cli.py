"""Train, evaluate, compare, promote and roll back Converge's prediction models.

    converge models train PREDICTION --from-services [--until DATE] [--weeks N]
    converge models retrain --from-services [--until DATE]
    converge models compare PREDICTION V1 V2 --from-services
    converge models list
    converge models versions PREDICTION
    converge models history PREDICTION
    converge models evaluate PREDICTION --frame F [--version N | --alias A] [--plots DIR]
    converge models promote PREDICTION VERSION --frame F [--reason WHY]
    converge models rollback PREDICTION [--reason WHY]

PREDICTION is churn, escalation or cross_sell. Training never moves an
alias: a new version becomes `champion` only through `promote` (or
`retrain`), and only when it is not worse than the champion on the same
recent test period. `--simulated N` instead of `--from-services` trains on
a simulated world, to try Converge out.

Models live in MLflow: --tracking-uri or $MLFLOW_TRACKING_URI, else a local
store under ./var/mlflow (see it with `mlflow ui --backend-store-uri
sqlite:///var/mlflow/mlflow.db`). Tables by default, --json for scripts.

Exit codes: 0 done (promoted, rolled back); 1 refused (a promotion's gates
failed, nothing to roll back); 2 bad usage or too little data; 3 MLflow or a
service unreachable; 4 no such model, version or alias.
"""

# For developers: `--frame` is a Parquet file of a training frame (feature
# columns, categorical ones of pandas category dtype; `entity_id`; `cutoff`,
# tz-aware; `label`). The top-level `converge` command calls
# `add_subcommands(subparsers)`; every leaf parser sets `run(args) -> int`.
# `train`, `retrain` and `compare` come from `converge.models.pipeline.COMMANDS`;
# `register_command` adds another one; `set_frame_provider(fn)` supplies the
# evaluation frame when `--frame` is omitted. Building the parser imports
# neither LightGBM, MLflow nor pandas, so `--help` answers at once.

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, is_dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

from converge.models.predictions import PREDICTIONS

if TYPE_CHECKING:
    from converge.models.dataset import TrainingFrame
    from converge.models.registry import ModelRegistry

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_FOUND = 4

Handler = Callable[[argparse.Namespace, "Context"], int]
FrameProvider = Callable[[str], "TrainingFrame"]


@dataclass
class Context:
    """What every command gets: the registry (opened lazily) and the console."""

    args: argparse.Namespace
    console: Console
    _registry: ModelRegistry | None = None

    @property
    def registry(self) -> ModelRegistry:
        if self._registry is None:
            from converge.models.registry import ModelRegistry, RegistryUnavailable

            try:
                registry = ModelRegistry(
                    tracking_uri=self.args.tracking_uri,
                    data_dir=Path(self.args.data_dir) if self.args.data_dir else None,
                )
            except OSError as e:
                raise RegistryUnavailable(f"MLflow store cannot be opened: {e}") from e
            registry.check_reachable()
            self._registry = registry
        return self._registry

    def emit(self, data: Any) -> None:
        print(json.dumps(_jsonable(data), indent=2, sort_keys=True, default=str))


@dataclass(frozen=True)
class _Extension:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    handler: Handler


_EXTENSIONS: list[_Extension] = []
_FRAME_PROVIDER: list[FrameProvider] = []


def register_command(
    name: str,
    help: str,
    configure: Callable[[argparse.ArgumentParser], None],
    handler: Handler,
) -> None:
    """Adds `converge models NAME` (for `train`, `retrain`, `compare`).
    `configure` adds its arguments; `handler(args, context)` returns the exit
    code. The common options (--tracking-uri, --data-dir, --json) are added
    for it."""
    _EXTENSIONS[:] = [e for e in _EXTENSIONS if e.name != name]
    _EXTENSIONS.append(_Extension(name, help, configure, handler))


def set_frame_provider(provider: FrameProvider | None) -> None:
    """Where `evaluate` and `promote` get their frame when `--frame` is
    omitted: `provider(prediction)` returns a recent labelled TrainingFrame."""
    _FRAME_PROVIDER[:] = [] if provider is None else [provider]


# --- parsers ------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else a SQLite store under "
        "the data directory)",
    )
    common.add_argument(
        "--data-dir",
        default=None,
        help="local state directory (default: $CONVERGE_DATA_DIR or ./var); the MLflow "
        "store is <data-dir>/mlflow",
    )
    common.add_argument("--json", action="store_true", help="print JSON instead of tables")
    return common


def _prediction_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prediction", choices=PREDICTIONS, help="which prediction's model")


def _frame_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--frame",
        type=Path,
        default=None,
        help="Parquet file of a labelled frame to evaluate on (features, entity_id, cutoff, label)",
    )


def _who_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--requested-by",
        default=None,
        help="who asks (recorded on the model version; default: the login name)",
    )
    parser.add_argument("--reason", default="", help="why (recorded with the decision)")


def add_subcommands(subparsers: Any) -> argparse.ArgumentParser:
    """Adds `models` and its commands to a top-level `add_subparsers()`
    object; every leaf sets `run(args) -> int` (the exit code)."""
    models: argparse.ArgumentParser = subparsers.add_parser(
        "models",
        help="train, evaluate, promote and roll back the prediction models",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _populate(models)
    return models


def _populate(parser: argparse.ArgumentParser) -> None:
    # The commands that build training sets (train, retrain, compare) live in
    # the pipeline module, which is cheap to import.
    from converge.models.pipeline import COMMANDS

    common = _common()
    sub = parser.add_subparsers(dest="models_command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", parents=[common], help="registered models and their aliases")
    p.set_defaults(run=_runner(_cmd_list))

    p = sub.add_parser("versions", parents=[common], help="every version of one model")
    _prediction_arg(p)
    p.set_defaults(run=_runner(_cmd_versions))

    p = sub.add_parser("history", parents=[common], help="which version held which alias, when")
    _prediction_arg(p)
    p.add_argument("--alias", choices=("champion", "challenger"), default=None)
    p.set_defaults(run=_runner(_cmd_history))

    p = sub.add_parser("evaluate", parents=[common], help="a version's figures on a frame")
    _prediction_arg(p)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--version", default=None, help="version number")
    which.add_argument("--alias", default=None, help="alias (default: champion)")
    _frame_arg(p)
    p.add_argument("--plots", type=Path, default=None, help="write ROC, calibration, importance")
    p.set_defaults(run=_runner(_cmd_evaluate))

    p = sub.add_parser(
        "promote",
        parents=[common],
        help="make a version champion if it passes the gates",
        description="Evaluates the version and the champion on the same frame; promotes "
        "only if the version's AUC is not lower than the champion's by more than "
        "--margin-auc, its ECE not higher by more than --margin-ece, and its feature "
        "schema is the champion's. Exit 0 promoted, 1 refused (or promoted but the "
        "--rollout failed), 3 the cluster unreachable.",
    )
    _prediction_arg(p)
    p.add_argument("version", help="the candidate version")
    _frame_arg(p)
    p.add_argument("--margin-auc", type=float, default=0.01)
    p.add_argument("--margin-ece", type=float, default=0.02)
    p.add_argument(
        "--allow-schema-change",
        action="store_true",
        help="accept a different feature schema (a new feature set); the candidate must then "
        "beat no skill",
    )
    p.add_argument(
        "--rollout",
        action="store_true",
        help="once promoted, restart the cluster's scoring Deployment and wait for it "
        "(skipped when its replicas hot-swap models: annotation converge.io/model-hot-swap); "
        "needs the platform extra",
    )
    p.add_argument("--release", default=None, help="the Helm release (with --rollout)")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (with --rollout)")
    p.add_argument("--namespace", default=None, help="namespace (with --rollout)")
    _who_args(p)
    p.set_defaults(run=_runner(_cmd_promote))

    p = sub.add_parser("rollback", parents=[common], help="champion back to the previous one")
    _prediction_arg(p)
    _who_args(p)
    p.set_defaults(run=_runner(_cmd_rollback))

    extensions = {e.name: e for e in (_Extension(*c) for c in COMMANDS)}
    extensions.update((e.name, e) for e in _EXTENSIONS)
    for ext in extensions.values():
        p = sub.add_parser(ext.name, parents=[common], help=ext.help)
        ext.configure(p)
        p.set_defaults(run=_runner(ext.handler))


def build_parser(prog: str = "converge models") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _populate(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.run
    return func(args)


# --- running ------------------------------------------------------------------------


def _runner(handler: Handler) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        # MLflow's usage telemetry stays off unless asked for, and its INFO
        # lines (store migrations, run links) stay out of the command's output.
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        logging.getLogger("mlflow").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        console = Console(stderr=bool(args.json))
        err = Console(stderr=True)
        from converge.models.registry import (
            ModelNotFound,
            NothingToRollBack,
            RegistryUnavailable,
        )
        from converge.models.training import InsufficientData

        try:
            return handler(args, Context(args, console))
        except RegistryUnavailable as e:
            err.print(f"[red]MLflow is unreachable:[/red] {e}")
            err.print("Set MLFLOW_TRACKING_URI or --tracking-uri, or start the tracking server.")
            return EXIT_UNREACHABLE
        except ModelNotFound as e:
            err.print(f"[red]Not found:[/red] {e}")
            return EXIT_NOT_FOUND
        except NothingToRollBack as e:
            err.print(f"[yellow]Nothing to roll back:[/yellow] {e}")
            return EXIT_REFUSED
        except (InsufficientData, UsageError, ValueError, KeyError) as e:
            err.print(f"[red]Error:[/red] {e}")
            return EXIT_USAGE

    return run


class UsageError(Exception):
    pass


def _load_frame(args: argparse.Namespace, feature_names: Sequence[str]) -> TrainingFrame:
    from converge.models.dataset import TrainingFrame

    if args.frame is None:
        if _FRAME_PROVIDER:
            return _FRAME_PROVIDER[0](args.prediction)
        raise UsageError(
            "pass --frame PATH (a Parquet file of a labelled frame); building a recent frame "
            "from the services is not available in this build"
        )
    if not args.frame.exists():
        raise UsageError(f"no such file: {args.frame}")
    import pandas as pd

    df = pd.read_parquet(args.frame)
    return TrainingFrame.from_frame(
        df,
        args.prediction,
        feature_set_version="",
        feature_names=feature_names,
        source=str(args.frame),
    )


def _who(args: argparse.Namespace) -> str:
    if args.requested_by:
        return str(args.requested_by)
    try:
        return getpass.getuser()
    except (KeyError, OSError) as e:
        raise UsageError("cannot tell who you are: pass --requested-by") from e


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    summaries = ctx.registry.list_models()
    if args.json:
        ctx.emit(summaries)
        return EXIT_OK
    table = Table(title=f"Models in {ctx.registry.tracking_uri}")
    for col in (
        "prediction",
        "registered model",
        "versions",
        "champion",
        "AUC",
        "ECE",
        "challenger",
        "feature set",
    ):
        table.add_column(col)
    for s in summaries:
        table.add_row(
            s.prediction,
            s.name if s.exists else f"{s.name} (none yet)",
            str(s.versions),
            s.champion or "-",
            _fmt(s.champion_auc),
            _fmt(s.champion_ece),
            s.challenger or "-",
            s.champion_feature_set_version or "-",
        )
    ctx.console.print(table)
    return EXIT_OK


def _cmd_versions(args: argparse.Namespace, ctx: Context) -> int:
    rows = ctx.registry.versions(args.prediction)
    if args.json:
        ctx.emit(rows)
        return EXIT_OK
    table = Table(title=f"{args.prediction} versions")
    for col in ("version", "created", "aliases", "test AUC", "test ECE", "feature set", "gate"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["version"],
            r["created"].strftime("%Y-%m-%d %H:%M"),
            ", ".join(r["aliases"]) or "-",
            _fmt(r["test_roc_auc"]),
            _fmt(r["test_ece"]),
            r["feature_set_version"] or "-",
            r["decision"] or "-",
        )
    ctx.console.print(table)
    return EXIT_OK


def _cmd_history(args: argparse.Namespace, ctx: Context) -> int:
    periods = ctx.registry.alias_history(args.prediction, args.alias)
    if args.json:
        ctx.emit(periods)
        return EXIT_OK
    table = Table(title=f"{args.prediction} alias history")
    for col in ("alias", "version", "from", "to", "action", "who", "why"):
        table.add_column(col)
    for p in periods:
        table.add_row(
            p.alias,
            p.version,
            p.from_time.strftime("%Y-%m-%d %H:%M:%S"),
            p.to_time.strftime("%Y-%m-%d %H:%M:%S") if p.to_time else "now",
            p.action,
            p.who,
            p.why,
        )
    ctx.console.print(table)
    return EXIT_OK


def _cmd_evaluate(args: argparse.Namespace, ctx: Context) -> int:
    from converge.models.evaluation import evaluate, save_plots

    with ctx.console.status("Loading the model and the frame..."):
        if args.version:
            loaded = ctx.registry.load_version(args.prediction, args.version)
        else:
            loaded = ctx.registry.load_champion(args.prediction, args.alias or "champion")
        frame = _load_frame(args, loaded.model.feature_names)
    with ctx.console.status(f"Evaluating v{loaded.version} on {frame.n_examples} rows..."):
        result = evaluate(loaded.model, frame)
        plots = save_plots(loaded.model, result, args.plots) if args.plots else []
    if args.json:
        ctx.emit({"version": loaded.version, "run_id": loaded.run_id, **result.to_dict()})
        return EXIT_OK
    table = Table(title=f"{loaded.name} v{loaded.version} on {frame.n_examples} rows")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in result.metrics("").items():
        table.add_row(key, f"{value:.4f}" if not float(value).is_integer() else f"{value:.0f}")
    ctx.console.print(table)
    for plot in plots:
        ctx.console.print(f"wrote {plot}")
    return EXIT_OK


def _cmd_promote(args: argparse.Namespace, ctx: Context) -> int:
    who = _who(args)
    with ctx.console.status(f"Evaluating v{args.version} against the champion..."):
        candidate = ctx.registry.load_version(args.prediction, args.version)
        frame = _load_frame(args, candidate.model.feature_names)
        decision = ctx.registry.promote(
            args.prediction,
            args.version,
            frame,
            requested_by=who,
            margin_auc=args.margin_auc,
            margin_ece=args.margin_ece,
            reason=args.reason,
            allow_schema_change=args.allow_schema_change,
        )
    rolled: dict[str, Any] | None = None
    code = EXIT_OK if decision.promoted else EXIT_REFUSED
    if decision.promoted and args.rollout:
        code, rolled = _rollout_scoring(args, ctx, f"promoted {decision.name} v{decision.version}")
    if args.json:
        ctx.emit({**decision.to_dict(), **({"rollout": rolled} if rolled is not None else {})})
    else:
        verdict = "[green]PROMOTED[/green]" if decision.promoted else "[red]REFUSED[/red]"
        ctx.console.print(f"{decision.name} v{decision.version}: {verdict}")
        table = Table()
        table.add_column("")
        table.add_column(f"candidate v{decision.version}", justify="right")
        table.add_column(f"champion v{decision.champion_version or '-'}", justify="right")
        for label, key in (("AUC", "roc_auc"), ("ECE", "ece"), ("PR AUC", "pr_auc")):
            table.add_row(
                label,
                _fmt(getattr(decision.candidate, key, None), 4),
                _fmt(getattr(decision.champion, key, None), 4),
            )
        ctx.console.print(table)
        for reason in decision.reasons:
            ctx.console.print(f"  - {reason}")
        if rolled is not None:
            ctx.console.print(f"rollout: {rolled['detail']}", highlight=False)
    return code


def _rollout_scoring(
    args: argparse.Namespace, ctx: Context, reason: str
) -> tuple[int, dict[str, Any]]:
    """Restarts the scoring replicas so they load the new champion, unless
    they swap models themselves (`converge.platform.rollout`): the exit code
    and what happened."""
    try:
        from converge.platform import PlatformError, Unreachable, connect, rollout

        result = rollout(
            connect(args.kubeconfig, None, args.namespace),
            "scoring",
            args.release,
            reason=reason,
            progress=(lambda _: None)
            if args.json
            else (lambda detail: ctx.console.print(f"  {detail}", highlight=False)),
        )
    except ImportError as e:  # the platform extra (kubernetes) is not installed
        return EXIT_REFUSED, {"done": False, "detail": f"promoted, but cannot roll out: {e}"}
    except Unreachable as e:
        return EXIT_UNREACHABLE, {"done": False, "detail": f"cluster unreachable: {e}"}
    except PlatformError as e:
        return EXIT_REFUSED, {"done": False, "detail": f"rollout failed: {e}"}
    return EXIT_OK, {
        "done": True,
        "deployment": result.deployment,
        "restarted": result.restarted,
        "detail": result.detail,
    }


def _cmd_rollback(args: argparse.Namespace, ctx: Context) -> int:
    result = ctx.registry.rollback(args.prediction, requested_by=_who(args), reason=args.reason)
    if args.json:
        ctx.emit(result)
    else:
        ctx.console.print(
            f"{result.name}: champion v{result.from_version} -> v{result.to_version} "
            f"(by {result.requested_by})"
        )
    return EXIT_OK


def _jsonable(data: Any) -> Any:
    if is_dataclass(data) and not isinstance(data, type):
        return {k: _jsonable(v) for k, v in asdict(data).items()}
    if isinstance(data, dict):
        return {str(k): _jsonable(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_jsonable(v) for v in data]
    if isinstance(data, datetime):
        return data.isoformat()
    return data


if __name__ == "__main__":
    sys.exit(main())

"""MLflow tracking and Model Registry for Converge's three predictions.

Store. Without `MLFLOW_TRACKING_URI`, a local SQLite store at
`$CONVERGE_DATA_DIR/mlflow/mlflow.db` (default `var/mlflow/mlflow.db`) holds
runs and the registry, and artifacts (models, plots) go beside it in
`.../mlflow/artifacts`. MLflow 3 deprecated, and now refuses by default, the
old `./mlruns` file store; SQLite is its default local backend, still one
file on disk, with the registry included. With `MLFLOW_TRACKING_URI` set
(a tracking server, or another database) that store is used as it is.

Runs. `log_training` makes one run per training, in the experiment named
like the registered model: parameters, `test_*` metrics, the plots, the
training, validation and test frames as dataset inputs, tags for the
prediction, feature-set version and windows, and what serving needs
(`serving_artifacts`: risk-band thresholds, a check sample, a drift sample,
inside the model). The model is logged as an MLflow
pyfunc model ("model from code": `converge/models/native.py`, with the
booster and calibrator as its `native` artifact), with a signature and an
input example, so `mlflow.pyfunc.load_model(uri).predict(df)` returns the
calibrated probabilities, and is registered as a new version of
"converge-churn", "converge-escalation" or "converge-cross-sell".

Aliases, never stages. `champion` answers; `challenger` is the previous
champion after a promotion (scored in shadow by the scoring service, and the
obvious way back). A candidate that fails its gates gets no alias: the
decision and the figures are recorded on its version, and its version number
is enough to promote it later. After a rollback the rolled-back version
loses any alias.

`promote` gates: the candidate and the current champion are evaluated on the
same recent frame (passed in); the candidate must have the champion's
feature schema (the logged signature's inputs and the categorical features),
its AUC must not be lower than the champion's by more than `margin_auc` and
its ECE not higher by more than `margin_ece`. Without a champion, its AUC
must exceed 0.5 + `margin_auc` (no skill). Every decision, with both models'
figures and who asked, goes into tags on the version (`converge.promotion.*`)
and on the registered model (`converge.last_promotion`).

Alias history. Every alias move is appended as a registered-model tag
`converge.alias_event.<sequence>` (JSON: alias, version, action, time, who,
why): stored with the registry, listable by `alias_history`, so a score
logged with a time can be traced to the version that was champion then.
Moves made outside Converge (the MLflow UI) are not in it. `rollback` moves
`champion` back along the history: promotions push, rollbacks pop.

Serving state. MLflow moves one alias per call; a promotion moves two. Every
Converge move goes through a commit point, the registered-model tag
`converge.serving` ("moving" with the states before and after, the alias
moves, then "settled"), and `serving_state` reads champion and challenger as
one committed state: a watcher polling it never sees a move half-done (see
`serving_state` for aliases moved outside Converge and abandoned moves).

Loading for serving. `converge.models.handle.ModelHandle` loads one version
(booster, calibrator, input schema and the serving files of
`serving_artifacts`), checks it and predicts on numpy matrices.
`load_version` / `load_champion` give the `NativeModel` for the command line
and the promotion gates.

No global state. Every call goes through this registry's `MlflowClient`
(tracking and registry URI given): MLflow's fluent API reads and writes the
process-wide tracking URI and `MLFLOW_TRACKING_URI`, which threads of a
server cannot share, so it is not used, training's logging included.

Writers: promotion and rollback read then write the registry; run them one
at a time per prediction (the CLI, a retraining job), not concurrently.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from converge.models import native, serving_artifacts
from converge.models.dataset import PREDICTIONS, Prediction, TrainingFrame, check_prediction
from converge.models.evaluation import Evaluation, EvaluationError, evaluate
from converge.models.native import NATIVE_ARTIFACT, NativeModel

if TYPE_CHECKING:
    from converge.features.transform import InputSchema

REGISTERED_MODEL_NAMES: dict[Prediction, str] = {
    "churn": "converge-churn",
    "escalation": "converge-escalation",
    "cross_sell": "converge-cross-sell",
}
CHAMPION = "champion"
CHALLENGER = "challenger"
ALIASES = (CHAMPION, CHALLENGER)
EVENT_TAG = "converge.alias_event."
PROMOTION_TAG = "converge.promotion."
DEFAULT_MARGIN_AUC = 0.01
DEFAULT_MARGIN_ECE = 0.02
MODEL_ARTIFACT = "model"
# The registered-model tag watchers read as the commit point of alias moves.
SERVING_TAG = "converge.serving"
# A "moving" commit point older than this was abandoned by its writer (alias
# moves take well under a second, over a slow tracking server seconds).
MOVE_TIMEOUT = timedelta(minutes=10)
_CONFIRM_TRIES = 5


# --- errors -------------------------------------------------------------------------


class RegistryError(Exception):
    """A registry operation cannot be done as asked."""


class RegistryUnavailable(RegistryError):
    """The MLflow tracking store or server cannot be reached."""


class ModelNotFound(RegistryError, LookupError):
    """No such registered model, version or alias."""


class NothingToRollBack(RegistryError):
    """The alias history has no earlier champion to go back to."""


# --- where the store is -------------------------------------------------------------


def data_dir_default() -> Path:
    return Path(os.environ.get("CONVERGE_DATA_DIR") or "var")


def tracking_uri_default(data_dir: Path | None = None) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store under
    `<data_dir>/mlflow/` (default data dir: `$CONVERGE_DATA_DIR` or `var`)."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    directory = (data_dir or data_dir_default()).resolve() / "mlflow"
    return f"sqlite:///{directory / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


def registered_model_name(prediction: str) -> str:
    return REGISTERED_MODEL_NAMES[check_prediction(prediction)]


def _now() -> datetime:
    return datetime.now(UTC)


# --- results ------------------------------------------------------------------------


@dataclass(frozen=True)
class RegisteredVersion:
    prediction: Prediction
    name: str
    version: str
    run_id: str
    model_uri: str  # models:/<name>/<version>


@dataclass(frozen=True)
class PromotionDecision:
    prediction: Prediction
    name: str
    version: str
    promoted: bool
    reasons: tuple[str, ...]
    requested_by: str
    decided_at: datetime
    candidate: Evaluation | None
    champion_version: str | None = None
    champion: Evaluation | None = None
    margin_auc: float = DEFAULT_MARGIN_AUC
    margin_ece: float = DEFAULT_MARGIN_ECE

    def to_dict(self) -> dict[str, Any]:
        return {
            "prediction": self.prediction,
            "name": self.name,
            "version": self.version,
            "promoted": self.promoted,
            "reasons": list(self.reasons),
            "requested_by": self.requested_by,
            "decided_at": self.decided_at.isoformat(),
            "candidate": self.candidate.to_dict() if self.candidate else None,
            "champion_version": self.champion_version,
            "champion": self.champion.to_dict() if self.champion else None,
            "margin_auc": self.margin_auc,
            "margin_ece": self.margin_ece,
        }


@dataclass(frozen=True)
class RollbackResult:
    prediction: Prediction
    name: str
    from_version: str
    to_version: str
    requested_by: str
    at: datetime


@dataclass(frozen=True)
class AliasPeriod:
    """`alias` pointed at `version` from `from_time` until `to_time` (None:
    still does)."""

    alias: str
    version: str
    from_time: datetime
    to_time: datetime | None
    who: str
    why: str
    action: str

    def covers(self, when: datetime) -> bool:
        return self.from_time <= when and (self.to_time is None or when < self.to_time)


@dataclass(frozen=True)
class ModelSummary:
    prediction: Prediction
    name: str
    exists: bool
    versions: int = 0
    latest_version: str | None = None
    champion: str | None = None
    challenger: str | None = None
    champion_auc: float | None = None
    champion_ece: float | None = None
    champion_feature_set_version: str | None = None
    champion_run_id: str | None = None


@dataclass(frozen=True)
class LoadedModel:
    """A version loaded for serving: the native model and where it came from."""

    model: NativeModel
    prediction: Prediction
    name: str
    version: str
    run_id: str
    alias: str
    feature_set_version: str
    tags: Mapping[str, str] = field(default_factory=dict)

    @property
    def input_schema(self) -> InputSchema | None:
        """The exact inputs and categories the version was trained on (None
        for versions registered before input schemas were stored)."""
        from converge.features.transform import InputSchema

        data = self.model.input_schema
        return InputSchema.from_dict(data) if data is not None else None


@dataclass(frozen=True)
class ServingState:
    """Which versions a prediction's watchers serve, read as one.

    `generation` grows with every Converge move (0 before the first);
    `moving` says a move is under way and this is the state before it;
    `source` is "converge" (the commit point) or "aliases" (no commit point,
    or aliases moved outside Converge)."""

    prediction: Prediction
    name: str
    champion: str | None
    challenger: str | None
    generation: int
    moving: bool = False
    source: str = "converge"


@dataclass(frozen=True)
class _Move:
    alias: str
    version: str | None  # None: remove the alias
    action: str
    why: str


@dataclass(frozen=True)
class _Commit:
    """The parsed `converge.serving` tag."""

    seq: int
    phase: str  # "moving" or "settled"
    champion: str | None
    challenger: str | None
    before_champion: str | None
    before_challenger: str | None
    at: datetime

    @classmethod
    def read(cls, tags: Mapping[str, str]) -> _Commit | None:
        text = tags.get(SERVING_TAG)
        if text is None:
            return None
        try:
            data = json.loads(text)
            before = data.get("before") or {}
            return cls(
                seq=int(data["seq"]),
                phase=str(data["phase"]),
                champion=data.get("champion"),
                challenger=data.get("challenger"),
                before_champion=before.get(CHAMPION),
                before_challenger=before.get(CHALLENGER),
                at=datetime.fromisoformat(data["at"]),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # written by hand: the aliases answer

    def abandoned(self, now: datetime) -> bool:
        return now - self.at > MOVE_TIMEOUT

    def state(self, prediction: Prediction, name: str, before: bool = False) -> ServingState:
        if before:
            return ServingState(
                prediction,
                name,
                self.before_champion,
                self.before_challenger,
                generation=self.seq - 1,
                moving=True,
            )
        return ServingState(prediction, name, self.champion, self.challenger, generation=self.seq)


def _commit_tag(registered: Any) -> str | None:
    return dict(registered.tags).get(SERVING_TAG)


def _alias_pair(registered: Any) -> tuple[str | None, str | None]:
    aliases = {a: str(v) for a, v in (getattr(registered, "aliases", None) or {}).items()}
    return aliases.get(CHAMPION), aliases.get(CHALLENGER)


@dataclass(frozen=True)
class _Event:
    seq: int
    alias: str
    version: str | None  # None: the alias was removed
    action: str
    at: datetime
    who: str
    why: str


# --- the registry -------------------------------------------------------------------


class ModelRegistry:
    """Converge's view of one MLflow tracking store and registry."""

    def __init__(
        self,
        tracking_uri: str | None = None,
        data_dir: Path | None = None,
        artifact_location: str | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri or tracking_uri_default(data_dir)
        db = _sqlite_path(self.tracking_uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
            if artifact_location is None:
                artifact_location = (db.parent / "artifacts").resolve().as_uri()
        self.artifact_location = artifact_location
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)

    # --- plumbing ---------------------------------------------------------------------

    def check_reachable(self, timeout_s: float = 5.0) -> None:
        """Raises `RegistryUnavailable` when the store cannot be used."""
        uri = self.tracking_uri
        if uri.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
                    pass
            except (urllib.error.URLError, OSError) as e:
                raise RegistryUnavailable(f"MLflow at {uri} cannot be reached: {e}") from e
        try:
            self.client.search_registered_models(max_results=1)
        except Exception as e:
            raise RegistryUnavailable(f"MLflow store {uri} cannot be used: {e}") from e

    def _experiment_id(self, prediction: Prediction) -> str:
        name = REGISTERED_MODEL_NAMES[prediction]
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return str(experiment.experiment_id)
        return str(
            self.client.create_experiment(
                name,
                artifact_location=self.artifact_location,
                tags={"converge.prediction": prediction},
            )
        )

    def _version(self, name: str, version: str) -> Any:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(name, str(version))
        except MlflowException as e:
            raise ModelNotFound(f"{name} has no version {version}") from e

    def _alias(self, name: str, alias: str) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def _registered(self, name: str) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(name)
        except MlflowException:
            return None

    # --- logging a training -----------------------------------------------------------

    def log_training(
        self,
        trained: NativeModel,
        evaluation: Evaluation,
        frames: Mapping[str, TrainingFrame],
        plots: Sequence[Path] = (),
        params: Mapping[str, Any] | None = None,
        requested_by: str = "",
        description: str = "",
    ) -> RegisteredVersion:
        """One MLflow run for one training, and a new registered version.

        `frames` maps "train", "valid" and "test" (any subset) to the parts
        used; each is logged as a dataset input. `params` are logged beside
        the training configuration (when `trained` has one).
        """
        import mlflow
        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model, infer_signature
        from mlflow.tracking.context import registry as context_registry
        from mlflow.types.schema import AnyType, ColSpec, Schema

        prediction = check_prediction(trained.prediction)
        name = REGISTERED_MODEL_NAMES[prediction]
        train = frames.get("train")
        test = frames.get("test")
        experiment_id = self._experiment_id(prediction)
        stamp = _now().strftime("%Y%m%dT%H%M%SZ")
        tags = {
            "converge.prediction": prediction,
            "converge.feature_set_version": trained.feature_set_version,
            "converge.requested_by": requested_by,
        }
        if train is not None:
            tags["converge.training_window_start"] = train.window[0].isoformat()
            tags["converge.training_window_end"] = train.window[1].isoformat()
            tags["converge.source"] = train.source
        if test is not None:
            tags["converge.test_window_start"] = test.window[0].isoformat()
            tags["converge.test_window_end"] = test.window[1].isoformat()
        all_params: dict[str, Any] = {}
        config = getattr(trained, "config", None)
        if config is not None:
            all_params.update(config.model_dump())
        stats = getattr(trained, "stats", None)
        if stats is not None:
            all_params.update(
                {
                    "scale_pos_weight": round(stats.scale_pos_weight, 6),
                    "calibration": stats.calibration,
                    "rounds_trained": stats.rounds_trained,
                    "n_train": stats.n_train,
                    "n_train_positive": stats.n_train_positive,
                    "n_valid": stats.n_valid,
                    "n_valid_positive": stats.n_valid_positive,
                }
            )
        all_params["best_iteration"] = trained.best_iteration
        all_params["n_features"] = len(trained.feature_names)
        all_params["categorical_features"] = ",".join(trained.categorical_features) or "-"
        all_params.update(params or {})

        example_source = test if test is not None else train
        if example_source is None:
            raise ValueError("log_training needs at least the train or test frame")
        example = example_source.frame.loc[:, list(trained.feature_names)].head(5).copy()
        for col in trained.categorical_features:
            example[col] = example[col].astype(object)
        with _integer_hint_silenced():
            signature = infer_signature(example, np.zeros(len(example)))
        # Categorical columns accept their values as they are (strings from
        # JSON, or pandas categories): the model maps them onto its levels.
        signature.inputs = Schema(
            [
                ColSpec(AnyType(), c.name, required=c.required)
                if c.name in trained.categorical_features
                else c
                for c in signature.inputs.inputs
            ]
        )
        requirements = _pip_requirements()
        served = serving_artifacts.build(trained, frames)
        assert served.thresholds is not None
        all_params.update(
            {
                "risk_threshold_medium": served.thresholds.medium,
                "risk_threshold_high": served.thresholds.high,
                "risk_threshold_critical": served.thresholds.critical,
            }
        )
        metrics = evaluation.metrics("test_")
        if stats is not None and np.isfinite(stats.valid_auc_raw):
            metrics["valid_auc_raw"] = stats.valid_auc_raw
            metrics["train_seconds"] = stats.seconds
        metadata = {
            "converge_prediction": prediction,
            "converge_feature_set_version": trained.feature_set_version,
        }

        # Everything through `self.client`, never MLflow's fluent API: the
        # fluent calls (start_run, log_model) read and write the process-wide
        # tracking URI, which a server with threads must not share. This is
        # what `mlflow.pyfunc.log_model` does, step for step (MLflow 3's
        # `Model.log`), with this registry's client.
        client = self.client
        run = client.create_run(
            experiment_id,
            run_name=f"{prediction}-{stamp}",
            tags=context_registry.resolve_tags(tags),
        )
        run_id = run.info.run_id
        logged = None
        try:
            _log_batches(client, run_id, {k: _param(v) for k, v in all_params.items()}, metrics)
            client.log_dict(run_id, evaluation.to_dict(), "evaluation.json")
            if trained.input_schema is not None:
                # Beside the run as well as inside the model, for people reading the run.
                client.log_dict(run_id, dict(trained.input_schema), native.SCHEMA_FILE)
            for plot in plots:
                client.log_artifact(run_id, str(plot), artifact_path="plots")
            client.log_inputs(run_id, datasets=[_frame_input(f, p) for p, f in frames.items()])
            logged = client.create_logged_model(
                experiment_id,
                name=MODEL_ARTIFACT,
                source_run_id=run_id,
                params={k: str(_param(v)) for k, v in all_params.items()},
                tags=context_registry.resolve_tags(),
            )
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
            with tempfile.TemporaryDirectory() as tmp, _integer_hint_silenced():
                native_dir = trained.save(Path(tmp) / NATIVE_ARTIFACT)
                serving_dir = served.save(Path(tmp) / serving_artifacts.SERVING_ARTIFACT)
                model_dir = Path(tmp) / MODEL_ARTIFACT
                mlflow.pyfunc.save_model(
                    path=str(model_dir),
                    python_model=native.__file__,
                    artifacts={
                        NATIVE_ARTIFACT: str(native_dir),
                        serving_artifacts.SERVING_ARTIFACT: str(serving_dir),
                    },
                    signature=signature,
                    input_example=example,
                    pip_requirements=requirements,
                    metadata=metadata,
                    mlflow_model=Model(
                        artifact_path=logged.artifact_location,
                        model_uuid=logged.model_id,
                        run_id=run_id,
                        model_id=logged.model_id,
                    ),
                )
                # Saving a model from code imports it, which may leave bytecode behind.
                for pycache in list(model_dir.rglob("__pycache__")):
                    shutil.rmtree(pycache, ignore_errors=True)
                client.log_model_artifacts(logged.model_id, str(model_dir))
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.READY)
        except BaseException:
            if logged is not None:
                client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")
        version_tags = {
            **tags,
            "converge.run_id": run_id,
            "converge.feature_schema": json.dumps(
                native.feature_schema(trained.feature_names, trained.categorical_features)
            ),
            **{f"converge.{k}": f"{v:.6g}" for k, v in evaluation.metrics("test_").items()},
            serving_artifacts.THRESHOLDS_TAG: json.dumps(
                served.thresholds.to_dict(), sort_keys=True
            ),
        }
        summary = description or (
            f"{prediction}: test AUC {evaluation.roc_auc:.3f}, ECE {evaluation.ece:.3f} on "
            f"{evaluation.n} rows ({evaluation.window[0]} .. {evaluation.window[1]})"
        )
        self._ensure_registered(name, prediction)
        # The source is the logged model's own location, not `models:/<id>`:
        # MLflow's SQL store resolves a `models:/` source through the global
        # tracking URI (a TODO in its `create_model_version`), not this client's.
        mv = self.client.create_model_version(
            name,
            source=logged.artifact_location,
            run_id=run_id,
            tags=version_tags,
            description=summary,
            model_id=logged.model_id,
        )
        version = str(mv.version)
        return RegisteredVersion(prediction, name, version, run_id, f"models:/{name}/{version}")

    def _ensure_registered(self, name: str, prediction: Prediction) -> None:
        from mlflow.exceptions import MlflowException

        if self._registered(name) is not None:
            return
        try:
            self.client.create_registered_model(
                name,
                tags={"converge.prediction": prediction},
                description=f"Converge {prediction} model; aliases champion and challenger.",
            )
        except MlflowException as e:
            if "already exists" not in str(e).lower():
                raise

    # --- loading ----------------------------------------------------------------------

    def download_version(self, prediction: str, version: str, destination: Path) -> Path:
        """Copies a version's model directory (MLmodel, `native`, `serving`)
        into `destination`, a local directory the caller owns and removes;
        returns the model directory. Through this registry's client and
        tracking URI only (a server downloads versions all day: nothing is
        left behind in a temporary directory MLflow would pick)."""
        name = registered_model_name(prediction)
        return self._download(name, version, destination)

    def _download(self, name: str, version: str, destination: Path, path: str = "") -> Path:
        import mlflow
        from mlflow.exceptions import MlflowException

        try:
            uri = self.client.get_model_version_download_uri(name, str(version))
        except MlflowException as e:
            raise ModelNotFound(f"{name} has no version {version}") from e
        if path:
            uri = f"{uri.rstrip('/')}/{path}"
        destination.mkdir(parents=True, exist_ok=True)
        return Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(destination), tracking_uri=self.tracking_uri
            )
        )

    def version_info(self, prediction: str, version: str) -> tuple[str, str, dict[str, str]]:
        """A version's (version, run id, tags); raises `ModelNotFound`."""
        name = registered_model_name(prediction)
        mv = self._version(name, version)
        return str(mv.version), str(mv.run_id or ""), dict(mv.tags)

    def load_version(self, prediction: str, version: str, num_threads: int = 2) -> LoadedModel:
        """The native model of one version (see `load_champion`)."""
        from mlflow.models import Model

        p = check_prediction(prediction)
        name = REGISTERED_MODEL_NAMES[p]
        mv = self._version(name, version)
        with tempfile.TemporaryDirectory(prefix="converge-model-") as tmp:
            root = self._download(name, str(mv.version), Path(tmp))
            flavor = Model.load(str(root)).flavors["python_function"]
            relative = flavor["artifacts"][NATIVE_ARTIFACT]["path"]
            # Read into memory (booster, calibrator, schema): the files go with `tmp`.
            model = NativeModel.load(root / relative, num_threads=num_threads)
        return LoadedModel(
            model=model,
            prediction=p,
            name=name,
            version=str(mv.version),
            run_id=str(mv.run_id or ""),
            alias="",
            feature_set_version=model.feature_set_version,
            tags=dict(mv.tags),
        )

    def load_champion(
        self, prediction: str, alias: str = CHAMPION, num_threads: int = 2
    ) -> LoadedModel:
        """The version behind `models:/<name>@<alias>`, loaded natively
        (booster and calibrator, no pyfunc), with its version and run id.
        Raises `ModelNotFound` when the alias is not set."""
        p = check_prediction(prediction)
        name = REGISTERED_MODEL_NAMES[p]
        mv = self._alias(name, alias)
        if mv is None:
            raise ModelNotFound(f"{name} has no {alias!r} alias")
        loaded = self.load_version(p, str(mv.version), num_threads=num_threads)
        return LoadedModel(
            model=loaded.model,
            prediction=p,
            name=name,
            version=loaded.version,
            run_id=loaded.run_id,
            alias=alias,
            feature_set_version=loaded.feature_set_version,
            tags=loaded.tags,
        )

    def _signature_inputs(self, name: str, version: str) -> list[dict[str, Any]]:
        """The logged signature's input columns (name, type, required)."""
        from mlflow.models import Model

        with tempfile.TemporaryDirectory(prefix="converge-mlmodel-") as tmp:
            signature = Model.load(
                str(self._download(name, version, Path(tmp), "MLmodel"))
            ).signature
        if signature is None:
            return []
        return list(signature.inputs.to_dict())

    # --- aliases and their history ----------------------------------------------------

    def _events(self, name: str) -> list[_Event]:
        registered = self._registered(name)
        if registered is None:
            return []
        events = []
        for key, value in registered.tags.items():
            if not key.startswith(EVENT_TAG):
                continue
            data = json.loads(value)
            events.append(
                _Event(
                    seq=int(data["seq"]),
                    alias=data["alias"],
                    version=data["version"],
                    action=data["action"],
                    at=datetime.fromisoformat(data["at"]),
                    who=data["who"],
                    why=data["why"],
                )
            )
        return sorted(events, key=lambda e: e.seq)

    def _move_alias(
        self, name: str, alias: str, version: str | None, action: str, who: str, why: str
    ) -> None:
        """Points `alias` at `version` (None: removes it) and appends the move
        to the history."""
        if version is None:
            if self._alias(name, alias) is None:
                return
            self.client.delete_registered_model_alias(name, alias)
        else:
            self.client.set_registered_model_alias(name, alias, str(version))
        seq = max((e.seq for e in self._events(name)), default=0) + 1
        event = {
            "seq": seq,
            "alias": alias,
            "version": None if version is None else str(version),
            "action": action,
            "at": _now().isoformat(),
            "who": who,
            "why": why[:2000],
        }
        key = f"{EVENT_TAG}{seq:06d}.{secrets.token_hex(3)}"
        self.client.set_registered_model_tag(name, key, json.dumps(event, sort_keys=True))

    # --- what watchers serve ---------------------------------------------------------

    def serving_state(self, prediction: str) -> ServingState:
        """The champion and challenger versions as one consistent read, for a
        watcher (the scoring service) to poll: always a state a promotion or
        rollback committed, never one half-way through it.

        MLflow moves one alias per call and has no transaction over two, so
        Converge's moves go through a commit point, the registered-model tag
        `converge.serving` (one row, written atomically): first "moving"
        with the state before and after, then the aliases, then "settled"
        with the state after (`_transition`). A watcher that reads "moving"
        serves the state before; "settled" whose versions equal the aliases
        is the state after. Aliases that differ from a settled commit point
        were moved outside Converge (the MLflow UI): the aliases are the
        truth then, read between two equal commit points, so that no
        Converge move overlapped the read. A "moving" older than
        `MOVE_TIMEOUT` was abandoned (its writer died): the aliases again.
        Usually one `get_registered_model` call; three when the aliases
        must be confirmed."""
        p = check_prediction(prediction)
        name = REGISTERED_MODEL_NAMES[p]
        first = self._registered(name)
        for _ in range(_CONFIRM_TRIES):
            if first is None:
                return ServingState(p, name, None, None, generation=0)
            commit = _Commit.read(first.tags)
            if commit is not None and commit.phase == "moving" and not commit.abandoned(_now()):
                return commit.state(p, name, before=True)
            if (
                commit is not None
                and commit.phase == "settled"
                and _alias_pair(first) == (commit.champion, commit.challenger)
            ):
                return commit.state(p, name)
            middle = self._registered(name)
            last = self._registered(name)
            if middle is not None and last is not None and _commit_tag(first) == _commit_tag(last):
                champion, challenger = _alias_pair(middle)
                return ServingState(
                    p,
                    name,
                    champion,
                    challenger,
                    generation=0 if commit is None else commit.seq,
                    source="aliases",
                )
            first = last  # a Converge move committed meanwhile: read it again
        raise RegistryError(f"{name}: the serving state kept changing while it was read")

    def _transition(self, prediction: Prediction, moves: Sequence[_Move], who: str) -> None:
        """Moves the aliases as one step for watchers (see `serving_state`):
        the commit point says "moving" (before and after), the aliases move,
        each move goes into the alias history, and the commit point says
        "settled". The champion moves first, so that tools reading the
        aliases alone (MLflow's UI, `models:/<name>@champion`) see the new
        champion no later than its demoted predecessor as challenger."""
        name = REGISTERED_MODEL_NAMES[prediction]
        before = self.serving_state(prediction)
        after = {CHAMPION: before.champion, CHALLENGER: before.challenger}
        for move in moves:
            after[move.alias] = move.version
        seq = before.generation + 1
        at = _now().isoformat()
        self._write_commit(
            name,
            {
                "seq": seq,
                "phase": "moving",
                "champion": after[CHAMPION],
                "challenger": after[CHALLENGER],
                "before": {CHAMPION: before.champion, CHALLENGER: before.challenger},
                "at": at,
                "who": who,
            },
        )
        for move in sorted(moves, key=lambda m: m.alias != CHAMPION):
            self._move_alias(name, move.alias, move.version, move.action, who, move.why)
        self._write_commit(
            name,
            {
                "seq": seq + 1,
                "phase": "settled",
                "champion": after[CHAMPION],
                "challenger": after[CHALLENGER],
                "at": _now().isoformat(),
                "who": who,
            },
        )

    def _write_commit(self, name: str, commit: Mapping[str, Any]) -> None:
        self.client.set_registered_model_tag(name, SERVING_TAG, json.dumps(commit, sort_keys=True))

    def alias_history(self, prediction: str, alias: str | None = None) -> list[AliasPeriod]:
        """Which version each alias pointed at, from when to when, oldest first."""
        name = registered_model_name(prediction)
        periods: list[AliasPeriod] = []
        open_period: dict[str, _Event] = {}
        for event in self._events(name):
            if alias is not None and event.alias != alias:
                continue
            previous = open_period.pop(event.alias, None)
            if previous is not None:
                periods.append(_period(previous, event.at))
            if event.version is not None:
                open_period[event.alias] = event
        periods.extend(_period(e, None) for e in open_period.values())
        return sorted(periods, key=lambda p: (p.from_time, p.alias))

    def version_at(self, prediction: str, when: datetime, alias: str = CHAMPION) -> str | None:
        """The version `alias` pointed at, at time `when` (None if none)."""
        for period in self.alias_history(prediction, alias):
            if period.covers(when):
                return period.version
        return None

    # --- promotion and rollback -------------------------------------------------------

    def promote(
        self,
        prediction: str,
        version: str,
        eval_frame: TrainingFrame,
        requested_by: str,
        margin_auc: float = DEFAULT_MARGIN_AUC,
        margin_ece: float = DEFAULT_MARGIN_ECE,
        reason: str = "",
        allow_schema_change: bool = False,
    ) -> PromotionDecision:
        """Runs the gates and moves `champion` to `version` only if they pass.

        `eval_frame` is a recent labelled frame (typically the newest test
        period) on which candidate and champion are both evaluated.
        `allow_schema_change` lets a new feature set replace the champion:
        the schema gate is waived (and recorded as waived) and, since the
        champion cannot be evaluated on the new features, the candidate must
        then beat no skill as if there were no champion.
        """
        p = check_prediction(prediction)
        if eval_frame.prediction != p:
            raise ValueError(f"the evaluation frame is for {eval_frame.prediction}, not {p}")
        if not requested_by:
            raise ValueError("requested_by is required: promotions are never anonymous")
        name = REGISTERED_MODEL_NAMES[p]
        version = str(version)
        self._version(name, version)  # ModelNotFound
        champion_mv = self._alias(name, CHAMPION)
        champion_version = None if champion_mv is None else str(champion_mv.version)
        reasons: list[str] = []
        candidate_eval: Evaluation | None = None
        champion_eval: Evaluation | None = None
        passed = True

        if champion_version == version:
            # Nothing would change, so nothing is recorded.
            return PromotionDecision(
                prediction=p,
                name=name,
                version=version,
                promoted=False,
                reasons=(f"version {version} is already the champion",),
                requested_by=requested_by,
                decided_at=_now(),
                candidate=None,
                champion_version=champion_version,
                margin_auc=margin_auc,
                margin_ece=margin_ece,
            )
        candidate = self.load_version(p, version).model
        missing = [f for f in candidate.feature_names if f not in eval_frame.frame.columns]
        if missing:
            reasons.append(f"the evaluation frame lacks the candidate's features: {missing}")
            passed = False
        if passed:
            try:
                candidate_eval = evaluate(candidate, eval_frame)
            except EvaluationError as e:
                reasons.append(f"candidate cannot be evaluated: {e}")
                passed = False
        compare_to_champion = passed and champion_version is not None
        if compare_to_champion:
            assert champion_version is not None
            differences = self._schema_differences(name, champion_version, version)
            if differences:
                if allow_schema_change:
                    reasons.append(
                        "feature schema differs from the champion's "
                        f"({'; '.join(differences)}); gate waived by {requested_by}"
                    )
                    compare_to_champion = False
                else:
                    reasons.append(
                        f"feature schema differs from champion v{champion_version}: "
                        + "; ".join(differences)
                    )
                    passed = False
                    compare_to_champion = False
        if compare_to_champion:
            assert candidate_eval is not None and champion_version is not None
            champion = self.load_version(p, champion_version).model
            champion_eval = evaluate(champion, eval_frame)
            auc_floor = champion_eval.roc_auc - margin_auc
            ece_ceiling = champion_eval.ece + margin_ece
            if candidate_eval.roc_auc < auc_floor:
                passed = False
                reasons.append(
                    f"AUC {candidate_eval.roc_auc:.4f} is below champion v{champion_version}'s "
                    f"{champion_eval.roc_auc:.4f} by more than the margin {margin_auc}"
                )
            else:
                reasons.append(
                    f"AUC {candidate_eval.roc_auc:.4f} vs champion's {champion_eval.roc_auc:.4f} "
                    f"(margin {margin_auc}): ok"
                )
            if candidate_eval.ece > ece_ceiling:
                passed = False
                reasons.append(
                    f"ECE {candidate_eval.ece:.4f} exceeds champion v{champion_version}'s "
                    f"{champion_eval.ece:.4f} by more than the margin {margin_ece}"
                )
            else:
                reasons.append(
                    f"ECE {candidate_eval.ece:.4f} vs champion's {champion_eval.ece:.4f} "
                    f"(margin {margin_ece}): ok"
                )
        elif passed:
            assert candidate_eval is not None
            floor = 0.5 + margin_auc
            if candidate_eval.roc_auc <= floor:
                passed = False
                reasons.append(
                    f"AUC {candidate_eval.roc_auc:.4f} does not beat no skill (needs > {floor})"
                )
            else:
                reasons.append(
                    f"no champion to compare with; AUC {candidate_eval.roc_auc:.4f} > {floor}: ok"
                )
        if reason:
            reasons.append(f"asked because: {reason}")

        decision = PromotionDecision(
            prediction=p,
            name=name,
            version=version,
            promoted=passed,
            reasons=tuple(reasons),
            requested_by=requested_by,
            decided_at=_now(),
            candidate=candidate_eval,
            champion_version=champion_version,
            champion=champion_eval,
            margin_auc=margin_auc,
            margin_ece=margin_ece,
        )
        if passed:
            why = f"promoted by {requested_by}" + (f": {reason}" if reason else "")
            moves = [_Move(CHAMPION, version, "promote", why)]
            if champion_version is not None:
                moves.append(
                    _Move(
                        CHALLENGER,
                        champion_version,
                        "demote",
                        f"previous champion, replaced by v{version}",
                    )
                )
            else:
                challenger = self._alias(name, CHALLENGER)
                if challenger is not None and str(challenger.version) == version:
                    moves.append(_Move(CHALLENGER, None, "clear", "became champion"))
            self._transition(p, moves, requested_by)
        self._record_decision(decision)
        return decision

    def _schema_differences(self, name: str, champion: str, candidate: str) -> list[str]:
        """How the candidate's logged input schema differs from the champion's."""
        a = self._signature_inputs(name, champion)
        b = self._signature_inputs(name, candidate)
        diffs: list[str] = []
        a_cols = {c.get("name"): c.get("type") for c in a}
        b_cols = {c.get("name"): c.get("type") for c in b}
        missing = [n for n in a_cols if n not in b_cols]
        extra = [n for n in b_cols if n not in a_cols]
        if missing:
            diffs.append(f"missing {missing}")
        if extra:
            diffs.append(f"extra {extra}")
        retyped = [
            f"{n}: {a_cols[n]} -> {b_cols[n]}"
            for n in a_cols
            if n in b_cols and a_cols[n] != b_cols[n]
        ]
        if retyped:
            diffs.append(f"types changed {retyped}")
        if not missing and not extra and list(a_cols) != list(b_cols):
            diffs.append("feature order differs")
        a_schema = json.loads(
            self._version(name, champion).tags.get("converge.feature_schema", "{}")
        )
        b_schema = json.loads(
            self._version(name, candidate).tags.get("converge.feature_schema", "{}")
        )
        if a_schema.get("categorical_features") != b_schema.get("categorical_features"):
            diffs.append(
                f"categorical features {a_schema.get('categorical_features')} -> "
                f"{b_schema.get('categorical_features')}"
            )
        return diffs

    def _record_decision(self, decision: PromotionDecision) -> None:
        name, version = decision.name, decision.version
        tags: dict[str, str] = {
            "decision": "promoted" if decision.promoted else "refused",
            "reasons": json.dumps(list(decision.reasons)),
            "requested_by": decision.requested_by,
            "decided_at": decision.decided_at.isoformat(),
            "champion_version": decision.champion_version or "",
            "margin_auc": str(decision.margin_auc),
            "margin_ece": str(decision.margin_ece),
        }
        for who, ev in (("candidate", decision.candidate), ("champion", decision.champion)):
            if ev is not None:
                tags[f"{who}_auc"] = f"{ev.roc_auc:.6f}"
                tags[f"{who}_ece"] = f"{ev.ece:.6f}"
                tags[f"{who}_pr_auc"] = f"{ev.pr_auc:.6f}"
                tags[f"{who}_log_loss"] = f"{ev.log_loss:.6f}"
        if decision.candidate is not None:
            tags["eval_rows"] = str(decision.candidate.n)
            tags["eval_window"] = " .. ".join(decision.candidate.window)
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, PROMOTION_TAG + key, value)
        self.client.set_registered_model_tag(
            name, "converge.last_promotion", json.dumps(decision.to_dict(), sort_keys=True)
        )

    def rollback(self, prediction: str, requested_by: str, reason: str = "") -> RollbackResult:
        """Moves `champion` back to the version that was champion before the
        current one (by the alias history: promotions push, rollbacks pop)."""
        if not requested_by:
            raise ValueError("requested_by is required: rollbacks are never anonymous")
        p = check_prediction(prediction)
        name = REGISTERED_MODEL_NAMES[p]
        current = self._alias(name, CHAMPION)
        if current is None:
            raise NothingToRollBack(f"{name} has no champion")
        current_version = str(current.version)
        stack: list[str] = []
        for event in self._events(name):
            if event.alias != CHAMPION or event.version is None:
                continue
            if event.action == "rollback":
                if stack:
                    stack.pop()
            else:
                stack.append(event.version)
        # The live alias is the truth; drop whatever the history has above it.
        while stack and stack[-1] != current_version:
            stack.pop()
        earlier = [v for v in stack[:-1] if v != current_version]
        if not earlier:
            raise NothingToRollBack(
                f"{name}: no earlier champion than v{current_version} in the alias history"
            )
        target = earlier[-1]
        why = f"rollback from v{current_version} by {requested_by}" + (
            f": {reason}" if reason else ""
        )
        moves = [_Move(CHAMPION, target, "rollback", why)]
        challenger = self._alias(name, CHALLENGER)
        if challenger is not None and str(challenger.version) in (target, current_version):
            moves.append(_Move(CHALLENGER, None, "clear", why))
        self._transition(p, moves, requested_by)
        at = _now()
        for key, value in {
            "rolled_back_at": at.isoformat(),
            "rolled_back_by": requested_by,
            "rolled_back_to": target,
            "rolled_back_reason": reason,
        }.items():
            self.client.set_model_version_tag(name, current_version, "converge." + key, value)
        return RollbackResult(p, name, current_version, target, requested_by, at)

    # --- listing ----------------------------------------------------------------------

    def list_models(self) -> list[ModelSummary]:
        """One line per prediction: versions, champion and challenger."""
        out = []
        for p in PREDICTIONS:
            name = REGISTERED_MODEL_NAMES[p]
            registered = self._registered(name)
            if registered is None:
                out.append(ModelSummary(p, name, exists=False))
                continue
            versions = list(self.client.search_model_versions(f"name = '{name}'"))
            numbers = sorted((int(v.version) for v in versions), reverse=True)
            aliases: dict[str, str] = {}
            for alias, number in (getattr(registered, "aliases", None) or {}).items():
                aliases[alias] = str(number)
            champion = aliases.get(CHAMPION)
            tags: Mapping[str, str] = {}
            run_id = None
            if champion is not None:
                mv = self._version(name, champion)
                tags = mv.tags
                run_id = mv.run_id
            out.append(
                ModelSummary(
                    prediction=p,
                    name=name,
                    exists=True,
                    versions=len(numbers),
                    latest_version=str(numbers[0]) if numbers else None,
                    champion=champion,
                    challenger=aliases.get(CHALLENGER),
                    champion_auc=_float(tags.get("converge.test_roc_auc")),
                    champion_ece=_float(tags.get("converge.test_ece")),
                    champion_feature_set_version=tags.get("converge.feature_set_version"),
                    champion_run_id=run_id,
                )
            )
        return out

    def versions(self, prediction: str) -> list[dict[str, Any]]:
        """Every version of a prediction's model with its key tags, newest first."""
        name = registered_model_name(prediction)
        registered = self._registered(name)
        if registered is None:
            return []
        # search_model_versions leaves each version's aliases empty; the
        # registered model holds them (alias -> version).
        aliases: dict[str, list[str]] = {}
        for alias, version in (getattr(registered, "aliases", None) or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        rows = []
        for mv in self.client.search_model_versions(f"name = '{name}'"):
            rows.append(
                {
                    "version": str(mv.version),
                    "run_id": mv.run_id,
                    "created": datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC),
                    "aliases": sorted(aliases.get(str(mv.version), [])),
                    "test_roc_auc": _float(mv.tags.get("converge.test_roc_auc")),
                    "test_ece": _float(mv.tags.get("converge.test_ece")),
                    "feature_set_version": mv.tags.get("converge.feature_set_version"),
                    "decision": mv.tags.get(PROMOTION_TAG + "decision"),
                }
            )
        return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def _period(event: _Event, until: datetime | None) -> AliasPeriod:
    assert event.version is not None
    return AliasPeriod(
        alias=event.alias,
        version=event.version,
        from_time=event.at,
        to_time=until,
        who=event.who,
        why=event.why,
        action=event.action,
    )


def _float(value: str | None) -> float | None:
    try:
        return None if value is None else float(value)
    except ValueError:
        return None


def _param(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 8)
    return value


def _frame_input(frame: TrainingFrame, part: str) -> Any:
    """One part of the data as the run's dataset input (an MLflow `DatasetInput`)."""
    import mlflow
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    context = {"train": "training", "valid": "validation", "test": "testing"}.get(part, part)
    columns = [*frame.feature_names, "entity_id", "cutoff", "label"]
    dataset = mlflow.data.from_pandas(
        frame.frame.loc[:, columns], targets="label", name=f"{frame.prediction}-{part}"
    )
    tags = {
        "converge.window": f"{frame.window[0].isoformat()} .. {frame.window[1].isoformat()}",
        "converge.feature_set_version": frame.feature_set_version[:200],
        "converge.source": frame.source[:200],
        MLFLOW_DATASET_CONTEXT: context,
    }
    return DatasetInput(
        dataset=dataset._to_mlflow_entity(),
        tags=[InputTag(key=k, value=v) for k, v in tags.items()],
    )


def _log_batches(
    client: Any, run_id: str, params: Mapping[str, Any], metrics: Mapping[str, float]
) -> None:
    """Params and metrics in batches MLflow accepts (100 params, 1,000 metrics)."""
    from mlflow.entities import Metric, Param

    stamp = int(_now().timestamp() * 1000)
    items = [Param(k, str(v)) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    values = [Metric(k, float(v), stamp, 0) for k, v in metrics.items()]
    for i in range(0, len(values), 1000):
        client.log_batch(run_id, metrics=values[i : i + 1000])


@contextlib.contextmanager
def _integer_hint_silenced() -> Iterator[None]:
    """MLflow warns that integer columns cannot hold missing values; Converge
    declares count features as integers on purpose (they are never missing)."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=".*Inferred schema contains integer", category=UserWarning
        )
        yield


def _pip_requirements() -> list[str]:
    """The pyfunc model's requirements, pinned to what trained it (given
    explicitly: MLflow's own inference loads the model in a subprocess)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in ("mlflow", "lightgbm", "pandas", "numpy")]

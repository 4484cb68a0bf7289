"""One registered model version held for serving, with an explicit lifecycle.

    handle = ModelHandle(registry, "churn", "7", alias="champion", num_threads=1)
    handle.load()     # download, booster, calibrator, input schema, serving files
    handle.check()    # feature set and stored predictions; raises ModelRefused
    handle.ready      # True: serve it
    handle.predict_with_contributions(handle.schema.vector(...))

Like KServe's `Model` (`load()`, `ready`) and MLServer's registry (load the
new version, then swap): `load` and `check` block (a download, a booster
parse, a few predictions), so a server runs them in its executor, off the
event loop and off the request path, and swaps the handle in with one
reference assignment once it is ready. A version that fails either raises
`ModelRefused` naming the version and what is wrong; the caller keeps
serving what it had.

`check` verifies two things:
- the inputs match the feature set the version claims: the version's
  feature-set version equals the one given (the set the caller serves) or,
  when none is given, a built-in or shipped set of that version; every input
  is one of its features, a profile input (`profile_*`) or the cross-sell
  candidate, and categorical exactly where the feature is;
- it reproduces the calibrated probabilities training stored with it for its
  check sample (`serving_artifacts`), through the numpy path serving uses,
  within `tolerance`.
Versions registered before the serving files existed load and pass, and the
report's `notes` say what could not be checked (and that the default risk
thresholds apply).

Predictions take numpy float matrices built by `InputSchema.matrix` or
`.vector` (one column per input, categories as codes, missing as NaN): no
pandas frame per call. `predict_with_contributions` gets probabilities and
reasons from one tree walk (LightGBM `pred_contrib`: per input, the raw
log-odds it adds, then the bias; a row's contributions sum to its log-odds
before calibration).

Nothing here touches MLflow's global state: the registry's client and
tracking URI do every read.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from converge.features.transform import CANDIDATE, PROFILE_TEXT_FIELDS, InputSchema
from converge.models.dataset import Prediction, check_prediction
from converge.models.native import NATIVE_ARTIFACT, NativeModel
from converge.models.registry import REGISTERED_MODEL_NAMES, ModelRegistry
from converge.models.serving_artifacts import (
    SERVING_ARTIFACT,
    InputSample,
    RiskThresholds,
    ServingArtifactError,
    ServingArtifacts,
)
from converge.models.single_row import MAX_ROWS as SINGLE_ROW_MAX
from converge.models.single_row import SingleRowPredictor

if TYPE_CHECKING:
    from converge.features.engine import FeatureSet

FloatMatrix = npt.NDArray[np.float64]
# How far a loaded version's probability may be from the one training stored
# for the same check row: the same booster text and calibrator give the same
# number up to float rounding (1e-15); anything visible is another model.
DEFAULT_TOLERANCE = 1e-6
# For versions registered without thresholds. Judgement, as the scoring
# service's fallback states it: a fifth of the way to certain is worth a
# look, even odds is high, four in five critical.
DEFAULT_THRESHOLDS = RiskThresholds(
    medium=0.2, high=0.5, critical=0.8, rule="default: 0.2 / 0.5 / 0.8", source="default"
)
PROFILE_INPUTS = frozenset(
    {f"profile_{name}" for name in PROFILE_TEXT_FIELDS} | {"profile_tenure_days"}
)
PROFILE_ATTRIBUTE_PREFIX = "profile_attr_"

State = Literal["new", "loaded", "ready", "refused", "unloaded"]


class ModelRefused(Exception):
    """This version must not serve; the message names it and says why."""

    def __init__(self, name: str, version: str, reason: str) -> None:
        self.name = name
        self.version = version
        self.reason = reason
        super().__init__(f"{name} version {version} refused: {reason}")


@dataclass(frozen=True)
class ModelRef:
    """Names one loaded version (the scoring service turns it into the
    proto `ModelRef`)."""

    name: str
    version: str
    run_id: str
    alias: str
    feature_set_version: str


@dataclass(frozen=True)
class KnownFeatures:
    """The feature set a version is checked against, as plain data: its
    version, its feature names and which of them are categorical (text)."""

    version: str
    names: frozenset[str]
    categorical: frozenset[str] = frozenset()

    @classmethod
    def of(cls, feature_set: FeatureSet) -> KnownFeatures:
        return cls(
            feature_set.version,
            frozenset(feature_set.by_name),
            frozenset(feature_set.category_names),
        )


@dataclass(frozen=True)
class CheckReport:
    """What `check` verified: the check rows reproduced and the largest
    difference from training's probabilities, and `notes` on what could not
    be checked."""

    ref: ModelRef
    feature_set_version: str
    checked_rows: int
    max_difference: float
    notes: tuple[str, ...] = ()


def shipped_feature_set(version: str) -> FeatureSet | None:
    """The built-in or shipped feature set whose version is `version`."""
    from converge.features.config import load_feature_set, shipped_feature_sets
    from converge.features.engine import BUILTIN

    if version == BUILTIN.version:
        return BUILTIN
    name = version.rsplit("-", 1)[0]
    if name not in shipped_feature_sets():
        return None
    found = load_feature_set(name)
    return found if found.version == version else None


def input_problems(schema: InputSchema, features: KnownFeatures) -> list[str]:
    """How a model's inputs disagree with a feature set (empty: they agree)."""
    unknown = [
        name
        for name in schema.names
        if name not in features.names
        and name not in PROFILE_INPUTS
        and not name.startswith(PROFILE_ATTRIBUTE_PREFIX)
        and name != CANDIDATE
    ]
    problems = []
    if unknown:
        shown = ", ".join(unknown[:10]) + (
            f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        )
        problems.append(f"inputs unknown to feature set {features.version}: {shown}")
    text_as_number = [
        n for n in schema.names if n in features.categorical and n not in schema.categories
    ]
    number_as_text = [
        n
        for n in schema.names
        if n in features.names and n not in features.categorical and n in schema.categories
    ]
    if text_as_number:
        problems.append(f"text features read as numbers: {', '.join(text_as_number)}")
    if number_as_text:
        problems.append(f"numeric features read as categories: {', '.join(number_as_text)}")
    return problems


@dataclass(eq=False)
class _Loaded:
    """What `load` holds in memory."""

    model: NativeModel
    schema: InputSchema
    ref: ModelRef
    served: ServingArtifacts
    tags: dict[str, str] = field(default_factory=dict)
    # A few rows at a time go through LightGBM's single-row path (see single_row.py).
    few_rows: SingleRowPredictor | None = None


class ModelHandle:
    """One version of one prediction's model: `load()`, `check()`, `ready`,
    `ref`, `schema`, `thresholds`, `predict`, `predict_with_contributions`."""

    def __init__(
        self,
        registry: ModelRegistry,
        prediction: str,
        version: str,
        alias: str = "",
        num_threads: int = 1,
        tolerance: float = DEFAULT_TOLERANCE,
    ) -> None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, not {num_threads}")
        self.registry = registry
        self.prediction: Prediction = check_prediction(prediction)
        self.name = REGISTERED_MODEL_NAMES[self.prediction]
        self.version = str(version)
        self.alias = alias
        self.num_threads = num_threads
        self.tolerance = tolerance
        self.state: State = "new"
        self.refusal: str = ""
        self._loaded: _Loaded | None = None

    @classmethod
    def for_alias(
        cls, registry: ModelRegistry, prediction: str, alias: str, num_threads: int = 1
    ) -> ModelHandle | None:
        """A handle (not loaded yet) on the version `alias` names in the
        committed serving state (`ModelRegistry.serving_state`); None when
        the alias is unset."""
        state = registry.serving_state(prediction)
        version = {"champion": state.champion, "challenger": state.challenger}.get(alias)
        if version is None:
            return None
        return cls(registry, prediction, version, alias=alias, num_threads=num_threads)

    def __repr__(self) -> str:
        return f"ModelHandle({self.name} v{self.version} @{self.alias or '-'}: {self.state})"

    # --- lifecycle --------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Loaded and checked: fit to serve."""
        return self.state == "ready"

    def load(self) -> None:
        """Downloads the version and reads it into memory (booster, calibrator,
        input schema, serving files); blocks, so run it in an executor.
        Raises `ModelRefused` for a version that cannot be read or whose
        parts disagree, `ModelNotFound` for one that does not exist."""
        if self._loaded is not None:
            return
        version, run_id, tags = self.registry.version_info(self.prediction, self.version)
        try:
            with tempfile.TemporaryDirectory(prefix="converge-handle-") as tmp:
                root = self.registry.download_version(self.prediction, version, Path(tmp))
                self._loaded = self._read(root, run_id, tags)
        except ModelRefused as refused:
            self.state, self.refusal = "refused", refused.reason
            raise
        self.state = "loaded"

    def _refuse(self, reason: str) -> ModelRefused:
        return ModelRefused(self.name, self.version, reason)

    def _read(self, root: Path, run_id: str, tags: dict[str, str]) -> _Loaded:
        from lightgbm.basic import LightGBMError
        from mlflow.models import Model

        try:
            flavor = Model.load(str(root)).flavors["python_function"]
            artifacts = flavor.get("artifacts") or {}
            native_dir = root / artifacts[NATIVE_ARTIFACT]["path"]
        except Exception as e:  # MLmodel missing, not YAML, or not a Converge model
            raise self._refuse(f"its MLmodel file cannot be read as a Converge model: {e!r}") from e
        try:
            model = NativeModel.load(native_dir, num_threads=self.num_threads)
        except (OSError, ValueError, KeyError, TypeError, LightGBMError) as e:
            raise self._refuse(f"its booster or calibrator cannot be read: {e}") from e
        if model.input_schema is None:
            raise self._refuse(
                "it has no input schema (input_schema.json): it was trained before serving "
                "could feed it; retrain it"
            )
        try:
            schema = InputSchema.from_dict(model.input_schema)
        except (ValueError, KeyError, TypeError) as e:
            raise self._refuse(f"its input schema cannot be read: {e!r}") from e
        problems = _booster_problems(model, schema)
        if problems:
            raise self._refuse("; ".join(problems))
        serving_path = artifacts.get(SERVING_ARTIFACT, {}).get("path")
        try:
            served = ServingArtifacts.load(root / serving_path if serving_path else None)
        except ServingArtifactError as e:
            raise self._refuse(f"its serving files are malformed: {e}") from e
        for what, sample in (("check", served.check_sample), ("drift", served.drift_sample)):
            if sample is not None and sample.names != schema.names:
                raise self._refuse(f"its {what} sample has other inputs than its input schema")
        ref = ModelRef(self.name, self.version, run_id, self.alias, model.feature_set_version)
        few_rows = SingleRowPredictor(model.booster, self.num_threads)
        return _Loaded(model, schema, ref, served, tags, few_rows if few_rows.available else None)

    def check(self, features: FeatureSet | KnownFeatures | None = None) -> CheckReport:
        """Verifies the loaded version (see the module's docstring) and makes
        it ready; raises `ModelRefused` saying what is wrong. `features`: the
        feature set the caller serves; without it, the built-in or shipped
        set of the version's feature-set version."""
        loaded = self._need()
        try:
            report = self._check(loaded, features)
        except ModelRefused as refused:
            self.state, self.refusal = "refused", refused.reason
            raise
        self.state = "ready"
        return report

    def _check(self, loaded: _Loaded, features: FeatureSet | KnownFeatures | None) -> CheckReport:
        claimed = loaded.ref.feature_set_version
        if features is None:
            found = shipped_feature_set(claimed)
            if found is None:
                raise self._refuse(
                    f"it was trained on feature set {claimed}, which is neither built in nor "
                    "shipped: check it against the feature set the service serves"
                )
            features = found
        known = features if isinstance(features, KnownFeatures) else KnownFeatures.of(features)
        if known.version != claimed:
            raise self._refuse(f"it was trained on feature set {claimed}, not {known.version}")
        problems = input_problems(loaded.schema, known)
        if problems:
            raise self._refuse("; ".join(problems))

        notes: list[str] = []
        served = loaded.served
        if served.thresholds is None:
            notes.append(
                "no risk thresholds stored with this version: the default "
                f"{DEFAULT_THRESHOLDS.medium} / {DEFAULT_THRESHOLDS.high} / "
                f"{DEFAULT_THRESHOLDS.critical} apply"
            )
        if served.drift_sample is None:
            notes.append("no training sample stored with this version: no drift reference")
        sample = served.check_sample
        if sample is None:
            notes.append("no check sample stored with this version: its predictions are unverified")
            return CheckReport(loaded.ref, known.version, 0, float("nan"), tuple(notes))
        probabilities = self.predict(sample.inputs)
        from_contributions, _ = self.predict_with_contributions(sample.inputs)
        difference = float(np.max(np.abs(probabilities - sample.probabilities), initial=0.0))
        off = int(
            np.sum(~np.isclose(probabilities, sample.probabilities, rtol=0, atol=self.tolerance))
        )
        if off or not np.all(np.isfinite(probabilities)):
            raise self._refuse(
                f"it does not reproduce the probabilities stored at training: {off} of "
                f"{len(probabilities)} check rows differ, by up to {difference:.3g} "
                f"(tolerance {self.tolerance:g})"
            )
        spread = float(np.max(np.abs(from_contributions - probabilities), initial=0.0))
        if spread > self.tolerance:
            raise self._refuse(
                f"its contributions do not add up to its predictions (off by {spread:.3g})"
            )
        return CheckReport(loaded.ref, known.version, len(probabilities), difference, tuple(notes))

    def unload(self) -> None:
        """Lets go of the booster (the caller swapped in another version and
        its last call ended)."""
        if self._loaded is not None and self._loaded.few_rows is not None:
            self._loaded.few_rows.close()
        self._loaded = None
        self.state = "unloaded"

    # --- what it is -------------------------------------------------------------------

    def _need(self) -> _Loaded:
        if self._loaded is None:
            raise RuntimeError(f"{self!r} is not loaded")
        return self._loaded

    @property
    def ref(self) -> ModelRef:
        return self._need().ref

    @property
    def schema(self) -> InputSchema:
        """The inputs, in order, that `predict` reads (build matrices with it)."""
        return self._need().schema

    @property
    def thresholds(self) -> RiskThresholds:
        """The stored risk-band thresholds, else `DEFAULT_THRESHOLDS`."""
        return self._need().served.thresholds or DEFAULT_THRESHOLDS

    @property
    def thresholds_stored(self) -> bool:
        return self._need().served.thresholds is not None

    @property
    def drift_sample(self) -> InputSample | None:
        """Training's inputs and scores, the reference for drift (None for
        versions registered before it was stored)."""
        return self._need().served.drift_sample

    @property
    def tags(self) -> dict[str, str]:
        return dict(self._need().tags)

    # --- predicting -------------------------------------------------------------------

    def _matrix(self, matrix: npt.ArrayLike) -> FloatMatrix:
        names = self._need().schema.names
        array = np.ascontiguousarray(matrix, dtype=np.float64)
        if array.ndim != 2 or array.shape[1] != len(names):
            raise ValueError(
                f"{self.name} v{self.version} reads a matrix of {len(names)} columns "
                f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}), not one of "
                f"shape {array.shape}"
            )
        return array

    def predict(self, matrix: npt.ArrayLike) -> FloatMatrix:
        """Calibrated probabilities of the positive class, one per row."""
        loaded = self._need()
        model = loaded.model
        array = self._matrix(matrix)
        if len(array) == 0:
            return np.zeros(0, dtype=np.float64)
        if loaded.few_rows is not None and len(array) <= SINGLE_ROW_MAX:
            raw = loaded.few_rows.predict(array)
        else:
            raw = model.booster.predict(array, num_threads=self.num_threads)
        return model.calibrator.apply(raw)

    def predict_with_contributions(self, matrix: npt.ArrayLike) -> tuple[FloatMatrix, FloatMatrix]:
        """Calibrated probabilities (n,) and contributions (n, inputs + 1):
        each input's raw log-odds contribution in schema order, then the bias;
        a row sums to its log-odds before calibration."""
        model = self._need().model
        array = self._matrix(matrix)
        width = len(self._need().schema.names) + 1
        if len(array) == 0:
            return np.zeros(0, dtype=np.float64), np.zeros((0, width), dtype=np.float64)
        few_rows = self._need().few_rows
        if few_rows is not None and len(array) <= SINGLE_ROW_MAX:
            contributions = few_rows.contributions(array)
        else:
            contributions = np.asarray(
                model.booster.predict(array, pred_contrib=True, num_threads=self.num_threads),
                dtype=np.float64,
            )
        # The logistic function written with tanh: no overflow for any log-odds.
        raw = 0.5 * (1.0 + np.tanh(0.5 * contributions.sum(axis=1)))
        return model.calibrator.apply(raw), contributions


def _booster_problems(model: NativeModel, schema: InputSchema) -> list[str]:
    """How the booster and its metadata disagree with the input schema."""
    problems = []
    if tuple(model.feature_names) != schema.names:
        problems.append(
            f"its booster reads {len(model.feature_names)} inputs that differ from the "
            f"{len(schema.names)} of its input schema"
        )
    booster_inputs = int(model.booster.num_feature())
    if booster_inputs != len(schema.names):
        problems.append(
            f"its booster reads {booster_inputs} inputs, its input schema names {len(schema.names)}"
        )
    for name, levels in model.categorical_levels.items():
        if tuple(str(v) for v in levels) != tuple(schema.categories.get(name, ())):
            problems.append(f"the categories of {name} differ between the booster and the schema")
    return problems

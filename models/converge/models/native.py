"""The serving half of a trained model: the LightGBM booster, its probability
calibrator and the categorical levels seen in training, with one
`predict_proba` shared by training, evaluation, MLflow's pyfunc flavour and
the scoring service.

This file is also the MLflow "model from code" of every registered Converge
model: `registry.log_training` logs this very file as the pyfunc
`python_model`, with the booster and `model.json` as its artifact `native`.
MLflow executes it under a module name starting with `code_model_`, and only
then does the last line hand it the `ConvergePyfuncModel` to serve. It
therefore imports nothing from `converge` (only numpy, pandas, lightgbm and
mlflow), so a logged model loads with `mlflow.pyfunc.load_model` or
`mlflow models serve` in any environment that has those packages.

On disk (`NativeModel.save` / `NativeModel.load`), a directory with:

- `booster.txt`: the LightGBM text model, cut at the best iteration;
- `model.json`: feature names in order, categorical levels, the calibrator,
  the prediction, the feature-set version, the best iteration and the
  booster file's SHA-256 (checked before LightGBM parses the file);
- `input_schema.json` (models trained since input schemas exist): the
  `converge.features.transform.InputSchema` training learned, the exact
  inputs and categories, kept as plain JSON here (this file imports nothing
  from `converge`).

Categorical features: every value is mapped onto the levels seen in training
(`pd.Categorical(values, categories=levels)`), so a value never seen in
training becomes the level "other" when the model has one (rare values were
grouped there in training), else NaN, which LightGBM treats as missing,
identically in training, evaluation and serving. Values are compared as they are (a level
"3" and a value 3 differ).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import lightgbm as lgb
import mlflow
import numpy as np
import numpy.typing as npt
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

BOOSTER_FILE = "booster.txt"
META_FILE = "model.json"
SCHEMA_FILE = "input_schema.json"
OTHER = "other"
# The key (and folder name) of the native files among the pyfunc model's artifacts.
NATIVE_ARTIFACT = "native"
FORMAT_VERSION = 1
# Calibrated probabilities are kept in [FLOOR, 1 - FLOOR]: isotonic regression
# gives exactly 0 or 1 where the validation part had no positives or no
# negatives, which no finite sample can establish (and would make log loss
# infinite).
PROBABILITY_FLOOR = 1e-4

CalibrationMethod = Literal["isotonic", "sigmoid", "identity"]
FloatArray = npt.NDArray[np.float64]


def _logit(p: FloatArray) -> FloatArray:
    q = np.clip(p, 1e-15, 1 - 1e-15)
    return np.asarray(np.log(q / (1 - q)), dtype=np.float64)


@dataclass(frozen=True)
class Calibrator:
    """Maps the booster's probability to a calibrated one.

    - `isotonic`: piecewise-linear interpolation through the fitted isotonic
      regression's thresholds (`x`, `y`), clipped at both ends, which is what
      scikit-learn's `IsotonicRegression(out_of_bounds="clip").predict` does;
    - `sigmoid` (Platt): `1 / (1 + exp(-(a * logit(p) + b)))`, on the booster's
      log-odds;
    - `identity`: unchanged (only for tests and diagnostics).
    """

    method: CalibrationMethod
    x: tuple[float, ...] = ()
    y: tuple[float, ...] = ()
    a: float = 1.0
    b: float = 0.0

    def apply(self, raw: npt.ArrayLike) -> FloatArray:
        p = np.asarray(raw, dtype=np.float64)
        if self.method == "isotonic":
            out = np.interp(p, np.asarray(self.x), np.asarray(self.y))
        elif self.method == "sigmoid":
            out = 1.0 / (1.0 + np.exp(-(self.a * _logit(p) + self.b)))
        else:
            out = p
        return np.asarray(np.clip(out, PROBABILITY_FLOOR, 1 - PROBABILITY_FLOOR), dtype=np.float64)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "x": list(self.x),
            "y": list(self.y),
            "a": self.a,
            "b": self.b,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibrator:
        method = data["method"]
        if method not in ("isotonic", "sigmoid", "identity"):
            raise ValueError(f"unknown calibration method {method!r}")
        return cls(
            method=method,
            x=tuple(float(v) for v in data.get("x", ())),
            y=tuple(float(v) for v in data.get("y", ())),
            a=float(data.get("a", 1.0)),
            b=float(data.get("b", 0.0)),
        )


def _plain(value: Any) -> Any:
    """A JSON-able Python scalar from a numpy or pandas one."""
    return value.item() if isinstance(value, np.generic) else value


@dataclass(frozen=True, eq=False)
class NativeModel:
    """A booster with its calibrator and categorical levels: everything needed
    to turn a frame of features into calibrated probabilities."""

    booster: Any  # lightgbm.Booster, cut at the best iteration
    calibrator: Calibrator
    feature_names: tuple[str, ...]
    # Categorical feature -> the levels seen in training, in LightGBM's code order.
    categorical_levels: Mapping[str, tuple[Any, ...]]
    prediction: str
    feature_set_version: str
    best_iteration: int
    num_threads: int = 2
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The input schema training learned, as `InputSchema.to_dict()` gives it.
    input_schema: Mapping[str, Any] | None = None

    @property
    def categorical_features(self) -> tuple[str, ...]:
        return tuple(f for f in self.feature_names if f in self.categorical_levels)

    def prepare(self, df: pd.DataFrame) -> pd.DataFrame:
        """The model's input matrix: its features in training order, numbers as
        numbers, categories mapped onto the training levels (unseen -> NaN)."""
        missing = [f for f in self.feature_names if f not in df.columns]
        if missing:
            raise KeyError(f"the frame lacks feature(s) the model needs: {', '.join(missing)}")
        columns: dict[str, Any] = {}
        for name in self.feature_names:
            values = df[name]
            levels = self.categorical_levels.get(name)
            if levels is not None:
                if isinstance(values.dtype, pd.CategoricalDtype):
                    values = values.astype(object)
                # Unseen values become "other" where training grouped rare
                # values there, else NaN (pandas no longer does it silently).
                unseen = ~values.isin(levels) & values.notna()
                values = values.where(~unseen, OTHER) if OTHER in levels else values.where(~unseen)
                columns[name] = pd.Categorical(values, categories=list(levels))
            elif not pd.api.types.is_numeric_dtype(values.dtype) or pd.api.types.is_bool_dtype(
                values.dtype
            ):
                columns[name] = pd.to_numeric(values, errors="coerce").astype("float64")
            else:
                columns[name] = values
        return pd.DataFrame(columns, index=df.index)

    def predict_raw(self, df: pd.DataFrame) -> FloatArray:
        """The booster's probability (before calibration)."""
        if len(df) == 0:
            return np.zeros(0, dtype=np.float64)
        out = self.booster.predict(self.prepare(df), num_threads=self.num_threads)
        return np.asarray(out, dtype=np.float64)

    def predict_proba(self, df: pd.DataFrame) -> FloatArray:
        """Calibrated probabilities of the positive class, one per row."""
        return self.calibrator.apply(self.predict_raw(df))

    # --- persistence -----------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "prediction": self.prediction,
            "feature_set_version": self.feature_set_version,
            "feature_names": list(self.feature_names),
            "categorical_levels": [
                [name, [_plain(v) for v in levels]]
                for name, levels in self.categorical_levels.items()
            ],
            "calibrator": self.calibrator.to_dict(),
            "best_iteration": self.best_iteration,
            "extra": dict(self.extra),
        }

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(directory / BOOSTER_FILE))
        meta = self.metadata()
        meta["booster_sha256"] = _sha256(directory / BOOSTER_FILE)
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if self.input_schema is not None:
            (directory / SCHEMA_FILE).write_text(json.dumps(self.input_schema, indent=2))
        return directory

    @classmethod
    def load(cls, directory: Path, num_threads: int = 2) -> NativeModel:
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory / META_FILE}: format version {meta.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}"
            )
        # LightGBM's parser aborts the whole process on some damaged files (a
        # tree shorter than the sizes its header gives): check the bytes first.
        expected = meta.get("booster_sha256")
        if expected is not None and _sha256(directory / BOOSTER_FILE) != expected:
            raise ValueError(
                f"{directory / BOOSTER_FILE} is not the file that was saved (its SHA-256 differs "
                f"from {META_FILE}'s): damaged or altered"
            )
        booster = lgb.Booster(model_file=str(directory / BOOSTER_FILE))
        schema_file = directory / SCHEMA_FILE
        schema = json.loads(schema_file.read_text()) if schema_file.exists() else None
        return cls(
            booster=booster,
            calibrator=Calibrator.from_dict(meta["calibrator"]),
            feature_names=tuple(meta["feature_names"]),
            categorical_levels={name: tuple(levels) for name, levels in meta["categorical_levels"]},
            prediction=meta["prediction"],
            feature_set_version=meta["feature_set_version"],
            best_iteration=int(meta["best_iteration"]),
            num_threads=num_threads,
            extra=meta.get("extra", {}),
            input_schema=schema,
        )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def feature_schema(feature_names: Sequence[str], categorical: Sequence[str]) -> dict[str, Any]:
    """The part of a model's input that must match for two models to be
    compared or swapped: feature names in order, and which are categorical."""
    return {"feature_names": list(feature_names), "categorical_features": sorted(categorical)}


class ConvergePyfuncModel(PythonModel):  # type: ignore[misc]
    """MLflow pyfunc wrapper: `predict` returns calibrated probabilities of the
    positive class, one per input row (a 1-D float array)."""

    def __init__(self) -> None:
        self._model: NativeModel | None = None

    def load_context(self, context: PythonModelContext) -> None:
        self._model = NativeModel.load(Path(context.artifacts[NATIVE_ARTIFACT]))

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> FloatArray:
        if self._model is None:
            self.load_context(context)
        assert self._model is not None
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return self._model.predict_proba(model_input)


# MLflow runs this file as a "model from code" under a module name starting
# with `code_model_`; only then is the model handed over. Imported as
# `converge.models.native`, the file has no side effect.
if __name__.startswith("code_model_"):
    mlflow.models.set_model(ConvergePyfuncModel())

"""What training stores with each registered version so serving can check it,
band its scores and watch its inputs drift.

Three files, written by `registry.log_training` into the logged model (the
pyfunc artifact `serving`, beside the booster in `native`), so one download
brings a version and everything that belongs to it, and a version's files
cannot drift apart from its booster:

- `risk_thresholds.json`: the calibrated probabilities at which a score
  becomes `medium`, `high` and `critical` (also a version tag,
  `converge.risk_band_thresholds`, readable without a download);
- `check_sample.npz`: `CHECK_ROWS` rows of the model's input matrix with the
  calibrated probabilities training computed for them through its own
  (pandas) path; a loaded version must reproduce them through the numpy
  path serving uses (`ModelHandle.check`);
- `drift_sample.npz`: up to `DRIFT_ROWS` rows of the training population's
  input matrix and their scores, the reference a drift report computes the
  population stability index against.

Risk bands: by **fixed top shares of the validation population**. `critical`
is the calibrated probability above which the top 2% of the validation rows
score, `high` the top 10%, `medium` the top 30%; a score at or above a
threshold is in that band. Why shares and not multiples of the base rate: a
band is a call on what to do first, so a stable share of the population in
each band serves the people acting on it whatever the prediction's base rate
(churn a few percent, escalation a third): for a common outcome, 3 times the
base rate is above 0.9 and leaves `critical` empty; for a rare one with an
isotonic calibrator, multiples fall between its steps. The thresholds are
calibrated probabilities, so a band is also read as a probability. Each is
the validation probability at its quantile (numpy's "higher" method: a value
seen in validation), so ties at a threshold all fall in the higher band, and
`medium <= high <= critical` by construction. The validation part is the
population the calibrator was fitted on and held out of the trees; without
one, the test part, then the training part, is used (recorded as `source`).

The matrices are the model's inputs as serving builds them: through the
version's `InputSchema.matrix` (categories as codes, missing as NaN), or, for
a version without an input schema, its categorical codes as LightGBM reads
them from a pandas frame.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pandas as pd

if TYPE_CHECKING:
    from converge.models.dataset import TrainingFrame
    from converge.models.native import NativeModel

# The key (and folder name) of these files among the pyfunc model's artifacts.
SERVING_ARTIFACT = "serving"
THRESHOLDS_FILE = "risk_thresholds.json"
CHECK_SAMPLE_FILE = "check_sample.npz"
DRIFT_SAMPLE_FILE = "drift_sample.npz"
# The version tag holding the thresholds (what the scoring service reads
# without downloading the version).
THRESHOLDS_TAG = "converge.risk_band_thresholds"

BAND_SHARES: Mapping[str, float] = {"medium": 0.30, "high": 0.10, "critical": 0.02}
BANDS = ("low", "medium", "high", "critical")
CHECK_ROWS = 48
DRIFT_ROWS = 5_000
SAMPLE_SEED = 20261202
RULE = "calibrated probability at the top 30% / 10% / 2% of the validation population"

FloatMatrix = npt.NDArray[np.float64]


class ServingArtifactError(ValueError):
    """A stored serving file is malformed."""


@dataclass(frozen=True)
class RiskThresholds:
    """The lowest calibrated probability of each band above `low`."""

    medium: float
    high: float
    critical: float
    rule: str = RULE
    source: str = ""  # which part of the data they were computed on
    n: int = 0  # how many rows

    def __post_init__(self) -> None:
        if not 0.0 <= self.medium <= self.high <= self.critical <= 1.0:
            raise ServingArtifactError(
                "risk thresholds must rise within [0, 1]: "
                f"medium {self.medium}, high {self.high}, critical {self.critical}"
            )

    def band(self, probability: float) -> str:
        if probability >= self.critical:
            return "critical"
        if probability >= self.high:
            return "high"
        if probability >= self.medium:
            return "medium"
        return "low"

    def to_dict(self) -> dict[str, Any]:
        return {
            "medium": self.medium,
            "high": self.high,
            "critical": self.critical,
            "rule": self.rule,
            "source": self.source,
            "n": self.n,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RiskThresholds:
        try:
            return cls(
                medium=float(data["medium"]),
                high=float(data["high"]),
                critical=float(data["critical"]),
                rule=str(data.get("rule", RULE)),
                source=str(data.get("source", "")),
                n=int(data.get("n", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ServingArtifactError):
                raise
            raise ServingArtifactError(f"risk thresholds are malformed: {e!r}") from e

    @classmethod
    def from_probabilities(cls, probabilities: npt.ArrayLike, source: str) -> RiskThresholds:
        p = np.asarray(probabilities, dtype=np.float64)
        if len(p) == 0:
            raise ValueError("risk thresholds need at least one probability")
        at = {
            band: float(np.quantile(p, 1.0 - share, method="higher"))
            for band, share in BAND_SHARES.items()
        }
        return cls(at["medium"], at["high"], at["critical"], source=source, n=len(p))


@dataclass(frozen=True, eq=False)
class InputSample:
    """Rows of a model's input matrix (`inputs`, one column per input in
    `names`) with the calibrated probability of each row."""

    names: tuple[str, ...]
    inputs: FloatMatrix
    probabilities: FloatMatrix

    def save(self, path: Path) -> None:
        np.savez_compressed(
            path,
            names=np.asarray(self.names, dtype=np.str_),
            inputs=self.inputs,
            probabilities=self.probabilities,
        )

    @classmethod
    def load(cls, path: Path) -> InputSample:
        try:
            with np.load(path, allow_pickle=False) as data:
                names = tuple(str(n) for n in data["names"])
                inputs = np.asarray(data["inputs"], dtype=np.float64)
                probabilities = np.asarray(data["probabilities"], dtype=np.float64)
        except Exception as e:  # a zip, key or dtype error: the file is not what we wrote
            raise ServingArtifactError(f"{path.name} cannot be read: {e}") from e
        if inputs.ndim != 2 or inputs.shape != (len(probabilities), len(names)):
            raise ServingArtifactError(
                f"{path.name}: inputs of shape {inputs.shape} for {len(probabilities)} "
                f"probabilities and {len(names)} names"
            )
        return cls(names, inputs, probabilities)


@dataclass(frozen=True, eq=False)
class ServingArtifacts:
    """What a version stores for serving; None for what it lacks (versions
    registered before these files existed)."""

    thresholds: RiskThresholds | None = None
    check_sample: InputSample | None = None
    drift_sample: InputSample | None = None

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        if self.thresholds is not None:
            (directory / THRESHOLDS_FILE).write_text(
                json.dumps(self.thresholds.to_dict(), indent=2, sort_keys=True)
            )
        if self.check_sample is not None:
            self.check_sample.save(directory / CHECK_SAMPLE_FILE)
        if self.drift_sample is not None:
            self.drift_sample.save(directory / DRIFT_SAMPLE_FILE)
        return directory

    @classmethod
    def load(cls, directory: Path | None) -> ServingArtifacts:
        """The files found in `directory` (none when it is None or absent);
        raises `ServingArtifactError` for a file that is there but malformed."""
        if directory is None or not directory.is_dir():
            return cls()
        thresholds = None
        path = directory / THRESHOLDS_FILE
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ServingArtifactError(f"{THRESHOLDS_FILE} is not JSON: {e}") from e
            thresholds = RiskThresholds.from_dict(data)
        check = directory / CHECK_SAMPLE_FILE
        drift = directory / DRIFT_SAMPLE_FILE
        return cls(
            thresholds=thresholds,
            check_sample=InputSample.load(check) if check.exists() else None,
            drift_sample=InputSample.load(drift) if drift.exists() else None,
        )


# --- computing them at training time -------------------------------------------------


def input_matrix(model: NativeModel, frame: pd.DataFrame) -> FloatMatrix:
    """The model's input matrix for the rows of `frame`, as serving builds it."""
    if model.input_schema is not None:
        from converge.features.transform import InputSchema

        schema = InputSchema.from_dict(model.input_schema)
        columns: dict[str, Any] = {}
        for name in schema.names:
            values = frame[name]
            if name in schema.categories:
                columns[name] = list(values.astype(object))
            else:
                columns[name] = values.to_numpy(dtype=np.float64, na_value=np.nan)
        return schema.matrix(columns, len(frame))
    prepared = model.prepare(frame)
    out = np.empty((len(frame), len(model.feature_names)), dtype=np.float64)
    for j, name in enumerate(model.feature_names):
        values = prepared[name]
        if isinstance(values.dtype, pd.CategoricalDtype):
            codes = values.cat.codes.to_numpy().astype(np.float64)
            codes[codes < 0] = np.nan
            out[:, j] = codes
        else:
            out[:, j] = values.to_numpy(dtype=np.float64, na_value=np.nan)
    return out


def _reference_part(frames: Mapping[str, TrainingFrame]) -> tuple[str, TrainingFrame]:
    for part in ("valid", "test", "train"):
        frame = frames.get(part)
        if frame is not None and frame.n_examples > 0:
            return part, frame
    raise ValueError("serving artifacts need a non-empty valid, test or train part")


def build(model: NativeModel, frames: Mapping[str, TrainingFrame]) -> ServingArtifacts:
    """Thresholds and the check sample from the validation part (or the next
    part there is), the drift sample from the training part (or the same)."""
    part, reference = _reference_part(frames)
    # Training's own path (pandas frame, categories by level), which the
    # stored matrices must reproduce through serving's.
    probabilities = model.predict_proba(reference.frame)
    thresholds = RiskThresholds.from_probabilities(probabilities, source=part)
    # Rows at evenly spaced ranks of the scores: the sample spans the whole
    # calibrator, tails included, where a wrong one shows first.
    order = np.argsort(probabilities, kind="stable")
    picks = order[np.unique(np.linspace(0, len(order) - 1, CHECK_ROWS).round().astype(int))]
    check_rows = reference.frame.iloc[picks]
    names = tuple(model.feature_names)
    check = InputSample(names, input_matrix(model, check_rows), probabilities[picks])

    train = frames.get("train")
    if train is None or train.n_examples == 0:
        train = reference
    rng = np.random.default_rng(SAMPLE_SEED)
    n = train.n_examples
    rows = np.sort(rng.choice(n, size=min(n, DRIFT_ROWS), replace=False))
    drift_rows = train.frame.iloc[rows]
    drift = InputSample(names, input_matrix(model, drift_rows), model.predict_proba(drift_rows))
    return ServingArtifacts(thresholds, check, drift)

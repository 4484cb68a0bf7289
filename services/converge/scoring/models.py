"""The model slots: per prediction, the version that answers (`champion`), the
one scored in shadow (`challenger`), the versions refused lately, and the
rule fallback while no version serves.

Versions come from the MLflow registry (`ModelSource`). A new version is
loaded and checked off the event loop (in a thread), then swapped in with
one reference assignment: a call takes the slot's reference once, at its
start (`ModelSlots.lease`), and uses it to its end, so no call mixes two
versions and the replaced version finishes the calls it has (DRAINING until
the last one ends). A version that fails to load or to pass its checks is
refused: the old one keeps serving, and `status`, the metric
`converge_scoring_models_refused_total` and the log say why. An unreachable
registry at a poll changes nothing: what is loaded keeps serving, the next
poll tries again.

The same pattern as MLServer's model registry (load the new version before
unloading the old) and KServe's model lifecycle (`load`, `ready`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import prometheus_client

from converge.features.transform import InputSchema
from converge.models.predictions import PREDICTIONS, Prediction

logger = logging.getLogger(__name__)

FloatMatrix = npt.NDArray[np.float64]
CHAMPION = "champion"
CHALLENGER = "challenger"
MAX_REFUSED = 10
THRESHOLDS_TAG = "converge.risk_band_thresholds"

MODELS_REFUSED = prometheus_client.Counter(
    "converge_scoring_models_refused_total",
    "Model versions the scoring service refused to serve (failed to load or check).",
    ["prediction", "alias"],
)
MODELS_SWAPPED = prometheus_client.Counter(
    "converge_scoring_models_swapped_total",
    "Model versions swapped in.",
    ["prediction", "alias"],
)
REGISTRY_FAILURES = prometheus_client.Counter(
    "converge_scoring_registry_failures_total",
    "Registry checks that could not reach MLflow (what is loaded keeps serving).",
)


@dataclass(frozen=True)
class ModelRef:
    """Names one model version (mirrors `converge.v1.ModelRef`); `alias` is ""
    for the rule fallback."""

    name: str
    version: str
    run_id: str = ""
    alias: str = ""
    feature_set_version: str = ""


@dataclass(frozen=True)
class RiskThresholds:
    """Lowest probability of each band above LOW."""

    medium: float
    high: float
    critical: float

    def band(self, probability: float) -> str:
        if probability >= self.critical:
            return "critical"
        if probability >= self.high:
            return "high"
        if probability >= self.medium:
            return "medium"
        return "low"

    @classmethod
    def from_json(cls, text: str) -> RiskThresholds:
        data = json.loads(text)
        found = cls(float(data["medium"]), float(data["high"]), float(data["critical"]))
        if not 0 <= found.medium <= found.high <= found.critical <= 1:
            raise ValueError(f"thresholds must rise within [0, 1]: {text}")
        return found


# Used for versions registered without thresholds (before training stored
# them with each version), and by the rule fallback. Judgement, documented:
# a fifth of the way to certain is worth a look, even odds is high, four in
# five critical.
DEFAULT_THRESHOLDS = RiskThresholds(medium=0.2, high=0.5, critical=0.8)


class ServingModel(Protocol):
    """What scoring needs of a loaded version."""

    @property
    def ref(self) -> ModelRef: ...
    @property
    def schema(self) -> InputSchema: ...
    @property
    def thresholds(self) -> RiskThresholds: ...

    def predict_with_contributions(self, matrix: FloatMatrix) -> tuple[FloatMatrix, FloatMatrix]:
        """Calibrated probabilities (n,) and per-input contributions in
        log-odds (n, inputs + 1; the last column is the bias)."""
        ...

    def predict(self, matrix: FloatMatrix) -> FloatMatrix:
        """Calibrated probabilities (n,)."""
        ...


class ModelSource(Protocol):
    """Where versions come from; both methods block (run them in the executor)."""

    def alias_version(self, prediction: Prediction, alias: str) -> str | None:
        """The version the alias names, None when unset; raises when the
        registry cannot be reached."""
        ...

    def load(self, prediction: Prediction, version: str, alias: str) -> ServingModel:
        """The version loaded into memory; raises when it cannot be."""
        ...


# --- the registry's versions --------------------------------------------------------


@dataclass(frozen=True, eq=False)
class NativeVersion:
    """A registered version held as its native LightGBM booster and calibrator
    (`converge.models.native.NativeModel`), fed the float matrix of
    `InputSchema.matrix` directly: no pandas frame per call."""

    ref: ModelRef
    schema: InputSchema
    thresholds: RiskThresholds
    booster: Any  # lightgbm.Booster
    calibrator: Any  # converge.models.native.Calibrator
    num_threads: int

    def predict_with_contributions(self, matrix: FloatMatrix) -> tuple[FloatMatrix, FloatMatrix]:
        contributions = np.asarray(
            self.booster.predict(matrix, pred_contrib=True, num_threads=self.num_threads),
            dtype=np.float64,
        )
        # For a binary objective the contributions and the bias add up to the
        # booster's log-odds: one tree walk gives both the score and its reasons.
        raw = 1.0 / (1.0 + np.exp(-contributions.sum(axis=1)))
        return self.calibrator.apply(raw), contributions

    def predict(self, matrix: FloatMatrix) -> FloatMatrix:
        raw = self.booster.predict(matrix, num_threads=self.num_threads)
        return np.asarray(self.calibrator.apply(raw), dtype=np.float64)


class RegistrySource:
    """The MLflow registry as a `ModelSource` (through `converge.models.registry`).

    Until the shared model handle lands (models/converge/models/handle.py),
    loading goes through `ModelRegistry.load_version`, which points MLflow's
    global tracking URI at this store for the duration; one scoring process
    uses one store, so the swap is harmless here, but loads are serialised by
    `ModelSlots` anyway."""

    def __init__(self, tracking_uri: str, num_threads: int) -> None:
        from converge.models.registry import ModelRegistry

        self.registry = ModelRegistry(tracking_uri=tracking_uri)
        self.num_threads = num_threads

    def alias_version(self, prediction: Prediction, alias: str) -> str | None:
        from mlflow.exceptions import MlflowException

        from converge.models.registry import REGISTERED_MODEL_NAMES, RegistryUnavailable

        name = REGISTERED_MODEL_NAMES[prediction]
        try:
            if self.registry._registered(name) is None:
                return None
            version = self.registry.client.get_model_version_by_alias(name, alias)
        except MlflowException as error:
            if "alias" in str(error).lower() or "not found" in str(error).lower():
                return None
            raise RegistryUnavailable(str(error)) from error
        except Exception as error:  # the store itself (file, network) is gone
            raise RegistryUnavailable(f"{type(error).__name__}: {error}") from error
        return str(version.version)

    def load(self, prediction: Prediction, version: str, alias: str) -> ServingModel:
        loaded = self.registry.load_version(prediction, version, num_threads=self.num_threads)
        schema = loaded.input_schema
        if schema is None:
            raise ValueError(
                "the version carries no input schema (input_schema.json): it was trained before "
                "serving could feed it; retrain it"
            )
        thresholds = DEFAULT_THRESHOLDS
        if THRESHOLDS_TAG in loaded.tags:
            thresholds = RiskThresholds.from_json(loaded.tags[THRESHOLDS_TAG])
        model = loaded.model
        if tuple(model.feature_names) != schema.names:
            raise ValueError(
                "the booster's inputs differ from its input schema: "
                f"{len(model.feature_names)} against {len(schema.names)}"
            )
        return NativeVersion(
            ref=ModelRef(
                loaded.name, loaded.version, loaded.run_id, alias, model.feature_set_version
            ),
            schema=schema,
            thresholds=thresholds,
            booster=model.booster,
            calibrator=model.calibrator,
            num_threads=self.num_threads,
        )


def check_version(
    model: ServingModel,
    served_features: Mapping[str, Any] | None,
    served_version: str | None,
) -> None:
    """Raises `ValueError` saying why `model` must not serve: it was trained
    on another feature set than the one interactions serves, it reads inputs
    nothing provides, or it does not give a finite probability for a row of
    missing values. (The served set is skipped while interactions is unknown.)"""
    ref = model.ref
    if served_version is not None and ref.feature_set_version != served_version:
        raise ValueError(
            f"trained on feature set {ref.feature_set_version!r}, interactions serves "
            f"{served_version!r}"
        )
    if served_features is not None:
        unknown = [
            name
            for name in model.schema.names
            if not name.startswith("profile_")
            and name != "candidate_product"
            and name not in served_features
        ]
        if unknown:
            raise ValueError(f"inputs the served feature set lacks: {', '.join(unknown[:10])}")
    probe = np.full((1, len(model.schema.names)), np.nan, dtype=np.float64)
    probabilities, contributions = model.predict_with_contributions(probe)
    if probabilities.shape != (1,) or not math.isfinite(float(probabilities[0])):
        raise ValueError("the version gives no finite probability for a row of missing values")
    if contributions.shape != (1, len(model.schema.names) + 1):
        raise ValueError(
            f"the booster reads {contributions.shape[1] - 1} inputs, its schema names "
            f"{len(model.schema.names)}"
        )


# --- the slots ----------------------------------------------------------------------


@dataclass(eq=False)
class Serving:
    """A version in a slot, with the calls running on it."""

    model: ServingModel
    loaded_at: datetime
    in_flight: int = 0


@dataclass(frozen=True)
class Refused:
    """A version that was not let in, and why."""

    prediction: Prediction
    ref: ModelRef
    error: str
    at: datetime


@dataclass
class Slot:
    """One prediction's versions."""

    prediction: Prediction
    champion: Serving | None = None
    challenger: Serving | None = None
    draining: list[Serving] = field(default_factory=list)
    refused: deque[Refused] = field(default_factory=lambda: deque(maxlen=MAX_REFUSED))
    checked_at: datetime | None = None
    # Why the rules answer while no champion serves.
    no_model_reason: str = "the registry has not been checked yet"

    @property
    def fallback_reason(self) -> str:
        return "" if self.champion is not None else self.no_model_reason


@dataclass(frozen=True)
class Lease:
    """The versions one call uses, taken once at its start."""

    champions: Mapping[Prediction, Serving | None]
    challengers: Mapping[Prediction, Serving | None]
    fallback_reasons: Mapping[Prediction, str]


@dataclass(frozen=True)
class ReloadOutcome:
    swapped_in: tuple[ModelRef, ...]
    refused: tuple[Refused, ...]


# Checks a freshly loaded version; raises ValueError to refuse it.
Checker = Callable[[ServingModel], None]


class ModelSlots:
    """Every prediction's slot, kept in line with the registry."""

    def __init__(
        self,
        source: ModelSource,
        checker: Checker,
        *,
        poll_interval_s: float,
        shadow: bool = True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.source = source
        self.checker = checker
        self.poll_interval_s = poll_interval_s
        self.shadow = shadow
        self.clock = clock
        self.slots: dict[Prediction, Slot] = {p: Slot(p) for p in PREDICTIONS}
        self.checked = False  # a registry check succeeded at least once
        self._refresh_lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None
        # Versions refused once are not loaded again at every poll.
        self._refused_versions: set[tuple[Prediction, str]] = set()

    @property
    def ready(self) -> bool:
        """Every prediction has a champion or its fallback decided: the
        registry has been read once."""
        return self.checked

    # --- calls ------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, predictions: Sequence[Prediction]) -> Iterator[Lease]:
        """The versions a call uses to its end, whatever is swapped meanwhile."""
        champions: dict[Prediction, Serving | None] = {}
        challengers: dict[Prediction, Serving | None] = {}
        reasons: dict[Prediction, str] = {}
        for prediction in predictions:
            slot = self.slots[prediction]
            champion, challenger = slot.champion, slot.challenger  # (one read each)
            champions[prediction] = champion
            challengers[prediction] = challenger
            reasons[prediction] = slot.no_model_reason if champion is None else ""
        taken = [s for s in (*champions.values(), *challengers.values()) if s is not None]
        for serving in taken:
            serving.in_flight += 1
        try:
            yield Lease(champions, challengers, reasons)
        finally:
            for serving in taken:
                serving.in_flight -= 1
            if any(s.in_flight == 0 for s in taken):
                self._drop_drained()

    def _drop_drained(self) -> None:
        for slot in self.slots.values():
            if slot.draining:
                slot.draining = [s for s in slot.draining if s.in_flight > 0]

    # --- keeping up with the registry -------------------------------------------------

    async def start(self) -> None:
        """Checks the registry once, then polls it in the background."""
        await self.refresh()
        self._poller = asyncio.create_task(self._poll(), name="model-poller")

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:  # the poller must outlive any one bad round
                logger.exception("model poll failed")

    async def refresh(self, predictions: Sequence[Prediction] = PREDICTIONS) -> ReloadOutcome:
        """Reads the aliases and swaps in the versions that moved; refuses
        those that fail to load or check. One refresh at a time."""
        async with self._refresh_lock:
            swapped: list[ModelRef] = []
            refused: list[Refused] = []
            aliases = (CHAMPION, CHALLENGER) if self.shadow else (CHAMPION,)
            all_read = True
            for prediction in predictions:
                slot = self.slots[prediction]
                for alias in aliases:
                    try:
                        version = await asyncio.to_thread(
                            self.source.alias_version, prediction, alias
                        )
                    except Exception as error:
                        all_read = False
                        REGISTRY_FAILURES.inc()
                        logger.warning(
                            "registry unreachable reading %s@%s; serving what is loaded: %s",
                            prediction,
                            alias,
                            error,
                        )
                        if slot.champion is None:
                            slot.no_model_reason = f"the model registry cannot be reached: {error}"
                        continue
                    outcome = await self._follow(slot, alias, version)
                    if isinstance(outcome, Refused):
                        refused.append(outcome)
                    elif outcome is not None:
                        swapped.append(outcome)
                if all_read:
                    slot.checked_at = self.clock()
            if all_read:
                self.checked = True
            return ReloadOutcome(tuple(swapped), tuple(refused))

    async def _follow(
        self, slot: Slot, alias: str, version: str | None
    ) -> ModelRef | Refused | None:
        current = slot.champion if alias == CHAMPION else slot.challenger
        if version is None:
            if current is not None:
                logger.info("%s: the %s alias was removed; unloading", slot.prediction, alias)
                self._place(slot, alias, None)
            if alias == CHAMPION and slot.champion is None:
                slot.no_model_reason = "no model version is promoted to champion yet"
            return None
        if current is not None and current.model.ref.version == version:
            return None
        if (slot.prediction, version) in self._refused_versions:
            return None
        try:
            # A thread of its own, not the CPU workers': a load is mostly I/O,
            # takes seconds, and must never be refused because calls keep the
            # workers busy (that would refuse a good version under load).
            model = await asyncio.to_thread(self._load_and_check, slot.prediction, version, alias)
        except Exception as error:
            refusal = Refused(
                slot.prediction,
                ModelRef(_registered_name(slot.prediction), version, alias=alias),
                f"{type(error).__name__}: {error}",
                self.clock(),
            )
            slot.refused.appendleft(refusal)
            self._refused_versions.add((slot.prediction, version))
            MODELS_REFUSED.labels(slot.prediction, alias).inc()
            logger.error(
                "refused %s version %s (%s): %s; %s",
                slot.prediction,
                version,
                alias,
                refusal.error,
                "the old version keeps serving" if current is not None else "the rules answer",
            )
            if alias == CHAMPION and slot.champion is None:
                slot.no_model_reason = f"champion version {version} was refused: {refusal.error}"
            return refusal
        self._place(slot, alias, Serving(model, self.clock()))
        MODELS_SWAPPED.labels(slot.prediction, alias).inc()
        logger.info(
            "%s %s: now version %s (run %s)", slot.prediction, alias, version, model.ref.run_id
        )
        return model.ref

    def _load_and_check(self, prediction: Prediction, version: str, alias: str) -> ServingModel:
        model = self.source.load(prediction, version, alias)
        self.checker(model)
        return model

    def _place(self, slot: Slot, alias: str, serving: Serving | None) -> None:
        old = slot.champion if alias == CHAMPION else slot.challenger
        # One reference assignment each: a call that leased the old version
        # keeps it; every call that starts now gets the new one.
        if alias == CHAMPION:
            slot.champion = serving
        else:
            slot.challenger = serving
        if old is not None and old.in_flight > 0:
            slot.draining.append(old)

    # --- status -----------------------------------------------------------------------

    def status(self, prediction: Prediction) -> Slot:
        return self.slots[prediction]


def with_alias(ref: ModelRef, alias: str) -> ModelRef:
    return replace(ref, alias=alias)


def _registered_name(prediction: Prediction) -> str:
    return "converge-" + prediction.replace("_", "-")

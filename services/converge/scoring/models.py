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
import logging
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
import prometheus_client

from converge.features.transform import InputSchema
from converge.models.handle import KnownFeatures, ModelRef
from converge.models.predictions import PREDICTIONS, Prediction
from converge.models.serving_artifacts import RiskThresholds
from converge.runtime.tasks import stop_task

if TYPE_CHECKING:
    from converge.models.registry import ModelRegistry

logger = logging.getLogger(__name__)

FloatMatrix = npt.NDArray[np.float64]
CHAMPION = "champion"
CHALLENGER = "challenger"
MAX_REFUSED = 10

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


class ServingModel(Protocol):
    """What scoring needs of a loaded version (`converge.models.handle.ModelHandle`)."""

    @property
    def ref(self) -> ModelRef: ...
    @property
    def schema(self) -> InputSchema: ...
    @property
    def thresholds(self) -> RiskThresholds: ...

    def unload(self) -> None: ...

    def predict_with_contributions(self, matrix: FloatMatrix) -> tuple[FloatMatrix, FloatMatrix]:
        """Calibrated probabilities (n,) and per-input contributions in
        log-odds (n, inputs + 1; the last column is the bias)."""
        ...

    def predict(self, matrix: FloatMatrix) -> FloatMatrix:
        """Calibrated probabilities (n,)."""
        ...


class ModelSource(Protocol):
    """Where versions come from; both methods block (run them in a thread)."""

    def serving_state(self, prediction: Prediction) -> tuple[str | None, str | None]:
        """The (champion, challenger) versions, read as one committed state;
        raises when the registry cannot be reached."""
        ...

    def load(self, prediction: Prediction, version: str, alias: str) -> ServingModel:
        """The version loaded and checked; raises when it cannot be, or must not serve."""
        ...


# --- the registry's versions --------------------------------------------------------


class RegistrySource:
    """The MLflow registry as a `ModelSource`: versions read through
    `ModelRegistry.serving_state` (never a promotion half-done) and held as
    `ModelHandle`s, checked against the feature set interactions serves
    (`served_features()`, None while unknown: then against the built-in or
    shipped set the version names)."""

    def __init__(
        self,
        tracking_uri: str,
        num_threads: int,
        served_features: Callable[[], KnownFeatures | None] = lambda: None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.num_threads = num_threads
        self.served_features = served_features
        self._store_seen = False
        self._registry: ModelRegistry | None = None

    @property
    def registry(self) -> ModelRegistry:
        # Made at first use, in the loading thread: MLflow's client opens
        # (and for a new SQLite file, creates and migrates) the store.
        if self._registry is None:
            from converge.models.registry import ModelRegistry

            self._registry = ModelRegistry(tracking_uri=self.tracking_uri)
        return self._registry

    def serving_state(self, prediction: Prediction) -> tuple[str | None, str | None]:
        if self._store_missing():
            if self._store_seen:  # (gone after it was there: unreachable, keep serving)
                raise RuntimeError(f"the MLflow store {self.tracking_uri} is gone")
            return None, None
        self._store_seen = True
        state = self.registry.serving_state(prediction)
        return state.champion, state.challenger

    def _store_missing(self) -> bool:
        """True for a local SQLite store nobody has created yet (no model was
        ever trained here). Scoring only reads the registry: it never creates
        the store, which would cost a first start MLflow's migrations (tens of
        seconds) for an empty registry; the next polls look again."""
        uri = self.tracking_uri
        return uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()

    def load(self, prediction: Prediction, version: str, alias: str) -> ServingModel:
        from converge.models.handle import ModelHandle

        handle = ModelHandle(
            self.registry, prediction, version, alias=alias, num_threads=self.num_threads
        )
        handle.load()
        report = handle.check(self.served_features())
        for note in report.notes:
            logger.warning("%s version %s: %s", prediction, version, note)
        return handle


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


class ModelSlots:
    """Every prediction's slot, kept in line with the registry."""

    def __init__(
        self,
        source: ModelSource,
        *,
        poll_interval_s: float,
        shadow: bool = True,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.source = source
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
                for finished in [s for s in slot.draining if s.in_flight == 0]:
                    finished.model.unload()
                slot.draining = [s for s in slot.draining if s.in_flight > 0]

    # --- keeping up with the registry -------------------------------------------------

    async def start(self) -> None:
        """Checks the registry once, then polls it in the background."""
        await self.refresh()
        self._poller = asyncio.create_task(self._poll(), name="model-poller")

    async def close(self) -> None:
        await stop_task(self._poller)

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
                try:
                    champion, challenger = await asyncio.to_thread(
                        self.source.serving_state, prediction
                    )
                except Exception as error:
                    all_read = False
                    REGISTRY_FAILURES.inc()
                    logger.warning(
                        "registry unreachable reading %s; serving what is loaded: %s",
                        prediction,
                        error,
                    )
                    if slot.champion is None:
                        slot.no_model_reason = f"the model registry cannot be reached: {error}"
                    continue
                wanted = {CHAMPION: champion, CHALLENGER: challenger}
                for alias in aliases:
                    outcome = await self._follow(slot, alias, wanted[alias])
                    if isinstance(outcome, Refused):
                        refused.append(outcome)
                    elif outcome is not None:
                        swapped.append(outcome)
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
            model = await asyncio.to_thread(self.source.load, slot.prediction, version, alias)
        except Exception as error:
            refusal = Refused(
                slot.prediction,
                ModelRef(_registered_name(slot.prediction), version, "", alias, ""),
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
        elif old is not None:
            old.model.unload()

    # --- status -----------------------------------------------------------------------

    def status(self, prediction: Prediction) -> Slot:
        return self.slots[prediction]


def _registered_name(prediction: Prediction) -> str:
    return "converge-" + prediction.replace("_", "-")

"""The Open Inference Protocol's rules, in plain Python types (no gRPC here).

One OIP model per prediction, named as the prediction ("churn",
"escalation", "cross_sell"), its version the champion's registry version.
A ModelInfer row is one customer (with the ticket for escalation, the
product for cross-sell) and is scored by `ScoringService.score`, exactly as
a Score call for that one prediction: same features, same model slot, same
coalescing of concurrent rows into shared reads and predicts. There is no
second scoring path.

The answer names one version for all its rows (the protocol's
`model_version`), so rows are never answered by two versions: when a
promotion lands between the rows of one call, the call is scored again on
the version now serving.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from converge.models.predictions import PREDICTIONS, Prediction
from converge.runtime.errors import ConvergeError, NotFound, Unavailable
from converge.scoring.service import Scored, ScoreQuery, ScoringService

# The platform a ModelMetadata answer names ("<project>_<format>"): the
# champion is a native LightGBM booster.
PLATFORM = "lightgbm_booster"


@dataclass(frozen=True)
class ModelInfo:
    """One OIP model: a prediction and the version that answers it."""

    prediction: Prediction
    version: str  # the champion's registry version; "" while the rules answer
    ready: bool  # a version is loaded and serves


@dataclass(frozen=True)
class InferQuery:
    """One ModelInfer call, checked for shape by the conversion."""

    prediction: Prediction
    version: str  # asked for; "" takes the champion
    rows: tuple[ScoreQuery, ...]  # one per customer, each for `prediction` alone


@dataclass(frozen=True)
class Inferred:
    prediction: Prediction
    version: str  # the version that answered every row
    probabilities: tuple[float, ...]
    bands: tuple[str, ...]  # "low", "medium", "high", "critical"


class OpenInference:
    def __init__(self, service: ScoringService, ready: Callable[[], bool]) -> None:
        self.service = service
        self._ready = ready

    def server_ready(self) -> bool:
        """The scoring service's readiness (the registry was read)."""
        return self._ready()

    def model(self, name: str, version: str = "") -> ModelInfo:
        """The model `name`; NotFound for a name that is no prediction, or a
        version that does not serve."""
        info = self._model(name)
        if version and version != info.version:
            raise NotFound("model version", f"{name} version {version}")
        return info

    def model_ready(self, name: str, version: str = "") -> bool:
        """False for a version not loaded (the protocol answers, not fails)."""
        info = self._model(name)
        return info.ready and (not version or version == info.version)

    def _model(self, name: str) -> ModelInfo:
        if name not in PREDICTIONS:
            raise NotFound("model", name)
        prediction: Prediction = name  # type: ignore[assignment]
        champion = self.service.model_status(prediction).champion
        if champion is None:
            return ModelInfo(prediction, "", ready=False)
        return ModelInfo(prediction, champion.model.ref.version, ready=True)

    async def infer(self, query: InferQuery) -> Inferred:
        if query.version:
            self.model(query.prediction, query.version)  # NotFound when it does not serve
        for _ in range(2):
            scored = await self._score_rows(query.rows)
            versions = {s.model.version for s in scored}
            if len(versions) == 1:
                (version,) = versions
                if query.version and version != query.version:
                    raise NotFound("model version", f"{query.prediction} version {query.version}")
                return Inferred(
                    query.prediction,
                    version,
                    tuple(s.probability for s in scored),
                    tuple(s.band for s in scored),
                )
        raise Unavailable("the model was swapped twice during the call: retry")

    async def _score_rows(self, rows: tuple[ScoreQuery, ...]) -> list[Scored]:
        if len(rows) == 1:  # (the common call: no task to gather)
            return [(await self.service.score(rows[0])).predictions[0]]
        scored = []
        for outcome in await self.service.score_many(rows):  # (scored together)
            if isinstance(outcome, ConvergeError):
                raise outcome
            scored.append(outcome.predictions[0])
        return scored

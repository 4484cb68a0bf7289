"""Protobuf <-> plain conversions of the scoring service: requests are checked
for shape here (every bad field named at once), answers are built here; the
rules live in `service.py`."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence

from google.rpc import status_pb2

from converge.models.fallback import Reason
from converge.models.handle import ModelRef
from converge.models.predictions import PREDICTIONS, Prediction
from converge.runtime.errors import ConvergeError, InvalidArgument, Violations
from converge.runtime.values import timestamp
from converge.scoring.features import CustomerKey, LiveFeatures
from converge.scoring.models import (
    CHALLENGER,
    CHAMPION,
    Refused,
    ReloadOutcome,
    Serving,
    Slot,
)
from converge.scoring.service import Scored, ScoreQuery, ScoreResult
from converge.v1 import common_pb2, predictions_pb2, scoring_pb2

MAX_KEY = 256
MAX_CANDIDATES = 100
MAX_CONTEXT_FEATURES = 200
MAX_REASONS = 20
_KINDS: dict[int, Prediction] = {
    predictions_pb2.PREDICTION_KIND_CHURN: "churn",
    predictions_pb2.PREDICTION_KIND_ESCALATION: "escalation",
    predictions_pb2.PREDICTION_KIND_CROSS_SELL: "cross_sell",
}
_KIND_NUMBERS = {name: number for number, name in _KINDS.items()}
_BANDS = {
    "low": predictions_pb2.RISK_BAND_LOW,
    "medium": predictions_pb2.RISK_BAND_MEDIUM,
    "high": predictions_pb2.RISK_BAND_HIGH,
    "critical": predictions_pb2.RISK_BAND_CRITICAL,
}
_ALIASES = {
    CHAMPION: predictions_pb2.MODEL_ALIAS_CHAMPION,
    CHALLENGER: predictions_pb2.MODEL_ALIAS_CHALLENGER,
}


# --- requests -----------------------------------------------------------------------


def customer_key(ref: common_pb2.CustomerRef, path: str, v: Violations) -> CustomerKey:
    which = ref.WhichOneof("ref")
    if which == "customer_id":
        try:
            uuid.UUID(ref.customer_id)
        except ValueError:
            v.add(f"{path}.customer_id", "not a customer id (a UUID)")
        return CustomerKey(customer_id=ref.customer_id.lower())
    if which == "identifier":
        identifier = ref.identifier
        v.check(
            identifier.type != 0 and identifier.type in common_pb2.IdentifierType.values(),
            f"{path}.identifier.type",
            "set a known identifier type",
        )
        v.check(
            0 < len(identifier.value.strip()) <= MAX_KEY,
            f"{path}.identifier.value",
            f"required, at most {MAX_KEY} characters",
        )
        return CustomerKey(
            identifier_type=int(identifier.type),
            identifier_value=identifier.value,
            identifier_source=identifier.source,
        )
    v.add(path, "required: set customer_id or identifier")
    return CustomerKey()


def kinds(values: Sequence[int], path: str, v: Violations) -> tuple[Prediction, ...]:
    found: list[Prediction] = []
    for i, number in enumerate(values):
        kind = _KINDS.get(number)
        if kind is None:
            v.add(f"{path}[{i}]", "set a known prediction kind")
        elif kind not in found:
            found.append(kind)
    return tuple(found)


def required_kind(number: int, path: str) -> Prediction:
    kind = _KINDS.get(number)
    if kind is None:
        v = Violations()
        v.add(path, "required: set a known prediction kind")
        v.raise_if_any()
    assert kind is not None
    return kind


def optional_kinds(number: int, path: str) -> tuple[Prediction, ...]:
    """UNSPECIFIED means every prediction."""
    if number == 0:
        return PREDICTIONS
    return (required_kind(number, path),)


def score_query(
    request: scoring_pb2.ScoreRequest, timeout_s: float | None, path: str = ""
) -> ScoreQuery:
    """The plain query of a ScoreRequest; INVALID_ARGUMENT naming every bad field
    (`path` prefixes them, for batch items)."""
    v = Violations()
    customer = customer_key(request.customer, f"{path}customer", v)
    predictions = kinds(list(request.predictions), f"{path}predictions", v)
    v.check(len(request.ticket_id) <= MAX_KEY, f"{path}ticket_id", f"at most {MAX_KEY} characters")
    products = list(request.candidate_product_ids)
    v.check(
        len(products) <= MAX_CANDIDATES,
        f"{path}candidate_product_ids",
        f"at most {MAX_CANDIDATES}",
    )
    for i, product in enumerate(products[:MAX_CANDIDATES]):
        v.check(
            0 < len(product) <= MAX_KEY,
            f"{path}candidate_product_ids[{i}]",
            f"required, at most {MAX_KEY} characters",
        )
    v.check(
        len(request.context_features) <= MAX_CONTEXT_FEATURES,
        f"{path}context_features",
        f"at most {MAX_CONTEXT_FEATURES}",
    )
    for name, value in request.context_features.items():
        v.check(
            math.isfinite(value),
            f'{path}context_features["{name[:80]}"]',
            "not a finite number",
        )
    v.check(
        0 <= request.max_reasons <= MAX_REASONS,
        f"{path}max_reasons",
        f"from 0 to {MAX_REASONS}",
    )
    v.check(
        request.channel in common_pb2.Channel.values(),
        f"{path}channel",
        "not a known channel",
    )
    v.raise_if_any()
    return ScoreQuery(
        customer=customer,
        predictions=predictions,
        ticket_id=request.ticket_id,
        candidate_product_ids=tuple(products),
        context_features=dict(request.context_features),
        max_reasons=request.max_reasons,
        omit_reasons=request.omit_reasons,
        include_shadow=request.include_shadow,
        timeout_s=math.inf if timeout_s is None else timeout_s,
    )


def batch_item(
    message: scoring_pb2.ScoreBatchRequest, timeout_s: float | None
) -> tuple[str, ScoreQuery | ConvergeError]:
    """A batch item's key and query, or the error it answers with."""
    try:
        return message.row_ref, score_query(message.score, timeout_s)
    except InvalidArgument as error:
        return message.row_ref, error


# --- answers ------------------------------------------------------------------------


def model_ref_pb(ref: ModelRef) -> predictions_pb2.ModelRef:
    return predictions_pb2.ModelRef(
        name=ref.name,
        version=ref.version,
        run_id=ref.run_id,
        alias=_ALIASES.get(ref.alias, predictions_pb2.MODEL_ALIAS_UNSPECIFIED),
        feature_set_version=ref.feature_set_version,
    )


def reason_pb(reason: Reason) -> predictions_pb2.ReasonCode:
    message = predictions_pb2.ReasonCode(
        code=reason.code,
        feature=reason.feature,
        contribution=reason.contribution,
        text=reason.text,
    )
    if reason.value is not None:
        message.value = reason.value
    return message


def scored_pb(scored: Scored) -> predictions_pb2.ScoredPrediction:
    message = predictions_pb2.ScoredPrediction(
        kind=_KIND_NUMBERS[scored.prediction],  # type: ignore[arg-type]
        ticket_id=scored.ticket_id,
        product_id=scored.product_id,
        probability=scored.probability,
        risk_band=_BANDS[scored.band],
        model=model_ref_pb(scored.model),
        reasons=[reason_pb(r) for r in scored.reasons],
        fallback_used=scored.fallback_used,
        fallback_reason=scored.fallback_reason,
    )
    if scored.shadow is not None:
        message.shadow.CopyFrom(
            predictions_pb2.ShadowPrediction(
                model=model_ref_pb(scored.shadow.model),
                probability=scored.shadow.probability,
                risk_band=_BANDS[scored.shadow.band],
            )
        )
    return message


def feature_vectors_pb(live: LiveFeatures) -> list[predictions_pb2.FeatureVector]:
    def vector(values: dict[str, float | str], ticket_id: str) -> predictions_pb2.FeatureVector:
        return predictions_pb2.FeatureVector(
            customer_id=live.customer_id,
            ticket_id=ticket_id,
            values={k: v for k, v in values.items() if not isinstance(v, str)},
            as_of=timestamp(live.as_of),
            feature_set_version=live.feature_set_version,
            found=True,
            category_values={k: v for k, v in values.items() if isinstance(v, str)},
        )

    vectors = [vector(dict(live.customer), "")]
    if live.ticket is not None:
        vectors.append(vector(dict(live.ticket), live.ticket_id))
    return vectors


def score_response(result: ScoreResult, include_features: bool) -> scoring_pb2.ScoreResponse:
    return scoring_pb2.ScoreResponse(
        customer_id=result.customer_id,
        predictions=[scored_pb(s) for s in result.predictions],
        features=feature_vectors_pb(result.features) if include_features else [],
        score_id=result.score_id,
        scored_at=timestamp(result.scored_at),
    )


def batch_response(
    row_ref: str, outcome: ScoreResult | ConvergeError, include_features: bool
) -> scoring_pb2.ScoreBatchResponse:
    if isinstance(outcome, ConvergeError):
        status: status_pb2.Status = outcome.rpc_status()
        return scoring_pb2.ScoreBatchResponse(row_ref=row_ref, error=status)
    return scoring_pb2.ScoreBatchResponse(
        row_ref=row_ref, score=score_response(outcome, include_features)
    )


def _serving_pb(prediction: Prediction, serving: Serving, state: int) -> scoring_pb2.LoadedModel:
    model = serving.model
    thresholds = model.thresholds
    return scoring_pb2.LoadedModel(
        kind=_KIND_NUMBERS[prediction],  # type: ignore[arg-type]
        model=model_ref_pb(model.ref),
        state=state,  # type: ignore[arg-type]
        loaded_at=timestamp(serving.loaded_at),
        thresholds=scoring_pb2.RiskBandThresholds(
            medium=thresholds.medium, high=thresholds.high, critical=thresholds.critical
        ),
        feature_count=len(model.schema.names),
    )


def refused_pb(refused: Refused) -> scoring_pb2.LoadedModel:
    return scoring_pb2.LoadedModel(
        kind=_KIND_NUMBERS[refused.prediction],  # type: ignore[arg-type]
        model=model_ref_pb(refused.ref),
        state=scoring_pb2.MODEL_STATE_REFUSED,
        error=refused.error,
    )


def loaded_models(slot: Slot, include_refused: bool) -> list[scoring_pb2.LoadedModel]:
    out = []
    if slot.champion is not None:
        out.append(_serving_pb(slot.prediction, slot.champion, scoring_pb2.MODEL_STATE_SERVING))
    if slot.challenger is not None:
        out.append(_serving_pb(slot.prediction, slot.challenger, scoring_pb2.MODEL_STATE_SERVING))
    out += [
        _serving_pb(slot.prediction, s, scoring_pb2.MODEL_STATE_DRAINING) for s in slot.draining
    ]
    if include_refused:
        out += [refused_pb(r) for r in slot.refused]
    return out


def model_status_response(slot: Slot, replica: str) -> scoring_pb2.GetModelStatusResponse:
    response = scoring_pb2.GetModelStatusResponse(
        kind=_KIND_NUMBERS[slot.prediction],  # type: ignore[arg-type]
        fallback_active=slot.champion is None,
        fallback_reason=slot.fallback_reason,
        refused=[refused_pb(r) for r in slot.refused],
        replica=replica,
    )
    if slot.champion is not None:
        response.champion.CopyFrom(
            _serving_pb(slot.prediction, slot.champion, scoring_pb2.MODEL_STATE_SERVING)
        )
    if slot.challenger is not None:
        response.challenger.CopyFrom(
            _serving_pb(slot.prediction, slot.challenger, scoring_pb2.MODEL_STATE_SERVING)
        )
    if slot.checked_at is not None:
        response.registry_checked_at.CopyFrom(timestamp(slot.checked_at))
    return response


def reload_response(
    outcome: ReloadOutcome, slots: Sequence[Slot], replica: str
) -> scoring_pb2.ReloadModelsResponse:
    return scoring_pb2.ReloadModelsResponse(
        models=[m for slot in slots for m in loaded_models(slot, include_refused=False)],
        swapped_in=[model_ref_pb(r) for r in outcome.swapped_in],
        refused=[refused_pb(r) for r in outcome.refused],
        replica=replica,
    )

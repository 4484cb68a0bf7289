"""Protobuf <-> plain conversions of the scoring service: requests are checked
for shape here (every bad field named at once), answers are built here; the
rules live in `service.py`."""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import datetime

from google.protobuf import struct_pb2
from google.rpc import status_pb2

from converge.models.fallback import Reason
from converge.models.handle import ModelRef
from converge.models.predictions import PREDICTIONS, Prediction
from converge.runtime.errors import ConvergeError, InvalidArgument, Violations
from converge.runtime.fields import check_identifier, parse_time, parse_uuid
from converge.runtime.values import CustomerKey, timestamp
from converge.scoring import drift
from converge.scoring.features import LiveFeatures
from converge.scoring.models import (
    CHALLENGER,
    CHAMPION,
    Refused,
    ReloadOutcome,
    Serving,
    Slot,
)
from converge.scoring.prediction_log import DriftQuery, DriftReport
from converge.scoring.service import Scored, ScoreQuery, ScoreResult
from converge.scoring.store import StoredPrediction
from converge.v1 import common_pb2, predictions_pb2, privacy_pb2, scoring_pb2

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
        check_identifier(identifier, f"{path}.identifier", v, MAX_KEY)
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
        channel=channel_name(request.channel),
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


# --- the prediction log: drift reports and data subject rights ------------------------

_DRIFT_LEVELS = {
    drift.DriftLevel.INSUFFICIENT_DATA: scoring_pb2.DRIFT_LEVEL_INSUFFICIENT_DATA,
    drift.DriftLevel.NONE: scoring_pb2.DRIFT_LEVEL_NONE,
    drift.DriftLevel.MODERATE: scoring_pb2.DRIFT_LEVEL_MODERATE,
    drift.DriftLevel.SIGNIFICANT: scoring_pb2.DRIFT_LEVEL_SIGNIFICANT,
}
MAX_DRIFT_FEATURES = 1000


def channel_name(number: int) -> str:
    """A Channel as the log stores it ("web", "chat"; "" when unset or unknown)."""
    if number == common_pb2.CHANNEL_UNSPECIFIED or number not in common_pb2.Channel.values():
        return ""
    return (
        common_pb2.Channel.Name(common_pb2.Channel.ValueType(number))
        .removeprefix("CHANNEL_")
        .lower()
    )


def _time_range(
    message: scoring_pb2.GetDriftReportRequest, name: str, v: Violations
) -> tuple[datetime | None, datetime | None]:
    if not message.HasField(name):  # type: ignore[arg-type]
        return None, None
    window: common_pb2.TimeRange = getattr(message, name)
    start = parse_time(window.start, f"{name}.start", v) if window.HasField("start") else None
    end = parse_time(window.end, f"{name}.end", v) if window.HasField("end") else None
    if start is not None and end is not None and start >= end:
        v.add(name, "start must be before end")
    return start, end


def drift_query(request: scoring_pb2.GetDriftReportRequest) -> DriftQuery:
    v = Violations()
    kind = _KINDS.get(request.kind)
    v.check(kind is not None, "kind", "required: set a known prediction kind")
    start, end = _time_range(request, "window", v)
    baseline_start, baseline_end = _time_range(request, "baseline_window", v)
    v.check(len(request.model_version) <= MAX_KEY, "model_version", f"at most {MAX_KEY} characters")
    names = list(request.feature_names)
    v.check(len(names) <= MAX_DRIFT_FEATURES, "feature_names", f"at most {MAX_DRIFT_FEATURES}")
    for i, name in enumerate(names[:MAX_DRIFT_FEATURES]):
        v.check(
            0 < len(name) <= MAX_KEY,
            f"feature_names[{i}]",
            f"required, at most {MAX_KEY} characters",
        )
    v.raise_if_any()
    assert kind is not None
    return DriftQuery(
        prediction=kind,
        window_start=start,
        window_end=end,
        baseline_start=baseline_start,
        baseline_end=baseline_end,
        # Either bound set means a baseline window (an empty message too).
        has_baseline_window=request.HasField("baseline_window"),
        model_version=request.model_version,
        feature_names=tuple(names),
    )


def _feature_drift_pb(found: drift.Drift) -> scoring_pb2.FeatureDrift:
    return scoring_pb2.FeatureDrift(
        feature=found.name,
        psi=found.psi,
        level=_DRIFT_LEVELS[found.level],
        bins=[
            scoring_pb2.DriftBin(
                lower=b.lower,
                upper=b.upper,
                label=b.label,
                baseline_fraction=b.baseline_fraction,
                current_fraction=b.current_fraction,
            )
            for b in found.bins
        ],
        current_missing_rate=found.current_missing_rate,
        baseline_missing_rate=found.baseline_missing_rate,
    )


def _time_range_pb(bounds: tuple[datetime, datetime]) -> common_pb2.TimeRange:
    return common_pb2.TimeRange(start=timestamp(bounds[0]), end=timestamp(bounds[1]))


def drift_response(report: DriftReport) -> scoring_pb2.GetDriftReportResponse:
    response = scoring_pb2.GetDriftReportResponse(
        kind=predictions_pb2.PredictionKind.ValueType(_KIND_NUMBERS[report.prediction]),
        window=_time_range_pb(report.window),
        current_samples=report.current_samples,
        baseline_samples=report.baseline_samples,
        score=_feature_drift_pb(report.score),
        features=[_feature_drift_pb(f) for f in report.features],
        computed_at=timestamp(report.computed_at),
    )
    if report.model is not None:
        response.model.CopyFrom(model_ref_pb(report.model))
    else:
        response.model.version = report.model_version
    if report.baseline_window is not None:
        response.baseline_window.CopyFrom(_time_range_pb(report.baseline_window))
    return response


def _customer_ids(values: Sequence[str], v: Violations) -> list[uuid.UUID]:
    """The customer ids of a data subject request (at least one)."""
    v.check(bool(values), "customer_ids", "at least one customer id")
    ids = [parse_uuid(c, f"customer_ids[{i}]", v) for i, c in enumerate(values)]
    return [uuid.UUID(i) for i in ids if i is not None]


def erase_request(request: privacy_pb2.EraseCustomerDataRequest) -> list[uuid.UUID]:
    v = Violations()
    ids = _customer_ids(request.customer_ids, v)
    v.raise_if_any()
    return ids


# An export page token names the last log row sent (its seq). Opaque to
# callers; the prefix tells a token of another kind apart.
_EXPORT_TOKEN_PREFIX = "prediction-log-after:"


def export_request(request: privacy_pb2.ExportCustomerDataRequest) -> tuple[list[uuid.UUID], int]:
    """The customers of an export and the log row its page starts after."""
    v = Violations()
    ids = _customer_ids(request.customer_ids, v)
    after = 0
    if request.page_token:
        digits = request.page_token.removeprefix(_EXPORT_TOKEN_PREFIX)
        valid = digits != request.page_token and digits.isascii() and digits.isdigit()
        v.check(valid and len(digits) <= 18, "page_token", "not a token this service issued")
        after = int(digits) if valid and len(digits) <= 18 else 0
    v.raise_if_any()
    return ids, after


def _logged_record_pb(row: StoredPrediction) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(
        {
            "score_id": row.score_id,
            "position": row.position,
            "customer_id": str(row.customer_id),
            "prediction": row.prediction,
            "ticket_id": row.ticket_id,
            "product_id": row.product_id,
            "model_name": row.model_name,
            "model_version": row.model_version,
            "features": dict(row.features),
            "probability": row.probability,
            "band": row.band,
            "channel": row.channel,
            "scored_at": row.scored_at.isoformat(),
        }
    )
    return struct


async def export_response(
    rows: AsyncIterator[StoredPrediction], after: int, max_bytes: int, exported_at: datetime
) -> privacy_pb2.ExportCustomerDataResponse:
    """One export page of `rows` (read only as far as the page's byte bound),
    with the token of the next page when the bound stopped it. A record
    bigger than the bound still goes alone on its page, so paging moves on."""
    records: list[struct_pb2.Struct] = []
    size = 0
    token = ""
    async for row in rows:
        record = _logged_record_pb(row)
        # The record's bytes, and its repeated field's tag and length prefix.
        record_size = record.ByteSize() + 1 + max(1, (record.ByteSize().bit_length() + 6) // 7)
        if records and size + record_size > max_bytes:
            token = f"{_EXPORT_TOKEN_PREFIX}{after}"
            break
        records.append(record)
        size += record_size
        after = row.seq
    return privacy_pb2.ExportCustomerDataResponse(
        service="scoring",
        sections=[privacy_pb2.ExportedRecords(kind="prediction_log", records=records)],
        exported_at=timestamp(exported_at),
        next_page_token=token,
    )

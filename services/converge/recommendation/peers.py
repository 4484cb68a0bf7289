"""Every client the recommendation service holds of its peers: identity
(the customer, profile and contact preferences), scoring (scores with
reasons and the features behind them) and interactions (outcomes written as
"action.outcome" interactions).

Each call waits no longer than the caller's time left, capped at
`peer_timeout_s`; a peer that does not answer in time (or is down) is
UNAVAILABLE, an unknown customer NOT_FOUND (passed through), a request a
peer refuses INVALID_ARGUMENT naming our field. Nothing is cached: contact
preferences are read on every decision, so a withdrawn consent holds for
every decision that starts after identity answered the withdrawal.

Answers cross into the service as plain frozen dataclasses; what the
decision log must replay byte for byte (the scoring answer) travels beside
them as serialized bytes that only `decisions/convert.py` opens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from converge.recommendation.contact.convert import preferences_from_proto
from converge.recommendation.contact.rules import ContactPreferences
from converge.runtime.channels import aio_channel
from converge.runtime.deadlines import downstream_timeout
from converge.runtime.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from converge.runtime.values import CustomerKey, PlainValue, to_plain
from converge.v1 import (
    identity_pb2,
    identity_pb2_grpc,
    interactions_pb2,
    interactions_pb2_grpc,
    predictions_pb2,
    scoring_pb2,
    scoring_pb2_grpc,
)

logger = logging.getLogger(__name__)

# Statuses of a peer that mean "not now", as opposed to a bad request.
_UNREACHABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.CANCELLED,
)
_PREDICTION_NAMES = {
    predictions_pb2.PREDICTION_KIND_CHURN: "churn",
    predictions_pb2.PREDICTION_KIND_ESCALATION: "escalation",
    predictions_pb2.PREDICTION_KIND_CROSS_SELL: "cross_sell",
}
_PREDICTION_NUMBERS = {name: number for number, name in _PREDICTION_NAMES.items()}

FeatureValue = float | str


@dataclass(frozen=True)
class CustomerView:
    """A customer as identity holds it now (the survivor after merges)."""

    customer_id: str
    segment: str
    plan: str
    region: str
    owner_team: str
    attributes: Mapping[str, PlainValue]
    preferences: ContactPreferences

    def profile_value(self, name: str) -> PlainValue | None:
        """A profile field as the policy names it: "segment", "plan", "region",
        "owner_team" or "attributes.<name>"; None when absent or empty."""
        if name.startswith("attributes."):
            return self.attributes.get(name.removeprefix("attributes."))
        value = {
            "segment": self.segment,
            "plan": self.plan,
            "region": self.region,
            "owner_team": self.owner_team,
        }.get(name)
        return value or None


@dataclass(frozen=True)
class Reason:
    code: str
    feature: str
    value: float | None
    contribution: float
    text: str


@dataclass(frozen=True)
class Prediction:
    """One scored prediction; `index` is its place in the scoring answer."""

    index: int
    kind: str  # "churn", "escalation" or "cross_sell"
    probability: float
    product_id: str
    ticket_id: str
    fallback_used: bool
    reasons: tuple[Reason, ...]


@dataclass(frozen=True)
class Scores:
    """Scoring's answer: predictions, the features behind them (customer, then
    ticket), and the whole answer serialized for the decision log."""

    customer_id: str
    predictions: tuple[Prediction, ...]
    customer_features: Mapping[str, FeatureValue]
    ticket_features: Mapping[str, FeatureValue]
    raw: bytes  # a serialized converge.v1.ScoreResponse

    def find(self, kind: str, product_id: str = "") -> Prediction | None:
        for prediction in self.predictions:
            if prediction.kind == kind and (not product_id or prediction.product_id == product_id):
                return prediction
        return None

    def feature(self, name: str) -> FeatureValue | None:
        """A live feature: the ticket's first, then the customer's."""
        if name in self.ticket_features:
            return self.ticket_features[name]
        return self.customer_features.get(name)


def _peer_error(
    service: str, error: grpc.aio.AioRpcError, field_path: str, missing: tuple[str, str] = ("", "")
) -> Exception:
    """Our error for a peer's: NOT_FOUND names `missing` (kind, key), a refused
    request names `field_path`, anything else is UNAVAILABLE."""
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        kind, key = missing
        return NotFound(kind or field_path, key or str(error.details()))
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # The peer's own field paths when it named them (scoring's ScoreRequest
        # names its fields as RecommendRequest does: context_features[...]).
        named = _field_violations(error)
        return InvalidArgument(named or [FieldViolation(field_path, str(error.details()))])
    if code not in _UNREACHABLE:
        logger.warning("%s answered %s: %s", service, code.name, error.details())
    return Unavailable(f"the {service} service cannot answer now ({code.name}), retry later")


def _field_violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    found: list[FieldViolation] = []
    for detail in status.details if status is not None else ():
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            found += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    return found


def _features(vector: predictions_pb2.FeatureVector) -> dict[str, FeatureValue]:
    values: dict[str, FeatureValue] = {
        name: value for name, value in vector.values.items() if not math.isnan(value)
    }
    values.update(vector.category_values)
    return values


def customer_from_pb(pb: identity_pb2.Customer) -> CustomerView:
    profile = pb.profile
    attributes: dict[str, PlainValue] = {}
    for name, value in profile.attributes.items():
        plain = to_plain(value)
        if plain is not None:
            attributes[name] = plain
    return CustomerView(
        customer_id=pb.customer_id,
        segment=profile.segment,
        plan=profile.plan,
        region=profile.region,
        owner_team=profile.owner_team,
        attributes=attributes,
        preferences=preferences_from_proto(pb.contact_preferences),
    )


def scores_from_pb(pb: scoring_pb2.ScoreResponse) -> Scores:
    customer_features: dict[str, FeatureValue] = {}
    ticket_features: dict[str, FeatureValue] = {}
    for vector in pb.features:
        (ticket_features if vector.ticket_id else customer_features).update(_features(vector))
    return Scores(
        customer_id=pb.customer_id,
        predictions=tuple(
            Prediction(
                index=i,
                kind=_PREDICTION_NAMES.get(p.kind, ""),
                probability=p.probability,
                product_id=p.product_id,
                ticket_id=p.ticket_id,
                fallback_used=p.fallback_used,
                reasons=tuple(
                    Reason(
                        r.code,
                        r.feature,
                        r.value if r.HasField("value") else None,
                        r.contribution,
                        r.text,
                    )
                    for r in p.reasons
                ),
            )
            for i, p in enumerate(pb.predictions)
        ),
        customer_features=customer_features,
        ticket_features=ticket_features,
        raw=pb.SerializeToString(),
    )


class Peers:
    """The clients of identity, scoring and interactions, one channel each."""

    def __init__(
        self,
        *,
        identity_address: str,
        scoring_address: str,
        interactions_address: str,
        timeout_s: float,
    ) -> None:
        self.timeout_s = timeout_s
        self._channels = [
            aio_channel(identity_address),
            aio_channel(scoring_address),
            aio_channel(interactions_address),
        ]
        self._identity = identity_pb2_grpc.IdentityServiceStub(self._channels[0])
        self._scoring = scoring_pb2_grpc.ScoringServiceStub(self._channels[1])
        self._interactions = interactions_pb2_grpc.InteractionsServiceStub(self._channels[2])

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close(None)

    def _timeout(self, doing: str) -> float:
        timeout = downstream_timeout(self.timeout_s, doing=doing)
        assert timeout is not None  # (capped at timeout_s)
        return max(timeout, 0.001)

    async def customer(self, key: CustomerKey, field_path: str = "customer") -> CustomerView:
        """The customer's profile and contact preferences, read now from
        identity (never cached). NOT_FOUND for an unknown customer; never
        creates one."""
        try:
            answer = await self._identity.GetCustomer(
                identity_pb2.GetCustomerRequest(customer=key.to_pb()),
                timeout=self._timeout("reading the customer from identity"),
            )
        except grpc.aio.AioRpcError as error:
            raise _peer_error(
                "identity", error, field_path, ("customer", key.describe())
            ) from error
        return customer_from_pb(answer.customer)

    async def score(
        self,
        key: CustomerKey,
        *,
        ticket_id: str = "",
        products: Sequence[str] = (),
        predictions: Sequence[str] = ("churn", "escalation", "cross_sell"),
        context_features: Mapping[str, float] | None = None,
        channel: int = 0,
        field_path: str = "customer",
    ) -> Scores:
        """Scores with reasons and the features used (Score with
        include_features). Escalation only with a ticket, cross-sell only with
        products. NOT_FOUND for an unknown customer or ticket."""
        return scores_from_pb(
            await self._score_pb(
                key,
                self.score_request(
                    key,
                    ticket_id=ticket_id,
                    products=products,
                    predictions=predictions,
                    context_features=context_features,
                    channel=channel,
                ),
                field_path,
            )
        )

    @staticmethod
    def score_request(
        key: CustomerKey,
        *,
        ticket_id: str = "",
        products: Sequence[str] = (),
        predictions: Sequence[str] = ("churn", "escalation", "cross_sell"),
        context_features: Mapping[str, float] | None = None,
        channel: int = 0,
    ) -> scoring_pb2.ScoreRequest:
        kinds = [
            _PREDICTION_NUMBERS[p]
            for p in predictions
            if (p != "escalation" or ticket_id) and (p != "cross_sell" or products)
        ]
        return scoring_pb2.ScoreRequest(
            customer=key.to_pb(),
            predictions=kinds,  # type: ignore[arg-type]
            ticket_id=ticket_id if "escalation" in predictions else "",
            candidate_product_ids=list(products) if "cross_sell" in predictions else [],
            context_features=dict(context_features or {}),
            include_features=True,
            channel=channel,  # type: ignore[arg-type]
        )

    async def _score_pb(
        self, key: CustomerKey, request: scoring_pb2.ScoreRequest, field_path: str
    ) -> scoring_pb2.ScoreResponse:
        try:
            answer: scoring_pb2.ScoreResponse = await self._scoring.Score(
                request, timeout=self._timeout("scoring the customer")
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.NOT_FOUND and "ticket" in str(error.details()):
                raise _peer_error(
                    "scoring", error, "ticket_id", ("ticket", request.ticket_id)
                ) from error
            raise _peer_error("scoring", error, field_path, ("customer", key.describe())) from error
        return answer

    async def score_batch(
        self, requests: Sequence[scoring_pb2.ScoreRequest]
    ) -> list[Scores | Exception]:
        """Scores many customers over one ScoreBatch stream (alerts, nightly
        runs); each item answers its scores or its error, in request order."""

        async def items() -> Any:
            for i, request in enumerate(requests):
                yield scoring_pb2.ScoreBatchRequest(row_ref=str(i), score=request)

        results: list[Scores | Exception] = [
            Unavailable("scoring did not answer this item") for _ in requests
        ]
        try:
            async for answer in self._scoring.ScoreBatch(
                items(), timeout=self._timeout("scoring a batch")
            ):
                i = int(answer.row_ref)
                if answer.HasField("score"):
                    results[i] = scores_from_pb(answer.score)
                elif answer.error.code == grpc.StatusCode.NOT_FOUND.value[0]:
                    results[i] = NotFound("customer", answer.error.message)
                else:
                    results[i] = Unavailable(answer.error.message or "scoring failed the item")
        except grpc.aio.AioRpcError as error:
            raise _peer_error("scoring", error, "customer") from error
        return results

    async def record_interaction(
        self, request: interactions_pb2.RecordInteractionRequest, field_path: str = ""
    ) -> tuple[str, bool]:
        """Writes one interaction (an "action.outcome"); returns its id and
        whether the key had been seen before. Returns once it is durable."""
        try:
            answer = await self._interactions.RecordInteraction(
                request, timeout=self._timeout("recording the interaction")
            )
        except grpc.aio.AioRpcError as error:
            raise _peer_error("interactions", error, field_path or "interaction") from error
        return answer.interaction.interaction_id, answer.duplicate

"""Protobuf <-> plain conversions of the feature RPCs (ListFeatureDefinitions,
GetFeatures, GetPointInTimeFeatures), all against the feature set the
service serves: names are checked against its definitions and vectors carry
its version. CATEGORY features (text) travel in `category_values`, every
other feature in `values`."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime

from google.protobuf import duration_pb2, timestamp_pb2

from converge.features.engine import FeatureDefinition, FeatureSet, FeatureValues
from converge.interactions.convert import MAX_BATCH, customer_ref, uuid_field
from converge.interactions.identity_link import IdentifierRef
from converge.runtime.errors import FailedPrecondition, Violations
from converge.runtime.fields import check_message, time_problem
from converge.runtime.values import timestamp, to_datetime
from converge.v1 import common_pb2, interactions_pb2, predictions_pb2

MAX_PIT_QUERIES = 10_000
_AGGREGATIONS = {
    name.removeprefix("FEATURE_AGGREGATION_").lower(): number
    for name, number in interactions_pb2.FeatureAggregation.items()
}
_PREDICTIONS = {"churn": 1, "escalation": 2, "cross_sell": 3}
_ENTITIES = {1: "customer", 2: "ticket"}


def definition_pb(definition: FeatureDefinition) -> interactions_pb2.FeatureDefinition:
    message = interactions_pb2.FeatureDefinition(
        name=definition.name,
        description=definition.description,
        entity=interactions_pb2.FEATURE_ENTITY_CUSTOMER
        if definition.entity == "customer"
        else interactions_pb2.FEATURE_ENTITY_TICKET,
        aggregation=_AGGREGATIONS[definition.aggregation],
        interaction_types=definition.interaction_types,
        channel=common_pb2.Channel.ValueType(definition.channel),
        attribute=definition.attribute,
        unit=definition.unit,
        categories=definition.categories,
        may_be_missing=definition.may_be_missing,
        used_by=[
            predictions_pb2.PredictionKind.ValueType(_PREDICTIONS[p]) for p in definition.used_by
        ],
        filters=[
            interactions_pb2.AttributeFilter(attribute=attribute, values=values)
            for attribute, values in definition.filters
        ],
        min_category_count=definition.min_category_count,
    )
    if definition.window_days:
        message.window.CopyFrom(duration_pb2.Duration(seconds=definition.window_days * 86400))
    return message


def definitions_response(
    request: interactions_pb2.ListFeatureDefinitionsRequest, features: FeatureSet
) -> interactions_pb2.ListFeatureDefinitionsResponse:
    """The served definitions of the entity asked for (every entity for none)."""
    check_feature_set_version(request.feature_set_version, "feature_set_version", features)
    wanted = _ENTITIES.get(request.entity)
    return interactions_pb2.ListFeatureDefinitionsResponse(
        feature_set_version=features.version,
        definitions=[definition_pb(d) for d in features.definitions if wanted in (None, d.entity)],
        served_versions=[features.version],
    )


def fill_feature_vector(
    vector: predictions_pb2.FeatureVector,
    customer_id: uuid.UUID | None,
    values: FeatureValues | None,
    as_of: timestamp_pb2.Timestamp,
    names: set[str],
    features: FeatureSet,
    ticket_id: str = "",
) -> None:
    """Fills an empty vector in place: a vector built apart and then put into
    a response is copied whole, maps included (a GetFeatures of 100 customers
    spent four times longer building its response that way)."""
    numbers: Mapping[str, float | str] = values or {}
    if names:
        numbers = {name: value for name, value in numbers.items() if name in names}
    if customer_id is not None:
        vector.customer_id = str(customer_id)
    if ticket_id:
        vector.ticket_id = ticket_id
    vector.as_of.CopyFrom(as_of)
    vector.feature_set_version = features.version
    vector.found = values is not None
    if not features.category_names.isdisjoint(numbers):
        texts = {n: v for n, v in numbers.items() if isinstance(v, str)}
        vector.category_values.update(texts)
        numbers = {n: v for n, v in numbers.items() if n not in texts}
    # (the map filled at once: half the time of key by key; no text left in it)
    vector.values.update(numbers)  # type: ignore[arg-type]


def check_feature_set_version(version: str, path: str, features: FeatureSet) -> None:
    """FAILED_PRECONDITION for a feature set version this service does not serve."""
    if version and version != features.version:
        raise FailedPrecondition(
            f"feature set {version!r} is not served; this service serves {features.version!r}",
            [("FEATURE_SET_NOT_SERVED", path, "not served")],
        )


def feature_names(names: list[str], v: Violations, features: FeatureSet) -> set[str]:
    known = features.by_name
    for i, name in enumerate(names):
        v.check(name in known, f"feature_names[{i}]", f"unknown feature {name[:80]!r}")
    return set(names)


def features_request(
    request: interactions_pb2.GetFeaturesRequest, features: FeatureSet
) -> tuple[list[tuple[uuid.UUID | None, IdentifierRef | None]], set[str]]:
    """The customer references and the feature names wanted."""
    v = Violations()
    v.check(len(request.customers) <= MAX_BATCH, "customers", f"at most {MAX_BATCH}")
    v.check(len(request.ticket_ids) <= MAX_BATCH, "ticket_ids", f"at most {MAX_BATCH}")
    refs = [customer_ref(c, f"customers[{i}]", v) for i, c in enumerate(request.customers)]
    names = feature_names(list(request.feature_names), v, features)
    v.raise_if_any()
    check_feature_set_version(request.feature_set_version, "feature_set_version", features)
    return refs, names


def features_response(
    as_of: datetime,
    customers: list[tuple[uuid.UUID | None, FeatureValues | None]],
    tickets: list[tuple[uuid.UUID, str, FeatureValues | None]],
    names: set[str],
    features: FeatureSet,
) -> interactions_pb2.GetFeaturesResponse:
    response = interactions_pb2.GetFeaturesResponse(feature_set_version=features.version)
    at = timestamp(as_of)
    # Not found: no customer id (never the nil UUID) and `found` false.
    for root, values in customers:
        fill_feature_vector(response.customers.add(), root, values, at, names, features)
    for owner, ticket_id, values in tickets:
        fill_feature_vector(response.tickets.add(), owner, values, at, names, features, ticket_id)
    return response


PointInTimeQuery = tuple[uuid.UUID, datetime, str]  # (customer, as of, ticket id)


def point_in_time_request(
    request: interactions_pb2.GetPointInTimeFeaturesRequest, features: FeatureSet
) -> tuple[list[PointInTimeQuery], set[str]]:
    """The queries of one GetPointInTimeFeatures message and the feature names wanted."""
    v = Violations()
    check_message(request, v)
    v.check(
        len(request.queries) <= MAX_PIT_QUERIES,
        "queries",
        f"at most {MAX_PIT_QUERIES} per message",
    )
    queries = []
    for i, query in enumerate(request.queries):
        customer_id = uuid_field(query.customer_id, f"queries[{i}].customer_id", v)
        v.check(query.HasField("as_of"), f"queries[{i}].as_of", "required")
        if (
            customer_id is not None
            and query.HasField("as_of")
            and time_problem(query.as_of) is None
        ):
            queries.append((customer_id, to_datetime(query.as_of), query.ticket_id))
    names = feature_names(list(request.feature_names), v, features)
    v.raise_if_any()
    check_feature_set_version(request.feature_set_version, "feature_set_version", features)
    return queries, names


def point_in_time_response(
    request: interactions_pb2.GetPointInTimeFeaturesRequest,
    queries: list[PointInTimeQuery],
    computed: list[tuple[FeatureValues, FeatureValues | None]],
    names: set[str],
    features: FeatureSet,
) -> interactions_pb2.GetPointInTimeFeaturesResponse:
    response = interactions_pb2.GetPointInTimeFeaturesResponse(feature_set_version=features.version)
    for query, (customer_id, as_of, ticket_id), (customer, ticket) in zip(
        request.queries, queries, computed, strict=True
    ):
        result = response.results.add(row_ref=query.row_ref)
        at = timestamp(as_of)
        fill_feature_vector(result.customer, customer_id, customer, at, names, features)
        if ticket_id:
            fill_feature_vector(result.ticket, customer_id, ticket, at, names, features, ticket_id)
    return response

"""Training sets built point in time, from the services or in-process.

One feature definition. Both builders compute features with the
interactions service's feature engine (`converge.features.engine`):
`build_from_services` asks the running interactions service
(`GetPointInTimeFeatures`, which folds the stored interactions strictly
before each cutoff with `features_at_cutoffs`), and `build_from_events`
calls `features_at_cutoffs` itself on events held in memory (large offline
sets, benchmarks, the simulator). Same functions, same registry, same
`FEATURE_SET_VERSION`: the two paths give identical values for the same
interactions (checked by a test).

Rows, per prediction (labels: `converge.models.labels`, only from
[cutoff, cutoff + horizon)):

- churn: one row per customer active at the cutoff; features: the customer
  features the registry marks `used_by` churn, and the profile;
- escalation: one row per ticket open at the cutoff; the ticket features,
  the customer features used by escalation, and the profile;
- cross_sell: one row per active customer and product it does not hold;
  the customer features used by cross-sell, the profile, and the candidate
  product as the categorical feature `candidate_product`.

Profile features (as they were at the cutoff: `BatchGetCustomers(as_of=)`
from identity, or a profile history in-process): `profile_segment`,
`profile_plan`, `profile_region`, `profile_owner_team` (categorical),
`profile_tenure_days` (days since `signup_date`), and each custom attribute
as `profile_attr_<name>` (strings categorical, numbers and flags numeric).
Registry features of CATEGORY aggregation (ticket priority, channel,
category) become categorical columns with the definition's categories plus
"other". Missing values are NaN, never 0.

By definitions (what `converge models train` runs): `build_defined` (the
services) and `build_defined_events` (in-process) take a
`converge.models.definitions.Definitions`, hold only the label types
compactly (`converge.models.history`), take the end of history from the data
unless told, raise `TooLittleData` saying what to change, ask the features
point in time in batches of `PIT_BATCH` straight into arrays, and return a
`BuildReport` (cutoffs, counts, the ticket closing policy's counts) with the
frame. Every frame's categorical columns take their categories from the
input schema learned in `assemble_columns`.

Entity ids: the customer key (churn), the ticket id (escalation),
"<customer key>:<product>" (cross-sell). The frame also carries `customer`
and `ticket_id` / `product` columns that are not features.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd

from converge.features.engine import (
    FEATURE_SET_VERSION,
    HOLDING,
    REGISTRY,
    Event,
    features_at_cutoffs,
)
from converge.features.transform import (
    CANDIDATE,
    MIN_COUNT,
    PROFILE_TEXT_FIELDS,
    InputSchema,
    profile_values,
)
from converge.models.dataset import HORIZONS, TrainingFrame, check_prediction
from converge.models.definitions import Definitions
from converge.models.history import (
    History,
    TicketCount,
    TooLittleData,
    describe_label,
    horizon_key,
    label_attributes,
)
from converge.models.history import (
    LabelRow as LabelRow,
)
from converge.models.labels import (
    ESCALATION_OUTCOMES,
    churn_label,
    cross_sell_labels,
    escalation_labels,
)
from converge.models.predictions import Prediction

PROFILE_CATEGORIES = PROFILE_TEXT_FIELDS
# A profile: {"segment", "plan", "region", "owner_team": str, "signup_date":
# datetime | None, "attributes": {name: str | float | bool}}; a history is
# [(effective from, profile), ...] oldest first.
Profile = Mapping[str, Any]
ProfileHistory = Sequence[tuple[datetime, Profile]]
Progress = Callable[[int, int], None]
# One value per row: a float array for numbers, a list for text.
Column = list[Any] | np.ndarray


def products_in(events_by_customer: Mapping[str, Sequence[Event]]) -> tuple[str, ...]:
    """The catalogue the data shows: every product id of a holding event (the
    default wherever no catalogue is configured; never a list in code)."""
    return tuple(
        sorted(
            {
                e.product_id
                for events in events_by_customer.values()
                for e in events
                if e.product_id and e.type in HOLDING
            }
        )
    )


def feature_names_for(prediction: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(customer features, ticket features) of the registry the prediction uses."""
    check_prediction(prediction)
    customer = tuple(d.name for d in REGISTRY if d.entity == "customer" and prediction in d.used_by)
    ticket = (
        tuple(d.name for d in REGISTRY if d.entity == "ticket")
        if prediction == "escalation"
        else ()
    )
    return customer, ticket


_CATEGORY_DEFS = {d.name: d for d in REGISTRY if d.aggregation == "category"}


def label_rows(
    customer: str,
    events: Sequence[Event],
    cutoffs: Iterable[datetime],
    prediction: str,
    products: Sequence[str] = (),
    outcome_types: Sequence[str] = ESCALATION_OUTCOMES,
    horizon: timedelta | None = None,
) -> list[LabelRow]:
    """The labelled rows of one customer at the cutoffs."""
    horizon = horizon or HORIZONS[check_prediction(prediction)]
    rows: list[LabelRow] = []
    for cutoff in cutoffs:
        if prediction == "churn":
            label = churn_label(events, cutoff, horizon)
            if label is not None:
                rows.append(LabelRow(customer, cutoff, label))
        elif prediction == "escalation":
            for ticket, label in escalation_labels(events, cutoff, horizon, outcome_types):
                rows.append(LabelRow(customer, cutoff, label, ticket_id=ticket))
        else:
            for product, label in cross_sell_labels(events, cutoff, products, horizon):
                rows.append(LabelRow(customer, cutoff, label, product=product))
    return rows


def _rows_for(
    customer: str,
    events: Sequence[Event],
    cutoffs: Iterable[datetime],
    prediction: str,
    products: Sequence[str],
    outcome_types: Sequence[str],
    horizon: timedelta | None,
    tickets: Mapping[str, Mapping[datetime, Sequence[str]]] | None,
) -> list[LabelRow]:
    if prediction != "escalation" or tickets is None:
        return label_rows(customer, events, cutoffs, prediction, products, outcome_types, horizon)
    wanted = tickets.get(customer, {})
    found: list[LabelRow] = []
    for cutoff in cutoffs:
        labels = escalation_labels(
            events, cutoff, horizon or HORIZONS["escalation"], outcome_types, wanted.get(cutoff, ())
        )
        found += [LabelRow(customer, cutoff, label, ticket_id=t) for t, label in labels]
    return found


def profile_at(history: ProfileHistory | Profile | None, cutoff: datetime) -> Profile | None:
    """The profile in force just before `cutoff` (a plain profile is taken as
    it is)."""
    if history is None:
        return None
    if isinstance(history, Mapping):
        return history
    times = [t for t, _ in history]
    i = bisect.bisect_left(times, cutoff) - 1
    return history[i][1] if i >= 0 else None


def _category_names(name: str, values: Column) -> Column:
    """A registry feature of CATEGORY aggregation arrives as its category's
    code: its name is what the input schema learns."""
    definition = _CATEGORY_DEFS.get(name)
    if definition is None or not isinstance(values, np.ndarray):
        return values
    levels = [*definition.categories, "other"]
    return [None if math.isnan(v) else levels[min(int(v), len(levels) - 1)] for v in values]


def assemble(
    prediction: str,
    rows: Sequence[LabelRow],
    customer_values: Sequence[Mapping[str, float | str]],
    ticket_values: Sequence[Mapping[str, float | str] | None],
    profiles: Sequence[Profile | None],
    feature_set_version: str = FEATURE_SET_VERSION,
    source: str = "",
    customer_features: Sequence[str] | None = None,
    exclude_attributes: Sequence[str] = (),
    min_count: int = MIN_COUNT,
) -> TrainingFrame:
    """The TrainingFrame of labelled rows and their point-in-time values
    (one entry per row in each sequence)."""
    names_c, names_t = feature_names_for(prediction)
    if customer_features is not None:
        names_c = tuple(customer_features)
    columns: dict[str, Column] = {}
    for name in names_t:
        columns[name] = [(tv or {}).get(name) for tv in ticket_values]
    for name in names_c:
        columns[name] = [cv.get(name) for cv in customer_values]
    for name, values in list(columns.items()):
        if not any(isinstance(v, str) for v in values):
            columns[name] = np.array(
                [math.nan if v is None else float(v) for v in values], dtype=np.float64
            )
    return assemble_columns(
        prediction,
        rows,
        columns,
        profiles,
        feature_set_version,
        source,
        exclude_attributes,
        min_count,
    )


def assemble_columns(
    prediction: str,
    rows: Sequence[LabelRow],
    columns: dict[str, Column],
    profiles: Sequence[Profile | None],
    feature_set_version: str = FEATURE_SET_VERSION,
    source: str = "",
    exclude_attributes: Sequence[str] = (),
    min_count: int = MIN_COUNT,
) -> TrainingFrame:
    """The TrainingFrame of labelled rows from feature columns (name -> one
    value per row), the profiles (one per row) and the candidate products.
    The input schema (`converge.features.transform.InputSchema`) is learned
    here, from all the rows: it decides which inputs are categorical and
    their categories (rare values grouped as "other"), and the frame carries
    it to the model. Its categories come from unlabelled values, so learning
    them across the parts leaks nothing of the labels."""
    n = len(rows)
    columns = {name: _category_names(name, values) for name, values in columns.items()}
    forced = [name for name in columns if name in _CATEGORY_DEFS]
    prof = [
        profile_values(p, r.cutoff, exclude_attributes) for p, r in zip(profiles, rows, strict=True)
    ]
    for key in sorted({k for p in prof for k in p}):
        values = [p.get(key) for p in prof]
        if any(isinstance(v, str) for v in values):
            columns[key] = [v if isinstance(v, str) else None for v in values]
        else:
            columns[key] = np.array(
                [math.nan if v is None else float(v) for v in values], dtype=np.float64
            )
    if prediction == "cross_sell":
        columns[CANDIDATE] = [r.product for r in rows]
        forced.append(CANDIDATE)
    schema = InputSchema.learn(columns, min_count=min_count, categorical=forced)
    data: dict[str, Any] = {}
    for name in schema.names:
        if name in schema.categories:
            data[name] = pd.Categorical(
                schema.grouped(name, columns[name]), categories=list(schema.categories[name])
            )
        else:
            data[name] = np.asarray(columns[name], dtype=np.float64)
    data["entity_id"] = [r.entity_id for r in rows]
    data["cutoff"] = pd.to_datetime([r.cutoff for r in rows], utc=True)
    data["label"] = np.array([r.label for r in rows], dtype=np.int64)
    data["customer"] = [r.customer for r in rows]
    data["ticket_id"] = [r.ticket_id for r in rows]
    data["product"] = [r.product for r in rows]
    frame = pd.DataFrame(data, index=pd.RangeIndex(n))
    return TrainingFrame.from_frame(
        frame,
        prediction,
        feature_set_version,
        feature_names=schema.names,
        source=source,
        input_schema=schema,
    )


# --- in-process ---------------------------------------------------------------------


def build_from_events(
    events_by_customer: Mapping[str, Sequence[Event]],
    profiles: Mapping[str, ProfileHistory | Profile],
    cutoffs: Sequence[datetime] | Mapping[str, Sequence[datetime]],
    prediction: str,
    products: Sequence[str] | None = None,
    outcome_types: Sequence[str] = ESCALATION_OUTCOMES,
    horizon: timedelta | None = None,
    source: str = "events",
    progress: Progress | None = None,
    tickets: Mapping[str, Mapping[datetime, Sequence[str]]] | None = None,
) -> TrainingFrame:
    """A TrainingFrame from interactions in memory, with the feature
    engine's `features_at_cutoffs` (the function the interactions service
    runs for `GetPointInTimeFeatures`).

    `cutoffs`: the same for everyone, or per customer. `tickets`, for
    escalation, restricts the rows to given tickets per customer and cutoff
    (default: every ticket open at the cutoff). `products`, the cross-sell
    catalogue, defaults to the products the events show."""
    check_prediction(prediction)
    if products is None:
        products = products_in(events_by_customer)
    rows: list[LabelRow] = []
    cv: list[Mapping[str, float | str]] = []
    tv: list[Mapping[str, float | str] | None] = []
    pv: list[Profile | None] = []
    total = len(events_by_customer)
    for k, (customer, events) in enumerate(events_by_customer.items()):
        mine = cutoffs.get(customer, ()) if isinstance(cutoffs, Mapping) else cutoffs
        found = _rows_for(
            customer, events, mine, prediction, products, outcome_types, horizon, tickets
        )
        if found:
            distinct = sorted({r.cutoff for r in found}) if prediction == "cross_sell" else None
            if distinct is not None:
                values = features_at_cutoffs(events, distinct)
                by_cut = {c: v[0] for c, v in zip(distinct, values, strict=True)}
                cv += [by_cut[r.cutoff] for r in found]
                tv += [None] * len(found)
            else:
                values = features_at_cutoffs(
                    events,
                    [r.cutoff for r in found],
                    [r.ticket_id for r in found] if prediction == "escalation" else None,
                )
                cv += [v[0] for v in values]
                tv += [v[1] for v in values]
            history = profiles.get(customer)
            pv += [profile_at(history, r.cutoff) for r in found]
            rows += found
        if progress is not None and (k % 1000 == 999 or k == total - 1):
            progress(k + 1, total)
    return assemble(prediction, rows, cv, tv, pv, FEATURE_SET_VERSION, source)


def weekly_cutoffs(
    first: datetime, last: datetime, step: timedelta = timedelta(days=7)
) -> list[datetime]:
    """Cutoffs every `step` from `first` up to `last` (inclusive)."""
    out = []
    t = first
    while t <= last:
        out.append(t)
        t += step
    return out


# --- through the services ------------------------------------------------------------

LABEL_TYPES = ("ticket.*", "subscription.*", "purchase")
PIT_BATCH = 500
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


def event_from_pb(interaction: Any) -> Event:
    """A stored interaction (`converge.v1.Interaction`) as the engine's Event."""
    from converge.runtime.values import money_to_float, to_datetime, to_plain

    attributes = {}
    for key, value in interaction.attributes.items():
        plain = to_plain(value)
        if plain is not None:
            attributes[key] = plain
    return Event(
        occurred_at=to_datetime(interaction.occurred_at),
        type=interaction.type,
        channel=int(interaction.channel),
        attributes=attributes,
        ticket_id=interaction.ticket_id,
        product_id=interaction.product_id,
        amount=money_to_float(interaction.amount) if interaction.HasField("amount") else None,
        sentiment=interaction.sentiment if interaction.HasField("sentiment") else None,
    )


def profile_from_pb(customer: Any) -> Profile:
    from converge.runtime.values import to_datetime, to_plain

    p = customer.profile
    return {
        "segment": p.segment,
        "plan": p.plan,
        "region": p.region,
        "owner_team": p.owner_team,
        "signup_date": to_datetime(p.signup_date) if p.HasField("signup_date") else None,
        "attributes": {k: to_plain(v) for k, v in p.attributes.items()},
    }


class ServiceUnavailable(RuntimeError):
    """A service could not be reached."""


async def stream_events(
    interactions_address: str, types: Sequence[str] = LABEL_TYPES
) -> dict[str, list[Event]]:
    """Every stored interaction of `types`, by customer id (StreamInteractions)."""
    import grpc

    from converge.runtime.channels import aio_channel
    from converge.v1 import interactions_pb2, interactions_pb2_grpc

    out: dict[str, list[Event]] = {}
    async with aio_channel(interactions_address) as channel:
        stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
        try:
            async for message in stub.StreamInteractions(
                interactions_pb2.StreamInteractionsRequest(types=list(types), follow=False)
            ):
                x = message.interaction
                out.setdefault(x.customer_id, []).append(event_from_pb(x))
        except grpc.aio.AioRpcError as e:
            raise _unavailable("interactions", interactions_address, e) from e
    return out


def _unavailable(service: str, address: str, e: Any) -> BaseException:
    import grpc

    if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServiceUnavailable(
            f"the {service} service at {address} is unreachable: {e.details()}"
        )
    error: BaseException = e
    return error


def source_key(customer: Any) -> str:
    """A customer's key that the source gave it (`converge.v1.Customer`): its
    smallest identifier as "type:value". Customer ids are minted at import,
    so they differ from one import of the same export to the next; the
    source's identifiers do not, and training rows ordered by them (and the
    splits and LightGBM's row sampling that follow the order) are the same on
    every run. The id itself only for a customer with no identifier."""
    return min(
        (f"{i.identifier.type}:{i.identifier.value}" for i in customer.identifiers),
        default=customer.customer_id,
    )


async def profiles_as_of(
    identity_address: str, customer_ids: Sequence[str], as_of: datetime | None
) -> dict[str, Profile]:
    """Profiles as they were at `as_of` (None: now), BatchGetCustomers by 1000."""
    profiles, _ = await profiles_and_keys_as_of(identity_address, customer_ids, as_of)
    return profiles


async def profiles_and_keys_as_of(
    identity_address: str, customer_ids: Sequence[str], as_of: datetime | None
) -> tuple[dict[str, Profile], dict[str, str]]:
    """Profiles as they were at `as_of` (None: now) and each customer's
    `source_key`, BatchGetCustomers by 1000."""
    import grpc

    from converge.runtime.channels import aio_channel
    from converge.runtime.values import timestamp
    from converge.v1 import identity_pb2, identity_pb2_grpc

    out: dict[str, Profile] = {}
    keys: dict[str, str] = {}
    async with aio_channel(identity_address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        for lo in range(0, len(customer_ids), 1000):
            request = identity_pb2.BatchGetCustomersRequest(
                customer_ids=customer_ids[lo : lo + 1000]
            )
            if as_of is not None:
                request.as_of.CopyFrom(timestamp(as_of))
            try:
                answer = await stub.BatchGetCustomers(request)
            except grpc.aio.AioRpcError as e:
                raise _unavailable("identity", identity_address, e) from e
            for customer in answer.customers:
                out[customer.customer_id] = profile_from_pb(customer)
                keys[customer.customer_id] = source_key(customer)
    return out, keys


async def point_in_time_features(
    interactions_address: str,
    queries: Sequence[tuple[str, datetime, str]],
    progress: Progress | None = None,
) -> tuple[list[dict[str, float]], list[dict[str, float] | None], str]:
    """(customer values, ticket values, feature-set version) for (customer
    id, as_of, ticket id) queries, through GetPointInTimeFeatures."""
    import grpc

    from converge.runtime.channels import aio_channel
    from converge.runtime.values import timestamp
    from converge.v1 import interactions_pb2, interactions_pb2_grpc

    def requests() -> Iterable[interactions_pb2.GetPointInTimeFeaturesRequest]:
        for lo in range(0, len(queries), PIT_BATCH):
            yield interactions_pb2.GetPointInTimeFeaturesRequest(
                queries=[
                    interactions_pb2.PointInTimeQuery(
                        row_ref=str(lo + i), customer_id=c, as_of=timestamp(t), ticket_id=tk
                    )
                    for i, (c, t, tk) in enumerate(queries[lo : lo + PIT_BATCH])
                ]
            )

    customer: list[dict[str, float]] = []
    ticket: list[dict[str, float] | None] = []
    version = FEATURE_SET_VERSION
    async with aio_channel(interactions_address, options=_CHANNEL_OPTIONS) as channel:
        stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
        try:
            async for answer in stub.GetPointInTimeFeatures(iter(requests())):  # type: ignore[arg-type]
                version = answer.feature_set_version
                for result in answer.results:
                    customer.append(dict(result.customer.values))
                    ticket.append(dict(result.ticket.values) if result.HasField("ticket") else None)
                if progress is not None:
                    progress(len(customer), len(queries))
        except grpc.aio.AioRpcError as e:
            raise _unavailable("interactions", interactions_address, e) from e
    return customer, ticket, version


async def build_from_services(
    identity_address: str,
    interactions_address: str,
    cutoffs: Sequence[datetime] | Mapping[str, Sequence[datetime]],
    prediction: str,
    products: Sequence[str] | None = None,
    outcome_types: Sequence[str] = ESCALATION_OUTCOMES,
    horizon: timedelta | None = None,
    customer_ids: Sequence[str] | None = None,
    events: Mapping[str, Sequence[Event]] | None = None,
    source: str = "services",
    progress: Progress | None = None,
    tickets: Mapping[str, Mapping[datetime, Sequence[str]]] | None = None,
    profile_as_of: bool = True,
) -> TrainingFrame:
    """A TrainingFrame from the running services: labels from the stored
    interactions (StreamInteractions, label types only), features from the
    interactions service's GetPointInTimeFeatures, the profile as it was from
    identity's BatchGetCustomers(as_of=cutoff). `events` (by customer id)
    may be passed to skip the stream (they must be the stored ones);
    `tickets` as for `build_from_events`. `profile_as_of=False` reads the
    profiles once, as they are now (for sources whose profiles never change,
    with a cutoff per ticket)."""
    check_prediction(prediction)
    by_customer = events if events is not None else await stream_events(interactions_address)
    chosen = list(customer_ids) if customer_ids is not None else sorted(by_customer)
    if products is None:
        products = products_in(by_customer)
    rows: list[LabelRow] = []
    for customer in chosen:
        mine = cutoffs.get(customer, ()) if isinstance(cutoffs, Mapping) else cutoffs
        rows += _rows_for(
            customer,
            by_customer.get(customer, ()),
            mine,
            prediction,
            products,
            outcome_types,
            horizon,
            tickets,
        )
    return await frame_from_services(
        identity_address,
        interactions_address,
        prediction,
        rows,
        source=source,
        progress=progress,
        profile_as_of=profile_as_of,
    )


async def frame_from_services(
    identity_address: str,
    interactions_address: str,
    prediction: str,
    rows: Sequence[LabelRow],
    source: str = "services",
    progress: Progress | None = None,
    profile_as_of: bool = True,
    customer_features: Sequence[str] | None = None,
) -> TrainingFrame:
    """The TrainingFrame of labelled rows, with point-in-time features from
    the interactions service and profiles from identity."""
    if prediction == "cross_sell":
        keys = sorted({(r.customer, r.cutoff) for r in rows})
        queries = [(c, t, "") for c, t in keys]
    else:
        queries = [(r.customer, r.cutoff, r.ticket_id) for r in rows]
    cvals, tvals, version = await point_in_time_features(interactions_address, queries, progress)
    if prediction == "cross_sell":
        index = {k: i for i, k in enumerate(keys)}
        cv = [cvals[index[(r.customer, r.cutoff)]] for r in rows]
        tv: list[dict[str, float] | None] = [None] * len(rows)
    else:
        cv, tv = cvals, tvals
    profiles: list[Profile | None] = [None] * len(rows)
    by_cutoff: dict[datetime | None, list[int]] = {}
    for i, r in enumerate(rows):
        by_cutoff.setdefault(r.cutoff if profile_as_of else None, []).append(i)
    for cutoff, positions in by_cutoff.items():
        wanted = sorted({rows[i].customer for i in positions})
        found = await profiles_as_of(identity_address, wanted, cutoff)
        for i in positions:
            profiles[i] = found.get(rows[i].customer)
    return assemble(prediction, rows, cv, tv, profiles, version, source, customer_features)


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- from a definitions file ------------------------------------------------------------


@dataclass
class BuildReport:
    """What a definitions-driven build did, for the summary, `--json` and the
    MLflow run."""

    prediction: Prediction
    definitions: str
    label: str
    horizon: timedelta
    interactions: int = 0
    latest: datetime | None = None
    cutoffs: tuple[datetime, ...] = ()
    rows: int = 0
    positives: int = 0
    products: tuple[str, ...] = ()
    tickets: TicketCount | None = None
    snapshot: bool = False
    # More than 1: the figures pool this many cross-validation folds.
    cross_validation_folds: int = 1

    @property
    def negatives(self) -> int:
        return self.rows - self.positives

    def window(self) -> str:
        if not self.cutoffs:
            return "no cutoffs"
        first, last = self.cutoffs[0], self.cutoffs[-1]
        if first == last:
            return f"the cutoff {first:%Y-%m-%d}"
        return (
            f"{len(self.cutoffs)} cutoffs from {first:%Y-%m-%d} to {last:%Y-%m-%d} "
            f"(labels up to {last + self.horizon:%Y-%m-%d %H:%M})"
        )

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "definitions": self.definitions,
            "label": self.label,
            "interactions_read": self.interactions,
            "history_end": self.latest.isoformat() if self.latest else None,
            "first_cutoff": self.cutoffs[0].isoformat() if self.cutoffs else None,
            "last_cutoff": self.cutoffs[-1].isoformat() if self.cutoffs else None,
            "n_cutoffs": len(set(self.cutoffs)),
            "rows": self.rows,
            "positives": self.positives,
        }
        if self.prediction == "cross_sell":
            out["products"] = ",".join(self.products)
        if self.tickets is not None:
            out.update(self.tickets.as_dict())
        if self.cross_validation_folds > 1:
            out["evaluation"] = (
                f"stratified {self.cross_validation_folds}-fold cross-validation, "
                "out-of-fold predictions of every row pooled"
            )
        return out


def check_enough(
    report: BuildReport,
    defs: Definitions,
    minimum: int = 20,
    until: datetime | None = None,
) -> None:
    """Raises TooLittleData when the rows hold fewer than `minimum` positives
    or negatives, saying what to change."""
    if report.rows and min(report.positives, report.negatives) >= minimum:
        return
    raise TooLittleData(too_little_message(report, defs, f"need at least {minimum} of each"))


def too_little_message(report: BuildReport, defs: Definitions, need: str) -> str:
    end = (
        f"the history read ends {report.latest:%Y-%m-%d %H:%M}"
        if report.latest
        else "no interaction of the label's types was found"
    )
    key = horizon_key(report.prediction)
    horizon = getattr(defs, report.prediction)
    value = getattr(horizon, key.split(".")[1])
    hints = [
        f"--until DATE to end the history elsewhere ({end})",
        f"--weeks N for more cutoffs (now {defs.cutoffs.weeks})",
        f"the definition's horizon ({key}: {value:g} in {defs.origin or 'the definitions'})",
    ]
    if report.prediction == "cross_sell" and not report.products:
        hints.append("cross_sell.products (no product was found in holding events)")
    return (
        f"too little data for {report.label}: {report.positives} positive and "
        f"{report.negatives} negative examples at {report.window()}; {need}. "
        f"Change {'; or '.join(hints)}."
    )


def _history_add_pb(history: History, interaction: Any, wanted: frozenset[str]) -> None:
    from converge.runtime.values import to_datetime, to_plain

    attributes = None
    if wanted:
        attributes = {k: to_plain(v) for k, v in interaction.attributes.items() if k in wanted}
    history.add(
        interaction.customer_id,
        to_datetime(interaction.occurred_at),
        interaction.type,
        interaction.product_id,
        interaction.ticket_id,
        attributes,
    )


async def history_from_services(
    interactions_address: str,
    defs: Definitions,
    prediction: Prediction,
    progress: Progress | None = None,
) -> History:
    """The label-type interactions, held compactly (StreamInteractions)."""
    import grpc

    from converge.runtime.channels import aio_channel
    from converge.v1 import interactions_pb2, interactions_pb2_grpc

    history = History(defs, prediction)
    wanted = label_attributes(defs, prediction)
    async with aio_channel(interactions_address) as channel:
        stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
        try:
            async for message in stub.StreamInteractions(
                interactions_pb2.StreamInteractionsRequest(types=list(history.types), follow=False)
            ):
                _history_add_pb(history, message.interaction, wanted)
                if progress is not None and history.count % 10_000 == 0:
                    progress(history.count, 0)
        except grpc.aio.AioRpcError as e:
            raise _unavailable("interactions", interactions_address, e) from e
    return history


def _keep_feature(prediction: str) -> Callable[[str], bool]:
    """Which values the service sends become features: the registry's ones
    the prediction uses, and any the registry does not know (configured
    feature sets)."""
    names_c, names_t = feature_names_for(prediction)
    used = set(names_c) | set(names_t)
    known = {d.name for d in REGISTRY}
    return lambda name: name in used or name not in known


async def point_in_time_columns(
    interactions_address: str,
    queries: Sequence[tuple[str, datetime, str]],
    prediction: str,
    progress: Progress | None = None,
) -> tuple[dict[str, Column], str]:
    """Feature columns (name -> one value per query) through
    GetPointInTimeFeatures, in batches: numbers straight into float arrays,
    text values into lists; no per-row dicts are kept."""
    import grpc

    from converge.runtime.channels import aio_channel
    from converge.runtime.values import timestamp
    from converge.v1 import interactions_pb2, interactions_pb2_grpc

    n = len(queries)
    keep = _keep_feature(prediction)
    numbers: dict[str, np.ndarray] = {}
    texts: dict[str, list[Any]] = {}

    def requests() -> Iterable[interactions_pb2.GetPointInTimeFeaturesRequest]:
        for lo in range(0, n, PIT_BATCH):
            yield interactions_pb2.GetPointInTimeFeaturesRequest(
                queries=[
                    interactions_pb2.PointInTimeQuery(
                        row_ref=str(lo + i), customer_id=c, as_of=timestamp(t), ticket_id=tk
                    )
                    for i, (c, t, tk) in enumerate(queries[lo : lo + PIT_BATCH])
                ]
            )

    def put(i: int, vector: Any) -> None:
        for name, value in vector.values.items():
            if keep(name):
                column = numbers.get(name)
                if column is None:
                    column = numbers[name] = np.full(n, np.nan, dtype=np.float64)
                column[i] = value
        for name, value in getattr(vector, "category_values", {}).items():
            if keep(name):
                texts.setdefault(name, [None] * n)[i] = value

    version = FEATURE_SET_VERSION
    done = 0
    async with aio_channel(interactions_address, options=_CHANNEL_OPTIONS) as channel:
        stub = interactions_pb2_grpc.InteractionsServiceStub(channel)
        try:
            async for answer in stub.GetPointInTimeFeatures(iter(requests())):  # type: ignore[arg-type]
                version = answer.feature_set_version
                for result in answer.results:
                    i = int(result.row_ref)
                    put(i, result.customer)
                    if result.HasField("ticket"):
                        put(i, result.ticket)
                    done += 1
                if progress is not None:
                    progress(done, n)
        except grpc.aio.AioRpcError as e:
            raise _unavailable("interactions", interactions_address, e) from e
    # By name: the service's maps arrive in no fixed order, and the column
    # order is the model's input order (LightGBM samples features by position).
    merged: dict[str, Column] = {**numbers, **texts}
    columns = {name: merged[name] for name in sorted(merged)}
    return columns, version


def _expand(columns: Mapping[str, Column], index: np.ndarray) -> dict[str, Column]:
    out: dict[str, Column] = {}
    for name, values in columns.items():
        out[name] = values[index] if isinstance(values, np.ndarray) else [values[i] for i in index]
    return out


async def _profiles_for(
    identity_address: str, rows: Sequence[LabelRow]
) -> tuple[list[Profile | None], dict[str, str]]:
    """Each row's profile as it was just before its cutoff; with many
    distinct cutoffs (one per ticket) as it was at the start of the cutoff's
    day (a day staler, never later), so the calls stay few. And each
    customer's `source_key`."""
    distinct = {r.cutoff for r in rows}
    coarse = len(distinct) > 64

    def when(cutoff: datetime) -> datetime:
        return cutoff.replace(hour=0, minute=0, second=0, microsecond=0) if coarse else cutoff

    by_time: dict[datetime, list[int]] = {}
    for i, r in enumerate(rows):
        by_time.setdefault(when(r.cutoff), []).append(i)
    profiles: list[Profile | None] = [None] * len(rows)
    keys: dict[str, str] = {}
    for at, positions in sorted(by_time.items()):
        found, found_keys = await profiles_and_keys_as_of(
            identity_address, sorted({rows[i].customer for i in positions}), at
        )
        keys.update(found_keys)
        for i in positions:
            profiles[i] = found.get(rows[i].customer)
    return profiles, keys


def stable_order(rows: Sequence[LabelRow], keys: Mapping[str, str]) -> np.ndarray:
    """The positions of `rows` sorted by what the source gave them: cutoff,
    the customer's `source_key` (its id where `keys` lacks it), ticket id
    (the source's ticket number), product. The rows of one export then come
    in one order however the import minted customer ids, and so do the
    splits drawn from it and LightGBM's bagging and feature sampling, which
    follow row order: the same data and definitions give the same model."""
    order = sorted(
        range(len(rows)),
        key=lambda i: (
            rows[i].cutoff,
            keys.get(rows[i].customer, rows[i].customer),
            rows[i].ticket_id,
            rows[i].product,
        ),
    )
    return np.asarray(order, dtype=np.int64)


def _report(defs: Definitions, prediction: Prediction, history: History | None) -> BuildReport:
    return BuildReport(
        prediction=prediction,
        definitions=defs.origin or "default",
        label=describe_label(defs, prediction),
        horizon=defs.horizon(prediction),
        interactions=history.count if history is not None else 0,
        latest=history.latest if history is not None else None,
        tickets=TicketCount() if prediction == "escalation" else None,
    )


def _label_rows(history: History, until: datetime | None, report: BuildReport) -> list[LabelRow]:
    rows = list(history.rows(until, report.tickets))
    report.cutoffs = tuple(history.cutoffs(until))
    if history.prediction == "escalation" and history.defs.escalation.cutoffs.after_events:
        report.cutoffs = tuple(sorted({r.cutoff for r in rows})) or report.cutoffs
    report.rows = len(rows)
    report.positives = sum(r.label for r in rows)
    if history.prediction == "cross_sell" and report.cutoffs:
        report.products = history.products(report.cutoffs[-1])
    return rows


def _queries(
    prediction: str, rows: Sequence[LabelRow]
) -> tuple[list[tuple[str, datetime, str]], np.ndarray | None]:
    """The point-in-time queries of the rows; cross-sell asks once per
    (customer, cutoff) and `index` maps each row to its answer."""
    if prediction != "cross_sell":
        return [(r.customer, r.cutoff, r.ticket_id) for r in rows], None
    keys = sorted({(r.customer, r.cutoff) for r in rows})
    position = {k: i for i, k in enumerate(keys)}
    index = np.fromiter(
        (position[(r.customer, r.cutoff)] for r in rows), dtype=np.int64, count=len(rows)
    )
    return [(c, t, "") for c, t in keys], index


def _excluded(defs: Definitions, prediction: Prediction) -> tuple[str, ...]:
    label = defs.churn.label.profile_attribute
    return (label.name,) if prediction == "churn" and label is not None else ()


async def build_defined(
    identity_address: str,
    interactions_address: str,
    defs: Definitions,
    prediction: Prediction,
    until: datetime | None = None,
    progress: Progress | None = None,
    source: str = "services",
    minimum: int = 20,
) -> tuple[TrainingFrame, BuildReport]:
    """A TrainingFrame by the definitions, from the running services: labels
    from the stored interactions of the label types, features point in time
    from the interactions service, profiles as they were from identity."""
    if defs.snapshot(prediction):
        return await _build_snapshot(identity_address, defs, prediction, until, source, minimum)
    history = await history_from_services(interactions_address, defs, prediction, progress)
    report = _report(defs, prediction, history)
    rows = _label_rows(history, until, report)
    del history  # the labels are all it was for
    check_enough(report, defs, minimum)
    queries, index = _queries(prediction, rows)
    columns, version = await point_in_time_columns(
        interactions_address, queries, prediction, progress
    )
    del queries
    if index is not None:
        columns = _expand(columns, index)
    profiles, keys = await _profiles_for(identity_address, rows)
    order = stable_order(rows, keys)
    rows = [rows[i] for i in order]
    profiles = [profiles[i] for i in order]
    columns = _expand(columns, order)
    frame = assemble_columns(
        prediction, rows, columns, profiles, version, source, _excluded(defs, prediction)
    )
    return frame, report


async def list_profiles(identity_address: str) -> list[tuple[str, Profile]]:
    """Every customer's id and current profile (ListCustomers, paged), in the
    order of each customer's smallest identifier: ids are new on every import
    but identifiers come from the source, so the order (and a split drawn from
    it) is the same on every run."""
    import grpc

    from converge.runtime.channels import aio_channel
    from converge.v1 import common_pb2, identity_pb2, identity_pb2_grpc

    found: list[tuple[str, str, Profile]] = []
    async with aio_channel(identity_address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        token = ""
        while True:
            try:
                answer = await stub.ListCustomers(
                    identity_pb2.ListCustomersRequest(
                        page=common_pb2.PageRequest(page_size=1000, page_token=token)
                    )
                )
            except grpc.aio.AioRpcError as e:
                raise _unavailable("identity", identity_address, e) from e
            for customer in answer.customers:
                found.append(
                    (source_key(customer), customer.customer_id, profile_from_pb(customer))
                )
            token = answer.page.next_page_token
            if not token:
                return [(customer_id, profile) for _, customer_id, profile in sorted(found)]


def snapshot_rows(
    profiles: Sequence[tuple[str, Profile]], defs: Definitions, at: datetime
) -> tuple[list[LabelRow], list[Profile]]:
    """One row per customer whose profile has the label attribute."""
    test = defs.churn.label.profile_attribute
    assert test is not None
    rows, kept = [], []
    for customer, profile in profiles:
        attributes = profile.get("attributes") or {}
        if attributes.get(test.name) is None:
            continue
        rows.append(LabelRow(customer, at, int(test.holds(attributes))))
        kept.append(profile)
    return rows, kept


async def _build_snapshot(
    identity_address: str,
    defs: Definitions,
    prediction: Prediction,
    until: datetime | None,
    source: str,
    minimum: int,
) -> tuple[TrainingFrame, BuildReport]:
    # One nominal cutoff: the profiles are read as they are; the date only
    # measures tenure.
    at = until or defs.explicit_end() or now_utc()
    current = await list_profiles(identity_address)
    return _snapshot_frame(current, defs, prediction, at, source, minimum)


def _snapshot_frame(
    current: Sequence[tuple[str, Profile]],
    defs: Definitions,
    prediction: Prediction,
    at: datetime,
    source: str,
    minimum: int,
) -> tuple[TrainingFrame, BuildReport]:
    """The frame of a profile snapshot at `at`, from (customer, profile) pairs."""
    rows, kept = snapshot_rows(current, defs, at)
    report = _report(defs, prediction, None)
    report.snapshot, report.cutoffs = True, (at,)
    report.rows, report.positives = len(rows), sum(r.label for r in rows)
    check_enough(report, defs, minimum)
    frame = assemble_columns(
        prediction, rows, {}, kept, "profile-only", source, _excluded(defs, prediction)
    )
    return frame, report


def build_defined_events(
    events_by_customer: Mapping[str, Sequence[Event]],
    profiles: Mapping[str, ProfileHistory | Profile],
    defs: Definitions,
    prediction: Prediction,
    until: datetime | None = None,
    progress: Progress | None = None,
    source: str = "events",
    minimum: int = 20,
) -> tuple[TrainingFrame, BuildReport]:
    """`build_defined` in-process, on interactions in memory (the simulator),
    with the feature engine's `features_at_cutoffs`."""
    if defs.snapshot(prediction):
        at = until or defs.explicit_end() or now_utc()
        current = [(c, profile_at(h, at) or {}) for c, h in sorted(profiles.items())]
        return _snapshot_frame(current, defs, prediction, at, source, minimum)
    history = History(defs, prediction)
    for customer, events in events_by_customer.items():
        for e in events:
            history.add(customer, e.occurred_at, e.type, e.product_id, e.ticket_id, e.attributes)
    report = _report(defs, prediction, history)
    rows = _label_rows(history, until, report)
    check_enough(report, defs, minimum)
    keep = _keep_feature(prediction)
    by_customer: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_customer.setdefault(r.customer, []).append(i)
    n = len(rows)
    columns: dict[str, Column] = {}
    pv: list[Profile | None] = [None] * n
    for k, (customer, positions) in enumerate(by_customer.items()):
        events = events_by_customer[customer]
        values = features_at_cutoffs(
            events,
            [rows[i].cutoff for i in positions],
            [rows[i].ticket_id for i in positions] if prediction == "escalation" else None,
        )
        history_of = profiles.get(customer)
        for i, (cv, tv) in zip(positions, values, strict=True):
            for name, value in {**cv, **(tv or {})}.items():
                if not keep(name):
                    continue
                if isinstance(value, str):
                    columns.setdefault(name, [None] * n)[i] = value  # type: ignore[index]
                else:
                    column = columns.get(name)
                    if column is None:
                        column = columns[name] = np.full(n, np.nan, dtype=np.float64)
                    column[i] = value
            pv[i] = profile_at(history_of, rows[i].cutoff)
        if progress is not None and (k % 1000 == 999 or k == len(by_customer) - 1):
            progress(k + 1, len(by_customer))
    frame = assemble_columns(
        prediction, rows, columns, pv, FEATURE_SET_VERSION, source, _excluded(defs, prediction)
    )
    return frame, report

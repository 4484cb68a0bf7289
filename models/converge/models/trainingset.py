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
    REGISTRY,
    Event,
    features_at_cutoffs,
)
from converge.models.dataset import HORIZONS, TrainingFrame, check_prediction
from converge.models.labels import (
    ESCALATION_OUTCOMES,
    churn_label,
    cross_sell_labels,
    escalation_labels,
)

PRODUCTS_DEFAULT: tuple[str, ...] = ("tv", "phone", "internet", "cloud")
PROFILE_CATEGORIES = ("segment", "plan", "region", "owner_team")
CANDIDATE = "candidate_product"
# A profile: {"segment", "plan", "region", "owner_team": str, "signup_date":
# datetime | None, "attributes": {name: str | float | bool}}; a history is
# [(effective from, profile), ...] oldest first.
Profile = Mapping[str, Any]
ProfileHistory = Sequence[tuple[datetime, Profile]]
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class LabelRow:
    customer: str
    cutoff: datetime
    label: int
    ticket_id: str = ""
    product: str = ""

    @property
    def entity_id(self) -> str:
        if self.ticket_id:
            return self.ticket_id
        if self.product:
            return f"{self.customer}:{self.product}"
        return self.customer


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
    products: Sequence[str] = PRODUCTS_DEFAULT,
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


def _profile_values(profile: Profile | None, cutoff: datetime) -> dict[str, Any]:
    if profile is None:
        return {}
    out: dict[str, Any] = {}
    for key in PROFILE_CATEGORIES:
        value = profile.get(key)
        if value:
            out[f"profile_{key}"] = str(value)
    signup = profile.get("signup_date")
    if isinstance(signup, datetime):
        out["profile_tenure_days"] = (cutoff - signup) / timedelta(days=1)
    for name, value in (profile.get("attributes") or {}).items():
        if isinstance(value, (bool, int | float)):
            out[f"profile_attr_{name}"] = float(value)
        elif isinstance(value, str) and value:
            out[f"profile_attr_{name}"] = value
    return out


def assemble(
    prediction: str,
    rows: Sequence[LabelRow],
    customer_values: Sequence[Mapping[str, float]],
    ticket_values: Sequence[Mapping[str, float] | None],
    profiles: Sequence[Profile | None],
    feature_set_version: str = FEATURE_SET_VERSION,
    source: str = "",
    customer_features: Sequence[str] | None = None,
) -> TrainingFrame:
    """The TrainingFrame of labelled rows and their point-in-time values
    (one entry per row in each sequence)."""
    names_c, names_t = feature_names_for(prediction)
    if customer_features is not None:
        names_c = tuple(customer_features)
    n = len(rows)
    columns: dict[str, Any] = {}
    for name in names_t:
        columns[name] = np.array(
            [(tv or {}).get(name, math.nan) for tv in ticket_values], dtype=np.float64
        )
    for name in names_c:
        columns[name] = np.array(
            [cv.get(name, math.nan) for cv in customer_values], dtype=np.float64
        )
    for name, values in list(columns.items()):
        definition = _CATEGORY_DEFS.get(name)
        if definition is not None:
            levels = [*definition.categories, "other"]
            codes = np.where(np.isnan(values), -1, values).astype(np.int64)
            columns[name] = pd.Categorical.from_codes(codes, categories=levels)
    prof = [_profile_values(p, r.cutoff) for p, r in zip(profiles, rows, strict=True)]
    keys = sorted({k for p in prof for k in p})
    for key in keys:
        values = [p.get(key) for p in prof]
        if any(isinstance(v, str) for v in values):
            levels = sorted({v for v in values if isinstance(v, str)})
            columns[key] = pd.Categorical(
                [v if isinstance(v, str) else None for v in values], categories=levels
            )
        else:
            columns[key] = np.array(
                [math.nan if v is None else float(v) for v in values], dtype=np.float64
            )
    features = list(columns)
    if prediction == "cross_sell":
        products = sorted({r.product for r in rows}) or list(PRODUCTS_DEFAULT)
        columns[CANDIDATE] = pd.Categorical([r.product for r in rows], categories=products)
        features.append(CANDIDATE)
    columns["entity_id"] = [r.entity_id for r in rows]
    columns["cutoff"] = pd.to_datetime([r.cutoff for r in rows], utc=True)
    columns["label"] = np.array([r.label for r in rows], dtype=np.int64)
    columns["customer"] = [r.customer for r in rows]
    columns["ticket_id"] = [r.ticket_id for r in rows]
    columns["product"] = [r.product for r in rows]
    frame = pd.DataFrame(columns, index=pd.RangeIndex(n))
    return TrainingFrame.from_frame(
        frame, prediction, feature_set_version, feature_names=features, source=source
    )


# --- in-process ---------------------------------------------------------------------


def build_from_events(
    events_by_customer: Mapping[str, Sequence[Event]],
    profiles: Mapping[str, ProfileHistory | Profile],
    cutoffs: Sequence[datetime] | Mapping[str, Sequence[datetime]],
    prediction: str,
    products: Sequence[str] = PRODUCTS_DEFAULT,
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
    (default: every ticket open at the cutoff)."""
    check_prediction(prediction)
    rows: list[LabelRow] = []
    cv: list[Mapping[str, float]] = []
    tv: list[Mapping[str, float] | None] = []
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

    from converge.v1 import interactions_pb2, interactions_pb2_grpc

    out: dict[str, list[Event]] = {}
    async with grpc.aio.insecure_channel(interactions_address) as channel:
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


async def profiles_as_of(
    identity_address: str, customer_ids: Sequence[str], as_of: datetime | None
) -> dict[str, Profile]:
    """Profiles as they were at `as_of` (None: now), BatchGetCustomers by 1000."""
    import grpc

    from converge.runtime.values import timestamp
    from converge.v1 import identity_pb2, identity_pb2_grpc

    out: dict[str, Profile] = {}
    async with grpc.aio.insecure_channel(identity_address) as channel:
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
    return out


async def point_in_time_features(
    interactions_address: str,
    queries: Sequence[tuple[str, datetime, str]],
    progress: Progress | None = None,
) -> tuple[list[dict[str, float]], list[dict[str, float] | None], str]:
    """(customer values, ticket values, feature-set version) for (customer
    id, as_of, ticket id) queries, through GetPointInTimeFeatures."""
    import grpc

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
    async with grpc.aio.insecure_channel(interactions_address, options=_CHANNEL_OPTIONS) as channel:
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
    products: Sequence[str] = PRODUCTS_DEFAULT,
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

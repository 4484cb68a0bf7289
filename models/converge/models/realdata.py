"""The default pipeline on real public data, imported through the connectors.

No per-dataset tuning: each check imports its file with the shipped mapping
into the running services, builds a TrainingFrame with the same builders
(`converge.models.trainingset`), trains with the default `TrainingConfig`
(or the one passed, the same for all three), and reports the test ROC AUC
with the full `Evaluation`.

- **Telco churn** (`telco_customers` mapping: profiles only, no times): the
  frame is built from the identity profiles (ListCustomers), every profile
  field and custom attribute a feature, the custom attribute `churned` the
  label (and not a feature); one row per customer, `stratified_split`
  (the only split without timestamps). Published gradient boosting: about
  0.84-0.85.
- **CDNOW churn from behaviour** (`cdnow_purchases`): monthly cutoffs on the
  1st of each month from April 1997 to April 1998; rows: customers with a
  purchase before the cutoff; label 1 when the customer makes **no purchase
  in the 90 days** from the cutoff (the log ends 30 June 1998, so the last
  cutoff's window is complete). Features point in time from the interactions
  service (the churn features of the registry); `time_split` with a 90-day
  gap (the label window).
- **ITSM escalation** (`itsm_incidents`): the mapping stores each update as
  a ticket interaction (`ticket.opened`, `ticket.updated`,
  `ticket.reassigned`, `ticket.priority_changed`, `ticket.resolved`,
  `ticket.reopened`); `made_sla` is *not* imported, so there are no
  `ticket.sla_breached` and no `ticket.escalated` in this data. What is
  predicted: whether the incident is **reassigned** (`ticket.reassigned`)
  within 72 hours after the cutoff, the cutoff being **one minute after the
  incident's second logged event** (what is known at its first events: at
  its very first event only the priority is known, and the default
  pipeline then finds no signal, AUC about 0.5), for incidents still open
  then; features point in
  time (ticket and customer features of the escalation prediction).
  `time_split` without a gap: the sample spans ten days, and two 72-hour gaps
  would leave almost nothing to train on; the features stay point in time,
  only some training labels become known after the test period begins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from converge.models.dataset import Split, stratified_split, time_split
from converge.models.evaluation import Evaluation, evaluate
from converge.models.training import TrainedModel, TrainingConfig, train
from converge.models.trainingset import (
    LabelRow,
    frame_from_services,
    profile_from_pb,
    stream_events,
)

DATA_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "data"
TELCO = "telco_churn/Telco-Customer-Churn.csv"
CDNOW = "cdnow/CDNOW_master.txt"
ITSM = "itsm_incidents_sample/incident_events_first3000.csv"
CDNOW_WINDOW = timedelta(days=90)
CDNOW_CUTOFFS = tuple(
    datetime(1997 + (m - 1) // 12, (m - 1) % 12 + 1, 1, tzinfo=UTC) for m in range(4, 17)
)
ITSM_FIRST_EVENTS = 2
ITSM_DELAY = timedelta(minutes=1)
ITSM_HORIZON = timedelta(hours=72)
TELCO_SNAPSHOT = datetime(2018, 1, 1, tzinfo=UTC)  # a nominal cutoff: the table has no times


@dataclass(frozen=True)
class RealResult:
    name: str
    auc: float
    evaluation: Evaluation
    split: Split
    model: TrainedModel
    imported: int


async def _import(
    path: Path, mapping: str, identity_address: str, interactions_address: str, limit: int | None
) -> int:
    from converge.connectors.importer import import_file
    from converge.connectors.mapping import load_mapping

    summary = await import_file(
        path,
        load_mapping(mapping),
        identity_address=identity_address,
        interactions_address=interactions_address,
        limit=limit,
    )
    return int(getattr(summary, "stored", 0) or getattr(summary, "received", 0) or 0)


def _fit(name: str, split: Split, config: TrainingConfig | None, imported: int) -> RealResult:
    model = train(split.train, split.valid, config)
    result = evaluate(model, split.test)
    return RealResult(name, result.roc_auc, result, split, model, imported)


async def list_profiles(identity_address: str) -> list[tuple[str, dict[str, object]]]:
    """Every customer's id and current profile (ListCustomers, paged), in the
    order of each customer's smallest identifier: ids are new on every import
    but identifiers come from the source, so the order (and a split drawn from
    it) is the same on every run."""
    import grpc

    from converge.v1 import common_pb2, identity_pb2, identity_pb2_grpc

    found: list[tuple[str, str, dict[str, object]]] = []
    async with grpc.aio.insecure_channel(identity_address) as channel:
        stub = identity_pb2_grpc.IdentityServiceStub(channel)
        token = ""
        while True:
            answer = await stub.ListCustomers(
                identity_pb2.ListCustomersRequest(
                    page=common_pb2.PageRequest(page_size=1000, page_token=token)
                )
            )
            for customer in answer.customers:
                key = min(
                    (f"{i.identifier.type}:{i.identifier.value}" for i in customer.identifiers),
                    default=customer.customer_id,
                )
                found.append((key, customer.customer_id, dict(profile_from_pb(customer))))
            token = answer.page.next_page_token
            if not token:
                return [(customer_id, profile) for _, customer_id, profile in sorted(found)]


async def telco_churn(
    identity_address: str,
    interactions_address: str,
    data_dir: Path = DATA_DIR,
    config: TrainingConfig | None = None,
) -> RealResult:
    """IBM Telco: profiles -> churned, stratified split."""
    from converge.models.trainingset import assemble

    imported = await _import(
        data_dir / TELCO, "telco_customers", identity_address, interactions_address, None
    )
    profiles = await list_profiles(identity_address)
    rows: list[LabelRow] = []
    features: list[dict[str, object]] = []
    for customer, profile in profiles:
        attributes = dict(profile.get("attributes") or {})  # type: ignore[call-overload]
        churned = attributes.pop("churned", None)
        if churned is None:
            continue
        rows.append(LabelRow(customer, TELCO_SNAPSHOT, int(bool(churned))))
        features.append({**profile, "attributes": attributes})
    frame = assemble(
        "churn",
        rows,
        [{}] * len(rows),
        [None] * len(rows),
        features,
        feature_set_version="profile-only",
        source=f"telco:{TELCO}",
        customer_features=(),
    )
    return _fit("telco", stratified_split(frame, seed=0), config, imported)


async def cdnow_churn(
    identity_address: str,
    interactions_address: str,
    data_dir: Path = DATA_DIR,
    config: TrainingConfig | None = None,
    limit: int | None = None,
    cutoffs: Sequence[datetime] = CDNOW_CUTOFFS,
) -> RealResult:
    """CDNOW: no purchase in the 90 days after a cutoff, time split.
    `limit` imports only the first rows of the file (it is ordered by
    customer, so this keeps whole histories of fewer customers)."""
    imported = await _import(
        data_dir / CDNOW, "cdnow_purchases", identity_address, interactions_address, limit
    )
    events = await stream_events(interactions_address, types=("purchase",))
    rows: list[LabelRow] = []
    for customer, mine in sorted(events.items()):
        times = sorted(e.occurred_at for e in mine)
        for cutoff in cutoffs:
            if times[0] >= cutoff:
                continue
            again = any(cutoff <= t < cutoff + CDNOW_WINDOW for t in times)
            rows.append(LabelRow(customer, cutoff, 0 if again else 1))
    frame = await frame_from_services(
        identity_address, interactions_address, "churn", rows, "cdnow", profile_as_of=False
    )
    return _fit("cdnow", time_split(frame, gap=CDNOW_WINDOW), config, imported)


async def itsm_escalation(
    identity_address: str,
    interactions_address: str,
    data_dir: Path = DATA_DIR,
    config: TrainingConfig | None = None,
) -> RealResult:
    """ITSM: reassigned within 72 h of (second event + 1 min), time split."""
    imported = await _import(
        data_dir / ITSM, "itsm_incidents", identity_address, interactions_address, None
    )
    events = await stream_events(interactions_address, types=("ticket.*",))
    rows: list[LabelRow] = []
    for customer, mine in sorted(events.items()):
        times: dict[str, list[datetime]] = {}
        for e in mine:
            if e.ticket_id:
                times.setdefault(e.ticket_id, []).append(e.occurred_at)
        for ticket, seen in sorted(times.items()):
            seen.sort()
            if len(seen) < ITSM_FIRST_EVENTS:
                continue
            cutoff = seen[ITSM_FIRST_EVENTS - 1] + ITSM_DELAY
            status = [
                e
                for e in mine
                if e.ticket_id == ticket
                and e.occurred_at < cutoff
                and e.type in ("ticket.opened", "ticket.reopened", "ticket.resolved")
            ]
            latest = max(
                status, key=lambda e: (e.occurred_at, e.type == "ticket.resolved"), default=None
            )
            if latest is None or latest.type == "ticket.resolved":
                continue
            later = any(
                e.ticket_id == ticket
                and e.type == "ticket.reassigned"
                and cutoff <= e.occurred_at < cutoff + ITSM_HORIZON
                for e in mine
            )
            rows.append(LabelRow(customer, cutoff, int(later), ticket_id=ticket))
    rows.sort(key=lambda r: (r.cutoff, r.ticket_id))  # ticket ids are the source's: stable
    frame = await frame_from_services(
        identity_address, interactions_address, "escalation", rows, "itsm", profile_as_of=False
    )
    return _fit("itsm", time_split(frame, gap=timedelta(0)), config, imported)

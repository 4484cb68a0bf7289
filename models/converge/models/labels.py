"""Labels, taken only from what happens at or after each cutoff.

Windows are half-open, [cutoff, cutoff + horizon): features count only
interactions strictly before the cutoff (the feature engine's rule), so an
interaction at the cutoff itself belongs to the future, exactly once.

- **churn** (horizon 30 days), for customers *active* at the cutoff (holding
  at least one product: the latest purchase or subscription event of some
  product is not a cancellation): 1 when, within the window, a
  `subscription.cancelled` leaves the customer holding no product (the last
  held product, or all of them at once), else 0. Customers holding nothing
  at the cutoff get no row.
- **escalation** (72 hours), for each ticket *open* at the cutoff (its
  latest of `ticket.opened` / `ticket.reopened` / `ticket.resolved` before
  the cutoff is not a resolution): 1 when the ticket gets a
  `ticket.escalated` or `ticket.sla_breached` within the window.
  `escalation_labels(..., outcome_types=("ticket.reassigned",))` changes
  what counts (the ITSM sample, which has no escalations or breaches).
- **cross-sell** (14 days), for each active customer and each product of the
  catalogue it does not hold at the cutoff: 1 when a `purchase` or
  `subscription.started` of that product occurs within the window.

Holdings follow the feature engine's `products_held` definition (the HOLDING
and CANCELLING types of `converge.features.engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Protocol

from converge.features.engine import CANCELLING, HOLDING
from converge.models.predictions import HORIZONS


class Event(Protocol):
    """What the labels read of an interaction: the feature engine's Event and
    the training builder's compact `history.Seen` both have it."""

    @property
    def occurred_at(self) -> datetime: ...
    @property
    def type(self) -> str: ...
    @property
    def product_id(self) -> str: ...
    @property
    def ticket_id(self) -> str: ...
    @property
    def attributes(self) -> Any: ...


ESCALATION_OUTCOMES = ("ticket.escalated", "ticket.sla_breached")
CROSS_SELL_EVENTS = ("purchase", "subscription.started")
_TICKET_STATUS = {"ticket.opened": 0, "ticket.reopened": 1, "ticket.resolved": 2}


def holdings(
    events: Sequence[Event], before: datetime, holding: Sequence[str] = HOLDING
) -> set[str]:
    """Products held just before `before` (the latest holding or cancelling
    event of each product decides; on equal times a cancellation wins).
    `holding`: the types that make a customer hold their product."""
    latest: dict[str, tuple[datetime, int]] = {}
    for e in events:
        if e.occurred_at >= before or not e.product_id:
            continue
        if e.type in holding or e.type in CANCELLING:
            key = (e.occurred_at, 1 if e.type in CANCELLING else 0)
            if e.product_id not in latest or key >= latest[e.product_id]:
                latest[e.product_id] = key
    return {p for p, (_, cancelled) in latest.items() if not cancelled}


def churn_label(
    events: Sequence[Event],
    cutoff: datetime,
    horizon: timedelta = HORIZONS["churn"],
    holding: Sequence[str] = HOLDING,
) -> int | None:
    """1/0 for a customer active at `cutoff`; None when it holds nothing."""
    held = holdings(events, cutoff, holding)
    if not held:
        return None
    end = cutoff + horizon
    window = sorted(
        (e for e in events if cutoff <= e.occurred_at < end and e.product_id),
        key=lambda e: (e.occurred_at, e.type in CANCELLING),
    )
    for e in window:
        if e.type in CANCELLING:
            held.discard(e.product_id)
            if not held:
                return 1
        elif e.type in holding:
            held.add(e.product_id)
    return 0


def open_tickets(events: Sequence[Event], cutoff: datetime) -> list[str]:
    """Tickets open just before `cutoff`, in order of first appearance."""
    status: dict[str, tuple[datetime, int]] = {}
    order: list[str] = []
    for e in events:
        if e.occurred_at >= cutoff or not e.ticket_id:
            continue
        if e.ticket_id not in status and e.ticket_id not in order:
            order.append(e.ticket_id)
        code = _TICKET_STATUS.get(e.type)
        if code is None:
            continue
        key = (e.occurred_at, code)
        if e.ticket_id not in status or key >= status[e.ticket_id]:
            status[e.ticket_id] = key
    return [t for t in order if t in status and status[t][1] != 2]


def escalation_labels(
    events: Sequence[Event],
    cutoff: datetime,
    horizon: timedelta = HORIZONS["escalation"],
    outcome_types: Sequence[str] = ESCALATION_OUTCOMES,
    tickets: Sequence[str] | None = None,
) -> list[tuple[str, int]]:
    """(ticket id, 1/0) for each ticket open at `cutoff` (or each of
    `tickets`, when given)."""
    chosen = list(tickets) if tickets is not None else open_tickets(events, cutoff)
    end = cutoff + horizon
    hit = {
        e.ticket_id
        for e in events
        if e.ticket_id and e.type in outcome_types and cutoff <= e.occurred_at < end
    }
    return [(t, int(t in hit)) for t in chosen]


def cross_sell_labels(
    events: Sequence[Event],
    cutoff: datetime,
    products: Sequence[str],
    horizon: timedelta = HORIZONS["cross_sell"],
) -> list[tuple[str, int]]:
    """(product, 1/0) for each product of `products` not held at `cutoff`,
    for an active customer; empty when the customer holds nothing."""
    held = holdings(events, cutoff)
    if not held:
        return []
    end = cutoff + horizon
    bought = {
        e.product_id
        for e in events
        if e.type in CROSS_SELL_EVENTS and e.product_id and cutoff <= e.occurred_at < end
    }
    return [(p, int(p in bought)) for p in products if p not in held]

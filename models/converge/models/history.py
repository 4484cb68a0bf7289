"""Labelled rows from a definitions file, over a compact history.

Building a training set holds only what the labels need: the interactions of
the types the definitions name (`label_types`), each as a small tuple
(`Seen`: time, type, product, ticket and only the attributes a definition
tests), by customer. Features never come from here: they are asked for
point in time (`GetPointInTimeFeatures`) once the rows are known.

`History.rows(prediction)` applies the definitions (`converge.models.
definitions`) and `converge.models.labels`:

- cutoffs: a grid every `cutoffs.every_days` (escalation: `every_hours`)
  over `cutoffs.weeks` weeks, the last one a horizon before the end of the
  history; the end is `--until`, else the definitions' `cutoffs.end`, else
  the latest interaction seen (so the last label window is complete: history
  that ended years ago trains like today's); escalation with `after_events`
  takes one cutoff per ticket (its N-th event plus the delay) within the
  same range;
- churn: the population and the label kind of `churn`;
- escalation: the tickets open at each cutoff under the closing policy
  (`TicketCount` says how many were counted and how many each rule left
  out), labelled by the outcome;
- cross-sell: the catalogue (`products: from_data`, every product id of a
  holding event before the last cutoff, or the list), candidates holding
  something or, with `prospects`, anyone with an interaction before the
  cutoff.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from converge.features.engine import CANCELLING, HOLDING
from converge.models.definitions import Definitions, type_matches
from converge.models.labels import holdings, open_tickets
from converge.models.predictions import Prediction

TICKET_TYPES = ("ticket.*",)


class Seen(NamedTuple):
    """One interaction as the labels need it (the feature engine's Event has
    these names too, so the label functions take either)."""

    occurred_at: datetime
    type: str
    product_id: str
    ticket_id: str
    # Only the attributes a definition tests; None when it tests none.
    attributes: Mapping[str, Any] | None


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


@dataclass
class TicketCount:
    """Escalation's closing policy at work: (ticket, cutoff) pairs open by
    their status, and how many each rule left out."""

    counted: int = 0
    left_out_inactive: int = 0
    left_out_customer_left: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "tickets_counted": self.counted,
            "tickets_left_out_inactive": self.left_out_inactive,
            "tickets_left_out_customer_left": self.left_out_customer_left,
        }


def holding_types(defs: Definitions) -> tuple[str, ...]:
    return tuple(dict.fromkeys((*HOLDING, *defs.cross_sell.purchase_types)))


def label_types(defs: Definitions, prediction: Prediction) -> tuple[str, ...]:
    """The interaction types a prediction's labels read; () means every type."""
    products = (*holding_types(defs), *CANCELLING)
    if prediction == "churn":
        label = defs.churn.label
        named = label.any_of_types or label.none_of_types or ()
        if defs.churn.population == "profiles":
            return ()
        return tuple(dict.fromkeys((*named, *products)))
    if prediction == "escalation":
        outcome = defs.escalation.outcome
        more: tuple[str, ...] = ()
        if defs.escalation.open_tickets.close_when_customer_left:
            more = (*products, *(defs.churn.label.any_of_types or ()))
        return tuple(
            dict.fromkeys((*TICKET_TYPES, *outcome.types, *(t.type for t in outcome.events), *more))
        )
    if defs.cross_sell.prospects:
        return ()
    return tuple(dict.fromkeys(products))


def label_attributes(defs: Definitions, prediction: Prediction) -> frozenset[str]:
    """The attribute names a prediction's labels test (the only ones kept)."""
    names: set[str] = set()
    if prediction == "churn":
        names |= {t.name for t in defs.churn.label.where}
    elif prediction == "escalation":
        outcome = defs.escalation.outcome
        names |= {t.name for e in outcome.events for t in e.where}
        if outcome.attribute is not None:
            names.add(outcome.attribute.name)
        names |= {t.name for t in defs.churn.label.where}
    return frozenset(names)


def _floor(t: datetime, step: timedelta) -> datetime:
    day = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if step >= timedelta(days=1):
        return day
    return t.replace(minute=0, second=0, microsecond=0)


@dataclass
class History:
    """The label-type interactions of every customer, compactly, and the
    latest time seen."""

    defs: Definitions
    prediction: Prediction
    by_customer: dict[str, list[Seen]] = field(default_factory=dict)
    latest: datetime | None = None
    count: int = 0
    _types: tuple[str, ...] = ()
    _attributes: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self._types = label_types(self.defs, self.prediction)
        self._attributes = label_attributes(self.defs, self.prediction)

    @property
    def types(self) -> tuple[str, ...]:
        return self._types

    def add(
        self,
        customer: str,
        occurred_at: datetime,
        type_: str,
        product_id: str,
        ticket_id: str,
        attributes: Mapping[str, Any] | None,
    ) -> None:
        if self._types and not type_matches(type_, self._types):
            return
        kept = (
            {k: v for k, v in attributes.items() if k in self._attributes}
            if attributes and self._attributes
            else None
        )
        seen = Seen(
            occurred_at,
            sys.intern(type_),
            sys.intern(product_id) if product_id else "",
            ticket_id,
            kept or None,
        )
        self.by_customer.setdefault(sys.intern(customer), []).append(seen)
        self.count += 1
        if self.latest is None or occurred_at > self.latest:
            self.latest = occurred_at

    # --- the time range -------------------------------------------------------------

    def step(self) -> timedelta:
        if self.prediction == "escalation":
            hours = self.defs.escalation.cutoffs.every_hours
            return timedelta(hours=hours) if hours is not None else timedelta(days=1)
        return timedelta(days=self.defs.cutoffs.every_days)

    def end(self, until: datetime | None) -> datetime | None:
        """The end of the history: --until, the definitions' end, else the
        latest interaction seen (None: there is none)."""
        return until or self.defs.explicit_end() or self.latest

    def range(self, until: datetime | None) -> tuple[datetime, datetime] | None:
        """(first, last) cutoff: the last a horizon before the end."""
        end = self.end(until)
        if end is None:
            return None
        last = _floor(end - self.defs.horizon(self.prediction), self.step())
        return last - timedelta(weeks=self.defs.cutoffs.weeks), last

    def cutoffs(self, until: datetime | None) -> list[datetime]:
        span = self.range(until)
        if span is None:
            return []
        first, last = span
        step, out, t = self.step(), [], last
        while t >= first:
            out.append(t)
            t -= step
        return out[::-1]

    def products(self, last_cutoff: datetime) -> tuple[str, ...]:
        chosen = self.defs.cross_sell.products
        if chosen != "from_data":
            return tuple(chosen)
        kinds = holding_types(self.defs)
        return tuple(
            sorted(
                {
                    e.product_id
                    for events in self.by_customer.values()
                    for e in events
                    if e.product_id and e.type in kinds and e.occurred_at < last_cutoff
                }
            )
        )

    # --- the rows -------------------------------------------------------------------

    def rows(
        self, until: datetime | None = None, tickets: TicketCount | None = None
    ) -> Iterator[LabelRow]:
        """Every labelled row, customer by customer (in id order)."""
        cutoffs = self.cutoffs(until)
        if not cutoffs:
            return
        products = self.products(cutoffs[-1]) if self.prediction == "cross_sell" else ()
        count = tickets if tickets is not None else TicketCount()
        end = self.end(until)
        assert end is not None  # there are cutoffs
        # Per-ticket cutoffs: from the first grid cutoff to the last moment
        # whose label window is complete.
        span = (cutoffs[0], end - self.defs.horizon(self.prediction))
        for customer in sorted(self.by_customer):
            events = sorted(self.by_customer[customer], key=lambda e: e.occurred_at)
            if self.prediction == "churn":
                yield from self._churn(customer, events, cutoffs)
            elif self.prediction == "escalation":
                yield from self._escalation(customer, events, cutoffs, span, count)
            else:
                yield from self._cross_sell(customer, events, cutoffs, products)

    def _churn(
        self, customer: str, events: Sequence[Seen], cutoffs: list[datetime]
    ) -> Iterator[LabelRow]:
        from converge.models.labels import churn_label

        churn = self.defs.churn
        label = churn.label
        kinds = holding_types(self.defs)
        for cutoff in cutoffs:
            if churn.population == "active":
                if not holdings(events, cutoff, kinds):
                    continue
            elif not events or events[0].occurred_at >= cutoff:
                continue
            end = cutoff + churn.horizon
            window = [e for e in events if cutoff <= e.occurred_at < end]
            if label.kind == "cancels_all_products":
                value = churn_label(events, cutoff, churn.horizon, kinds)
                if value is None:
                    value = 0  # nothing held (with_history): nothing to cancel
            elif label.kind == "any_of_types":
                named = label.any_of_types or ()
                value = int(
                    any(
                        type_matches(e.type, named)
                        and all(t.holds(e.attributes) for t in label.where)
                        for e in window
                    )
                )
            else:
                named = label.none_of_types or ()
                value = int(not any(type_matches(e.type, named) for e in window))
            yield LabelRow(customer, cutoff, value)

    def _left(self, events: Sequence[Seen], cutoff: datetime) -> bool:
        """Whether the customer has left by `cutoff`: it held products and
        holds none, or (an any_of_types churn label) had such an event."""
        before = [e for e in events if e.occurred_at < cutoff]
        kinds = holding_types(self.defs)
        if any(e.type in kinds and e.product_id for e in before) and not holdings(
            before, cutoff, kinds
        ):
            return True
        label = self.defs.churn.label
        if label.any_of_types:
            return any(
                type_matches(e.type, label.any_of_types)
                and all(t.holds(e.attributes) for t in label.where)
                for e in before
            )
        return False

    def _escalation(
        self,
        customer: str,
        events: Sequence[Seen],
        cutoffs: list[datetime],
        span: tuple[datetime, datetime],
        count: TicketCount,
    ) -> Iterator[LabelRow]:
        esc = self.defs.escalation
        policy = esc.open_tickets
        by_ticket: dict[str, list[Seen]] = {}
        for e in events:
            if e.ticket_id:
                by_ticket.setdefault(e.ticket_id, []).append(e)
        if not by_ticket:
            return
        if esc.cutoffs.after_events is not None:
            n, delay = esc.cutoffs.after_events, timedelta(minutes=esc.cutoffs.delay_minutes)
            pairs = []
            for ticket, mine in by_ticket.items():
                if len(mine) >= n:
                    cutoff = mine[n - 1].occurred_at + delay
                    if span[0] <= cutoff <= span[1]:
                        pairs.append((cutoff, ticket))
            pairs.sort()
        else:
            pairs = [(c, t) for c in cutoffs for t in open_tickets(events, c)]
        inactive = timedelta(days=policy.inactive_days) if policy.inactive_days else None
        outcome = esc.outcome
        for cutoff, ticket in pairs:
            mine = by_ticket[ticket]
            if ticket not in open_tickets(mine, cutoff):
                continue
            if policy.close_when_customer_left and self._left(events, cutoff):
                count.left_out_customer_left += 1
                continue
            last = max((e.occurred_at for e in mine if e.occurred_at < cutoff), default=None)
            if inactive is not None and (last is None or last < cutoff - inactive):
                count.left_out_inactive += 1
                continue
            count.counted += 1
            end = cutoff + esc.horizon
            hit = any(
                cutoff <= e.occurred_at < end
                and (
                    type_matches(e.type, outcome.types)
                    or any(t.matches(e.type, e.attributes) for t in outcome.events)
                )
                for e in mine
            )
            if not hit and outcome.attribute is not None:
                hit = any(outcome.attribute.holds(e.attributes) for e in mine)
            yield LabelRow(customer, cutoff, int(hit), ticket_id=ticket)

    def _cross_sell(
        self,
        customer: str,
        events: Sequence[Seen],
        cutoffs: list[datetime],
        products: Sequence[str],
    ) -> Iterator[LabelRow]:
        cs = self.defs.cross_sell
        kinds = holding_types(self.defs)
        for cutoff in cutoffs:
            held = holdings(events, cutoff, kinds)
            if not held and not (cs.prospects and events and events[0].occurred_at < cutoff):
                continue
            end = cutoff + cs.horizon
            bought = {
                e.product_id
                for e in events
                if e.product_id
                and cutoff <= e.occurred_at < end
                and type_matches(e.type, cs.purchase_types)
            }
            for product in products:
                if product not in held:
                    yield LabelRow(customer, cutoff, int(product in bought), product=product)


class TooLittleData(ValueError):
    """A prediction found too few examples to train on; the message says
    which label, how many of each class in which window, and what to change."""


def describe_label(defs: Definitions, prediction: Prediction) -> str:
    """The label in words, for messages and the run's record."""
    if prediction == "churn":
        c = defs.churn
        label = c.label
        if label.kind == "profile_attribute" and label.profile_attribute is not None:
            test = label.profile_attribute
            wanted = test.equals if test.in_ is None else list(test.in_)
            return f"churn (profile attribute {test.name} = {wanted}, {c.population} snapshot)"
        what = {
            "cancels_all_products": "cancels all its products",
            "any_of_types": f"has any of {', '.join(label.any_of_types or ())}",
            "none_of_types": f"has none of {', '.join(label.none_of_types or ())}",
        }[label.kind]
        return f"churn ({what} within {c.horizon_days:g} days; population {c.population})"
    if prediction == "escalation":
        e = defs.escalation
        parts = list(e.outcome.types) + [t.type + "[...]" for t in e.outcome.events]
        if e.outcome.attribute is not None:
            parts.append(f"{e.outcome.attribute.name} outcome")
        return f"escalation ({' or '.join(parts)} within {e.horizon_hours:g} hours)"
    x = defs.cross_sell
    return (
        f"cross_sell ({', '.join(x.purchase_types)} of a product within {x.horizon_days:g} days"
        f"{'; prospects included' if x.prospects else ''})"
    )


def horizon_key(prediction: Prediction) -> str:
    return {
        "churn": "churn.horizon_days",
        "escalation": "escalation.horizon_hours",
        "cross_sell": "cross_sell.horizon_days",
    }[prediction]

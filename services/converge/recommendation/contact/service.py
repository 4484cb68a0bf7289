"""The contact rules as the decisions side uses them, inside a decision's
transaction: lock the customer, read the history the rules need, assess the
candidates; then record what was proposed. And the ledger's retention.

Plain types; the connection is the decision's own (its transaction holds the
customer's lock until it commits, so two concurrent Recommend calls for one
customer cannot both pass a cap)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta

from converge.recommendation.contact.rules import (
    Candidate,
    ContactPreferences,
    Verdict,
    assess,
    history_horizon,
)
from converge.recommendation.contact.store import ContactLedger, ContactRecord
from converge.recommendation.policy.model import Policy, PolicySource
from converge.runtime.database import Connection
from converge.runtime.periodic import Periodic

logger = logging.getLogger(__name__)


class ContactGate:
    def __init__(self, ledger: ContactLedger) -> None:
        self.ledger = ledger

    async def assess(
        self,
        conn: Connection,
        customer_id: str,
        candidates: Sequence[Candidate],
        preferences: ContactPreferences | None,
        policy: Policy,
        *,
        time_zone: str | None,
        open_tickets: float | None,
        now: datetime,
    ) -> list[Verdict]:
        """Takes the customer's contact lock (held until `conn`'s transaction
        ends: call `record` in the same transaction), reads the history and
        applies the rules. `preferences` must have been read from identity for
        this decision (None when they could not be: fail closed)."""
        await self.ledger.lock_customer(conn, customer_id)
        since = now - history_horizon(policy.contact, policy.actions)
        history = await self.ledger.history(conn, customer_id, since)
        return assess(
            candidates,
            preferences,
            history,
            policy.contact,
            time_zone=time_zone,
            open_tickets=open_tickets,
            now=now,
        )

    async def record(
        self,
        conn: Connection,
        customer_id: str,
        decision_id: str,
        proposed: Sequence[tuple[str, Verdict]],
        now: datetime,
    ) -> None:
        """Records the proposed actions, (action_id, its allowed verdict) each,
        in the decision's transaction. In-conversation actions are recorded
        too (channel None): their cool-downs and rejections count."""
        contacts = []
        for action_id, verdict in proposed:
            if not verdict.allowed:
                raise ValueError(f"action {action_id} was withheld; only proposals are recorded")
            contacts.append(
                ContactRecord(
                    customer_id=customer_id,
                    decision_id=decision_id,
                    action_id=action_id,
                    action_name=verdict.candidate.action_name,
                    action_kind=verdict.candidate.kind,
                    channel=verdict.channel,
                    proposed_at=now,
                )
            )
        await self.ledger.record(conn, contacts)


def retention_horizon(policy: Policy, floor: timedelta) -> timedelta:
    """How long ledger rows are kept: the longest span the active policy's
    rules look back, and at least `floor` (so that a policy activated later
    with a longer window still finds its history, up to the floor)."""
    return max(floor, history_horizon(policy.contact, policy.actions))


async def purge_expired(
    ledger: ContactLedger, policy: Policy, floor: timedelta, now: datetime
) -> int:
    """Deletes ledger rows no rule of `policy` can count any more; how many."""
    purged = await ledger.purge(now - retention_horizon(policy, floor))
    if purged:
        logger.info("purged %d contact ledger rows", purged)
    return purged


class ContactRetention:
    """Purges the ledger every `interval_s` (the first purge at start), on the
    service's clock, keeping what the active policy can still count and at
    least `floor`."""

    def __init__(
        self,
        ledger: ContactLedger,
        policies: PolicySource,
        floor: timedelta,
        interval_s: float,
        clock: Callable[[], datetime],
    ) -> None:
        self.ledger = ledger
        self.policies = policies
        self.floor = floor
        self.interval_s = interval_s
        self.clock = clock
        self._periodic = Periodic("contact ledger retention purge", interval_s, self.purge_once)

    async def purge_once(self) -> int:
        return await purge_expired(
            self.ledger, self.policies.active().policy, self.floor, self.clock()
        )

    def start(self) -> None:
        self._periodic.start()

    async def close(self) -> None:
        await self._periodic.close()

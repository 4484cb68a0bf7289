"""What the alerts area hands to the webhooks area inside the transaction that
writes an alert event (the transactional outbox): the event as a webhook will
carry it. `webhooks/store.py` turns it into one pending delivery per matching
webhook, in that same transaction, so an event is never announced without
its deliveries nor delivered without being stored."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class OutboxEvent:
    # The event's id: the Standard Webhooks `webhook-id`, the same on every
    # retry and redelivery, so receivers deduplicate on it.
    event_id: str
    team: str
    # AlertKind's name in lower case, for example "escalation_risk".
    kind: str
    alert_id: str
    customer_id: str
    # The AlertEvent as proto3 JSON (UTF-8): the body posted, byte for byte
    # the same on every attempt.
    body: bytes
    occurred_at: datetime

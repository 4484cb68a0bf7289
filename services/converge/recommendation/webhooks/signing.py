"""The Standard Webhooks headers of one delivery attempt.

`webhook-id` is the event's id, the same on every attempt (receivers
deduplicate on it); `webhook-timestamp` is the attempt's time in integer Unix
seconds (receivers refuse one too far from their clock, which stops
replays); `webhook-signature` is a space-separated list of `v1,<base64
HMAC-SHA256 of "<id>.<timestamp>.<body>">`, one per active secret of the
webhook's secret name (several during a key rotation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks import Webhook

CONTENT_TYPE = "application/json"
USER_AGENT = "converge-webhooks/1"


def signature(signers: Sequence[Webhook], event_id: str, at: datetime, body: bytes) -> str:
    """The `webhook-signature` header: one `v1,<base64>` per signer."""
    text = body.decode()
    # (the package reads the time as UTC whatever its zone: give it UTC)
    at = at.astimezone(UTC)
    return " ".join(signer.sign(event_id, at, text) for signer in signers)


def delivery_headers(
    signers: Sequence[Webhook], event_id: str, at: datetime, body: bytes
) -> dict[str, str]:
    """Every header of an attempt made at `at` (an aware datetime)."""
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(math.floor(at.timestamp())),
        "webhook-signature": signature(signers, event_id, at, body),
        "content-type": CONTENT_TYPE,
        "user-agent": USER_AGENT,
    }

"""Webhook rules, in plain types: which URLs may be registered, what an
answer means for a delivery (the Standard Webhooks specification's status
handling) and when it is tried again; and the service behind the webhook
RPCs.

What an attempt's answer means (the specification, "Delivery success and
failure"):
- 2xx: delivered.
- 410 Gone: the receiver wants no more: the webhook is disabled (deleted), and
  this delivery and its other pending ones become dead letters.
- Anything else is a failure retried on the schedule: 3xx (redirects are not
  followed: the webhook's URL should be updated instead), 429 and 5xx, a
  timeout or a connection error, and the other 4xx too. The specification
  says "the rest of the status codes should be treated as a failure" and
  names no status besides 410 that ends delivery; a 400/401/404 is most often
  a receiver deployed wrong or its secret not yet rotated, which an operator
  fixes within the schedule's three days, so dead-lettering at once would
  lose events that a retry delivers. `Retry-After` (seconds or an HTTP date)
  pushes the next attempt later, never earlier, and at most to the
  schedule's longest delay.
- After the last retry: a dead letter (ListDeadLetters, RedeliverDeadLetter).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from urllib.parse import urlsplit

from converge.recommendation.webhooks.secrets import SecretStore
from converge.recommendation.webhooks.store import (
    DeliveryRow,
    NewWebhook,
    WebhookRow,
    WebhookStore,
)
from converge.runtime import deadlines
from converge.runtime.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound

# The specification's example schedule: after the immediate first attempt,
# retries 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h and 24 h after the
# previous one (about 3 days and 4 hours in all, 10 attempts).
SPEC_SCHEDULE_S: tuple[float, ...] = (
    5,
    5 * 60,
    30 * 60,
    2 * 3600,
    5 * 3600,
    10 * 3600,
    14 * 3600,
    20 * 3600,
    24 * 3600,
)


class Verdict(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    DEAD = "dead"
    GONE = "gone"


@dataclass(frozen=True)
class Answer:
    """What one attempt got: the HTTP status (0 when no answer came), the
    failure for people ("" when delivered) and the receiver's Retry-After in
    seconds (None when absent)."""

    http_status: int
    error: str = ""
    retry_after_s: float | None = None

    @property
    def delivered(self) -> bool:
        return 200 <= self.http_status <= 299


@dataclass(frozen=True)
class RetrySchedule:
    """Delays between attempts: `delays_s[n]` after the (n+1)-th failed
    attempt; the budget is the first attempt plus one per delay. `jitter` is
    the fraction each delay is randomly stretched or shrunk by (the
    specification recommends some, so receivers recovering from an outage are
    not hit by every retry at once)."""

    delays_s: tuple[float, ...] = SPEC_SCHEDULE_S
    jitter: float = 0.0

    @property
    def attempts(self) -> int:
        return 1 + len(self.delays_s)

    def delay_after(
        self, attempts: int, retry_after_s: float | None = None, rng: random.Random | None = None
    ) -> float | None:
        """Seconds until the next attempt after `attempts` failed ones; None
        when the budget is spent."""
        if attempts >= self.attempts:
            return None
        delay = self.delays_s[attempts - 1]
        if self.jitter:
            delay *= (rng or random).uniform(1 - self.jitter, 1 + self.jitter)
        if retry_after_s is not None and retry_after_s > delay:
            delay = min(retry_after_s, max(self.delays_s))
        return delay


def judge(
    answer: Answer, attempts: int, schedule: RetrySchedule, rng: random.Random | None = None
) -> tuple[Verdict, float | None]:
    """What to do after an attempt (the `attempts`-th): the verdict and, for
    RETRY, the delay in seconds."""
    if answer.delivered:
        return Verdict.DELIVERED, None
    if answer.http_status == 410:
        return Verdict.GONE, None
    delay = schedule.delay_after(attempts, answer.retry_after_s, rng)
    if delay is None:
        return Verdict.DEAD, None
    return Verdict.RETRY, delay


def url_problem(url: str, allow_http: bool) -> str | None:
    """Why `url` cannot be a webhook's URL, or None."""
    if len(url) > 2048:
        return "longer than 2048 characters"
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        return f"not a URL ({error})"
    del port
    allowed = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in allowed:
        return (
            "must be an http or https URL"
            if allow_http
            else "must be an https URL (plain http is refused: deliveries carry customer data)"
        )
    if not parts.hostname:
        return "has no host"
    if parts.username or parts.password:
        return "must not carry credentials (the signature authenticates deliveries)"
    if parts.fragment:
        return "must not have a fragment"
    return None


def key_bound_elsewhere(bound_sha256: bytes | None, request_sha256: bytes) -> bool:
    """Whether an idempotency key already used is bound to another request.
    A key kept without a fingerprint (before migration 0008) is accepted as
    before."""
    return bound_sha256 is not None and bound_sha256 != request_sha256


def key_reused() -> InvalidArgument:
    return InvalidArgument(
        [FieldViolation("idempotency_key", "already used for a different request")]
    )


# Sends one delivery: (url, event id, body, secret id, timeout_s) -> Answer.
Post = Callable[[str, str, bytes, str, float], Awaitable[Answer]]


@dataclass(frozen=True)
class Redelivered:
    delivered: bool
    http_status: int
    # The dead letter after the attempt; None when delivered.
    dead_letter: DeliveryRow | None


class WebhookService:
    """Registers webhooks and handles dead letters; the dispatcher delivers."""

    def __init__(
        self,
        store: WebhookStore,
        secrets: SecretStore,
        post: Post,
        *,
        clock: Callable[[], datetime],
        allow_http: bool,
        timeout_s: float,
    ) -> None:
        self.store = store
        self.secrets = secrets
        self.post = post
        self.clock = clock
        self.allow_http = allow_http
        self.timeout_s = timeout_s

    async def create_webhook(
        self,
        team: str,
        url: str,
        secret_id: str,
        kinds: Sequence[str],
        idempotency_key: str,
        actor_name: str,
        actor_reason: str,
        request_sha256: bytes = b"",
    ) -> WebhookRow:
        problem = url_problem(url, self.allow_http)
        if problem is not None:
            raise InvalidArgument([FieldViolation("url", problem)])
        if secret_id not in self.secrets:
            raise FailedPrecondition(
                f"the secret store has no webhook secret named {secret_id!r}",
                [("SECRET", f"secret_id/{secret_id}", "no such secret in the secret store")],
            )
        row = await self.store.create_webhook(
            NewWebhook(
                team=team,
                url=url,
                secret_id=secret_id,
                kinds=tuple(sorted(set(kinds))),
                created_at=self.clock(),
                created_by_name=actor_name,
                created_by_reason=actor_reason,
                idempotency_key=idempotency_key,
                request_sha256=request_sha256,
            )
        )
        if idempotency_key and key_bound_elsewhere(row.request_sha256, request_sha256):
            raise key_reused()
        return row

    async def list_webhooks(
        self, team: str, after: tuple[datetime, str] | None, limit: int
    ) -> list[WebhookRow]:
        return await self.store.list_webhooks(team, after, limit)

    async def delete_webhook(
        self, webhook_id: str, idempotency_key: str = "", request_sha256: bytes = b""
    ) -> int:
        """Deletes the webhook; a repeat of the same request under its key
        answers the first deletion's count of dropped deliveries."""
        done = await self.store.delete_webhook(
            webhook_id, self.clock(), idempotency_key, request_sha256
        )
        if idempotency_key and key_bound_elsewhere(done.request_sha256, request_sha256):
            raise key_reused()
        return done.dropped_deliveries

    async def list_dead_letters(
        self, team: str, webhook_id: str | None, before_seq: int | None, limit: int
    ) -> list[DeliveryRow]:
        return await self.store.list_dead_letters(team, webhook_id, before_seq, limit)

    async def redeliver(
        self, dead_letter_id: str, idempotency_key: str, request_sha256: bytes = b""
    ) -> Redelivered:
        """Tries the dead letter once more, now, within the caller's deadline
        (and at most the delivery timeout). A repeat of the same request with
        the same key answers the first attempt's result without posting
        again; another request with that key is refused."""
        timeout_s = deadlines.downstream_timeout(self.timeout_s) or self.timeout_s

        async def attempt(row: DeliveryRow) -> tuple[bool, int, str]:
            answer = await self.post(row.url, row.event_id, row.body, row.secret_id, timeout_s)
            return answer.delivered, answer.http_status, answer.error

        tried = await self.store.redeliver(
            dead_letter_id, attempt, self.clock, idempotency_key, request_sha256
        )
        earlier = tried.earlier
        if earlier is not None:
            if key_bound_elsewhere(earlier.request_sha256, request_sha256):
                raise key_reused()
            row = await self.store.delivery(earlier.delivery_id)
            still_dead = row if row is not None and row.state == "dead" else None
            return Redelivered(earlier.delivered, earlier.http_status, still_dead)
        if tried.dead is None:
            raise NotFound("dead letter", dead_letter_id)
        after = None if tried.delivered else await self.store.delivery(dead_letter_id)
        return Redelivered(tried.delivered, tried.http_status, after)


def due_at(now: datetime, delay_s: float) -> datetime:
    return now + timedelta(seconds=delay_s)

"""Delivers pending webhook deliveries: the HTTP side (`Sender`: one signed
POST, redirects not followed, a total timeout) and the loop (`Dispatcher`)
that claims due deliveries, posts them concurrently and records each result
as `service.judge` rules.

Every replica runs a dispatcher. Claims take rows FOR UPDATE SKIP LOCKED and
lease them (`due_at` moved past the attempt's timeout), so replicas share the
work without posting one delivery twice at once, and a replica that dies
mid-attempt leaves the delivery to be claimed again when its lease ends:
delivery is at least once; receivers deduplicate on `webhook-id`.

The loop wakes on a PostgreSQL notification sent when an alert transaction
that enqueued deliveries commits (every replica listens), when an attempt
finishes (a slot is free), on `wake()` (tests, after moving their clock), and
otherwise every `poll_interval_s` (retries falling due, a lost notification).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import random
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import aiohttp

from converge.recommendation.webhooks.secrets import SecretStore, UnknownSecret
from converge.recommendation.webhooks.service import (
    Answer,
    RetrySchedule,
    Verdict,
    due_at,
    judge,
)
from converge.recommendation.webhooks.signing import delivery_headers
from converge.recommendation.webhooks.store import ClaimedDelivery, WebhookStore
from converge.runtime.tasks import stop_task, stop_tasks, wait_event

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]

MAX_ANSWER_BYTES = 64 * 1024


def utc_now() -> datetime:
    return datetime.now(UTC)


def retry_after_seconds(value: str | None, now: datetime) -> float | None:
    """A `Retry-After` header (delay-seconds or an HTTP date) in seconds from `now`."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - now).total_seconds())


class Sender:
    """Posts one delivery, signed with every secret of its secret name."""

    def __init__(
        self,
        secrets: SecretStore,
        *,
        timeout_s: float,
        max_connections: int = 100,
        signing_clock: Clock = utc_now,
    ) -> None:
        self.secrets = secrets
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        # The attempt's time in `webhook-timestamp` is the real time, whatever
        # clock schedules retries: receivers compare it with their own clock.
        self.signing_clock = signing_clock
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # (made on first use, inside the running loop, as aiohttp wants)
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.max_connections),
                # (no proxy or netrc from the environment: deliveries go where
                # the webhook says; no cookies kept between receivers)
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def post(
        self, url: str, event_id: str, body: bytes, secret_id: str, timeout_s: float | None = None
    ) -> Answer:
        """One attempt; never raises for the receiver's or the network's faults."""
        try:
            signers = self.secrets.signers(secret_id)
        except UnknownSecret as error:
            return Answer(0, str(error))
        at = self.signing_clock()
        headers = delivery_headers(signers, event_id, at, body)
        limit = timeout_s if timeout_s is not None else self.timeout_s
        try:
            # The whole attempt is bounded, not only each phase: a receiver
            # that trickles its answer byte by byte still times out.
            async with self._client().post(
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=limit),
            ) as response:
                # Read a short answer to its end, so its connection is kept
                # for the next delivery; a long one is cut (its connection
                # closed): nobody reads it.
                read = 0
                async for chunk in response.content.iter_chunked(16 * 1024):
                    read += len(chunk)
                    if read > MAX_ANSWER_BYTES:
                        break
                status = response.status
                reason = response.reason or ""
                retry_after = response.headers.get("retry-after")
        except TimeoutError:
            return Answer(0, f"timed out after {limit:g} s")
        except aiohttp.ClientError as error:
            return Answer(0, f"{type(error).__name__}: {error}"[:500])
        if 200 <= status <= 299:
            return Answer(status)
        return Answer(
            status, f"HTTP {status} {reason}".strip(), retry_after_seconds(retry_after, at)
        )


class Dispatcher:
    """The delivery loop of one replica."""

    def __init__(
        self,
        store: WebhookStore,
        sender: Sender,
        *,
        schedule: RetrySchedule,
        clock: Clock = utc_now,
        max_in_flight: int = 32,
        batch_size: int = 100,
        poll_interval_s: float = 1.0,
        lease_margin_s: float = 30.0,
        purge_interval_s: float = 3600.0,
        delivered_retention_s: float = 7 * 86400,
        dead_letter_retention_s: float = 30 * 86400,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.sender = sender
        self.schedule = schedule
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.batch_size = batch_size
        self.poll_interval_s = poll_interval_s
        # A claim holds a delivery for its attempt's timeout plus this margin
        # (recording the result); past it another claim may take it.
        self.lease_s = sender.timeout_s + lease_margin_s
        self.purge_interval_s = purge_interval_s
        self.delivered_retention_s = delivered_retention_s
        self.dead_letter_retention_s = dead_letter_retention_s
        self.rng = rng or random.Random()
        # Counters for tests and the bench: attempts made, deliveries made,
        # and claim rounds done (a round's claim is committed when it counts).
        self.attempted = 0
        self.delivered = 0
        self.rounds = 0
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self._waiting = False
        self._stop_listening: Callable[[], Awaitable[None]] | None = None

    @property
    def idle(self) -> bool:
        """No attempt in flight and the loop waiting for a wake or its poll
        (tests: a wake now starts a round)."""
        return self._waiting and not self._wake.is_set() and not self._tasks

    def wake(self) -> None:
        """Looks for due deliveries now (tests call it after moving their clock)."""
        self._wake.set()

    async def start(self) -> None:
        try:
            self._stop_listening = await self.store.listen(self.wake)
        except Exception as error:  # (polling still delivers, only later)
            logger.warning("webhook dispatcher cannot listen for new deliveries: %s", error)
        self._loop_task = asyncio.create_task(self._run(), name="webhook-dispatcher")

    async def close(self, grace_s: float = 5.0) -> None:
        """Stops claiming; attempts in flight get `grace_s` to finish, then
        are cancelled (their leases end and another replica retries them).
        Cancelling `close` itself (the runtime bounds each shutdown step)
        ends it: it waits on its tasks without suppressing its own cancel."""
        self._closing = True
        await stop_task(self._loop_task)
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            await stop_tasks(pending)
        if self._stop_listening is not None:
            stop_listening, self._stop_listening = self._stop_listening, None
            with contextlib.suppress(Exception):
                await stop_listening()
        await self.sender.close()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_purge = loop.time()
        # (`_closing` as well as the cancel: a cancel lost inside a library
        # call still ends the loop at its next round)
        while not self._closing:
            self._wake.clear()
            if loop.time() >= next_purge:
                next_purge = loop.time() + self.purge_interval_s
                await self._purge()
            free = self.max_in_flight - len(self._tasks)
            wanted = min(free, self.batch_size)
            claimed: list[ClaimedDelivery] = []
            if wanted > 0:
                try:
                    claimed = await self.store.claim(self.clock(), wanted, self.lease_s)
                except Exception as error:  # (a database outage: try again at the next poll)
                    logger.warning("webhook dispatcher cannot claim deliveries: %s", error)
            self.rounds += 1
            for delivery in claimed:
                task = asyncio.create_task(self._deliver(delivery))
                self._tasks.add(task)
                task.add_done_callback(self._finished)
            if claimed and len(claimed) == wanted:
                continue  # more may be due
            # (wait_event, not wait_for: a wake() from an attempt ending as
            # the service stopped once swallowed the stopping cancel, and kept
            # this loop and `close` running until the runtime's 15 s bound)
            self._waiting = True
            try:
                await wait_event(self._wake, self.poll_interval_s)
            finally:
                self._waiting = False

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._wake.set()

    async def _deliver(self, delivery: ClaimedDelivery) -> None:
        answer = await self.sender.post(
            delivery.url, delivery.event_id, delivery.body, delivery.secret_id
        )
        self.attempted += 1
        verdict, delay = judge(answer, delivery.attempts, self.schedule, self.rng)
        now = self.clock()
        try:
            if verdict is Verdict.DELIVERED:
                self.delivered += 1
                await self.store.mark_delivered(delivery, now, answer.http_status)
            elif verdict is Verdict.RETRY:
                assert delay is not None
                await self.store.mark_retry(
                    delivery, due_at(now, delay), answer.http_status, answer.error
                )
            elif verdict is Verdict.GONE:
                logger.warning(
                    "webhook %s answered 410 Gone: disabled, its pending deliveries dead-lettered",
                    delivery.webhook_id,
                )
                await self.store.webhook_gone(delivery, now, answer.http_status, answer.error)
            else:
                logger.warning(
                    "webhook %s: delivery %s dead-lettered after %d attempts (%s)",
                    delivery.webhook_id,
                    delivery.delivery_id,
                    delivery.attempts,
                    answer.error,
                )
                await self.store.mark_dead(delivery, now, answer.http_status, answer.error)
        except Exception as error:  # (its lease ends and the attempt is made again)
            logger.warning("cannot record delivery %s: %s", delivery.delivery_id, error)

    async def _purge(self) -> None:
        now = self.clock()
        try:
            delivered, dead = await self.store.purge(
                now - _seconds(self.delivered_retention_s),
                now - _seconds(self.dead_letter_retention_s),
            )
        except Exception as error:
            logger.warning("webhook purge failed: %s", error)
            return
        if delivered or dead:
            logger.info("purged %d delivered webhook deliveries, %d dead letters", delivered, dead)


def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)

"""Webhooks end to end: the webhook RPCs over real gRPC (the shared runtime,
interceptors included), deliveries from the PostgreSQL outbox to a real HTTP
receiver on loopback (aiohttp), signatures checked by the `standardwebhooks`
package (the specification's reference library, a verifier nobody here
wrote), retries on a schedule driven by a ManualClock, dead letters and
their redelivery.

The service here wires the webhooks area alone (`start_webhooks`, what
app.py calls) behind the real router, so these tests need no peers."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from standardwebhooks import Webhook, WebhookVerificationError

from converge.recommendation.outbox import OutboxEvent
from converge.recommendation.servicer import RecommendationServicer
from converge.recommendation.settings import RecommendationSettings
from converge.recommendation.webhooks.wiring import WebhooksArea, start_webhooks
from converge.runtime.server import ServiceContext, ServiceRuntime, ServiceSpec
from converge.runtime.settings import load_settings
from converge.runtime.values import timestamp
from converge.v1 import common_pb2, recommendation_pb2, recommendation_pb2_grpc
from converge.v1 import recommendation_pb2 as pb
from tests.recommendation.conftest import ManualClock
from tests.recommendation.webhook_receiver import Receiver, Reply
from tests.waiting import until, wait_until


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


OLD_SECRET, NEW_SECRET, OTHER_SECRET = new_secret(), new_secret(), new_secret()


@dataclass
class Webhooks:
    stub: recommendation_pb2_grpc.RecommendationServiceStub
    area: WebhooksArea
    clock: ManualClock
    runtime: ServiceRuntime

    async def enqueue(self, *events: OutboxEvent) -> int:
        """What the alerts area does inside its alert transaction."""
        async with self.runtime.pool.acquire() as conn, conn.transaction():
            return await self.area.store.enqueue(conn, list(events))

    async def round(self) -> None:
        """Wakes the dispatcher and waits for one whole claim round after it."""
        dispatcher = self.area.dispatcher
        before = dispatcher.rounds
        dispatcher.wake()
        await until(lambda: dispatcher.rounds > before + 1, "a claim round")

    async def delivery(self, event_id: str) -> dict[str, Any]:
        row = await self.runtime.pool.fetchrow(
            "SELECT * FROM webhook_deliveries WHERE event_id = $1", event_id
        )
        assert row is not None
        return dict(row)

    async def create(self, receiver: Receiver, **fields: Any) -> pb.Webhook:
        request = pb.CreateWebhookRequest(
            team=fields.pop("team", "support"),
            url=fields.pop("url", receiver.url()),
            secret_id=fields.pop("secret_id", "crm"),
            **fields,
        )
        return (await self.stub.CreateWebhook(request)).webhook


StartWebhooks = Callable[..., Awaitable[Webhooks]]


@pytest.fixture
async def start_service(database: str, clock: ManualClock) -> AsyncIterator[StartWebhooks]:
    started: list[tuple[ServiceRuntime, grpc.aio.Channel]] = []

    async def start(**settings: Any) -> Webhooks:
        areas: list[WebhooksArea] = []

        async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
            assert isinstance(context.settings, RecommendationSettings)
            area = await start_webhooks(context, context.settings, clock)
            areas.append(area)
            recommendation_pb2_grpc.add_RecommendationServiceServicer_to_server(
                RecommendationServicer(webhooks=area.rpcs), server
            )
            return [
                recommendation_pb2.DESCRIPTOR.services_by_name["RecommendationService"].full_name
            ]

        fields: dict[str, Any] = {
            "database_url": database,
            "port": 0,
            "cpu_workers": 1,
            "webhook_secrets": {"crm": [OLD_SECRET, NEW_SECRET], "other": [OTHER_SECRET]},
            "webhook_allow_http": True,
            "webhook_retry_schedule_s": [2, 5],
            "webhook_retry_jitter": 0,
            "webhook_timeout_s": 5,
            # Rounds are driven by wake() and the notifications; no retry
            # falls due by the poll in a test (the clock does not move by itself).
            "webhook_poll_interval_s": 0.05,
        }
        fields.update(settings)
        spec = ServiceSpec(
            "recommendation", files("converge.recommendation") / "migrations", register
        )
        runtime = ServiceRuntime(spec, RecommendationSettings(**fields))
        await runtime.start()
        channel = grpc.aio.insecure_channel(runtime.address)
        started.append((runtime, channel))
        return Webhooks(
            recommendation_pb2_grpc.RecommendationServiceStub(channel), areas[0], clock, runtime
        )

    yield start
    for runtime, channel in reversed(started):
        await channel.close()
        await runtime.stop(grace=1)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.close()


def alert_event(
    team: str = "support", kind: int = pb.ALERT_KIND_ESCALATION_RISK, note: str = ""
) -> OutboxEvent:
    """An alert event as the alerts area hands it over: its proto3 JSON body."""
    alert_id, customer_id = str(uuid.uuid4()), str(uuid.uuid4())
    occurred = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    event = pb.AlertEvent(
        cursor="17",
        type=pb.ALERT_EVENT_TYPE_CREATED,
        alert=pb.Alert(
            alert_id=alert_id, team=team, kind=kind, customer_id=customer_id, dedup_key=note
        ),
        occurred_at=timestamp(occurred),
    )
    kind_name = pb.AlertKind.Name(kind)[len("ALERT_KIND_") :].lower()  # type: ignore[arg-type]
    return OutboxEvent(
        event_id=f"evt_{uuid.uuid4().hex}",
        team=team,
        kind=kind_name,
        alert_id=alert_id,
        customer_id=customer_id,
        body=json_format.MessageToJson(event, indent=None).encode(),
        occurred_at=occurred,
    )


async def test_every_delivery_verifies_with_the_reference_library_during_a_rotation(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service()
    await service.create(receiver)
    events = [alert_event() for _ in range(5)]
    assert await service.enqueue(*events) == 5
    # No wake: the enqueue's notification at commit wakes the dispatcher.
    await until(lambda: len(receiver.received) == 5, "five deliveries")
    assert {r.webhook_id for r in receiver.received} == {e.event_id for e in events}
    bodies = {e.event_id: e.body for e in events}
    for request in receiver.received:
        assert request.body == bodies[request.webhook_id], "the body is posted unchanged"
        assert request.headers["content-type"] == "application/json"
        assert len(request.headers["webhook-signature"].split(" ")) == 2, "one per secret"
        # Receivers holding either secret of the rotation accept it...
        Webhook(OLD_SECRET).verify(request.body, request.headers)
        Webhook(NEW_SECRET).verify(request.body, request.headers)
        # ...one holding another secret does not, nor a tampered body.
        with pytest.raises(WebhookVerificationError):
            Webhook(OTHER_SECRET).verify(request.body, request.headers)
        tampered = request.body.replace(b"ESCALATION", b"CHURN")
        assert tampered != request.body
        with pytest.raises(WebhookVerificationError):
            Webhook(NEW_SECRET).verify(tampered, request.headers)
    for event in events:
        await wait_until(
            lambda e=event: service.delivery(e.event_id),  # type: ignore[misc]
            lambda d: d["state"] == "delivered",
            what="the delivery recorded as delivered",
        )


async def test_500s_are_retried_on_the_schedule_then_dead_lettered_and_redelivered(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service()
    hook = await service.create(receiver)
    receiver.default = Reply(500)
    event = alert_event()
    start = service.clock()
    await service.enqueue(event)
    await until(lambda: len(receiver.received) == 1, "the first attempt")
    delivery = await wait_until(
        lambda: service.delivery(event.event_id),
        lambda d: d["last_status"] == 500,
        what="the first attempt recorded",
    )
    assert delivery["due_at"] == start + timedelta(seconds=2), "first retry 2 s later"

    # Not due yet: a round claims nothing.
    service.clock.advance(seconds=1.9)
    await service.round()
    assert len(receiver.received) == 1
    assert (await service.delivery(event.event_id))["attempts"] == 1

    service.clock.advance(seconds=0.1)
    await service.round()
    await until(lambda: len(receiver.received) == 2, "the second attempt")
    delivery = await wait_until(
        lambda: service.delivery(event.event_id),
        lambda d: d["attempts"] == 2 and d["due_at"] == start + timedelta(seconds=7),
        what="the second retry scheduled 5 s after the second attempt",
    )
    service.clock.advance(seconds=5)
    await service.round()
    # The budget (1 + 2 retries) is spent: a dead letter.
    delivery = await wait_until(
        lambda: service.delivery(event.event_id),
        lambda d: d["state"] == "dead",
        what="the dead letter",
    )
    assert delivery["attempts"] == 3 and len(receiver.received) == 3
    assert len({r.headers["webhook-id"] for r in receiver.received}) == 1
    assert {r.body for r in receiver.received} == {event.body}

    letters = (
        await service.stub.ListDeadLetters(pb.ListDeadLettersRequest(team="support"))
    ).dead_letters
    assert len(letters) == 1
    letter = letters[0]
    assert letter.webhook_id == hook.webhook_id and letter.attempts == 3
    assert letter.last_error.startswith("HTTP 500")
    assert letter.event.alert.alert_id == event.alert_id, "the event read back from its body"
    assert letter.first_attempt_at.ToDatetime(UTC) == start

    # Still failing: the redelivery says so and the dead letter stays.
    failed = await service.stub.RedeliverDeadLetter(
        pb.RedeliverDeadLetterRequest(dead_letter_id=letter.dead_letter_id), timeout=10
    )
    assert not failed.delivered and failed.http_status == 500
    assert failed.dead_letter.attempts == 4

    receiver.default = Reply(204)
    redelivered = await service.stub.RedeliverDeadLetter(
        pb.RedeliverDeadLetterRequest(dead_letter_id=letter.dead_letter_id, idempotency_key="r1"),
        timeout=10,
    )
    assert redelivered.delivered and redelivered.http_status == 204
    assert not redelivered.HasField("dead_letter")
    assert len(receiver.received) == 5
    last = receiver.received[-1]
    assert last.webhook_id == event.event_id and last.body == event.body
    Webhook(NEW_SECRET).verify(last.body, last.headers)
    assert (await service.stub.ListDeadLetters(pb.ListDeadLettersRequest())).dead_letters == []
    # The same key again: the first result, no second POST.
    again = await service.stub.RedeliverDeadLetter(
        pb.RedeliverDeadLetterRequest(dead_letter_id=letter.dead_letter_id, idempotency_key="r1")
    )
    assert again.delivered and len(receiver.received) == 5
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await service.stub.RedeliverDeadLetter(
            pb.RedeliverDeadLetterRequest(dead_letter_id=letter.dead_letter_id)
        )
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND, "delivered: no longer a dead letter"


async def test_a_receiver_that_does_not_answer_in_time_is_retried(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service(webhook_timeout_s=0.5)
    await service.create(receiver)
    receiver.answer(Reply(hang=True))
    event = alert_event()
    start = service.clock()
    await service.enqueue(event)
    delivery = await wait_until(
        lambda: service.delivery(event.event_id),
        lambda d: d["last_error"] != "",
        what="the timed-out attempt recorded",
    )
    assert delivery["last_error"].startswith("timed out after 0.5 s")
    assert delivery["last_status"] == 0 and delivery["state"] == "pending"
    assert delivery["due_at"] == start + timedelta(seconds=2)
    service.clock.advance(seconds=2)
    await service.round()
    await wait_until(
        lambda: service.delivery(event.event_id),
        lambda d: d["state"] == "delivered",
        what="the retry delivered",
    )
    assert [r.webhook_id for r in receiver.received] == [event.event_id] * 2
    first, second = receiver.received
    assert first.body == second.body
    Webhook(OLD_SECRET).verify(second.body, second.headers)


async def test_redirects_are_failures_not_followed(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service()
    await service.create(receiver)
    receiver.answer(Reply(302, {"Location": receiver.url("/elsewhere")}))
    event = alert_event()
    await service.enqueue(event)
    delivery = await wait_until(
        lambda: service.delivery(event.event_id),
        lambda d: d["last_status"] == 302,
        what="the redirect recorded",
    )
    assert delivery["state"] == "pending" and delivery["last_error"].startswith("HTTP 302")
    assert [r.path for r in receiver.received] == ["/hooks"], "the redirect was not followed"


async def test_retry_after_pushes_the_retry_later(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service(webhook_retry_schedule_s=[2, 120])
    await service.create(receiver)
    receiver.answer(Reply(503, {"Retry-After": "60"}))
    event = alert_event()
    start = service.clock()
    await service.enqueue(event)
    delivery = await wait_until(
        lambda: service.delivery(event.event_id),
        lambda d: d["last_status"] == 503,
        what="the 503 recorded",
    )
    assert delivery["due_at"] == start + timedelta(seconds=60)


async def test_410_gone_disables_the_webhook_and_keeps_its_events_as_dead_letters(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service()
    gone = await service.create(receiver, url=receiver.url("/gone"))
    kept = await service.create(receiver, url=receiver.url("/kept"))
    receiver.answer(Reply(410))
    receiver.default = Reply(200)
    event = alert_event()
    # One attempt at a time, so the 410 goes to the first webhook's attempt.
    await service.enqueue(event)
    await until(lambda: len(receiver.received) == 2, "both webhooks attempted")
    # (both attempts run at once: the first request to arrive got the 410)
    gone_path = receiver.received[0].path
    gone_id, live_id = (
        (gone.webhook_id, kept.webhook_id)
        if gone_path == "/gone"
        else (kept.webhook_id, gone.webhook_id)
    )
    listed = await wait_until(
        lambda: service.stub.ListWebhooks(pb.ListWebhooksRequest()),
        lambda r: len(r.webhooks) == 1,
        what="the gone webhook disabled",
    )
    assert [w.webhook_id for w in listed.webhooks] == [live_id]
    letters = (await service.stub.ListDeadLetters(pb.ListDeadLettersRequest())).dead_letters
    assert [(d.webhook_id, d.last_error) for d in letters] == [(gone_id, "HTTP 410 Gone")]
    # New events reach only the live webhook.
    assert await service.enqueue(alert_event()) == 1


async def test_delete_drops_pending_deliveries_and_keeps_dead_letters(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service(webhook_retry_schedule_s=[])
    hook = await service.create(receiver)
    receiver.answer(Reply(500))
    dead = alert_event()
    await service.enqueue(dead)
    await wait_until(
        lambda: service.delivery(dead.event_id), lambda d: d["state"] == "dead", what="dead"
    )
    receiver.default = Reply(hang=True)
    pending = alert_event()
    await service.enqueue(pending)
    deleted = await service.stub.DeleteWebhook(pb.DeleteWebhookRequest(webhook_id=hook.webhook_id))
    assert deleted.dropped_deliveries == 1
    again = await service.stub.DeleteWebhook(pb.DeleteWebhookRequest(webhook_id=hook.webhook_id))
    assert again.dropped_deliveries == 0
    assert (await service.stub.ListWebhooks(pb.ListWebhooksRequest())).webhooks == []
    letters = (await service.stub.ListDeadLetters(pb.ListDeadLettersRequest())).dead_letters
    assert [d.event.alert.alert_id for d in letters] == [dead.alert_id]
    assert await service.enqueue(alert_event()) == 0, "a deleted webhook gets nothing new"


async def test_the_dispatcher_stops_at_once_when_woken_as_it_closes(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    """The teardown hang of the delete tests: an attempt in flight for a
    deleted webhook ends as the service stops, and its end wakes the
    dispatcher just as `close` cancels its loop. On Python 3.11 the loop's
    `asyncio.wait_for` swallowed that cancel, and `close` waited until the
    runtime's 15 s bound. Here the wake and the cancel coincide every time."""
    # (no poll: between rounds the loop waits on its wake event alone)
    service = await start_service(webhook_poll_interval_s=60)
    dispatcher = service.area.dispatcher
    hook = await service.create(receiver)
    receiver.default = Reply(hang=True)
    await service.enqueue(alert_event())
    await until(lambda: len(receiver.received) == 1, "the attempt in flight")
    deleted = await service.stub.DeleteWebhook(pb.DeleteWebhookRequest(webhook_id=hook.webhook_id))
    assert deleted.dropped_deliveries == 1
    receiver.release()
    await until(lambda: dispatcher.attempted == 1 and dispatcher.idle, "the attempt ended")
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(30):  # (only a broken close reaches it)
        dispatcher.wake()  # what an attempt ending does
        await dispatcher.close()
    stopped_in = loop.time() - started
    assert stopped_in < 5, f"the dispatcher took {stopped_in:.1f} s to stop"


async def test_a_delivery_id_never_carries_two_bodies(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service()
    await service.create(receiver)
    receiver.answer(Reply(500), Reply(503))
    event = alert_event(note="first")
    await service.enqueue(event)
    # The same event handed over again with another body (a replayed alert
    # transaction that rendered it anew) adds nothing.
    replay = OutboxEvent(**{**event.__dict__, "body": alert_event(note="second").body})
    assert await service.enqueue(replay) == 0
    for attempts, status, delay in ((1, 500, 2), (2, 503, 5)):
        await wait_until(
            lambda: service.delivery(event.event_id),
            lambda d, a=attempts, s=status: d["attempts"] == a and d["last_status"] == s,  # type: ignore[misc]
            what=f"attempt {attempts} recorded",
        )
        service.clock.advance(seconds=delay)
        await service.round()
    await wait_until(
        lambda: service.delivery(event.event_id),
        lambda d: d["state"] == "delivered",
        what="delivered",
    )
    bodies: dict[str, set[bytes]] = {}
    for request in receiver.received:
        bodies.setdefault(request.webhook_id, set()).add(request.body)
    assert bodies == {event.event_id: {event.body}}
    assert len(receiver.received) == 3


async def test_create_webhook_checks_its_request(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service(webhook_allow_http=False)

    async def refused(**fields: Any) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await service.create(receiver, **fields)
        return error.value

    plain = await refused()  # http://127.0.0.1:...
    assert plain.code() == grpc.StatusCode.INVALID_ARGUMENT and "url" in (plain.details() or "")
    unknown = await refused(url="https://hooks.example/in", secret_id="nobody")
    assert unknown.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "nobody" in (unknown.details() or "")
    kinds = await refused(url="https://hooks.example/in", kinds=[pb.ALERT_KIND_UNSPECIFIED])
    assert kinds.code() == grpc.StatusCode.INVALID_ARGUMENT and "kinds[0]" in (
        kinds.details() or ""
    )
    team = await refused(url="https://hooks.example/in", team="")
    assert team.code() == grpc.StatusCode.INVALID_ARGUMENT and "team" in (team.details() or "")
    creds = await refused(url="https://user:pw@hooks.example/in")
    assert creds.code() == grpc.StatusCode.INVALID_ARGUMENT

    first = await service.create(
        receiver,
        url="https://hooks.example/in",
        kinds=[pb.ALERT_KIND_CHURN_RISK],
        idempotency_key="k1",
        actor=common_pb2.Actor(name="ops"),
    )
    repeat = await service.create(
        receiver,
        url="https://hooks.example/in",
        kinds=[pb.ALERT_KIND_CHURN_RISK],
        idempotency_key="k1",
        actor=common_pb2.Actor(name="ops"),
    )
    assert repeat == first, "the same request under the same key returns the first webhook"
    assert list(first.kinds) == [pb.ALERT_KIND_CHURN_RISK] and first.created_by.name == "ops"
    with pytest.raises(grpc.aio.AioRpcError) as token:
        await service.stub.ListWebhooks(
            pb.ListWebhooksRequest(page=common_pb2.PageRequest(page_token="nonsense!"))
        )
    assert token.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as bad_id:
        await service.stub.RedeliverDeadLetter(pb.RedeliverDeadLetterRequest(dead_letter_id="x"))
    assert bad_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_webhooks_and_dead_letters_page(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service(webhook_retry_schedule_s=[])
    receiver.default = Reply(500)
    made = []
    for i in range(5):
        made.append((await service.create(receiver, team=f"t{i % 2}")).webhook_id)
        service.clock.advance(seconds=1)
    seen: list[str] = []
    token = ""
    while True:
        page = await service.stub.ListWebhooks(
            pb.ListWebhooksRequest(page=common_pb2.PageRequest(page_size=2, page_token=token))
        )
        seen += [w.webhook_id for w in page.webhooks]
        token = page.page.next_page_token
        if not token:
            break
    assert seen == made, "oldest first, every webhook once"
    t1 = (await service.stub.ListWebhooks(pb.ListWebhooksRequest(team="t1"))).webhooks
    assert [w.webhook_id for w in t1] == made[1::2]

    events = [alert_event(team="t0") for _ in range(3)]
    for event in events:
        await service.enqueue(event)
    await wait_until(
        lambda: service.runtime.pool.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE state = 'dead'"
        ),
        lambda n: n == 9,
        what="nine dead letters (3 events x 3 webhooks of t0)",
    )
    letters: list[str] = []
    token = ""
    while True:
        page = await service.stub.ListDeadLetters(
            pb.ListDeadLettersRequest(
                team="t0", page=common_pb2.PageRequest(page_size=4, page_token=token)
            )
        )
        letters += [d.dead_letter_id for d in page.dead_letters]
        token = page.page.next_page_token
        if not token:
            break
    assert len(letters) == len(set(letters)) == 9
    one = await service.stub.ListDeadLetters(pb.ListDeadLettersRequest(webhook_id=made[0]))
    assert {d.webhook_id for d in one.dead_letters} == {made[0]}
    assert len(one.dead_letters) == 3


def test_a_secret_that_is_no_whsec_secret_stops_the_service(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(
        "CONVERGE_RECOMMENDATION_WEBHOOK_SECRETS", '{"crm": ["s3cret-password-of-someone"]}'
    )
    with pytest.raises(SystemExit) as stopped:
        load_settings(RecommendationSettings)
    assert stopped.value.code == 2
    printed = capsys.readouterr().err
    assert "CONVERGE_RECOMMENDATION_WEBHOOK_SECRETS" in printed
    assert "'crm'" in printed and "whsec_" in printed
    assert "s3cret-password-of-someone" not in printed, "the value is never printed"
    short = "whsec_" + base64.b64encode(b"x" * 8).decode()
    monkeypatch.setenv("CONVERGE_RECOMMENDATION_WEBHOOK_SECRETS", f'{{"crm": "{short}"}}')
    with pytest.raises(SystemExit):
        load_settings(RecommendationSettings)
    assert "holds 8 bytes" in capsys.readouterr().err
    monkeypatch.setenv("CONVERGE_RECOMMENDATION_WEBHOOK_SECRETS", f'{{"crm": "{NEW_SECRET}"}}')
    accepted = load_settings(RecommendationSettings)
    assert [s.get_secret_value() for s in accepted.webhook_secrets["crm"]] == [NEW_SECRET]


async def test_two_replicas_share_the_deliveries_without_posting_one_twice(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    first = await start_service()
    second = await start_service()
    await first.create(receiver)
    events = [alert_event() for _ in range(200)]
    for start in range(0, 200, 50):
        await first.enqueue(*events[start : start + 50])
    await until(lambda: len(receiver.received) >= 200, "every delivery posted")
    await wait_until(
        lambda: first.runtime.pool.fetchval(
            "SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'"
        ),
        lambda n: n == 200,
        what="every delivery recorded",
    )
    posted = [r.webhook_id for r in receiver.received]
    assert sorted(posted) == sorted(e.event_id for e in events), "each event once"
    assert first.area.dispatcher.attempted + second.area.dispatcher.attempted == 200


async def _refused_for_its_key(call: Awaitable[Any]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in (refused.value.details() or "")


async def test_create_webhook_binds_its_key_to_its_request(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service()
    first = await service.create(receiver, idempotency_key="c1")
    assert await service.create(receiver, idempotency_key="c1") == first, "the first webhook"
    await _refused_for_its_key(
        service.create(receiver, url=receiver.url() + "/elsewhere", idempotency_key="c1")
    )
    await _refused_for_its_key(service.create(receiver, team="sales", idempotency_key="c1"))
    listed = (await service.stub.ListWebhooks(pb.ListWebhooksRequest())).webhooks
    assert list(listed) == [first], "a refused request registers nothing"


async def test_delete_webhook_binds_its_key_to_its_request(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service()
    receiver.default = Reply(hang=True)
    doomed = await service.create(receiver)
    kept = await service.create(receiver, url=receiver.url() + "/kept", team="sales")
    await service.enqueue(alert_event())

    def delete(webhook_id: str) -> Awaitable[pb.DeleteWebhookResponse]:
        return service.stub.DeleteWebhook(
            pb.DeleteWebhookRequest(webhook_id=webhook_id, idempotency_key="d1")
        )

    assert (await delete(doomed.webhook_id)).dropped_deliveries == 1
    assert (await delete(doomed.webhook_id)).dropped_deliveries == 1, "the first answer"
    await _refused_for_its_key(delete(kept.webhook_id))
    listed = (await service.stub.ListWebhooks(pb.ListWebhooksRequest())).webhooks
    assert [w.webhook_id for w in listed] == [kept.webhook_id], "the refused delete did nothing"


async def test_redeliver_dead_letter_binds_its_key_to_its_request(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service(webhook_retry_schedule_s=[])
    await service.create(receiver)
    receiver.default = Reply(500)
    events = [alert_event(), alert_event()]
    for event in events:
        await service.enqueue(event)
        await wait_until(
            lambda event_id=event.event_id: service.delivery(event_id),
            lambda d: d["state"] == "dead",
            what="dead",
        )
    letters = (await service.stub.ListDeadLetters(pb.ListDeadLettersRequest())).dead_letters
    assert len(letters) == 2

    def redeliver(letter: pb.DeadLetter) -> Awaitable[pb.RedeliverDeadLetterResponse]:
        return service.stub.RedeliverDeadLetter(
            pb.RedeliverDeadLetterRequest(
                dead_letter_id=letter.dead_letter_id, idempotency_key="r1"
            ),
            timeout=10,
        )

    first = await redeliver(letters[0])
    assert not first.delivered and first.http_status == 500
    posted = len(receiver.received)
    repeat = await redeliver(letters[0])
    assert (repeat.delivered, repeat.http_status) == (False, 500), "the first answer"
    await _refused_for_its_key(redeliver(letters[1]))
    assert len(receiver.received) == posted, "neither the repeat nor the refusal posted"


async def test_concurrent_redeliveries_under_one_key_post_once(
    start_service: StartWebhooks, receiver: Receiver
) -> None:
    service = await start_service(webhook_retry_schedule_s=[])
    await service.create(receiver)
    receiver.default = Reply(500)
    events = [alert_event() for _ in range(4)]
    for event in events:
        await service.enqueue(event)
        await wait_until(
            lambda event_id=event.event_id: service.delivery(event_id),
            lambda d: d["state"] == "dead",
            what="dead",
        )
    letters = (await service.stub.ListDeadLetters(pb.ListDeadLettersRequest())).dead_letters
    posted = len(receiver.received)
    answers = await asyncio.gather(
        *(
            service.stub.RedeliverDeadLetter(
                pb.RedeliverDeadLetterRequest(
                    dead_letter_id=letter.dead_letter_id, idempotency_key="r1"
                ),
                timeout=10,
            )
            for letter in letters
        ),
        return_exceptions=True,
    )
    refused = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert len(refused) == len(letters) - 1, answers
    assert {e.code() for e in refused} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert len(receiver.received) == posted + 1, "one key, one POST"

"""The recommendation service killed (SIGKILL) while alerts flow, then
restarted: every alert that should exist exists exactly once, and a
subscriber resuming from the last cursor it received gets every event once.

Recommendation runs as a real process (python -m converge.recommendation)
with its default policy (escalation risk at 0.6 to support); identity,
interactions and scoring (rule fallback) run in the test's process. Each
trigger customer has an urgent ticket reassigned twice and its priority
changed (escalation about 0.53 on the rules: no alert); reopening the ticket
takes it to about 0.67: one alert per ticket must exist, however the crash
falls."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc

from converge.runtime.values import timestamp
from converge.v1 import (
    common_pb2,
    interactions_pb2,
    recommendation_pb2,
    recommendation_pb2_grpc,
)
from tests.conftest import Platform
from tests.recommendation.conftest import Scoring
from tests.recommendation.webhook_receiver import Receiver
from tests.service_process import ServiceProcess, start_service, stop_process
from tests.waiting import until, wait_until

pb = recommendation_pb2
TRIGGERS = 24


def _request(
    customer: common_pb2.CustomerRef, kind: str, ticket: str, key: str, **attributes: str
) -> interactions_pb2.RecordInteractionRequest:
    return interactions_pb2.RecordInteractionRequest(
        interaction=interactions_pb2.InteractionInput(
            customer=customer,
            occurred_at=timestamp(datetime.now(UTC) - timedelta(minutes=5)),
            channel=common_pb2.CHANNEL_SERVICE_DESK,
            type=kind,
            ticket_id=ticket,
            attributes={
                k: common_pb2.AttributeValue(string_value=v) for k, v in attributes.items()
            },
            source="crash-test",
        ),
        idempotency_key=key,
    )


async def _trigger_customers(platform: Platform) -> list[tuple[str, str]]:
    made = []
    for i in range(TRIGGERS):
        ticket = f"K-{i}"
        email = common_pb2.CustomerRef(
            identifier=common_pb2.Identifier(
                type=common_pb2.IDENTIFIER_TYPE_EMAIL, value=f"crash-{i}@alerts.example"
            )
        )
        opened = await platform.interactions.RecordInteraction(
            _request(email, "ticket.opened", ticket, f"open-{i}", priority="urgent",
                     category="billing")
        )  # fmt: skip
        ref = common_pb2.CustomerRef(customer_id=opened.interaction.customer_id)
        for n, team in enumerate(("second-line", "third-line")):
            await platform.interactions.RecordInteraction(
                _request(ref, "ticket.reassigned", ticket, f"re-{i}-{n}", team=team)
            )
        await platform.interactions.RecordInteraction(
            _request(ref, "ticket.priority_changed", ticket, f"prio-{i}", priority="urgent",
                     previous_priority="high")
        )  # fmt: skip
        made.append((opened.interaction.customer_id, ticket))
    return made


SECRET = "whsec_" + base64.b64encode(b"alerts-crash-test-secret-32-bytes").decode()


async def _start(
    database: str, tmp_path: Path, platform: Platform, scoring: Scoring, run: int
) -> ServiceProcess:
    log_dir = tmp_path / f"run-{run}"
    log_dir.mkdir()
    return await start_service(
        "recommendation",
        database,
        log_dir,
        identity_address=platform.identity_address,
        interactions_address=platform.interactions_address,
        scoring_address=scoring.address,
        alerts_standby_retry_s="0.2",
        webhook_secrets=json.dumps({"crash": SECRET}),
        webhook_allow_http="true",
    )


class Reader:
    """A subscriber of the support team that resumes from its last cursor."""

    def __init__(self) -> None:
        self.events: list[pb.AlertEvent] = []
        self.task: asyncio.Task[None] | None = None

    async def follow(self, address: str) -> None:
        last = self.events[-1].cursor if self.events else ""
        channel = grpc.aio.insecure_channel(address)
        call = recommendation_pb2_grpc.RecommendationServiceStub(channel).SubscribeAlerts(
            pb.SubscribeAlertsRequest(team="support", from_cursor=last)
        )

        async def read() -> None:
            try:
                async for answer in call:
                    self.events.append(answer.event)
            except grpc.aio.AioRpcError:
                pass  # (the service was killed: resumed by the next follow)
            finally:
                await channel.close()

        self.task = asyncio.create_task(read())
        await call.initial_metadata()

    def created_tickets(self) -> list[str]:
        return [e.alert.ticket_id for e in self.events if e.type == pb.ALERT_EVENT_TYPE_CREATED]


async def test_a_killed_and_restarted_service_raises_each_alert_once_and_resumes_every_subscriber(
    platform: Platform, scoring: Scoring, database: str, tmp_path: Path
) -> None:
    triggers = await _trigger_customers(platform)
    receiver = Receiver()
    await receiver.start()
    service = await _start(database, tmp_path, platform, scoring, 1)
    restarted: ServiceProcess | None = None
    reader = Reader()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            await recommendation_pb2_grpc.RecommendationServiceStub(channel).CreateWebhook(
                pb.CreateWebhookRequest(
                    team="support", url=receiver.url(), secret_id="crash", idempotency_key="w1"
                )
            )
        await reader.follow(service.address)

        async def reopen(i: int) -> None:
            customer_id, ticket = triggers[i]
            await platform.interactions.RecordInteraction(
                _request(
                    common_pb2.CustomerRef(customer_id=customer_id),
                    "ticket.reopened",
                    ticket,
                    f"reopen-{i}",
                )
            )

        first = TRIGGERS // 3
        for i in range(first):
            await reopen(i)
        await until(lambda: len(reader.created_tickets()) >= first, "a third of the alerts")
        sent: list[int] = []

        async def send_rest() -> None:
            for i in range(first, TRIGGERS):
                await reopen(i)
                sent.append(i)

        sending = asyncio.create_task(send_rest())
        await until(lambda: len(sent) >= 2, "more interactions flowing")
        service.process.kill()  # SIGKILL, while interactions and alerts flow
        service.process.wait(10)
        await sending  # (the rest reach interactions while recommendation is down)
        assert reader.task is not None
        with contextlib.suppress(Exception):
            await reader.task

        restarted = await _start(database, tmp_path, platform, scoring, 2)
        await reader.follow(restarted.address)
        expected = {ticket for _, ticket in triggers}
        await until(lambda: expected <= set(reader.created_tickets()), "every alert")

        # Each alert once on the resumed stream, each event once.
        created = reader.created_tickets()
        assert sorted(created) == sorted(expected)
        cursors = [e.cursor for e in reader.events]
        assert len(set(cursors)) == len(cursors)
        # And exactly one alert per ticket in the database.
        conn = await asyncpg.connect(database)
        try:
            rows = await wait_until(
                lambda: conn.fetch(
                    "SELECT ticket_id, count(*) AS n FROM recommendation.alerts "
                    "WHERE kind = 'escalation_risk' GROUP BY ticket_id"
                ),
                lambda found: {r["ticket_id"] for r in found} == expected,
                what="the alerts stored",
            )
            assert all(r["n"] == 1 for r in rows)
            events_per_alert = await conn.fetch(
                "SELECT alert_id, count(*) FILTER (WHERE type = 1) AS created "
                "FROM recommendation.alert_events GROUP BY alert_id"
            )
            assert all(r["created"] == 1 for r in events_per_alert)
            # Webhooks: every delivery of the outbox reaches the receiver at
            # least once, and a delivery id never comes with two bodies.
            deliveries = await conn.fetch(
                "SELECT event_id, body FROM recommendation.webhook_deliveries"
            )
            assert len(deliveries) == len(reader.events)
            ids = {r["event_id"] for r in deliveries}
            await until(
                lambda: ids <= {r.webhook_id for r in receiver.received}, "every webhook delivery"
            )
            bodies: dict[str, set[bytes]] = {}
            for got in receiver.received:
                bodies.setdefault(got.webhook_id, set()).add(got.body)
            assert all(len(b) == 1 for b in bodies.values())
            assert all(bodies[r["event_id"]] == {bytes(r["body"])} for r in deliveries)
        finally:
            await conn.close()
    finally:
        await receiver.close()
        if reader.task is not None:
            reader.task.cancel()
            with contextlib.suppress(BaseException):
                await reader.task
        stop_process(service)
        if restarted is not None:
            stop_process(restarted)

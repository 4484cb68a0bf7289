"""Webhook deliveries per second: the dispatcher of one replica (in this
process, on the bench PostgreSQL) delivering a backlog of signed deliveries
to a local receiver.

The receiver is an aiohttp server in its own process on loopback
(tests/recommendation/webhook_receiver.py) that reads each body and answers
200 at once. The dispatcher runs with its default concurrency (32 attempts in
flight, `webhook_max_in_flight`), each delivery signed with two secrets (a key
rotation, the costlier case), claims of up to 100 rows, and its result
written back one row at a time. The backlog (3,000 alert events for one
webhook) is enqueued first, then the dispatcher starts and the clock runs
until every delivery is recorded delivered. Both sides share the machine's
2 cores with PostgreSQL.

Figure: recommendation.webhooks.deliveries_per_s.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from importlib.resources import files

from converge.recommendation.outbox import OutboxEvent
from converge.recommendation.webhooks.dispatcher import Dispatcher, Sender
from converge.recommendation.webhooks.secrets import SecretStore
from converge.recommendation.webhooks.service import RetrySchedule
from converge.recommendation.webhooks.store import NewWebhook, WebhookStore
from converge.runtime.database import create_pool, load_migrations, migrate
from tests.benchmarks.harness import BenchEnv

EVENTS = 3_000
IN_FLIGHT = 32
NOW = datetime.now(UTC)


def _secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


def _event(index: int) -> OutboxEvent:
    body = json.dumps(
        {
            "cursor": str(index),
            "type": "ALERT_EVENT_TYPE_CREATED",
            "alert": {
                "alertId": str(uuid.uuid4()),
                "team": "support",
                "kind": "ALERT_KIND_ESCALATION_RISK",
                "customerId": str(uuid.uuid4()),
            },
            "occurredAt": "2026-12-02T10:00:00Z",
        },
        separators=(",", ":"),
    )
    return OutboxEvent(
        event_id=f"evt_{uuid.uuid4().hex}",
        team="support",
        kind="escalation_risk",
        alert_id=str(uuid.uuid4()),
        customer_id=str(uuid.uuid4()),
        body=body.encode(),
        occurred_at=NOW,
    )


async def run(env: BenchEnv) -> dict[str, float]:
    receiver = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.recommendation.webhook_receiver",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert receiver.stdout is not None
        port = int((await receiver.stdout.readline()).decode())
        pool = await create_pool(
            await env.new_database(), "recommendation", application_name="bench-webhooks"
        )
        async with pool.acquire() as conn:
            await migrate(
                conn,
                "recommendation",
                load_migrations(files("converge.recommendation") / "migrations"),
            )
        store = WebhookStore(pool)
        await store.create_webhook(
            NewWebhook("support", f"http://127.0.0.1:{port}/hooks", "crm", (), NOW, "bench", "", "")
        )
        for start in range(0, EVENTS, 500):
            async with pool.acquire() as conn, conn.transaction():
                await store.enqueue(conn, [_event(i) for i in range(start, start + 500)])
        sender = Sender(
            SecretStore({"crm": [_secret(), _secret()]}), timeout_s=15, max_connections=IN_FLIGHT
        )
        dispatcher = Dispatcher(
            store, sender, schedule=RetrySchedule(), max_in_flight=IN_FLIGHT, poll_interval_s=0.2
        )
        started = time.perf_counter()
        await dispatcher.start()
        delivered = 0
        while delivered < EVENTS:
            await asyncio.sleep(0.05)  # (a bench polls its own progress; no test waits on time)
            delivered = await pool.fetchval(
                "SELECT count(*) FROM webhook_deliveries WHERE state = 'delivered'"
            )
        elapsed = time.perf_counter() - started
        await dispatcher.close()
        assert dispatcher.attempted == EVENTS, "every delivery attempted once"
        await pool.close()
    finally:
        receiver.terminate()
        await receiver.wait()
    return {"recommendation.webhooks.deliveries_per_s": EVENTS / elapsed}

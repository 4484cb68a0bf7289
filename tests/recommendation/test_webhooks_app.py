"""Webhooks in the whole recommendation service (app.py's wiring, every area
and peer running for real): a webhook registered over gRPC receives the
deliveries the outbox holds, signed, and a customer's deliveries and dead
letters leave with ForgetCustomer and show in ExportCustomer."""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import AsyncIterator

import pytest
from standardwebhooks import Webhook

from converge.recommendation.webhooks.store import WebhookStore
from converge.v1 import privacy_pb2
from converge.v1 import recommendation_pb2 as pb
from tests.recommendation.conftest import StartRecommendation
from tests.recommendation.test_webhooks import alert_event
from tests.recommendation.webhook_receiver import Receiver, Reply
from tests.waiting import until, wait_until

SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    await receiver.start()
    yield receiver
    await receiver.close()


async def test_the_service_delivers_and_forgets_a_customers_webhook_events(
    start_recommendation: StartRecommendation, receiver: Receiver
) -> None:
    service = await start_recommendation(
        webhook_secrets={"crm": [SECRET]},
        webhook_allow_http=True,
        webhook_retry_schedule_s=[],
        alerts_follow=False,
    )
    created = await service.stub.CreateWebhook(
        pb.CreateWebhookRequest(team="support", url=receiver.url(), secret_id="crm")
    )
    listed = await service.stub.ListWebhooks(pb.ListWebhooksRequest(team="support"))
    assert [w.webhook_id for w in listed.webhooks] == [created.webhook.webhook_id]
    receiver.answer(Reply(500))
    failed, delivered = alert_event(), alert_event()
    async with service.runtime.pool.acquire() as conn, conn.transaction():
        assert await WebhookStore.enqueue(conn, [failed, delivered]) == 2
    await until(lambda: len(receiver.received) == 2, "both attempted")
    for request in receiver.received:
        Webhook(SECRET).verify(request.body, request.headers)
    letters = await wait_until(
        lambda: service.stub.ListDeadLetters(pb.ListDeadLettersRequest()),
        lambda r: len(r.dead_letters) == 1,
        what="one dead letter (no retries configured)",
    )
    dead_customer = letters.dead_letters[0].event.alert.customer_id
    assert dead_customer in {failed.customer_id, delivered.customer_id}

    ids = [failed.customer_id, delivered.customer_id]
    exported = await service.privacy.ExportCustomerData(
        privacy_pb2.ExportCustomerDataRequest(customer_ids=ids)
    )
    sections = {s.kind: len(s.records) for s in exported.sections}
    assert sections.get("webhook_dead_letters") == 1
    assert sections.get("webhook_deliveries") == 1
    erased = await service.privacy.EraseCustomerData(
        privacy_pb2.EraseCustomerDataRequest(customer_ids=ids, erasure_id=str(uuid.uuid4()))
    )
    assert erased.erased_counts["webhook_dead_letters"] == 1
    assert erased.erased_counts["webhook_deliveries"] == 1
    after = await service.stub.ListDeadLetters(pb.ListDeadLettersRequest())
    assert list(after.dead_letters) == []

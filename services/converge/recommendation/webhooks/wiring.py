"""The webhooks area's object graph, built from settings: secret store ->
store -> sender -> dispatcher (started; stopped at shutdown) and service ->
`WebhookRpcs`. `app.py` calls `start_webhooks`; tests call it too, to reach
the dispatcher (`wake()` after moving their clock)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from converge.recommendation.settings import RecommendationSettings
from converge.recommendation.webhooks.dispatcher import Dispatcher, Sender
from converge.recommendation.webhooks.secrets import SecretStore
from converge.recommendation.webhooks.service import RetrySchedule, WebhookService
from converge.recommendation.webhooks.servicer import WebhookRpcs
from converge.recommendation.webhooks.store import WebhookStore
from converge.runtime.server import ServiceContext


@dataclass(frozen=True)
class WebhooksArea:
    store: WebhookStore
    dispatcher: Dispatcher
    service: WebhookService
    rpcs: WebhookRpcs


async def start_webhooks(
    context: ServiceContext, settings: RecommendationSettings, clock: Callable[[], datetime]
) -> WebhooksArea:
    secrets = SecretStore.from_setting(settings.webhook_secrets)
    store = WebhookStore(context.pool)
    sender = Sender(
        secrets,
        timeout_s=settings.webhook_timeout_s,
        max_connections=settings.webhook_max_in_flight,
    )
    dispatcher = Dispatcher(
        store,
        sender,
        schedule=RetrySchedule(
            tuple(settings.webhook_retry_schedule_s), jitter=settings.webhook_retry_jitter
        ),
        clock=clock,
        max_in_flight=settings.webhook_max_in_flight,
        poll_interval_s=settings.webhook_poll_interval_s,
        delivered_retention_s=settings.webhook_delivered_retention_days * 86400,
        dead_letter_retention_s=settings.webhook_dead_letter_retention_days * 86400,
    )
    await dispatcher.start()
    context.on_shutdown(dispatcher.close)
    service = WebhookService(
        store,
        secrets,
        sender.post,
        clock=clock,
        allow_http=settings.webhook_allow_http,
        timeout_s=settings.webhook_timeout_s,
    )
    return WebhooksArea(store, dispatcher, service, WebhookRpcs(service))

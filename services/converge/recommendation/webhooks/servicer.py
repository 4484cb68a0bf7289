"""The webhook RPCs (`WebhookRpcs` of the router): convert, call the
service, convert back."""

from __future__ import annotations

import grpc

from converge.recommendation.webhooks import convert
from converge.recommendation.webhooks.service import WebhookService
from converge.v1 import recommendation_pb2 as pb


class WebhookRpcs:
    def __init__(self, service: WebhookService) -> None:
        self.service = service

    async def create_webhook(
        self, request: pb.CreateWebhookRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateWebhookResponse:
        asked = convert.parse_create(request)
        row = await self.service.create_webhook(
            asked.team,
            asked.url,
            asked.secret_id,
            asked.kinds,
            asked.idempotency_key,
            asked.actor_name,
            asked.actor_reason,
            asked.request_sha256,
        )
        return pb.CreateWebhookResponse(webhook=convert.webhook(row))

    async def list_webhooks(
        self, request: pb.ListWebhooksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWebhooksResponse:
        asked = convert.parse_list_webhooks(request)
        rows = await self.service.list_webhooks(asked.team, asked.after, asked.limit)
        return convert.list_webhooks_response(rows, asked.limit)

    async def delete_webhook(
        self, request: pb.DeleteWebhookRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteWebhookResponse:
        asked = convert.parse_delete(request)
        dropped = await self.service.delete_webhook(
            asked.target_id, asked.idempotency_key, asked.request_sha256
        )
        return pb.DeleteWebhookResponse(dropped_deliveries=dropped)

    async def list_dead_letters(
        self, request: pb.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeadLettersResponse:
        asked = convert.parse_list_dead_letters(request)
        rows = await self.service.list_dead_letters(
            asked.team, asked.webhook_id, asked.before_seq, asked.limit
        )
        return convert.list_dead_letters_response(rows, asked.limit)

    async def redeliver_dead_letter(
        self, request: pb.RedeliverDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RedeliverDeadLetterResponse:
        asked = convert.parse_redeliver(request)
        result = await self.service.redeliver(
            asked.target_id, asked.idempotency_key, asked.request_sha256
        )
        response = pb.RedeliverDeadLetterResponse(
            delivered=result.delivered, http_status=result.http_status
        )
        if result.dead_letter is not None:
            response.dead_letter.CopyFrom(convert.dead_letter(result.dead_letter))
        return response

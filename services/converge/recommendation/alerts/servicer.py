"""The alerts RPCs, thin: convert the request (convert.py), call the area's
operations (service.py `Alerts`), convert the answer.

The caller's team, for GetAlert and the lifecycle calls whose requests name
no team, is the `converge-team` request header: with it, an alert of another
team is NOT_FOUND; without it the call is an operator's (every alert).
SubscribeAlerts answers its headers (`converge-alert-start-cursor`) once the
stream's start is fixed."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import grpc

from converge.recommendation.alerts import convert
from converge.recommendation.alerts.service import Alerts
from converge.runtime.cursors import commit_cursor
from converge.v1 import common_pb2
from converge.v1 import recommendation_pb2 as pb

TEAM_HEADER = "converge-team"
START_HEADER = "converge-alert-start-cursor"


def caller_team(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == TEAM_HEADER:
            return str(value)
    return None


class AlertRpcs:
    def __init__(self, alerts: Alerts, currency: Callable[[], str]) -> None:
        self.alerts = alerts
        # The active policy's currency, for expected values.
        self.currency = currency

    async def subscribe_alerts(
        self, request: pb.SubscribeAlertsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeAlertsResponse]:
        wanted = convert.subscription(request)
        start = await self.alerts.start_position(wanted.position)
        # Sent once the start is fixed: a client awaiting the headers knows
        # every event committed from then on reaches it (and where it starts).
        await context.send_initial_metadata(((START_HEADER, commit_cursor(*start)),))
        async for event in self.alerts.events(wanted.team, start, wanted.kinds):
            yield pb.SubscribeAlertsResponse(event=convert.event_to_pb(event, self.currency()))

    async def list_alerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertsResponse:
        query = convert.list_query(request)
        rows = await self.alerts.list_alerts(query.where, query.after, query.limit + 1)
        page, more = rows[: query.limit], len(rows) > query.limit
        currency = self.currency()
        return pb.ListAlertsResponse(
            alerts=[convert.alert_to_pb(r, currency) for r in page],
            page=common_pb2.PageResponse(
                next_page_token=convert.next_page_token(page[-1]) if more else ""
            ),
        )

    async def get_alert(
        self, request: pb.GetAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAlertResponse:
        row = await self.alerts.get(convert.alert_id(request), caller_team(context))
        return pb.GetAlertResponse(alert=convert.alert_to_pb(row, self.currency()))

    async def _change(self, change: convert.Change, context: grpc.aio.ServicerContext) -> pb.Alert:
        row = await self.alerts.change(
            change.alert_id,
            change.operation,  # type: ignore[arg-type]
            team=caller_team(context),
            idempotency_key=change.idempotency_key,
            request_sha256=change.request_sha256,
            actor_name=change.actor_name,
            actor_reason=change.actor_reason,
            assignee=change.assignee,
            note=change.note,
            dismiss_reason=change.dismiss_reason,
        )
        return convert.alert_to_pb(row, self.currency())

    async def acknowledge_alert(
        self, request: pb.AcknowledgeAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcknowledgeAlertResponse:
        return pb.AcknowledgeAlertResponse(
            alert=await self._change(convert.acknowledge(request), context)
        )

    async def assign_alert(
        self, request: pb.AssignAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.AssignAlertResponse:
        return pb.AssignAlertResponse(alert=await self._change(convert.assign(request), context))

    async def resolve_alert(
        self, request: pb.ResolveAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveAlertResponse:
        return pb.ResolveAlertResponse(alert=await self._change(convert.resolve(request), context))

    async def dismiss_alert(
        self, request: pb.DismissAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.DismissAlertResponse:
        return pb.DismissAlertResponse(alert=await self._change(convert.dismiss(request), context))

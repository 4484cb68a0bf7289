"""The recommendation service's gRPC face, a router: each RPC goes to its
area's servicer (`policy/`, `decisions/`, `outcomes/`, `alerts/`,
`webhooks/`), which converts the request (its `convert.py`), calls its
service and converts the answer back. Wiring is in `app.py`.

RecommendationService.Recommend -> decisions/servicer.py DecisionRpcs.recommend
RecommendationService.SubscribeAlerts -> alerts/servicer.py AlertRpcs.subscribe_alerts
and so on: the method is the RPC's name in snake case."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import grpc

from converge.runtime.errors import ConvergeError
from converge.runtime.fields import checked_requests
from converge.v1 import recommendation_pb2 as pb
from converge.v1 import recommendation_pb2_grpc


class NotBuiltYet(ConvergeError):
    """An area of the service not wired in this build."""

    code = grpc.StatusCode.UNIMPLEMENTED


class PolicyRpcs(Protocol):
    """What `policy/servicer.py` answers."""

    async def get_policy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPolicyResponse: ...
    async def list_policy_versions(
        self, request: pb.ListPolicyVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPolicyVersionsResponse: ...
    async def validate_policy(
        self, request: pb.ValidatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ValidatePolicyResponse: ...
    async def create_policy_version(
        self, request: pb.CreatePolicyVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePolicyVersionResponse: ...
    async def activate_policy(
        self, request: pb.ActivatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ActivatePolicyResponse: ...


class DecisionRpcs(Protocol):
    """What `decisions/servicer.py` answers."""

    async def recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse: ...
    async def get_decision(
        self, request: pb.GetDecisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDecisionResponse: ...
    async def list_decisions(
        self, request: pb.ListDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDecisionsResponse: ...


class OutcomeRpcs(Protocol):
    """What `outcomes/servicer.py` answers."""

    async def record_outcome(
        self, request: pb.RecordOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordOutcomeResponse: ...


class AlertRpcs(Protocol):
    """What `alerts/servicer.py` answers."""

    def subscribe_alerts(
        self, request: pb.SubscribeAlertsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeAlertsResponse]: ...
    async def list_alerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertsResponse: ...
    async def get_alert(
        self, request: pb.GetAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAlertResponse: ...
    async def acknowledge_alert(
        self, request: pb.AcknowledgeAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcknowledgeAlertResponse: ...
    async def assign_alert(
        self, request: pb.AssignAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.AssignAlertResponse: ...
    async def resolve_alert(
        self, request: pb.ResolveAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveAlertResponse: ...
    async def dismiss_alert(
        self, request: pb.DismissAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.DismissAlertResponse: ...


class WebhookRpcs(Protocol):
    """What `webhooks/servicer.py` answers."""

    async def create_webhook(
        self, request: pb.CreateWebhookRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateWebhookResponse: ...
    async def list_webhooks(
        self, request: pb.ListWebhooksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWebhooksResponse: ...
    async def delete_webhook(
        self, request: pb.DeleteWebhookRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteWebhookResponse: ...
    async def list_dead_letters(
        self, request: pb.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeadLettersResponse: ...
    async def redeliver_dead_letter(
        self, request: pb.RedeliverDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RedeliverDeadLetterResponse: ...


def _missing(area: str) -> NotBuiltYet:
    return NotBuiltYet(f"the {area} area of the recommendation service is not built yet")


@checked_requests
class RecommendationServicer(recommendation_pb2_grpc.RecommendationServiceServicer):
    def __init__(
        self,
        *,
        policy: PolicyRpcs | None = None,
        decisions: DecisionRpcs | None = None,
        outcomes: OutcomeRpcs | None = None,
        alerts: AlertRpcs | None = None,
        webhooks: WebhookRpcs | None = None,
    ) -> None:
        self.policy = policy
        self.decisions = decisions
        self.outcomes = outcomes
        self.alerts = alerts
        self.webhooks = webhooks

    async def GetPolicy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPolicyResponse:
        if self.policy is None:
            raise _missing("policy")
        return await self.policy.get_policy(request, context)

    async def ListPolicyVersions(
        self, request: pb.ListPolicyVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPolicyVersionsResponse:
        if self.policy is None:
            raise _missing("policy")
        return await self.policy.list_policy_versions(request, context)

    async def ValidatePolicy(
        self, request: pb.ValidatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ValidatePolicyResponse:
        if self.policy is None:
            raise _missing("policy")
        return await self.policy.validate_policy(request, context)

    async def CreatePolicyVersion(
        self, request: pb.CreatePolicyVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePolicyVersionResponse:
        if self.policy is None:
            raise _missing("policy")
        return await self.policy.create_policy_version(request, context)

    async def ActivatePolicy(
        self, request: pb.ActivatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ActivatePolicyResponse:
        if self.policy is None:
            raise _missing("policy")
        return await self.policy.activate_policy(request, context)

    async def Recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        if self.decisions is None:
            raise _missing("decisions")
        return await self.decisions.recommend(request, context)

    async def GetDecision(
        self, request: pb.GetDecisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDecisionResponse:
        if self.decisions is None:
            raise _missing("decisions")
        return await self.decisions.get_decision(request, context)

    async def ListDecisions(
        self, request: pb.ListDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDecisionsResponse:
        if self.decisions is None:
            raise _missing("decisions")
        return await self.decisions.list_decisions(request, context)

    async def RecordOutcome(
        self, request: pb.RecordOutcomeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecordOutcomeResponse:
        if self.outcomes is None:
            raise _missing("outcomes")
        return await self.outcomes.record_outcome(request, context)

    async def SubscribeAlerts(
        self, request: pb.SubscribeAlertsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SubscribeAlertsResponse]:
        if self.alerts is None:
            raise _missing("alerts")
        async for response in self.alerts.subscribe_alerts(request, context):
            yield response

    async def ListAlerts(
        self, request: pb.ListAlertsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAlertsResponse:
        if self.alerts is None:
            raise _missing("alerts")
        return await self.alerts.list_alerts(request, context)

    async def GetAlert(
        self, request: pb.GetAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetAlertResponse:
        if self.alerts is None:
            raise _missing("alerts")
        return await self.alerts.get_alert(request, context)

    async def AcknowledgeAlert(
        self, request: pb.AcknowledgeAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.AcknowledgeAlertResponse:
        if self.alerts is None:
            raise _missing("alerts")
        return await self.alerts.acknowledge_alert(request, context)

    async def AssignAlert(
        self, request: pb.AssignAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.AssignAlertResponse:
        if self.alerts is None:
            raise _missing("alerts")
        return await self.alerts.assign_alert(request, context)

    async def ResolveAlert(
        self, request: pb.ResolveAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveAlertResponse:
        if self.alerts is None:
            raise _missing("alerts")
        return await self.alerts.resolve_alert(request, context)

    async def DismissAlert(
        self, request: pb.DismissAlertRequest, context: grpc.aio.ServicerContext
    ) -> pb.DismissAlertResponse:
        if self.alerts is None:
            raise _missing("alerts")
        return await self.alerts.dismiss_alert(request, context)

    async def CreateWebhook(
        self, request: pb.CreateWebhookRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateWebhookResponse:
        if self.webhooks is None:
            raise _missing("webhooks")
        return await self.webhooks.create_webhook(request, context)

    async def ListWebhooks(
        self, request: pb.ListWebhooksRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListWebhooksResponse:
        if self.webhooks is None:
            raise _missing("webhooks")
        return await self.webhooks.list_webhooks(request, context)

    async def DeleteWebhook(
        self, request: pb.DeleteWebhookRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteWebhookResponse:
        if self.webhooks is None:
            raise _missing("webhooks")
        return await self.webhooks.delete_webhook(request, context)

    async def ListDeadLetters(
        self, request: pb.ListDeadLettersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDeadLettersResponse:
        if self.webhooks is None:
            raise _missing("webhooks")
        return await self.webhooks.list_dead_letters(request, context)

    async def RedeliverDeadLetter(
        self, request: pb.RedeliverDeadLetterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RedeliverDeadLetterResponse:
        if self.webhooks is None:
            raise _missing("webhooks")
        return await self.webhooks.redeliver_dead_letter(request, context)

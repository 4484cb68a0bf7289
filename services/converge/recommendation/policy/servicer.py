"""The policy RPCs, thin: convert the request (convert.py), call the area's
service (service.py `PolicyService`), convert the answer."""

from __future__ import annotations

import grpc

from converge.recommendation.policy import convert
from converge.recommendation.policy.service import PolicyService
from converge.v1 import common_pb2
from converge.v1 import recommendation_pb2 as pb


class PolicyRpcs:
    def __init__(self, policies: PolicyService) -> None:
        self.policies = policies

    async def get_policy(
        self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPolicyResponse:
        view = await self.policies.get(convert.get_version(request))
        return pb.GetPolicyResponse(policy=convert.version_to_pb(view))

    async def list_policy_versions(
        self, request: pb.ListPolicyVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPolicyVersionsResponse:
        query = convert.versions_query(request)
        page = await self.policies.page(query.before, query.page_size, query.omit_yaml)
        return pb.ListPolicyVersionsResponse(
            policies=[convert.version_to_pb(v) for v in page.versions],
            page=common_pb2.PageResponse(next_page_token=convert.page_token(page.next_before)),
        )

    async def validate_policy(
        self, request: pb.ValidatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ValidatePolicyResponse:
        checked = await self.policies.validate(request.yaml)
        return pb.ValidatePolicyResponse(
            valid=checked.valid, problems=[convert.problem_to_pb(p) for p in checked.problems]
        )

    async def create_policy_version(
        self, request: pb.CreatePolicyVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreatePolicyVersionResponse:
        asked = convert.create_request(request)
        view, warnings = await self.policies.create(
            asked.yaml, asked.description, asked.idempotency_key, asked.actor
        )
        return pb.CreatePolicyVersionResponse(
            policy=convert.version_to_pb(view),
            warnings=[convert.problem_to_pb(p) for p in warnings],
        )

    async def activate_policy(
        self, request: pb.ActivatePolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ActivatePolicyResponse:
        asked = convert.activate_request(request)
        result = await self.policies.activate(
            asked.version, asked.expected_active_version, asked.idempotency_key, asked.actor
        )
        return pb.ActivatePolicyResponse(
            policy=convert.version_to_pb(result.version), previous_version=result.previous_version
        )

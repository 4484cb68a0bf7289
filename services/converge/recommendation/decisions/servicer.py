"""The decisions area's RPCs (Recommend, GetDecision, ListDecisions): thin,
protobuf in and out; checks and conversions in convert.py, rules in
service.py."""

from __future__ import annotations

import grpc

from converge.recommendation.decisions import convert
from converge.recommendation.decisions.service import DecisionService
from converge.recommendation.decisions.store import DecisionStore
from converge.runtime.errors import NotFound
from converge.v1 import recommendation_pb2 as pb


class DecisionRpcs:
    def __init__(self, service: DecisionService, store: DecisionStore) -> None:
        self.service = service
        self.store = store

    async def recommend(
        self, request: pb.RecommendRequest, context: grpc.aio.ServicerContext
    ) -> pb.RecommendResponse:
        body = await self.service.recommend(convert.recommend_query(request))
        return convert.recommend_response(body)

    async def get_decision(
        self, request: pb.GetDecisionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDecisionResponse:
        decision_id = convert.decision_id(request.decision_id)
        stored = await self.store.get(decision_id)
        if stored is None:
            raise NotFound("decision", decision_id)
        return pb.GetDecisionResponse(decision=convert.stored_decision_pb(stored))

    async def list_decisions(
        self, request: pb.ListDecisionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDecisionsResponse:
        query = convert.list_query(request)
        customer_id = await self.service.resolve(query.customer, "customer")
        found = await self.store.page(
            [customer_id],
            since=query.since,
            until=query.until,
            triggers=query.triggers,
            after=query.after,
            limit=query.limit,
        )
        return convert.list_response(found, query.limit)

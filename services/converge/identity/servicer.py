"""The identity service's gRPC face: protobuf in, validation with field paths,
`service.py` for the rules, protobuf out. Nothing else lives here."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc

from converge.identity import convert
from converge.identity.domain import BulkRow
from converge.identity.service import IdentityService
from converge.identity.settings import IdentitySettings
from converge.runtime.cursors import parse_commit_cursor
from converge.runtime.errors import InvalidArgument, Violations
from converge.runtime.fields import checked_requests, parse_uuid
from converge.runtime.values import to_datetime
from converge.v1 import common_pb2, identity_pb2, identity_pb2_grpc


@checked_requests
class IdentityServicer(identity_pb2_grpc.IdentityServiceServicer):
    def __init__(self, service: IdentityService, settings: IdentitySettings) -> None:
        self.service = service
        self.settings = settings

    async def CreateCustomer(
        self, request: identity_pb2.CreateCustomerRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.CreateCustomerResponse:
        v = Violations()
        profile = convert.parse_profile(request.profile, "profile", v)
        identifiers = convert.parse_identifiers(
            request.identifiers, "identifiers", v, self.settings, required=False
        )
        actor = convert.parse_actor(request.actor, "actor", v)
        idempotency = convert.parse_idempotency(request.idempotency_key, request, v)
        v.raise_if_any()
        customer = await self.service.create_customer(profile, identifiers, actor, idempotency)
        return identity_pb2.CreateCustomerResponse(customer=convert.customer_pb(customer))

    async def GetCustomer(
        self, request: identity_pb2.GetCustomerRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.GetCustomerResponse:
        v = Violations()
        customer_id, identifier = convert.parse_customer_ref(
            request.customer, "customer", v, self.settings
        )
        v.raise_if_any()
        as_of = to_datetime(request.as_of) if request.HasField("as_of") else None
        customer = await self.service.get_customer(customer_id, identifier, as_of)
        return identity_pb2.GetCustomerResponse(customer=convert.customer_pb(customer))

    async def BatchGetCustomers(
        self, request: identity_pb2.BatchGetCustomersRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.BatchGetCustomersResponse:
        v = Violations()
        v.check(
            len(request.customer_ids) <= convert.MAX_BATCH,
            "customer_ids",
            f"at most {convert.MAX_BATCH}",
        )
        ids = [parse_uuid(c, f"customer_ids[{i}]", v) for i, c in enumerate(request.customer_ids)]
        v.raise_if_any()
        as_of = to_datetime(request.as_of) if request.HasField("as_of") else None
        found = await self.service.batch_get([i for i in ids if i], as_of)
        return convert.batch_get_response_pb(request.customer_ids, found)

    async def UpdateCustomer(
        self, request: identity_pb2.UpdateCustomerRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.UpdateCustomerResponse:
        v = Violations()
        customer_id = parse_uuid(request.customer_id, "customer_id", v)
        changes = convert.parse_profile_mask(
            request.profile, list(request.update_mask.paths), "profile", "update_mask", v
        )
        actor = convert.parse_actor(request.actor, "actor", v)
        idempotency = convert.parse_idempotency(request.idempotency_key, request, v)
        v.raise_if_any()
        assert customer_id is not None
        effective_at = convert.parse_effective_at(request)
        customer = await self.service.update_customer(
            customer_id, changes, effective_at, actor, idempotency
        )
        return identity_pb2.UpdateCustomerResponse(customer=convert.customer_pb(customer))

    async def ListCustomers(
        self, request: identity_pb2.ListCustomersRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ListCustomersResponse:
        v = Violations()
        size = convert.parse_page_size(request.page, v, "page")
        after = convert.parse_customers_after(request.page, v)
        v.raise_if_any()
        customers, last = await self.service.list_customers(
            after,
            size,
            segment=request.segment,
            plan=request.plan,
            region=request.region,
            owner_team=request.owner_team,
            name_prefix=request.name_prefix,
        )
        return identity_pb2.ListCustomersResponse(
            customers=[convert.customer_pb(c) for c in customers],
            page=common_pb2.PageResponse(next_page_token=convert.encode_page_token(last)),
        )

    async def ListProfileChanges(
        self, request: identity_pb2.ListProfileChangesRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ListProfileChangesResponse:
        v = Violations()
        customer_id = parse_uuid(request.customer_id, "customer_id", v)
        size = convert.parse_page_size(request.page, v, "page")
        after_change = convert.parse_change_token(request.page, v)
        v.raise_if_any()
        assert customer_id is not None
        start, end = convert.parse_effective_range(request.effective)
        changes, last = await self.service.list_profile_changes(
            customer_id, start, end, after_change, size
        )
        return identity_pb2.ListProfileChangesResponse(
            changes=[convert.change_pb(c) for c in changes],
            page=common_pb2.PageResponse(next_page_token=convert.encode_change_token(last)),
        )

    async def Resolve(
        self, request: identity_pb2.ResolveRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ResolveResponse:
        v = Violations()
        identifiers, profile, actor, idempotency = convert.parse_resolve(
            request, "", v, self.settings
        )
        v.raise_if_any()
        result = await self.service.resolve(
            identifiers,
            profile,
            lookup_only=request.lookup_only,
            actor=actor,
            idempotency=idempotency,
        )
        return convert.resolve_response_pb(result, identifiers)

    async def BulkResolve(
        self,
        request_iterator: AsyncIterator[identity_pb2.BulkResolveRequest],
        context: grpc.aio.ServicerContext,
    ) -> identity_pb2.BulkResolveResponse:
        async def rows() -> AsyncIterator[tuple[str, BulkRow | InvalidArgument]]:
            received = 0
            async for message in request_iterator:
                for item, nested in convert.bulk_rows(message):
                    received += 1
                    yield convert.parse_bulk_row(item, received, self.settings, nested=nested)

        summary = await self.service.bulk_resolve(rows())
        return convert.bulk_resolve_response_pb(summary)

    async def BatchResolve(
        self, request: identity_pb2.BatchResolveRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.BatchResolveResponse:
        results, rows = convert.parse_batch_resolve(request, self.settings)
        resolved = await self.service.batch_resolve([row for _, row in rows])
        return convert.batch_resolve_response_pb(results, rows, resolved)

    async def RemoveIdentifier(
        self, request: identity_pb2.RemoveIdentifierRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.RemoveIdentifierResponse:
        v = Violations()
        identifier = convert.parse_identifier(request.identifier, "identifier", v, self.settings)
        actor = convert.parse_actor(request.actor, "actor", v)
        v.raise_if_any()
        assert identifier is not None
        customer = await self.service.remove_identifier(identifier, actor)
        return identity_pb2.RemoveIdentifierResponse(customer=convert.customer_pb(customer))

    async def MergeCustomers(
        self, request: identity_pb2.MergeCustomersRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.MergeCustomersResponse:
        v = Violations()
        surviving = parse_uuid(request.surviving_customer_id, "surviving_customer_id", v)
        merged = parse_uuid(request.merged_customer_id, "merged_customer_id", v)
        actor = convert.parse_actor(request.actor, "actor", v)
        idempotency = convert.parse_idempotency(request.idempotency_key, request, v)
        v.raise_if_any()
        assert surviving is not None and merged is not None
        merge, customer = await self.service.merge_customers(surviving, merged, actor, idempotency)
        return identity_pb2.MergeCustomersResponse(
            merge=convert.merge_pb(merge), customer=convert.customer_pb(customer)
        )

    async def UnmergeCustomers(
        self, request: identity_pb2.UnmergeCustomersRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.UnmergeCustomersResponse:
        v = Violations()
        merge_id = parse_uuid(request.merge_id, "merge_id", v)
        actor = convert.parse_actor(request.actor, "actor", v)
        v.raise_if_any()
        assert merge_id is not None
        merge, survivor, restored = await self.service.unmerge(merge_id, actor)
        return identity_pb2.UnmergeCustomersResponse(
            merge=convert.merge_pb(merge),
            surviving_customer=convert.customer_pb(survivor),
            restored_customer=convert.customer_pb(restored),
        )

    async def ListMerges(
        self, request: identity_pb2.ListMergesRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ListMergesResponse:
        v = Violations()
        customer_id = parse_uuid(request.customer_id, "customer_id", v)
        v.raise_if_any()
        assert customer_id is not None
        merges = await self.service.list_merges(customer_id, request.include_undone)
        return identity_pb2.ListMergesResponse(merges=[convert.merge_pb(m) for m in merges])

    async def GetContactPreferences(
        self, request: identity_pb2.GetContactPreferencesRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.GetContactPreferencesResponse:
        v = Violations()
        customer_id, identifier = convert.parse_customer_ref(
            request.customer, "customer", v, self.settings
        )
        v.raise_if_any()
        customer = convert.customer_pb(await self.service.get_customer(customer_id, identifier))
        return identity_pb2.GetContactPreferencesResponse(
            customer_id=customer.customer_id, contact_preferences=customer.contact_preferences
        )

    async def UpdateContactPreferences(
        self,
        request: identity_pb2.UpdateContactPreferencesRequest,
        context: grpc.aio.ServicerContext,
    ) -> identity_pb2.UpdateContactPreferencesResponse:
        v = Violations()
        customer_id, identifier = convert.parse_customer_ref(
            request.customer, "customer", v, self.settings
        )
        update = convert.parse_preference_update(request, v)
        actor = convert.parse_actor(request.actor, "actor", v)
        idempotency = convert.parse_idempotency(request.idempotency_key, request, v)
        v.raise_if_any()
        customer = convert.customer_pb(
            await self.service.update_preferences(
                customer_id, identifier, update, actor, idempotency
            )
        )
        return identity_pb2.UpdateContactPreferencesResponse(
            customer_id=customer.customer_id, contact_preferences=customer.contact_preferences
        )

    async def ForgetCustomer(
        self, request: identity_pb2.ForgetCustomerRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ForgetCustomerResponse:
        v = Violations()
        customer_id, identifier = convert.parse_customer_ref(
            request.customer, "customer", v, self.settings
        )
        actor = convert.parse_actor(request.actor, "actor", v)
        v.check(bool(actor.name), "actor.name", "required: who asked for the erasure")
        idempotency = convert.parse_idempotency(request.idempotency_key, request, v)
        v.raise_if_any()
        erasure_id, outcomes, complete, erased_at = await self.service.forget(
            customer_id, identifier, actor, idempotency
        )
        return convert.forget_response_pb(erasure_id, outcomes, complete, erased_at)

    async def ExportCustomer(
        self, request: identity_pb2.ExportCustomerRequest, context: grpc.aio.ServicerContext
    ) -> identity_pb2.ExportCustomerResponse:
        v = Violations()
        customer_id, identifier = convert.parse_customer_ref(
            request.customer, "customer", v, self.settings
        )
        position = convert.parse_export_token(request.page_token, v)
        v.raise_if_any()
        page = await self.service.export(customer_id, identifier, position)
        return convert.export_response_pb(page)

    async def StreamIdentityEvents(
        self, request: identity_pb2.StreamIdentityEventsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[identity_pb2.StreamIdentityEventsResponse]:
        v = Violations()
        cursor = parse_commit_cursor(request.from_cursor, "from_cursor", v)
        v.raise_if_any()
        async with contextlib.aclosing(self.service.events(cursor, request.follow)) as events:
            async for event in events:
                yield convert.event_pb(event)

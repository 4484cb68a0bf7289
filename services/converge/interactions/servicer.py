"""The interactions service's gRPC face: protobuf in, shape checks with field
paths, `service.py` for the rules, protobuf out."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from importlib.resources import files
from typing import Any

import asyncpg
import grpc
from google.protobuf import struct_pb2

from converge.interactions import features as feature_engine
from converge.interactions.change_feed import ChangeFeed, type_filter
from converge.interactions.convert import (
    _ATTRIBUTE_TYPES,
    _FIELD_NAMES,
    DEFAULT_PAGE,
    MAX_BATCH,
    MAX_PAGE,
    MAX_PIT_QUERIES,
    MAX_ROWS_PER_MESSAGE,
    BoundedPage,
    customer_ref,
    definition_pb,
    export_record_pb,
    export_token,
    fast_draft,
    feature_vector_pb,
    interaction_pb,
    parse_export_token,
    parse_timeline_token,
    to_draft,
    type_pb,
    uuid_field,
)
from converge.interactions.identity_link import IdentityLink
from converge.interactions.service import (
    STORED_IN_BULK,
    Draft,
    InteractionsService,
    PreparedIngest,
    all_types,
)
from converge.interactions.settings import InteractionsSettings
from converge.interactions.store import InteractionsStore
from converge.interactions.types import (
    AttributeSpec,
    InteractionTypeSpec,
    validate_type_spec,
)
from converge.runtime.cursors import commit_cursor, parse_commit_cursor
from converge.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    Violations,
)
from converge.runtime.fields import (
    check_message,
    checked_requests,
    time_problem,
)
from converge.runtime.server import ServiceContext, ServiceSpec
from converge.runtime.values import (
    timestamp,
    to_datetime,
)
from converge.v1 import (
    common_pb2,
    interactions_pb2,
    interactions_pb2_grpc,
    privacy_pb2,
    privacy_pb2_grpc,
)

MAX_LISTED_REJECTIONS = 1000
# Batches a stream may have read and prepared while earlier ones commit.
INGEST_BATCHES_AHEAD = 2
FEATURE_WINDOW_DAYS = 90


@checked_requests
class InteractionsServicer(interactions_pb2_grpc.InteractionsServiceServicer):
    def __init__(
        self,
        service: InteractionsService,
        settings: InteractionsSettings,
        changes: ChangeFeed | None = None,
    ) -> None:
        self.service = service
        self.settings = settings
        self.changes = changes or ChangeFeed(service.store, settings.stream_fallback_poll_s)

    async def RecordInteraction(
        self, request: interactions_pb2.RecordInteractionRequest, context: grpc.aio.ServicerContext
    ) -> interactions_pb2.RecordInteractionResponse:
        v = Violations()
        draft = to_draft(
            request.interaction,
            request.idempotency_key,
            request.lookup_only,
            "",
            "interaction",
            "idempotency_key",
            v,
        )
        v.raise_if_any()
        assert draft is not None
        summary = await self.service.ingest([draft], validate_only=request.validate_only)
        result = summary.results[0]
        if result.outcome == "rejected":
            if result.field == "interaction.customer":  # (unknown, erased, or not resolved)
                raise NotFound("customer", result.reason)
            raise InvalidArgument([FieldViolation(result.field, result.reason)])
        return interactions_pb2.RecordInteractionResponse(
            interaction=interaction_pb(result.as_row()), duplicate=result.outcome == "duplicate"
        )

    async def IngestInteractions(
        self,
        request_iterator: AsyncIterator[interactions_pb2.IngestInteractionsRequest],
        context: grpc.aio.ServicerContext,
    ) -> interactions_pb2.IngestInteractionsResponse:
        response = interactions_pb2.IngestInteractionsResponse()
        batch: list[Draft] = []

        def reject(row_ref: str, key: str, field: str, reason: str) -> None:
            response.rejected += 1
            if len(response.rejections) < MAX_LISTED_REJECTIONS:
                response.rejections.append(
                    interactions_pb2.IngestRejection(
                        row_ref=row_ref, idempotency_key=key, field=field, reason=reason
                    )
                )

        async def store(drafts: list[Draft], prepared: PreparedIngest) -> None:
            await self.service.commit(prepared, stored_rows=False)
            summary = prepared.summary
            response.customers_created += summary.customers_created
            results = summary.results
            if results.count(STORED_IN_BULK) == len(results):  # (by identity: C speed)
                response.stored += len(results)
                return
            for draft, result in zip(drafts, results, strict=True):
                if result.outcome == "stored":
                    response.stored += 1
                elif result.outcome == "duplicate":
                    response.duplicates += 1
                else:
                    reject(draft.row_ref, draft.idempotency_key, result.field, result.reason)

        # Batches are read, checked and resolved while those before them are
        # committed (Python's work overlaps the database's): a committer takes
        # them from a short queue one after the other, in the order they came.
        queue: asyncio.Queue[tuple[list[Draft], PreparedIngest] | None] = asyncio.Queue(
            maxsize=INGEST_BATCHES_AHEAD
        )

        async def commit_in_order() -> None:
            while (item := await queue.get()) is not None:
                await store(*item)

        committer = asyncio.create_task(commit_in_order())

        async def hand_over(item: tuple[list[Draft], PreparedIngest] | None) -> None:
            putting = asyncio.ensure_future(queue.put(item))
            await asyncio.wait({putting, committer}, return_when=asyncio.FIRST_COMPLETED)
            if not putting.done():  # the committer failed: its error ends the stream
                putting.cancel()
                committer.result()

        async def flush() -> None:
            drafts = list(batch)
            batch.clear()
            await hand_over((drafts, await self.service.prepare(drafts)))

        received = 0  # (a local: a protobuf field costs a C call per access)
        try:
            async for message in request_iterator:
                if len(message.rows) > MAX_ROWS_PER_MESSAGE:
                    raise InvalidArgument(
                        [FieldViolation("rows", f"at most {MAX_ROWS_PER_MESSAGE} per message")]
                    )
                items: list[
                    interactions_pb2.IngestInteractionsRequest | interactions_pb2.IngestRow
                ] = [*([message] if message.HasField("interaction") else []), *message.rows]
                for item in items:
                    received += 1
                    row_ref = item.row_ref or str(received)
                    fast = fast_draft(
                        item.interaction, item.idempotency_key, item.lookup_only, row_ref
                    )
                    if fast is not None:
                        batch.append(fast)
                        continue
                    v = Violations()
                    draft = to_draft(
                        item.interaction,
                        item.idempotency_key,
                        item.lookup_only,
                        row_ref,
                        "interaction",
                        "idempotency_key",
                        v,
                    )
                    if draft is None:
                        found = v.found[0]
                        reject(row_ref, item.idempotency_key, found.field, found.description)
                        continue
                    batch.append(draft)
                if len(batch) >= self.settings.ingest_batch_size:
                    await flush()
            response.received = received
            if batch:
                await flush()
            await hand_over(None)
            await committer
        finally:
            if not committer.done():
                committer.cancel()
        return response

    async def GetInteraction(
        self, request: interactions_pb2.GetInteractionRequest, context: grpc.aio.ServicerContext
    ) -> interactions_pb2.GetInteractionResponse:
        v = Violations()
        interaction_id = uuid_field(request.interaction_id, "interaction_id", v)
        v.raise_if_any()
        assert interaction_id is not None
        row = await self.service.get_interaction(interaction_id)
        return interactions_pb2.GetInteractionResponse(interaction=interaction_pb(row))

    async def ListInteractions(
        self, request: interactions_pb2.ListInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> interactions_pb2.ListInteractionsResponse:
        v = Violations()
        customer_id, identifier = customer_ref(request.customer, "customer", v)
        v.check(request.page.page_size >= 0, "page.page_size", "must not be negative")
        for i, channel in enumerate(request.channels):
            v.check(
                channel in common_pb2.Channel.values() and channel != 0,
                f"channels[{i}]",
                "unknown channel",
            )
        before = parse_timeline_token(request.page.page_token, "page.page_token", v)
        v.raise_if_any()
        root = await self.service.customer_id_of(customer_id, identifier)
        size = min(request.page.page_size or DEFAULT_PAGE, MAX_PAGE)
        occurred = request.occurred
        rows = await self.service.timeline(
            root,
            list(request.types),
            list(request.channels),
            to_datetime(occurred.start) if occurred.HasField("start") else None,
            to_datetime(occurred.end) if occurred.HasField("end") else None,
            request.ticket_id,
            before,
            size + 1,
        )
        page: BoundedPage[interactions_pb2.Interaction] = BoundedPage(self.settings.max_page_bytes)
        for row in rows[:size]:
            if not page.add(interaction_pb(row)):
                break
        sent = len(page.messages)
        token = ""
        if len(rows) > sent:
            # The last row sent, whether the page ended at its row count or
            # at its byte bound: the next page starts just after it.
            last = rows[sent - 1]
            token = f"{last['occurred_at'].isoformat()}/{last['seq']}"
        return interactions_pb2.ListInteractionsResponse(
            customer_id=str(root),
            interactions=page.messages,
            page=common_pb2.PageResponse(next_page_token=token),
        )

    async def StreamInteractions(
        self, request: interactions_pb2.StreamInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[interactions_pb2.StreamInteractionsResponse]:
        v = Violations()
        cursor = parse_commit_cursor(request.from_cursor, "from_cursor", v)
        v.raise_if_any()
        rows = self.changes.rows_after(cursor, type_filter(request.types), request.follow)
        async for position, row in rows:
            yield interactions_pb2.StreamInteractionsResponse(
                cursor=commit_cursor(*position), interaction=interaction_pb(row)
            )

    async def RegisterInteractionType(
        self,
        request: interactions_pb2.RegisterInteractionTypeRequest,
        context: grpc.aio.ServicerContext,
    ) -> interactions_pb2.RegisterInteractionTypeResponse:
        v = Violations()
        given = request.interaction_type
        for i, a in enumerate(given.attributes):
            v.check(
                a.type in _ATTRIBUTE_TYPES,
                f"interaction_type.attributes[{i}].type",
                "set a known attribute type",
            )
        for i, f in enumerate(given.required_fields):
            v.check(f in _FIELD_NAMES, f"interaction_type.required_fields[{i}]", "unknown field")
        v.raise_if_any()
        spec = InteractionTypeSpec(
            name=given.name,
            description=given.description,
            attributes=tuple(
                AttributeSpec(
                    name=a.name,
                    type=_ATTRIBUTE_TYPES[a.type],
                    required=a.required,
                    description=a.description,
                    allowed_values=tuple(a.allowed_values),
                    min_value=a.min_value if a.HasField("min_value") else None,
                    max_value=a.max_value if a.HasField("max_value") else None,
                    unit=a.unit,
                )
                for a in given.attributes
            ),
            required_fields=frozenset(_FIELD_NAMES[f] for f in given.required_fields),
            built_in=False,
        )
        for field_path, problem in validate_type_spec(spec):
            v.add(f"interaction_type.{field_path}", problem)
        v.raise_if_any()
        registered, row, created = await self.service.register_type(spec)
        return interactions_pb2.RegisterInteractionTypeResponse(
            interaction_type=type_pb(registered, row), created=created
        )

    async def ListInteractionTypes(
        self,
        request: interactions_pb2.ListInteractionTypesRequest,
        context: grpc.aio.ServicerContext,
    ) -> interactions_pb2.ListInteractionTypesResponse:
        await self.service.load_types()
        custom = self.service.custom_types
        specs = (
            [s for s, _ in custom.values()]
            if request.custom_only
            else all_types(s for s, _ in custom.values())
        )
        return interactions_pb2.ListInteractionTypesResponse(
            interaction_types=[
                type_pb(s, custom[s.name][1] if s.name in custom else None) for s in specs
            ]
        )

    def _check_version(self, version: str, path: str) -> None:
        if version and version != feature_engine.FEATURE_SET_VERSION:
            raise FailedPrecondition(
                f"feature set {version!r} is not served; this service serves "
                f"{feature_engine.FEATURE_SET_VERSION!r}",
                [("FEATURE_SET_NOT_SERVED", path, "not served")],
            )

    def _feature_names(self, names: Any, v: Violations) -> set[str]:
        known = {d.name for d in feature_engine.REGISTRY}
        for i, name in enumerate(names):
            v.check(name in known, f"feature_names[{i}]", f"unknown feature {name[:80]!r}")
        return set(names)

    async def ListFeatureDefinitions(
        self,
        request: interactions_pb2.ListFeatureDefinitionsRequest,
        context: grpc.aio.ServicerContext,
    ) -> interactions_pb2.ListFeatureDefinitionsResponse:
        self._check_version(request.feature_set_version, "feature_set_version")
        entity = {1: "customer", 2: "ticket"}.get(request.entity)
        return interactions_pb2.ListFeatureDefinitionsResponse(
            feature_set_version=feature_engine.FEATURE_SET_VERSION,
            definitions=[
                definition_pb(d) for d in feature_engine.REGISTRY if entity in (None, d.entity)
            ],
            served_versions=[feature_engine.FEATURE_SET_VERSION],
        )

    async def GetFeatures(
        self, request: interactions_pb2.GetFeaturesRequest, context: grpc.aio.ServicerContext
    ) -> interactions_pb2.GetFeaturesResponse:
        v = Violations()
        v.check(len(request.customers) <= MAX_BATCH, "customers", f"at most {MAX_BATCH}")
        v.check(len(request.ticket_ids) <= MAX_BATCH, "ticket_ids", f"at most {MAX_BATCH}")
        refs = [customer_ref(c, f"customers[{i}]", v) for i, c in enumerate(request.customers)]
        names = self._feature_names(request.feature_names, v)
        v.raise_if_any()
        self._check_version(request.feature_set_version, "feature_set_version")
        resolved = await self.service.roots_of_refs(refs)
        found = [root is not None for root in resolved]
        roots = [root or uuid.UUID(int=0) for root in resolved]
        as_of, customers, tickets = await self.service.live_features(
            roots, list(request.ticket_ids), request.include_open_tickets
        )
        return interactions_pb2.GetFeaturesResponse(
            customers=[
                # Not found: no customer id (never the nil UUID) and `found` false.
                feature_vector_pb(root, values, as_of, names)
                if ok
                else feature_vector_pb(None, None, as_of, names)
                for root, values, ok in zip(roots, customers, found, strict=True)
            ],
            tickets=[
                feature_vector_pb(owner, values, as_of, names, ticket_id)
                for owner, ticket_id, values in tickets
            ],
            feature_set_version=feature_engine.FEATURE_SET_VERSION,
        )

    async def GetPointInTimeFeatures(
        self,
        request_iterator: AsyncIterator[interactions_pb2.GetPointInTimeFeaturesRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[interactions_pb2.GetPointInTimeFeaturesResponse]:
        async for request in request_iterator:
            v = Violations()
            check_message(request, v)
            v.check(
                len(request.queries) <= MAX_PIT_QUERIES,
                "queries",
                f"at most {MAX_PIT_QUERIES} per message",
            )
            queries = []
            for i, query in enumerate(request.queries):
                customer_id = uuid_field(query.customer_id, f"queries[{i}].customer_id", v)
                v.check(query.HasField("as_of"), f"queries[{i}].as_of", "required")
                if (
                    customer_id is not None
                    and query.HasField("as_of")
                    and time_problem(query.as_of) is None
                ):
                    queries.append((customer_id, to_datetime(query.as_of), query.ticket_id))
            names = self._feature_names(request.feature_names, v)
            v.raise_if_any()
            self._check_version(request.feature_set_version, "feature_set_version")
            computed = await self.service.point_in_time(queries, request.as_recorded)
            response = interactions_pb2.GetPointInTimeFeaturesResponse(
                feature_set_version=feature_engine.FEATURE_SET_VERSION
            )
            for query, (customer_id, as_of, ticket_id), (customer, ticket) in zip(
                request.queries, queries, computed, strict=True
            ):
                result = response.results.add(row_ref=query.row_ref)
                result.customer.CopyFrom(feature_vector_pb(customer_id, customer, as_of, names))
                if ticket_id:
                    result.ticket.CopyFrom(
                        feature_vector_pb(customer_id, ticket, as_of, names, ticket_id)
                    )
            yield response

    async def PurgeInteractions(
        self, request: interactions_pb2.PurgeInteractionsRequest, context: grpc.aio.ServicerContext
    ) -> interactions_pb2.PurgeInteractionsResponse:
        v = Violations()
        v.check(request.HasField("older_than"), "older_than", "required")
        v.check(bool(request.actor.name), "actor.name", "required: who asked for the purge")
        v.raise_if_any()
        older_than = to_datetime(request.older_than)
        if (
            older_than > datetime.now(UTC) - timedelta(days=FEATURE_WINDOW_DAYS)
            and not request.allow_feature_loss
        ):
            raise FailedPrecondition(
                f"the horizon is within the {FEATURE_WINDOW_DAYS}-day feature window; "
                "set allow_feature_loss to purge anyway",
                [("FEATURE_WINDOW", "older_than", "within the feature window")],
            )
        store = self.service.store
        if request.dry_run:
            purged = await store.count_purgeable(older_than, list(request.types))
        else:
            purged = await store.purge(
                older_than, list(request.types), batch=self.settings.purge_batch_size
            )
        return interactions_pb2.PurgeInteractionsResponse(
            purged=sum(purged.values()), purged_by_type=purged, older_than=request.older_than
        )

    async def GetIdentitySyncStatus(
        self,
        request: interactions_pb2.GetIdentitySyncStatusRequest,
        context: grpc.aio.ServicerContext,
    ) -> interactions_pb2.GetIdentitySyncStatusResponse:
        status = await self.service.store.sync_status()
        response = interactions_pb2.GetIdentitySyncStatusResponse(
            connected=self.service.identity.connected
        )
        if status is not None:
            response.cursor = status["cursor"]
            response.applied_at.CopyFrom(timestamp(status["applied_at"]))
            if status["last_event_at"] is not None:
                response.last_event_at.CopyFrom(timestamp(status["last_event_at"]))
        return response


@checked_requests
class InteractionsDataSubjects(privacy_pb2_grpc.DataSubjectServiceServicer):
    """Erasure and export of what this service holds on a customer."""

    def __init__(self, store: InteractionsStore, max_page_bytes: int) -> None:
        self.store = store
        self.max_page_bytes = max_page_bytes

    def _ids(self, values: Any, v: Violations) -> list[uuid.UUID]:
        ids = [uuid_field(c, f"customer_ids[{i}]", v) for i, c in enumerate(values)]
        v.check(bool(values), "customer_ids", "at least one customer id")
        return [i for i in ids if i is not None]

    async def EraseCustomerData(
        self, request: privacy_pb2.EraseCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.EraseCustomerDataResponse:
        v = Violations()
        customer_ids = self._ids(request.customer_ids, v)
        v.raise_if_any()
        erased = await self.store.erase(customer_ids)
        return privacy_pb2.EraseCustomerDataResponse(service="interactions", erased_counts=erased)

    async def ExportCustomerData(
        self, request: privacy_pb2.ExportCustomerDataRequest, context: grpc.aio.ServicerContext
    ) -> privacy_pb2.ExportCustomerDataResponse:
        v = Violations()
        customer_ids = self._ids(request.customer_ids, v)
        after = parse_export_token(request.page_token)
        v.check(after is not None, "page_token", "not a token this service issued")
        v.raise_if_any()
        assert after is not None
        page: BoundedPage[struct_pb2.Struct] = BoundedPage(self.max_page_bytes)
        token = ""
        async for row in self.store.export(customer_ids, after):
            if not page.add(export_record_pb(row)):
                # Rows go by seq: the next page starts after the last one sent.
                token = export_token(after)
                break
            after = row["seq"]
        return privacy_pb2.ExportCustomerDataResponse(
            service="interactions",
            sections=[privacy_pb2.ExportedRecords(kind="interactions", records=page.messages)],
            exported_at=timestamp(datetime.now(UTC)),
            next_page_token=token,
        )


async def register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
    settings = context.settings
    assert isinstance(settings, InteractionsSettings)
    store = InteractionsStore(context.pool, settings.state_cache_size)
    identity = IdentityLink(settings.identity_address, settings.identity_timeout_s, store)
    service = InteractionsService(store, identity, settings)
    changes = ChangeFeed(store, settings.stream_fallback_poll_s)
    context.on_shutdown(changes.close)
    await service.load_types()
    interactions_pb2_grpc.add_InteractionsServiceServicer_to_server(
        InteractionsServicer(service, settings, changes), server
    )
    privacy_pb2_grpc.add_DataSubjectServiceServicer_to_server(
        InteractionsDataSubjects(store, settings.max_page_bytes), server
    )
    store.erasure_hooks.append(identity.forget_customers)
    identity.start_following(store.erase)
    context.add_health_check("identity follower", lambda: identity.healthy)
    context.on_shutdown(identity.close)
    return [
        interactions_pb2.DESCRIPTOR.services_by_name["InteractionsService"].full_name,
        privacy_pb2.DESCRIPTOR.services_by_name["DataSubjectService"].full_name,
    ]


SPEC = ServiceSpec(
    name="interactions", migrations=files("converge.interactions") / "migrations", register=register
)

__all__ = ["SPEC", "InteractionsServicer", "asyncpg", "interaction_pb"]

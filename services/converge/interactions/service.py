"""The interactions service's rules: validation against the type registry,
identity resolution, ingest that keeps live features current (a bulk stream's
pipelining included), the timeline and the change stream, live and
point-in-time features, purges and erasure. Plain Python types in and out: no
gRPC and no asyncpg here (the store hands out dataclasses)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import reduce
from typing import Any, Literal

import prometheus_client
import uuid_utils

from converge.features.engine import (
    BUILTIN,
    CustomerState,
    DayReading,
    Event,
    FeatureSet,
    FeatureValues,
    StateVersionError,
    StoredState,
    TicketReading,
)
from converge.interactions.change_feed import ChangeFeed, Position, type_filter
from converge.interactions.identity_link import IdentifierRef, IdentityLink
from converge.interactions.settings import InteractionsSettings
from converge.interactions.store import (
    EventsOf,
    InteractionsStore,
    LiveRead,
    StoredAs,
    StoredInteraction,
    StoredType,
    SyncStatus,
)
from converge.interactions.types import (
    BUILT_IN_TYPES,
    AttributeSpec,
    InteractionTypeSpec,
    check_compatible_change,
    validate_custom_type_name,
    validate_interaction,
)
from converge.runtime.errors import (
    ConvergeError,
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
)
from converge.runtime.values import from_tagged, to_tagged

logger = logging.getLogger(__name__)

_NO_OWNER = uuid.UUID(int=0)
# The background rebuild yields to the event loop after this many customers'
# states, so ingest and reads answer while it folds.
REBUILD_YIELD_EVERY = 20
STATES_REBUILT = prometheus_client.Counter(
    "converge_interactions_states_rebuilt_total",
    "Live feature states rebuilt in the background because the feature set changed.",
)
# Rejections an ingest stream lists row by row; beyond, they are only counted.
MAX_LISTED_REJECTIONS = 1000
# Batches a stream may have read and prepared while earlier ones commit.
INGEST_BATCHES_AHEAD = 2
# A purge within it changes live features, and needs allow_feature_loss.
FEATURE_WINDOW_DAYS = 90


@dataclass(slots=True)
class Draft(Event):
    """An interaction as a source sent it, checked for shape by the servicer.
    It is also the feature engine's view of the interaction (an Event), so
    ingest folds it as it is, and the store's (a NewInteraction) once its
    owner is known. One object per row, from the stream to the COPY: the bulk
    path makes one for every event ingested.

    The fields have defaults (dataclass order rules) but are always given; the
    bulk path passes them by position, which costs a third of keywords."""

    row_ref: str = ""
    customer_id: uuid.UUID | None = None  # as sent (None: by identifier)
    identifier: IdentifierRef | None = None
    currency: str = ""
    source: str = ""
    idempotency_key: str = ""
    lookup_only: bool = False
    owner: uuid.UUID = _NO_OWNER  # the customer it belongs to, once resolved

    def record(self) -> tuple[Any, ...]:
        """The row in the store's `COLUMNS` order, under a new interaction id.

        Ids are UUIDv7 (RFC 9562: milliseconds since the epoch, then random
        bits), made here rather than by the column's gen_random_uuid(): new ids
        land at the right edge of the id index instead of on a random page,
        and PostgreSQL built without OpenSSL reads /dev/urandom once per
        gen_random_uuid(). Measured on COPY into this table: about 9 µs less
        database CPU per row. uuid_utils makes one in about 0.2 µs.
        """
        return (
            uuid_utils.uuid7(),
            self.owner,
            self.occurred_at,
            self.channel,
            self.type,
            self.stored_attributes(),
            self.ticket_id,
            self.product_id,
            self.amount,
            self.currency,
            self.sentiment,
            self.source,
            self.idempotency_key,
            self.stored_identifier(),
        )

    def stored_attributes(self) -> dict[str, Any]:
        return {name: to_tagged(value) for name, value in self.attributes.items()}

    def stored_identifier(self) -> dict[str, Any] | None:
        ref = self.identifier
        return None if ref is None else {"type": ref.type, "value": ref.value, "source": ref.source}


Outcome = Literal["stored", "duplicate", "rejected"]


@dataclass
class IngestResult:
    """Per draft: what happened, the stored row, or why it was refused."""

    outcome: Outcome
    row: StoredInteraction | None = None  # a duplicate's first copy
    new: Draft | None = None  # a row stored now...
    stored: StoredAs | None = None  # ...its seq, recorded_at
    field: str = ""
    reason: str = ""

    def as_row(self) -> StoredInteraction:
        """The row as stored; built only when a caller wants it back."""
        if self.row is not None:
            return self.row
        assert self.new is not None
        return _as_record(self.new, self.stored)


@dataclass
class IngestSummary:
    results: list[IngestResult] = field(default_factory=list)
    customers_created: int = 0


# Rows checked or folded between yields to the event loop: a stream's batches
# are checked and folded while others commit, and a long stretch of Python
# would hold a commit's next step back (see InteractionsStore.ingest).
SLICE = 500

# Stands in a summary's results until a draft's outcome is known (never changed).
_PENDING = IngestResult("rejected", reason="not stored")
# The result of each row a bulk stream stored: it only counts them (never changed).
STORED_IN_BULK = IngestResult("stored")


@dataclass
class PreparedIngest:
    """Drafts checked and resolved: the results so far, and the rows to store
    with the index of the draft each came from."""

    summary: IngestSummary
    rows: list[tuple[int, Draft]]


def event_of(row: StoredInteraction) -> Event:
    """The feature engine's view of a stored interaction."""
    return Event(
        occurred_at=row.occurred_at,
        type=row.type,
        channel=row.channel,
        attributes={k: from_tagged(v) for k, v in row.attributes.items()},
        ticket_id=row.ticket_id,
        product_id=row.product_id,
        amount=row.amount,  # (a Decimal: folded exactly, as the draft's was)
        sentiment=row.sentiment,
    )


def spec_to_json(spec: InteractionTypeSpec) -> dict[str, Any]:
    data = dataclasses.asdict(spec)
    data["required_fields"] = sorted(spec.required_fields)
    return data


def spec_from_json(data: dict[str, Any]) -> InteractionTypeSpec:
    return InteractionTypeSpec(
        name=data["name"],
        description=data["description"],
        attributes=tuple(
            AttributeSpec(**{**a, "allowed_values": tuple(a["allowed_values"])})
            for a in data["attributes"]
        ),
        required_fields=frozenset(data["required_fields"]),
        built_in=False,
    )


@dataclass(frozen=True, slots=True)
class Rejection:
    """A row of an ingest stream that was not stored, and why."""

    row_ref: str
    idempotency_key: str
    field: str
    reason: str


@dataclass
class IngestStreamSummary:
    """What an ingest stream did with its rows (the first
    MAX_LISTED_REJECTIONS rejections listed, all counted)."""

    received: int = 0
    stored: int = 0
    duplicates: int = 0
    rejected: int = 0
    customers_created: int = 0
    rejections: list[Rejection] = field(default_factory=list)


class IngestStream:
    """One bulk ingest stream: rows are added as they are read; batches of
    `ingest_batch_size` are checked and resolved while those before them are
    committed (Python's work overlaps the database's): a committer takes them
    from a short queue one after the other, in the order they came.

    Use it as `async with service.ingest_stream() as stream`: leaving the
    block before `finish` (the stream failed or was cancelled) cancels the
    committer, so only acknowledged batches are kept (see IngestInteractions
    in interactions.proto)."""

    def __init__(self, service: InteractionsService) -> None:
        self._service = service
        self._batch_size = service.settings.ingest_batch_size
        self._batch: list[Draft] = []
        # Per row: the list's own append, no method of ours in between.
        self.add: Callable[[Draft], None] = self._batch.append
        self.summary = IngestStreamSummary()
        self._queue: asyncio.Queue[tuple[list[Draft], PreparedIngest] | None] = asyncio.Queue(
            maxsize=INGEST_BATCHES_AHEAD
        )
        self._committer: asyncio.Task[None] | None = None

    async def __aenter__(self) -> IngestStream:
        self._committer = asyncio.create_task(self._commit_in_order())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._committer is not None and not self._committer.done():
            self._committer.cancel()

    def reject(self, row_ref: str, key: str, field: str, reason: str) -> None:
        summary = self.summary
        summary.rejected += 1
        if len(summary.rejections) < MAX_LISTED_REJECTIONS:
            summary.rejections.append(Rejection(row_ref, key, field, reason))

    async def flush_if_full(self) -> None:
        """Hands the rows read so far over once they make a batch."""
        if len(self._batch) >= self._batch_size:
            await self._flush()

    async def finish(self, received: int) -> IngestStreamSummary:
        """Commits what is left and answers for the whole stream."""
        self.summary.received = received
        if self._batch:
            await self._flush()
        await self._hand_over(None)
        assert self._committer is not None
        await self._committer
        return self.summary

    async def _store(self, drafts: list[Draft], prepared: PreparedIngest) -> None:
        await self._service.commit(prepared, stored_rows=False)
        summary = self.summary
        summary.customers_created += prepared.summary.customers_created
        results = prepared.summary.results
        if results.count(STORED_IN_BULK) == len(results):  # (by identity: C speed)
            summary.stored += len(results)
            return
        for draft, result in zip(drafts, results, strict=True):
            if result.outcome == "stored":
                summary.stored += 1
            elif result.outcome == "duplicate":
                summary.duplicates += 1
            else:
                self.reject(draft.row_ref, draft.idempotency_key, result.field, result.reason)

    async def _commit_in_order(self) -> None:
        while (item := await self._queue.get()) is not None:
            await self._store(*item)

    async def _hand_over(self, item: tuple[list[Draft], PreparedIngest] | None) -> None:
        committer = self._committer
        assert committer is not None
        putting = asyncio.ensure_future(self._queue.put(item))
        await asyncio.wait({putting, committer}, return_when=asyncio.FIRST_COMPLETED)
        if not putting.done():  # the committer failed: its error ends the stream
            putting.cancel()
            committer.result()

    async def _flush(self) -> None:
        drafts = list(self._batch)
        self._batch.clear()
        await self._hand_over((drafts, await self._service.prepare(drafts)))


@dataclass(frozen=True)
class TimelineQuery:
    """A page of a customer's timeline: whose, which interactions, from where."""

    customer_id: uuid.UUID | None  # (None: by identifier)
    identifier: IdentifierRef | None
    types: Sequence[str]  # exact names and "prefix.*"; none: all
    channels: Sequence[int]  # none: all
    start: datetime | None  # occurred at or after
    end: datetime | None  # occurred before
    ticket_id: str  # "": any
    before: tuple[datetime, int] | None  # (occurred_at, seq) of the last row of the page before
    limit: int


@dataclass(slots=True)
class _Held:
    """What `FeatureCache` holds of one customer's stored state, all read
    from that state at one version: its customer features of one day, the
    features of the tickets asked of it, and its open tickets (once asked)."""

    version: int
    reading: DayReading | None = None
    tickets: dict[str, TicketReading] = field(default_factory=dict)
    open_tickets: tuple[str, ...] | None = None

    def serves(self, now: datetime, open_tickets: bool) -> bool:
        """Whether it answers the customer's features at `now` (and its open
        tickets', when asked) without the state."""
        if self.reading is None or not self.reading.covers(now):
            return False
        if not open_tickets:
            return True
        return self.open_tickets is not None and all(t in self.tickets for t in self.open_tickets)


class FeatureCache:
    """Features read from customers' stored states, by customer, with the
    version (row xmin) of the state they were read from; the least recently
    used customer dropped beyond `capacity`. Scoring reads the same
    customers' and tickets' features again and again, mostly while their
    state is unchanged: a stored state still at the version of what is held
    here gives the same customer features at any moment of the same UTC day
    (`DayReading.at`) and the same ticket features at any moment
    (`TicketReading.at`), so it is neither sent nor parsed nor read again.
    Any write of the state changes its version, and what was held of the
    older version is dropped when the newer is read."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[uuid.UUID, _Held] = OrderedDict()
        # The customer whose entry holds a ticket's reading: which state a
        # call naming the ticket may not need sent. (Only a hint: the store
        # says whose ticket it is, and a state not sent that is needed after
        # all is read again.)
        self._ticket_holders: dict[str, uuid.UUID] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def readings(
        self, customer_ids: Iterable[uuid.UUID], now: datetime
    ) -> dict[uuid.UUID, tuple[int, DayReading]]:
        """The readings of `now`'s day held for these customers, with their versions."""
        found = {}
        for customer_id in customer_ids:
            entry = self._entries.get(customer_id)
            if entry is not None and entry.reading is not None and entry.reading.covers(now):
                self._entries.move_to_end(customer_id)
                found[customer_id] = (entry.version, entry.reading)
        return found

    def known_versions(
        self,
        customer_ids: Iterable[uuid.UUID],
        ticket_ids: Iterable[str],
        open_tickets: bool,
        now: datetime,
    ) -> tuple[dict[uuid.UUID, int], list[str]]:
        """The states a call can do without, with their versions, and the
        tickets named whose features are held: a customer asked is known
        when its features at `now` (and, with `open_tickets`, its open
        tickets') are held; the holder of a ticket's reading when it is not
        a customer asked that way. (The store still sends a known state that
        owns a ticket named but not held.)"""
        known: dict[uuid.UUID, int] = {}
        lacking: set[uuid.UUID] = set()
        entries = self._entries
        for customer_id in customer_ids:
            entry = entries.get(customer_id)
            if entry is not None and entry.serves(now, open_tickets):
                known[customer_id] = entry.version
            else:
                lacking.add(customer_id)
        held: list[str] = []
        for ticket_id in ticket_ids:
            holder = self._ticket_holders.get(ticket_id)
            entry = entries.get(holder) if holder is not None else None
            if holder is not None and entry is not None and ticket_id in entry.tickets:
                held.append(ticket_id)
                if holder not in lacking:
                    known[holder] = entry.version
        for customer_id in known:
            entries.move_to_end(customer_id)
        return known, held

    def held(self, customer_id: uuid.UUID, version: int) -> _Held | None:
        """What is held of the customer's state at `version`."""
        entry = self._entries.get(customer_id)
        return entry if entry is not None and entry.version == version else None

    def forget(self, customer_ids: Iterable[uuid.UUID]) -> None:
        for customer_id in customer_ids:
            entry = self._entries.pop(customer_id, None)
            if entry is not None:
                self._drop_holders(customer_id, entry)

    def put(self, customer_id: uuid.UUID, version: int, reading: DayReading) -> None:
        entry = self._entry(customer_id, version)
        if entry is not None:
            entry.reading = reading

    def put_ticket(
        self, customer_id: uuid.UUID, version: int, ticket_id: str, reading: TicketReading
    ) -> None:
        entry = self._entry(customer_id, version)
        if entry is not None:
            entry.tickets[ticket_id] = reading
            self._ticket_holders[ticket_id] = customer_id

    def put_open_tickets(
        self, customer_id: uuid.UUID, version: int, ticket_ids: Sequence[str]
    ) -> None:
        entry = self._entry(customer_id, version)
        if entry is not None:
            entry.open_tickets = tuple(ticket_ids)

    def _entry(self, customer_id: uuid.UUID, version: int) -> _Held | None:
        """The entry of the customer at `version` (a new one in place of one
        of another version), the most recently used; None when disabled."""
        if self.capacity <= 0:
            return None
        entries = self._entries
        entry = entries.get(customer_id)
        if entry is None or entry.version != version:
            if entry is not None:
                self._drop_holders(customer_id, entry)
            entry = entries[customer_id] = _Held(version)
        entries.move_to_end(customer_id)
        while len(entries) > self.capacity:
            dropped, old = entries.popitem(last=False)
            self._drop_holders(dropped, old)
        return entry

    def _drop_holders(self, customer_id: uuid.UUID, entry: _Held) -> None:
        for ticket_id in entry.tickets:
            if self._ticket_holders.get(ticket_id) == customer_id:
                del self._ticket_holders[ticket_id]


class InteractionsService:
    def __init__(
        self,
        store: InteractionsStore,
        identity: IdentityLink,
        settings: InteractionsSettings,
        changes: ChangeFeed,
        feature_set: FeatureSet = BUILTIN,
    ) -> None:
        self.store = store
        self.identity = identity
        self.settings = settings
        self.changes = changes
        # The features served and kept live (the setting `feature_set`).
        self.feature_set = feature_set
        self.feature_cache = FeatureCache(settings.feature_cache_size)
        # The time live features are read at (tests set it to read at chosen moments).
        self.clock: Callable[[], datetime] = lambda: datetime.now(UTC)
        # (An erased customer's features are never served, and not kept either.)
        store.erasure_hooks.append(self.feature_cache.forget)
        self.custom_types: dict[str, tuple[InteractionTypeSpec, StoredType]] = {}

    async def load_types(self) -> None:
        self.custom_types = {
            row.name: (spec_from_json(row.spec), row) for row in await self.store.custom_types()
        }

    async def type_spec(self, name: str) -> InteractionTypeSpec | None:
        if name in BUILT_IN_TYPES:
            return BUILT_IN_TYPES[name]
        if name not in self.custom_types:
            await self.load_types()  # another replica may have registered it
        found = self.custom_types.get(name)
        return found[0] if found else None

    # --- ingest -------------------------------------------------------------------
    async def ingest(
        self, drafts: Sequence[Draft], *, validate_only: bool = False, stored_rows: bool = True
    ) -> IngestSummary:
        """Checks, resolves and stores `drafts`, one result each. Without
        `stored_rows` the results of newly stored rows carry no database ids
        (a bulk stream only counts them, and reading them back costs)."""
        prepared = await self.prepare(drafts, validate_only=validate_only)
        if not validate_only:
            await self.commit(prepared, stored_rows=stored_rows)
        return prepared.summary

    async def record(self, draft: Draft, *, validate_only: bool) -> IngestResult:
        """One interaction stored (or only checked): its result, never a rejection."""
        result = (await self.ingest([draft], validate_only=validate_only)).results[0]
        if result.outcome == "rejected":
            if result.field == "interaction.customer":  # (unknown, erased, or not resolved)
                raise NotFound("customer", result.reason)
            raise InvalidArgument([FieldViolation(result.field, result.reason)])
        return result

    def ingest_stream(self) -> IngestStream:
        return IngestStream(self)

    async def commit(self, prepared: PreparedIngest, *, stored_rows: bool = True) -> None:
        """Stores what `prepare` accepted, a transaction per `ingest_batch_size` rows."""
        rows, size = prepared.rows, self.settings.ingest_batch_size
        for start in range(0, len(rows), size):
            await self._store_batch(rows[start : start + size], prepared.summary, stored_rows)

    async def prepare(
        self, drafts: Sequence[Draft], *, validate_only: bool = False
    ) -> PreparedIngest:
        """Checks `drafts` against the type registry and finds the customer of
        each (creating customers unless `validate_only`); nothing is stored.
        A bulk stream prepares one batch while the one before is stored."""
        summary = IngestSummary(results=[_PENDING] * len(drafts))
        now = datetime.now(UTC)
        latest = now + timedelta(seconds=self.settings.max_future_skew_s)
        retention = self.settings.retention_days
        earliest = None if retention is None else now - timedelta(days=retention)
        accepted: list[int] = []
        for index, draft in enumerate(drafts):
            if index % SLICE == SLICE - 1:
                await asyncio.sleep(0)  # a commit in flight moves on meanwhile
            spec = BUILT_IN_TYPES.get(draft.type) or await self.type_spec(draft.type)
            problem = _problem(draft, spec, latest, earliest, retention)
            if problem is not None:
                summary.results[index] = IngestResult(
                    "rejected", field=problem[0], reason=problem[1]
                )
            else:
                accepted.append(index)

        owned = await self._resolve_owners(
            [drafts[i] for i in accepted], summary, accepted, validate_only
        )
        rows = [(index, drafts[index]) for index in accepted if index in owned]
        if validate_only:
            for index, row in rows:
                summary.results[index] = IngestResult("stored", new=row)
        return PreparedIngest(summary, rows)

    async def _resolve_owners(
        self,
        drafts: Sequence[Draft],
        summary: IngestSummary,
        indexes: Sequence[int],
        validate_only: bool,
    ) -> set[int]:
        """Sets each draft's owner: its customer id, or the owner of its
        identifier (resolved in batches, creating customers unless told not
        to). Returns the indexes of the drafts that have one."""
        owned: set[int] = set()
        by_identifier: dict[bool, list[tuple[int, Draft]]] = {True: [], False: []}
        missing: set[uuid.UUID] = set()
        if self.identity.checks_customers:  # (else any id not erased is taken, see README)
            missing = await self.identity.missing_customers(
                list({d.customer_id for d in drafts if d.customer_id is not None})
            )
        for index, draft in zip(indexes, drafts, strict=True):
            if draft.customer_id in missing:
                summary.results[index] = _customer_not_found(draft)
            elif draft.customer_id is not None:
                draft.owner = draft.customer_id
                owned.add(index)
            else:
                by_identifier[not (draft.lookup_only or validate_only)].append((index, draft))
        for create, items in by_identifier.items():
            if not items:
                continue
            refs = [draft.identifier for _, draft in items if draft.identifier is not None]
            resolved = await self.identity.owners_of(refs, create=create)
            for (index, draft), (owner, created, error) in zip(items, resolved, strict=True):
                if isinstance(error, InvalidArgument):
                    violation = error.violations[0]
                    summary.results[index] = IngestResult(
                        "rejected",
                        field=f"interaction.{violation.field}",
                        reason=violation.description,
                    )
                elif error is not None:
                    summary.results[index] = IngestResult(
                        "rejected", field="interaction.customer", reason=error.message
                    )
                else:
                    assert owner is not None
                    draft.owner = owner
                    owned.add(index)
                    summary.customers_created += created
        return owned

    async def _store_batch(
        self,
        rows: Sequence[tuple[int, Draft]],
        summary: IngestSummary,
        stored_rows: bool,
    ) -> None:
        now = datetime.now(UTC)
        features = self.feature_set

        async def fold(
            states: dict[uuid.UUID, dict[str, Any] | None],
            fresh: Sequence[Draft],
            events_of: EventsOf,
        ) -> dict[uuid.UUID, dict[str, Any]]:
            live: dict[uuid.UUID, CustomerState] = {}
            rebuilt: set[uuid.UUID] = set()
            for customer, kept in states.items():
                try:
                    live[customer] = (
                        features.state_from_json(kept) if kept else features.new_state()
                    )
                except StateVersionError:
                    # The feature set changed shape since this state was kept:
                    # rebuild it from the interactions (the fresh ones included).
                    live[customer] = features.build_state(
                        event_of(r) for r in await events_of(customer)
                    )
                    rebuilt.add(customer)
            for start in range(0, len(fresh), SLICE):
                for row in fresh[start : start + SLICE]:
                    if row.owner not in rebuilt:
                        live[row.owner].apply(row)
                await asyncio.sleep(0)  # the store's COPY runs beside the fold
            for state in live.values():
                state.tidy(now)
            return {c: s.to_json() for c, s in live.items()}

        outcome = await self.store.ingest([row for _, row in rows], fold, stored_rows=stored_rows)
        new, duplicates, refused, erased = (
            outcome.new,
            outcome.duplicates,
            outcome.refused,
            outcome.erased,
        )
        results = summary.results
        if not stored_rows and not duplicates and len(new) == len(rows):
            for index, _ in rows:  # (the usual bulk batch: every row stored, each key once)
                results[index] = STORED_IN_BULK
            return
        first_of: dict[tuple[str, str], Draft] = {}
        for index, row in rows:
            key = (row.source, row.idempotency_key)
            if row.owner in erased:  # (erased while this batch was on its way)
                results[index] = _customer_not_found(row)
                continue
            first = first_of.setdefault(key, row)
            if key in refused:
                results[index] = IngestResult("rejected", field="interaction", reason=refused[key])
            elif first is row and key in new:
                results[index] = (
                    IngestResult("stored", new=row, stored=new[key])
                    if stored_rows
                    else STORED_IN_BULK
                )
            else:  # stored before, or earlier in this batch: the first copy answers
                results[index] = IngestResult(
                    "duplicate", row=duplicates.get(key) or _as_record(first, new.get(key))
                )

    # --- feature set changes -----------------------------------------------------------
    async def rebuild_stale_states(self) -> int:
        """Rebuilds, from their interactions, the live states kept under
        another state version than the served feature set's, in batches of
        customers, while ingest and reads go on: each state is written over
        the version it was read at (compare and set), so one an ingest wrote
        meanwhile (which rebuilt it itself, with its new rows) is left as the
        ingest wrote it. Reads of a state not rebuilt yet rebuild it on
        demand. Returns the number of states rebuilt."""
        features = self.feature_set
        version = features.state_version
        batch = self.settings.state_rebuild_batch
        after, rebuilt, started = _NO_OWNER, 0, time.monotonic()
        while True:
            stale = await self.store.stale_states(version, after, batch)
            if not stale:
                break
            if not rebuilt:
                logger.info("rebuilding live feature states for feature set %s", features.version)
            after = stale[-1][0]
            versions = dict(stale)
            rows = await self.store.events_before(list(versions), datetime.max.replace(tzinfo=UTC))
            events: dict[uuid.UUID, list[StoredInteraction]] = {c: [] for c in versions}
            for row in rows:
                events[row.customer_id].append(row)
            now = datetime.now(UTC)
            states: dict[uuid.UUID, dict[str, Any]] = {}
            for done, (customer, customer_rows) in enumerate(events.items(), 1):
                state = features.build_state(event_of(r) for r in customer_rows)
                state.tidy(now)
                states[customer] = state.to_json()
                if done % REBUILD_YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            written = await self.store.replace_states(states, versions)
            STATES_REBUILT.inc(len(written))
            rebuilt += len(written)
            logger.info(
                "rebuilt %d live feature states (%d in this batch; %d left to an ingest)",
                rebuilt,
                len(written),
                len(states) - len(written),
            )
        if rebuilt:
            logger.info(
                "live feature states follow feature set %s: %d rebuilt in %.1f s",
                features.version,
                rebuilt,
                time.monotonic() - started,
            )
        return rebuilt

    # --- reads ----------------------------------------------------------------------
    async def customer_id_of(
        self, customer_id: uuid.UUID | None, identifier: IdentifierRef | None
    ) -> uuid.UUID:
        """The surviving customer a reference points at (never creates one)."""
        [root] = await self.roots_of_refs([(customer_id, identifier)])
        if root is None:
            raise NotFound("customer with identifier", "given")
        return root

    async def roots_of_refs(
        self, refs: Sequence[tuple[uuid.UUID | None, IdentifierRef | None]]
    ) -> list[uuid.UUID | None]:
        """The surviving customer of each reference, in two round trips for any
        number of them; None for an identifier nobody has."""
        ids = await self._customer_ids(refs)
        known = [i for i in ids if i is not None]
        if not known:
            return [None] * len(ids)
        erased = await self.store.erased_among(known)
        roots = await self.store.roots(known)
        return [roots.get(i, i) if i is not None and i not in erased else None for i in ids]

    async def timeline(self, query: TimelineQuery) -> tuple[uuid.UUID, list[StoredInteraction]]:
        """The surviving customer a reference points at, and up to `limit`
        of its interactions (merged customers' included), latest first,
        before the (occurred_at, seq) `before`."""
        root = await self.customer_id_of(query.customer_id, query.identifier)
        members = (await self.store.members([root]))[root]
        boundary = query.before or (datetime.max.replace(tzinfo=UTC), 2**62)
        rows = await self.store.timeline(
            members,
            query.types,
            query.channels,
            query.start,
            query.end,
            query.ticket_id,
            boundary,
            query.limit,
        )
        return root, rows

    def stream(
        self, cursor: Position, types: Sequence[str], follow: bool
    ) -> AsyncIterator[tuple[Position, StoredInteraction]]:
        """The interactions of the wanted types after `cursor`, in commit
        order, each with its position; with `follow`, new ones as they come."""
        return self.changes.rows_after(cursor, type_filter(types), follow)

    async def _state(self, customer: uuid.UUID, kept: dict[str, Any]) -> CustomerState:
        try:
            return self.feature_set.state_from_json(kept)
        except StateVersionError:  # kept by another feature set: rebuild, don't fail
            rows = await self.store.events_before([customer], datetime.max.replace(tzinfo=UTC))
            return self.feature_set.build_state(event_of(r) for r in rows)

    async def features(
        self,
        refs: Sequence[tuple[uuid.UUID | None, IdentifierRef | None]],
        ticket_ids: Sequence[str],
        include_open_tickets: bool,
    ) -> tuple[
        datetime,
        list[tuple[uuid.UUID | None, FeatureValues | None]],
        list[tuple[uuid.UUID, str, FeatureValues | None]],
    ]:
        """Live features of each referenced customer ((None, None) for one not
        found) and of the tickets, as of one time. Everything is read in one
        statement; a customer's stored state is read as parsed, a merged
        customer's states are merged first. What was read earlier from a
        stored state still at the same version (`FeatureCache`: a customer's
        features today, a ticket's, the open tickets) is answered from
        memory: that state is neither sent nor read again."""
        now = self.clock()
        ids = await self._customer_ids(refs)
        asked = [i for i in ids if i is not None]
        cache = self.feature_cache
        known, held_tickets = cache.known_versions(asked, ticket_ids, include_open_tickets, now)
        reads = await self.store.live_reads(asked, ticket_ids, known, held_tickets)
        features = self.feature_set
        complete: dict[uuid.UUID, LiveRead] = {}  # by root: with every member's state
        states: dict[uuid.UUID, CustomerState | StoredState | None] = {}

        async def state_of(read: LiveRead) -> tuple[LiveRead, CustomerState | StoredState | None]:
            """The read with every state sent (read again when one was held
            back, or merged since), and its live state."""
            root = read.root
            if root not in complete:
                if read.states.keys() != read.versions.keys():
                    read = (await self.store.live_reads([root])).customers[root]
                complete[root] = read
                states[root] = await self._live_state(root, read.states)
            return complete[root], states[root]

        def held(read: LiveRead) -> tuple[tuple[uuid.UUID, int] | None, _Held | None]:
            """The one member of a customer never merged with another, and
            what the cache holds of its state when the state was not sent."""
            read = complete.get(read.root, read)
            if len(read.versions) != 1:
                return None, None
            [(member, version)] = read.versions.items()
            if member in read.states:
                return (member, version), None
            return (member, version), cache.held(member, version)

        async def customer_values(read: LiveRead) -> FeatureValues:
            _, entry = held(read)
            if entry is not None and entry.reading is not None:
                values = entry.reading.at(now)
                if values is not None:
                    return values
            read, state = await state_of(read)
            single, _ = held(read)
            if single is not None and isinstance(state, StoredState):
                reading = features.day_reading(state, now)
                cache.put(*single, reading)  # (not a state rebuilt from the interactions)
                return dict(reading.values)  # (the cached one stays as read)
            return features.customer_features(state or features.new_state(), now)

        async def ticket_values(read: LiveRead, ticket_id: str) -> FeatureValues | None:
            _, entry = held(read)
            if entry is not None and ticket_id in entry.tickets:
                return entry.tickets[ticket_id].at(now)
            read, state = await state_of(read)
            if state is None:
                return None
            single, _ = held(read)
            if single is not None and isinstance(state, StoredState):
                reading = features.ticket_reading(state, ticket_id, now)
                cache.put_ticket(*single, ticket_id, reading)
                return None if reading.values is None else dict(reading.values)
            return features.ticket_features(state, ticket_id, now)

        async def open_tickets(read: LiveRead) -> Sequence[str]:
            _, entry = held(read)
            if entry is not None and entry.open_tickets is not None:
                return entry.open_tickets
            read, state = await state_of(read)
            found = state.open_ticket_ids() if state else []
            single, _ = held(read)
            if single is not None and isinstance(state, StoredState):
                cache.put_open_tickets(*single, found)
            return found

        customers: list[tuple[uuid.UUID | None, FeatureValues | None]] = []
        found_reads: list[LiveRead] = []
        for customer_id in ids:
            read = reads.customers.get(customer_id) if customer_id is not None else None
            if read is None or read.erased:
                customers.append((None, None))
                continue
            found_reads.append(read)
            customers.append((read.root, await customer_values(read)))
        tickets: list[tuple[uuid.UUID, str, FeatureValues | None]] = []
        for ticket_id in ticket_ids:
            owner = reads.ticket_owners.get(ticket_id)
            read = reads.customers.get(owner) if owner is not None else None
            if read is None:
                tickets.append((uuid.UUID(int=0), ticket_id, None))
                continue
            tickets.append((read.root, ticket_id, await ticket_values(read, ticket_id)))
        if include_open_tickets:
            seen = set(ticket_ids)
            for read in found_reads:
                for ticket_id in await open_tickets(read):
                    if ticket_id not in seen:
                        seen.add(ticket_id)
                        tickets.append((read.root, ticket_id, await ticket_values(read, ticket_id)))
        return now, customers, tickets

    async def _customer_ids(
        self, refs: Sequence[tuple[uuid.UUID | None, IdentifierRef | None]]
    ) -> list[uuid.UUID | None]:
        """The customer each reference names (identifiers resolved, never
        created); None for an identifier nobody has or an id identity never
        issued. Erasures and merges are left to the store's reads."""
        ids: list[uuid.UUID | None] = [customer_id for customer_id, _ in refs]
        by_identifier = [(i, ref) for i, (cid, ref) in enumerate(refs) if cid is None and ref]
        if by_identifier:
            resolved = await self.identity.owners_of(
                [ref for _, ref in by_identifier], create=False
            )
            for (index, _), (owner, _, error) in zip(by_identifier, resolved, strict=True):
                if error is not None and not isinstance(error, NotFound):
                    raise error
                ids[index] = owner
        given = [customer_id for customer_id, _ in refs if customer_id is not None]
        if given and self.identity.checks_customers:  # (never issued, or erased)
            missing = await self.identity.missing_customers(given)
            ids = [None if i in missing else i for i in ids]
        return ids

    async def _live_state(
        self, root: uuid.UUID, kept: dict[uuid.UUID, dict[str, Any]]
    ) -> CustomerState | StoredState | None:
        """The live state of a customer from its members' kept states: one
        state read as stored; several (a merged customer) merged; None for a
        customer with no interactions at all."""
        if len(kept) == 1:
            [(member, only)] = kept.items()
            try:
                return self.feature_set.stored_state(only)
            except StateVersionError:
                return await self._state(member, only)
        states = [await self._state(m, state) for m, state in kept.items()]
        if not states:
            return None
        merged = reduce(lambda a, b: a.merge(b), states)
        merged.tidy(datetime.now(UTC))  # (each member's state is bounded, not their sum)
        return merged

    async def point_in_time(
        self, queries: Sequence[tuple[uuid.UUID, datetime, str]], as_recorded: bool
    ) -> list[tuple[FeatureValues, FeatureValues | None]]:
        """Features as of each (customer, time, ticket): only interactions that
        occurred strictly before the time count."""
        features = self.feature_set
        roots = await self.store.roots(list({c for c, _, _ in queries}))
        groups: dict[uuid.UUID, list[int]] = {}
        for index, (customer, _, _) in enumerate(queries):
            groups.setdefault(roots.get(customer, customer), []).append(index)
        members = await self.store.members(list(groups))
        results: list[tuple[FeatureValues, FeatureValues | None]] = [({}, None)] * len(queries)
        for root, indexes in groups.items():
            latest = max(queries[i][1] for i in indexes)
            rows = await self.store.events_before(members.get(root, [root]), latest)
            if as_recorded:
                for i in indexes:
                    as_of = queries[i][1]
                    known = [
                        event_of(r)
                        for r in rows
                        if r.occurred_at < as_of and r.recorded_at <= as_of
                    ]
                    results[i] = features.features_at_cutoffs(known, [as_of], [queries[i][2]])[0]
                continue
            events = [event_of(r) for r in rows]
            computed = features.features_at_cutoffs(
                events, [queries[i][1] for i in indexes], [queries[i][2] for i in indexes]
            )
            for i, value in zip(indexes, computed, strict=True):
                results[i] = value
        return results

    # --- types ------------------------------------------------------------------------
    async def register_type(
        self, spec: InteractionTypeSpec
    ) -> tuple[InteractionTypeSpec, StoredType, bool]:
        problems = validate_custom_type_name(spec.name)
        if problems:
            raise InvalidArgument([FieldViolation("interaction_type.name", p) for p in problems])
        if spec.name in BUILT_IN_TYPES:
            raise FailedPrecondition(f"{spec.name!r} is built in and cannot be changed")
        await self.load_types()
        existing = self.custom_types.get(spec.name)
        if existing is None:
            row = await self.store.save_type(spec.name, spec_to_json(spec), None)
            self.custom_types[spec.name] = (spec, row)
            return spec, row, True
        old, old_row = existing
        if spec_to_json(old) == spec_to_json(spec):
            return old, old_row, False
        reasons = check_compatible_change(old, spec)
        if reasons:
            raise FailedPrecondition(
                "incompatible change of an interaction type: " + "; ".join(reasons),
                [
                    ("INCOMPATIBLE_TYPE_CHANGE", f"interaction_types/{spec.name}", r)
                    for r in reasons
                ],
            )
        row = await self.store.save_type(spec.name, spec_to_json(spec), old_row.version)
        self.custom_types[spec.name] = (spec, row)
        return spec, row, False

    async def list_types(
        self, custom_only: bool
    ) -> list[tuple[InteractionTypeSpec, StoredType | None]]:
        """The registered types (built-in ones too unless `custom_only`), by
        name, each with its stored row (None for a built-in type)."""
        await self.load_types()
        custom = self.custom_types
        specs = (
            [s for s, _ in custom.values()]
            if custom_only
            else all_types(s for s, _ in custom.values())
        )
        return [(s, custom[s.name][1] if s.name in custom else None) for s in specs]

    # --- retention, erasure, export, identity sync ---------------------------------------
    async def purge(
        self,
        older_than: datetime,
        types: Sequence[str],
        *,
        allow_feature_loss: bool,
        dry_run: bool,
    ) -> dict[str, int]:
        """Interactions that occurred before `older_than` deleted (or only
        counted, `dry_run`), by type. Within the feature window only with
        `allow_feature_loss`."""
        if (
            older_than > datetime.now(UTC) - timedelta(days=FEATURE_WINDOW_DAYS)
            and not allow_feature_loss
        ):
            raise FailedPrecondition(
                f"the horizon is within the {FEATURE_WINDOW_DAYS}-day feature window; "
                "set allow_feature_loss to purge anyway",
                [("FEATURE_WINDOW", "older_than", "within the feature window")],
            )
        if dry_run:
            return await self.store.count_purgeable(older_than, list(types))
        return await self.store.purge(older_than, list(types), batch=self.settings.purge_batch_size)

    async def erase(self, customer_ids: Sequence[uuid.UUID]) -> dict[str, int]:
        """Everything held on the customers deleted, counted by kind."""
        return await self.store.erase(customer_ids)

    def export(
        self, customer_ids: Sequence[uuid.UUID], after_seq: int
    ) -> AsyncIterator[StoredInteraction]:
        """The customers' interactions after `after_seq`, by seq (a caller
        may stop at any row)."""
        return self.store.export(customer_ids, after_seq)

    async def sync_status(self) -> tuple[bool, SyncStatus | None]:
        """Whether the identity link is connected, and how far it has followed."""
        status = await self.store.sync_status()
        return self.identity.connected, status

    async def get_interaction(self, interaction_id: uuid.UUID) -> StoredInteraction:
        row = await self.store.get(interaction_id)
        if row is None:
            raise NotFound("interaction", str(interaction_id))
        return row


def _customer_not_found(draft: Draft) -> IngestResult:
    """A row of a customer id identity never issued, or of an erased customer."""
    return IngestResult(
        "rejected",
        field="interaction.customer",
        reason=f"customer {draft.customer_id or draft.owner} not found",
    )


def _problem(
    draft: Draft,
    spec: InteractionTypeSpec | None,
    latest: datetime,
    earliest: datetime | None,
    retention_days: int | None,
) -> tuple[str, str] | None:
    """The first (field, reason) refusing `draft` of type `spec` (None for an
    unknown type), given the latest and earliest times accepted; or None."""
    if spec is None:
        return (
            "interaction.type",
            f"unknown interaction type {draft.type[:80]!r}; register it first",
        )
    if draft.occurred_at > latest:
        return "interaction.occurred_at", "in the future"
    if earliest is not None and draft.occurred_at < earliest:
        return "interaction.occurred_at", f"older than the {retention_days}-day retention"
    violations = validate_interaction(
        spec,
        draft.attributes,
        draft.ticket_id,
        draft.product_id,
        draft.amount is not None,
        draft.sentiment,
    )
    if violations:
        path, description = violations[0]
        return f"interaction.{path}", description
    return None


def _as_record(row: Draft, stored: StoredAs | None = None) -> StoredInteraction:
    """A row as the database returns it (ids from the database when it was
    stored, a fresh id for a row only validated; no transaction yet)."""
    return StoredInteraction(
        seq=stored.seq if stored else 0,
        interaction_id=stored.interaction_id if stored else uuid.uuid4(),
        customer_id=row.owner,
        occurred_at=row.occurred_at,
        recorded_at=stored.recorded_at if stored else datetime.now(UTC),
        channel=row.channel,
        type=row.type,
        attributes=row.stored_attributes(),
        ticket_id=row.ticket_id,
        product_id=row.product_id,
        amount=row.amount,
        currency=row.currency,
        sentiment=row.sentiment,
        source=row.source,
        idempotency_key=row.idempotency_key,
        identifier=row.stored_identifier(),
        xid=0,
    )


def all_types(custom: Iterable[InteractionTypeSpec]) -> list[InteractionTypeSpec]:
    return sorted([*BUILT_IN_TYPES.values(), *custom], key=lambda s: s.name)


__all__ = ["ConvergeError", "Draft", "IngestResult", "InteractionsService", "all_types", "event_of"]

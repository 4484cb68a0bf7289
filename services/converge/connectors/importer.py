"""Imports a file with a mapping: maps its rows and streams them to the
services, or only maps them (`dry_run`).

Order: when the mapping upserts profiles (or attaches extra identifiers),
a first pass streams `IdentityService.BulkResolve`; then, when it records
interactions, a second pass streams `InteractionsService.IngestInteractions`
(each row with its line number as `row_ref` and the idempotency key from the
mapping). The file is read once per pass, so memory stays flat however large
it is. Streams are cut into calls of `batch_size` rows: a failure loses at
most one call's progress, and a re-run is safe because the keys are the
same on every run.

Rows the mapping cannot map (bad date, missing required value, a reject
rule) are counted as rejected with their reason and never sent.

A row is accepted whole or rejected whole. When identity refuses a row (its
profile, its main identifier), its interactions are not sent either: they
would otherwise create the customer without the profile. An extra identifier
identity refuses (a malformed phone number) is dropped and the row sent
again without it, counted as a warning, unless the mapping says
`on_invalid: reject` for it. `rejected` counts each row once.
"""

from __future__ import annotations

import asyncio
import itertools
import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from converge.connectors import DEFAULT_IDENTITY, DEFAULT_INTERACTIONS
from converge.connectors.mapping import MAX_KEY_LENGTH, Mapping
from converge.connectors.reader import RecordFile
from converge.connectors.transform import MappedRow, RejectedRow, SkippedRow, map_records
from converge.runtime.channels import aio_channel
from converge.runtime.errors import read_status
from converge.v1 import identity_pb2, interactions_pb2, interactions_pb2_grpc

DEFAULT_BATCH = 5000
# Identity lists at most this many rejected rows per BulkResolve call
# (identity.proto, BulkResolveResponse.rejections): the identity pass keeps
# its calls this small, so every rejected row is known by its line.
LISTED_REJECTIONS = 5000
MAX_EXAMPLES = 20
# The field identity names for a refused identifier of a row.
_IDENTIFIER_FIELD = re.compile(r"^resolve\.identifiers\[(\d+)\]")
_PROGRESS_EVERY = 500

# Called with the phase ("mapping", "profiles", "interactions") and the rows read so far.
Progress = Callable[[str, int], None]
T = TypeVar("T")


class ServiceUnavailable(Exception):
    """A service could not be reached."""

    def __init__(self, service: str, address: str, detail: str) -> None:
        super().__init__(f"the {service} service at {address} is unreachable: {detail}")
        self.service = service
        self.address = address


class ServiceFailed(Exception):
    """A service refused or failed a whole call (not single rows)."""

    def __init__(self, service: str, address: str, code: str, detail: str) -> None:
        super().__init__(f"the {service} service at {address} failed the import: {code}: {detail}")
        self.service = service
        self.address = address


@dataclass(frozen=True)
class Rejection:
    """One rejected row: where, which key or field, why (and with the value)."""

    line: int
    by: str  # "mapping", "identity" or "interactions"
    field: str
    reason: str
    detail: str


@dataclass
class ImportSummary:
    """What an import (or a dry run) did. `rejection_reasons` counts every
    rejected row by reason (service reasons prefixed with the service);
    `rejections` lists the first few."""

    file: str
    mapping: str
    source: str
    dry_run: bool
    read: int = 0
    skipped: int = 0
    mapped: int = 0
    rejected_locally: int = 0
    profiles_sent: int = 0
    profiles_rejected: int = 0
    customers_matched: int = 0
    customers_created: int = 0
    customers_merged: int = 0
    sent: int = 0
    stored: int = 0
    duplicates: int = 0
    interactions_rejected: int = 0
    # Rows not sent to interactions because identity rejected them; of them,
    # those whose profile went on an earlier row (same customer and values,
    # sent once) and so were not counted by identity.
    interactions_withheld: int = 0
    interactions_withheld_beyond_sent: int = 0
    # Extra identifiers identity refused and the import dropped (`on_invalid: drop`).
    identifiers_dropped: int = 0
    warning_reasons: Counter[str] = field(default_factory=Counter)
    # The mapping upserts profiles but names no `profile.effective_at`: the
    # values take effect at import time, not when they became true.
    profiles_effective_now: bool = False
    rejection_reasons: Counter[str] = field(default_factory=Counter)
    rejections: list[Rejection] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rejected(self) -> int:
        """Rows rejected, each once: by the mapping, by identity (its
        interactions then withheld, rows sharing its profile included), or by
        interactions."""
        return (
            self.rejected_locally
            + self.profiles_rejected
            + self.interactions_withheld_beyond_sent
            + self.interactions_rejected
        )

    @property
    def accepted(self) -> int:
        """Rows taken whole: mapped and rejected by no service."""
        return max(
            0,
            self.mapped
            - self.profiles_rejected
            - self.interactions_withheld_beyond_sent
            - self.interactions_rejected,
        )

    def reject(self, rejection: Rejection, reason_key: str) -> None:
        self.rejection_reasons[reason_key] += 1
        if len(self.rejections) < MAX_EXAMPLES:
            self.rejections.append(rejection)

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "mapping": self.mapping,
            "source": self.source,
            "dry_run": self.dry_run,
            "read": self.read,
            "skipped": self.skipped,
            "mapped": self.mapped,
            "rejected": self.rejected,
            "rejected_locally": self.rejected_locally,
            "profiles_sent": self.profiles_sent,
            "profiles_rejected": self.profiles_rejected,
            "customers_created": self.customers_created,
            "customers_matched": self.customers_matched,
            "customers_merged": self.customers_merged,
            "sent": self.sent,
            "stored": self.stored,
            "duplicates": self.duplicates,
            "interactions_rejected": self.interactions_rejected,
            "interactions_withheld": self.interactions_withheld,
            "accepted": self.accepted,
            "identifiers_dropped": self.identifiers_dropped,
            "warning_reasons": dict(self.warning_reasons.most_common()),
            "profiles_effective_now": self.profiles_effective_now,
            "rejection_reasons": dict(self.rejection_reasons.most_common()),
            "rejections": [r.__dict__ for r in self.rejections],
            "samples": self.samples,
        }


@dataclass
class _Pass:
    """One read of the file: its own counts (the last pass's are reported)."""

    read: int = 0
    skipped: int = 0
    mapped: int = 0
    rejected: list[RejectedRow] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)


def _mapped_rows(
    path: Path,
    mapping: Mapping,
    origin: str,
    counts: _Pass,
    phase: str,
    limit: int | None,
    progress: Progress | None,
) -> Iterator[MappedRow]:
    with RecordFile(path, mapping.file) as source:
        if source.columns is not None:
            mapping.check_columns(source.columns, origin)
        for _, result in map_records(source.records(), mapping, limit=limit):
            counts.read += 1
            if progress is not None and counts.read % _PROGRESS_EVERY == 0:
                progress(phase, counts.read)
            if isinstance(result, MappedRow):
                counts.mapped += 1
                yield result
            elif isinstance(result, SkippedRow):
                counts.skipped += 1
            else:
                counts.reasons[result.reason] += 1
                if len(counts.rejected) < MAX_EXAMPLES:
                    counts.rejected.append(result)
    if progress is not None:
        progress(phase, counts.read)


def _report_pass(summary: ImportSummary, counts: _Pass) -> None:
    summary.read = counts.read
    summary.skipped = counts.skipped
    summary.mapped = counts.mapped
    summary.rejected_locally = sum(counts.reasons.values())
    summary.rejection_reasons.update(counts.reasons)
    for r in counts.rejected:
        if len(summary.rejections) < MAX_EXAMPLES:
            summary.rejections.append(Rejection(r.line, "mapping", r.field, r.reason, r.detail))


ROWS_PER_MESSAGE = 500


class _Guarded(Iterator[T]):
    """Wraps a request iterator so an error while reading the file (which
    gRPC would turn into a cancelled call) is kept and raised after the call."""

    def __init__(self, inner: Iterator[T]) -> None:
        self.inner = inner
        self.error: BaseException | None = None
        self.count = 0

    def __next__(self) -> T:
        try:
            item = next(self.inner)
        except StopIteration:
            raise
        except Exception as e:
            self.error = e
            raise StopIteration from None
        self.count += 1
        return item


def _in_messages(
    rows: Iterator[interactions_pb2.IngestInteractionsRequest],
) -> Iterator[interactions_pb2.IngestInteractionsRequest]:
    """Packs rows into messages of ROWS_PER_MESSAGE: one message per row caps a
    Python gRPC stream at a few thousand rows per second."""
    while chunk := list(itertools.islice(rows, ROWS_PER_MESSAGE)):
        yield interactions_pb2.IngestInteractionsRequest(
            rows=[
                interactions_pb2.IngestRow(
                    row_ref=r.row_ref,
                    interaction=r.interaction,
                    idempotency_key=r.idempotency_key,
                    lookup_only=r.lookup_only,
                )
                for r in chunk
            ]
        )


async def _in_calls(
    rows: Iterator[T], batch_size: int, call: Callable[[Iterator[T]], Awaitable[None]]
) -> None:
    """Feeds rows to successive streaming calls of at most `batch_size` rows."""
    while (first := next(rows, None)) is not None:
        await call(itertools.chain([first], itertools.islice(rows, batch_size - 1)))


async def _connect(service: str, address: str, within_s: float) -> grpc.aio.Channel:
    channel = aio_channel(address)
    try:
        await asyncio.wait_for(channel.channel_ready(), within_s)
    except (TimeoutError, grpc.aio.AioRpcError) as e:
        await channel.close(None)
        raise ServiceUnavailable(service, address, f"no answer within {within_s:g} s") from e
    return channel


def _service_error(service: str, address: str, error: grpc.aio.AioRpcError) -> Exception:
    if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return ServiceUnavailable(service, address, error.details() or error.code().name)
    return ServiceFailed(service, address, error.code().name, error.details() or "")


async def import_file(
    path: Path,
    mapping: Mapping,
    *,
    origin: str = "mapping",
    identity_address: str = DEFAULT_IDENTITY,
    interactions_address: str = DEFAULT_INTERACTIONS,
    dry_run: bool = False,
    limit: int | None = None,
    progress: Progress | None = None,
    batch_size: int = DEFAULT_BATCH,
    connect_timeout: float = 5.0,
    sample_size: int = 5,
) -> ImportSummary:
    """Maps `path` with `mapping` and, unless `dry_run`, sends it. Raises
    MappingError or FileError (before anything is sent) when the mapping does
    not fit the file, ServiceUnavailable or ServiceFailed when a service
    cannot take the import."""
    summary = ImportSummary(str(path), origin, mapping.source, dry_run)
    summary.profiles_effective_now = (
        mapping.profile is not None and mapping.profile.effective_at is None
    )

    def rows(phase: str, counts: _Pass) -> Iterator[MappedRow]:
        return _mapped_rows(path, mapping, origin, counts, phase, limit, progress)

    # Check the mapping against the file's header before contacting anything.
    with RecordFile(path, mapping.file) as source:
        if source.columns is not None:
            mapping.check_columns(source.columns, origin)

    if dry_run:
        counts = _Pass()
        for row in rows("mapping", counts):
            if len(summary.samples) < sample_size:
                summary.samples.append(row.as_dict())
        _report_pass(summary, counts)
        return summary

    channels: list[grpc.aio.Channel] = []
    try:
        if mapping.needs_identity:
            channels.append(await _connect("identity", identity_address, connect_timeout))
        if mapping.records_interactions:
            channels.append(await _connect("interactions", interactions_address, connect_timeout))
        last = _Pass()
        refused: dict[str, Rejection] = {}
        if mapping.needs_identity:
            refused = await _resolve_pass(
                _bulk_resolve_wire(channels[0]),
                mapping,
                rows("profiles", last),
                summary,
                identity_address,
                batch_size,
            )
        if mapping.records_interactions:
            last = _Pass()
            ingest_stub = interactions_pb2_grpc.InteractionsServiceStub(channels[-1])
            await _ingest_pass(
                ingest_stub,
                _withheld(rows("interactions", last), refused, summary),
                summary,
                interactions_address,
                batch_size,
            )
        _report_pass(summary, last)
    finally:
        for channel in channels:
            await channel.close(None)
    return summary


def _count_rejections(
    summary: ImportSummary,
    service: str,
    listed: Sequence[identity_pb2.BulkRejection] | Sequence[interactions_pb2.IngestRejection],
    rejected: int,
) -> None:
    """Adds a service's rejections to the summary; the service lists only so
    many, the rest are counted under one reason."""
    for r in listed:
        error = read_status(r.error)
        summary.reject(
            Rejection(_line(r.row_ref), service, error.field, error.reason, error.reason),
            _reason_key(service, error.field, error.reason),
        )
    unlisted = rejected - len(listed)
    if unlisted > 0:
        summary.rejection_reasons[f"[{service}] (more rows, not listed by the service)"] += unlisted


def _reason_key(service: str, field_name: str, reason: str) -> str:
    return f"[{service}] {field_name}: {reason}" if field_name else f"[{service}] {reason}"


def _line(row_ref: str) -> int:
    return int(row_ref) if row_ref.isdigit() else 0


# IdentityService.BulkResolve, by the path its stub uses.
_BULK_RESOLVE = identity_pb2.DESCRIPTOR.services_by_name["IdentityService"].methods_by_name[
    "BulkResolve"
]
if TYPE_CHECKING:
    BulkResolveWire = grpc.aio.StreamUnaryMultiCallable[bytes, identity_pb2.BulkResolveResponse]


def _bulk_resolve_wire(channel: grpc.aio.Channel) -> BulkResolveWire:
    """BulkResolve taking its request messages already serialized (the rows'
    `MappedRow.resolve_wire` joined), answering as the generated stub does:
    the generated stub would need each row copied into a new message, which
    cost the importer more than mapping the row."""
    return channel.stream_unary(
        f"/{_BULK_RESOLVE.containing_service.full_name}/{_BULK_RESOLVE.name}",
        request_serializer=bytes,
        response_deserializer=identity_pb2.BulkResolveResponse.FromString,
    )


async def _resolve_pass(
    bulk_resolve: BulkResolveWire,
    mapping: Mapping,
    rows: Iterator[MappedRow],
    summary: ImportSummary,
    address: str,
    batch_size: int,
) -> dict[str, Rejection]:
    """Streams the profiles; returns the rows identity rejected, by their
    resolve idempotency key (rows with the same customer and values share it
    and were sent once)."""
    seen: set[str] = set()
    refused: dict[str, Rejection] = {}

    def unique(rows: Iterator[MappedRow]) -> Iterator[MappedRow]:
        for row in rows:
            assert row.resolve is not None
            # The same customer with the same values on several rows: send once.
            key = row.resolve.resolve.idempotency_key
            if key in seen:
                continue
            seen.add(key)
            yield row

    async def call(pieces: AsyncIterator[list[MappedRow]]) -> None:
        # The rows of the call, by row_ref: a rejected one may go again
        # without an extra identifier the mapping lets drop.
        in_flight: dict[str, MappedRow] = {}
        sent = 0

        async def messages() -> AsyncIterator[bytes]:
            nonlocal sent
            async for piece in pieces:
                in_flight.update((row.resolve.row_ref, row) for row in piece if row.resolve)
                sent += len(piece)
                for message in _resolve_messages(piece):
                    yield message

        try:
            response: identity_pb2.BulkResolveResponse = await bulk_resolve(messages())
        except grpc.aio.AioRpcError as e:
            raise _service_error("identity", address, e) from e
        summary.profiles_sent += sent
        summary.customers_created += response.created
        summary.customers_matched += response.matched
        summary.customers_merged += response.merged
        retry: list[MappedRow] = []
        for rejection in response.rejections:
            row = in_flight.get(rejection.row_ref)
            error = read_status(rejection.error)
            lighter = _without_droppable(row, error.field, mapping) if row is not None else None
            if lighter is not None and row is not None:
                summary.identifiers_dropped += 1
                summary.warning_reasons[
                    f"[identity] {error.field}: {error.reason} (identifier dropped)"
                ] += 1
                retry.append(lighter)
                continue
            summary.profiles_rejected += 1
            found = Rejection(
                _line(rejection.row_ref), "identity", error.field, error.reason, error.reason
            )
            summary.reject(found, _reason_key("identity", error.field, error.reason))
            if row is not None:
                assert row.resolve is not None
                refused[row.resolve.resolve.idempotency_key] = found
        unlisted = response.rejected - len(response.rejections)
        if unlisted > 0:  # (calls are kept small enough that this does not happen)
            summary.profiles_rejected += unlisted
            summary.rejection_reasons["[identity] (more rows, not listed by the service)"] += (
                unlisted
            )
        if retry:
            summary.profiles_sent -= len(retry)  # each row counts as sent once
            await call(_at_once(retry))

    await _in_streamed_calls(unique(rows), min(batch_size, LISTED_REJECTIONS), call)
    return refused


def _resolve_messages(rows: Sequence[MappedRow]) -> Iterator[bytes]:
    """Packs rows into serialized BulkResolveRequest messages of
    ROWS_PER_MESSAGE `rows` each."""
    for start in range(0, len(rows), ROWS_PER_MESSAGE):
        yield b"".join(row.resolve_wire for row in rows[start : start + ROWS_PER_MESSAGE])


async def _at_once(rows: list[T]) -> AsyncIterator[list[T]]:
    """Rows already at hand, as the stream of one piece `_in_streamed_calls` gives."""
    yield rows


async def _in_streamed_calls(
    rows: Iterator[T], call_rows: int, call: Callable[[AsyncIterator[list[T]]], Awaitable[None]]
) -> None:
    """Feeds rows to successive calls of at most `call_rows` rows, each call
    a stream of pieces of ROWS_PER_MESSAGE rows read and mapped in a thread
    one piece ahead of the one being sent. The service checks a piece while
    it writes the one before, so mapping, checking and writing overlap for
    the whole call; with calls of 1,000 rows each call's last batch was
    written with nothing else going on. Calls stay in file order, one at a
    time."""

    piece_rows = min(ROWS_PER_MESSAGE, call_rows)

    def take() -> list[T]:
        return list(itertools.islice(rows, piece_rows))

    def none_pending() -> asyncio.Future[list[T]]:
        taken: asyncio.Future[list[T]] = asyncio.get_running_loop().create_future()
        taken.set_result([])
        return taken

    following: asyncio.Future[list[T]] = asyncio.ensure_future(asyncio.to_thread(take))

    async def pieces(first: list[T]) -> AsyncIterator[list[T]]:
        nonlocal following
        piece, sent = first, 0
        while piece:
            sent += len(piece)
            # Read ahead while this piece is sent (and, after the call's last
            # piece, while the call is answered: the next call starts with it).
            following = asyncio.ensure_future(asyncio.to_thread(take))
            yield piece
            if sent + piece_rows > call_rows or len(piece) < piece_rows:
                return
            piece = await following
            following = none_pending()

    try:
        while first := await following:
            following = none_pending()
            await call(pieces(first))
    finally:
        await asyncio.gather(following, return_exceptions=True)  # (never left running)


def _without_droppable(row: MappedRow, field_path: str, mapping: Mapping) -> MappedRow | None:
    """The row without the extra identifier identity refused, when the mapping
    lets that one drop (`on_invalid: drop`); None when the row stands rejected.

    The lighter row is a different request, so it gets its own idempotency
    key (derived from the first, so a re-run sends the same one again)."""
    found = _IDENTIFIER_FIELD.match(field_path)
    if found is None or row.resolve is None:
        return None
    position = int(found[1])
    if position == 0 or position - 1 >= len(row.extra_specs):
        return None  # the main identifier, or not one the mapping added
    spec = mapping.customer.extra_identifiers[row.extra_specs[position - 1]]
    if spec.on_invalid != "drop":
        return None
    request = identity_pb2.BulkResolveRequest()
    request.CopyFrom(row.resolve)
    del request.resolve.identifiers[position]
    key = request.resolve.idempotency_key
    request.resolve.idempotency_key = f"{key[: MAX_KEY_LENGTH - 6]}~d{position}"[-MAX_KEY_LENGTH:]
    extra_specs = row.extra_specs[: position - 1] + row.extra_specs[position:]
    wire = identity_pb2.BulkResolveRequest(rows=[request]).SerializeToString()
    return replace(row, resolve=request, extra_specs=extra_specs, resolve_wire=wire)


def _withheld(
    rows: Iterator[MappedRow], refused: dict[str, Rejection], summary: ImportSummary
) -> Iterator[MappedRow]:
    """The rows to send to interactions: those identity did not reject. A row
    sharing a rejected row's profile (same customer, same values) is rejected
    with it, and counted once as such."""
    for row in rows:
        if row.resolve is not None:
            rejection = refused.get(row.resolve.resolve.idempotency_key)
            if rejection is not None:
                summary.interactions_withheld += 1
                if row.line != rejection.line:
                    summary.interactions_withheld_beyond_sent += 1
                    summary.reject(
                        replace(rejection, line=row.line),
                        _reason_key("identity", rejection.field, rejection.reason),
                    )
                continue
        yield row


async def _ingest_pass(
    stub: interactions_pb2_grpc.InteractionsServiceAsyncStub,
    rows: Iterator[MappedRow],
    summary: ImportSummary,
    address: str,
    batch_size: int,
) -> None:
    def requests() -> Iterator[interactions_pb2.IngestInteractionsRequest]:
        for row in rows:
            yield from row.ingests

    async def call(chunk: Iterator[interactions_pb2.IngestInteractionsRequest]) -> None:
        guarded = _Guarded(chunk)
        try:
            response: interactions_pb2.IngestInteractionsResponse = await stub.IngestInteractions(
                _in_messages(guarded)
            )
        except grpc.aio.AioRpcError as e:
            raise _service_error("interactions", address, e) from e
        if guarded.error is not None:
            raise guarded.error
        summary.sent += guarded.count
        summary.stored += response.stored
        summary.duplicates += response.duplicates
        summary.interactions_rejected += response.rejected
        summary.customers_created += response.customers_created
        _count_rejections(summary, "interactions", response.rejections, response.rejected)

    await _in_calls(requests(), batch_size, call)

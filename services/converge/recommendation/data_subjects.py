"""The recommendation service's DataSubjectService (privacy.proto): erases and
exports what every area holds on a customer: decisions, contact ledger, and
the others' data as they add their store to `app.py`'s list (one line each).

Each area's store offers `erase(conn, customer_ids) -> {kind: rows}` (in the
one transaction of the erasure, leaving tombstones where a late writer could
bring the customer back) and `export(customer_ids) -> {kind: [JSON-able
records]}`. Exports are paged here: the records of every area in the areas'
order, each area's in its own stable order, cut into pages under
`max_page_bytes`; the token is the offset of the next record. Whatever an
area erases it also exports (tests/recommendation/test_erasure_sweep.py)."""

from __future__ import annotations

import base64
import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import asyncpg
import grpc
from google.protobuf import struct_pb2

from converge.runtime.database import Connection
from converge.runtime.errors import Violations
from converge.runtime.values import timestamp
from converge.v1 import privacy_pb2, privacy_pb2_grpc

SERVICE = "recommendation"
_TOKEN_PREFIX = "r1:"


class CustomerData(Protocol):
    """An area's store, as the data-subject rights see it."""

    async def erase(self, conn: Connection, customer_ids: Sequence[str]) -> dict[str, int]: ...

    async def export(self, customer_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]: ...


def _struct(record: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update({k: _jsonable(v) for k, v in record.items()})
    return struct


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return str(value)


def _offset(token: str) -> int:
    if not token:
        return 0
    try:
        text = base64.urlsafe_b64decode(token.encode("ascii")).decode("ascii")
        if not text.startswith(_TOKEN_PREFIX):
            raise ValueError(text)
        offset = int(text.removeprefix(_TOKEN_PREFIX))
        if offset < 0:
            raise ValueError(text)
        return offset
    except (ValueError, UnicodeError):
        v = Violations()
        v.add("page_token", "not a page token this service issued")
        v.raise_if_any()
        raise AssertionError("unreachable") from None


def _token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"{_TOKEN_PREFIX}{offset}".encode("ascii")).decode("ascii")


def _ids(customer_ids: Sequence[str]) -> list[str]:
    v = Violations()
    v.check(bool(customer_ids), "customer_ids", "required: at least one customer id")
    v.check(len(customer_ids) <= 1000, "customer_ids", "at most 1000 ids")
    ids: list[str] = []
    for i, value in enumerate(customer_ids):
        try:
            ids.append(str(uuid.UUID(value)))
        except ValueError:
            v.add(f"customer_ids[{i}]", "not a customer id (a UUID)")
    v.raise_if_any()
    return list(dict.fromkeys(ids))


class RecommendationDataSubjects(privacy_pb2_grpc.DataSubjectServiceServicer):
    def __init__(
        self,
        pool: asyncpg.Pool,
        parts: Sequence[CustomerData],
        *,
        max_page_bytes: int,
        clock: Any,
    ) -> None:
        self.pool = pool
        self.parts = list(parts)
        self.max_page_bytes = max_page_bytes
        self.clock = clock

    async def EraseCustomerData(
        self,
        request: privacy_pb2.EraseCustomerDataRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> privacy_pb2.EraseCustomerDataResponse:
        ids = _ids(request.customer_ids)
        counts: dict[str, int] = {}
        async with self.pool.acquire() as conn, conn.transaction():
            # Last area first: a later area's rows may hang off an earlier
            # one's (outcomes cascade from decisions, 0009), so each area
            # counts its own rows before a cascade takes them; and the contact
            # lock is taken before the decisions are deleted, so a Recommend
            # committing meanwhile (which holds it) is wholly before the delete.
            for part in reversed(self.parts):
                for kind, rows in (await part.erase(conn, ids)).items():
                    counts[kind] = counts.get(kind, 0) + rows
        return privacy_pb2.EraseCustomerDataResponse(service=SERVICE, erased_counts=counts)

    async def ExportCustomerData(
        self,
        request: privacy_pb2.ExportCustomerDataRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> privacy_pb2.ExportCustomerDataResponse:
        ids = _ids(request.customer_ids)
        offset = _offset(request.page_token)
        records: list[tuple[str, Mapping[str, Any]]] = []
        for part in self.parts:
            for kind, rows in (await part.export(ids)).items():
                records.extend((kind, row) for row in rows)
        sections: dict[str, privacy_pb2.ExportedRecords] = {}
        size = 0
        position = offset
        token = ""
        while position < len(records):
            kind, row = records[position]
            struct = _struct(row)
            record_size = struct.ByteSize() + 8
            if sections and size + record_size > self.max_page_bytes:
                token = _token(position)
                break
            sections.setdefault(kind, privacy_pb2.ExportedRecords(kind=kind)).records.append(struct)
            size += record_size
            position += 1
        return privacy_pb2.ExportCustomerDataResponse(
            service=SERVICE,
            sections=list(sections.values()),
            exported_at=timestamp(self.clock()),
            next_page_token=token,
        )

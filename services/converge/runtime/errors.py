"""One error hierarchy for every service, each class carrying its gRPC status.

Service and store code raise these; the server interceptor turns them into a
status with `google.rpc` details. Anything else becomes INTERNAL with the
traceback logged and never sent.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import asyncpg
import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: its path (`identifiers[0].value`) and what is wrong."""

    field: str
    description: str


class ConvergeError(Exception):
    """Base of every error a caller may see."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def details(self) -> list[any_pb2.Any]:
        """`google.rpc` detail messages sent with the status."""
        return []

    def rpc_status(self) -> status_pb2.Status:
        """The error as a `google.rpc.Status` (code, message, details): what a
        failed call carries, and what a response carries for each of its items
        that failed (a rejected row of a batch), so both read alike."""
        code_value: int = self.code.value[0]
        return status_pb2.Status(code=code_value, message=self.message, details=self.details())

    def to_status(self, request_id: str | None = None) -> grpc.Status:
        """The status sent to the caller, with details and the request id."""
        detail = self.rpc_status()
        if request_id:
            info = error_details_pb2.RequestInfo(request_id=request_id)
            packed = any_pb2.Any()
            packed.Pack(info)
            detail.details.append(packed)
        return rpc_status.to_status(detail)


class InvalidArgument(ConvergeError):
    """The request itself is wrong; the field violations say where."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, violations: Sequence[FieldViolation], message: str | None = None) -> None:
        self.violations = list(violations)
        summary = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message or f"invalid request: {summary}")

    def details(self) -> list[any_pb2.Any]:
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [packed]


class NotFound(ConvergeError):
    """The entity asked for does not exist."""

    code = grpc.StatusCode.NOT_FOUND

    def __init__(self, kind: str, key: str) -> None:
        super().__init__(f"{kind} {key!r} not found")
        self.kind = kind
        self.key = key

    def details(self) -> list[any_pb2.Any]:
        packed = any_pb2.Any()
        packed.Pack(error_details_pb2.ResourceInfo(resource_type=self.kind, resource_name=self.key))
        return [packed]


class AlreadyExists(ConvergeError):
    """Creating something that exists already."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(ConvergeError):
    """A concurrent change got in the way; the caller may retry."""

    code = grpc.StatusCode.ABORTED


class FailedPrecondition(ConvergeError):
    """The system is not in a state that allows the change (for example a merge conflict)."""

    code = grpc.StatusCode.FAILED_PRECONDITION

    def __init__(self, message: str, violations: Iterable[tuple[str, str, str]] = ()) -> None:
        super().__init__(message)
        # (type, subject, description) as in google.rpc.PreconditionFailure.
        self.violations = list(violations)

    def details(self) -> list[any_pb2.Any]:
        if not self.violations:
            return []
        failure = error_details_pb2.PreconditionFailure(
            violations=[
                error_details_pb2.PreconditionFailure.Violation(
                    type=kind, subject=subject, description=description
                )
                for kind, subject, description in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(failure)
        return [packed]


class Unavailable(ConvergeError):
    """A dependency (the database, another service) cannot be reached; retry later."""

    code = grpc.StatusCode.UNAVAILABLE


class ResourceExhausted(ConvergeError):
    """Too much load or a request over a size limit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(ConvergeError):
    """The caller's deadline passed before the work could be done (or begun)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(ConvergeError):
    """Something unexpected; details are logged, never sent."""

    code = grpc.StatusCode.INTERNAL


def field_status(field_path: str, reason: str) -> status_pb2.Status:
    """The per-item status of an item refused because of one field:
    INVALID_ARGUMENT, the reason as its message, a BadRequest naming the field."""
    return InvalidArgument([FieldViolation(field_path, reason)], message=reason).rpc_status()


@dataclass(frozen=True)
class ItemError:
    """A per-item `google.rpc.Status` as a caller reads it: its code, the
    field at fault ("" when no field is) and why, for people."""

    code: grpc.StatusCode
    field: str
    reason: str


def read_status(status: status_pb2.Status) -> ItemError:
    """Reads a per-item status: the first BadRequest field violation gives the
    field and the reason; without one the status message is the reason."""
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request) and bad_request.field_violations:
            violation = bad_request.field_violations[0]
            return ItemError(code, violation.field, violation.description or status.message)
    return ItemError(code, "", status.message)


@dataclass
class Violations:
    """Collects every bad field of a request, so the caller learns all of them at once."""

    found: list[FieldViolation] = field(default_factory=list)

    def add(self, field_path: str, description: str) -> None:
        self.found.append(FieldViolation(field_path, description))

    def check(self, ok: bool, field_path: str, description: str) -> None:
        if not ok:
            self.add(field_path, description)

    def raise_if_any(self) -> None:
        if self.found:
            raise InvalidArgument(self.found)


# Errors that mean PostgreSQL cannot be reached or is restarting, as opposed to
# errors in a statement: the caller gets UNAVAILABLE and may retry. Classified
# by SQLSTATE: class 08 (connection), 57P (shutdown, not accepting), 53300 (too
# many connections), 3D000 and 28xxx (database or login gone at reconnect).
_OUTAGE_SQLSTATES = ("08", "57P", "53300", "3D000", "28")
_CONNECTION_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.InterfaceError,
    ConnectionError,
    OSError,
)


# What asyncpg raises when a connection dies in the middle of an operation (the
# server shut down under it) and the pool then resets it on release: its
# protocol is left mid-operation. Seen when PostgreSQL stops under load.
_BROKEN_PROTOCOL = "cannot switch to state"


def _is_database_outage(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.PostgresError):
        sqlstate = getattr(exc, "sqlstate", None) or ""
        return sqlstate.startswith(_OUTAGE_SQLSTATES)
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return str(exc).startswith(_BROKEN_PROTOCOL)
    return isinstance(exc, _CONNECTION_FAILURES)


def translate(exc: BaseException) -> ConvergeError | None:
    """Maps a known non-domain exception to a domain error; None means unexpected."""
    if isinstance(exc, ConvergeError):
        return exc
    if isinstance(
        exc, asyncpg.exceptions.SerializationError | asyncpg.exceptions.DeadlockDetectedError
    ):
        return Aborted("concurrent change, retry the request")
    if _is_database_outage(exc):
        return Unavailable("the database is unavailable, retry later")
    if isinstance(exc, TimeoutError):
        return Unavailable("a dependency timed out, retry later")
    return None

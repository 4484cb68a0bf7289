"""Small builders and assertions shared by the identity tests."""

from __future__ import annotations

import uuid

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from converge.v1 import common_pb2

EMAIL = common_pb2.IDENTIFIER_TYPE_EMAIL
PHONE = common_pb2.IDENTIFIER_TYPE_PHONE
CRM = common_pb2.IDENTIFIER_TYPE_CRM_ID
DEVICE = common_pb2.IDENTIFIER_TYPE_DEVICE_ID
DESK = common_pb2.IDENTIFIER_TYPE_SERVICE_DESK_USER_ID


def ident(kind: int, value: str, source: str = "") -> common_pb2.Identifier:
    return common_pb2.Identifier(type=kind, value=value, source=source)  # type: ignore[arg-type]


def unique_email() -> str:
    return f"person-{uuid.uuid4().hex[:10]}@example.com"


def field_violations(error: grpc.aio.AioRpcError) -> dict[str, str]:
    """The google.rpc.BadRequest field violations carried by an error."""
    status = rpc_status.from_call(error)
    assert status is not None, "no rich status details on the error"
    found: dict[str, str] = {}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            found.update({v.field: v.description for v in bad.field_violations})
    return found


def precondition_subjects(error: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    subjects = []
    for detail in status.details:
        if detail.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR):
            failure = error_details_pb2.PreconditionFailure()
            detail.Unpack(failure)
            subjects += [v.subject for v in failure.violations]
    return subjects

"""Per-item errors (a rejected row of a batch) are `google.rpc.Status`es built
and read by one helper, in the same shape as a failed call's status."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

from converge.runtime.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    field_status,
    read_status,
)


def _call_status(error: InvalidArgument | NotFound) -> status_pb2.Status:
    """The `google.rpc.Status` a failed call carries in its trailing metadata."""
    sent = error.to_status("req-1")
    [packed] = [v for k, v in sent.trailing_metadata if k == "grpc-status-details-bin"]
    return status_pb2.Status.FromString(packed)


def test_an_item_status_has_the_code_message_and_details_of_a_failed_call() -> None:
    error = InvalidArgument([FieldViolation("identifiers[0].value", "not an email address")])
    item, call = error.rpc_status(), _call_status(error)
    assert (item.code, item.message) == (call.code, call.message)
    assert item.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # The call adds only its request id (RequestInfo) to the same details.
    assert list(item.details) == list(call.details)[: len(item.details)]
    assert len(call.details) == len(item.details) + 1


def test_a_field_status_reads_back_as_its_field_and_reason() -> None:
    status = field_status("interaction.attributes.score", "must be from 0 to 10")
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "interaction.attributes.score"
    read = read_status(status)
    assert (read.code, read.field, read.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "interaction.attributes.score",
        "must be from 0 to 10",
    )


def test_a_status_without_a_field_reads_as_its_code_and_message() -> None:
    read = read_status(NotFound("customer", "c-1").rpc_status())
    assert (read.code, read.field, read.reason) == (
        grpc.StatusCode.NOT_FOUND,
        "",
        "customer 'c-1' not found",
    )
    refused = read_status(FailedPrecondition("merge refused", [("MERGE", "c-1", "x")]).rpc_status())
    assert (refused.code, refused.field, refused.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "",
        "merge refused",
    )

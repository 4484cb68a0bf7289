"""The one error mapping, through a real server with the runtime's interceptor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from importlib.resources import files
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from converge.identity.app import SPEC as IDENTITY
from converge.identity.settings import IdentitySettings
from converge.runtime import errors
from converge.runtime.server import ServiceContext, ServiceRuntime, ServiceSpec
from converge.runtime.settings import ServiceSettings
from converge.v1 import common_pb2, identity_pb2, identity_pb2_grpc, privacy_pb2, privacy_pb2_grpc


class FailingDataSubjects(privacy_pb2_grpc.DataSubjectServiceServicer):
    """A throwaway service whose handlers fail in chosen ways."""

    async def EraseCustomerData(self, request, context):  # type: ignore[no-untyped-def]
        raise ZeroDivisionError("secret internals: password=hunter2")

    async def ExportCustomerData(self, request, context):  # type: ignore[no-untyped-def]
        raise errors.InvalidArgument([errors.FieldViolation("customer_ids[0]", "not a UUID")])


async def _register(server: grpc.aio.Server, context: ServiceContext) -> list[str]:
    privacy_pb2_grpc.add_DataSubjectServiceServicer_to_server(FailingDataSubjects(), server)
    return ["converge.v1.DataSubjectService"]


FAILING = ServiceSpec("failing", files("tests.runtime") / "empty_migrations", _register)


@pytest.fixture
async def failing_stub(database: str) -> AsyncIterator[privacy_pb2_grpc.DataSubjectServiceStub]:
    runtime = ServiceRuntime(FAILING, ServiceSettings(database_url=database, port=0))
    await runtime.start()
    async with grpc.aio.insecure_channel(runtime.address) as channel:
        yield privacy_pb2_grpc.DataSubjectServiceStub(channel)
    await runtime.stop(grace=1)


async def test_unexpected_exception_becomes_internal_without_details(failing_stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await failing_stub.EraseCustomerData(privacy_pb2.EraseCustomerDataRequest())
    assert error.value.code() == grpc.StatusCode.INTERNAL
    assert "hunter2" not in (error.value.details() or "")
    assert "Traceback" not in (error.value.details() or "")
    assert "request id" in (error.value.details() or "")


async def test_domain_error_carries_field_violations_and_request_id(failing_stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await failing_stub.ExportCustomerData(
            privacy_pb2.ExportCustomerDataRequest(), metadata=(("x-request-id", "abc"),)
        )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error.value)
    assert status is not None
    kinds = {d.TypeName() for d in status.details}
    assert kinds == {"google.rpc.BadRequest", "google.rpc.RequestInfo"}
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            assert [v.field for v in bad.field_violations] == ["customer_ids[0]"]
        else:
            info = error_details_pb2.RequestInfo()
            detail.Unpack(info)
            assert info.request_id == "abc"


async def test_bad_field_is_named_in_invalid_argument(database: str) -> None:
    runtime = ServiceRuntime(IDENTITY, IdentitySettings(database_url=database, port=0))
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Resolve(
                    identity_pb2.ResolveRequest(
                        identifiers=[
                            common_pb2.Identifier(
                                type=common_pb2.IDENTIFIER_TYPE_EMAIL, value="a@b.co"
                            ),
                            common_pb2.Identifier(
                                type=common_pb2.IDENTIFIER_TYPE_PHONE, value="call me"
                            ),
                        ]
                    )
                )
    finally:
        await runtime.stop(grace=1)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(error.value)
    assert status is not None
    bad = error_details_pb2.BadRequest()
    next(d for d in status.details if d.Is(bad.DESCRIPTOR)).Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["identifiers[1].value"]


async def test_database_outage_is_unavailable_not_unknown(postgres_url: str, database: str) -> None:
    runtime = ServiceRuntime(IDENTITY, IdentitySettings(database_url=database, port=0))
    await runtime.start()
    try:
        async with grpc.aio.insecure_channel(runtime.address) as channel:
            stub = identity_pb2_grpc.IdentityServiceStub(channel)
            name = urlsplit(database).path.lstrip("/")
            admin = await asyncpg.connect(postgres_url)
            try:  # the database goes away under the running service
                await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
            finally:
                await admin.close()
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.Resolve(
                    identity_pb2.ResolveRequest(
                        identifiers=[
                            common_pb2.Identifier(
                                type=common_pb2.IDENTIFIER_TYPE_EMAIL, value="x@y.co"
                            )
                        ]
                    )
                )
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await runtime.stop(grace=1)

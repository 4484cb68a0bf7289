"""The importer's streaming client: rows cut into calls, line numbers and
keys on the wire, the services' answers summed, their rejections counted by
reason, and failures reported with the service's address.

FAKE: the interactions service is being written alongside this connector
and cannot run here yet, so a stand-in servicer on a real grpc.aio server
answers `IngestInteractions` (storing each key once, rejecting what it is
told to). The end-to-end test against the real service belongs to that
service's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from converge.connectors.importer import ServiceFailed, import_file
from converge.connectors.mapping import load_mapping
from converge.v1 import interactions_pb2, interactions_pb2_grpc


class FakeInteractions(interactions_pb2_grpc.InteractionsServiceServicer):
    """Stores keys once; rejects rows whose amount is negative; can refuse a call."""

    def __init__(self) -> None:
        self.keys: set[str] = set()
        self.calls: list[list[interactions_pb2.IngestInteractionsRequest]] = []
        self.refuse_with: grpc.StatusCode | None = None

    async def IngestInteractions(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[interactions_pb2.IngestInteractionsRequest],
        context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
    ) -> interactions_pb2.IngestInteractionsResponse:
        if self.refuse_with is not None:
            await context.abort(self.refuse_with, "refused by the test")
        response = interactions_pb2.IngestInteractionsResponse()
        received = []
        async for request in request_iterator:
            received.append(request)
            response.received += 1
            if request.interaction.amount.units < 0 or request.interaction.amount.nanos < 0:
                response.rejected += 1
                if len(response.rejections) < 1:  # list only one, like a capped list
                    response.rejections.add(
                        row_ref=request.row_ref,
                        idempotency_key=request.idempotency_key,
                        field="interaction.amount",
                        reason="must not be negative",
                    )
            elif request.idempotency_key in self.keys:
                response.duplicates += 1
            else:
                self.keys.add(request.idempotency_key)
                response.stored += 1
        self.calls.append(received)
        return response


@pytest.fixture
async def fake() -> AsyncIterator[tuple[FakeInteractions, str]]:
    server = grpc.aio.server()
    servicer = FakeInteractions()
    interactions_pb2_grpc.add_InteractionsServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield servicer, f"127.0.0.1:{port}"
    await server.stop(None)


def purchases(tmp_path: Path) -> Path:
    path = tmp_path / "log.txt"
    rows = [f"{n:05d} 199701{(n % 28) + 1:02d} 1 {n}.50" for n in range(1, 11)]
    rows[1] = "00002 19970103 1 -1.00"  # the service rejects it
    rows[3] = "00004 19970105 1 -2.00"  # the service rejects it, unlisted (same call)
    rows[6] = "00007 1997-01-08 1 2.00"  # the mapping rejects it
    path.write_text("customer_id date number_of_cds dollar_value\n" + "\n".join(rows) + "\n")
    return path


async def test_rows_go_out_in_calls_with_line_numbers_and_the_answers_add_up(
    fake: tuple[FakeInteractions, str], tmp_path: Path
) -> None:
    servicer, address = fake
    path = purchases(tmp_path)
    mapping = load_mapping("cdnow_purchases")
    seen: list[tuple[str, int]] = []

    summary = await import_file(
        path,
        mapping,
        interactions_address=address,
        batch_size=4,
        progress=lambda phase, n: seen.append((phase, n)),
    )
    assert [len(call) for call in servicer.calls] == [4, 4, 1]
    sent = [r for call in servicer.calls for r in call]
    assert [r.row_ref for r in sent] == ["2", "3", "4", "5", "6", "7", "9", "10", "11"]
    assert sent[0].idempotency_key == "00001:19970102:1"
    assert (summary.read, summary.mapped, summary.rejected_locally) == (10, 9, 1)
    assert (summary.sent, summary.stored, summary.duplicates) == (9, 7, 0)
    assert summary.interactions_rejected == 2
    assert summary.rejected == 3
    assert summary.rejection_reasons == {
        "date: not a time in format %Y%m%d": 1,
        "[interactions] interaction.amount: must not be negative": 1,
        "[interactions] (more rows, not listed by the service)": 1,
    }
    assert {(r.line, r.by) for r in summary.rejections} == {(8, "mapping"), (3, "interactions")}
    assert seen[-1] == ("interactions", 10)

    again = await import_file(path, mapping, interactions_address=address, batch_size=100)
    assert (again.sent, again.stored, again.duplicates) == (9, 0, 7)
    assert [r.idempotency_key for r in servicer.calls[-1]] == [r.idempotency_key for r in sent]


async def test_a_refused_call_is_reported_with_the_service_address(
    fake: tuple[FakeInteractions, str], tmp_path: Path
) -> None:
    servicer, address = fake
    servicer.refuse_with = grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(ServiceFailed, match=f"interactions service at {address} failed"):
        await import_file(
            purchases(tmp_path), load_mapping("cdnow_purchases"), interactions_address=address
        )

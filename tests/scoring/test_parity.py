"""One transform, not two: the row a model reads when scoring a customer live
equals the training row built for the same customer at the same moment, and
the features come through shared reads; interactions too slow means
UNAVAILABLE.

The moment is the live features' `as_of` (the interactions service's clock
when it read them): the training row is asked for exactly that time, the way
`converge models train` asks (GetPointInTimeFeatures, the profile as of the
cutoff, `assemble_columns`, `NativeModel.prepare`)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from converge.models.registry import ModelRegistry
from converge.models.trainingset import (
    LabelRow,
    assemble_columns,
    point_in_time_columns,
    profiles_as_of,
)
from converge.runtime.errors import ConvergeError, FieldViolation, InvalidArgument, NotFound
from converge.runtime.executor import CpuExecutor
from converge.runtime.server import ServiceRuntime
from converge.runtime.values import CustomerKey
from converge.scoring.app import SPEC as SCORING
from converge.scoring.features import FeatureSource
from converge.scoring.models import ModelSlots, RegistrySource
from converge.scoring.service import ScoreQuery, ScoreResult, ScoringService
from converge.v1 import common_pb2, scoring_pb2, scoring_pb2_grpc
from tests.conftest import Platform
from tests.scoring.conftest import Scoring, Versions, make_customer, scoring_settings, set_champion

StartScoring = Callable[[], Awaitable[Scoring]]
SCORED_AT = datetime(2026, 12, 2, 9, 30, tzinfo=UTC)


def training_matrix(
    frame: pd.DataFrame, tracking_uri: str, prediction: str, version: str
) -> np.ndarray:
    """The training side's model input for `frame`: the version's own
    `NativeModel.prepare` (training, evaluation and MLflow's pyfunc use it),
    categories as LightGBM reads them from pandas (their codes; -1 missing)."""
    model = ModelRegistry(tracking_uri=tracking_uri).load_version(prediction, version).model
    # A feature no row of this one-row frame has is missing for the row (in
    # a whole training set, other rows would have made the column).
    frame = frame.assign(**{n: np.nan for n in model.feature_names if n not in frame.columns})
    prepared = model.prepare(frame)
    columns = []
    for name in model.feature_names:
        column = prepared[name]
        if isinstance(column.dtype, pd.CategoricalDtype):
            codes = column.cat.codes.to_numpy().astype(np.float64)
            codes[codes < 0] = np.nan
            columns.append(codes)
        else:
            columns.append(column.to_numpy(dtype=np.float64))
    return np.column_stack(columns)


@pytest.fixture
async def service_layer(platform: Platform, tracking_uri: str) -> AsyncIterator[ScoringService]:
    """The scoring service's rules over the real dependencies, without gRPC
    in front, with a fixed clock for `scored_at`."""
    features = FeatureSource(
        platform.interactions_address,
        platform.identity_address,
        timeout_s=5.0,
        max_batch=64,
        max_in_flight=1,
    )
    catalogue = await features.catalogue()
    slots = ModelSlots(
        RegistrySource(tracking_uri, 1, catalogue.known_features), poll_interval_s=3600
    )
    executor = CpuExecutor(2, 64, name="scoring-test")
    service = ScoringService(
        features,
        slots,
        executor,
        max_batch=64,
        max_in_flight=1,
        replica="test",
        clock=lambda: SCORED_AT,
    )
    yield service
    await slots.close()
    await features.close()
    await executor.close()


async def test_the_row_scored_live_equals_the_training_row_at_the_same_moment(
    platform: Platform, service_layer: ScoringService, tracking_uri: str, versions: Versions
) -> None:
    customer = await make_customer(platform)
    set_champion(tracking_uri, "churn", versions.churn)
    set_champion(tracking_uri, "escalation", versions.escalation)
    set_champion(tracking_uri, "cross_sell", versions.cross_sell)
    await service_layer.slots.start()

    result = await service_layer.score(
        ScoreQuery(
            customer=CustomerKey(customer_id=customer.customer_id),
            ticket_id=customer.ticket_id,
            candidate_product_ids=("broadband",),
        )
    )

    assert result.scored_at == SCORED_AT
    moment = result.features.as_of
    expected = {
        "churn": LabelRow(customer.customer_id, moment, 0),
        "escalation": LabelRow(customer.customer_id, moment, 0, ticket_id=customer.ticket_id),
        "cross_sell": LabelRow(customer.customer_id, moment, 0, product="broadband"),
    }
    version_of = {
        "churn": versions.churn,
        "escalation": versions.escalation,
        "cross_sell": versions.cross_sell,
    }
    assert [s.prediction for s in result.predictions] == ["churn", "escalation", "cross_sell"]
    for scored in result.predictions:
        row = expected[scored.prediction]
        columns, feature_set = await point_in_time_columns(
            platform.interactions_address,
            [(row.customer, row.cutoff, row.ticket_id)],
            scored.prediction,
        )
        profiles = await profiles_as_of(platform.identity_address, [row.customer], row.cutoff)
        frame = assemble_columns(
            scored.prediction,
            [row],
            columns,
            [profiles.get(row.customer)],
            feature_set,
            min_count=1,  # (one row: keep its values; the version maps them onto its own categories)
        )
        trained = training_matrix(
            frame.frame, tracking_uri, scored.prediction, version_of[scored.prediction]
        )
        assert scored.inputs is not None
        np.testing.assert_array_equal(scored.inputs, trained[0])
        # Something was actually compared: known values, a category, the tenure.
        assert np.isfinite(scored.inputs).sum() >= 5


async def test_concurrent_calls_share_feature_reads(
    platform: Platform, service_layer: ScoringService
) -> None:
    customers = [await make_customer(platform, f"c{n}") for n in range(4)]
    await service_layer.slots.start()
    reads = service_layer.features.feature_reads
    before = (reads.batches, reads.items)

    results = await asyncio.gather(
        *(
            service_layer.score(ScoreQuery(customer=CustomerKey(customer_id=c.customer_id)))
            for c in customers * 8
        )
    )

    assert [r.customer_id for r in results] == [c.customer_id for c in customers * 8]
    batches, items = reads.batches - before[0], reads.items - before[1]
    assert items == 32
    # One read in flight at a time (max_in_flight=1): the calls waiting behind
    # the first read all go together into the next one.
    assert batches <= 3, f"{batches} reads for 32 concurrent calls"


async def test_a_stream_scores_what_waits_together_in_order_with_errors_in_place(
    platform: Platform, service_layer: ScoringService, tracking_uri: str, versions: Versions
) -> None:
    """ScoreBatch's rules: items waiting in the window are scored as chunks
    (one shared feature read and one predict job each), answered in the
    order sent, an item's error in its place."""
    customers = [await make_customer(platform, f"s{n}") for n in range(4)]
    set_champion(tracking_uri, "churn", versions.churn)
    await service_layer.slots.start()
    reads, predicts = service_layer.features.feature_reads, service_layer.predicts
    before = (reads.batches, reads.items, predicts.batches)
    refused = InvalidArgument([FieldViolation("customer", "required")])
    sent: list[tuple[int, ScoreQuery | ConvergeError]] = [
        (n, ScoreQuery(customer=CustomerKey(customer_id=c.customer_id)))
        for n, c in enumerate(customers * 8)
    ]
    sent.insert(5, (99, refused))
    sent.insert(9, (98, ScoreQuery(customer=CustomerKey(customer_id=str(uuid.uuid4())))))

    async def stream() -> AsyncIterator[tuple[int, ScoreQuery | ConvergeError]]:
        for entry in sent:
            yield entry

    answers = [a async for a in service_layer.score_stream(stream())]

    assert [key for key, _ in answers] == [key for key, _ in sent]
    by_key = dict(answers)
    assert by_key[99] is refused
    assert isinstance(by_key[98], NotFound)
    scored = [(k, o) for k, o in answers if k not in (98, 99)]
    assert all(isinstance(o, ScoreResult) for _, o in scored)
    assert [o.customer_id for _, o in scored] == [  # type: ignore[union-attr]
        c.customer_id for c in customers * 8
    ]
    batches, items = reads.batches - before[0], reads.items - before[1]
    assert items == 33  # (the refused item is never read)
    # The first item starts at once, alone; the rest wait in the window meanwhile
    # and go together (a chunk holds up to max_batch=64).
    assert batches <= 3, f"{batches} feature reads for 33 items"
    assert predicts.batches - before[2] <= 3


async def test_a_stream_answers_each_item_before_the_next_is_sent(
    platform: Platform, service_layer: ScoringService, tracking_uri: str, versions: Versions
) -> None:
    """A caller that sends one item and waits for its answer before the next
    gets it: nothing waits for a chunk to fill."""
    customer = await make_customer(platform)
    set_champion(tracking_uri, "churn", versions.churn)
    await service_layer.slots.start()
    answered = asyncio.Queue[int]()

    async def stream() -> AsyncIterator[tuple[int, ScoreQuery | ConvergeError]]:
        for n in range(3):
            yield n, ScoreQuery(customer=CustomerKey(customer_id=customer.customer_id))
            assert await asyncio.wait_for(answered.get(), 30) == n

    async def consume() -> list[int]:
        keys = []
        async for key, outcome in service_layer.score_stream(stream()):
            assert isinstance(outcome, ScoreResult)
            keys.append(key)
            answered.put_nowait(key)
        return keys

    assert await asyncio.wait_for(consume(), 60) == [0, 1, 2]


async def test_a_stream_whose_requests_fail_answers_what_came_before_then_fails(
    platform: Platform, service_layer: ScoringService, tracking_uri: str, versions: Versions
) -> None:
    customer = await make_customer(platform)
    set_champion(tracking_uri, "churn", versions.churn)
    await service_layer.slots.start()
    broken = InvalidArgument([FieldViolation("request", "the bytes received are not valid")])

    async def stream() -> AsyncIterator[tuple[int, ScoreQuery | ConvergeError]]:
        for n in range(5):
            yield n, ScoreQuery(customer=CustomerKey(customer_id=customer.customer_id))
        raise broken

    keys = []
    with pytest.raises(InvalidArgument) as raised:
        async for key, outcome in service_layer.score_stream(stream()):
            assert isinstance(outcome, ScoreResult)
            keys.append(key)

    assert raised.value is broken
    assert keys == [0, 1, 2, 3, 4]


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A TCP port that accepts connections and never answers: an
    interactions service too busy to answer in time."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_interactions_too_slow_means_unavailable(
    platform: Platform, database: str, tracking_uri: str, tmp_path: Path
) -> None:
    async with silent_server() as address:
        settings = scoring_settings(platform, database, tracking_uri).model_copy(
            update={"interactions_address": address, "features_timeout_s": 0.3}
        )
        runtime = ServiceRuntime(SCORING, settings)
        await runtime.start()
        try:
            async with grpc.aio.insecure_channel(runtime.address) as channel:
                stub = scoring_pb2_grpc.ScoringServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Score(
                        scoring_pb2.ScoreRequest(
                            customer=common_pb2.CustomerRef(
                                customer_id="00000000-0000-4000-8000-000000000001"
                            )
                        ),
                        timeout=30,
                    )
        finally:
            await runtime.stop(grace=1)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "interactions" in (caught.value.details() or "")

"""Nothing of an erased customer survives in the scoring service's schema:
two customers scored (every answer sampled into the prediction log), one
erased through DataSubjectService, then every column of every table of the
schema read for their id (tests/erasure_sweep.py); the other keeps every row."""

from __future__ import annotations

from converge.v1 import privacy_pb2, scoring_pb2
from tests.conftest import Platform
from tests.erasure_sweep import rows_naming, survivors, tables_with_column
from tests.scoring.conftest import Versions, by_email, make_customer, set_champion
from tests.scoring.test_prediction_log import (  # noqa: F401  (start_logging: a fixture, used by name)
    StartLogging,
    export_all,
    logged,
    start_logging,
)

# The only tables allowed to name an erased customer, and why.
TOMBSTONES = {
    "erased_customers": "an answer written after the erasure is dropped for an erased customer",
}


async def test_nothing_of_an_erased_customer_survives_in_any_table(
    start_logging: StartLogging,  # noqa: F811  (the fixture of test_prediction_log.py)
    platform: Platform,
    tracking_uri: str,
    versions: Versions,
) -> None:
    set_champion(tracking_uri, "churn", versions.churn)
    gone = await make_customer(platform, tag="sweep-gone")
    kept = await make_customer(platform, tag="sweep-kept")
    service = await start_logging()
    for who in (gone, kept, gone, kept):
        await service.scoring.Score(scoring_pb2.ScoreRequest(customer=by_email(who.email)))
    await logged(service.privacy, gone.customer_id, 2)
    await logged(service.privacy, kept.customer_id, 2)

    pool = service.runtime.pool
    async with pool.acquire() as conn:
        holders = await tables_with_column(conn, "customer_id") - TOMBSTONES.keys()
        gone_before = await rows_naming(conn, [gone.customer_id])
        kept_before = await rows_naming(conn, [kept.customer_id])
    assert holders <= gone_before.keys(), f"not filled: {holders - gone_before.keys()}"
    assert holders <= kept_before.keys(), f"not filled: {holders - kept_before.keys()}"
    exported, _ = await export_all(service.privacy, [gone.customer_id])

    erased = await service.privacy.EraseCustomerData(
        privacy_pb2.EraseCustomerDataRequest(customer_ids=[gone.customer_id], erasure_id="sweep")
    )

    async with pool.acquire() as conn:
        gone_after = await rows_naming(conn, [gone.customer_id])
        kept_after = await rows_naming(conn, [kept.customer_id])
    assert survivors(gone_after, TOMBSTONES) == {}
    assert gone_after == {"erased_customers": 1}
    assert kept_after == kept_before
    # What was erased had been exported, row for row.
    assert dict(erased.erased_counts) == {"prediction_log": len(exported)}

"""LightGBM's single-row path (`converge.models.single_row`) answers exactly
what `Booster.predict` answers, for any row, from any thread, and a model
handle uses it for few rows and `Booster.predict` for many."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converge.models.dataset import time_split
from converge.models.handle import ModelHandle
from converge.models.registry import ModelRegistry
from converge.models.single_row import MAX_ROWS, SingleRowPredictor
from converge.models.training import TrainedModel, train
from tests.models.conftest import FAST
from tests.models.test_handle import register, schema_matrix, served_frame

# Inputs as serving builds them: any float, missing as NaN, categories as
# small codes (and codes never seen, which LightGBM sends down its "other" side).
_VALUE = st.one_of(
    st.floats(allow_nan=True, allow_infinity=False, width=64),
    st.just(math.nan),
    st.integers(min_value=-1, max_value=40).map(float),
)


@pytest.fixture(scope="module")
def predictor(big_model: TrainedModel) -> SingleRowPredictor:
    found = SingleRowPredictor(big_model.booster, num_threads=1)
    assert found.available  # (this LightGBM has the C API: the tests below must run)
    return found


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_rows_answer_bit_for_bit_what_booster_predict_answers(
    big_model: TrainedModel, predictor: SingleRowPredictor, data: st.DataObject
) -> None:
    width = big_model.booster.num_feature()
    rows = data.draw(
        st.lists(st.lists(_VALUE, min_size=width, max_size=width), min_size=1, max_size=6)
    )
    matrix = np.asarray(rows, dtype=np.float64)
    booster = big_model.booster

    np.testing.assert_array_equal(predictor.predict(matrix), booster.predict(matrix))
    np.testing.assert_array_equal(
        predictor.contributions(matrix), booster.predict(matrix, pred_contrib=True)
    )


def test_threads_each_get_their_own_config_and_the_same_answers(big_model: TrainedModel) -> None:
    predictor = SingleRowPredictor(big_model.booster, num_threads=1)
    rng = np.random.default_rng(7)
    matrix = rng.normal(0.0, 3.0, (400, big_model.booster.num_feature()))
    matrix[rng.random(matrix.shape) < 0.2] = np.nan
    expected = big_model.booster.predict(matrix, pred_contrib=True)

    threads: set[int] = set()

    def rows(start: int) -> np.ndarray:
        threads.add(threading.get_ident())
        return np.vstack([predictor.contributions(matrix[n : n + 1]) for n in range(start, 400, 4)])

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(rows, range(4)))

    for start, answer in enumerate(answers):
        np.testing.assert_array_equal(answer, expected[start::4])
    assert len(predictor._configs) == len(threads)  # (one per thread: none shared)
    predictor.close()
    assert predictor._configs == []


def test_a_handle_predicts_few_rows_one_by_one_and_many_at_once_with_equal_answers(
    tracking_uri: str,
) -> None:
    split = time_split(served_frame(n_cutoffs=12, per_cutoff=150), gap=timedelta(0))
    registry = ModelRegistry(tracking_uri)
    registered = register(registry, train(split.train, split.valid, FAST), split)
    handle = ModelHandle(registry, "churn", registered.version)
    handle.load()
    handle.check()  # (its stored predictions, reproduced through both paths)
    matrix = schema_matrix(handle, split.test.frame)[:40]

    many = handle.predict(matrix)  # (more than MAX_ROWS: Booster.predict)
    few = np.concatenate([handle.predict(matrix[n : n + MAX_ROWS]) for n in range(0, 40, MAX_ROWS)])
    many_reasons = handle.predict_with_contributions(matrix)
    few_reasons = [handle.predict_with_contributions(matrix[n : n + 1]) for n in range(40)]

    np.testing.assert_array_equal(few, many)
    np.testing.assert_array_equal(np.vstack([c for _, c in few_reasons]), many_reasons[1])
    np.testing.assert_array_equal(np.concatenate([p for p, _ in few_reasons]), many_reasons[0])
    handle.unload()

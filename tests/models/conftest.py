"""Fixtures for the models tests: synthetic frames split by time, models
trained once per session (real LightGBM), and a real MLflow SQLite store per
test under tmp_path, copied from one migrated at the start of the session
(creating one runs MLflow's migrations, which takes seconds)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from converge.models.dataset import Split, time_split
from converge.models.training import TrainedModel, TrainingConfig, train
from tests.models.synthetic import make_frame

# Fast settings for tests: a higher learning rate and shorter patience than the
# defaults, so each model trains in about a second.
FAST = TrainingConfig(learning_rate=0.1, max_rounds=400, early_stopping_rounds=30, num_threads=2)


@pytest.fixture(scope="session", autouse=True)
def _no_mlflow_telemetry() -> Iterator[None]:
    before = os.environ.get("MLFLOW_DISABLE_TELEMETRY")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    yield
    if before is None:
        os.environ.pop("MLFLOW_DISABLE_TELEMETRY", None)
    else:
        os.environ["MLFLOW_DISABLE_TELEMETRY"] = before


@pytest.fixture(scope="session")
def big_split() -> Split:
    """25,000 rows over 50 weekly cutoffs, about 11% positive."""
    return time_split(make_frame(n_cutoffs=50, rows_per_cutoff=500, seed=1, intercept=-3.3))


@pytest.fixture(scope="session")
def big_model(big_split: Split) -> TrainedModel:
    return train(big_split.train, big_split.valid, FAST)


@pytest.fixture(scope="session")
def small_split() -> Split:
    """6,000 rows over 30 weekly cutoffs, for the registry tests."""
    return time_split(make_frame(n_cutoffs=30, rows_per_cutoff=200, seed=2, intercept=-2.8))


@pytest.fixture(scope="session")
def small_model(small_split: Split) -> TrainedModel:
    return train(small_split.train, small_split.valid, FAST)


@pytest.fixture(scope="session")
def _migrated_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def tracking_uri(
    _migrated_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    """A fresh MLflow store for one test. MLflow's global tracking URI is
    left unset and the test runs in an empty working directory, which must
    still be empty afterwards: code that forgot to name the store would fall
    back to MLflow's default ./mlflow.db."""
    store = tmp_path / "mlflow"
    store.mkdir()
    shutil.copy(_migrated_store, store / "mlflow.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield f"sqlite:///{store / 'mlflow.db'}"
    assert not list(cwd.iterdir()), "MLflow fell back to a store in the working directory"

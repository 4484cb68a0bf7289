"""The model handle against a real MLflow store and real LightGBM: load, check,
ready and ref; predictions equal the pyfunc model's; contributions add up to
the log-odds; corrupt or mismatched versions are refused naming what is
wrong; the serving files training stores are read back; and nothing touches
MLflow's process-wide tracking URI."""

from __future__ import annotations

import json
import os
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest

from converge.features.engine import BUILTIN
from converge.features.transform import InputSchema
from converge.models.dataset import Split, TrainingFrame, time_split
from converge.models.evaluation import evaluate
from converge.models.handle import (
    DEFAULT_THRESHOLDS,
    KnownFeatures,
    ModelHandle,
    ModelRef,
    ModelRefused,
)
from converge.models.history import LabelRow
from converge.models.registry import ModelRegistry, RegisteredVersion
from converge.models.serving_artifacts import (
    BAND_SHARES,
    CHECK_ROWS,
    THRESHOLDS_TAG,
    RiskThresholds,
    input_matrix,
)
from converge.models.training import TrainedModel, train
from converge.models.trainingset import assemble_columns
from tests.models.conftest import FAST

T0 = datetime(2025, 3, 3, tzinfo=UTC)
PLANS = ("basic", "plus", "pro")


def served_frame(n_cutoffs: int = 24, per_cutoff: int = 250, seed: int = 5) -> TrainingFrame:
    """Churn rows whose inputs are built-in features and a profile plan, the
    way `trainingset.assemble_columns` builds them for real."""
    rng = np.random.default_rng(seed)
    n = n_cutoffs * per_cutoff
    failures = rng.poisson(0.3, n).astype(np.float64)
    days = rng.exponential(15.0, n)
    logins = rng.poisson(4.0, n).astype(np.float64)
    nps = rng.integers(0, 11, n).astype(np.float64)
    nps[rng.random(n) < 0.3] = np.nan
    plan = rng.integers(0, len(PLANS), n)
    logit = -2.6 + 0.8 * failures + 0.03 * days - 0.2 * logins + np.array([0.6, 0.0, -0.6])[plan]
    labels = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    cutoffs = [T0 + timedelta(weeks=k) for k in range(n_cutoffs)]
    rows = [LabelRow(f"c{i % (2 * per_cutoff)}", cutoffs[i // per_cutoff], int(labels[i])) for i in range(n)]  # fmt: skip
    columns = {
        "payment_failures_30d": failures,
        "days_since_last_interaction": days,
        "count_30d_login": logins,
        "nps_last": nps,
    }
    profiles = [{"plan": PLANS[p], "attributes": {}} for p in plan]
    return assemble_columns("churn", rows, columns, profiles, BUILTIN.version, "synthetic")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def served_split() -> Split:
    return time_split(served_frame(), gap=timedelta(0))


@pytest.fixture(scope="module")
def served_model(served_split: Split) -> TrainedModel:
    return train(served_split.train, served_split.valid, FAST)


def schema_matrix(handle: ModelHandle, frame: pd.DataFrame) -> np.ndarray:
    """The frame's rows as the handle's input matrix (categories by their codes)."""
    columns = {
        name: list(frame[name].astype(object)) if name in handle.schema.categories
        else frame[name].to_numpy()
        for name in handle.schema.names
    }  # fmt: skip
    return handle.schema.matrix(columns, len(frame))


def register(registry: ModelRegistry, model: TrainedModel, split: Split) -> RegisteredVersion:
    frames = {"train": split.train, "valid": split.valid, "test": split.test}
    return registry.log_training(model, evaluate(model, split.test), frames, requested_by="tester")


def stored_model_dir(registry: ModelRegistry, registered: RegisteredVersion) -> Path:
    """Where a local store keeps the version's files (to corrupt them)."""
    uri = registry.client.get_model_version_download_uri(registered.name, registered.version)
    return Path(urlparse(uri).path)


def test_a_handle_loads_checks_and_names_its_version(
    tracking_uri: str, served_split: Split, served_model: TrainedModel
) -> None:
    registry = ModelRegistry(tracking_uri)
    registered = register(registry, served_model, served_split)
    handle = ModelHandle(registry, "churn", registered.version, alias="champion", num_threads=1)
    assert (handle.state, handle.ready) == ("new", False)
    with pytest.raises(RuntimeError, match="not loaded"):
        _ = handle.ref

    handle.load()
    assert (handle.state, handle.ready) == ("loaded", False)
    report = handle.check()  # against the built-in set the version claims
    assert handle.ready
    assert handle.ref == ModelRef(
        "converge-churn", registered.version, registered.run_id, "champion", BUILTIN.version
    )
    assert report.checked_rows == CHECK_ROWS and report.max_difference < 1e-9
    assert report.notes == ()
    assert handle.schema == served_split.train.input_schema
    # The same against the set given as plain data.
    assert handle.check(KnownFeatures.of(BUILTIN)).checked_rows == CHECK_ROWS

    handle.unload()
    assert not handle.ready
    with pytest.raises(RuntimeError):
        handle.predict(np.zeros((1, len(served_model.feature_names))))


def test_predictions_equal_the_pyfunc_models_and_contributions_add_up_to_the_log_odds(
    tracking_uri: str,
    served_split: Split,
    served_model: TrainedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow

    registry = ModelRegistry(tracking_uri)
    registered = register(registry, served_model, served_split)
    handle = ModelHandle(registry, "churn", registered.version, num_threads=2)
    handle.load()
    handle.check()

    test = served_split.test.frame
    matrix = schema_matrix(handle, test)
    probabilities = handle.predict(matrix)

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)
    pyfunc = mlflow.pyfunc.load_model(registered.model_uri)
    np.testing.assert_allclose(probabilities, pyfunc.predict(test), rtol=0, atol=1e-12)

    with_reasons, contributions = handle.predict_with_contributions(matrix)
    assert contributions.shape == (len(test), len(handle.schema.names) + 1)
    np.testing.assert_allclose(with_reasons, probabilities, rtol=0, atol=1e-12)
    log_odds = served_model.booster.predict(matrix, raw_score=True)
    np.testing.assert_allclose(contributions.sum(axis=1), log_odds, rtol=0, atol=1e-9)
    # A row scored alone, as the scoring service builds it, is the same row.
    first = test.iloc[0]
    one = handle.schema.vector(
        {n: first[n] for n in handle.schema.names if not n.startswith("profile_")},
        None,
        {"plan": first["profile_plan"]},
        T0,
    )
    assert handle.predict(one)[0] == pytest.approx(probabilities[0], abs=1e-12)

    assert handle.predict(np.zeros((0, len(handle.schema.names)))).shape == (0,)
    with pytest.raises(ValueError, match=r"reads a matrix of 5 columns \(payment_failures_30d"):
        handle.predict(matrix[:, :3])


def test_serving_files_are_stored_with_the_version_and_read_back(
    tracking_uri: str, served_split: Split, served_model: TrainedModel
) -> None:
    registry = ModelRegistry(tracking_uri)
    registered = register(registry, served_model, served_split)
    handle = ModelHandle(registry, "churn", registered.version)
    handle.load()

    # Thresholds: the validation probabilities at the top 30% / 10% / 2%.
    valid = served_model.predict_proba(served_split.valid.frame)
    thresholds = handle.thresholds
    assert handle.thresholds_stored and thresholds.source == "valid"
    assert thresholds.n == len(valid)
    for band, share in BAND_SHARES.items():
        at = getattr(thresholds, band)
        assert at == np.quantile(valid, 1 - share, method="higher")
        assert np.mean(valid > at) <= share  # at most the share strictly above
    assert thresholds.band(thresholds.critical) == "critical"
    assert thresholds.band(np.nextafter(thresholds.medium, 0)) == "low"
    # The same thresholds on the version (read without a download) and the run.
    tag = json.loads(registry.client.get_model_version("converge-churn", registered.version).tags[THRESHOLDS_TAG])  # fmt: skip
    assert RiskThresholds.from_dict(tag) == thresholds
    params = registry.client.get_run(registered.run_id).data.params
    assert float(params["risk_threshold_high"]) == pytest.approx(thresholds.high)

    # The check sample: rows across the whole range with training's probabilities.
    sample = handle._need().served.check_sample
    assert sample is not None and sample.inputs.shape == (CHECK_ROWS, 5)
    assert sample.probabilities.min() == valid.min() and sample.probabilities.max() == valid.max()
    np.testing.assert_allclose(handle.predict(sample.inputs), sample.probabilities, atol=1e-12)

    # The drift sample: the training population's inputs and scores.
    drift = handle.drift_sample
    assert drift is not None and drift.names == handle.schema.names
    assert len(drift.probabilities) == min(5_000, served_split.train.n_examples)
    np.testing.assert_allclose(handle.predict(drift.inputs), drift.probabilities, atol=1e-12)
    train_matrix = input_matrix(served_model, served_split.train.frame)
    train_rows = {tuple(np.nan_to_num(r, nan=-1.0)) for r in train_matrix}
    assert all(tuple(np.nan_to_num(r, nan=-1.0)) in train_rows for r in drift.inputs[:200])


def test_a_version_without_serving_files_loads_and_check_says_so(
    tracking_uri: str, served_split: Split, served_model: TrainedModel
) -> None:
    import shutil

    registry = ModelRegistry(tracking_uri)
    registered = register(registry, served_model, served_split)
    shutil.rmtree(stored_model_dir(registry, registered) / "artifacts" / "serving")

    handle = ModelHandle(registry, "churn", registered.version)
    handle.load()
    report = handle.check()
    assert handle.ready and report.checked_rows == 0
    assert len(report.notes) == 3
    assert "default 0.2 / 0.5 / 0.8" in report.notes[0]
    assert "no drift reference" in report.notes[1] and "unverified" in report.notes[2]
    assert handle.thresholds == DEFAULT_THRESHOLDS and not handle.thresholds_stored
    assert handle.drift_sample is None


def test_a_corrupt_or_altered_booster_is_refused_naming_what_is_wrong(
    tracking_uri: str, served_split: Split, served_model: TrainedModel
) -> None:
    registry = ModelRegistry(tracking_uri)
    garbled = register(registry, served_model, served_split)
    booster = stored_model_dir(registry, garbled) / "artifacts" / "native" / "booster.txt"
    # Cut short (LightGBM's parser aborts the process on some damaged files:
    # the checksum must stop it first).
    booster.write_text(booster.read_text()[:5000])
    handle = ModelHandle(registry, "churn", garbled.version)
    with pytest.raises(ModelRefused, match=rf"converge-churn version {garbled.version} refused: its booster"):  # fmt: skip
        handle.load()
    assert handle.state == "refused" and "SHA-256 differs" in handle.refusal

    # Another booster, stored consistently (its checksum too): a mix-up only
    # the check sample shows.
    import hashlib

    import lightgbm as lgb

    altered = register(registry, served_model, served_split)
    native_dir = stored_model_dir(registry, altered) / "artifacts" / "native"
    booster = lgb.Booster(model_file=str(native_dir / "booster.txt"))
    for leaf in range(booster.dump_model()["tree_info"][0]["num_leaves"]):
        booster.set_leaf_output(0, leaf, booster.get_leaf_output(0, leaf) + 0.5)
    booster.save_model(str(native_dir / "booster.txt"))
    meta = json.loads((native_dir / "model.json").read_text())
    meta["booster_sha256"] = hashlib.sha256((native_dir / "booster.txt").read_bytes()).hexdigest()
    (native_dir / "model.json").write_text(json.dumps(meta))
    handle = ModelHandle(registry, "churn", altered.version)
    handle.load()
    with pytest.raises(
        ModelRefused, match="does not reproduce the probabilities stored at training"
    ):
        handle.check()
    assert not handle.ready


def test_a_schema_mismatch_is_refused(
    tracking_uri: str,
    served_split: Split,
    served_model: TrainedModel,
    small_split: Split,
    small_model: TrainedModel,
) -> None:
    registry = ModelRegistry(tracking_uri)
    registered = register(registry, served_model, served_split)
    handle = ModelHandle(registry, "churn", registered.version)
    handle.load()

    other = KnownFeatures("builtin-000000000000", frozenset(BUILTIN.by_name))
    with pytest.raises(
        ModelRefused, match=f"trained on feature set {BUILTIN.version}, not builtin-0"
    ):
        handle.check(other)
    fewer = KnownFeatures(BUILTIN.version, frozenset(BUILTIN.by_name) - {"count_30d_login"})
    with pytest.raises(ModelRefused, match=f"inputs unknown to feature set {BUILTIN.version}: count_30d_login"):  # fmt: skip
        handle.check(fewer)
    as_text = KnownFeatures(BUILTIN.version, frozenset(BUILTIN.by_name), frozenset({"nps_last"}))
    with pytest.raises(ModelRefused, match="text features read as numbers: nps_last"):
        handle.check(as_text)
    assert handle.state == "refused"

    # A stored input schema that no longer matches the booster.
    schema_file = (
        stored_model_dir(registry, registered) / "artifacts" / "native" / "input_schema.json"
    )
    data = json.loads(schema_file.read_text())
    data["inputs"] = data["inputs"][:-1]
    schema_file.write_text(json.dumps(data))
    with pytest.raises(ModelRefused, match="differ from the 4 of its input schema"):
        ModelHandle(registry, "churn", registered.version).load()

    # Versions from before input schemas, or on a feature set nobody ships.
    old = register(registry, small_model, small_split)
    with pytest.raises(ModelRefused, match="no input schema"):
        ModelHandle(registry, "churn", old.version).load()
    schema = InputSchema.learn(
        {n: small_split.train.frame[n].to_numpy() for n in ("payment_failures_30d", "noise")}
    )
    narrow = Split(
        *(
            replace(p, feature_names=schema.names, categorical_features=(), input_schema=schema)
            for p in small_split
        )
    )
    unshipped = register(registry, train(narrow.train, narrow.valid, FAST), narrow)
    handle = ModelHandle(registry, "churn", unshipped.version)
    handle.load()
    with pytest.raises(ModelRefused, match="v1-synthetic, which is neither built in nor shipped"):
        handle.check()
    with pytest.raises(ModelRefused, match="inputs unknown to feature set v1-synthetic: noise"):
        handle.check(KnownFeatures("v1-synthetic", frozenset({"payment_failures_30d"})))


def test_logging_and_loading_leave_mlflows_global_tracking_uri_alone(
    tracking_uri: str,
    served_split: Split,
    served_model: TrainedModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A decoy store named by MLflow's global URI and environment: any call
    that fell back on them would create it. And two registries on two stores
    used from two threads at once each find their own versions."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as tracking_utils

    decoy = f"sqlite:///{tmp_path / 'decoy' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", decoy)
    monkeypatch.setattr(tracking_utils, "_tracking_uri", decoy)
    swaps: list[object] = []
    monkeypatch.setattr(mlflow, "set_tracking_uri", lambda uri: swaps.append(uri))

    other_store = tmp_path / "other" / "mlflow.db"
    other_store.parent.mkdir()
    other_store.write_bytes(Path(urlparse(tracking_uri).path).read_bytes())
    first = ModelRegistry(tracking_uri)
    second = ModelRegistry(f"sqlite:///{other_store}")
    v1 = register(first, served_model, served_split)
    assert first.promote("churn", v1.version, served_split.test, requested_by="ann").promoted

    # While the second store logs a training, the first is read and loaded
    # from another thread, again and again.
    loads: list[ModelRef] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def keep_loading() -> None:
        try:
            while not stop.is_set() or not loads:
                handle = ModelHandle.for_alias(first, "churn", "champion")
                assert handle is not None
                handle.load()
                handle.check()
                loads.append(handle.ref)
        except BaseException as e:
            errors.append(e)

    reader = threading.Thread(target=keep_loading)
    reader.start()
    try:
        v_other = register(second, served_model, served_split)
    finally:
        stop.set()
        reader.join(timeout=120)
    assert not errors, errors
    assert loads and {r.version for r in loads} == {v1.version}
    assert {r.run_id for r in loads} == {v1.run_id}
    assert v_other.version == "1" and second.versions("churn")[0]["run_id"] == v_other.run_id
    assert [v["run_id"] for v in first.versions("churn")] == [v1.run_id]

    assert swaps == []
    assert tracking_utils._tracking_uri == decoy
    assert os.environ["MLFLOW_TRACKING_URI"] == decoy
    assert not (tmp_path / "decoy").exists()

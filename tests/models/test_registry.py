"""The MLflow side, against a real SQLite tracking store and registry in
tmp_path: logging, pyfunc loading, promotion gates, aliases, their history,
rollback and the command line."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from converge.models import cli
from converge.models.dataset import Split, TrainingFrame
from converge.models.evaluation import evaluate, save_plots
from converge.models.registry import (
    CHALLENGER,
    CHAMPION,
    ModelNotFound,
    ModelRegistry,
    NothingToRollBack,
    RegisteredVersion,
    ServingState,
    tracking_uri_default,
)
from converge.models.training import TrainedModel, train
from tests.models.conftest import FAST

pytestmark = pytest.mark.slow


def register(
    registry: ModelRegistry,
    model: TrainedModel,
    split: Split,
    plots_dir: Path | None = None,
) -> RegisteredVersion:
    result = evaluate(model, split.test)
    plots = save_plots(model, result, plots_dir) if plots_dir else []
    frames = {"train": split.train, "valid": split.valid, "test": split.test}
    return registry.log_training(model, result, frames, plots, requested_by="tester")


def shuffled(frame: TrainingFrame, seed: int) -> TrainingFrame:
    labels = np.random.default_rng(seed).permutation(frame.frame["label"].to_numpy())
    return replace(frame, frame=frame.frame.assign(label=labels))


def test_tracking_uri_defaults_to_sqlite_under_the_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri_default(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert tracking_uri_default(tmp_path) == "http://mlflow.example:5000"


def test_logged_model_loads_through_pyfunc_and_predicts_the_same_probabilities(
    tracking_uri: str,
    small_split: Split,
    small_model: TrainedModel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import mlflow

    registry = ModelRegistry(tracking_uri)
    registered = register(registry, small_model, small_split, tmp_path / "plots")
    assert (registered.name, registered.version) == ("converge-churn", "1")

    # As anyone would use it: plain MLflow, pointed at the store by environment.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking_uri)

    pyfunc = mlflow.pyfunc.load_model(registered.model_uri)
    frame = small_split.test.frame
    np.testing.assert_allclose(pyfunc.predict(frame), small_model.predict_proba(frame))
    # As a serving request would send it: categories as plain strings.
    as_json = frame[list(small_model.feature_names)].assign(plan=frame["plan"].astype(str))
    np.testing.assert_allclose(pyfunc.predict(as_json), small_model.predict_proba(frame))

    signature = pyfunc.metadata.get_input_schema().to_dict()
    assert [c["name"] for c in signature] == list(small_model.feature_names)

    run = mlflow.get_run(registered.run_id)
    assert run.data.metrics["test_roc_auc"] == pytest.approx(
        evaluate(small_model, small_split.test).roc_auc
    )
    assert run.data.tags["converge.feature_set_version"] == "v1-synthetic"
    assert run.data.tags["converge.training_window_start"].startswith("2025-01-06")
    assert run.data.params["calibration"] == "sigmoid"
    contexts = sorted(
        tag.value
        for ds in run.inputs.dataset_inputs
        for tag in ds.tags
        if tag.key == "mlflow.data.context"
    )
    assert contexts == ["testing", "training", "validation"]
    artifacts = {
        a.path for a in mlflow.MlflowClient(tracking_uri).list_artifacts(run.info.run_id, "plots")
    }
    assert artifacts == {"plots/roc.png", "plots/calibration.png", "plots/feature_importance.png"}

    # Nothing was promoted by registering.
    with pytest.raises(ModelNotFound):
        registry.load_champion("churn")
    version = registry.client.get_model_version("converge-churn", "1")
    assert version.tags["converge.prediction"] == "churn"
    assert json.loads(version.tags["converge.feature_schema"])["categorical_features"] == ["plan"]


def test_train_register_promote_promote_rollback_cycle(
    tracking_uri: str, small_split: Split, small_model: TrainedModel
) -> None:
    registry = ModelRegistry(tracking_uri)
    v1 = register(registry, small_model, small_split)
    first = registry.promote("churn", v1.version, small_split.test, requested_by="alice")
    assert first.promoted, first.reasons
    assert first.champion_version is None
    champion = registry.load_champion("churn")
    assert (champion.version, champion.run_id, champion.alias) == ("1", v1.run_id, CHAMPION)
    frame = small_split.test.frame
    np.testing.assert_allclose(
        champion.model.predict_proba(frame), small_model.predict_proba(frame)
    )

    # Re-registered as is: this test is about the lifecycle, not the gates.
    v2 = register(registry, small_model, small_split)
    second = registry.promote(
        "churn", v2.version, small_split.test, requested_by="bob", reason="monthly retrain"
    )
    assert second.promoted, second.reasons
    assert second.champion_version == "1" and second.champion is not None
    assert registry.load_champion("churn").version == "2"
    assert registry.load_champion("churn", alias=CHALLENGER).version == "1"
    tags = registry.client.get_model_version("converge-churn", "2").tags
    assert tags["converge.promotion.decision"] == "promoted"
    assert tags["converge.promotion.requested_by"] == "bob"
    assert float(tags["converge.promotion.champion_auc"]) == pytest.approx(
        second.champion.roc_auc, abs=1e-6
    )

    between = datetime.now(UTC)
    time.sleep(0.01)
    rolled = registry.rollback("churn", requested_by="carol", reason="alerts look wrong")
    assert (rolled.from_version, rolled.to_version) == ("2", "1")
    assert registry.load_champion("churn").version == "1"
    with pytest.raises(ModelNotFound):
        registry.load_champion("churn", alias=CHALLENGER)
    with pytest.raises(NothingToRollBack):
        registry.rollback("churn", requested_by="carol")

    history = registry.alias_history("churn", CHAMPION)
    assert [(p.version, p.action, p.who) for p in history] == [
        ("1", "promote", "alice"),
        ("2", "promote", "bob"),
        ("1", "rollback", "carol"),
    ]
    assert history[0].to_time == history[1].from_time
    assert history[1].to_time == history[2].from_time and history[2].to_time is None
    assert "monthly retrain" in history[1].why
    assert registry.version_at("churn", between) == "2"
    assert registry.version_at("churn", datetime.now(UTC)) == "1"
    challenger_periods = registry.alias_history("churn", CHALLENGER)
    assert [(p.version, p.to_time is None) for p in challenger_periods] == [("1", False)]

    summary = {s.prediction: s for s in registry.list_models()}
    assert summary["churn"].champion == "1" and summary["churn"].versions == 2
    assert summary["churn"].challenger is None
    assert not summary["escalation"].exists


def test_gate_refuses_a_worse_candidate_and_records_why(
    tracking_uri: str, small_split: Split, small_model: TrainedModel
) -> None:
    registry = ModelRegistry(tracking_uri)
    v1 = register(registry, small_model, small_split)
    assert registry.promote("churn", v1.version, small_split.test, requested_by="alice").promoted

    noise = train(shuffled(small_split.train, 1), shuffled(small_split.valid, 2), FAST)
    v2 = register(registry, noise, small_split)
    decision = registry.promote("churn", v2.version, small_split.test, requested_by="mallory")
    assert not decision.promoted
    assert decision.candidate is not None and decision.champion is not None
    assert decision.candidate.roc_auc < decision.champion.roc_auc - 0.1
    assert any("AUC" in r and "below champion v1" in r for r in decision.reasons)
    assert registry.load_champion("churn").version == "1"
    with pytest.raises(ModelNotFound):  # a refused candidate gets no alias
        registry.load_champion("churn", alias=CHALLENGER)

    tags = registry.client.get_model_version("converge-churn", v2.version).tags
    assert tags["converge.promotion.decision"] == "refused"
    assert tags["converge.promotion.requested_by"] == "mallory"
    assert "below champion v1" in tags["converge.promotion.reasons"]
    last = json.loads(
        registry.client.get_registered_model("converge-churn").tags["converge.last_promotion"]
    )
    assert last["version"] == v2.version and last["promoted"] is False
    assert [p.version for p in registry.alias_history("churn")] == ["1"]


def test_gate_refuses_a_different_feature_schema(
    tracking_uri: str, small_split: Split, small_model: TrainedModel
) -> None:
    registry = ModelRegistry(tracking_uri)
    v1 = register(registry, small_model, small_split)
    assert registry.promote("churn", v1.version, small_split.test, requested_by="alice").promoted

    fewer = tuple(f for f in small_split.train.feature_names if f != "noise")
    narrow = Split(*(replace(part, feature_names=fewer) for part in small_split))
    v2 = register(registry, train(narrow.train, narrow.valid, FAST), narrow)
    decision = registry.promote("churn", v2.version, small_split.test, requested_by="alice")
    assert not decision.promoted
    assert any("feature schema differs" in r and "noise" in r for r in decision.reasons)
    assert registry.load_champion("churn").version == "1"

    waived = registry.promote(
        "churn", v2.version, small_split.test, requested_by="alice", allow_schema_change=True
    )
    assert waived.promoted and any("waived by alice" in r for r in waived.reasons)


def test_cli_lists_promotes_and_shows_history_as_json(
    tracking_uri: str,
    small_split: Split,
    small_model: TrainedModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = ModelRegistry(tracking_uri)
    v1 = register(registry, small_model, small_split)
    frame_path = tmp_path / "recent.parquet"
    small_split.test.frame.to_parquet(frame_path)
    common = ["--tracking-uri", tracking_uri, "--json"]

    code = cli.main(["promote", "churn", v1.version, "--frame", str(frame_path),
                     "--requested-by", "dana", *common])  # fmt: skip
    decision = json.loads(capsys.readouterr().out)
    assert code == cli.EXIT_OK and decision["promoted"] is True

    assert cli.main(["list", *common]) == cli.EXIT_OK
    listed = {m["prediction"]: m for m in json.loads(capsys.readouterr().out)}
    assert listed["churn"]["champion"] == "1"

    assert cli.main(["history", "churn", *common]) == cli.EXIT_OK
    history = json.loads(capsys.readouterr().out)
    assert [(p["alias"], p["version"], p["who"]) for p in history] == [("champion", "1", "dana")]

    assert cli.main(["evaluate", "churn", "--frame", str(frame_path), *common]) == cli.EXIT_OK
    figures = json.loads(capsys.readouterr().out)
    assert figures["version"] == "1" and figures["roc_auc"] > 0.7

    assert cli.main(["rollback", "churn", "--requested-by", "dana", *common]) == cli.EXIT_REFUSED
    assert cli.main(["promote", "churn", "9", "--frame", str(frame_path), *common]) == (
        cli.EXIT_NOT_FOUND
    )


def test_cli_exits_3_when_mlflow_is_unreachable(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    code = cli.main(["list", "--tracking-uri", "http://127.0.0.1:9"])
    assert code == cli.EXIT_UNREACHABLE
    assert "MLflow is unreachable" in capsys.readouterr().err
    assert time.monotonic() - started < 10


def test_cli_plugs_into_a_top_level_parser_and_takes_extra_commands(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import argparse

    monkeypatch.setattr(cli, "_EXTENSIONS", [])
    seen: list[str] = []

    def configure(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("prediction")

    def handler(args: argparse.Namespace, ctx: cli.Context) -> int:
        seen.append(args.prediction)
        return 0

    cli.register_command("train", "train a model", configure, handler)
    top = argparse.ArgumentParser(prog="converge")
    cli.add_subcommands(top.add_subparsers(dest="command", required=True))
    args = top.parse_args(["models", "train", "escalation", "--json"])
    assert args.run(args) == 0 and seen == ["escalation"]
    with pytest.raises(SystemExit):
        top.parse_args(["models", "promote", "churn"])  # the version is required


def test_promote_with_rollout_restarts_scoring_unless_it_hot_swaps(
    tracking_uri: str,
    small_split: Split,
    small_model: TrainedModel,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`converge models promote --rollout` against a local HTTP server that
    records what the official Kubernetes client sends (no API server can run
    on this machine): the scoring Deployment's pod template is patched after
    the promotion, and left alone when its replicas swap models themselves."""
    from tests.deploy.fake_kubernetes import fake_kubernetes
    from tests.deploy.test_platform import DEPLOYMENTS, SCORING, deployment, listing

    registry = ModelRegistry(tracking_uri)
    v1 = register(registry, small_model, small_split)
    v2 = register(registry, small_model, small_split)
    frame_path = tmp_path / "recent.parquet"
    small_split.test.frame.to_parquet(frame_path)
    with fake_kubernetes() as fake:
        kubeconfig = fake.kubeconfig(tmp_path)
        rollout = ["--rollout", "--release", "prod", "--kubeconfig", str(kubeconfig)]
        common = ["--tracking-uri", tracking_uri, "--json", "--requested-by", "dana"]
        fake.on("GET", DEPLOYMENTS, (200, listing(deployment("scoring", hot_swap="false"))))
        fake.on("PATCH", SCORING, (200, deployment("scoring", generation=2)))
        done = deployment("scoring", generation=2, replicas=3, updatedReplicas=3,
                          availableReplicas=3)  # fmt: skip
        fake.on("GET", SCORING, (200, done))
        code = cli.main(["promote", "churn", v1.version, "--frame", str(frame_path), *common,
                         *rollout])  # fmt: skip
        answer = json.loads(capsys.readouterr().out)
        assert code == cli.EXIT_OK and answer["promoted"] is True
        assert answer["rollout"]["restarted"] is True
        (patch,) = fake.sent("PATCH", SCORING)
        annotations = patch.body["spec"]["template"]["metadata"]["annotations"]
        assert annotations["converge.io/restart-reason"] == f"promoted {answer['name']} v1"

        fake.on("GET", DEPLOYMENTS, (200, listing(deployment("scoring", hot_swap="true"))))
        code = cli.main(["promote", "churn", v2.version, "--frame", str(frame_path), *common,
                         "--allow-schema-change", *rollout])  # fmt: skip
        answer = json.loads(capsys.readouterr().out)
        assert code == cli.EXIT_OK and answer["rollout"]["restarted"] is False
        assert len(fake.sent("PATCH", SCORING)) == 1  # no second restart


# --- what watchers serve ------------------------------------------------------------


def same_again(registry: ModelRegistry) -> None:
    """Another version of version 1's files and tags (a cheap new version)."""
    first = registry.client.get_model_version("converge-churn", "1")
    registry.client.create_model_version(
        "converge-churn",
        source=registry.client.get_model_version_download_uri("converge-churn", "1"),
        run_id=first.run_id,
        tags=dict(first.tags),
    )


def test_a_watcher_never_sees_a_promotion_half_done(
    tracking_uri: str, small_split: Split, small_model: TrainedModel
) -> None:
    """A thread polls `serving_state` while promotions and rollbacks run:
    every state it sees is one a move committed, in order."""
    import threading

    registry = ModelRegistry(tracking_uri)
    register(registry, small_model, small_split)
    for _ in range(3):  # more versions of the same model: cheap, and the gates pass
        same_again(registry)
    assert registry.serving_state("churn") == ServingState(
        "churn", "converge-churn", None, None, generation=0, source="aliases"
    )

    seen: list[ServingState] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    polled = threading.Event()

    def watch() -> None:
        try:
            while not stop.is_set():
                seen.append(registry.serving_state("churn"))
                polled.set()
        except BaseException as e:
            errors.append(e)

    committed = [(None, None)]
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        assert polled.wait(timeout=60)
        for version in ("1", "2", "3", "4"):
            decision = registry.promote("churn", version, small_split.test, requested_by="ann")
            assert decision.promoted, decision.reasons
            state = registry.serving_state("churn")
            committed.append((state.champion, state.challenger))
        for _ in range(2):
            registry.rollback("churn", requested_by="bob")
            state = registry.serving_state("churn")
            committed.append((state.champion, state.challenger))
        polled.clear()
        assert polled.wait(timeout=60)  # one more read after the last move
    finally:
        stop.set()
        watcher.join(timeout=60)
    assert not errors, errors
    assert committed == [
        (None, None), ("1", None), ("2", "1"), ("3", "2"), ("4", "3"), ("3", None), ("2", None)
    ]  # fmt: skip
    observed = [(s.champion, s.challenger) for s in seen]
    assert set(observed) <= set(committed), set(observed) - set(committed)
    generations = [s.generation for s in seen]
    assert generations == sorted(generations)
    assert observed[-1] == ("2", None) and len(seen) > len(committed)


def test_serving_state_holds_the_state_before_an_unfinished_move(
    tracking_uri: str, small_split: Split, small_model: TrainedModel
) -> None:
    """Each intermediate state of a promotion, made by hand as a writer that
    stopped there would leave it: the aliases alone show a state nobody
    chose; `serving_state` shows the state before until the commit."""
    registry = ModelRegistry(tracking_uri)
    register(registry, small_model, small_split)
    client = registry.client
    same_again(registry)
    same_again(registry)
    for version in ("1", "2"):
        assert registry.promote("churn", version, small_split.test, requested_by="ann").promoted
    before = registry.serving_state("churn")
    assert (before.champion, before.challenger, before.moving) == ("2", "1", False)

    # The writer said "moving" and moved the champion, then stopped.
    registry._write_commit(
        "converge-churn",
        {"seq": before.generation + 1, "phase": "moving", "champion": "3", "challenger": "2",
         "before": {"champion": "2", "challenger": "1"}, "at": datetime.now(UTC).isoformat(),
         "who": "ann"},
    )  # fmt: skip
    client.set_registered_model_alias("converge-churn", CHAMPION, "3")
    aliases = client.get_registered_model("converge-churn").aliases
    assert (str(aliases[CHAMPION]), str(aliases[CHALLENGER])) == ("3", "1")  # nobody chose this
    held = registry.serving_state("churn")
    assert (held.champion, held.challenger, held.moving) == ("2", "1", True)
    assert held.generation == before.generation

    # An hour later nobody finished it: the writer is gone, the aliases answer.
    registry._write_commit(
        "converge-churn",
        {"seq": before.generation + 1, "phase": "moving", "champion": "3", "challenger": "2",
         "before": {"champion": "2", "challenger": "1"},
         "at": (datetime.now(UTC) - timedelta(hours=1)).isoformat(), "who": "ann"},
    )  # fmt: skip
    abandoned = registry.serving_state("churn")
    assert (abandoned.champion, abandoned.challenger, abandoned.source) == ("3", "1", "aliases")

    # The next promotion commits normally from there.
    assert registry.promote("churn", "1", small_split.test, requested_by="ann").promoted
    after = registry.serving_state("churn")
    assert (after.champion, after.challenger, after.source) == ("1", "3", "converge")
    assert after.generation > before.generation

    # Aliases moved in the MLflow UI are followed (no Converge move under way).
    client.set_registered_model_alias("converge-churn", CHAMPION, "2")
    outside = registry.serving_state("churn")
    assert (outside.champion, outside.challenger, outside.source) == ("2", "3", "aliases")

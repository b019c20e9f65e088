"""One trial in a process of its own making: what its MLflow run holds when it is pruned or leads."""

from __future__ import annotations

import optuna
import pytest

from harness.tasks import run_trial

from tests.conftest import write_config


@pytest.fixture
def runner(workdir):
    from harness.config import load_config
    from harness.data import load_dataset, make_splits
    from harness.objective import TrialRunner
    from harness.tracking import Tracker

    cfg = load_config(write_config(workdir))
    dataset = load_dataset(cfg.data)
    splits = make_splits(dataset.labels, cfg.data)
    tracker = Tracker(f"sqlite:///{workdir}/mlflow.db", "objective", str(workdir / "artifacts"))
    tracker.start_study_run("tiny", cfg.to_dict(), "sqlite://")
    return TrialRunner(cfg, dataset, splits, tracker, {"MobileNetV2": None})


PARAMS = {"backbone": "MobileNetV2", "unfreeze_fraction": 0.5, "head_units": 0, "head_lr": 0.003, "finetune_lr": 0.0003,
          "dropout": 0.1, "pooling": "avg", "augment": False}


def test_a_pruned_trial_ends_finished_with_its_reason_history_and_curve(runner, tmp_path):
    import pandas as pd

    run_id = runner.tracker.start_child("trial 0", "trial", {"optuna.trial_number": 0})
    with pytest.raises(optuna.TrialPruned):
        run_trial(runner, 0, PARAMS, run_id, report=lambda epoch: epoch["epoch"] >= 2)  # pruned in phase 2
    client = runner.tracker.client
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == "PRUNED"
    assert "pruned at epoch 2" in run.data.tags["harness.pruned_reason"]
    assert {"history.csv", "learning_curve.png"} <= {a.path for a in client.list_artifacts(run_id)}
    history = pd.read_csv(client.download_artifacts(run_id, "history.csv", str(tmp_path)))
    assert history["epoch"].tolist() == [0, 1, 2] and history["phase"].tolist() == ["head", "head", "finetune"]
    assert "harness.model_uri" not in run.data.tags  # a pruned trial is no candidate


def test_a_trial_logs_its_model_only_when_it_leads(runner):
    from harness.tracking import MODEL_URI_TAG
    from harness.tracking import load_keras_model

    client = runner.tracker.client
    first = runner.tracker.start_child("trial 0", "trial", {"optuna.trial_number": 0})
    value = run_trial(runner, 0, PARAMS, first, report=lambda epoch: False, leader=None)
    run = client.get_run(first)
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(value)
    model = load_keras_model(run.data.tags[MODEL_URI_TAG], runner.tracker.uri)
    assert model.output_shape == (None, runner.dataset.num_classes)

    behind = runner.tracker.start_child("trial 1", "trial", {"optuna.trial_number": 1})
    run_trial(runner, 1, PARAMS, behind, report=lambda epoch: False, leader=1.01)  # nobody beats 1.01
    assert MODEL_URI_TAG not in client.get_run(behind).data.tags


def test_once_the_winner_is_registered_the_models_of_overtaken_trials_are_deleted(tmp_path):
    """Every trial that matched the best so far logged a model; after registration only the
    winner's, and one registered by hand, remain: the others' files are gone from the store."""
    from pathlib import Path

    import keras
    from mlflow.exceptions import MlflowException

    from harness.config import parse_config
    from harness.tracking import MODEL_URI_TAG, Tracker
    from harness.tracking import load_keras_model
    from harness.winner import MODEL_DELETED_TAG, deliver_winner

    cfg = parse_config("study: {name: caps}\ndata: {name: shapes}\nsearch: {backbone: MobileNetV2, head_lr: 0.01}\n",
                       "c.yaml")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "caps", str(tmp_path / "artifacts"))
    tracker.start_study_run("caps", cfg.to_dict(), "sqlite://")
    study = optuna.create_study(direction="maximize")
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    runs, uris = {}, {}
    for number, (value, leads) in enumerate([(0.5, True), (0.7, True), (0.7, True), (0.3, False), (0.9, True)]):
        trial = study.ask()
        runs[number] = tracker.start_child(f"trial {number}", "trial", {"optuna.trial_number": number})
        trial.set_user_attr("mlflow_run_id", runs[number])
        if leads:  # it matched or beat the best so far when it ran
            uris[number] = tracker.log_keras_model(runs[number], model, ["a", "b"], 8)
        study.tell(trial, value)
    tracker.register_model(uris[0], "kept-by-hand", runs[0], tags={})  # someone registered trial 0's model
    tracker.log_metrics(runs[4], {"test_accuracy": 0.8})  # scored before: no test task needed here

    def model_dir(uri):
        return Path(tracker.client.get_logged_model(uri.removeprefix("models:/")).artifact_location.removeprefix("file://"))

    dirs = {n: model_dir(u) for n, u in uris.items()}
    assert all(any(d.iterdir()) for d in dirs.values())
    messages = []
    winner = deliver_winner(cfg, study, tracker, run_task=None, log=messages.append)
    assert winner["trial"] == 4 and str(winner["version"]) == "1"
    for number in (1, 2):  # overtaken: files gone, the run says why, nothing points at the model
        assert not dirs[number].exists() or not any(dirs[number].rglob("*"))
        tags = tracker.run_tags(runs[number])
        assert MODEL_URI_TAG not in tags and "overtaken by trial 4" in tags[MODEL_DELETED_TAG]
        with pytest.raises(MlflowException, match="not found"):  # deleted in the store too
            tracker.client.get_logged_model(uris[number].removeprefix("models:/"))
    for number in (0, 4):  # registered, by hand or as the winner: kept and loadable
        assert any(dirs[number].rglob("*.keras")) and MODEL_URI_TAG in tracker.run_tags(runs[number])
    assert load_keras_model("models:/caps/1", tracker.uri).output_shape == (None, 2)
    assert load_keras_model(uris[0], tracker.uri).output_shape == (None, 2)
    assert any("overtaken" in m for m in messages)
    # A resumed sweep delivers the same winner again: nothing more to delete, nothing breaks.
    assert str(deliver_winner(cfg, study, tracker, run_task=None, log=messages.append)["version"]) == "1"

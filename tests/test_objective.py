"""One trial in a process of its own making: what its MLflow run holds when it is pruned or leads."""

from __future__ import annotations

import optuna
import pytest

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
        runner.run_trial(0, PARAMS, run_id, report=lambda epoch: epoch["epoch"] >= 2)  # pruned in phase 2
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
    from harness.winner import load_logged_model

    client = runner.tracker.client
    first = runner.tracker.start_child("trial 0", "trial", {"optuna.trial_number": 0})
    value = runner.run_trial(0, PARAMS, first, report=lambda epoch: False, leader=None)
    run = client.get_run(first)
    assert run.data.metrics["best_val_accuracy"] == pytest.approx(value)
    model = load_logged_model(runner.tracker.uri, run.data.tags[MODEL_URI_TAG])
    assert model.output_shape == (None, runner.dataset.num_classes)

    behind = runner.tracker.start_child("trial 1", "trial", {"optuna.trial_number": 1})
    runner.run_trial(1, PARAMS, behind, report=lambda epoch: False, leader=1.01)  # nobody beats 1.01
    assert MODEL_URI_TAG not in client.get_run(behind).data.tags


def test_leads_follows_the_direction():
    from harness.objective import leads

    assert leads(0.5, None, "maximize") and leads(0.5, 0.5, "maximize") and not leads(0.4, 0.5, "maximize")
    assert leads(0.4, 0.5, "minimize") and not leads(0.6, 0.5, "minimize")
    assert not leads(float("nan"), None, "maximize")

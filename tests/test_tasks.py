"""The tasks a trial process runs, each in its tracked MLflow run: a trial pruned or leading, the winner's test."""

from __future__ import annotations

import numpy as np
import optuna
import pytest

from harness.config import parse_config
from harness.data import load_dataset, make_splits
from harness.tasks import run_trial
from tests.conftest import BASE, quad, write_config


@pytest.fixture
def runner(workdir):
    from harness.config import load_config
    from harness.objective import TrialRunner
    from harness.tracking import Tracker

    cfg = load_config(write_config(workdir))
    dataset = load_dataset(cfg.data)
    splits = make_splits(dataset.labels, cfg.data)
    tracker = Tracker(f"sqlite:///{workdir}/mlflow.db", "objective", str(workdir / "artifacts"))
    tracker.start_study_run("tiny", cfg.to_dict(), "sqlite://")
    return TrialRunner(cfg, dataset, splits, tracker, {"MobileNetV2": None})


PARAMS = {
    "backbone": "MobileNetV2",
    "unfreeze_fraction": 0.5,
    "head_units": 0,
    "head_lr": 0.003,
    "finetune_lr": 0.0003,
    "dropout": 0.1,
    "pooling": "avg",
    "augment": False,
    "cut_fraction": 0.2,  # the tiny config's 4 blocks: what is tested is the run, not the backbone
}


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
    from harness.tracking import MODEL_URI_TAG, load_keras_model

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


def test_the_winners_test_logs_auc_per_class_accuracy_and_the_confusion_matrix(tmp_path):
    """A binary target (merged with class_map): TestTask scores the logged model and logs every extra."""
    import pandas as pd

    from harness.frameworks.keras.model import ModelSpec, build_model
    from harness.objective import TrialRunner
    from harness.tasks import TestTask
    from harness.tracking import Tracker

    cfg = parse_config(
        BASE + "  class_map: {round: [arc, three_dots], pointy: [star4, pentagon], _drop: [t_shape, tri_ring]}\n", "s.yaml"
    )
    ds = load_dataset(cfg.data)
    splits = make_splits(ds.labels, cfg.data)
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "targets", str(tmp_path / "a"))
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    tm = build_model(ModelSpec("MobileNetV2", 32, 2, None, {"alpha": 0.35}))
    uri = tracker.log_keras_model(run_id, tm.model, ds.class_names, 32)
    runner = TrialRunner(cfg, ds, splits, tracker, {})
    out = TestTask("targets", uri, run_id).run(runner, None)

    metrics = tracker.client.get_run(run_id).data.metrics
    for key in ("test_auc", "val_auc", "test_accuracy", "test_accuracy/pointy", "test_accuracy/round"):
        assert key in metrics, key
    assert metrics["test_auc"] == pytest.approx(out["test_auc"]) and 0.0 <= metrics["test_auc"] <= 1.0
    n_test = np.bincount(ds.labels[splits.test])
    cm = pd.read_csv(tracker.client.download_artifacts(run_id, "confusion_matrix.csv", str(tmp_path)), index_col=0)
    assert list(cm.index) == list(cm.columns) == ["pointy", "round"]
    assert cm.sum(axis=1).tolist() == n_test.tolist()  # every test image counted once, in its true row
    recall = np.diag(cm.to_numpy()) / n_test
    assert [metrics["test_accuracy/pointy"], metrics["test_accuracy/round"]] == pytest.approx(recall.tolist())
    assert metrics["test_accuracy"] == pytest.approx(np.trace(cm.to_numpy()) / n_test.sum())
    artifacts = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert {"confusion_matrix.csv", "confusion_matrix.png"} <= artifacts


def test_confirmation_reads_the_test_split_exactly_once_per_seed(tmp_path, weights_file, monkeypatch):
    """Spy on every tf.data pipeline built: the test indices appear once per seed, after training."""
    import numpy as np

    from harness import quadrants, tasks
    from harness.data import load_dataset, make_splits
    from harness.tasks import Context
    from harness.tracking import Tracker

    cfg = parse_config(quad(weights_file, "[features]"), "q.yaml")
    target = cfg.quadrants.targets[1]
    ccfg = quadrants.cell_config(cfg, target, "features")
    dataset = load_dataset(target.data)
    splits = make_splits(dataset.labels, target.data)
    built = []
    from harness.frameworks.keras import data as keras_data

    real = keras_data.tf_dataset

    def spy(ds, indices, *args, **kwargs):
        built.append(np.array(indices))
        return real(ds, indices, *args, **kwargs)

    # Every split any training or evaluation reads goes through the framework's one pipeline maker
    # (phase 1 reads the train split once, for cached features).
    monkeypatch.setattr(keras_data, "tf_dataset", spy)
    monkeypatch.chdir(tmp_path)  # a feature cache of its own (results/features), computed here
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "spy", str(tmp_path / "a"))
    tracker.start_study_run("spy", {}, "none")
    cell = tracker.start_child("cell", "cell", {})
    params = {**{n: p.value for n, p in ccfg.search.items() if p.fixed}, "head_lr": 0.003}
    runner = Context("spy", ccfg, dataset, splits, tracker, {"MobileNetV2": str(weights_file)}).load()
    tests = [
        tasks.confirm_seed(runner, params, seed, tracker.start_child(f"confirm {seed}", "confirm", {}, parent_id=cell))
        for seed in range(2)
    ]
    assert len(tests) == 2
    uses_of_test = [i for i, idx in enumerate(built) if np.array_equal(idx, splits.test)]
    assert len(uses_of_test) == 2  # once per seed
    # each test read comes after that seed's training pipelines
    assert all(any(np.array_equal(built[j], splits.train) for j in range(i)) for i in uses_of_test)
    assert not any(np.intersect1d(idx, splits.test).size for idx in built if not np.array_equal(idx, splits.test))

"""End to end: the real command on a tiny sweep, read back through Optuna's and MLflow's own APIs."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, run_main

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("sweep")]  # module fixtures: one xdist worker


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """Run the tiny sweep once (2 trials), then resume it to 3 trials with the same command."""
    from tests.conftest import write_config

    work = tmp_path_factory.mktemp("sweep")
    config = write_config(work, TINY.replace("learning_rate: 0.001", "learning_rate: auto"))  # the baseline's rate search too
    first = run_main(str(config), cwd=work)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_main(str(config), "--n-trials", "3", cwd=work)
    assert second.returncode == 0, second.stderr[-3000:]
    return work, first, second


def _study(work):
    return optuna.load_study(study_name="tiny", storage=f"sqlite:///{work}/results/tiny/optuna.db")


def _client(work):
    return MlflowClient(tracking_uri=f"sqlite:///{work}/results/mlflow.db")


def test_study_is_resumed_not_restarted(finished_sweep):
    work, first, second = finished_sweep
    study = _study(work)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert "0 finished, running up to 2" in first.stderr
    assert "2 finished, running up to 3" in second.stderr
    assert "open the MLflow UI: mlflow ui --backend-store-uri sqlite:///" in second.stderr
    assert "?workflowType=machine_learning" in second.stderr  # opens on the training runs, not GenAI traces


def test_run_tree_has_one_parent_and_a_child_per_trial(finished_sweep):
    work, *_ = finished_sweep
    client = _client(work)
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("harness.role") == "study"]
    assert len(parents) == 1, "resuming must reopen the same parent run"
    parent = parents[0]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    trials = sorted(
        (r for r in children if r.data.tags["harness.role"] == "trial"), key=lambda r: int(r.data.tags["optuna.trial_number"])
    )
    assert [r.data.tags["optuna.trial_number"] for r in trials] == ["0", "1", "2"]
    assert all(r.info.status == "FINISHED" and r.data.tags["optuna.state"] == "COMPLETE" for r in trials)
    assert any(r.data.tags["harness.role"] == "baseline" for r in children)
    assert parent.info.status == "FINISHED"


def test_each_trial_run_is_complete_and_cross_linked(finished_sweep):
    work, *_ = finished_sweep
    client, study = _client(work), _study(work)
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.tags["backbone"] == "MobileNetV2" and run.data.tags["dataset"] == "shapes"
        # every sampled and fixed param
        for name in ("backbone", "unfreeze_fraction", "head_units", "head_lr", "finetune_lr", "dropout", "pooling", "augment"):
            assert name in run.data.params
        assert float(run.data.params["head_lr"]) == pytest.approx(trial.params["head_lr"])
        # one epoch axis across both phases: head 0-1, finetune 2-3
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        assert steps == [0, 1, 2, 3]
        assert run.data.metrics["finetune_start_epoch"] == 2
        assert run.data.metrics["objective"] == pytest.approx(trial.value)
        assert run.data.metrics["finetune/trainable_params"] > run.data.metrics["head/trainable_params"]
        assert run.data.metrics["head/seconds"] > 0 and run.data.metrics["finetune/seconds"] > 0
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "history.csv", "learning_curve.png"} <= artifacts


def test_history_csv_matches_the_logged_metrics(finished_sweep, tmp_path):
    import pandas as pd

    work, *_ = finished_sweep
    client, study = _client(work), _study(work)
    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    path = client.download_artifacts(run_id, "history.csv", str(tmp_path))
    frame = pd.read_csv(path)
    assert frame["phase"].tolist() == ["head", "head", "finetune", "finetune"]
    logged = [m.value for m in client.get_metric_history(run_id, "val_loss")]
    assert frame["val_loss"].tolist() == pytest.approx(logged)


def test_report_of_a_plain_sweep_is_its_per_trial_table(finished_sweep):
    import subprocess
    import sys

    import pandas as pd

    from tests.conftest import ROOT

    work, *_ = finished_sweep
    proc = subprocess.run(
        [sys.executable, "-m", "harness.report", "tiny"],
        cwd=work,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = pd.read_csv(work / "results" / "tiny" / "trials.csv")
    study = _study(work)
    assert sorted(table.trial) == [t.number for t in study.trials]
    by_trial = table.set_index("trial")
    for t in study.trials:
        assert by_trial.loc[t.number, "objective"] == pytest.approx(t.value)
        assert by_trial.loc[t.number, "mlflow_run_id"] == t.user_attrs["mlflow_run_id"]
        assert by_trial.loc[t.number, "finetune_best_val_accuracy"] == pytest.approx(
            _client(work).get_run(t.user_attrs["mlflow_run_id"]).data.metrics["finetune/best_val_accuracy"]
        )


def test_report_refuses_an_unknown_sweep(finished_sweep):
    import subprocess
    import sys

    from tests.conftest import ROOT

    work, *_ = finished_sweep
    proc = subprocess.run(
        [sys.executable, "-m", "harness.report", "nonesuch"],
        cwd=work,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode == 2 and "no MLflow experiment 'nonesuch'" in proc.stderr


def test_resuming_with_a_changed_config_is_refused_instead_of_mixing_results(finished_sweep):
    work, *_ = finished_sweep
    proc = run_main(str(work / "sweep.yaml"), "--seed", "5", cwd=work)
    assert proc.returncode == 2
    assert "study 'tiny' already exists" in proc.stderr and "with a different config" in proc.stderr
    assert len(_study(work).trials) == 3  # untouched


# --- the morning after: the winner delivered, the UI telling the story -------------------------


def test_the_winner_is_registered_and_its_model_scores_its_logged_value(finished_sweep):
    import numpy as np

    from harness.config import load_config
    from harness.data import load_dataset, make_splits
    from harness.evaluation import scores
    from harness.frameworks.keras.data import tf_dataset
    from harness.tracking import load_keras_model

    work, first, second = finished_sweep
    client, study = _client(work), _study(work)
    best = study.best_trial
    versions = client.search_model_versions("name = 'tiny'")
    latest = max(versions, key=lambda v: int(v.version))
    assert latest.tags["harness.trial"] == str(best.number) and latest.tags["harness.sweep"] == "tiny"
    assert latest.run_id == best.user_attrs["mlflow_run_id"]
    assert len(versions) <= 2, "one version per sweep (a resume registers again only for a new winner)"

    cfg = load_config(work / "sweep.yaml")
    dataset = load_dataset(cfg.data)
    splits = make_splits(dataset.labels, cfg.data)
    model = load_keras_model(f"models:/tiny/{latest.version}", f"sqlite:///{work}/results/mlflow.db")
    probabilities = model.predict(tf_dataset(dataset, splits.val, 16, shuffle=False), verbose=0)
    assert scores(probabilities, dataset.labels[splits.val])["accuracy"] == pytest.approx(best.value, abs=0.01)
    assert np.allclose(probabilities.sum(axis=1), 1, atol=1e-4)

    winner_run = client.get_run(best.user_attrs["mlflow_run_id"])
    assert winner_run.data.tags["harness.winner"] == "true" and "(winner)" in winner_run.info.run_name
    assert 0 <= winner_run.data.metrics["test_accuracy"] <= 1
    assert "winner (trial" in second.stderr and "on the held-out test split: accuracy" in second.stderr


def test_the_mlflow_ui_facts(finished_sweep):
    """What a person sees in the UI, read back through MlflowClient."""
    work, *_ = finished_sweep
    client, study = _client(work), _study(work)
    exp = client.get_experiment_by_name("tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs, not GenAI traces

    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    best = study.best_trial
    note = parent.data.tags["mlflow.note.content"]
    assert f"trial {best.number}" in note and f"{best.value:.4f}" in note
    assert f"#/experiments/{exp.experiment_id}/runs/{best.user_attrs['mlflow_run_id']}" in note
    assert "test accuracy" in note
    assert len(parent.data.params) <= 12 and parent.data.params["study.metric"] == "val_accuracy"
    assert "config.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    # What mattered: the importances as metrics and a table, Optuna's plots as images.
    assert {"param_importances.csv", "plots"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    plots = {a.path: a.file_size for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert {f"plots/{n}.png" for n in ("optimization_history", "slice", "parallel_coordinate", "contour")} <= set(plots)
    assert all(size > 1000 for size in plots.values())
    importances = {k: v for k, v in parent.data.metrics.items() if k.startswith("importance/")}
    assert {"importance/finetune_lr", "importance/head_lr"} <= set(importances)
    # The tiny sweep's trials may all score alike (chance on 3 classes): then every importance is 0.
    assert sum(importances.values()) == pytest.approx(1.0) or not any(importances.values())
    assert "what mattered" in finished_sweep[2].stderr and "3 complete trials" in finished_sweep[2].stderr
    assert {"best_val_accuracy", "test_accuracy", "scratch_test_accuracy"} <= set(parent.data.metrics)
    assert {d.dataset.name for d in parent.inputs.dataset_inputs} == {"shapes-train", "shapes-validation", "shapes-test"}

    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.metrics["best_val_accuracy"] == pytest.approx(trial.value)
        contexts = {next(t.value for t in d.tags if t.key == "mlflow.data.context") for d in run.inputs.dataset_inputs}
        assert contexts == {"train", "validation"}  # the test split is no trial's input
        assert all(d.dataset.digest for d in run.inputs.dataset_inputs)
        assert any(k.startswith("system/cpu_utilization") for k in run.data.metrics), sorted(run.data.metrics)
        assert any(k.startswith("system/system_memory") for k in run.data.metrics)
        assert run.data.tags["mlflow.source.name"].startswith("python -m harness.sweep")  # the Source column


def test_a_trials_config_artifact_re_runs_that_trial(finished_sweep, tmp_path):
    import yaml

    work, *_ = finished_sweep
    client, study = _client(work), _study(work)
    trial = study.trials[1]
    path = client.download_artifacts(trial.user_attrs["mlflow_run_id"], "config.yaml", str(tmp_path))
    resolved = yaml.safe_load(Path(path).read_text())
    assert resolved["search"]["head_lr"] == pytest.approx(trial.params["head_lr"])  # values, not ranges
    assert resolved["study"]["seed"] == 0 + trial.number and resolved["study"]["n_trials"] == 1

    rerun_dir = tmp_path / "rerun"
    rerun_dir.mkdir()
    proc = run_main(path, cwd=rerun_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rerun = optuna.load_study(
        study_name=f"tiny.trial-{trial.number}", storage=f"sqlite:///{rerun_dir}/results/tiny.trial-{trial.number}/optuna.db"
    )
    assert rerun.trials[0].params == {} or rerun.trials[0].params == trial.params  # nothing left to sample
    assert rerun.best_value == pytest.approx(trial.value, abs=0.1)
    original = client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics
    again = (
        MlflowClient(f"sqlite:///{rerun_dir}/results/mlflow.db").get_run(rerun.trials[0].user_attrs["mlflow_run_id"]).data.metrics
    )
    assert again["head/best_val_loss"] == pytest.approx(original["head/best_val_loss"], abs=0.05)


def test_the_baseline_is_trained_by_the_recipe_and_reports_its_fit(finished_sweep, tmp_path):
    """The scratch baseline of the real sweep: learning-rate search, step floor, fit check logged."""
    work, *_ = finished_sweep
    client, study = _client(work), _study(work)
    exp = client.get_experiment_by_name("tiny")
    (baseline,) = [
        r for r in client.search_runs([exp.experiment_id], max_results=100) if r.data.tags.get("harness.role") == "baseline"
    ]
    assert 0 <= baseline.data.metrics["train_accuracy"] <= 1
    assert baseline.data.metrics["scratch/steps"] >= 8  # baseline.min_steps of the tiny config
    assert baseline.data.tags["harness.undertrained"] in ("true", "false")
    assert float(baseline.data.params["scratch_learning_rate"]) in (1e-4, 3e-4, 1e-3)  # baseline.learning_rate: auto
    artifacts = {a.path for a in client.list_artifacts(baseline.info.run_id)}
    assert {"learning_rate_search.csv", "learning_rate_attempts.csv"} <= artifacts
    # its validations and its attempt are shown as a trial's epochs are
    lines = finished_sweep[1].stderr.splitlines()
    assert any(line.startswith("baseline [") and " scratch epoch " in line for line in lines), lines[-20:]
    assert any(line.startswith("baseline attempt 1/1: learning rate ") for line in lines)
    parent = client.get_run(study.user_attrs["mlflow_parent_run_id"])
    assert parent.data.tags["harness.baseline_undertrained"] == baseline.data.tags["harness.undertrained"]

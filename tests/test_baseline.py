"""The sweep side of the from-scratch baseline (harness/baseline.py): which architecture it trains, in a
run of its own, and a resumed sweep that reads it back. The recipe itself is in tests/test_scratch.py."""

from __future__ import annotations


def test_the_baseline_trains_the_best_trials_architecture_once_and_a_resume_reuses_it(tmp_path):
    """The sweep side of the baseline: the best trial's parameters (baseline.augment over its own) go
    to a trial process as one task in a run of its own; a resumed sweep reads that run back instead."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    from harness.baseline import BASELINE_FOR_TAG, run_scratch_baseline
    from harness.config import parse_config
    from harness.tasks import BaselineTask
    from harness.tracking import Tracker
    from tests.conftest import TINY

    cfg = parse_config(TINY.replace("  retries: 0", "  retries: 0\n  augment: true"), "s.yaml")
    study = optuna.create_study(direction="maximize")
    space = {"head_units": CategoricalDistribution([0, 8]), "head_lr": FloatDistribution(0.001, 0.01, log=True)}
    for head_units, value in ((0, 0.5), (8, 0.8), (0, 0.6)):
        study.add_trial(
            optuna.trial.create_trial(params={"head_units": head_units, "head_lr": 0.003}, distributions=space, value=value)
        )
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "tiny", str(tmp_path / "artifacts"))
    tracker.start_study_run("tiny", cfg.to_dict(), "sqlite://")
    tasks = []

    def run_task(task, progress):
        """A trial process's side, as train_baseline leaves it: the scores logged, the run FINISHED."""
        tasks.append(task)
        tracker.log_metrics(task.run_id, {"objective": 0.7, "test_accuracy": 0.65, "train_accuracy": 0.99})
        tracker.end_run(task.run_id, "FINISHED")
        return {"value": 0.7, "test_accuracy": 0.65, "train_accuracy": 0.99, "fitted": True}

    lines = []
    first = run_scratch_baseline(cfg, study, "shapes", tracker, lines.append, run_task)
    (task,) = tasks
    assert isinstance(task, BaselineTask) and task.trial == 1  # trial 1 is the best
    assert task.params["head_units"] == 8 and task.params["backbone"] == "MobileNetV2"  # its params and the fixed ones
    assert task.params["augment"] is True  # baseline.augment, not the search's fixed false
    run = tracker.get_run_record(first["run_id"])
    assert run.tags[BASELINE_FOR_TAG] == "1" and run.params["weights"] == "none" and run.params["baseline_min_steps"] == "8"
    assert first == {
        "trial": 1,
        "run_id": task.run_id,
        "value": 0.7,
        "test_accuracy": 0.65,
        "train_accuracy": 0.99,
        "fitted": True,
    }

    again = run_scratch_baseline(cfg, study, "shapes", tracker, lines.append, run_task)
    assert len(tasks) == 1 and again == first  # read back from its run, not trained twice
    assert "from-scratch baseline for trial 1 already trained: val_accuracy 0.7000" in lines[-1]

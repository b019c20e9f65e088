"""The trial engine: the pruner's step axis (each phase reports at fixed step offsets, so Optuna's median
pruner never compares phase 2 of one trial with phase 1 of another) and a real sweep that prunes."""

from __future__ import annotations

from types import SimpleNamespace

import optuna
import pytest

from harness.trials import pruning_step
from tests.conftest import ROOT, TINY, run_main, write_config

HEAD_EPOCHS = 3


# --- the mapping (pure) ---------------------------------------------------------------------------


def test_phase_one_and_scratch_report_at_their_own_epoch():
    assert [pruning_step("head", i, HEAD_EPOCHS) for i in range(HEAD_EPOCHS)] == [0, 1, 2]
    assert [pruning_step("scratch", i, HEAD_EPOCHS) for i in range(6)] == [0, 1, 2, 3, 4, 5]


def test_phase_two_starts_after_every_step_phase_one_may_use():
    assert [pruning_step("finetune", j, HEAD_EPOCHS) for j in range(3)] == [3, 4, 5]
    assert pruning_step("finetune", 0, 0) == 0  # no phase 1 epochs configured: nothing to skip


def test_no_step_repeats_in_a_trial_however_early_phase_one_stopped():
    for head_ran in range(1, HEAD_EPOCHS + 1):  # early stopping ended phase 1 after head_ran epochs
        steps = [pruning_step("head", i, HEAD_EPOCHS) for i in range(head_ran)]
        steps += [pruning_step("finetune", j, HEAD_EPOCHS) for j in range(2)]
        assert len(set(steps)) == len(steps) and steps == sorted(steps)
        assert steps[head_ran:] == [3, 4]  # phase 2 keeps its steps whatever phase 1 did


def test_unknown_phases_and_negative_epochs_are_refused():
    with pytest.raises(ValueError, match="unknown phase"):
        pruning_step("warmup", 0, HEAD_EPOCHS)
    with pytest.raises(ValueError, match=">= 0"):
        pruning_step("head", -1, HEAD_EPOCHS)


# --- the engine reports at the offsets (a real study and median pruner, no training) -------------


def _engine_with(study):
    from harness.trials import Job, Running, TrialEngine

    engine = TrialEngine([], None, True, lambda message: None)
    cfg = SimpleNamespace(train=SimpleNamespace(head=SimpleNamespace(epochs=HEAD_EPOCHS)))
    job = Job("pruning", study, 2, SimpleNamespace(cfg=cfg), prepare=lambda trial, worker: None)

    def start():
        proc = object()  # stands in for a trial process
        engine.running[proc] = Running(job, study.ask(), None)
        return proc

    def epoch(proc, epoch, phase, phase_epoch, value):
        payload = {
            "number": engine.running[proc].trial.number,
            "epoch": epoch,
            "phase": phase,
            "phase_epoch": phase_epoch,
            "metrics": {"val_accuracy": value},
            "total_epochs": 5,
            "value": value,
        }
        return engine._answer(proc, ("epoch", payload))

    return engine, start, epoch


def test_phase_two_is_judged_against_phase_two_not_phase_one():
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    engine, start, epoch = _engine_with(study)
    a = start()  # ran all of phase 1 (best at its last epoch), then lost ground in phase 2
    for e, (phase, j, value) in enumerate(
        [("head", 0, 0.5), ("head", 1, 0.6), ("head", 2, 0.9), ("finetune", 0, 0.7), ("finetune", 1, 0.7)]
    ):
        assert not epoch(a, e, phase, j, value)
    study.tell(engine.running.pop(a).trial, 0.9)
    assert study.trials[0].intermediate_values == {0: 0.5, 1: 0.6, 2: 0.9, 3: 0.7, 4: 0.7}

    b = start()  # phase 1 stopped early after 2 epochs; phase 2 starts on epoch 2 of the timeline
    assert not epoch(b, 0, "head", 0, 0.55)
    assert not epoch(b, 1, "head", 1, 0.6)
    # On the shared timeline this epoch (2) would meet A's phase-1 epoch 2 (0.9) and be pruned;
    # at step 3 it meets A's first phase-2 epoch (0.7), which it beats.
    assert not epoch(b, 2, "finetune", 0, 0.8)
    assert not epoch(b, 3, "finetune", 1, 0.6)  # its best so far (0.8) still beats A's 0.7 at step 4
    study.tell(engine.running.pop(b).trial, 0.8)
    assert study.trials[1].intermediate_values == {0: 0.55, 1: 0.6, 3: 0.8, 4: 0.6}

    c = start()  # the same early stop, but a phase 2 behind both A's and B's: pruned at step 3
    assert not epoch(c, 0, "head", 0, 0.55)
    assert not epoch(c, 1, "head", 1, 0.6)
    assert epoch(c, 2, "finetune", 0, 0.65)  # 0.65 < the median of 0.7 and 0.8 at step 3
    assert study.trials[2].intermediate_values == {0: 0.55, 1: 0.6, 3: 0.65}


# --- a real tiny sweep with the median pruner -----------------------------------------------------


@pytest.mark.slow
@pytest.mark.xdist_group("pruning")
def test_a_real_sweep_prunes_and_the_pruned_runs_keep_their_history_and_curve(tmp_path):
    """The shipped source backbone gives features a head can learn from at once (with `weights:
    none` every trial sits at chance and ties, so nothing is ever pruned). Seed 31 of the random
    sampler draws head_lr 0.089 for trial 0, which reaches val_accuracy 1.0 in its first epoch (so
    its phase 1 stops early: patience 1 cannot improve on 1.0), then 2e-5, 5e-4 and 1.5e-4 for
    trials 1 to 3, which are far behind after one epoch and are pruned there."""
    import pandas as pd
    from mlflow.tracking import MlflowClient

    weights = ROOT / "harness" / "assets" / "MobileNetV2-5b2c197669.weights.h5"
    text = TINY
    for old, new in [
        ("n_trials: 2", "n_trials: 4\n  sampler: random"),
        ("seed: 0", "seed: 31"),
        ("pruner: none", "pruner: median\n  pruner_warmup_epochs: 0\n  pruner_startup_trials: 1"),
        ("head_lr: {low: 0.001, high: 0.01, log: true}", "head_lr: {low: 1.0e-5, high: 0.1, log: true}"),
        ("head: {epochs: 2, batch_size: 16, patience: null}", f"head: {{epochs: {HEAD_EPOCHS}, batch_size: 16, patience: 1}}"),
        ("weights: none", f"weights: {weights}"),
        ("cut_fraction: 0.2", "cut_fraction: 1.0"),  # the whole backbone: the learning-rate story above depends on it
        ("builtin_size: 10", "builtin_size: 20"),
        ("scratch: true", "scratch: false"),
    ]:
        assert old in text, old
        text = text.replace(old, new, 1)
    proc = run_main(str(write_config(tmp_path, text)), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]

    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path}/results/tiny/optuna.db")
    client = MlflowClient(f"sqlite:///{tmp_path}/results/mlflow.db")
    summary = [(t.number, t.state.name, t.params["head_lr"], t.intermediate_values) for t in study.trials]
    assert [t.state.name for t in study.trials].count("PRUNED") >= 1, summary

    early_phase_two = []  # trials whose phase 2 began on the timeline before head.epochs
    for t in study.trials:
        run_id = t.user_attrs["mlflow_run_id"]
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED" and run.data.tags["optuna.state"] == t.state.name
        assert {"history.csv", "learning_curve.png"} <= {a.path for a in client.list_artifacts(run_id)}
        history = pd.read_csv(client.download_artifacts(run_id, "history.csv", str(tmp_path / f"t{t.number}")))
        # Optuna's steps are the offsets of each epoch in its phase; MLflow keeps the timeline.
        start = history.groupby("phase")["epoch"].transform("min")
        expected = {pruning_step(p, e - s, HEAD_EPOCHS) for p, e, s in zip(history["phase"], history["epoch"], start)}
        assert set(t.intermediate_values) == expected, (t.number, history, t.intermediate_values)
        assert sorted(m.step for m in client.get_metric_history(run_id, "val_accuracy")) == history["epoch"].tolist()
        finetune = history[history["phase"] == "finetune"]
        if len(finetune) and finetune["epoch"].min() < HEAD_EPOCHS:  # phase 1 stopped early
            early_phase_two.append(t.number)
            head_ran = int(finetune["epoch"].min())
            assert sorted(t.intermediate_values) == [*range(head_ran), *range(HEAD_EPOCHS, HEAD_EPOCHS + len(finetune))]
        if t.state.name == "PRUNED":
            assert run.data.tags["harness.pruned_reason"].startswith("pruned at epoch")
            assert len(history) == len(t.intermediate_values) >= 1  # its curve runs up to the pruning
    assert early_phase_two, summary  # the case the offsets exist for did happen


# --- recovery after a crash ------------------------------------------------------------------------


def test_a_resumed_sweep_closes_the_baseline_and_seed_runs_a_killed_sweep_left_running(tmp_path):
    """A SIGKILL during the baseline or a confirmation seed leaves its run RUNNING: the resume (which
    holds the local storage's lock) ends it KILLED; on a shared server storage it stays, since
    another machine may be training it."""
    import optuna

    from harness.tracking import Tracker
    from harness.trials import recover_after_crash

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "resume", str(tmp_path / "artifacts"))
    tracker.start_study_run("resume", {}, "sqlite://")
    killed = tracker.start_child(
        "scratch baseline of trial 0", "baseline", {"harness.baseline_for": 0, "optuna.state": "RUNNING"}
    )
    done = tracker.start_child("logme", "logme", {})
    tracker.end_run(done, "FINISHED")
    cell = tracker.start_child("cell", "cell", {})
    seed_run = tracker.start_child("confirm seed 0", "confirm", {"harness.seed": 0}, parent_id=cell)
    study = optuna.create_study()

    recover_after_crash(study, tracker, exclusive=False, log=print, owned_roles=("baseline",))
    assert tracker.client.get_run(killed).info.status == "RUNNING"  # maybe alive elsewhere: untouched
    logged = []
    recover_after_crash(study, tracker, exclusive=True, log=logged.append, owned_roles=("baseline",))
    run = tracker.client.get_run(killed)
    assert run.info.status == "KILLED" and run.data.tags["optuna.state"] == "FAIL"
    assert run.data.tags["harness.fail_reason"] == "process died before the run ended"
    assert tracker.client.get_run(done).info.status == "FINISHED"
    assert logged and "1 MLflow run(s)" in logged[0]
    assert tracker.client.get_run(seed_run).info.status == "RUNNING"  # another parent: its cell's recovery
    recover_after_crash(study, tracker, exclusive=True, log=print, parent_id=cell, owned_roles=("confirm", "backbone_confirm"))
    assert tracker.client.get_run(seed_run).info.status == "KILLED"


# --- slots: one GPU or a share of the cores per trial process ----------------------------------------


def test_slots_give_each_worker_a_gpu_or_a_share_of_the_cores():
    from harness.trials import plan_slots

    gpus = plan_slots(3, ["2", "5"], cpu_count=16)
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in gpus] == ["2", "5", "2"]  # round-robin over the visible ones
    assert all(s.threads == 0 for s in gpus)
    cpu = plan_slots(2, [], cpu_count=2)
    assert [s.threads for s in cpu] == [1, 1] and all(s.env["CUDA_VISIBLE_DEVICES"] == "" for s in cpu)
    assert plan_slots(1, [], cpu_count=8)[0].threads == 0  # one process: TensorFlow's own default


def test_only_a_gpu_slot_makes_a_successor_wait():
    from harness.trials import plan_slots

    assert all(slot.gpu for slot in plan_slots(2, ["0", "1"], cpu_count=16))
    assert not any(slot.gpu for slot in plan_slots(2, [], cpu_count=2))  # CUDA_VISIBLE_DEVICES=""
    assert not plan_slots(1, [], cpu_count=2)[0].gpu

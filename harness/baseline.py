"""The sweep's from-scratch baseline: the best trial's architecture, trained from random init.

The recipe (a step floor, a learning-rate search, early stopping that waits for the validation
loss, retries at the next rate when the model did not fit its training data) is harness/scratch.py;
it runs in a trial process (harness/tasks.py `BaselineTask`). This module decides what to train,
re-uses a baseline a resumed sweep already trained, and reports its scores.
"""

from __future__ import annotations

import sys

from harness.scratch import UNDERTRAINED_TAG
from harness.tasks import BaselineTask
from harness.tracking import STATE_TAG, RunRecord, Tracker

BASELINE_FOR_TAG = "harness.baseline_for"  # on a baseline run: the number of the trial whose architecture it trained


def find_baseline_run(tracker: Tracker, trial_number: int) -> RunRecord | None:
    """The sweep's finished baseline run of trial `trial_number`, or None (a resumed sweep re-uses it)."""
    runs = tracker.find_runs(
        role="baseline", parent=tracker.parent_run_id, status="FINISHED", tags={BASELINE_FOR_TAG: trial_number}, max_results=1
    )
    return runs[0] if runs else None


def run_scratch_baseline(cfg, study, dataset_name: str, tracker: Tracker, log, run_task) -> dict:
    """Train (or re-use) the scratch baseline of the study's best trial; returns its scores.

    `run_task(task)` runs the training in a trial process (harness/trials.py: TrialEngine.call),
    where the trials ran: on a GPU box that is a GPU, and the sweep process stays lean."""
    best = study.best_trial
    params = {**{n: p.value for n, p in cfg.search.items() if p.fixed}, **best.params}
    if cfg.baseline.augment is not None:
        params["augment"] = cfg.baseline.augment
    existing = find_baseline_run(tracker, best.number)
    if existing is not None:
        value = existing.metrics.get("objective")
        log(f"from-scratch baseline for trial {best.number} already trained: {cfg.study.metric} {value:.4f}")
        train_accuracy = existing.metrics.get("train_accuracy")
        return {
            "trial": best.number,
            "value": value,
            "run_id": existing.run_id,
            "test_accuracy": existing.metrics.get("test_accuracy"),
            "train_accuracy": train_accuracy,
            "fitted": existing.tags.get(UNDERTRAINED_TAG) != "true",
        }

    log(
        f"training the from-scratch baseline (trial {best.number}'s architecture, random init, at least "
        f"{cfg.baseline.min_steps} steps, learning rate {cfg.baseline.learning_rate})"
    )
    run_id = tracker.start_child(
        f"scratch baseline of trial {best.number}",
        "baseline",
        {
            BASELINE_FOR_TAG: best.number,
            "backbone": params["backbone"],
            "dataset": dataset_name,
            "strategy": "scratch",
            STATE_TAG: "RUNNING",
        },
        config=cfg.to_dict(),
    )
    tracker.log_params(
        run_id,
        {**params, "weights": "none", "baseline_min_steps": cfg.baseline.min_steps, "baseline_epochs": cfg.baseline.epochs},
    )
    from harness.progress import Progress

    # Its validations are shown as a trial's epochs are: a long from-scratch run is never silent.
    progress = Progress(1, 0, cfg.study.direction, cfg.study.metric, sys.stderr, prefix="baseline")
    try:
        result = run_task(BaselineTask(cfg.study.name, params, run_id, best.number), progress)
    finally:
        progress.close()
    return {"trial": best.number, "run_id": run_id, **result}

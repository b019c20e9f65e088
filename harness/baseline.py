"""The from-scratch baseline: the best trial's architecture, random init, trained properly.

Every comparison flatters transfer unless the baseline is trained with care: all layers train,
BatchNormalization included (with lowered momentum so its moving statistics are fit for
inference), for its own, longer budget, with early stopping on the same validation split.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

from harness.objective import log_history, model_spec, release_memory
from harness.tracking import STATE_TAG, Tracker


def find_baseline_run(tracker: Tracker, trial_number: int):
    runs = tracker.search_runs(
        (f"tags.`harness.role` = 'baseline' and tags.`harness.baseline_for` = '{trial_number}' "
                       f"and attributes.status = 'FINISHED' and tags.`mlflow.parentRunId` = '{tracker.parent_run_id}'"),
        max_results=1,
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
        value = existing.data.metrics.get("objective")
        log(f"from-scratch baseline for trial {best.number} already trained: {cfg.study.metric} {value:.4f}")
        return {"trial": best.number, "value": value, "run_id": existing.info.run_id,
                "test_accuracy": existing.data.metrics.get("test_accuracy")}

    log(f"training the from-scratch baseline (trial {best.number}'s architecture, random init, {cfg.baseline.epochs} epochs max)")
    run_id = tracker.start_child(
        f"scratch baseline of trial {best.number}", "baseline",
        {"harness.baseline_for": best.number, "backbone": params["backbone"], "dataset": dataset_name,
         "strategy": "scratch", STATE_TAG: "RUNNING"},
        config=cfg.to_dict(),
    )
    tracker.log_params(run_id, {**params, "weights": "none", "baseline_lr": cfg.baseline.learning_rate,
                                "baseline_epochs": cfg.baseline.epochs})
    result = run_task(BaselineTask(cfg.study.name, params, run_id))
    return {"trial": best.number, "run_id": run_id, **result}


@dataclass(frozen=True)
class BaselineTask:
    """The scratch baseline's training, as a task for a trial process."""

    context_key: str
    params: dict
    run_id: str
    context: Any = None

    def run(self, runner, channel) -> dict[str, float]:
        return train_scratch(runner, self.params, self.run_id)


def train_scratch(runner, params: dict, run_id: str) -> dict[str, float]:
    """All layers from random init for the baseline's own budget; logs into `run_id`.

    Returns its best validation value and the test accuracy of the weights that scored it
    (read once, after training, as for the winner)."""
    import keras

    from harness.data import tf_dataset
    from harness.model import build_model
    from harness.phases import evaluate, run_phases, scratch_plan

    cfg, dataset, splits, tracker = runner.cfg, runner.dataset, runner.splits, runner.tracker
    started = time.perf_counter()
    try:
        keras.utils.set_random_seed(cfg.study.seed)
        tm = build_model(model_spec(cfg, params, dataset.num_classes, None, pretrained=False), seed=cfg.study.seed)
        train = tf_dataset(dataset, splits.train, cfg.train.head.batch_size, shuffle=True, seed=cfg.data.seed)
        val = tf_dataset(dataset, splits.val, cfg.train.head.batch_size, shuffle=False)

        def on_epoch(r):
            tracker.log_metrics(run_id, r.metrics, step=r.epoch)
            print(f"  baseline epoch {r.epoch + 1}/{cfg.baseline.epochs}: loss {r.metrics.get('loss', float('nan')):.3f} "
                  f"val_accuracy {r.metrics.get('val_accuracy', float('nan')):.3f}", file=sys.stderr, flush=True)

        plan = scratch_plan(cfg.baseline.epochs, cfg.baseline.learning_rate, cfg.baseline.patience)
        history = run_phases(tm, plan, train, val, on_epoch=on_epoch, monitor=cfg.study.metric, direction=cfg.study.direction)
        log_history(tracker, run_id, history)
        test = evaluate(tm.model, tf_dataset(dataset, splits.test, cfg.train.head.batch_size, shuffle=False))
    except BaseException as exc:
        tracker.log_failure(run_id, exc)
        tracker.end_run(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED", optuna_state="FAIL")
        raise
    finally:
        release_memory()
    value = history.best(cfg.study.metric, cfg.study.direction)
    tracker.log_metrics(run_id, {"objective": value, f"best_{cfg.study.metric}": value, "test_accuracy": test["accuracy"],
                                 "test_loss": test["loss"], "wall_seconds": time.perf_counter() - started})
    tracker.end_run(run_id, "FINISHED", optuna_state="COMPLETE")
    return {"value": value, "test_accuracy": test["accuracy"]}

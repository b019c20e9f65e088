"""From-scratch training done properly: the sweep's baseline and the `scratch` cells' confirmation.

Every comparison flatters transfer unless the from-scratch model is trained with care (He et al.,
2019: it needs a longer schedule, and then catches up on large data):

- all layers train, BatchNormalization included (lowered momentum, and statistics re-estimated
  on training batches before every validation, so inference-mode scores are fair);
- the budget is optimizer steps with a floor (`baseline.min_steps`), not epochs of a small set;
- the learning rate comes from a short search (the same model trained briefly at each of a few
  rates; the lowest training loss wins) unless one is set;
- early stopping on the validation split keeps the best validation's weights;
- its accuracy on its own training images is measured: a model below 0.95 there (on up to 5,000
  images) did not fit its data, is flagged as under-trained, and is not reported as a result.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.objective import log_history, model_spec, release_memory, train_class_weights
from harness.tracking import STATE_TAG, Tracker

FIT_FLOOR = 0.95  # training accuracy a from-scratch model must reach to count as trained
FIT_CHECK_MAX_IMAGES = 5000  # beyond this a model may fairly stop short of fitting every image
UNDERTRAINED_TAG = "harness.undertrained"
MAX_VALIDATIONS = 40  # a long from-scratch run is validated at most this often (each costs a BN re-estimate)


@dataclass(frozen=True)
class ScratchBudget:
    steps: int  # optimizer steps in all
    steps_per_round: int  # steps between validations (an "epoch" of the run's history)
    rounds: int
    patience: int | None  # in rounds


def scratch_budget(train_images: int, batch_size: int, epochs: int, min_steps: int, patience: int | None) -> ScratchBudget:
    """Steps = epochs of the training set, at least `min_steps`; validated every epoch, or less
    often when that would mean more than MAX_VALIDATIONS validations. Patience keeps its meaning
    in epochs, and is at least 3 validations."""
    per_epoch = max(1, math.ceil(train_images / batch_size))
    steps = max(epochs * per_epoch, min_steps)
    per_round = max(per_epoch, math.ceil(steps / MAX_VALIDATIONS))
    rounds = math.ceil(steps / per_round)
    # A from-scratch model's validation score often sits at chance for a while before it moves:
    # patience is never less than a quarter of the run.
    rounds_patience = None if patience is None else max(3, math.ceil(patience * per_epoch / per_round), rounds // 4)
    return ScratchBudget(rounds * per_round, per_round, rounds, rounds_patience)


LR_CANDIDATES = (1e-4, 3e-4, 1e-3)  # Adam rates a from-scratch CNN trains well with; higher ones killed
# the demo's MobileNetV2 (every ReLU dead, the loss stuck at ln(classes)) after looking best for 100 steps


def pick_learning_rate(losses: dict[float, float]) -> float:
    """The learning-rate search's answer: the rate whose short run ended with the lowest training
    loss (a diverged run's loss is inf or NaN and never wins)."""
    finite = {rate: loss for rate, loss in losses.items() if math.isfinite(loss)}
    if not finite:
        return min(losses)  # everything diverged: the smallest rate is the least bad guess
    return min(finite, key=lambda rate: (finite[rate], rate))


def learning_rate_search(tm, train_ds, steps_each: int, candidates=LR_CANDIDATES) -> dict[float, float]:
    """Train the same fresh model a short while at each candidate rate (weights and optimizer
    state reset between candidates, so one traced training step serves them all); returns each
    rate's mean training loss over the second half of its run."""
    import keras

    from harness.model import set_all_trainable
    from harness.phases import compile_for

    set_all_trainable(tm)
    compile_for(tm, candidates[0])
    initial = tm.model.get_weights()
    losses = {}
    for rate in candidates:
        tm.model.set_weights(initial)
        optimizer = tm.model.optimizer
        for variable in optimizer.variables:  # Adam's moments and step count, from zero
            variable.assign(np.zeros(variable.shape, variable.dtype))
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):  # mixed precision: a loss scale of 0 is NaN
            optimizer.dynamic_scale.assign(optimizer.initial_scale)
        tm.model.optimizer.learning_rate.assign(rate)
        half = max(1, steps_each // 2)
        history = tm.model.fit(train_ds, epochs=2, steps_per_epoch=half, verbose=0)
        loss = float(history.history["loss"][-1])
        losses[rate] = loss if math.isfinite(loss) else math.inf
    return losses


def fit_verdict(train_accuracy: float, train_images: int) -> bool:
    """True when a from-scratch model fitted its training data well enough to be a result."""
    return train_accuracy >= FIT_FLOOR or train_images > FIT_CHECK_MAX_IMAGES


def train_from_scratch(runner, params: dict, seed: int, run_id: str, on_epoch=lambda r: None):
    """All layers from random init, to convergence; logs into `run_id`. Returns (model, history,
    facts): the model holds its best validation's weights; facts has learning_rate, steps,
    train_accuracy and fitted."""
    import keras

    from harness.data import tf_dataset
    from harness.model import build_model
    from harness.phases import evaluate, run_phases, scratch_plan

    cfg, dataset, splits, tracker = runner.cfg, runner.dataset, runner.splits, runner.tracker
    batch = cfg.train.head.batch_size
    budget = scratch_budget(len(splits.train), batch, cfg.baseline.epochs, cfg.baseline.min_steps, cfg.baseline.patience)
    train = tf_dataset(dataset, splits.train, batch, shuffle=True, seed=seed).repeat()
    val = tf_dataset(dataset, splits.val, batch, shuffle=False)
    spec = model_spec(cfg, params, dataset.num_classes, None, pretrained=False)

    learning_rate = cfg.baseline.learning_rate
    if learning_rate == "auto":
        keras.utils.set_random_seed(seed)
        losses = learning_rate_search(build_model(spec, seed=seed), train, max(20, budget.steps // 20))
        learning_rate = pick_learning_rate(losses)
        tracker.log_text(run_id, "learning_rate,train_loss\n" + "".join(f"{r:g},{l:.6g}\n" for r, l in losses.items()),
                         "learning_rate_search.csv")
        release_memory()  # keeps the mixed-precision policy, which clear_session would reset
    keras.utils.set_random_seed(seed)
    tm = build_model(spec, seed=seed)
    plan = scratch_plan(budget.rounds, learning_rate, budget.patience)
    history = run_phases(tm, plan, train, val, on_epoch=on_epoch, monitor=cfg.study.metric,
                         direction=cfg.study.direction, steps_per_epoch=budget.steps_per_round,
                         class_weight=train_class_weights(cfg, dataset, splits))
    train_accuracy = evaluate(tm.model, tf_dataset(dataset, splits.train, batch, shuffle=False))["accuracy"]
    fitted = fit_verdict(train_accuracy, len(splits.train))
    steps_run = sum(p.epochs_run for p in history.phases) * budget.steps_per_round
    tracker.log_params(run_id, {"scratch_learning_rate": f"{learning_rate:.4g}", "scratch_step_budget": budget.steps,
                                "scratch_steps_per_validation": budget.steps_per_round})
    tracker.log_metrics(run_id, {"train_accuracy": train_accuracy, "scratch/steps": steps_run,
                                 "scratch/images_seen": steps_run * batch})
    tracker.set_tags(run_id, {UNDERTRAINED_TAG: str(not fitted).lower()})
    return tm, history, {"learning_rate": learning_rate, "steps": steps_run, "train_accuracy": train_accuracy,
                         "fitted": fitted}


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
        train_accuracy = existing.data.metrics.get("train_accuracy")
        return {"trial": best.number, "value": value, "run_id": existing.info.run_id,
                "test_accuracy": existing.data.metrics.get("test_accuracy"), "train_accuracy": train_accuracy,
                "fitted": existing.data.tags.get(UNDERTRAINED_TAG) != "true"}

    log(f"training the from-scratch baseline (trial {best.number}'s architecture, random init, at least "
        f"{cfg.baseline.min_steps} steps, learning rate {cfg.baseline.learning_rate})")
    run_id = tracker.start_child(
        f"scratch baseline of trial {best.number}", "baseline",
        {"harness.baseline_for": best.number, "backbone": params["backbone"], "dataset": dataset_name,
         "strategy": "scratch", STATE_TAG: "RUNNING"},
        config=cfg.to_dict(),
    )
    tracker.log_params(run_id, {**params, "weights": "none", "baseline_min_steps": cfg.baseline.min_steps,
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


def train_scratch(runner, params: dict, run_id: str) -> dict[str, Any]:
    """The sweep's baseline, trained to convergence into `run_id` (harness process-side).

    Returns its best validation value, its training accuracy (and whether that counts as fitted)
    and the test accuracy of the weights that scored it (read once, after training)."""
    from harness.data import tf_dataset
    from harness.phases import evaluate

    cfg, dataset, splits, tracker = runner.cfg, runner.dataset, runner.splits, runner.tracker
    started = time.perf_counter()
    try:
        def on_epoch(r):
            tracker.log_metrics(run_id, r.metrics, step=r.epoch)
            print(f"  baseline validation {r.epoch + 1}: loss {r.metrics.get('loss', float('nan')):.3f} "
                  f"val_accuracy {r.metrics.get('val_accuracy', float('nan')):.3f}", file=sys.stderr, flush=True)

        tm, history, facts = train_from_scratch(runner, params, cfg.study.seed, run_id, on_epoch)
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
    return {"value": value, "test_accuracy": test["accuracy"], "train_accuracy": facts["train_accuracy"],
            "fitted": facts["fitted"], "learning_rate": facts["learning_rate"], "steps": facts["steps"]}

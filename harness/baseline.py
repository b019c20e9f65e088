"""From-scratch training done properly: the sweep's baseline and the `scratch` cells' confirmation.

Every comparison flatters transfer unless the from-scratch model is trained with care (He et al.,
2019: it needs a longer schedule, and then catches up on large data):

- all layers train, BatchNormalization included (lowered momentum, and statistics re-estimated
  on training batches before every validation, so inference-mode scores are fair);
- the budget is optimizer steps with a floor (`baseline.min_steps`), not epochs of a small set;
- the learning rate comes from a short search (the same model trained briefly at each of a few
  rates; the lowest training loss wins) unless one is set;
- early stopping never ends the run before the step floor, and after it waits until neither the
  validation loss nor the study metric improves (accuracy can sit at chance while the loss
  falls); the best validation's weights (study metric) are kept;
- its accuracy on its own training images is measured: a model below 0.95 there (on up to 5,000
  images) did not fit its data. It is trained again at the search's next-ranked learning rate
  (`baseline.retries` times at most), and only then flagged as under-trained and not reported
  as a result.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.objective import log_history, model_spec, release_memory, seed_everything, train_class_weights
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
    min_rounds: int  # rounds before early stopping may end the run: the step floor, in rounds


def scratch_budget(train_images: int, batch_size: int, epochs: int, min_steps: int, patience: int | None) -> ScratchBudget:
    """Steps = epochs of the training set, at least `min_steps`; validated every epoch, or less
    often when that would mean more than MAX_VALIDATIONS validations. Patience keeps its meaning
    in epochs, and is at least 3 validations. Early stopping may not end the run before
    `min_steps` (min_rounds validations)."""
    per_epoch = max(1, math.ceil(train_images / batch_size))
    steps = max(epochs * per_epoch, min_steps)
    per_round = max(per_epoch, math.ceil(steps / MAX_VALIDATIONS))
    rounds = math.ceil(steps / per_round)
    # A from-scratch model's validation score often sits at chance for a while before it moves:
    # patience is never less than a quarter of the run.
    rounds_patience = None if patience is None else max(3, math.ceil(patience * per_epoch / per_round), rounds // 4)
    return ScratchBudget(rounds * per_round, per_round, rounds, rounds_patience, math.ceil(min_steps / per_round))


LR_CANDIDATES = (1e-4, 3e-4, 1e-3)  # Adam rates a from-scratch CNN trains well with; higher ones killed
# the demo's MobileNetV2 (every ReLU dead, the loss stuck at ln(classes)) after looking best for 100 steps


def learning_rate_order(losses: dict[float, float]) -> list[float]:
    """The learning-rate search's ranking, best first: the rate whose short run ended with the
    lowest training loss first (ties: the smaller rate); diverged runs (inf or NaN) last, smallest
    first. The first is the rate trained with; the next ones are the retries."""
    finite = sorted((rate for rate, loss in losses.items() if math.isfinite(loss)), key=lambda rate: (losses[rate], rate))
    return finite + sorted(rate for rate, loss in losses.items() if not math.isfinite(loss))


def pick_learning_rate(losses: dict[float, float]) -> float:
    """The search's answer (a diverged run never wins unless every run diverged: then the smallest rate)."""
    return learning_rate_order(losses)[0]


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


@dataclass(frozen=True)
class Attempt:
    """One from-scratch training at one learning rate."""

    learning_rate: float
    steps: int  # optimizer steps run
    train_accuracy: float  # on up to the whole training split, inference mode; NaN when it diverged
    value: float  # best validation value of the study metric
    fitted: bool
    diverged: bool = False
    seconds: float = 0.0  # training time (phases), for the cost columns


def attempt_to_keep(attempts: list[Attempt]) -> int:
    """The attempt whose model is the result: the first that fitted its training data, else the
    one that came closest (highest training accuracy; a diverged one only if all diverged)."""
    for i, attempt in enumerate(attempts):
        if attempt.fitted:
            return i
    scores = [a.train_accuracy if math.isfinite(a.train_accuracy) else -math.inf for a in attempts]
    return scores.index(max(scores))


def attempts_csv(attempts: list[Attempt], metric: str) -> str:
    rows = "".join(f"{i + 1},{a.learning_rate:g},{a.steps},{a.train_accuracy:.6g},{a.value:.6g},{str(a.fitted).lower()},"
                   f"{str(a.diverged).lower()}\n" for i, a in enumerate(attempts))
    return f"attempt,learning_rate,steps,train_accuracy,best_{metric},fitted,diverged\n" + rows


def print_note(note) -> None:
    """Where a run's notes go when it has no trial engine to show them: its messages, to stderr."""
    kind, payload = note
    if kind == "message":
        print(payload, file=sys.stderr, flush=True)


def train_from_scratch(runner, params: dict, seed: int, run_id: str, on_epoch=lambda r: None, label: str = "scratch",
                       note=print_note, number: int = 0):
    """All layers from random init, to convergence; logs into `run_id`. Returns (model, history,
    facts): the model holds its best validation's weights; facts has learning_rate, steps,
    train_accuracy, fitted, attempts, steps_all_attempts and seconds_all_attempts.

    A run that does not fit its training data (`fit_verdict`) is trained again from the same
    init at the search's next-ranked learning rate, up to `baseline.retries` times (a rate set
    in the config is the only one tried). Every attempt is logged (learning_rate_attempts.csv,
    the attempt/* metrics) and announced, one line each headed by `label`, through
    `note(("message", text))`; each validation goes to `note(("epoch", summary))` as a trial's
    does (harness/trials.py `show_note`), numbered `number`."""
    from harness.data import tf_dataset
    from harness.model import build_model
    from harness.phases import History, NonFiniteLoss, evaluate, run_phases, scratch_plan

    cfg, dataset, splits, tracker = runner.cfg, runner.dataset, runner.splits, runner.tracker
    metric, direction = cfg.study.metric, cfg.study.direction
    batch = cfg.train.head.batch_size
    budget = scratch_budget(len(splits.train), batch, cfg.baseline.epochs, cfg.baseline.min_steps, cfg.baseline.patience)
    val = tf_dataset(dataset, splits.val, batch, shuffle=False)
    spec = model_spec(cfg, params, dataset.num_classes, None, pretrained=False)

    def seeded_start():
        """A fresh model and training pipeline, the same for the search and every attempt. Seeded
        first: tf.data takes a pipeline's shuffle seeds from TensorFlow's global seed when it is
        built. And fresh: a shuffled pipeline's order moves on with every pass over it."""
        seed_everything(seed)
        return build_model(spec, seed=seed), tf_dataset(dataset, splits.train, batch, shuffle=True, seed=seed).repeat()

    if cfg.baseline.learning_rate == "auto":
        steps_each = max(20, budget.steps // 20)
        note(("message", f"{label} learning-rate search: {len(LR_CANDIDATES)} rates, {steps_each} steps each"))
        losses = learning_rate_search(*seeded_start(), steps_each, LR_CANDIDATES)
        rates = learning_rate_order(losses)
        found = ", ".join(f"{r:g} {losses[r]:.4g}" for r in losses)
        order = ", ".join(f"{r:g}" for r in rates[:1 + cfg.baseline.retries])
        note(("message", f"{label} learning-rate search: training loss {found}; tried in the order {order}"))
        tracker.log_text(run_id, "learning_rate,train_loss\n" + "".join(f"{r:g},{l:.6g}\n" for r, l in losses.items()),
                         "learning_rate_search.csv")
        release_memory()  # keeps the mixed-precision policy, which clear_session would reset
    else:
        rates = [float(cfg.baseline.learning_rate)]
    rates = rates[:1 + cfg.baseline.retries]
    class_weight = train_class_weights(cfg, dataset, splits)
    attempts: list[Attempt] = []
    kept = None  # (index, weights, history) of the best unfitted attempt, while another is tried
    start_epoch = 0  # attempts follow each other on the run's one epoch axis
    for i, rate in enumerate(rates):
        tm, train = seeded_start()  # so a retry trains as if its rate had been ranked first
        history = History()
        diverged = False
        phase = "scratch" if i == 0 else f"scratch attempt {i + 1}"

        def on_validation(record, first=start_epoch, phase=phase):
            on_epoch(record)
            note(("epoch", {"number": number, "epoch": record.epoch - first, "phase": phase,
                            "metrics": dict(record.metrics), "total_epochs": budget.rounds}))

        try:
            run_phases(tm, scratch_plan(budget.rounds, rate, budget.patience, budget.min_rounds), train, val,
                       on_epoch=on_validation, monitor=metric, direction=direction, start_epoch=start_epoch, history=history,
                       steps_per_epoch=budget.steps_per_round, class_weight=class_weight)
        except NonFiniteLoss:
            diverged = True
        ran = len(history.epochs)
        start_epoch += ran
        train_accuracy = math.nan if diverged else evaluate(tm.model, tf_dataset(dataset, splits.train, batch,
                                                                                 shuffle=False))["accuracy"]
        attempt = Attempt(rate, ran * budget.steps_per_round, train_accuracy, history.best(metric, direction),
                          not diverged and fit_verdict(train_accuracy, len(splits.train)), diverged,
                          sum(p.seconds for p in history.phases))
        attempts.append(attempt)
        outcome = "fitted" if attempt.fitted else ("diverged" if diverged else f"did not fit (below {FIT_FLOOR})")
        more = not attempt.fitted and i + 1 < len(rates)
        retry = f"; retrying at {rates[i + 1]:g}" if more else ""
        line = (f"{label} attempt {i + 1}/{len(rates)}: learning rate {rate:g}, {attempt.steps} steps, "
                f"train accuracy {train_accuracy:.3f}, best {metric} {attempt.value:.3f}: {outcome}{retry}")
        note(("message", line))
        tracker.log_metrics(run_id, {"attempt/learning_rate": rate, "attempt/steps": attempt.steps,
                                     "attempt/train_accuracy": train_accuracy, f"attempt/best_{metric}": attempt.value},
                            step=i)
        if not more:
            break
        if attempt_to_keep(attempts) == i:
            kept = (i, tm.model.get_weights(), history)
        tm = None
        release_memory()
    chosen = attempt_to_keep(attempts)
    if attempts[chosen].diverged:
        raise NonFiniteLoss(f"from-scratch training diverged at every learning rate tried ({', '.join(f'{r:g}' for r in rates)})")
    if chosen != len(attempts) - 1:  # an earlier attempt came closer: its weights go into the same architecture
        _, weights, history = kept
        tm.model.set_weights(weights)
    final = attempts[chosen]
    tracker.log_text(run_id, attempts_csv(attempts, metric), "learning_rate_attempts.csv")
    tracker.log_params(run_id, {"scratch_learning_rate": f"{final.learning_rate:.4g}", "scratch_step_budget": budget.steps,
                                "scratch_steps_per_validation": budget.steps_per_round,
                                "scratch_min_steps": budget.min_rounds * budget.steps_per_round,
                                "scratch_learning_rate_attempts": ", ".join(f"{a.learning_rate:g}" for a in attempts)})
    tracker.log_metrics(run_id, {"train_accuracy": final.train_accuracy, "scratch/steps": final.steps,
                                 "scratch/images_seen": final.steps * batch, "scratch/attempts": len(attempts),
                                 "scratch/steps_all_attempts": sum(a.steps for a in attempts)})
    tracker.set_tags(run_id, {UNDERTRAINED_TAG: str(not final.fitted).lower()})
    return tm, history, {"learning_rate": final.learning_rate, "steps": final.steps, "train_accuracy": final.train_accuracy,
                         "fitted": final.fitted, "attempts": attempts,
                         # the compute of every attempt, for cost columns (a retry is part of the recipe's price)
                         "steps_all_attempts": sum(a.steps for a in attempts),
                         "seconds_all_attempts": sum(a.seconds for a in attempts)}


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
    from harness.progress import Progress

    # Its validations are shown as a trial's epochs are: a long from-scratch run is never silent.
    progress = Progress(1, 0, cfg.study.direction, cfg.study.metric, sys.stderr, prefix="baseline")
    try:
        result = run_task(BaselineTask(cfg.study.name, params, run_id, best.number), progress)
    finally:
        progress.close()
    return {"trial": best.number, "run_id": run_id, **result}


@dataclass(frozen=True)
class BaselineTask:
    """The scratch baseline's training, as a task for a trial process."""

    context_key: str
    params: dict
    run_id: str
    trial: int = 0  # the trial whose architecture it trains (the number its progress lines show)
    context: Any = None

    def run(self, runner, channel) -> dict[str, float]:
        return train_scratch(runner, self.params, self.run_id, channel.note, self.trial)


def train_scratch(runner, params: dict, run_id: str, note=print_note, number: int = 0) -> dict[str, Any]:
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

        tm, history, facts = train_from_scratch(runner, params, cfg.study.seed, run_id, on_epoch, "baseline", note, number)
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

"""From-scratch training done properly, and the one training rule confirmations share.

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

Used in trial processes by the sweep's baseline and by the `scratch` cells' confirmation seeds
(harness/tasks.py); the confirmation seeds of transfer strategies train under the same step floor
and stopping rule (`confirmation_plan`), so confirmed cells compare under one rule.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from harness.config import BaselineConfig, SweepConfig, TrainConfig
from harness.phases import EpochRecord, History, NonFiniteLoss, Phase, scratch_plan
from harness.training import Configuration, EpochHooks, Trainer, epoch_note

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


def learning_rate_search(
    trainer: Trainer, config: Configuration, steps_each: int, candidates=LR_CANDIDATES
) -> dict[float, float]:
    """Train the same fresh model (every layer, BatchNormalization included) a short while at each
    candidate rate, from the same initial weights with a fresh optimizer state each time; returns
    each rate's mean training loss over the second half of its run (diverged: inf)."""
    model = trainer.build(config)
    trainer.fw.set_trainable(model, -1)
    train, _ = trainer.image_batches(trainer.settings.batch_size("scratch"), config.data_seed)
    losses = trainer.fw.short_runs(model, train, list(candidates), max(1, steps_each // 2))
    return {rate: loss if math.isfinite(loss) else math.inf for rate, loss in losses.items()}


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
    rows = "".join(
        f"{i + 1},{a.learning_rate:g},{a.steps},{a.train_accuracy:.6g},{a.value:.6g},{str(a.fitted).lower()},"
        f"{str(a.diverged).lower()}\n"
        for i, a in enumerate(attempts)
    )
    return f"attempt,learning_rate,steps,train_accuracy,best_{metric},fitted,diverged\n" + rows


def print_note(note) -> None:
    """Where a run's notes go when it has no trial engine to show them: its messages, to stderr."""
    kind, payload = note
    if kind == "message":
        print(payload, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class ScratchRun:
    """One from-scratch training into one MLflow run: whose model, which seed, how it reports.

    `label` heads its message lines ("baseline", "seed 3"); `number` is the trial whose progress
    line its epochs show; `note(("message", text))` and `note(("epoch", summary))` reach the
    sweep's progress (harness/trials.py `show_note`); `on_epoch(record)` logs each validation."""

    runner: Any  # harness.objective.TrialRunner
    params: dict
    seed: int
    run_id: str
    on_epoch: Callable[[EpochRecord], None] = lambda record: None
    label: str = "scratch"
    note: Callable[[tuple], None] = print_note
    number: int = 0


def scratch_rates(run: ScratchRun, trainer: Trainer, config: Configuration, budget: ScratchBudget) -> list[float]:
    """The learning rates to try, best first: the configured one, or the search's ranking (logged)."""
    baseline = run.runner.cfg.baseline
    if baseline.learning_rate != "auto":
        return [float(baseline.learning_rate)]
    steps_each = max(20, budget.steps // 20)
    run.note(("message", f"{run.label} learning-rate search: {len(LR_CANDIDATES)} rates, {steps_each} steps each"))
    losses = learning_rate_search(trainer, config, steps_each, LR_CANDIDATES)
    rates = learning_rate_order(losses)
    found = ", ".join(f"{r:g} {losses[r]:.4g}" for r in losses)
    order = ", ".join(f"{r:g}" for r in rates[: 1 + baseline.retries])
    run.note(("message", f"{run.label} learning-rate search: training loss {found}; tried in the order {order}"))
    run.runner.tracker.log_text(
        run.run_id,
        "learning_rate,train_loss\n" + "".join(f"{r:g},{l:.6g}\n" for r, l in losses.items()),
        "learning_rate_search.csv",
    )
    trainer.fw.release_memory()  # keeps the mixed-precision policy, which clear_session would reset
    return rates[: 1 + baseline.retries]


def scratch_attempt(run: ScratchRun, trainer: Trainer, config: Configuration, attempt: int, first_epoch: int):
    """Train one attempt from the same seeded init (as if its rate had been ranked first), on the
    run's one epoch axis from `first_epoch`; returns (model, history, diverged)."""
    phase = "scratch" if attempt == 0 else f"scratch attempt {attempt + 1}"
    total = config.plan[0].epochs
    metric = run.runner.cfg.study.metric

    def on_validation(record: EpochRecord) -> None:
        run.on_epoch(record)
        run.note(("epoch", epoch_note(run.number, record, total, metric, offset=first_epoch, phase=phase)))

    history = History()
    model = trainer.build(config)
    try:
        trainer.run_plan(model, config, EpochHooks(on_validation), history, first_epoch)
    except NonFiniteLoss:
        return model, history, True
    return model, history, False


def judge_attempt(run: ScratchRun, trainer: Trainer, model, history: History, diverged: bool, phase: Phase) -> Attempt:
    """An attempt's facts (`phase`: its one phase, at its rate): its training accuracy (inference
    mode, the whole training split) and whether that counts as fitted."""
    cfg, splits = run.runner.cfg, run.runner.splits
    train_accuracy = math.nan if diverged else trainer.evaluate(model, splits.train)["accuracy"]
    assert phase.steps_per_epoch is not None  # a from-scratch phase is budgeted in steps (scratch_budget)
    return Attempt(
        phase.learning_rate,
        len(history.epochs) * phase.steps_per_epoch,
        train_accuracy,
        history.best(cfg.study.metric, cfg.study.direction),
        not diverged and fit_verdict(train_accuracy, len(splits.train)),
        diverged,
        sum(p.seconds for p in history.phases),
    )


def announce_attempt(run: ScratchRun, attempts: list[Attempt], rates: list[float]) -> None:
    """The attempt's line (and what comes next) and its attempt/* metrics."""
    i, attempt = len(attempts) - 1, attempts[-1]
    metric = run.runner.cfg.study.metric
    outcome = "fitted" if attempt.fitted else ("diverged" if attempt.diverged else f"did not fit (below {FIT_FLOOR})")
    retry = f"; retrying at {rates[i + 1]:g}" if not attempt.fitted and i + 1 < len(rates) else ""
    run.note(
        (
            "message",
            f"{run.label} attempt {i + 1}/{len(rates)}: learning rate {attempt.learning_rate:g}, {attempt.steps} steps, "
            f"train accuracy {attempt.train_accuracy:.3f}, best {metric} {attempt.value:.3f}: {outcome}{retry}",
        )
    )
    run.runner.tracker.log_metrics(
        run.run_id,
        {
            "attempt/learning_rate": attempt.learning_rate,
            "attempt/steps": attempt.steps,
            "attempt/train_accuracy": attempt.train_accuracy,
            f"attempt/best_{metric}": attempt.value,
        },
        step=i,
    )


def train_from_scratch(run: ScratchRun):
    """All layers from random init, to convergence; logs into `run.run_id`. Returns (model,
    history, facts): the model holds its best validation's weights; facts has learning_rate,
    steps, train_accuracy, fitted, attempts, steps_all_attempts and seconds_all_attempts.

    A run that does not fit its training data (`fit_verdict`) is trained again from the same
    init at the search's next-ranked learning rate, up to `baseline.retries` times (a rate set
    in the config is the only one tried). Every attempt is logged (learning_rate_attempts.csv,
    the attempt/* metrics) and announced, one line each headed by `run.label`; each validation
    goes to `run.note(("epoch", summary))` as a trial's does, numbered `run.number`."""
    cfg, runner = run.runner.cfg, run.runner
    trainer = runner.trainer(run.params["backbone"])
    budget = scratch_budget(
        len(runner.splits.train), cfg.train.head.batch_size, cfg.baseline.epochs, cfg.baseline.min_steps, cfg.baseline.patience
    )
    spec = runner.spec(run.params, pretrained=False)

    def configuration(rate: float) -> Configuration:
        plan = scratch_plan(budget.rounds, rate, budget.patience, budget.min_rounds, budget.steps_per_round)
        return Configuration(spec, tuple(plan), run.seed, run.seed)

    rates = scratch_rates(run, trainer, configuration(LR_CANDIDATES[0]), budget)
    attempts: list[Attempt] = []
    kept = None  # (weights, history) of the best unfitted attempt, while another is tried
    first_epoch = 0  # attempts follow each other on the run's one epoch axis
    for i, rate in enumerate(rates):
        config = configuration(rate)
        model, history, diverged = scratch_attempt(run, trainer, config, i, first_epoch)
        first_epoch += len(history.epochs)
        attempts.append(judge_attempt(run, trainer, model, history, diverged, config.plan[0]))
        announce_attempt(run, attempts, rates)
        if attempts[-1].fitted or i + 1 == len(rates):
            break
        if attempt_to_keep(attempts) == i:
            kept = (trainer.fw.weights_of(model), history)
        model = None
        trainer.fw.release_memory()
    chosen = attempt_to_keep(attempts)
    if attempts[chosen].diverged:
        raise NonFiniteLoss(f"from-scratch training diverged at every learning rate tried ({', '.join(f'{r:g}' for r in rates)})")
    if chosen != len(attempts) - 1:  # an earlier attempt came closer: its weights go into the same architecture
        # Set: no attempt fitted (a fitted one ends the loop as the last), so the chosen one led when it ran.
        assert kept is not None
        weights, history = kept
        trainer.fw.load_weights(model, weights)
    log_scratch_run(run, attempts, attempts[chosen], budget)
    return model, history, scratch_facts(attempts, attempts[chosen])


def log_scratch_run(run: ScratchRun, attempts: list[Attempt], final: Attempt, budget: ScratchBudget) -> None:
    tracker, cfg = run.runner.tracker, run.runner.cfg
    tracker.log_text(run.run_id, attempts_csv(attempts, cfg.study.metric), "learning_rate_attempts.csv")
    tracker.log_params(
        run.run_id,
        {
            "scratch_learning_rate": f"{final.learning_rate:.4g}",
            "scratch_step_budget": budget.steps,
            "scratch_steps_per_validation": budget.steps_per_round,
            "scratch_min_steps": budget.min_rounds * budget.steps_per_round,
            "scratch_learning_rate_attempts": ", ".join(f"{a.learning_rate:g}" for a in attempts),
        },
    )
    tracker.log_metrics(
        run.run_id,
        {
            "train_accuracy": final.train_accuracy,
            "scratch/steps": final.steps,
            "scratch/images_seen": final.steps * cfg.train.head.batch_size,
            "scratch/attempts": len(attempts),
            "scratch/steps_all_attempts": sum(a.steps for a in attempts),
        },
    )
    tracker.set_tags(run.run_id, {UNDERTRAINED_TAG: str(not final.fitted).lower()})


def scratch_facts(attempts: list[Attempt], final: Attempt) -> dict[str, Any]:
    return {
        "learning_rate": final.learning_rate,
        "steps": final.steps,
        "train_accuracy": final.train_accuracy,
        "fitted": final.fitted,
        "attempts": attempts,
        # the compute of every attempt, for cost columns (a retry is part of the recipe's price)
        "steps_all_attempts": sum(a.steps for a in attempts),
        "seconds_all_attempts": sum(a.seconds for a in attempts),
    }


# --- the training rule of confirmation seeds --------------------------------------------------

RULE_TAG = "harness.training_rule"  # how a confirmation seed was trained: cells compare only under one rule


def training_rule(ccfg: SweepConfig) -> str:
    """The training rule every confirmation seed follows, whatever its strategy, in words (pure).
    Cells trained under different rules (records of older sweeps, which trained transfer seeds on
    the search's epoch budget) differ in schedule as well as strategy, so the report does not call
    a winner between them (harness/verdicts.py).

        >>> training_rule(cfg)
        'to convergence: at least 3000 optimizer steps in all and 30 epochs, then early stopping once val_loss and
        val_accuracy stall for 8 epochs; a transfer model's head phase (10 epochs, patience 4) counts toward them;
        from scratch, up to 2 retries at the next learning rate when unfitted'
    """
    b, head = ccfg.baseline, ccfg.train.head
    stop = (
        "no early stopping"
        if b.patience is None
        else (f"then early stopping once val_loss and {ccfg.study.metric} stall for {b.patience} epochs")
    )
    return (
        f"to convergence: at least {b.min_steps} optimizer steps in all and {b.epochs} epochs, {stop}; "
        f"a transfer model's head phase ({head.epochs} epochs, patience {head.patience or 'off'}) counts toward them; "
        f"from scratch, up to {b.retries} retries at the next learning rate when unfitted"
    )


def confirmation_plan(plan: list[Phase], train_images: int, train: TrainConfig, baseline: BaselineConfig) -> list[Phase]:
    """A transfer strategy's search plan, turned into its confirmation plan (pure): the rule
    scratch seeds train under (`training_rule`), so a verdict compares strategies, not schedules.

    The phases before the last keep their schedule (the head phase trains the new head before
    anything unfreezes); their planned steps count toward `baseline.min_steps`. The last phase
    (fine-tune, or the only phase of a frozen-features strategy) covers the rest of the floor and
    at least the rest of `baseline.epochs`, budgeted as a from-scratch run is (`scratch_budget`:
    steps between validations, validations, patience in validations), and stops as one does
    (`scratch_keeps_training`: never before the floor, then once neither the validation loss nor
    the metric improves)."""
    phases = [p for p in plan if p.epochs > 0]
    if not phases:  # every phase configured off: nothing trains in the search either
        return plan
    *before, last = phases
    batch = {"head": train.head.batch_size, "finetune": train.finetune.batch_size}
    steps_before = sum(p.epochs * math.ceil(train_images / batch[p.name]) for p in before)
    epochs_left = max(last.epochs, baseline.epochs - sum(p.epochs for p in before))
    budget = scratch_budget(
        train_images, batch[last.name], epochs_left, max(0, baseline.min_steps - steps_before), baseline.patience
    )
    one_pass = math.ceil(train_images / batch[last.name])
    return [
        *before,
        replace(
            last,
            epochs=budget.rounds,
            patience=budget.patience,
            min_epochs=budget.min_rounds,
            stall_stopping=True,
            steps_per_epoch=None if budget.steps_per_round == one_pass else budget.steps_per_round,
        ),
    ]


def images_seen(plan: list[Phase], epochs_run: list[int], train_images: int, train: TrainConfig) -> int:
    """Training images a plan's phases went through, given how many epochs each ran (pure): an
    epoch is one pass over the training set, or `steps_per_epoch` batches where the phase sets it."""
    batch = {"head": train.head.batch_size, "finetune": train.finetune.batch_size}
    return sum(
        ran * (p.steps_per_epoch * batch[p.name] if p.steps_per_epoch else train_images)
        for p, ran in zip([p for p in plan if p.epochs > 0], epochs_run)
    )

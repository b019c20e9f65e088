"""The two-phase routine's plan and its rules, on one epoch timeline (framework-free, pure).

Phase 1 ("head") freezes the whole backbone and trains the new head. Phase 2 ("finetune")
unfreezes the top blocks, with a fresh optimizer at the (lower) fine-tune learning rate, and
continues at the epoch phase 1 stopped at, so MLflow curves and Optuna's pruner see one axis
(`Trial.report` ignores a step it has already seen: restarting at 0 would disable pruning).
A from-scratch plan is one phase ("scratch") in which everything trains, BatchNormalization too.

What a plan is, which blocks it unfreezes and when a phase stops are decided here; a framework
(harness/frameworks/) runs each phase, and harness/training.py runs the plan.

    >>> two_phase_plan(8, 1e-3, 4, 8, 1e-5, 4, n_unfreeze=3)[1]
    Phase(name='finetune', epochs=8, learning_rate=1e-05, unfreeze_blocks=3, patience=4, ...)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from harness.direction import best_of


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss: this trial failed, the sweep goes on."""


@dataclass(frozen=True)
class Phase:
    name: str  # "head", "finetune" or "scratch"
    epochs: int
    learning_rate: float
    unfreeze_blocks: int  # top backbone blocks trainable; -1 = everything incl. BN (from scratch)
    patience: int | None = None
    min_epochs: int = 0  # epochs (validations) before early stopping may end a from-scratch phase: the step floor
    # Early stopping as from scratch (`scratch_keeps_training`: min_epochs first, then on val loss
    # and the metric) for a phase whose BatchNormalization does not train: a confirmation seed's last phase.
    stall_stopping: bool = False
    steps_per_epoch: int | None = None  # steps between validations when not one pass over the training set

    @property
    def trains_batchnorm(self) -> bool:
        """Everything trains, BatchNormalization's statistics included: a random-init backbone."""
        return self.unfreeze_blocks < 0


@dataclass
class EpochRecord:
    epoch: int  # 0-based position on the shared timeline
    phase: str
    metrics: dict[str, float]  # loss, accuracy, val_loss, val_accuracy


@dataclass
class PhaseResult:
    name: str
    start_epoch: int
    epochs_run: int
    seconds: float
    trainable_params: int
    total_params: int
    best: dict[str, float] = field(default_factory=dict)


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)
    phases: list[PhaseResult] = field(default_factory=list)

    def best(self, metric: str, direction: str) -> float:
        values = [e.metrics[metric] for e in self.epochs if metric in e.metrics]
        if not values:
            return math.nan
        return best_of(values, direction)

    def phase_start(self, name: str) -> int | None:
        return next((p.start_epoch for p in self.phases if p.name == name), None)


def phase_bests(epochs: list[EpochRecord]) -> dict[str, float]:
    """Each metric's best over a phase's epochs (lowest loss, highest accuracy). Pure."""
    best: dict[str, float] = {}
    for key in ("val_accuracy", "val_loss", "accuracy", "loss"):
        values = [e.metrics[key] for e in epochs if key in e.metrics]
        if values:
            best[key] = min(values) if key.endswith("loss") else max(values)
    return best


# --- plans ------------------------------------------------------------------------------------


def two_phase_plan(
    head_epochs, head_lr, head_patience, finetune_epochs, finetune_lr, finetune_patience, n_unfreeze
) -> list[Phase]:
    """The classic routine. No unfrozen blocks means phase 2 would only repeat phase 1: skip it."""
    plan = [Phase("head", head_epochs, head_lr, 0, head_patience)]
    if n_unfreeze > 0 and finetune_epochs > 0:
        plan.append(Phase("finetune", finetune_epochs, finetune_lr, n_unfreeze, finetune_patience))
    return plan


def scratch_plan(
    epochs: int, learning_rate: float, patience: int | None, min_epochs: int = 0, steps_per_epoch: int | None = None
) -> list[Phase]:
    """Random init, everything (BatchNormalization too) trained in one phase; early stopping
    (`scratch_keeps_training`) never ends it before `min_epochs`."""
    return [Phase("scratch", epochs, learning_rate, -1, patience, min_epochs, steps_per_epoch=steps_per_epoch)]


def blocks_to_unfreeze(n_blocks: int, unfreeze_fraction: float | None = None, unfreeze_blocks: int | None = None) -> int:
    """Number of top blocks phase 2 unfreezes, snapped to whole blocks.

    A fraction rounds to the nearest block so that 0.5 of a 17-block MobileNetV2 and of a
    16-block ResNet50 both mean "the top half"; any fraction above zero unfreezes at least one.
    """
    if unfreeze_blocks is not None:
        return max(0, min(n_blocks, unfreeze_blocks))
    fraction = unfreeze_fraction or 0.0
    if fraction <= 0:
        return 0
    return max(1, min(n_blocks, round(n_blocks * fraction)))


def blocks_to_keep(n_blocks: int, cut_fraction: float) -> int:
    """How many blocks (from the input) an intermediate-feature backbone keeps; at least one."""
    return max(1, min(n_blocks, math.ceil(n_blocks * cut_fraction - 1e-9)))


# --- stopping rules -----------------------------------------------------------------------------

SCRATCH_MIN_DELTA = 1e-4  # a change smaller than this is float noise, not progress (loss or accuracy)


def _validations_since_best(values: list[float], lower_is_better: bool) -> int:
    """How many validations ago the best (first reached) value of `values` came, counting only
    improvements by more than SCRATCH_MIN_DELTA; all of them when none is finite."""
    best_at, best = None, None
    for i, value in enumerate(values):
        if math.isfinite(value) and (
            best is None or (value < best - SCRATCH_MIN_DELTA if lower_is_better else value > best + SCRATCH_MIN_DELTA)
        ):
            best_at, best = i, value
    return len(values) if best_at is None else len(values) - 1 - best_at


def scratch_keeps_training(
    val_losses: list[float], monitored: list[float], direction: str, patience: int | None, min_epochs: int = 0
) -> bool:
    """Early stopping for a from-scratch phase, after each validation (the lists hold one value per
    validation so far): False = stop now.

    Never stops before `min_epochs` validations (the step floor). After that it stops only when
    neither the validation loss nor the monitored metric has improved for `patience` validations:
    a random-init model's accuracy can sit at chance for a long while as its loss falls, and
    watching accuracy alone stopped the demo's baseline at a quarter of its floor.

        >>> scratch_keeps_training([1.9, 1.8, 1.7, 1.6], [0.22, 0.2, 0.2, 0.2], "maximize", patience=2)
        True
        >>> scratch_keeps_training([1.9, 2.0, 2.1], [0.22, 0.2, 0.2], "maximize", patience=2)
        False
    """
    if patience is None or len(val_losses) < min_epochs:
        return True
    stalled = (
        _validations_since_best(val_losses, lower_is_better=True) >= patience
        and _validations_since_best(monitored, lower_is_better=direction != "maximize") >= patience
    )
    return not stalled


def uses_stall_stopping(phase: Phase) -> bool:
    """Whether `phase` stops by `scratch_keeps_training` (else by plain patience on the metric)."""
    return phase.trains_batchnorm or phase.stall_stopping

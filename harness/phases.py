"""The two-phase routine on one epoch timeline.

Phase 1 ("head") freezes the whole backbone and trains the new head. Phase 2 ("finetune")
unfreezes the top blocks, recompiles with the (lower) fine-tune learning rate and continues at
`initial_epoch` = the epochs phase 1 ran, so MLflow curves and Optuna's pruner see one axis
(`Trial.report` ignores a step it has already seen: restarting at 0 would disable pruning).

This module never talks to MLflow or Optuna: it calls `on_epoch(record)` after every epoch and
lets the caller log, report or raise (a raised exception stops training at once).

    >>> history = run_phases(tm, plan, train_ds, val_ds, on_epoch=print)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import keras
import numpy as np

from harness import runtime
from harness.direction import best_of, better
from harness.model import TransferModel, count_params, set_all_trainable, set_backbone_trainable


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


class BestWeights:
    """The weights of the best epoch on the objective, across every phase of a plan.

    Each phase's EarlyStopping restores only its own best epoch, so without this a trial whose
    best epoch was in phase 1 would be confirmed, tested and saved with phase 2's weights: the
    model reported would not be the model scored. Weights include BatchNormalization's moving
    statistics, so a from-scratch model keeps the statistics its score was measured with.

    An improving epoch copies only the variables that can change in its phase: the trainable
    ones, and the moving statistics of BatchNormalization layers that train. Copying the whole
    model cost ~55 ms an epoch on the demo, most of a cached phase 1. A variable outside the copy
    has not changed since the best epoch, and `start_phase` keeps that true: before a phase
    trains more variables, it adds their values (unchanged so far) to the copy.
    """

    def __init__(self, monitor: str = "val_accuracy", direction: str = "maximize"):
        self.monitor, self.direction = monitor, direction
        self.value: float | None = None
        self.epoch: int | None = None
        self.weights: dict[int, tuple] | None = None  # id(variable) -> (variable, its value at the best epoch)

    def improves(self, value: float) -> bool:
        return better(value, self.value, self.direction)

    @staticmethod
    def _changing(model: keras.Model) -> list:
        """The variables training can change now: the trainable ones, and the moving statistics of
        trainable BatchNormalization layers (a frozen or pretrained one runs in inference mode)."""
        moving = [
            v
            for layer in _all_layers(model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
            for v in layer.non_trainable_variables
        ]
        return [*model.trainable_variables, *moving]

    def start_phase(self, model: keras.Model) -> None:
        """Call after the phase's trainability is set, before it trains."""
        if self.weights is not None:
            for v in self._changing(model):
                self.weights.setdefault(id(v), (v, np.array(v.numpy())))

    def observe(self, model: keras.Model, record: EpochRecord) -> None:
        value = record.metrics.get(self.monitor)
        if value is not None and math.isfinite(value) and self.improves(value):
            # A fresh copy: an older entry of a variable frozen now may predate changes made to it
            # later in an earlier phase; left out, it is restored as it is, its value now.
            self.value, self.epoch = value, record.epoch
            self.weights = {id(v): (v, np.array(v.numpy())) for v in self._changing(model)}

    def restore(self, model: keras.Model) -> None:
        if self.weights is not None:
            for v, value in self.weights.values():
                v.assign(value)


class _EpochHook(keras.callbacks.Callback):
    def __init__(
        self,
        phase: str,
        history: History,
        on_epoch: Callable[[EpochRecord], None],
        best: BestWeights | None = None,
        whole: keras.Model | None = None,
    ):
        super().__init__()
        self.phase, self.history, self.on_epoch, self.best = phase, history, on_epoch, best
        self.whole = whole  # the trial's model, when the one being fitted is only its head (cached features)

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items() if k in ("loss", "accuracy", "val_loss", "val_accuracy")}
        for key in ("loss", "val_loss"):
            if key in metrics and not math.isfinite(metrics[key]):
                self.model.stop_training = True
                raise NonFiniteLoss(f"{self.phase} phase, epoch {epoch}: {key} is {metrics[key]}")
        record = EpochRecord(epoch, self.phase, metrics)
        self.history.epochs.append(record)
        if self.best is not None:
            self.best.observe(self.whole or self.model, record)
        self.on_epoch(record)


class _NonFiniteBatch(keras.callbacks.Callback):
    """Stop within the batch a loss turns NaN/inf (or a stop is requested), not at the epoch's end."""

    def on_train_batch_end(self, batch, logs=None):
        runtime.check_stop()
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteLoss(f"batch {batch}: loss is {float(loss)}")

    def on_test_batch_end(self, batch, logs=None):
        runtime.check_stop()


class BatchNormReestimator:
    """Sets every trainable BatchNormalization's moving statistics to their average over training
    batches under the *current* weights.

    A randomly initialised network's weights move fast, so exponential moving averages lag far
    behind the statistics the current weights produce, and inference-mode accuracy sits at chance
    while training accuracy climbs. Here each batch runs in training mode with momentum 0 (the
    moving value becomes that batch's statistic), the values are averaged over the batches, then
    written back. The forward pass is traced once per model, so this costs a few compiled steps.
    """

    def __init__(self, model: keras.Model, max_batches: int = 20):
        import tensorflow as tf

        self.model, self.max_batches = model, max_batches
        self.bns = [l for l in _all_layers(model) if isinstance(l, keras.layers.BatchNormalization) and l.trainable]
        self._forward = tf.function(lambda x: model(x, training=True))

    def __call__(self, train_ds) -> None:
        if not self.bns:
            return
        saved = [l.momentum for l in self.bns]
        sums = [[0.0, 0.0] for _ in self.bns]
        n = 0
        try:
            for layer in self.bns:
                layer.momentum = 0.0
            for x, _ in train_ds.take(self.max_batches):
                self._forward(x)
                for acc, layer in zip(sums, self.bns):
                    acc[0] = acc[0] + layer.moving_mean.numpy()
                    acc[1] = acc[1] + layer.moving_variance.numpy()
                n += 1
        finally:
            for layer, m in zip(self.bns, saved):
                layer.momentum = m
        if n:
            for (mean, var), layer in zip(sums, self.bns):
                layer.moving_mean.assign(mean / n)
                layer.moving_variance.assign(var / n)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def evaluate(model: keras.Model, ds) -> dict[str, float]:
    """Inference-mode loss and accuracy over a dataset (compiled, via the model's own metrics)."""
    results = model.evaluate(ds, verbose=0, return_dict=True)
    return {"loss": float(results["loss"]), "accuracy": float(results["accuracy"])}


class _ScratchValidation(keras.callbacks.Callback):
    """Validation for a backbone whose BatchNormalization trains: re-estimate, then evaluate.

    Runs before the other epoch-end callbacks and writes val_* into the shared logs, so early
    stopping and the pruner see inference-mode numbers that are fair to a from-scratch model.
    """

    def __init__(self, train_ds, val_ds):
        super().__init__()
        self.train_ds, self.val_ds = train_ds, val_ds
        self.reestimate = None

    def on_epoch_end(self, epoch, logs=None):
        if self.reestimate is None:
            self.reestimate = BatchNormReestimator(self.model)
        self.reestimate(self.train_ds)
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in evaluate(self.model, self.val_ds).items()})


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


class _ScratchStopping(keras.callbacks.Callback):
    """`scratch_keeps_training` as a callback; the best weights are kept by BestWeights (run_phases)."""

    def __init__(self, monitor: str, direction: str, patience: int | None, min_epochs: int):
        super().__init__()
        self.monitor, self.direction, self.patience, self.min_epochs = monitor, direction, patience, min_epochs
        self.val_losses: list[float] = []
        self.monitored: list[float] = []

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.val_losses.append(float(logs.get("val_loss", math.nan)))
        self.monitored.append(float(logs.get(self.monitor, math.nan)))
        if not scratch_keeps_training(self.val_losses, self.monitored, self.direction, self.patience, self.min_epochs):
            self.model.stop_training = True


# --- compiling -------------------------------------------------------------------------------


def compile_for(
    tm: TransferModel, learning_rate: float, jit_compile: bool | None = None, model: keras.Model | None = None
) -> None:
    """Compile for one phase; `jit_compile` None = this process's setting (harness/runtime.py).
    `model`: what is fitted, when not the whole `tm.model` (the head on cached features).

    Under the mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer itself
    (compile's auto_scale_loss), so float16 gradients do not underflow."""
    model = model or tm.model
    jit = runtime.jit_compile_setting() if jit_compile is None else jit_compile
    if jit is True and not all(layer.supports_jit for layer in _all_layers(model)):
        jit = False  # random augmentation layers cannot be XLA-compiled; Keras would warn and do the same
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit,
    )


def apply_phase_trainability(tm: TransferModel, phase: Phase) -> None:
    if phase.unfreeze_blocks < 0:
        set_all_trainable(tm)
    else:
        set_backbone_trainable(tm, phase.unfreeze_blocks)


def run_phases(
    tm: TransferModel,
    plan: list[Phase],
    train_ds,
    val_ds,
    on_epoch: Callable[[EpochRecord], None] = lambda r: None,
    on_phase_start: Callable[[Phase, int, int], None] = lambda p, t, n: None,
    monitor: str = "val_accuracy",
    direction: str = "maximize",
    start_epoch: int = 0,
    best: BestWeights | None = None,
    history: History | None = None,
    restore_best: bool = True,
    steps_per_epoch: int | None = None,
    class_weight: dict[int, float] | None = None,
    head_inputs=None,
) -> History:
    """Run each phase of `plan` in turn on one epoch timeline; return the full history.

    The model ends with the weights of the best epoch of all phases run so far (`best`, shared
    across calls when a plan runs phase by phase). `history`, when given, is filled in place, so
    a caller that stops training by raising (a pruned trial) still has the epochs that ran.
    `head_inputs` (harness.features.HeadInputs, with a one-phase plan): the phase fits that model
    (the head, or the backbone's top blocks and the head) on cached activations instead of the
    whole model on images; they share their layers, so the whole model is what was trained.
    """
    history = history if history is not None else History()
    best = best or BestWeights(monitor, direction)
    epoch = start_epoch
    for phase in plan:
        if phase.epochs <= 0:
            continue
        apply_phase_trainability(tm, phase)
        cached = head_inputs is not None  # run_plan hands it in for one phase at a time
        fitted, train_in, val_in = (
            (head_inputs.model, head_inputs.train, head_inputs.val) if cached else (tm.model, train_ds, val_ds)
        )
        compile_for(tm, phase.learning_rate, model=fitted)  # recompile: compile() captures `trainable`
        trainable, total = count_params(tm.model)
        on_phase_start(phase, trainable, total)
        trains_bn = phase.unfreeze_blocks < 0
        callbacks: list[keras.callbacks.Callback] = [_NonFiniteBatch(), _EpochHook(phase.name, history, on_epoch, best, tm.model)]
        if trains_bn:
            callbacks.insert(0, _ScratchValidation(train_ds, val_ds))
        if trains_bn or phase.stall_stopping:
            callbacks.append(_ScratchStopping(monitor, direction, phase.patience, phase.min_epochs))
        elif phase.patience:
            callbacks.append(
                keras.callbacks.EarlyStopping(
                    monitor=monitor,
                    mode="max" if direction == "maximize" else "min",
                    patience=phase.patience,
                    restore_best_weights=True,
                )
            )
        if phase.steps_per_epoch:  # validations further apart than one pass: the pipeline runs on across passes
            train_in = train_in.repeat()
        started = time.perf_counter()
        best.start_phase(tm.model)
        before = len(history.epochs)
        fitted.fit(
            train_in,
            validation_data=None if trains_bn else val_in,
            initial_epoch=epoch,
            epochs=epoch + phase.epochs,
            callbacks=callbacks,
            verbose=0,
            shuffle=False,  # tf.data shuffles already
            steps_per_epoch=phase.steps_per_epoch or steps_per_epoch,  # an "epoch" of a repeated pipeline
            class_weight=class_weight,  # label -> loss weight (train.class_weight); validation stays unweighted
        )
        if cached:  # the whole model is what callers evaluate, save and fine-tune next: compiled, as uncached
            compile_for(tm, phase.learning_rate)
        ran = len(history.epochs) - before
        result = PhaseResult(phase.name, epoch, ran, time.perf_counter() - started, trainable, total)
        phase_epochs = history.epochs[before:]
        for key in ("val_accuracy", "val_loss", "accuracy", "loss"):
            vals = [e.metrics[key] for e in phase_epochs if key in e.metrics]
            if vals:
                result.best[key] = min(vals) if key.endswith("loss") else max(vals)
        history.phases.append(result)
        epoch += ran
    if restore_best:
        best.restore(tm.model)
    return history


def two_phase_plan(
    head_epochs, head_lr, head_patience, finetune_epochs, finetune_lr, finetune_patience, n_unfreeze
) -> list[Phase]:
    """The classic routine. No unfrozen blocks means phase 2 would only repeat phase 1: skip it."""
    plan = [Phase("head", head_epochs, head_lr, 0, head_patience)]
    if n_unfreeze > 0 and finetune_epochs > 0:
        plan.append(Phase("finetune", finetune_epochs, finetune_lr, n_unfreeze, finetune_patience))
    return plan


def scratch_plan(epochs: int, learning_rate: float, patience: int | None, min_epochs: int = 0) -> list[Phase]:
    """Random init, everything (BatchNormalization too) trained in one phase; early stopping
    (`scratch_keeps_training`) never ends it before `min_epochs`."""
    return [Phase("scratch", epochs, learning_rate, -1, patience, min_epochs)]

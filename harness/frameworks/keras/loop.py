"""One phase of a plan in Keras: compile, fit on the shared epoch axis, and the callbacks that
make it right.

- Recompile for every phase: `compile()` captures the trainable state.
- A NaN or infinite loss stops training within its batch (`NonFiniteLoss`), and so does a stop
  request (harness/runtime.py `check_stop`).
- A phase whose BatchNormalization trains (from scratch) validates fairly: its moving statistics
  are re-estimated on training batches under the current weights before each validation.
- Early stopping: Keras' EarlyStopping on the metric, or the from-scratch rule
  (harness/phases.py `scratch_keeps_training`).

    >>> ran = run_phase(tm, phase, PhaseData(train_ds, val_ds), PhaseRun(start_epoch=0, on_epoch=print))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import keras
import numpy as np

from harness import runtime
from harness.frameworks.base import PhaseData, PhaseRun
from harness.frameworks.keras.device import jit_compile_setting
from harness.frameworks.keras.model import TransferModel, all_layers
from harness.phases import EpochRecord, NonFiniteLoss, Phase, scratch_keeps_training, uses_stall_stopping

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")


class KerasWeightsKeeper:
    """The weights of the best epoch across every phase of a plan (the caller says which epoch).

    Each phase's EarlyStopping restores only its own best epoch, so without this a trial whose
    best epoch was in phase 1 would be confirmed, tested and saved with phase 2's weights: the
    model reported would not be the model scored. Weights include BatchNormalization's moving
    statistics, so a from-scratch model keeps the statistics its score was measured with.

    `keep` copies only the variables that can change in the current phase: the trainable ones,
    and the moving statistics of BatchNormalization layers that train. Copying the whole model
    cost ~55 ms an epoch on the demo, most of a cached phase 1. A variable outside the copy has
    not changed since the best epoch, and `start_phase` keeps that true: before a phase trains
    more variables, it adds their values (unchanged so far) to the copy.
    """

    def __init__(self, model: keras.Model):
        self.model = model
        self.weights: dict[int, tuple] | None = None  # id(variable) -> (variable, its value at the best epoch)

    def _changing(self) -> list:
        """The variables training can change now: the trainable ones, and the moving statistics of
        trainable BatchNormalization layers (a frozen or pretrained one runs in inference mode)."""
        moving = [
            v
            for layer in all_layers(self.model)
            if isinstance(layer, keras.layers.BatchNormalization) and layer.trainable
            for v in layer.non_trainable_variables
        ]
        return [*self.model.trainable_variables, *moving]

    def start_phase(self) -> None:
        if self.weights is not None:
            for v in self._changing():
                self.weights.setdefault(id(v), (v, np.array(v.numpy())))

    def keep(self) -> None:
        # A fresh copy: an older entry of a variable frozen now may predate changes made to it
        # later in an earlier phase; left out, it is restored as it is, its value now.
        self.weights = {id(v): (v, np.array(v.numpy())) for v in self._changing()}

    def restore(self) -> None:
        if self.weights is not None:
            for v, value in self.weights.values():
                v.assign(value)


class _EpochHook(keras.callbacks.Callback):
    """Each epoch's metrics, checked finite, to the plan's `on_epoch` on the shared timeline."""

    def __init__(self, phase: str, on_epoch: Callable[[EpochRecord], None]):
        super().__init__()
        self.phase, self.on_epoch = phase, on_epoch
        self.epochs_run = 0

    def on_epoch_end(self, epoch, logs=None):
        metrics = {k: float(v) for k, v in (logs or {}).items() if k in EPOCH_METRICS}
        for key in ("loss", "val_loss"):
            if key in metrics and not math.isfinite(metrics[key]):
                self.model.stop_training = True
                raise NonFiniteLoss(f"{self.phase} phase, epoch {epoch}: {key} is {metrics[key]}")
        self.epochs_run += 1
        self.on_epoch(EpochRecord(epoch, self.phase, metrics))


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
        self.bns = [l for l in all_layers(model) if isinstance(l, keras.layers.BatchNormalization) and l.trainable]
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
        self.reestimate: BatchNormReestimator | None = None

    def on_epoch_end(self, epoch, logs=None):
        if self.reestimate is None:
            self.reestimate = BatchNormReestimator(self.model)
        self.reestimate(self.train_ds)
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in evaluate(self.model, self.val_ds).items()})


class _ScratchStopping(keras.callbacks.Callback):
    """`scratch_keeps_training` as a callback; the best weights are kept by the plan's keeper."""

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


def compile_for(
    tm: TransferModel, learning_rate: float, jit_compile: bool | None = None, model: keras.Model | None = None
) -> None:
    """Compile for one phase; `jit_compile` None = this process's setting (train.jit_compile).
    `model`: what is fitted, when not the whole `tm.model` (the head on cached features).

    Under the mixed_float16 policy Keras wraps the optimizer in a LossScaleOptimizer itself
    (compile's auto_scale_loss), so float16 gradients do not underflow."""
    model = model or tm.model
    jit = jit_compile_setting() if jit_compile is None else jit_compile
    if jit is True and not all(layer.supports_jit for layer in all_layers(model)):
        jit = False  # random augmentation layers cannot be XLA-compiled; Keras would warn and do the same
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=jit,
    )


def short_runs(tm: TransferModel, train, rates: list[float], steps: int) -> dict[float, float]:
    """Two epochs of `steps` batches at each rate, from the same weights, the optimizer's state
    (Adam's moments, its step count, a mixed-precision loss scale) reset between rates. Compiled
    once: one traced training step serves every rate, and a later trace's random ops would be
    seeded by how much this process traced before."""
    compile_for(tm, rates[0])
    initial = tm.model.get_weights()
    repeated = train.repeat()
    losses = {}
    for rate in rates:
        tm.model.set_weights(initial)
        optimizer = tm.model.optimizer
        for variable in optimizer.variables:
            variable.assign(np.zeros(variable.shape, variable.dtype))
        if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):  # mixed precision: a loss scale of 0 is NaN
            optimizer.dynamic_scale.assign(optimizer.initial_scale)
        optimizer.learning_rate.assign(rate)
        history = tm.model.fit(repeated, epochs=2, steps_per_epoch=steps, verbose=0)
        losses[rate] = float(history.history["loss"][-1])
    tm.model.set_weights(initial)
    return losses


def _callbacks(phase: Phase, train, val, run: PhaseRun, hook: _EpochHook) -> list[keras.callbacks.Callback]:
    callbacks: list[keras.callbacks.Callback] = [_NonFiniteBatch(), hook]
    if phase.trains_batchnorm:
        callbacks.insert(0, _ScratchValidation(train, val))
    if uses_stall_stopping(phase):
        callbacks.append(_ScratchStopping(run.monitor, run.direction, phase.patience, phase.min_epochs))
    elif phase.patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=run.monitor,
                mode="max" if run.direction == "maximize" else "min",
                patience=phase.patience,
                restore_best_weights=True,
            )
        )
    return callbacks


def run_phase(tm: TransferModel, phase: Phase, data: PhaseData, run: PhaseRun) -> int:
    """Fit one phase (its trainability already set) from `run.start_epoch`; returns the epochs run.

    `data.fitted` (cached activations): that model (the head, or the backbone's top blocks and
    the head) is fitted instead of the whole model; they share their layers, so the whole model
    is what was trained, and it is compiled again afterwards for whoever evaluates or saves it."""
    fitted = data.fitted if data.fitted is not None else tm.model
    compile_for(tm, phase.learning_rate, model=fitted)  # recompile: compile() captures `trainable`
    hook = _EpochHook(phase.name, run.on_epoch)
    train = data.train.repeat() if phase.steps_per_epoch else data.train  # validations further apart than one pass
    validation = None if phase.trains_batchnorm else data.val  # from scratch: _ScratchValidation validates
    fitted.fit(
        train,
        validation_data=validation,
        initial_epoch=run.start_epoch,
        epochs=run.start_epoch + phase.epochs,
        callbacks=_callbacks(phase, train, data.val, run, hook),
        verbose=0,
        shuffle=False,  # tf.data shuffles already
        steps_per_epoch=phase.steps_per_epoch,  # an "epoch" of a repeated pipeline
        class_weight=run.class_weight,  # label -> loss weight (train.class_weight); validation stays unweighted
    )
    if data.fitted is not None:
        compile_for(tm, phase.learning_rate)
    return hook.epochs_run

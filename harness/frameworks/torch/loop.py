"""One phase of a plan in plain PyTorch, on the plan's shared epoch axis, as the Keras side runs it.

- Adam (Keras' defaults: epsilon 1e-7) over the parameters that train in this phase, built anew
  for every phase, so a phase trains exactly what `set_trainable` unfroze.
- An epoch is one pass over the training batches, or `phase.steps_per_epoch` steps of a stream
  that runs on across passes. After each: validation, then `run.on_epoch(record)` (which may
  raise: pruned, stop requested), then early stopping.
- Early stopping means what Keras' `EarlyStopping(patience, restore_best_weights=True)` means in a
  transfer phase (the phase ends with its best epoch's weights), and `scratch_keeps_training` in a
  phase whose BatchNorm trains or that asks for it (`phase.stall_stopping`).
- A phase whose BatchNorm trains (from scratch) re-estimates the running statistics on training
  batches under the current weights before every validation (as harness/frameworks/keras/loop.py
  `BatchNormReestimator`: cumulative averages, torch's `momentum=None`).
- The loss is the cross-entropy, each example weighted by its class's `run.class_weight` and
  averaged over the batch (Keras' class_weight); a NaN or infinite loss raises NonFiniteLoss in
  the batch it appears, and a stop request (runtime.check_stop) is honoured at every batch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from harness import runtime
from harness.direction import better
from harness.frameworks.base import PhaseData, PhaseRun
from harness.frameworks.torch import device as dev
from harness.frameworks.torch.model import Augmentation, TorchModel, train_mode, training_batchnorms
from harness.phases import EpochRecord, NonFiniteLoss, Phase, scratch_keeps_training, uses_stall_stopping

ADAM_EPSILON = 1e-7  # Keras' Adam default (torch's is 1e-8)
REESTIMATE_BATCHES = 20  # training batches averaged for BatchNorm statistics (as BatchNormReestimator)


class WeightsKeeper:
    """The best epoch's weights across the phases of a plan (harness.frameworks.base.WeightsKeeper).

    `keep` copies what can change in the current phase: the parameters that train, and the
    running statistics of the BatchNorm layers that train (a from-scratch model keeps the
    statistics its score was measured with). `start_phase` adds, before a phase trains more, the
    values those tensors have now (unchanged since the best epoch), so `restore` puts back the
    whole model of the best epoch."""

    def __init__(self, model: TorchModel):
        self.model = model
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None  # id -> (tensor, its value)

    def _changing(self) -> list[torch.Tensor]:
        params = [p for p in self.model.net.parameters() if p.requires_grad]
        stats = [b for m in training_batchnorms(self.model) for b in m.buffers()]
        return [*params, *stats]

    def start_phase(self) -> None:
        if self.saved is not None:
            for t in self._changing():
                self.saved.setdefault(id(t), (t, t.detach().clone()))

    def keep(self) -> None:
        self.saved = {id(t): (t, t.detach().clone()) for t in self._changing()}

    def restore(self) -> None:
        if self.saved is not None:
            with torch.no_grad():
                for t, value in self.saved.values():
                    t.copy_(value)


# --- stopping rules ----------------------------------------------------------------------------


class EarlyStopping:
    """Keras' EarlyStopping(monitor, patience, restore_best_weights=True) for one phase."""

    def __init__(self, model: TorchModel, monitor: str, direction: str, patience: int):
        self.monitor, self.direction, self.patience = monitor, direction, patience
        self.best: float | None = None
        self.wait = 0
        self.weights = WeightsKeeper(model)
        self.kept = False

    def stops(self, epoch: int, metrics: dict[str, float]) -> bool:
        current = metrics.get(self.monitor)
        if current is None:
            return False
        if not self.kept:  # never improved yet: the current weights are the best
            self.weights.keep()
            self.kept = True
        self.wait += 1
        if self._improves(current):
            self.best, self.wait = current, 0
            self.weights.keep()
            return False
        return self.wait >= self.patience and epoch > 0

    def _improves(self, current: float) -> bool:
        """Strictly better than the best so far; the first value is, unless it is NaN (Keras starts
        from -inf or +inf, and NaN compares false)."""
        return not math.isnan(current) if self.best is None else better(current, self.best, self.direction)

    def finish(self) -> None:
        """At the phase's end, as Keras' on_train_end: the phase's best weights."""
        self.weights.restore()


class ScratchStopping:
    """harness/phases.py `scratch_keeps_training` after each validation."""

    def __init__(self, monitor: str, direction: str, patience: int | None, min_epochs: int):
        self.monitor, self.direction, self.patience, self.min_epochs = monitor, direction, patience, min_epochs
        self.val_losses: list[float] = []
        self.monitored: list[float] = []

    def stops(self, epoch: int, metrics: dict[str, float]) -> bool:
        self.val_losses.append(float(metrics.get("val_loss", math.nan)))
        self.monitored.append(float(metrics.get(self.monitor, math.nan)))
        return not scratch_keeps_training(self.val_losses, self.monitored, self.direction, self.patience, self.min_epochs)

    def finish(self) -> None:
        pass


class NoStopping:
    def stops(self, epoch: int, metrics: dict[str, float]) -> bool:
        return False

    def finish(self) -> None:
        pass


def stopping_rule(model: TorchModel, phase: Phase, run: PhaseRun):
    if uses_stall_stopping(phase):
        return ScratchStopping(run.monitor, run.direction, phase.patience, phase.min_epochs)
    if phase.patience:
        return EarlyStopping(model, run.monitor, run.direction, phase.patience)
    return NoStopping()


# --- one phase ---------------------------------------------------------------------------------


def run_phase(model: TorchModel, phase: Phase, data: PhaseData, run: PhaseRun) -> int:
    """Train one phase (trainability already set); returns the epochs it ran."""
    if phase.epochs <= 0:
        return 0
    forward = compiled(model, data.fitted.logits if data.fitted is not None else model.logits)
    trainable = [p for p in model.net.parameters() if p.requires_grad]
    step = Step(model, forward, torch.optim.Adam(trainable, lr=phase.learning_rate, eps=ADAM_EPSILON), run.class_weight)
    step.augment = model.augment if data.fitted is None else None  # cached activations are not images
    rule = stopping_rule(model, phase, run)
    stream = _forever(data.train) if phase.steps_per_epoch else None  # validations further apart than a pass
    ran = 0
    for ran in range(1, phase.epochs + 1):
        epoch = run.start_epoch + ran - 1
        metrics = step.epoch(stream or iter(data.train), phase.steps_per_epoch or len(data.train))
        if data.val is not None:
            if phase.trains_batchnorm:  # statistics fit to the current weights first
                reestimate_batchnorm(model, data.train)
            metrics.update({f"val_{k}": v for k, v in evaluate_with(model, forward, data.val).items()})
        for key in ("loss", "val_loss"):
            if key in metrics and not math.isfinite(metrics[key]):
                raise NonFiniteLoss(f"{phase.name} phase, epoch {epoch}: {key} is {metrics[key]}")
        run.on_epoch(EpochRecord(epoch, phase.name, metrics))
        if rule.stops(epoch, metrics):
            break
    rule.finish()
    return ran


def short_runs(model: TorchModel, train, rates: list[float], steps: int) -> dict[float, float]:
    """Two epochs of `steps` batches at each rate (trainability set by the caller), each from the
    weights the model has now with a fresh Adam; returns each rate's last epoch's training loss,
    NaN or inf where it diverged. The model ends as it started, statistics included."""
    initial = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
    forward = compiled(model, model.logits)
    trainable = [p for p in model.net.parameters() if p.requires_grad]
    stream = _forever(train)
    losses = {}
    for rate in rates:
        model.net.load_state_dict(initial)
        step = Step(model, forward, torch.optim.Adam(trainable, lr=rate, eps=ADAM_EPSILON), None)
        step.augment = model.augment
        try:
            for _ in range(2):
                loss = step.epoch(stream, steps)["loss"]
        except NonFiniteLoss:
            loss = math.inf  # diverged: Keras' fit runs on and reports NaN or inf, which rank the same
        losses[rate] = loss
    model.net.load_state_dict(initial)
    model.net.eval()
    return losses


def _forever(batches) -> Iterator:
    """One stream of training batches across passes, each pass shuffled anew."""
    while True:
        yield from batches


class Step:
    """The training step of one phase: forward under autocast, class-weighted loss, Adam."""

    def __init__(self, model: TorchModel, forward: nn.Module, optimizer: torch.optim.Optimizer, class_weight: dict | None):
        self.model, self.forward, self.optimizer = model, forward, optimizer
        self.settings = dev.settings()
        self.scaler = torch.amp.GradScaler("cuda") if self.settings.scales_loss else None
        self.weights = _class_weights(class_weight, model.spec.num_classes, self.settings.device)
        self.augment: Augmentation | None = None

    def epoch(self, batches: Iterator, steps: int) -> dict[str, float]:
        """Train `steps` of `batches`; the epoch's loss and accuracy, averaged over its examples
        as Keras' trackers average them (class-weighted, as Keras weighs them in training)."""
        train_mode(self.model)
        loss_sum, seen = 0.0, 0
        tallies = torch.zeros(2, device=self.settings.device)  # weighted hits, weights: summed where they are
        for b, (x, y) in zip(range(steps), batches):
            runtime.check_stop()
            loss, tally = self.one(x, y, b)
            loss_sum, seen = loss_sum + loss * len(y), seen + len(y)
            tallies += tally
        if not seen:
            return {"loss": math.nan, "accuracy": math.nan}
        hits, weights = tallies.tolist()
        return {"loss": loss_sum / seen, "accuracy": hits / weights}

    def one(self, x: torch.Tensor, y: torch.Tensor, b: int) -> tuple[float, torch.Tensor]:
        """One optimizer step; the batch's loss, and its (weighted hits, weight) on the device.
        The loss is read at once (one synchronisation a step) so a NaN stops this batch."""
        device = self.settings.device
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if self.augment is not None:
            x = self.augment(x)
        with dev.autocast():
            logits = self.forward(x)
        each = nn.functional.cross_entropy(logits.float(), y, reduction="none")
        w = self.weights[y] if self.weights is not None else torch.ones_like(each)
        loss = (each * w).mean()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise NonFiniteLoss(f"batch {b}: loss is {value}")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return value, torch.stack([(w * (logits.detach().argmax(1) == y)).sum(), w.sum()])


def _class_weights(class_weight: dict | None, classes: int, device: torch.device) -> torch.Tensor | None:
    if not class_weight:
        return None
    weights = np.ones(classes, np.float32)
    for label, weight in class_weight.items():
        weights[int(label)] = weight
    return torch.from_numpy(weights).to(device)


def compiled(model: TorchModel, module: nn.Module) -> nn.Module:
    """`module`, through torch.compile where train.jit_compile is on (compiled once per model)."""
    if not dev.settings().compile:
        return module
    key = id(module)
    if key not in model.compiled:
        model.compiled[key] = (module, torch.compile(module))
    return model.compiled[key][1]


# --- inference ---------------------------------------------------------------------------------


def evaluate_with(model: TorchModel, forward: nn.Module, batches) -> dict[str, float]:
    """Inference-mode {"loss", "accuracy"} of `forward` (logits) over `batches`, unweighted."""
    model.net.eval()
    device = dev.settings().device
    sums, seen = torch.zeros(2, device=device), 0  # loss, hits: summed on the device, read once
    with torch.inference_mode():
        for x, y in batches:
            runtime.check_stop()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with dev.autocast():
                logits = forward(x)
            loss = nn.functional.cross_entropy(logits.float(), y, reduction="sum")
            sums += torch.stack([loss, (logits.argmax(1) == y).sum().float()])
            seen += len(y)
    if not seen:
        return {"loss": math.nan, "accuracy": math.nan}
    loss_sum, hits = sums.tolist()
    return {"loss": loss_sum / seen, "accuracy": hits / seen}


def predict(model: TorchModel, batches) -> np.ndarray:
    """Inference-mode class probabilities (float32), in the batches' order."""
    model.net.eval()
    device = dev.settings().device
    out = []
    with torch.inference_mode():
        for x, _ in batches:
            runtime.check_stop()
            with dev.autocast():
                probabilities = model.net(x.to(device, non_blocking=True))
            out.append(probabilities.float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.spec.num_classes), np.float32)


def reestimate_batchnorm(model: TorchModel, batches, max_batches: int = REESTIMATE_BATCHES) -> None:
    """Set the running statistics of every BatchNorm that trains to their average over up to
    `max_batches` training batches under the current weights (torch's cumulative average,
    `momentum=None`), as the Keras side's BatchNormReestimator does. The batches run
    through the backbone in training mode, augmented as in training; nothing else changes."""
    norms = training_batchnorms(model)
    if not norms:
        return
    saved = [m.momentum for m in norms]
    device = dev.settings().device
    bottom = nn.Sequential(model.part("preprocess"), model.backbone)
    train_mode(model)
    try:
        for m in norms:
            m.momentum = None
            m.reset_running_stats()
        with torch.no_grad():
            for _, (x, _) in zip(range(max_batches), batches):
                x = x.to(device, non_blocking=True)
                if model.augment is not None:
                    x = model.augment(x)
                with dev.autocast():
                    bottom(x)
    finally:
        for m, momentum in zip(norms, saved):
            m.momentum = momentum
    model.net.eval()

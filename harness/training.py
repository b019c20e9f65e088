"""The one training path: a configuration, trained on one study's data.

A configuration is a model spec (backbone, cut, head, weights), a plan of phases (harness/phases.py)
and a seed. Every caller trains through `Trainer.train`: the search trial (harness/objective.py),
the confirmation seed (harness/tasks.py) and each from-scratch attempt (harness/scratch.py). They
differ only in their plan, their seeds and what they do after each epoch (`EpochHooks`).

What happens, whatever the framework (harness/frameworks/base.py):

1. every generator is seeded with the configuration's seed, then the model is built;
2. each phase sets its trainability (frozen blocks, the head), then trains on one epoch axis:
   on images, or on cached frozen activations where the cache's rule applies (harness/features.py);
3. after each epoch the history grows, the best epoch's weights are kept (the study's metric, in
   its direction), and the caller's hook runs (it may raise: pruned, stop requested);
4. each phase ends with the best epoch's weights so far (phase 2 fine-tunes the best head), so the
   model ends with the best epoch's weights across all phases: the weights that scored are the
   weights that are tested, saved and registered.

    >>> trainer = Trainer(fw, dataset, splits, settings)
    >>> model = trainer.train(Configuration(spec, plan, seed=3, data_seed=0), EpochHooks(on_epoch=print))
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from harness.data import Dataset, Splits
from harness.direction import better
from harness.features import FeatureCache, boundary_applies, cache_applies
from harness.frameworks.base import Framework, Model, ModelSpec, PhaseData, PhaseRun, WeightsKeeper
from harness.phases import EpochRecord, History, Phase, PhaseResult, phase_bests


@dataclass(frozen=True)
class Configuration:
    """What to train: one model, one plan, one seed."""

    spec: ModelSpec
    plan: tuple[Phase, ...]
    seed: int  # every generator, the model's initial weights
    data_seed: int  # the training batches' shuffle order (images and cached activations)


@dataclass(frozen=True)
class TrainingSettings:
    """How a study trains every configuration: its batch sizes, its metric, its loss weights."""

    batch_sizes: dict[str, int]  # phase name -> batch size; any other phase (scratch) takes "head"'s
    monitor: str = "val_accuracy"
    direction: str = "maximize"
    class_weight: dict[int, float] | None = None  # label -> loss weight (train.class_weight)

    def batch_size(self, phase: str) -> int:
        return self.batch_sizes.get(phase, self.batch_sizes["head"])


def _ignore(*args) -> None:
    pass


@dataclass
class EpochHooks:
    """What a caller does as training goes: after each epoch (log, report, prune), when a phase
    starts (its parameter counts), and when cached features were read or computed (seconds)."""

    on_epoch: Callable[[EpochRecord], None] = _ignore
    on_phase_start: Callable[[Phase, int, int], None] = _ignore
    on_features: Callable[[str, float], None] = _ignore


def epoch_note(
    number: int, record: EpochRecord, total_epochs: int, metric: str, phase_epoch: int = 0, offset: int = 0, phase: str = ""
) -> dict:
    """An epoch as a trial process reports it to the sweep process (harness/trials.py: the
    progress line, and for search trials the pruner's step). `offset` shifts the epoch shown
    (a from-scratch retry counts its own epochs); `phase` renames the phase shown."""
    return {
        "number": number,
        "epoch": record.epoch - offset,
        "phase": phase or record.phase,
        "phase_epoch": phase_epoch,
        "metrics": dict(record.metrics),
        "total_epochs": total_epochs,
        "value": record.metrics.get(metric),
    }


@dataclass
class _Best:
    """The best epoch so far on the study's metric, and the keeper of its weights."""

    keeper: WeightsKeeper
    monitor: str
    direction: str
    value: float | None = None
    epoch: int | None = None

    def observe(self, record: EpochRecord) -> None:
        value = record.metrics.get(self.monitor)
        if value is not None and np.isfinite(value) and better(value, self.value, self.direction):
            self.value, self.epoch = value, record.epoch
            self.keeper.keep()


@dataclass
class Trainer:
    """One study's data and settings in a process, and the one path every configuration trains by."""

    fw: Framework
    dataset: Dataset
    splits: Splits
    settings: TrainingSettings
    features: FeatureCache | None = None
    _batches: dict[tuple[int, int], tuple] = field(default_factory=dict)  # (batch size, seed) -> (train, val)

    def image_batches(self, batch_size: int, seed: int) -> tuple:
        """Train (shuffled with `seed`) and val batches of the images.

        Built anew for data held in memory (slicing costs nothing, and a shuffled pipeline's
        order moves on with every pass over it, so a kept one would make a run depend on the
        process's past). A folder's pipelines are kept per (batch size, seed): they hold the
        decoded images, which a search's trials share."""
        key = (batch_size, seed)
        if self.dataset.images is not None or key not in self._batches:
            self._batches[key] = (
                self.fw.image_batches(self.dataset, self.splits.train, batch_size, shuffle=True, seed=seed),
                self.fw.image_batches(self.dataset, self.splits.val, batch_size, shuffle=False),
            )
        return self._batches[key]

    def split_batches(self, indices: np.ndarray):
        """One split in order, at the head phase's batch size: how every evaluation reads it."""
        return self.fw.image_batches(self.dataset, indices, self.settings.batch_size("head"), shuffle=False)

    def evaluate(self, model: Model, indices: np.ndarray) -> dict[str, float]:
        return self.fw.evaluate(model, self.split_batches(indices))

    def build(self, config: Configuration) -> Model:
        """Seed every generator, then build: the model's weights and everything after depend on
        the configuration's seed alone, never on what the process ran before."""
        self.fw.seed(config.seed)
        return self.fw.build(config.spec, seed=config.seed)

    def train(
        self, config: Configuration, hooks: EpochHooks | None = None, history: History | None = None, first_epoch: int = 0
    ) -> Model:
        """Build and train the configuration; returns the model with its best epoch's weights.
        `history` is filled as epochs end, so it holds what ran even when a hook raises."""
        model = self.build(config)
        self.run_plan(model, config, hooks or EpochHooks(), history if history is not None else History(), first_epoch)
        return model

    def run_plan(self, model: Model, config: Configuration, hooks: EpochHooks, history: History, first_epoch: int = 0) -> History:
        """Every phase of the plan in turn on one epoch axis, continuing `history` (whose first
        epoch is `first_epoch` on a run's axis: a from-scratch retry goes on where the last attempt
        stopped); the model ends with the best epoch's weights of all of them."""
        best = _Best(self.fw.weights_keeper(model), self.settings.monitor, self.settings.direction)

        def on_epoch(record: EpochRecord) -> None:
            history.epochs.append(record)
            best.observe(record)
            hooks.on_epoch(record)

        for phase in config.plan:
            if phase.epochs > 0:
                self._run_phase(model, phase, config.data_seed, hooks, history, first_epoch, best, on_epoch)
            # Each phase ends with the best weights so far: phase 2 fine-tunes the best head.
            best.keeper.restore()
        return history

    def _run_phase(self, model, phase, seed: int, hooks: EpochHooks, history: History, first_epoch: int, best: _Best, on_epoch):
        data = self.phase_data(model, phase, seed, hooks)
        trainable, total = self.fw.set_trainable(model, phase.unfreeze_blocks)
        hooks.on_phase_start(phase, trainable, total)
        started = time.perf_counter()  # the phase's training time: features and set-up are counted apart
        best.keeper.start_phase()
        before = len(history.epochs)
        start = first_epoch + before
        ran = self.fw.run_phase(
            model,
            phase,
            data,
            PhaseRun(start, on_epoch, self.settings.monitor, self.settings.direction, self.settings.class_weight),
        )
        result = PhaseResult(phase.name, start, ran, time.perf_counter() - started, trainable, total)
        result.best = phase_bests(history.epochs[before:])
        history.phases.append(result)

    def phase_data(self, model: Model, phase: Phase, seed: int, hooks: EpochHooks) -> PhaseData:
        """Cached frozen activations where the cache's rule applies (the head on pooled features,
        or the top blocks on the activations at the freeze boundary), else the images."""
        size = self.settings.batch_size(phase.name)
        started = time.perf_counter()
        cached = None
        if self.features is not None and cache_applies(model.spec, phase):
            cached = self.features.head_inputs(model, size, seed)
        elif (
            self.features is not None
            and boundary_applies(model.spec, model.n_blocks, phase)
            and self.features.boundary_fits(model, phase.unfreeze_blocks)
        ):
            cached = self.features.top_inputs(model, phase.unfreeze_blocks, size, seed)
        if cached is not None:
            hooks.on_features(phase.name, time.perf_counter() - started)
            return cached
        return PhaseData(*self.image_batches(size, seed))

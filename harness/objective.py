"""One search trial: its model spec and plan from the sampled parameters, trained by the one
training path (harness/training.py), with every epoch reported to the sweep process's pruner.

The per-process runner (`TrialRunner`) holds a study's data, trainers and feature caches in a
trial process; harness/tasks.py runs trials and confirmations with it and owns their MLflow runs'
lifecycle.

Error taxonomy (as in keras-tuner): `TrialFailed` means "this trial failed, record it and go on"
(NaN loss, out of memory, an exception inside the framework); a `ConfigError`/`DataError` means
"the sweep cannot run" and propagates to stop the sweep at once.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import optuna

from harness import runtime
from harness.config import SweepConfig
from harness.data import Dataset, Splits
from harness.features import FeatureCache
from harness.frameworks import framework_for
from harness.frameworks.base import Framework, ModelSpec
from harness.phases import EpochRecord, History, NonFiniteLoss, Phase, blocks_to_unfreeze, scratch_plan, two_phase_plan
from harness.tracking import Tracker
from harness.training import Configuration, EpochHooks, Trainer, TrainingSettings, epoch_note


class TrialFailed(Exception):
    """This trial failed for a reason of its own; the study goes on."""


def trial_level_errors(fw: Framework) -> tuple[type[BaseException], ...]:
    """Exceptions that end one trial but not the sweep. Everything else (ConfigError,
    KeyboardInterrupt, bugs in the harness itself) stops the sweep."""
    return (NonFiniteLoss, MemoryError, *fw.trial_level_errors(), ValueError, RuntimeError)


def model_spec(cfg: SweepConfig, params: dict, num_classes: int, weights: str | None, pretrained: bool = True) -> ModelSpec:
    pretrained = pretrained and params.get("strategy", "finetune") != "scratch"
    return ModelSpec(
        backbone=params["backbone"],
        image_size=cfg.data.image_size,
        num_classes=num_classes,
        weights=weights if pretrained else None,
        backbone_options=dict(cfg.model.backbone_options.get(params["backbone"], {})),
        head_units=int(params["head_units"]),
        dropout=float(params["dropout"]),
        pooling=params["pooling"],
        augment=bool(params["augment"]),
        cut_fraction=float(params.get("cut_fraction", 1.0)),
    )


def plan_for(cfg: SweepConfig, params: dict, n_blocks: int) -> list[Phase]:
    head, ft = cfg.train.head, cfg.train.finetune
    if params.get("strategy") == "scratch":
        # Same epoch budget as the two-phase strategies, all of it with everything training.
        return scratch_plan(
            head.epochs + ft.epochs, params["head_lr"], max(filter(None, (head.patience, ft.patience)), default=None)
        )
    n_unfreeze = blocks_to_unfreeze(n_blocks, params.get("unfreeze_fraction"), params.get("unfreeze_blocks"))
    return two_phase_plan(
        head.epochs, params["head_lr"], head.patience, ft.epochs, params["finetune_lr"], ft.patience, n_unfreeze
    )


def class_weights(labels, num_classes: int) -> dict[int, float]:
    """scikit-learn's balanced loss weights over `labels` (the train split's), label -> weight:
    every class then carries the same total weight in the loss. A label absent from `labels`,
    which scikit-learn cannot weigh, gets 1.0."""
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.asarray(labels, np.int64)
    present = np.unique(labels)
    weights = {c: 1.0 for c in range(num_classes)}
    weights.update(zip(present.tolist(), compute_class_weight("balanced", classes=present, y=labels).tolist()))
    return weights


def train_class_weights(cfg: SweepConfig, dataset: Dataset, splits: Splits) -> dict[int, float] | None:
    """The loss's class weights as `train.class_weight` asks: None (unweighted), or balanced on
    the train split's labels."""
    if cfg.train.class_weight != "balanced":
        return None
    return class_weights(dataset.labels[splits.train], dataset.num_classes)


def weights_param(class_weight: dict[int, float], class_names: list[str]) -> str:
    """The weights as a short run param: `name: weight, ...`, rounded."""
    return ", ".join(f"{class_names[label]}: {w:.4g}" for label, w in class_weight.items())


class TrialRunner:
    """One study's data, trainers and feature caches in a trial process.

    It is built once per process and study (harness/tasks.py `execute`), so the data are loaded and
    the pipelines traced once, not once per trial. The sweep process keeps the Optuna study: it
    sampled `params`, created the MLflow run `run_id`, and takes every pruning decision, which
    `report(epoch_summary)` asks for after each epoch: True (prune now), or a function that waits
    for that answer (asked now, read once the epoch is logged).
    """

    def __init__(self, cfg: SweepConfig, dataset: Dataset, splits: Splits, tracker: Tracker, weights: dict[str, str | None]):
        self.cfg, self.dataset, self.splits, self.tracker = cfg, dataset, splits, tracker
        self.weights = weights
        self._trainers: dict[str, Trainer] = {}  # framework name -> its trainer in this process

    def trainer(self, backbone: str) -> Trainer:
        """The trainer of `backbone`'s framework, prepared (device switches) before its first model."""
        return self.trainer_of(framework_for(backbone))

    def trainer_of(self, fw: Framework) -> Trainer:
        if fw.name not in self._trainers:
            fw.prepare_process(self.cfg.train)
            cfg = self.cfg
            features = (
                FeatureCache(cfg.train.feature_cache_dir, self.dataset, self.splits, fw, cfg.train.feature_cache_max_gib)
                if cfg.train.feature_cache
                else None
            )
            settings = TrainingSettings(
                {"head": cfg.train.head.batch_size, "finetune": cfg.train.finetune.batch_size},
                cfg.study.metric,
                cfg.study.direction,
                train_class_weights(cfg, self.dataset, self.splits),
            )
            self._trainers[fw.name] = Trainer(fw, self.dataset, self.splits, settings, features)
        return self._trainers[fw.name]

    def spec(self, params: dict, pretrained: bool = True) -> ModelSpec:
        return model_spec(self.cfg, params, self.dataset.num_classes, self.weights.get(params["backbone"]), pretrained)

    def train(
        self, number: int, params: dict, run_id: str, report: Callable[[dict], bool | Callable[[], bool]], history: History
    ):
        """Build and train the trial's model (filling `history`); returns it with the best
        epoch's weights. The run's lifecycle is harness/tasks.py `run_trial`."""
        cfg, trainer = self.cfg, self.trainer(params["backbone"])
        seed = cfg.study.seed + number  # a trial's init is its own; its data order is the study's
        model = trainer.build(Configuration(self.spec(params), (), seed, cfg.data.seed))
        plan = tuple(plan_for(cfg, params, model.n_blocks))
        n_unfrozen = max(p.unfreeze_blocks if p.unfreeze_blocks >= 0 else model.n_blocks for p in plan)
        class_weight = trainer.settings.class_weight
        weighted = {"class_weight": weights_param(class_weight, self.dataset.class_names)} if class_weight else {}
        self.tracker.log_params(run_id, {"backbone_blocks": model.n_blocks, "unfrozen_blocks": n_unfrozen, **weighted})
        hooks = self.trial_hooks(trainer.fw, number, run_id, report, history, sum(p.epochs for p in plan))
        trainer.run_plan(model, Configuration(model.spec, plan, seed, cfg.data.seed), hooks, history)
        log_history(self.tracker, run_id, history)
        return model

    def trial_hooks(self, fw: Framework, number: int, run_id: str, report, history: History, total_epochs: int) -> EpochHooks:
        """A search trial's epochs: logged to its run, and reported to the sweep process's pruner."""
        cfg, tracker = self.cfg, self.tracker

        def on_phase_start(phase: Phase, trainable: int, total: int):
            tracker.log_metrics(run_id, {f"{phase.name}/trainable_params": trainable, f"{phase.name}/total_params": total})

        def on_epoch(record: EpochRecord):
            runtime.inject_fault(number, record.epoch, fw.out_of_memory)
            # The epoch's index within its own phase: the sweep process turns it into the pruner's
            # step (harness/trials.py pruning_step); `epoch` stays the shared timeline.
            phase_epoch = record.epoch - next(e.epoch for e in history.epochs if e.phase == record.phase)
            answer = report(epoch_note(number, record, total_epochs, cfg.study.metric, phase_epoch))
            try:  # the sweep process decides (an Optuna storage write and read) while this one logs
                tracker.log_metrics(run_id, record.metrics, step=record.epoch)
            finally:  # read the answer even if logging failed: an unread reply would answer the next question
                prune = answer() if callable(answer) else answer
            if prune:
                value = record.metrics.get(cfg.study.metric)
                raise optuna.TrialPruned(f"pruned at epoch {record.epoch} ({cfg.study.metric}={value:.4f})")

        def on_features(phase: str, seconds: float):
            tracker.log_metrics(run_id, {f"{phase}/feature_seconds": seconds})

        return EpochHooks(on_epoch, on_phase_start, on_features)


def log_history(tracker: Tracker, run_id: str, history: History) -> None:
    """Per-phase summaries, the epoch table as CSV and the learning-curve PNG."""
    from harness.plots import learning_curve_figure

    summary: dict[str, float] = {}
    for p in history.phases:
        summary[f"{p.name}/seconds"] = p.seconds
        summary[f"{p.name}/epochs"] = p.epochs_run
        for k, v in p.best.items():
            summary[f"{p.name}/best_{k}"] = v
    finetune_start = history.phase_start("finetune")
    if finetune_start is not None:
        summary["finetune_start_epoch"] = finetune_start
    tracker.log_metrics(run_id, summary)
    tracker.set_tags(run_id, {"finetune_start_epoch": finetune_start if finetune_start is not None else "none"})
    tracker.log_text(run_id, history_csv(history), "history.csv")
    fig = learning_curve_figure(history)
    tracker.log_figure(run_id, fig, "learning_curve.png")
    import matplotlib.pyplot as plt

    plt.close(fig)


def history_csv(history: History) -> str:
    import pandas as pd

    rows = [{"epoch": e.epoch, "phase": e.phase, **e.metrics} for e in history.epochs]
    return pd.DataFrame(rows).to_csv(index=False)

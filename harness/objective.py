"""One trial: build -> phase 1 -> phase 2 -> the best epoch's weights, or pruned, or failed.

The per-process runner (`TrialRunner`) holds a study's data, pipelines and feature cache in a
trial process; harness/tasks.py runs trials with it and owns their MLflow runs' lifecycle.

Error taxonomy (as in keras-tuner): `TrialFailed` means "this trial failed, record it and go on"
(NaN loss, out of memory, an exception inside Keras); a `ConfigError`/`DataError` means "the
sweep cannot run" and propagates to stop the sweep at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import optuna

from harness import runtime
from harness.config import SweepConfig
from harness.data import Dataset, Splits, tf_dataset
from harness.features import FeatureCache
from harness.phases import BestWeights, EpochRecord, History, NonFiniteLoss, Phase, run_phases, scratch_plan, two_phase_plan
from harness.tracking import Tracker


class TrialFailed(Exception):
    """This trial failed for a reason of its own; the study goes on."""


# Exceptions that end one trial but not the sweep. Everything else (ConfigError, KeyboardInterrupt,
# bugs in the harness itself) stops the sweep.
def trial_level_errors() -> tuple[type[BaseException], ...]:
    import tensorflow as tf

    return (
        NonFiniteLoss,
        MemoryError,
        tf.errors.ResourceExhaustedError,
        tf.errors.InvalidArgumentError,
        tf.errors.InternalError,
        tf.errors.UnknownError,
        ValueError,
        RuntimeError,
    )


def model_spec(cfg: SweepConfig, params: dict, num_classes: int, weights: str | None, pretrained: bool = True):
    from harness.model import ModelSpec

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
    from harness.model import blocks_to_unfreeze

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


class TrialRunner:
    """One study's data, pipelines and feature cache in a trial process, and its trials' training.

    It is built once per process and study (harness/tasks.py `execute`), so the data are loaded and the
    tf.data pipelines traced once, not once per trial. The sweep process keeps the Optuna study:
    it sampled `params`, created the MLflow run `run_id`, and takes every pruning decision, which
    `report(epoch_summary)` asks for after each epoch: True (prune now), or a function that waits
    for that answer (asked now, read once the epoch is logged).
    """

    def __init__(self, cfg: SweepConfig, dataset: Dataset, splits: Splits, tracker: Tracker, weights: dict[str, str | None]):
        self.cfg, self.dataset, self.splits, self.tracker = cfg, dataset, splits, tracker
        self.weights = weights
        self._pipelines: dict[int, tuple] = {}  # batch size -> (train, val)
        self.features = (
            FeatureCache(cfg.train.feature_cache_dir, dataset, splits, cfg.train.feature_cache_max_gib)
            if cfg.train.feature_cache
            else None
        )
        runtime.apply_device_switches(cfg.train)  # before this process builds a model

    def pipelines(self, batch_size: int):
        """Train/val tf.data pipelines, built once per batch size and re-used by every trial."""
        if batch_size not in self._pipelines:
            seed = self.cfg.data.seed
            self._pipelines[batch_size] = (
                tf_dataset(self.dataset, self.splits.train, batch_size, shuffle=True, seed=seed),
                tf_dataset(self.dataset, self.splits.val, batch_size, shuffle=False),
            )
        return self._pipelines[batch_size]

    def train(
        self, number: int, params: dict, run_id: str, report: Callable[[dict], bool | Callable[[], bool]], history: History
    ):
        """Build and train the trial's model (filling `history`); returns it with the best
        epoch's weights. The run's lifecycle is harness/tasks.py `run_trial`."""
        from harness.model import build_model

        cfg = self.cfg
        runtime.seed_everything(cfg.study.seed + number)  # a trial's init and data order are its own
        if self.dataset.images is not None:
            # A shuffled pipeline's order moves on with every pass over it (and was seeded by
            # whatever global seed held when it was built), so a pipeline kept from an earlier
            # trial would make this trial's data order depend on the process's past. In-memory
            # data cost nothing to slice again; a folder's decoded-image cache is kept instead.
            self._pipelines.clear()
        weights = self.weights.get(params["backbone"])
        tm = build_model(model_spec(cfg, params, self.dataset.num_classes, weights), seed=cfg.study.seed + number)
        plan = plan_for(cfg, params, len(tm.blocks))
        n_unfrozen = max(p.unfreeze_blocks if p.unfreeze_blocks >= 0 else len(tm.blocks) for p in plan)
        class_weight = train_class_weights(cfg, self.dataset, self.splits)
        weighted = {"class_weight": weights_param(class_weight, self.dataset.class_names)} if class_weight else {}
        self.tracker.log_params(run_id, {"backbone_blocks": len(tm.blocks), "unfrozen_blocks": n_unfrozen, **weighted})
        total_epochs = sum(p.epochs for p in plan)

        def on_phase_start(phase: Phase, trainable: int, total: int):
            self.tracker.log_metrics(run_id, {f"{phase.name}/trainable_params": trainable, f"{phase.name}/total_params": total})

        def on_epoch(record: EpochRecord):
            runtime.inject_fault(number, record.epoch)
            value = record.metrics.get(cfg.study.metric)
            # The epoch's index within its own phase: the sweep process turns it into the pruner's
            # step (harness/trials.py pruning_step); `epoch` stays the shared timeline.
            phase_epoch = record.epoch - next(e.epoch for e in history.epochs if e.phase == record.phase)
            answer = report(
                {
                    "number": number,
                    "epoch": record.epoch,
                    "phase": record.phase,
                    "phase_epoch": phase_epoch,
                    "metrics": dict(record.metrics),
                    "total_epochs": total_epochs,
                    "value": value,
                }
            )
            try:  # the sweep process decides (an Optuna storage write and read) while this one logs
                self.tracker.log_metrics(run_id, record.metrics, step=record.epoch)
            finally:  # read the answer even if logging failed: an unread reply would answer the next question
                prune = answer() if callable(answer) else answer
            if prune:
                raise optuna.TrialPruned(f"pruned at epoch {record.epoch} ({cfg.study.metric}={value:.4f})")

        def on_features(phase: str, seconds: float):
            self.tracker.log_metrics(run_id, {f"{phase}/feature_seconds": seconds})

        run_plan(
            cfg,
            tm,
            plan,
            self.pipelines,
            on_epoch,
            on_phase_start,
            history=history,
            class_weight=class_weight,
            features=self.features,
            seed=cfg.data.seed,
            on_features=on_features,
        )
        log_history(self.tracker, run_id, history)
        return tm


def run_plan(
    cfg: SweepConfig,
    tm,
    plan,
    pipelines,
    on_epoch=lambda r: None,
    on_phase_start=lambda p, t, n: None,
    history: History | None = None,
    class_weight: dict[int, float] | None = None,
    features=None,
    seed: int = 0,
    on_features=lambda phase, seconds: None,
) -> History:
    """Run a plan whose phases may use different batch sizes; `pipelines(batch)` -> (train, val).

    `features` (harness.features.FeatureCache, when train.feature_cache is on): a head phase on
    fixed features trains the head on cached pooled features, and a fine-tune phase that leaves
    the bottom of the backbone frozen trains the top on cached activations at the freeze
    boundary, both shuffled with `seed`; `on_features(phase, seconds)` hears how long getting them
    took (computing, or reading the cache).
    The model ends with the best epoch's weights across all phases: the weights that scored.
    `history` is filled as epochs end, so it holds what ran even when on_epoch raises (pruning)."""
    from harness.features import boundary_applies, cache_applies

    batch = {"head": cfg.train.head.batch_size, "finetune": cfg.train.finetune.batch_size}
    merged = history if history is not None else History()
    best = BestWeights(cfg.study.metric, cfg.study.direction)
    for phase in plan:
        size = batch.get(phase.name, cfg.train.head.batch_size)
        started = time.perf_counter()
        head_inputs = None
        if features is not None and cache_applies(tm, phase):
            head_inputs = features.head_inputs(tm, size, seed)
        elif features is not None and boundary_applies(tm, phase) and features.boundary_fits(tm, phase.unfreeze_blocks):
            head_inputs = features.top_inputs(tm, phase.unfreeze_blocks, size, seed)
        if head_inputs is not None:
            on_features(phase.name, time.perf_counter() - started)
            train_ds = val_ds = None  # the images are not read in this phase
        else:
            train_ds, val_ds = pipelines(size)
        run_phases(
            tm,
            [phase],
            train_ds,
            val_ds,
            on_epoch,
            on_phase_start,
            cfg.study.metric,
            cfg.study.direction,
            start_epoch=len(merged.epochs),
            best=best,
            history=merged,
            class_weight=class_weight,
            head_inputs=head_inputs,
        )
    return merged


def class_weights(labels, num_classes: int) -> dict[int, float]:
    """Balanced loss weights, label -> n_samples / (n_classes * count of the label), over `labels`
    (the train split's): every class then carries the same total weight in the loss, as with
    scikit-learn's compute_class_weight("balanced"). A label absent from `labels` gets 1.0.

        >>> class_weights(np.array([0, 0, 0, 1]), 2)
        {0: 0.6666666666666666, 1: 2.0}
    """
    import numpy as np

    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    present = int(np.count_nonzero(counts))
    return {c: float(len(labels) / (present * n)) if n else 1.0 for c, n in enumerate(counts)}


def train_class_weights(cfg: SweepConfig, dataset: Dataset, splits: Splits) -> dict[int, float] | None:
    """`model.fit`'s class_weight as `train.class_weight` asks: None (unweighted), or balanced on
    the train split's labels."""
    if cfg.train.class_weight != "balanced":
        return None
    return class_weights(dataset.labels[splits.train], dataset.num_classes)


def weights_param(class_weight: dict[int, float], class_names: list[str]) -> str:
    """The weights as a short run param: `name: weight, ...`, rounded."""
    return ", ".join(f"{class_names[label]}: {w:.4g}" for label, w in class_weight.items())


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

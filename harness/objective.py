"""One trial's lifecycle: sample -> build -> phase 1 -> phase 2 -> result, pruned, or failed.

Error taxonomy (as in keras-tuner): `TrialFailed` means "this trial failed, record it and go on"
(NaN loss, out of memory, an exception inside Keras); a `ConfigError`/`DataError` means "the
sweep cannot run" and propagates to stop the sweep at once.
"""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import optuna

from harness.config import ConfigError, SweepConfig
from harness.data import Dataset, Splits, tf_dataset
from harness.features import FeatureCache
from harness.phases import BestWeights, EpochRecord, History, NonFiniteLoss, Phase, run_phases, scratch_plan, two_phase_plan  # noqa: F401
from harness.tracking import Tracker


class TrialFailed(Exception):
    """This trial failed for a reason of its own; the study goes on."""


# Exceptions that end one trial but not the sweep. Everything else (ConfigError, KeyboardInterrupt,
# bugs in the harness itself) stops the sweep.
def _trial_level_errors() -> tuple[type[BaseException], ...]:
    import tensorflow as tf

    return (NonFiniteLoss, MemoryError, tf.errors.ResourceExhaustedError, tf.errors.InvalidArgumentError,
            tf.errors.InternalError, tf.errors.UnknownError, ValueError, RuntimeError)


@dataclass
class TrialResult:
    value: float
    history: History
    params: dict[str, Any]


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
        return scratch_plan(head.epochs + ft.epochs, params["head_lr"], max(filter(None, (head.patience, ft.patience)), default=None))
    n_unfreeze = blocks_to_unfreeze(n_blocks, params.get("unfreeze_fraction"), params.get("unfreeze_blocks"))
    return two_phase_plan(head.epochs, params["head_lr"], head.patience, ft.epochs, params["finetune_lr"], ft.patience, n_unfreeze)


class TrialRunner:
    """Runs trials of one study inside a trial process; the sweep process asked Optuna for them.

    It is built once per process and study (harness/trials.py), so the data are loaded and the
    tf.data pipelines traced once, not once per trial. The sweep process keeps the Optuna study:
    it sampled `params`, created the MLflow run `run_id`, and takes every pruning decision, which
    `report(epoch_summary)` asks for after each epoch: True (prune now), or a function that waits
    for that answer (asked now, read once the epoch is logged).
    """

    def __init__(self, cfg: SweepConfig, dataset: Dataset, splits: Splits, tracker: Tracker,
                 weights: dict[str, str | None]):
        self.cfg, self.dataset, self.splits, self.tracker = cfg, dataset, splits, tracker
        self.weights = weights
        self._pipelines: dict[tuple, tuple] = {}
        self.features = (FeatureCache(cfg.train.feature_cache_dir, dataset, splits, cfg.train.feature_cache_max_gib)
                         if cfg.train.feature_cache else None)
        apply_device_switches(cfg.train)  # before this process builds a model

    def pipelines(self, batch_size: int):
        """Train/val tf.data pipelines, built once per batch size and re-used by every trial."""
        if batch_size not in self._pipelines:
            seed = self.cfg.data.seed
            self._pipelines[batch_size] = (
                tf_dataset(self.dataset, self.splits.train, batch_size, shuffle=True, seed=seed),
                tf_dataset(self.dataset, self.splits.val, batch_size, shuffle=False),
            )
        return self._pipelines[batch_size]

    def run_trial(self, number: int, params: dict, run_id: str, report: Callable[[dict], bool | Callable[[], bool]],
                  leader: float | None = None) -> float:
        """Train one trial; returns its objective value. Raises optuna.TrialPruned, TrialFailed,
        ConfigError (stop the sweep) or KeyboardInterrupt (stop asked for), with the MLflow run
        already ended to match.

        `leader` is the study's best value when the trial was handed out (None: no trial has
        finished yet). A trial that matches or beats it logs its trained model to its run, so the
        winner's model exists however the sweep ends, while most trials store none."""
        from harness.phases import stop_requested

        if stop_requested.is_set():
            self.tracker.end_run(run_id, "KILLED", optuna_state="FAIL")
            raise KeyboardInterrupt("stop requested")
        cfg = self.cfg
        started = time.perf_counter()
        history = History()
        system = self.tracker.system_metrics(run_id, cfg.tracking.system_metrics_seconds)
        try:
            tm = self._train(number, params, run_id, report, history)
            if stop_requested.is_set():  # asked to stop while the trial was finishing: it runs again on resume
                raise KeyboardInterrupt("stop requested")
            value = history.best(cfg.study.metric, cfg.study.direction)
            self.tracker.log_metrics(run_id, {"objective": value, f"best_{cfg.study.metric}": value,
                                              "wall_seconds": time.perf_counter() - started,
                                              "system/rss_mib": resident_mib()})
            if leads(value, leader, cfg.study.direction):
                self.tracker.log_keras_model(run_id, tm.model, self.dataset.class_names, cfg.data.image_size,
                                             tags={"harness.study": cfg.study.name, "harness.trial": number})
        except optuna.TrialPruned as exc:
            # A pruned trial did its job: it ends FINISHED, says why, and keeps its curve.
            log_history(self.tracker, run_id, history)
            self.tracker.set_tags(run_id, {"harness.pruned_reason": str(exc)})
            self.tracker.end_run(run_id, "FINISHED", optuna_state="PRUNED")
            raise
        except ConfigError:
            self.tracker.end_run(run_id, "FAILED", optuna_state="FAIL")
            raise
        except _trial_level_errors() as exc:
            reason = f"{type(exc).__name__}: {str(exc)[:500]}"
            self.tracker.log_failure(run_id, exc)
            self.tracker.end_run(run_id, "FAILED", optuna_state="FAIL")
            raise TrialFailed(reason) from exc
        except BaseException as exc:
            # Ctrl-C/SIGTERM or a harness bug: record it, then stop the sweep. An interrupted
            # trial did nothing wrong: the sweep process queues its configuration again.
            interrupted = isinstance(exc, KeyboardInterrupt)
            self.tracker.log_failure(run_id, exc)
            self.tracker.end_run(run_id, "KILLED" if interrupted else "FAILED", optuna_state="FAIL")
            raise
        finally:
            system.finish()
            tm = None
            release_memory()
        self.tracker.end_run(run_id, "FINISHED", optuna_state="COMPLETE")
        return value

    def _train(self, number: int, params: dict, run_id: str, report: Callable[[dict], bool | Callable[[], bool]], history: History):
        """Build and train the trial's model (filling `history`); returns it with the best
        epoch's weights."""
        from harness.model import build_model

        cfg = self.cfg
        seed_everything(cfg.study.seed + number)  # a trial's init and data order are its own
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
            inject_fault(number, record.epoch)
            value = record.metrics.get(cfg.study.metric)
            # The epoch's index within its own phase: the sweep process turns it into the pruner's
            # step (harness/trials.py pruning_step); `epoch` stays the shared timeline.
            phase_epoch = record.epoch - next(e.epoch for e in history.epochs if e.phase == record.phase)
            answer = report({"number": number, "epoch": record.epoch, "phase": record.phase, "phase_epoch": phase_epoch,
                             "metrics": dict(record.metrics), "total_epochs": total_epochs, "value": value})
            try:  # the sweep process decides (an Optuna storage write and read) while this one logs
                self.tracker.log_metrics(run_id, record.metrics, step=record.epoch)
            finally:  # read the answer even if logging failed: an unread reply would answer the next question
                prune = answer() if callable(answer) else answer
            if prune:
                raise optuna.TrialPruned(f"pruned at epoch {record.epoch} ({cfg.study.metric}={value:.4f})")

        def on_features(phase: str, seconds: float):
            self.tracker.log_metrics(run_id, {f"{phase}/feature_seconds": seconds})

        run_plan(cfg, tm, plan, self.pipelines, on_epoch, on_phase_start, history=history, class_weight=class_weight,
                 features=self.features, seed=cfg.data.seed, on_features=on_features)
        log_history(self.tracker, run_id, history)
        return tm


def apply_device_switches(train) -> tuple[bool, bool]:
    """train.mixed_precision and train.jit_compile in this trial process, on the GPU it was given:
    Keras' global dtype policy (mixed_float16 or float32) and `compile_for`'s jit_compile. Returns
    (mixed precision, XLA). `release_memory` keeps the policy across Keras' clear_session."""
    import keras

    from harness.phases import gpu_capabilities, resolve_switch, set_jit_compile

    capabilities = gpu_capabilities()
    mixed, jit = resolve_switch(train.mixed_precision, capabilities), resolve_switch(train.jit_compile, capabilities)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    set_jit_compile(jit)
    return mixed, jit


def leads(value: float, leader: float | None, direction: str) -> bool:
    """Whether a finished trial's value matches or beats the best known when it started."""
    import math

    if not math.isfinite(value):
        return False
    if leader is None or not math.isfinite(leader):
        return True
    return value >= leader if direction == "maximize" else value <= leader


def run_plan(cfg: SweepConfig, tm, plan, pipelines, on_epoch=lambda r: None, on_phase_start=lambda p, t, n: None,
             history: History | None = None, class_weight: dict[int, float] | None = None,
             features=None, seed: int = 0, on_features=lambda phase, seconds: None) -> History:
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
        elif (features is not None and boundary_applies(tm, phase)
              and features.boundary_fits(tm, phase.unfreeze_blocks)):
            head_inputs = features.top_inputs(tm, phase.unfreeze_blocks, size, seed)
        if head_inputs is not None:
            on_features(phase.name, time.perf_counter() - started)
            train_ds = val_ds = None  # the images are not read in this phase
        else:
            train_ds, val_ds = pipelines(size)
        run_phases(tm, [phase], train_ds, val_ds, on_epoch, on_phase_start, cfg.study.metric, cfg.study.direction,
                   start_epoch=len(merged.epochs), best=best, history=merged, class_weight=class_weight,
                   head_inputs=head_inputs)
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


FAULT_ENV = "HARNESS_INJECT_FAULT"


def inject_fault(trial_number: int, epoch: int) -> None:
    """Testing switch, at the end of the first epoch of trial N (unset, always outside tests, it
    does nothing):

      HARNESS_INJECT_FAULT=oom:N   raise TensorFlow's out-of-memory error, as a GPU allocation
                                   failure surfaces;
      HARNESS_INJECT_FAULT=kill:N  SIGKILL the trial's own process, as the kernel's out-of-memory
                                   killer ends a process that exhausted the host's memory.
    """
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or epoch != 0:
        return
    kind, _, number = spec.partition(":")
    if number != str(trial_number):
        return
    if kind == "oom":
        import tensorflow as tf

        raise tf.errors.ResourceExhaustedError(None, None, f"simulated out of memory in trial {trial_number} ({FAULT_ENV})")
    if kind == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def resident_mib() -> float:
    """Resident memory of this process now (after the trial's clean-up): the figure that must stay flat."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def seed_everything(seed: int) -> None:
    """Seed every generator a task draws from, at its start: Python's `random`, NumPy's global
    generator, TensorFlow's global seed and Keras' (`keras.utils.set_random_seed` does all four and
    drops Keras' global SeedGenerator).

    A warm trial process has run other tasks before, and they leave these seeds where they were
    set last. TensorFlow's global seed matters beyond the ops: a tf.data pipeline takes its
    shuffle seeds from it when it is built, so the same `shuffle(seed=s)` gives another order
    after another task set another global seed (that made the demo's baseline differ between a
    warm and a fresh process). So seed first, then build pipelines and models."""
    import keras

    keras.utils.set_random_seed(int(seed))


def release_memory() -> None:
    """Drop Keras' graph state after a trial or a confirmation run.

    Clearing the session frees what TensorFlow lets go of, and glibc keeps freed heap pages
    mapped unless malloc_trim hands them back. It does not stop `model.fit`'s own leak (see
    harness/worker.py): that is why trials run in warm child processes that are recycled.
    """
    import keras

    policy = keras.mixed_precision.global_policy().name
    keras.backend.clear_session()  # which also resets Keras' global dtype policy to float32
    keras.mixed_precision.set_global_policy(policy)  # train.mixed_precision holds for the next trial
    gc.collect()
    _malloc_trim()


def _malloc_trim() -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass

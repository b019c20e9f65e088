"""Strategy-by-quadrant comparison: equal budgets, confirmation on held-out test, LogME.

For every target dataset (each tagged small|large x similar|dissimilar) and every strategy
(features, intermediate, partial, full, scratch) the harness runs *its own* Optuna study with the
same number of trials, so no strategy wins because the sampler neglected another. The best
configuration of each cell is then retrained with K seeds and evaluated once on the test split,
which nothing else ever reads.

MLflow run tree:  sweep parent run
                    ├─ logme run per (target, backbone)
                    └─ cell run per (target, strategy)
                         ├─ trial runs
                         └─ confirm run per seed (test_accuracy)
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from harness import study as st
from harness.config import SweepConfig, TargetConfig
from harness.data import Dataset, Splits, load_dataset, make_splits, tf_dataset
from harness.strategies import strategy_search

CELL_TAG = "harness.cell"


def load_targets(cfg: SweepConfig, log) -> list[tuple[TargetConfig, Dataset, Splits]]:
    """Load and split every target up front, so a bad dataset stops the sweep before it starts."""
    out = []
    for target in cfg.quadrants.targets:
        dataset = load_dataset(target.data)
        splits = make_splits(dataset.labels, target.data)
        log(f"target {target.name} ({target.size}, {target.similarity}): {dataset.name}, {dataset.num_classes} classes, "
            f"train {len(splits.train)} / val {len(splits.val)} / test {len(splits.test)}")
        out.append((target, dataset, splits))
    return out


def cell_name(target: TargetConfig, strategy: str) -> str:
    return f"{target.name}.{strategy}"


def cell_config(cfg: SweepConfig, target: TargetConfig, strategy: str) -> SweepConfig:
    """The config of one cell's study: the target's data, the strategy's search space, equal budget."""
    study = dataclasses.replace(
        cfg.study,
        name=f"{cfg.study.name}.{cell_name(target, strategy)}",
        n_trials=cfg.quadrants.trials_per_cell,
        storage=st.storage_url(cfg),  # every cell's study lives in the sweep's one storage
    )
    return dataclasses.replace(cfg, study=study, data=target.data, search=strategy_search(strategy, cfg.search, cfg.quadrants))


def run_quadrants(cfg: SweepConfig, targets, storage, tracker, weights: dict, exclusive: bool, log) -> dict:
    from harness.sweep import TrialBatch, recover

    q = cfg.quadrants
    n_cells = len(targets) * len(q.strategies)
    log(f"quadrant sweep {cfg.study.name}: {len(targets)} target(s) x {len(q.strategies)} strategies = {n_cells} cells, "
        f"{q.trials_per_cell} trial(s) each, then {q.confirm_seeds} confirmation seed(s)")
    started = time.monotonic()
    scores = {}
    for i, (target, dataset, splits) in enumerate(targets):
        if q.logme:
            log_logme_scores(cfg, target, dataset, splits, tracker, weights, log)
        for j, strategy in enumerate(q.strategies):
            ccfg = cell_config(cfg, target, strategy)
            name = cell_name(target, strategy)
            cell_run = _open_cell_run(tracker, cfg, target, strategy, ccfg)
            study = st.open_study(ccfg, storage)
            study.set_user_attr("mlflow_cell_run_id", cell_run)
            recover(study, tracker, exclusive, log, parent_id=cell_run)
            batch = TrialBatch(ccfg, dataset, splits, tracker, weights, parent_run_id=cell_run,
                               extra_tags=_cell_tags(target, strategy), started=started,
                               progress_prefix=f"cell {i * len(q.strategies) + j + 1}/{n_cells} {name}")
            outcome = _run_cell_isolated(cfg, study, batch, exclusive, log) if cfg.study.trials_per_process else run_cell(batch, exclusive)
            if outcome is None:
                log(f"{name}: no completed trial; nothing to confirm")
                tracker.end_run(cell_run, "FAILED")
                continue
            best_value, tests = outcome
            tracker.end_run(cell_run, "FINISHED")
            scores[name] = (best_value, float(np.mean(tests)))
            log(f"{name}: best val {best_value:.4f}; test {np.mean(tests):.4f} over {len(tests)} seed(s)")
    from harness.report import build_report

    log("writing the comparison report")
    paths = build_report(cfg.study.name, tracker, log=log)
    return {"cells": scores, "report": paths}


def run_cell(batch, exclusive: bool) -> tuple[float, list[float]] | None:
    """One cell: its study's trials, then the best configuration retrained with every seed.

    Returns (best validation value, test accuracy per seed), or None when no trial completed.
    """
    from harness.sweep import run_trials

    ccfg, tracker, cell_run = batch.cfg, batch.tracker, batch.parent_run_id
    cfg_here = dataclasses.replace(ccfg, study=dataclasses.replace(ccfg.study, trials_per_process=0))
    study = st.open_study(ccfg, st.make_storage(st.storage_url(ccfg)))
    log = _stderr_log
    run_trials(cfg_here, study, dataclasses.replace(batch, cfg=cfg_here), exclusive, log)
    best = st.best_trial(study)
    if best is None:
        return None
    tracker.log_metrics(cell_run, {"best_val": best.value, "best_trial": best.number})
    tests = confirm_cell(ccfg, best.params, batch.dataset, batch.splits, tracker, cell_run, ccfg.quadrants.confirm_seeds,
                         batch.weights, log, tags=batch.extra_tags)
    tracker.log_metrics(cell_run, {"test_mean": float(np.mean(tests)), "test_std": float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0})
    return best.value, tests


def _run_cell_isolated(cfg: SweepConfig, study, batch, exclusive: bool, log):
    """A cell's trials and confirmations in one child process (memory flat across cells). A child
    the OS kills fails its running trial and the cell is tried again, up to the failure limit."""
    from harness.sweep import SweepRefused, record_dead_process
    from harness.worker import ProcessDied, run_isolated

    for attempt in range(1, cfg.study.max_consecutive_failures + 1):
        try:
            return run_isolated(run_cell, batch, exclusive)
        except ProcessDied as died:
            failed = record_dead_process(study, batch.tracker, died, exclusive, parent_id=batch.parent_run_id)
            batch.tracker.fail_running_children(batch.parent_run_id, "confirm", str(died))
            log(f"{batch.progress_prefix}: trial {', '.join(map(str, failed)) or '?'} FAIL ({died}); attempt {attempt}")
    raise SweepRefused(f"{batch.progress_prefix}: its process died {cfg.study.max_consecutive_failures} times in a row")


def _stderr_log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _cell_tags(target: TargetConfig, strategy: str) -> dict:
    return {"target": target.name, "size": target.size, "similarity": target.similarity,
            "quadrant": f"{target.size}-{target.similarity}", "strategy": strategy, CELL_TAG: cell_name(target, strategy)}


def _open_cell_run(tracker, cfg, target, strategy, ccfg) -> str:
    """The cell's run, reopened when the sweep resumes."""
    existing = tracker.find_child("cell", {CELL_TAG: cell_name(target, strategy)})
    if existing is not None:
        tracker.client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    run_id = tracker.start_child(f"cell {cell_name(target, strategy)}", "cell", _cell_tags(target, strategy), config=ccfg.to_dict())
    tracker.log_params(run_id, {"trials_per_cell": cfg.quadrants.trials_per_cell, "confirm_seeds": cfg.quadrants.confirm_seeds,
                                "dataset": target.data.name or target.data.path, "train_per_class": target.data.train_per_class})
    return run_id


# --- confirmation ----------------------------------------------------------------------------


def evaluate_on_test(tm, dataset: Dataset, splits: Splits, batch_size: int) -> dict[str, float]:
    """The one place the test split is read: once per confirmation seed, after all training."""
    from harness.phases import evaluate

    return evaluate(tm.model, tf_dataset(dataset, splits.test, batch_size, shuffle=False))


def confirm_cell(ccfg: SweepConfig, params: dict, dataset: Dataset, splits: Splits, tracker, cell_run: str,
                 seeds: int, weights: dict, log, tags: dict | None = None) -> list[float]:
    """Retrain the cell's best configuration with each seed; test each model once. Resumable."""
    import keras

    from harness.model import build_model
    from harness.objective import log_history, model_spec, plan_for, release_memory, run_plan

    params = {**{n: p.value for n, p in ccfg.search.items() if p.fixed}, **params}
    metric = ccfg.study.metric
    results = []
    for seed in range(seeds):
        done = tracker.find_child("confirm", {"harness.seed": seed}, parent_id=cell_run)
        if done is not None and done.info.status == "FINISHED" and "test_accuracy" in done.data.metrics:
            results.append(done.data.metrics["test_accuracy"])
            continue
        run_id = tracker.start_child(f"confirm seed {seed}", "confirm", {**(tags or {}), "harness.seed": seed},
                                     config=ccfg.to_dict(), parent_id=cell_run)
        tracker.log_params(run_id, {**params, "seed": seed})
        started = time.perf_counter()
        try:
            keras.utils.set_random_seed(seed)
            tm = build_model(model_spec(ccfg, params, dataset.num_classes, weights.get(params["backbone"])), seed=seed)
            plan = plan_for(ccfg, params, len(tm.blocks))

            def pipelines(batch_size):
                return (tf_dataset(dataset, splits.train, batch_size, shuffle=True, seed=seed),
                        tf_dataset(dataset, splits.val, batch_size, shuffle=False))

            history = run_plan(ccfg, tm, plan, pipelines, on_epoch=lambda r: tracker.log_metrics(run_id, r.metrics, step=r.epoch))
            test = evaluate_on_test(tm, dataset, splits, ccfg.train.head.batch_size)
            log_history(tracker, run_id, history)
        except BaseException as exc:
            tracker.log_failure(run_id, exc)
            tracker.end_run(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED")
            raise
        finally:
            release_memory()
        tracker.log_metrics(run_id, {"test_accuracy": test["accuracy"], "test_loss": test["loss"],
                                     "best_val": history.best(metric, ccfg.study.direction),
                                     "wall_seconds": time.perf_counter() - started})
        tracker.end_run(run_id, "FINISHED")
        results.append(test["accuracy"])
        log(f"  confirm {params.get('strategy', '')} seed {seed}: test accuracy {test['accuracy']:.4f}")
    return results


# --- LogME -----------------------------------------------------------------------------------


def backbone_features(tm, dataset: Dataset, indices: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Pooled features of the frozen backbone (preprocessing included), as the head would see them."""
    import keras

    extractor = keras.Model(tm.model.input, tm.model.get_layer("pool").output)
    return np.concatenate([np.asarray(extractor(x, training=False)) for x, _ in tf_dataset(dataset, indices, batch_size, shuffle=False)])


def logme_indices(labels: np.ndarray, train: np.ndarray, max_images: int) -> np.ndarray:
    """Up to `max_images` training indices, the same share from every class."""
    classes = np.unique(labels[train])
    per_class = max(1, max_images // len(classes))
    return np.sort(np.concatenate([train[labels[train] == c][:per_class] for c in classes]))


def log_logme_scores(cfg: SweepConfig, target: TargetConfig, dataset: Dataset, splits: Splits, tracker, weights: dict, log) -> dict:
    """LogME of every candidate backbone on this target, from frozen features, before any training."""
    from harness.logme import logme
    from harness.model import ModelSpec, build_model
    from harness.objective import release_memory

    scores = {}
    names = cfg.search["backbone"].choices or (cfg.search["backbone"].value,)
    for backbone in names:
        tags = {"target": target.name, "backbone": backbone}
        done = tracker.find_child("logme", tags)
        if done is not None and "logme" in done.data.metrics:
            scores[backbone] = done.data.metrics["logme"]
            continue
        started = time.perf_counter()
        spec = ModelSpec(backbone, target.data.image_size, dataset.num_classes, weights.get(backbone),
                         dict(cfg.model.backbone_options.get(backbone, {})))
        tm = build_model(spec)
        idx = logme_indices(dataset.labels, splits.train, cfg.quadrants.logme_max_images)
        score = logme(backbone_features(tm, dataset, idx), dataset.labels[idx])
        del tm
        release_memory()
        run_id = tracker.start_child(f"logme {target.name} {backbone}", "logme",
                                     {**tags, "size": target.size, "similarity": target.similarity})
        tracker.log_metrics(run_id, {"logme": score, "images": len(idx), "wall_seconds": time.perf_counter() - started})
        tracker.end_run(run_id, "FINISHED")
        scores[backbone] = score
        log(f"LogME {target.name} / {backbone}: {score:.4f} ({len(idx)} images)")
    return scores

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
                         ├─ confirm run per seed (test_accuracy)
                         └─ backbone_confirm run per (other backbone, seed): LogME's ground truth

Cells run in parallel: each cell's search study and its confirmation study are jobs of the trial
engine (harness/trials.py), so `--workers N` and every sweep process on a server storage share
them, and each cell's trials and seeds run exactly once.
"""

from __future__ import annotations

import sys
import time
from typing import cast

import numpy as np
import optuna
from optuna.trial import TrialState

from harness import study as st
from harness.config import SweepConfig, TargetConfig, backbone_candidates
from harness.data import Dataset, Splits, dataset_inputs
from harness.direction import best_of, better
from harness.progress import Progress
from harness.scratch import RULE_TAG, training_rule
from harness.stores import SweepSetup
from harness.strategies import strategy_search
from harness.tasks import ConfirmTask, Context
from harness.tracking import MODEL_URI_TAG, REGISTERED_TAG, RunRecord
from harness.trials import Job, recover_after_crash, trial_job

CELL_TAG = "harness.cell"


def cell_name(target: TargetConfig, strategy: str) -> str:
    return f"{target.name}.{strategy}"


def cell_config(cfg: SweepConfig, target: TargetConfig, strategy: str) -> SweepConfig:
    """The config of one cell's study: the target's data, the strategy's search space, equal budget."""
    assert cfg.quadrants is not None  # this module runs only quadrant sweeps (sweep.py checks)
    study = cfg.study.model_copy(
        update={
            "name": f"{cfg.study.name}.{cell_name(target, strategy)}",
            "n_trials": cfg.quadrants.trials_per_cell,
            "storage": st.storage_url(cfg),  # every cell's study lives in the sweep's one storage
        }
    )
    search = strategy_search(strategy, cfg.search, cfg.quadrants)
    return cfg.model_copy(update={"study": study, "data": target.data, "search": search})


def run_quadrants(cfg: SweepConfig, targets, setup: SweepSetup) -> dict:
    """Every cell's search, then its confirmation seeds, spread over the engine's trial processes
    (and over every sweep process sharing a server storage); then the report. `targets`: each
    target with its dataset and splits (harness/preflight.py `load_targets`)."""
    storage, tracker, weights, engine, exclusive, log = (
        setup.storage,
        setup.tracker,
        setup.weights,
        setup.engine,
        setup.exclusive,
        setup.log,
    )
    q = cfg.quadrants
    assert q is not None  # this module runs only quadrant sweeps (sweep.py checks)
    n_cells = len(targets) * len(q.strategies)
    log(
        f"quadrant sweep {cfg.study.name}: {len(targets)} target(s) x {len(q.strategies)} strategies = {n_cells} cells, "
        f"{q.trials_per_cell} trial(s) each, then {q.confirm_seeds} confirmation seed(s)"
    )
    started = time.monotonic()
    scores: dict[str, tuple[float, float]] = {}
    jobs = []
    if exclusive:  # LogME runs a killed sweep left RUNNING (the lock proves no process owns them)
        tracker.end_orphaned_runs(("logme",))
    for i, (target, dataset, splits) in enumerate(targets):
        if q.logme:
            with st.claim_lock(storage, f"{cfg.study.name}:logme:{target.name}"):
                log_logme_scores(cfg, target, dataset, splits, tracker, weights, log)
        for j, strategy in enumerate(q.strategies):
            prefix = f"cell {i * len(q.strategies) + j + 1}/{n_cells} {cell_name(target, strategy)}"
            jobs.append(
                cell_job(
                    cfg, target, strategy, dataset, splits, storage, tracker, weights, exclusive, log, started, prefix, scores
                )
            )
    engine.run(jobs)
    from harness.report import build_report

    log("writing the comparison report")
    paths = build_report(cfg.study.name, tracker, log=log)
    return {"cells": scores, "report": paths}


def cell_job(cfg, target, strategy, dataset, splits, storage, tracker, weights, exclusive, log, started, prefix, scores) -> Job:
    """The search job of one cell; once its study is full, the cell's confirmation job follows."""
    ccfg = cell_config(cfg, target, strategy)
    name = cell_name(target, strategy)
    with st.claim_lock(storage, ccfg.study.name):  # sweep processes started together: one cell run
        study = st.open_study(ccfg, storage, reseed=not exclusive)
        if not study.trials:  # a new cell: every candidate backbone gets a trial before the sampler chooses
            for backbone in backbones_to_try(ccfg):
                study.enqueue_trial({"backbone": backbone})
        cell_run = study.user_attrs.get("mlflow_cell_run_id") or _open_cell_run(tracker, cfg, target, strategy, ccfg)
        study.set_user_attr("mlflow_cell_run_id", cell_run)
    recover_after_crash(study, tracker, exclusive, log, parent_id=cell_run, owned_roles=("confirm", "backbone_confirm"))
    context = Context(ccfg.study.name, ccfg, dataset, splits, tracker, weights, tuple(dataset_inputs(dataset, ccfg.data, splits)))
    best = st.best_trial(study)
    progress = Progress(
        ccfg.study.n_trials,
        st.finished_count(study),
        ccfg.study.direction,
        ccfg.study.metric,
        sys.stderr,
        prefix,
        best=best.value if best else None,
        started=started,
    )

    def searched() -> list[Job]:
        best = st.best_trial(study)
        if best is None:
            log(f"{name}: no completed trial; nothing to confirm")
            tracker.end_run(cell_run, "FAILED")
            return []
        assert best.value is not None  # the best trial is a COMPLETE one: it has a value
        tracker.log_metrics(cell_run, {"best_val": best.value, "best_trial": best.number})
        fixed = {n: p.value for n, p in ccfg.search.items() if p.fixed}
        params = {**fixed, **best.params}
        jobs = [
            confirm_job(
                ccfg,
                params,
                best.value,
                storage,
                tracker,
                context,
                cell_run,
                _cell_tags(target, strategy),
                log,
                name,
                scores,
                exclusive=exclusive,
            )
        ]
        assert cfg.quadrants is not None  # the cell of a quadrant sweep
        if cfg.quadrants.logme and strategy != "scratch":
            # LogME ranks backbones, so each backbone needs a confirmed test score of its own on
            # this target, not only the cell's winner: its best trial, retrained with the same seeds.
            for backbone, trial in best_trial_per_backbone(study, ccfg.study.direction).items():
                if backbone != params.get("backbone"):
                    jobs.append(
                        confirm_job(
                            ccfg,
                            {**fixed, **trial.params},
                            trial.value,
                            storage,
                            tracker,
                            context,
                            cell_run,
                            _cell_tags(target, strategy),
                            log,
                            name,
                            scores,
                            backbone_check=backbone,
                            exclusive=exclusive,
                        )
                    )
        return jobs

    return trial_job(
        ccfg,
        study,
        context,
        tracker,
        parent_run_id=cell_run,
        extra_tags=_cell_tags(target, strategy),
        name=name,
        progress=progress,
        on_done=searched,
    )


def backbones_to_try(ccfg: SweepConfig) -> list[str]:
    """The backbones a new cell tries first, one trial each: every candidate when the search
    chooses among several (as many as the cell's budget allows), so no backbone goes untried
    because the sampler's first draws missed it."""
    choices = backbone_candidates(ccfg.search)
    return choices[: ccfg.study.n_trials] if len(choices) >= 2 else []


def best_trial_per_backbone(study, direction: str) -> dict:
    """backbone -> that backbone's best completed trial in the study."""
    best: dict[str, optuna.trial.FrozenTrial] = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        backbone = trial.params.get("backbone")
        if backbone is None:
            continue
        held = best.get(backbone)
        if held is None or better(trial.value, held.value, direction):
            best[backbone] = trial
    return best


def confirm_job(
    ccfg: SweepConfig,
    params: dict,
    best_value: float,
    storage,
    tracker,
    context: Context,
    cell_run: str,
    tags: dict,
    log,
    name: str,
    scores: dict,
    backbone_check: str | None = None,
    exclusive: bool = True,
) -> Job:
    """Retrain the cell's best configuration once per seed and test each model once.

    The seeds are the trials of a study of their own (`<cell study>.confirm`), so the engine's
    exact budget makes each seed run exactly once, across processes and machines, and a seed
    whose process died runs again.

    `backbone_check`: instead, retrain the best trial of that (not winning) backbone, for LogME's
    ground truth; its runs (role `backbone_confirm`) log no model and do not count as the cell's."""
    assert ccfg.quadrants is not None  # a cell's config keeps the sweep's quadrants section
    seeds = ccfg.quadrants.confirm_seeds
    suffix = f"confirm.{backbone_check}" if backbone_check else "confirm"
    role = "backbone_confirm" if backbone_check else "confirm"
    study = optuna.create_study(
        study_name=f"{ccfg.study.name}.{suffix}",
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    # A seed a killed sweep left RUNNING would hold its place in the budget for ever: it fails and
    # runs again (its MLflow run was closed when the cell resumed).
    st.fail_orphaned_trials(study, exclusive)
    # Seeds show progress as trials do (a from-scratch seed trains for minutes); the value is the seed's test score.
    progress = Progress(seeds, st.finished_count(study), "maximize", "test_accuracy", sys.stderr, f"{name} {suffix}")

    def next_seed(study) -> None:
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return  # study.ask() takes the queued one
        taken = {_seed_of(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)}
        missing = [s for s in range(seeds) if s not in taken]
        if missing:
            study.enqueue_trial({"seed": missing[0]})

    def prepare(trial: optuna.Trial, worker_id: str) -> ConfirmTask:
        seed = trial.suggest_int("seed", 0, seeds - 1)
        label = f"{backbone_check} seed {seed}" if backbone_check else f"seed {seed}"
        run_id = tracker.start_child(
            f"confirm {label}",
            role,
            {**tags, "harness.seed": seed, RULE_TAG: training_rule(ccfg)},
            config=ccfg.resolved(params, 0, seed=seed),
            parent_id=cell_run,
        )
        tracker.log_datasets(run_id, context.inputs)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("worker", worker_id)
        tracker.log_params(run_id, {**params, "seed": seed})
        progress.trial_started(trial.number, {"seed": seed})
        if backbone_check:
            return ConfirmTask(context.key, params, seed, run_id, keep_model=False, number=trial.number)
        leader = _best_confirm_run(tracker, cell_run, ccfg.study.metric, ccfg.study.direction)
        return ConfirmTask(context.key, params, seed, run_id, leader.metrics["best_val"] if leader else None, number=trial.number)

    def confirmed() -> list[Job]:
        # A COMPLETE trial of a single-objective study always has a value.
        tests = [cast(float, t.value) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if backbone_check:
            log(f"{name} / {backbone_check}: test {np.mean(tests):.4f} over {len(tests)} seed(s) (LogME's ground truth)")
            return []
        tracker.log_metrics(
            cell_run, {"test_mean": float(np.mean(tests)), "test_std": float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0}
        )
        with st.claim_lock(storage, f"{ccfg.study.name}:register"):
            register_cell_model(tracker, ccfg, cell_run, tags, log)
        tracker.end_run(cell_run, "FINISHED")
        scores[name] = (best_value, float(np.mean(tests)))
        log(f"{name}: best val {best_value:.4f}; test {np.mean(tests):.4f} over {len(tests)} seed(s)")
        return []

    return Job(
        f"{name} {suffix}",
        study,
        seeds,
        context,
        prepare,
        before_ask=next_seed,
        on_done=confirmed,
        parent_run_id=cell_run,
        progress=progress,
    )


def _best_confirm_run(tracker, cell_run: str, metric: str, direction: str) -> RunRecord | None:
    """The cell's finished confirmation run with the best validation score that logged its model."""
    runs = tracker.find_runs(role="confirm", parent=cell_run, status="FINISHED")
    runs = [r for r in runs if MODEL_URI_TAG in r.tags and "best_val" in r.metrics]
    if not runs:
        return None
    return best_of(runs, direction, key=lambda r: r.metrics["best_val"])


def register_cell_model(tracker, ccfg: SweepConfig, cell_run: str, tags: dict, log) -> None:
    """Register the cell's best confirmed model (chosen on validation, like everything else) as a
    version of the registered model named after the cell's study, `<sweep>.<target>.<strategy>`."""
    best = _best_confirm_run(tracker, cell_run, ccfg.study.metric, ccfg.study.direction)
    if best is None or tracker.run_tags(cell_run).get(REGISTERED_TAG):
        return
    seed = best.tags.get("harness.seed")
    version = tracker.register_model(
        best.tags[MODEL_URI_TAG],
        ccfg.study.name,
        best.run_id,
        tags={
            **tags,
            "harness.seed": seed,
            "best_val": f"{best.metrics['best_val']:.6g}",
            "test_accuracy": f"{best.metrics.get('test_accuracy', float('nan')):.6g}",
        },
        description=f"best confirmed model of cell {ccfg.study.name} (seed {seed}, chosen on validation)",
    )
    tracker.set_tags(cell_run, {REGISTERED_TAG: version, "harness.registered_model": f"models:/{ccfg.study.name}/{version}"})
    log(f"{ccfg.study.name}: registered the best confirmed model (seed {seed}) as version {version}")


def _seed_of(trial) -> int | None:
    """A confirmation trial's seed: its parameter, or the one queued for it before it sampled."""
    return trial.params.get("seed", trial.system_attrs.get("fixed_params", {}).get("seed"))


def _cell_tags(target: TargetConfig, strategy: str) -> dict:
    return {
        "target": target.name,
        "size": target.size,
        "similarity": target.similarity,
        "quadrant": f"{target.size}-{target.similarity}",
        "strategy": strategy,
        CELL_TAG: cell_name(target, strategy),
    }


def _open_cell_run(tracker, cfg, target, strategy, ccfg) -> str:
    """The cell's run, reopened when the sweep resumes."""
    existing = tracker.find_child("cell", {CELL_TAG: cell_name(target, strategy)})
    if existing is not None:
        tracker.reopen_run(existing.run_id)
        return existing.run_id
    run_id = tracker.start_child(
        f"cell {cell_name(target, strategy)}", "cell", _cell_tags(target, strategy), config=ccfg.to_dict()
    )
    tracker.log_params(
        run_id,
        {
            "trials_per_cell": cfg.quadrants.trials_per_cell,
            "confirm_seeds": cfg.quadrants.confirm_seeds,
            "dataset": target.data.name or target.data.path,
            "train_per_class": target.data.train_per_class,
        },
    )
    return run_id


# --- LogME -----------------------------------------------------------------------------------


def logme_indices(labels: np.ndarray, train: np.ndarray, max_images: int) -> np.ndarray:
    """Up to `max_images` training indices, the same share from every class."""
    classes = np.unique(labels[train])
    per_class = max(1, max_images // len(classes))
    return np.sort(np.concatenate([train[labels[train] == c][:per_class] for c in classes]))


def log_logme_scores(
    cfg: SweepConfig, target: TargetConfig, dataset: Dataset, splits: Splits, tracker, weights: dict, log
) -> dict:
    """LogME of every candidate backbone on this target, from frozen features, before any training."""
    assert cfg.quadrants is not None  # this module runs only quadrant sweeps (sweep.py checks)
    from harness.transferability import logme_of_backbone

    scores = {}
    names = backbone_candidates(cfg.search)
    for backbone in names:
        tags = {"target": target.name, "backbone": backbone}
        done = tracker.find_child("logme", tags)
        if done is not None and "logme" in done.metrics:
            scores[backbone] = done.metrics["logme"]
            continue
        started = time.perf_counter()
        idx = logme_indices(dataset.labels, splits.train, cfg.quadrants.logme_max_images)
        score = logme_of_backbone(
            backbone, target.data.image_size, cfg.model.backbone_options.get(backbone, {}), weights.get(backbone), dataset, idx
        )
        run_id = tracker.start_child(
            f"logme {target.name} {backbone}", "logme", {**tags, "size": target.size, "similarity": target.similarity}
        )
        tracker.log_metrics(run_id, {"logme": score, "images": len(idx), "wall_seconds": time.perf_counter() - started})
        tracker.end_run(run_id, "FINISHED")
        scores[backbone] = score
        log(f"LogME {target.name} / {backbone}: {score:.4f} ({len(idx)} images)")
    return scores

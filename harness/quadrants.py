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

import dataclasses
import sys
import time
from dataclasses import dataclass, field
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
    study = dataclasses.replace(
        cfg.study,
        name=f"{cfg.study.name}.{cell_name(target, strategy)}",
        n_trials=cfg.quadrants.trials_per_cell,
        storage=st.storage_url(cfg),  # every cell's study lives in the sweep's one storage
    )
    return dataclasses.replace(cfg, study=study, data=target.data, search=strategy_search(strategy, cfg.search, cfg.quadrants))


@dataclass(frozen=True)
class Sweep:
    """The quadrant sweep every cell belongs to: its config and setup (stores, weights, trial
    processes, log), the clock its progress lines count from, and each confirmed cell's result."""

    cfg: SweepConfig  # the sweep's config; a cell's own is Cell.cfg
    setup: SweepSetup
    started: float  # time.monotonic() when the cells began
    scores: dict[str, tuple[float, float]] = field(default_factory=dict)  # cell name -> (best val, test mean)


@dataclass(frozen=True)
class Cell:
    """One (target, strategy) cell: its config, data, search study, MLflow run and trial context."""

    sweep: Sweep
    target: TargetConfig
    strategy: str
    cfg: SweepConfig  # the cell's config (`cell_config`): the target's data, the strategy's space
    dataset: Dataset
    splits: Splits
    study: optuna.Study  # the cell's search study
    run_id: str  # the cell's MLflow run: its trials and seeds are nested under it
    context: Context  # what a trial process loads to run the cell's trials and seeds

    @property
    def name(self) -> str:
        return cell_name(self.target, self.strategy)

    @property
    def tags(self) -> dict:
        return _cell_tags(self.target, self.strategy)


def run_quadrants(cfg: SweepConfig, targets, setup: SweepSetup) -> dict:
    """Every cell's search, then its confirmation seeds, spread over the engine's trial processes
    (and over every sweep process sharing a server storage); then the report. `targets`: each
    target with its dataset and splits (harness/preflight.py `load_targets`)."""
    tracker, log = setup.tracker, setup.log
    assert cfg.quadrants is not None  # this module runs only quadrant sweeps (sweep.py checks)
    strategies = cfg.quadrants.strategies
    n_cells = len(targets) * len(strategies)
    log(
        f"quadrant sweep {cfg.study.name}: {len(targets)} target(s) x {len(strategies)} strategies = {n_cells} cells, "
        f"{cfg.quadrants.trials_per_cell} trial(s) each, then {cfg.quadrants.confirm_seeds} confirmation seed(s)"
    )
    sweep = Sweep(cfg, setup, started=time.monotonic())
    jobs = []
    if setup.exclusive:  # LogME runs a killed sweep left RUNNING (the lock proves no process owns them)
        tracker.end_orphaned_runs(("logme",))
    for i, (target, dataset, splits) in enumerate(targets):
        if cfg.quadrants.logme:
            with st.claim_lock(setup.storage, f"{cfg.study.name}:logme:{target.name}"):
                log_logme_scores(sweep, target, dataset, splits)
        for j, strategy in enumerate(strategies):
            cell = open_cell(sweep, target, strategy, dataset, splits)
            jobs.append(cell_job(cell, f"cell {i * len(strategies) + j + 1}/{n_cells} {cell.name}"))
    setup.engine.run(jobs)
    from harness.report import build_report

    log("writing the comparison report")
    paths = build_report(cfg.study.name, tracker, log=log)
    return {"cells": sweep.scores, "report": paths}


def open_cell(sweep: Sweep, target: TargetConfig, strategy: str, dataset: Dataset, splits: Splits) -> Cell:
    """The cell's study and run, created by the first sweep process and found by the others (and on
    resume, with what a killed sweep left running closed first)."""
    cell_cfg, setup = cell_config(sweep.cfg, target, strategy), sweep.setup
    with st.claim_lock(setup.storage, cell_cfg.study.name):  # sweep processes started together: one cell run
        study = st.open_study(cell_cfg, setup.storage, reseed=not setup.exclusive)
        if not study.trials:  # a new cell: every candidate backbone gets a trial before the sampler chooses
            for backbone in backbones_to_try(cell_cfg):
                study.enqueue_trial({"backbone": backbone})
        run_id = study.user_attrs.get("mlflow_cell_run_id") or _open_cell_run(sweep, target, strategy, cell_cfg)
        study.set_user_attr("mlflow_cell_run_id", run_id)
    recover_after_crash(
        study, setup.tracker, setup.exclusive, setup.log, parent_id=run_id, owned_roles=("confirm", "backbone_confirm")
    )
    inputs = tuple(dataset_inputs(dataset, cell_cfg.data, splits))
    context = Context(cell_cfg.study.name, cell_cfg, dataset, splits, setup.tracker, setup.weights, inputs)
    return Cell(sweep, target, strategy, cell_cfg, dataset, splits, study, run_id, context)


def cell_job(cell: Cell, prefix: str) -> Job:
    """The search job of one cell; once its study is full, the cell's confirmation jobs follow."""
    best = st.best_trial(cell.study)
    progress = Progress(
        cell.cfg.study.n_trials,
        st.finished_count(cell.study),
        cell.cfg.study.direction,
        cell.cfg.study.metric,
        sys.stderr,
        prefix,
        best=best.value if best else None,
        started=cell.sweep.started,
    )
    return trial_job(
        cell.cfg,
        cell.study,
        cell.context,
        cell.sweep.setup.tracker,
        parent_run_id=cell.run_id,
        extra_tags=cell.tags,
        progress=progress,
        on_done=lambda: jobs_after_search(cell),
    )


def jobs_after_search(cell: Cell) -> list[Job]:
    """Once the cell's search is full: the confirmation of its best configuration and, for LogME's
    ground truth, of each other backbone's best (none when no trial completed)."""
    sweep, setup = cell.sweep, cell.sweep.setup
    best = st.best_trial(cell.study)
    if best is None:
        setup.log(f"{cell.name}: no completed trial; nothing to confirm")
        setup.tracker.end_run(cell.run_id, "FAILED")
        return []
    assert best.value is not None  # the best trial is a COMPLETE one: it has a value
    setup.tracker.log_metrics(cell.run_id, {"best_val": best.value, "best_trial": best.number})
    fixed = {n: p.value for n, p in cell.cfg.search.items() if p.fixed}
    params = {**fixed, **best.params}
    jobs = [confirm_job(cell, params, best.value)]
    assert sweep.cfg.quadrants is not None  # the cell of a quadrant sweep
    if sweep.cfg.quadrants.logme and cell.strategy != "scratch":
        # LogME ranks backbones, so each backbone needs a confirmed test score of its own on
        # this target, not only the cell's winner: its best trial, retrained with the same seeds.
        for backbone, trial in best_trial_per_backbone(cell.study, cell.cfg.study.direction).items():
            if backbone != params.get("backbone"):
                jobs.append(confirm_job(cell, {**fixed, **trial.params}, cast(float, trial.value), backbone_check=backbone))
    return jobs


def backbones_to_try(cell_cfg: SweepConfig) -> list[str]:
    """The backbones a new cell tries first, one trial each: every candidate when the search
    chooses among several (as many as the cell's budget allows), so no backbone goes untried
    because the sampler's first draws missed it."""
    choices = backbone_candidates(cell_cfg.search)
    return choices[: cell_cfg.study.n_trials] if len(choices) >= 2 else []


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


def confirm_job(cell: Cell, params: dict, best_value: float, backbone_check: str | None = None) -> Job:
    """Retrain the cell's best configuration once per seed and test each model once.

    The seeds are the trials of a study of their own (`<cell study>.confirm`), so the engine's
    exact budget makes each seed run exactly once, across processes and machines, and a seed
    whose process died runs again.

    `backbone_check`: instead, retrain the best trial of that (not winning) backbone, for LogME's
    ground truth; its runs (role `backbone_confirm`) log no model and do not count as the cell's."""
    assert cell.cfg.quadrants is not None  # a cell's config keeps the sweep's quadrants section
    seeds = cell.cfg.quadrants.confirm_seeds
    suffix = f"confirm.{backbone_check}" if backbone_check else "confirm"
    study = st.open_seed_study(f"{cell.cfg.study.name}.{suffix}", cell.sweep.setup.storage)
    # A seed a killed sweep left RUNNING would hold its place in the budget for ever: it fails and
    # runs again (its MLflow run was closed when the cell resumed).
    st.fail_orphaned_trials(study, cell.sweep.setup.exclusive)
    # Seeds show progress as trials do (a from-scratch seed trains for minutes); the value is the seed's test score.
    progress = Progress(seeds, st.finished_count(study), "maximize", "test_accuracy", sys.stderr, f"{cell.name} {suffix}")
    confirmation = Confirmation(cell, params, best_value, backbone_check, seeds, study, progress)
    return Job(
        f"{cell.name} {suffix}",
        study,
        seeds,
        cell.context,
        confirmation.prepare,
        before_ask=confirmation.next_seed,
        on_done=confirmation.confirmed,
        parent_run_id=cell.run_id,
        progress=progress,
    )


@dataclass(frozen=True)
class Confirmation:
    """One configuration of a cell, retrained once per seed: the seed study's trials are the seeds."""

    cell: Cell
    params: dict  # the configuration: the best trial's parameters and the fixed ones
    best_value: float  # its search score
    backbone_check: str | None  # LogME's ground truth for this (not winning) backbone; None: the cell's winner
    seeds: int
    study: optuna.Study
    progress: Progress

    def next_seed(self, study: optuna.Study) -> None:
        """Queue the lowest seed not yet done or running, unless one is queued already."""
        trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return  # study.ask() takes the queued one
        taken = {_seed_of(t) for t in trials if t.state in (TrialState.COMPLETE, TrialState.RUNNING)}
        missing = [s for s in range(self.seeds) if s not in taken]
        if missing:
            study.enqueue_trial({"seed": missing[0]})

    def prepare(self, trial: optuna.Trial, worker_id: str) -> ConfirmTask:
        """The seed's MLflow run, under the cell's, and the task that trains and tests it."""
        cell, tracker, check = self.cell, self.cell.sweep.setup.tracker, self.backbone_check
        seed = trial.suggest_int("seed", 0, self.seeds - 1)
        label = f"{check} seed {seed}" if check else f"seed {seed}"
        run_id = tracker.start_child(
            f"confirm {label}",
            "backbone_confirm" if check else "confirm",
            {**cell.tags, "harness.seed": seed, RULE_TAG: training_rule(cell.cfg)},
            config=cell.cfg.resolved(self.params, 0, seed=seed),
            parent_id=cell.run_id,
        )
        tracker.log_datasets(run_id, cell.context.inputs)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("worker", worker_id)
        tracker.log_params(run_id, {**self.params, "seed": seed})
        self.progress.trial_started(trial.number, {"seed": seed})
        if check:
            return ConfirmTask(cell.context.key, self.params, seed, run_id, keep_model=False, number=trial.number)
        leader = _best_confirm_run(cell)
        leader_val = leader.metrics["best_val"] if leader else None
        return ConfirmTask(cell.context.key, self.params, seed, run_id, leader_val, number=trial.number)

    def confirmed(self) -> list[Job]:
        """Every seed has run: the cell's test score over seeds, its best model registered, its run ended."""
        cell, setup = self.cell, self.cell.sweep.setup
        # A COMPLETE trial of a single-objective study always has a value.
        tests = [cast(float, t.value) for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if self.backbone_check:
            setup.log(
                f"{cell.name} / {self.backbone_check}: test {np.mean(tests):.4f} over {len(tests)} seed(s) (LogME's ground truth)"
            )
            return []
        setup.tracker.log_metrics(
            cell.run_id, {"test_mean": float(np.mean(tests)), "test_std": float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0}
        )
        with st.claim_lock(setup.storage, f"{cell.cfg.study.name}:register"):
            register_cell_model(cell)
        setup.tracker.end_run(cell.run_id, "FINISHED")
        cell.sweep.scores[cell.name] = (self.best_value, float(np.mean(tests)))
        setup.log(f"{cell.name}: best val {self.best_value:.4f}; test {np.mean(tests):.4f} over {len(tests)} seed(s)")
        return []


def _best_confirm_run(cell: Cell) -> RunRecord | None:
    """The cell's finished confirmation run with the best validation score that logged its model."""
    runs = cell.sweep.setup.tracker.find_runs(role="confirm", parent=cell.run_id, status="FINISHED")
    runs = [r for r in runs if MODEL_URI_TAG in r.tags and "best_val" in r.metrics]
    if not runs:
        return None
    return best_of(runs, cell.cfg.study.direction, key=lambda r: r.metrics["best_val"])


def register_cell_model(cell: Cell) -> None:
    """Register the cell's best confirmed model (chosen on validation, like everything else) as a
    version of the registered model named after the cell's study, `<sweep>.<target>.<strategy>`."""
    tracker, model_name = cell.sweep.setup.tracker, cell.cfg.study.name
    best = _best_confirm_run(cell)
    if best is None or tracker.run_tags(cell.run_id).get(REGISTERED_TAG):
        return
    seed = best.tags.get("harness.seed")
    version = tracker.register_model(
        best.tags[MODEL_URI_TAG],
        model_name,
        best.run_id,
        tags={
            **cell.tags,
            "harness.seed": seed,
            "best_val": f"{best.metrics['best_val']:.6g}",
            "test_accuracy": f"{best.metrics.get('test_accuracy', float('nan')):.6g}",
        },
        description=f"best confirmed model of cell {model_name} (seed {seed}, chosen on validation)",
    )
    tracker.set_tags(cell.run_id, {REGISTERED_TAG: version, "harness.registered_model": f"models:/{model_name}/{version}"})
    cell.sweep.setup.log(f"{model_name}: registered the best confirmed model (seed {seed}) as version {version}")


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


def _open_cell_run(sweep: Sweep, target: TargetConfig, strategy: str, cell_cfg: SweepConfig) -> str:
    """The cell's run, reopened when the sweep resumes."""
    assert sweep.cfg.quadrants is not None  # this module runs only quadrant sweeps (sweep.py checks)
    tracker = sweep.setup.tracker
    existing = tracker.find_child("cell", {CELL_TAG: cell_name(target, strategy)})
    if existing is not None:
        tracker.reopen_run(existing.run_id)
        return existing.run_id
    run_id = tracker.start_child(
        f"cell {cell_name(target, strategy)}", "cell", _cell_tags(target, strategy), config=cell_cfg.to_dict()
    )
    tracker.log_params(
        run_id,
        {
            "trials_per_cell": sweep.cfg.quadrants.trials_per_cell,
            "confirm_seeds": sweep.cfg.quadrants.confirm_seeds,
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


def log_logme_scores(sweep: Sweep, target: TargetConfig, dataset: Dataset, splits: Splits) -> dict:
    """LogME of every candidate backbone on this target, from frozen features, before any training."""
    cfg, tracker, weights, log = sweep.cfg, sweep.setup.tracker, sweep.setup.weights, sweep.setup.log
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

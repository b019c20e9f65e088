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
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
import optuna
from optuna.trial import TrialState

from harness import study as st
from harness.config import BaselineConfig, SweepConfig, TargetConfig, TrainConfig
from harness.data import Dataset, Splits, dataset_inputs, load_dataset, make_splits, tf_dataset
from harness.baseline import print_note, scratch_budget
from harness.phases import Phase
from harness.progress import Progress
from harness.strategies import strategy_search
from harness.tracking import MODEL_URI_TAG, REGISTERED_TAG
from harness.trials import Context, Job, recover, recover_orphans, trial_job

CELL_TAG = "harness.cell"
RULE_TAG = "harness.training_rule"  # how a confirmation seed was trained: cells compare only under one rule


def training_rule(ccfg: SweepConfig) -> str:
    """The training rule every confirmation seed follows, whatever its strategy, in words (pure).
    Cells trained under different rules (records of older sweeps, which trained transfer seeds on
    the search's epoch budget) differ in schedule as well as strategy, so the report does not call
    a winner between them (harness/export.py).

        >>> training_rule(cfg)
        'to convergence: at least 3000 optimizer steps in all and 30 epochs, then early stopping once val_loss and
        val_accuracy stall for 8 epochs; a transfer model's head phase (10 epochs, patience 4) counts toward them;
        from scratch, up to 2 retries at the next learning rate when unfitted'
    """
    b, head = ccfg.baseline, ccfg.train.head
    stop = "no early stopping" if b.patience is None else (
        f"then early stopping once val_loss and {ccfg.study.metric} stall for {b.patience} epochs")
    return (f"to convergence: at least {b.min_steps} optimizer steps in all and {b.epochs} epochs, {stop}; "
            f"a transfer model's head phase ({head.epochs} epochs, patience {head.patience or 'off'}) counts toward them; "
            f"from scratch, up to {b.retries} retries at the next learning rate when unfitted")


def confirmation_plan(plan: list[Phase], train_images: int, train: TrainConfig, baseline: BaselineConfig) -> list[Phase]:
    """A transfer strategy's search plan, turned into its confirmation plan (pure): the rule
    scratch seeds train under (`training_rule`), so a verdict compares strategies, not schedules.

    The phases before the last keep their schedule (the head phase trains the new head before
    anything unfreezes); their planned steps count toward `baseline.min_steps`. The last phase
    (fine-tune, or the only phase of a frozen-features strategy) covers the rest of the floor and
    at least the rest of `baseline.epochs`, budgeted as a from-scratch run is (`scratch_budget`:
    steps between validations, validations, patience in validations), and stops as one does
    (`scratch_keeps_training`: never before the floor, then once neither the validation loss nor
    the metric improves)."""
    phases = [p for p in plan if p.epochs > 0]
    if not phases:  # every phase configured off: nothing trains in the search either
        return plan
    *before, last = phases
    batch = {"head": train.head.batch_size, "finetune": train.finetune.batch_size}
    steps_before = sum(p.epochs * math.ceil(train_images / batch[p.name]) for p in before)
    epochs_left = max(last.epochs, baseline.epochs - sum(p.epochs for p in before))
    budget = scratch_budget(train_images, batch[last.name], epochs_left, max(0, baseline.min_steps - steps_before),
                            baseline.patience)
    one_pass = math.ceil(train_images / batch[last.name])
    return [*before, dataclasses.replace(
        last, epochs=budget.rounds, patience=budget.patience, min_epochs=budget.min_rounds, stall_stopping=True,
        steps_per_epoch=None if budget.steps_per_round == one_pass else budget.steps_per_round)]


def images_seen(plan: list[Phase], epochs_run: list[int], train_images: int, train: TrainConfig) -> int:
    """Training images a plan's phases went through, given how many epochs each ran (pure): an
    epoch is one pass over the training set, or `steps_per_epoch` batches where the phase sets it."""
    batch = {"head": train.head.batch_size, "finetune": train.finetune.batch_size}
    return sum(ran * (p.steps_per_epoch * batch[p.name] if p.steps_per_epoch else train_images)
               for p, ran in zip([p for p in plan if p.epochs > 0], epochs_run))


def load_targets(cfg: SweepConfig, log) -> list[tuple[TargetConfig, Dataset, Splits]]:
    """Load and split every target up front, so a bad dataset stops the sweep before it starts."""
    out = []
    for target in cfg.quadrants.targets:
        dataset = load_dataset(target.data)
        splits = make_splits(dataset.labels, target.data, dataset.official)
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


def run_quadrants(cfg: SweepConfig, targets, storage, tracker, weights: dict, engine, exclusive: bool, log) -> dict:
    """Every cell's search, then its confirmation seeds, spread over the engine's trial processes
    (and over every sweep process sharing a server storage); then the report."""
    q = cfg.quadrants
    n_cells = len(targets) * len(q.strategies)
    log(f"quadrant sweep {cfg.study.name}: {len(targets)} target(s) x {len(q.strategies)} strategies = {n_cells} cells, "
        f"{q.trials_per_cell} trial(s) each, then {q.confirm_seeds} confirmation seed(s)")
    started = time.monotonic()
    scores: dict[str, tuple[float, float]] = {}
    jobs = []
    if exclusive:  # LogME runs a killed sweep left RUNNING (the lock proves no process owns them)
        tracker.close_orphans(("logme",))
    for i, (target, dataset, splits) in enumerate(targets):
        if q.logme:
            with st.claim_lock(storage, f"{cfg.study.name}:logme:{target.name}"):
                log_logme_scores(cfg, target, dataset, splits, tracker, weights, log)
        for j, strategy in enumerate(q.strategies):
            prefix = f"cell {i * len(q.strategies) + j + 1}/{n_cells} {cell_name(target, strategy)}"
            jobs.append(cell_job(cfg, target, strategy, dataset, splits, storage, tracker, weights, exclusive, log,
                                 started, prefix, scores))
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
    recover(study, tracker, exclusive, log, parent_id=cell_run, owned_roles=("confirm", "backbone_confirm"))
    context = Context(ccfg.study.name, ccfg, dataset, splits, tracker, weights, tuple(dataset_inputs(dataset, ccfg.data, splits)))
    best = st.best_trial(study)
    progress = Progress(ccfg.study.n_trials, st.finished_count(study), ccfg.study.direction, ccfg.study.metric, sys.stderr,
                        prefix, best=best.value if best else None, started=started)

    def searched() -> list[Job]:
        best = st.best_trial(study)
        if best is None:
            log(f"{name}: no completed trial; nothing to confirm")
            tracker.end_run(cell_run, "FAILED")
            return []
        tracker.log_metrics(cell_run, {"best_val": best.value, "best_trial": best.number})
        fixed = {n: p.value for n, p in ccfg.search.items() if p.fixed}
        params = {**fixed, **best.params}
        jobs = [confirm_job(ccfg, params, best.value, storage, tracker, context, cell_run, _cell_tags(target, strategy),
                            log, name, scores, exclusive=exclusive)]
        if cfg.quadrants.logme and strategy != "scratch":
            # LogME ranks backbones, so each backbone needs a confirmed test score of its own on
            # this target, not only the cell's winner: its best trial, retrained with the same seeds.
            for backbone, trial in best_trial_per_backbone(study, ccfg.study.direction).items():
                if backbone != params.get("backbone"):
                    jobs.append(confirm_job(ccfg, {**fixed, **trial.params}, trial.value, storage, tracker, context,
                                            cell_run, _cell_tags(target, strategy), log, name, scores, backbone_check=backbone,
                                            exclusive=exclusive))
        return jobs

    return trial_job(ccfg, study, context, tracker, parent_run_id=cell_run, extra_tags=_cell_tags(target, strategy),
                     name=name, progress=progress, on_done=searched)


def backbones_to_try(ccfg: SweepConfig) -> list[str]:
    """The backbones a new cell tries first, one trial each: every candidate when the search
    chooses among several (as many as the cell's budget allows), so no backbone goes untried
    because the sampler's first draws missed it."""
    choices = list(ccfg.search["backbone"].choices or ())
    return choices[:ccfg.study.n_trials] if len(choices) >= 2 else []


def best_trial_per_backbone(study, direction: str) -> dict:
    """backbone -> that backbone's best completed trial in the study."""
    best = {}
    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        backbone = trial.params.get("backbone")
        if backbone is None:
            continue
        held = best.get(backbone)
        if held is None or (trial.value > held.value if direction == "maximize" else trial.value < held.value):
            best[backbone] = trial
    return best


def confirm_job(ccfg: SweepConfig, params: dict, best_value: float, storage, tracker, context: Context, cell_run: str,
                tags: dict, log, name: str, scores: dict, backbone_check: str | None = None, exclusive: bool = True) -> Job:
    """Retrain the cell's best configuration once per seed and test each model once.

    The seeds are the trials of a study of their own (`<cell study>.confirm`), so the engine's
    exact budget makes each seed run exactly once, across processes and machines, and a seed
    whose process died runs again.

    `backbone_check`: instead, retrain the best trial of that (not winning) backbone, for LogME's
    ground truth; its runs (role `backbone_confirm`) log no model and do not count as the cell's."""
    seeds = ccfg.quadrants.confirm_seeds
    suffix = f"confirm.{backbone_check}" if backbone_check else "confirm"
    role = "backbone_confirm" if backbone_check else "confirm"
    study = optuna.create_study(study_name=f"{ccfg.study.name}.{suffix}", storage=storage, direction="maximize",
                                load_if_exists=True, sampler=optuna.samplers.RandomSampler(seed=0))
    # A seed a killed sweep left RUNNING would hold its place in the budget for ever: it fails and
    # runs again (its MLflow run was closed when the cell resumed).
    recover_orphans(study, exclusive)
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
        run_id = tracker.start_child(f"confirm {label}", role,
                                     {**tags, "harness.seed": seed, RULE_TAG: training_rule(ccfg)},
                                     config=ccfg.resolved(params, 0, seed=seed), parent_id=cell_run)
        tracker.log_datasets(run_id, context.inputs)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("worker", worker_id)
        tracker.log_params(run_id, {**params, "seed": seed})
        progress.trial_started(trial.number, {"seed": seed})
        if backbone_check:
            return ConfirmTask(context.key, params, seed, run_id, keep_model=False, number=trial.number)
        leader = _best_confirm_run(tracker, cell_run, ccfg.study.metric, ccfg.study.direction)
        return ConfirmTask(context.key, params, seed, run_id, leader.data.metrics["best_val"] if leader else None,
                           number=trial.number)

    def confirmed() -> list[Job]:
        tests = [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
        if backbone_check:
            log(f"{name} / {backbone_check}: test {np.mean(tests):.4f} over {len(tests)} seed(s) (LogME's ground truth)")
            return []
        tracker.log_metrics(cell_run, {"test_mean": float(np.mean(tests)),
                                       "test_std": float(np.std(tests, ddof=1)) if len(tests) > 1 else 0.0})
        with st.claim_lock(storage, f"{ccfg.study.name}:register"):
            register_cell_model(tracker, ccfg, cell_run, tags, log)
        tracker.end_run(cell_run, "FINISHED")
        scores[name] = (best_value, float(np.mean(tests)))
        log(f"{name}: best val {best_value:.4f}; test {np.mean(tests):.4f} over {len(tests)} seed(s)")
        return []

    return Job(f"{name} {suffix}", study, seeds, context, prepare, before_ask=next_seed, on_done=confirmed,
               parent_run_id=cell_run, progress=progress)


def _best_confirm_run(tracker, cell_run: str, metric: str, direction: str):
    """The cell's finished confirmation run with the best validation score that logged its model."""
    runs = tracker.search_runs(f"tags.`mlflow.parentRunId` = '{cell_run}' and tags.`harness.role` = 'confirm' "
                               f"and attributes.status = 'FINISHED'")
    runs = [r for r in runs if MODEL_URI_TAG in r.data.tags and "best_val" in r.data.metrics]
    if not runs:
        return None
    pick = max if direction == "maximize" else min
    return pick(runs, key=lambda r: r.data.metrics["best_val"])


def register_cell_model(tracker, ccfg: SweepConfig, cell_run: str, tags: dict, log) -> None:
    """Register the cell's best confirmed model (chosen on validation, like everything else) as a
    version of the registered model named after the cell's study, `<sweep>.<target>.<strategy>`."""
    best = _best_confirm_run(tracker, cell_run, ccfg.study.metric, ccfg.study.direction)
    if best is None or tracker.run_tags(cell_run).get(REGISTERED_TAG):
        return
    seed = best.data.tags.get("harness.seed")
    version = tracker.register_model(
        best.data.tags[MODEL_URI_TAG], ccfg.study.name, best.info.run_id,
        tags={**tags, "harness.seed": seed, "best_val": f"{best.data.metrics['best_val']:.6g}",
              "test_accuracy": f"{best.data.metrics.get('test_accuracy', float('nan')):.6g}"},
        description=f"best confirmed model of cell {ccfg.study.name} (seed {seed}, chosen on validation)")
    tracker.set_tags(cell_run, {REGISTERED_TAG: version, "harness.registered_model": f"models:/{ccfg.study.name}/{version}"})
    log(f"{ccfg.study.name}: registered the best confirmed model (seed {seed}) as version {version}")


def _seed_of(trial) -> int | None:
    """A confirmation trial's seed: its parameter, or the one queued for it before it sampled."""
    return trial.params.get("seed", trial.system_attrs.get("fixed_params", {}).get("seed"))


@dataclass(frozen=True)
class ConfirmTask:
    """Retrain a cell's best configuration with one seed in a trial process; test it once."""

    context_key: str
    params: dict
    seed: int
    run_id: str
    leader: float | None = None  # the best validation score of the cell's confirmed seeds so far
    keep_model: bool = True  # log the model when it leads (a backbone check never does)
    number: int = 0  # its trial in the confirmation study (the number its progress lines show)
    context: Context | None = None

    def run(self, runner, channel) -> tuple[str, float]:
        return "complete", confirm_seed(runner, self.params, self.seed, self.run_id, self.leader, self.keep_model,
                                        channel.note, self.number)


def _cell_tags(target: TargetConfig, strategy: str) -> dict:
    return {"target": target.name, "size": target.size, "similarity": target.similarity,
            "quadrant": f"{target.size}-{target.similarity}", "strategy": strategy, CELL_TAG: cell_name(target, strategy)}


def _open_cell_run(tracker, cfg, target, strategy, ccfg) -> str:
    """The cell's run, reopened when the sweep resumes."""
    existing = tracker.find_child("cell", {CELL_TAG: cell_name(target, strategy)})
    if existing is not None:
        tracker.reopen_run(existing.info.run_id)
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


def confirm_seed(runner, params: dict, seed: int, run_id: str, leader: float | None = None,
                 keep_model: bool = True, note=print_note, number: int = 0) -> float:
    """Train the configuration with `seed` into the run `run_id`; returns its test accuracy.

    The model keeps the best epoch's weights across both phases (the ones its validation score
    came from), and is logged when it matches or beats the cell's best confirmed seed so far.
    Each epoch goes to `note(("epoch", summary))`, as a trial's does, numbered `number`."""
    from harness.baseline import train_from_scratch
    from harness.model import build_model
    from harness.objective import (leads, log_history, model_spec, plan_for, release_memory, run_plan, seed_everything,
                                   train_class_weights)

    ccfg, dataset, splits, tracker = runner.cfg, runner.dataset, runner.splits, runner.tracker
    started = time.perf_counter()
    def on_epoch(record):
        tracker.log_metrics(run_id, record.metrics, step=record.epoch)

    try:
        if params.get("strategy") == "scratch":
            # Confirmed as the sweep's baseline is trained: to convergence, not on the search's
            # equal budget (the search's best_val stays the equal-budget figure).
            tm, history, facts = train_from_scratch(runner, params, seed, run_id, on_epoch, f"seed {seed}", note, number)
            seen = facts["steps_all_attempts"] * ccfg.train.head.batch_size  # retries cost too
            seconds = facts["seconds_all_attempts"]
        else:
            seed_everything(seed)  # before the pipelines: their shuffle seeds come from the global seed
            tm = build_model(model_spec(ccfg, params, dataset.num_classes, runner.weights.get(params["backbone"])), seed=seed)
            # Trained to convergence under the scratch seeds' floor and stopping rule, not on the
            # search's epoch budget (the search's best_val stays the equal-budget figure).
            plan = confirmation_plan(plan_for(ccfg, params, len(tm.blocks)), len(splits.train), ccfg.train, ccfg.baseline)
            total_epochs = sum(p.epochs for p in plan)

            def on_transfer_epoch(record):
                on_epoch(record)
                note(("epoch", {"number": number, "epoch": record.epoch, "phase": record.phase,
                                "metrics": dict(record.metrics), "total_epochs": total_epochs}))

            def pipelines(batch_size):
                return (tf_dataset(dataset, splits.train, batch_size, shuffle=True, seed=seed),
                        tf_dataset(dataset, splits.val, batch_size, shuffle=False))

            history = run_plan(ccfg, tm, plan, pipelines, on_epoch=on_transfer_epoch,
                               class_weight=train_class_weights(ccfg, dataset, splits), features=runner.features, seed=seed,
                               on_features=lambda phase, seconds: tracker.log_metrics(run_id, {f"{phase}/feature_seconds": seconds}))
            seen = images_seen(plan, [p.epochs_run for p in history.phases], len(splits.train), ccfg.train)
            seconds = sum(p.seconds for p in history.phases)
        # What the cell's compute was: the report's cost columns (seconds on this process's device:
        # GPU-seconds on a GPU box, where each trial process has one GPU).
        tracker.log_metrics(run_id, {"cost/images_seen": seen, "cost/epochs": seen / len(splits.train),
                                     "cost/seconds": seconds})
        test = evaluate_on_test(tm, dataset, splits, ccfg.train.head.batch_size)
        log_history(tracker, run_id, history)
        best_val = history.best(ccfg.study.metric, ccfg.study.direction)
        if keep_model and leads(best_val, leader, ccfg.study.direction):
            tracker.log_keras_model(run_id, tm.model, dataset.class_names, ccfg.data.image_size,
                                    tags={"harness.study": ccfg.study.name, "harness.seed": seed})
    except BaseException as exc:
        tracker.log_failure(run_id, exc)
        tracker.end_run(run_id, "FAILED" if isinstance(exc, Exception) else "KILLED")
        raise
    finally:
        release_memory()
    tracker.log_metrics(run_id, {"test_accuracy": test["accuracy"], "test_loss": test["loss"], "best_val": best_val,
                                 f"best_{ccfg.study.metric}": best_val, "wall_seconds": time.perf_counter() - started})
    tracker.end_run(run_id, "FINISHED")
    return test["accuracy"]


# --- LogME -----------------------------------------------------------------------------------


def logme_indices(labels: np.ndarray, train: np.ndarray, max_images: int) -> np.ndarray:
    """Up to `max_images` training indices, the same share from every class."""
    classes = np.unique(labels[train])
    per_class = max(1, max_images // len(classes))
    return np.sort(np.concatenate([train[labels[train] == c][:per_class] for c in classes]))


def log_logme_scores(cfg: SweepConfig, target: TargetConfig, dataset: Dataset, splits: Splits, tracker, weights: dict, log) -> dict:
    """LogME of every candidate backbone on this target, from frozen features, before any training."""
    from harness.features import pooled_features
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
        score = logme(pooled_features(tm, dataset, idx), dataset.labels[idx])
        del tm
        release_memory()
        run_id = tracker.start_child(f"logme {target.name} {backbone}", "logme",
                                     {**tags, "size": target.size, "similarity": target.similarity})
        tracker.log_metrics(run_id, {"logme": score, "images": len(idx), "wall_seconds": time.perf_counter() - started})
        tracker.end_run(run_id, "FINISHED")
        scores[backbone] = score
        log(f"LogME {target.name} / {backbone}: {score:.4f} ({len(idx)} images)")
    return scores

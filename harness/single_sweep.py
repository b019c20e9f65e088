"""One study's sweep: screening, the warm start and the two-phase search; then the winner
registered and tested, the from-scratch baseline, the summary and the parent run's description.

harness/sweep.py runs it once the preflight has passed and the stores are open (harness/stores.py);
harness/quadrants.py is the other flow, a comparison of strategies over several targets.

    >>> summary = run_single(cfg, dataset, splits, setup)
"""

from __future__ import annotations

import sys
from pathlib import Path

from harness import runtime
from harness import study as st
from harness.data import Dataset, Splits
from harness.stores import SweepSetup
from harness.tasks import Context


def run_single(cfg, dataset: Dataset, splits: Splits, setup: SweepSetup) -> dict:
    """The sweep of one study; returns its summary (also logged)."""
    study, context = _open_study(cfg, dataset, splits, setup)
    screening = _search(cfg, study, context, setup)
    runtime.check_stop()
    winner, baseline = _deliver(cfg, study, context, setup)
    return _summarize(cfg, study, context, winner, baseline, screening, setup)


def _open_study(cfg, dataset: Dataset, splits: Splits, setup: SweepSetup):
    """The study, resumed where a killed sweep left it, and the context its trials run in."""
    from harness.data import dataset_inputs
    from harness.redaction import redact
    from harness.trials import recover_after_crash

    tracker = setup.tracker
    study = st.open_study(cfg, setup.storage, reseed=not setup.exclusive)
    study.set_user_attr("mlflow_parent_run_id", tracker.parent_run_id)
    study.set_user_attr("mlflow_tracking_uri", redact(tracker.uri))
    # A killed baseline's run ends KILLED.
    recover_after_crash(study, tracker, setup.exclusive, setup.log, owned_roles=("baseline",))
    parent = tracker.parent_run_id
    assert parent is not None  # open_stores started the parent run
    inputs = dataset_inputs(dataset, cfg.data, splits, with_test=True)  # hashed once: every trial run reuses them
    tracker.log_datasets(parent, inputs)
    trial_inputs = tuple(i for i in inputs if i["context"] != "test")  # no trial reads the test split
    return study, Context(cfg.study.name, cfg, dataset, splits, tracker, setup.weights, trial_inputs)


def _search(cfg, study, context: Context, setup: SweepSetup):
    """Screening, the warm start and the trials up to the budget; returns screening's result."""
    from harness.progress import Progress
    from harness.screening import screen_backbones
    from harness.trials import trial_job
    from harness.warmstart import describe_target, warm_start

    engine, tracker, log = setup.engine, setup.tracker, setup.log
    # Score the candidate backbones first; `search.screen.keep` narrows what the trials sample from.
    trial_cfg, screening = screen_backbones(cfg, study, setup.storage, tracker, lambda task: engine.call(context, task), log)
    # Describe the target on the parent run; study.warm_start: enqueue the nearest sweeps' best configurations.
    with st.claim_lock(setup.storage, f"{cfg.study.name}:warm-start"):
        target = describe_target(len(context.splits.train), context.dataset.num_classes, cfg.data.image_size, screening)
        warm_start(trial_cfg, study, tracker, target, log)
    n_done = st.finished_count(study)
    if n_done >= cfg.study.n_trials:
        log(f"study {cfg.study.name!r} already has {n_done} finished trial(s) (n_trials={cfg.study.n_trials}): nothing to run")
    else:
        log(f"study {cfg.study.name!r}: {n_done} finished, running up to {cfg.study.n_trials}")
        best = st.best_trial(study)
        progress = Progress(
            cfg.study.n_trials, n_done, cfg.study.direction, cfg.study.metric, sys.stderr, best=best.value if best else None
        )
        engine.run([trial_job(trial_cfg, study, context, tracker, progress=progress)])
    return screening


def _deliver(cfg, study, context: Context, setup: SweepSetup) -> tuple[dict | None, dict | None]:
    """The winner registered and tested, then the from-scratch baseline: (winner, baseline)."""
    from harness.baseline import run_scratch_baseline
    from harness.winner import deliver_winner

    def run_task(task, progress=None):
        return setup.engine.call(context, task, progress)

    # Sweep processes sharing a server storage finish together: one registers and tests the winner,
    # the others find it done.
    with st.claim_lock(setup.storage, f"{cfg.study.name}:winner"):
        winner = deliver_winner(cfg, study, setup.tracker, run_task, setup.log)
    runtime.check_stop()
    baseline = None
    if cfg.baseline.scratch and winner is not None:
        baseline = run_scratch_baseline(cfg, study, context.dataset.name, setup.tracker, setup.log, run_task)
    return winner, baseline


def _summarize(cfg, study, context: Context, winner, baseline, screening, setup: SweepSetup) -> dict:
    """What mattered, the summary, and the parent run's metrics, tags and description."""
    from harness.importance import log_what_mattered
    from harness.summary import summarize
    from harness.winner import description

    tracker, log = setup.tracker, setup.log
    parent = tracker.parent_run_id
    assert parent is not None  # open_stores started the parent run
    what_mattered = log_what_mattered(study, tracker, Path("results") / cfg.study.name, cfg.study.metric, log)
    val_labels = context.dataset.labels[context.splits.val]
    summary = summarize(cfg, study, val_labels, baseline, tracker, what_mattered=what_mattered, screening=screening)
    parent_metrics = {
        "test_accuracy": winner and winner["test_accuracy"],
        "scratch_test_accuracy": baseline and baseline.get("test_accuracy"),
        "scratch_train_accuracy": baseline and baseline.get("train_accuracy"),
    }
    if baseline:
        tracker.set_tags(parent, {"harness.baseline_undertrained": str(baseline.get("fitted") is False).lower()})
    tracker.log_metrics(parent, {k: v for k, v in parent_metrics.items() if v is not None})
    tracker.describe(parent, description(cfg, winner, baseline, summary["chance"], tracker))
    summary["winner"] = winner
    log(summary["text"] + _test_lines(winner, baseline))
    return summary


def _test_lines(winner: dict | None, baseline: dict | None) -> str:
    """The held-out test scores, read once each after the search: the summary's last word."""
    lines = []
    if winner and winner.get("test_accuracy") is not None:
        lines.append(f"winner (trial {winner['trial']}) on the held-out test split: accuracy {winner['test_accuracy']:.4f}")
    if baseline and baseline.get("test_accuracy") is not None and baseline.get("fitted") is not False:
        lines.append(f"from-scratch baseline on the held-out test split: accuracy {baseline['test_accuracy']:.4f}")
    if winner and winner.get("model_uri"):
        registered = winner["model_uri"].split("/")[1]
        lines.append(f"winning model: {winner['model_uri']}  (predict: python -m harness.predict {registered} FOLDER)")
    return "\n" + "\n".join(lines) if lines else ""

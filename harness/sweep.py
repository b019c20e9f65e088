"""`python -m harness.sweep [CONFIG]`: run (or resume) a transfer-learning sweep.

Order of work, so that bad input costs nothing:
  1. load and validate the config (no TensorFlow yet);
  2. preflight: load the dataset, check every image, resolve and test every backbone's weights;
  3. only then open the Optuna study and the MLflow parent run, and optimise;
  4. train the from-scratch baseline, print the summary and the command that opens the MLflow UI.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "sweeps/demo.yaml"
EXIT_CONFIG = 2  # bad input: nothing was created
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    def positive_int(text):
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value

    def positive_float(text):
        value = float(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return value

    p = argparse.ArgumentParser(
        prog="python -m harness.sweep",
        description="Run or resume an Optuna sweep of two-phase transfer learning, tracked in MLflow.",
    )
    p.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help=f"sweep YAML (default: {DEFAULT_CONFIG}, the offline demo)")
    p.add_argument("--n-trials", type=positive_int, help="finished (completed + pruned) trials to reach; overrides study.n_trials")
    p.add_argument("--timeout", type=positive_float, help="seconds after which no new trial starts; overrides study.timeout")
    p.add_argument("--study-name", help="Optuna study / MLflow experiment name; overrides study.name")
    p.add_argument("--storage", help="Optuna storage URL, e.g. postgresql://user:pw@127.0.0.1/db; overrides study.storage")
    p.add_argument("--tracking-uri", help="MLflow tracking URI; overrides tracking.uri and $MLFLOW_TRACKING_URI")
    p.add_argument("--seed", type=int, help="sampler seed; overrides study.seed")
    return p


class SweepRefused(Exception):
    """The sweep cannot start (lock held, weights unusable): message for the user, exit 2."""


@contextlib.contextmanager
def local_study_lock(cfg):
    """One process per study on the default SQLite storage.

    SQLite is not meant for parallel writers (Optuna's own advice); rather than risk 'database is
    locked' mid-trial, a second process is refused and told to use a server storage instead.
    Holding the lock also proves that any RUNNING trial in this storage is an orphan.
    """
    if cfg.study.storage is not None:
        yield False
        return
    from harness.study import default_storage_url

    url = default_storage_url(cfg.study.name)
    lock_path = Path(url.removeprefix("sqlite:///")).with_name("sweep.lock")
    handle = open(lock_path, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SweepRefused(
            f"study {cfg.study.name!r} is already running in another process on the local storage {url}. "
            "To run several workers on one study, give them a server storage: "
            "--storage postgresql://USER:PASSWORD@127.0.0.1/DBNAME"
        ) from None
    try:
        handle.write(str(os.getpid()))
        handle.flush()
        yield True
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _raise_interrupt(signum, frame):
    from harness.phases import stop_requested

    stop_requested.set()
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def resolve_weights(cfg, log) -> dict[str, str | None]:
    """Each candidate backbone's weights, checked by building the backbone once (fails fast)."""
    from harness import backbones as bb

    names = cfg.search["backbone"].choices or (cfg.search["backbone"].value,)
    size = cfg.quadrants.targets[0].data.image_size if cfg.quadrants else cfg.data.image_size
    resolved: dict[str, str | None] = {}
    for name in names:
        w = cfg.model.weights
        if w == "none":
            weights = None
        elif w == "source":
            from harness.pretrain import ensure_source_weights

            weights = str(ensure_source_weights(cfg, name, log=log))
        else:
            weights = w
        try:
            backbone = bb.construct(name, size, weights, cfg.model.backbone_options.get(name))
        except Exception as exc:  # noqa: BLE001 - any failure here means no trial could run
            if weights not in (None, "imagenet"):
                problem = f"weights file {weights} does not fit {name} with options {cfg.model.backbone_options.get(name, {})}"
            else:
                problem = f"cannot build {name} with weights {weights!r}"
            hint = " (ImageNet weights need internet the first time; offline use weights: source or a file)" if weights == "imagenet" else ""
            raise SweepRefused(f"model.weights: {problem}: {type(exc).__name__}: {str(exc)[:300]}{hint}") from None
        check_freeze_depth(cfg, name, len(bb.backbone_blocks(backbone, name)))
        resolved[name] = weights
    import keras

    keras.backend.clear_session()
    return resolved


def check_freeze_depth(cfg, name: str, n_blocks: int) -> None:
    """A freeze depth in blocks must exist in every candidate backbone."""
    spec = cfg.search.get("unfreeze_blocks")
    if spec is None:
        return
    deepest = max(v for v in (spec.value, spec.high, *(spec.choices or ())) if v is not None)
    if deepest > n_blocks:
        raise SweepRefused(
            f"search.unfreeze_blocks: {deepest} is impossible for {name}, which has {n_blocks} blocks "
            f"(use unfreeze_fraction to mean the same depth across backbones)"
        )


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up banner (oneDNN, CPU features, absl) silenced.

    Those lines are printed straight to file descriptor 2 before absl's logging is set up, so
    TF_CPP_MIN_LOG_LEVEL cannot hide them; an overnight log should start with the sweep's own
    lines. Python-level errors still surface: the descriptor is restored before they propagate.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _quiet_libraries() -> None:
    import logging
    import warnings

    import mlflow  # noqa: F401 - imported first: it configures its logger on import
    import optuna

    # Heartbeat and stale-trial retry are marked experimental by Optuna; they are used on purpose.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")
    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # Optuna would print a traceback per failed trial; the progress line and MLflow carry the reason.
    optuna.logging.set_verbosity(optuna.logging.ERROR)


@dataclass(frozen=True)
class TrialBatch:
    """Everything needed to run trials of one study, in this process or (pickled) in a child."""

    cfg: Any
    dataset: Any
    splits: Any
    tracker: Any
    weights: dict
    parent_run_id: str | None = None  # MLflow parent of the trial runs; None: the study's run
    extra_tags: dict = field(default_factory=dict)
    progress_prefix: str = ""
    started: float = field(default_factory=time.monotonic)  # the sweep's start, for elapsed time
    n_trials: int | None = None  # trials to run; None: until the study has its n_trials finished
    streak: int = 0  # failed trials in a row so far
    timeout: float | None = None
    sweep_process: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")  # who started it


def run_trial_batch(batch: TrialBatch) -> dict:
    """Run a batch of trials with Optuna; returns the failure streak and whether it stopped the study."""
    import optuna

    from harness import study as st
    from harness.objective import Objective, TrialFailed
    from harness.progress import Progress

    cfg = batch.cfg
    study = st.open_study(cfg, st.make_storage(st.storage_url(cfg)), reseed=batch.n_trials is not None)
    breaker = st.StopAfterFailures(cfg.study.max_consecutive_failures, batch.streak)
    if st.finished_count(study) >= cfg.study.n_trials:  # other workers finished the study meanwhile
        return {"streak": breaker.streak, "tripped": False}
    best = st.best_trial(study)
    progress = Progress(cfg.study.n_trials, st.finished_count(study), cfg.study.direction, cfg.study.metric, sys.stderr,
                        batch.progress_prefix, best=best.value if best else None, started=batch.started)
    objective = Objective(cfg, batch.dataset, batch.splits, batch.tracker, batch.weights.get, progress,
                          parent_run_id=batch.parent_run_id, extra_tags=batch.extra_tags, sweep_process=batch.sweep_process)

    def on_trial_end(s, t):
        best = st.best_trial(s)
        progress.trial_finished(t.number, t.state.name, t.value, best.value if best else None,
                                counted=t.state in st.FINISHED_STATES, reason=t.user_attrs.get("fail_reason"))

    study.optimize(
        objective,
        n_trials=batch.n_trials,
        timeout=batch.timeout,
        catch=(TrialFailed,),
        callbacks=[optuna.study.MaxTrialsCallback(cfg.study.n_trials, states=st.FINISHED_STATES), on_trial_end, breaker],
        gc_after_trial=True,
    )
    return {"streak": breaker.streak, "tripped": breaker.tripped}


def run_trials(cfg, study, batch: TrialBatch, exclusive: bool, log) -> None:
    """Optimise until `n_trials` finished (completed + pruned) trials exist, or the timeout.

    With `study.trials_per_process` > 0 (the default) trials run in child processes, one batch
    after another (see harness/worker.py for why). Raises SweepRefused when trials keep failing:
    an error that fails every trial must stop the sweep instead of being retried all night.
    """
    from harness import study as st

    n_done = st.finished_count(study)
    if n_done >= cfg.study.n_trials:
        log(f"study {cfg.study.name!r} already has {n_done} finished trial(s) (n_trials={cfg.study.n_trials}): nothing to run")
        return
    log(f"study {cfg.study.name!r}: {n_done} finished, running up to {cfg.study.n_trials}")
    if cfg.study.trials_per_process == 0:
        outcome = run_trial_batch(dataclasses.replace(batch, timeout=cfg.study.timeout))
    else:
        outcome = _run_trial_processes(cfg, study, batch, exclusive, log)
    if outcome["tripped"]:
        raise SweepRefused(f"{cfg.study.max_consecutive_failures} trials failed in a row; see the fail_reason of the last "
                           f"trials (optuna user attrs / MLflow tag harness.fail_reason)")


def _run_trial_processes(cfg, study, batch: TrialBatch, exclusive: bool, log) -> dict:
    from harness import study as st
    from harness.worker import ProcessDied, run_isolated

    deadline = None if cfg.study.timeout is None else time.monotonic() + cfg.study.timeout
    streak = 0
    while st.finished_count(study) < cfg.study.n_trials:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            log(f"timeout of {cfg.study.timeout:g} s reached: no new trial starts")
            break
        try:
            outcome = run_isolated(run_trial_batch, dataclasses.replace(
                batch, n_trials=cfg.study.trials_per_process, streak=streak, timeout=remaining))
        except ProcessDied as died:
            failed = record_dead_process(study, batch.tracker, died, exclusive, parent_id=batch.parent_run_id)
            log(f"{batch.progress_prefix + ' ' if batch.progress_prefix else ''}trial {', '.join(map(str, failed)) or '?'} "
                f"FAIL ({died})")
            streak += max(1, len(failed))
            outcome = {"streak": streak, "tripped": streak >= cfg.study.max_consecutive_failures}
        streak = outcome["streak"]
        if outcome["tripped"]:
            return outcome
    return {"streak": streak, "tripped": False}


def record_dead_process(study, tracker, died, exclusive: bool, parent_id: str | None = None) -> list[int]:
    """A trial process vanished: its trials FAIL with the reason (not retried), their runs FAILED."""
    from harness import study as st

    reason = str(died)
    failed = st.fail_trials_of_dead_worker(study, f"{socket.gethostname()}:{died.pid}", reason, exclusive)
    for number in failed:
        run_id = study.trials[number].user_attrs.get("mlflow_run_id")
        if run_id:
            tracker.set_tags(run_id, {"harness.fail_reason": reason})
            tracker.log_text(run_id, f"No Python traceback: {reason} (exit code {died.exitcode}).\n", "traceback.txt")
            tracker.end_run(run_id, "FAILED", optuna_state="FAIL")
    tracker.reconcile(st.trial_states(study), parent_id=parent_id)  # a run created but not yet linked
    return failed


def recover(study, tracker, exclusive: bool, log, parent_id: str | None = None) -> None:
    """Crash recovery: orphaned trials -> FAIL (and retried), orphaned runs -> KILLED."""
    from harness import study as st

    recover_orphans(study, exclusive)
    fixed = tracker.reconcile(st.trial_states(study), parent_id=parent_id)
    if fixed:
        log(f"reconciled {len(fixed)} MLflow run(s) left behind by a dead process -> KILLED")


def run(cfg, log=None) -> dict:
    """Run the sweep a validated config describes; returns the summary (also printed)."""
    from harness import study as st
    from harness.data import load_dataset, make_splits
    from harness.tracking import Tracker, resolve_tracking_uri

    _quiet_libraries()
    progress_stream = sys.stderr
    log = log or (lambda text: print(text, file=progress_stream, flush=True))

    # --- preflight: everything that can refuse the sweep, before anything is created ---------
    if cfg.quadrants is None:
        dataset = load_dataset(cfg.data)
        splits = make_splits(dataset.labels, cfg.data)
        log(f"data: {dataset.name}, {dataset.num_classes} classes, "
            f"train {len(splits.train)} / val {len(splits.val)} / test {len(splits.test)} images (test held out)")
    else:
        from harness.quadrants import load_targets

        targets = load_targets(cfg, log)
    weights = resolve_weights(cfg, log)

    with local_study_lock(cfg) as exclusive:
        url = st.storage_url(cfg)
        storage = st.make_storage(url)
        tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
        tracker = Tracker(tracking_uri, cfg.tracking.experiment or cfg.study.name, cfg.tracking.artifact_root)
        recorded = tracker.existing_fingerprint(cfg.study.name)
        if recorded and recorded != cfg.fingerprint():
            raise SweepRefused(
                f"study {cfg.study.name!r} already exists in {tracking_uri} with a different config "
                f"(fingerprint {recorded}, now {cfg.fingerprint()}): resuming would mix results. "
                f"Run it under a new --study-name, or delete the old study's results first."
            )
        status = "FINISHED"
        old_handlers = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            tracker.start_study_run(cfg.study.name, cfg.to_dict(), url, cfg.fingerprint())
            if cfg.quadrants is not None:
                from harness.quadrants import run_quadrants

                return run_quadrants(cfg, targets, storage, tracker, weights, exclusive, log)
            return _run_single(cfg, dataset, splits, storage, tracker, weights, exclusive, log)
        except SweepRefused:
            status = "FAILED"
            raise
        except BaseException:
            status = "KILLED"
            raise
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            tracker.end_study_run(status)


def _run_single(cfg, dataset, splits, storage, tracker, weights, exclusive, log) -> dict:
    """One study: the core two-phase sweep, then the from-scratch baseline and the summary."""
    from harness import study as st
    from harness.baseline import run_scratch_baseline
    from harness.summary import summarize

    study = st.open_study(cfg, storage)
    study.set_user_attr("mlflow_parent_run_id", tracker.parent_run_id)
    study.set_user_attr("mlflow_tracking_uri", tracker.uri)
    recover(study, tracker, exclusive, log)
    run_trials(cfg, study, TrialBatch(cfg, dataset, splits, tracker, weights), exclusive, log)
    baseline = None
    if cfg.baseline.scratch and st.best_trial(study) is not None:
        baseline = run_scratch_baseline(cfg, study, dataset, splits, tracker, log)
    summary = summarize(cfg, study, dataset.labels[splits.val], baseline, tracker)
    log(summary["text"])
    return summary


def recover_orphans(study, exclusive: bool) -> None:
    """Fail trials a dead process left RUNNING, and queue their parameters for a retry.

    With the local storage this process holds the study's lock, so every RUNNING trial is an
    orphan and is failed at once. With a server storage other workers may be alive: only trials
    whose heartbeat went silent are failed (Optuna's heartbeat and grace period).
    """
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    from harness import study as st

    if not exclusive:
        st.fail_stale_trials(study)
        return
    retry = RetryHeartbeatStaleTrialCallback(max_retry=st.MAX_RETRIES)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "process died while the trial ran")
        if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            retry(study, study._storage.get_trial(t._trial_id))
    optuna.logging.get_logger("optuna")  # keep optuna's logger configured for later trials


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from harness.config import ConfigError, load_config, with_overrides

    try:
        cfg = load_config(args.config)
        cfg = with_overrides(
            cfg, n_trials=args.n_trials, timeout=args.timeout, name=args.study_name, storage=args.storage,
            seed=args.seed, tracking_uri=args.tracking_uri,
        )
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    import_tensorflow_quietly()
    try:
        run(cfg)
    except (ConfigError, SweepRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt as exc:
        print(f"\ninterrupted ({exc or 'Ctrl-C'}): finished trials are saved; run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


def cli() -> None:
    code = main()
    # Everything is committed to the stores by now. Skip the interpreter's teardown: collecting a
    # large TensorFlow heap can take a minute, which looks like a sweep ignoring SIGTERM.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    cli()

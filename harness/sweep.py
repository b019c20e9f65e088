"""`python -m harness.sweep [CONFIG]`: run (or resume) a transfer-learning sweep.

Order of work, so that bad input costs nothing:
  1. load and validate the config, then check the Optuna and MLflow stores read-only (no TensorFlow yet);
  2. preflight (harness/preflight.py): load the dataset, check every image, resolve and test every backbone's weights;
  3. only then take the local study lock, open the Optuna storage and the MLflow parent run
     (harness/stores.py), and run the flow: one study (harness/single_sweep.py: the search, the
     winner, the from-scratch baseline, the summary) or a quadrant comparison (harness/quadrants.py).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import sys

from harness import preflight, runtime
from harness.config import SweepRefused
from harness.frameworks import trial_gpus

DEFAULT_CONFIG = "sweeps/demo.yaml"
EXIT_CONFIG = 2  # bad input: nothing was created
EXIT_INTERRUPTED = 130


def build_parser() -> argparse.ArgumentParser:
    def positive_int(text):
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value

    def workers_arg(text):
        if text == "auto":
            return text
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a positive count or 'auto', got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1 or 'auto', got {value}")
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
    p.add_argument(
        "--n-trials", type=positive_int, help="finished (completed + pruned) trials to reach; overrides study.n_trials"
    )
    p.add_argument("--timeout", type=positive_float, help="seconds after which no new trial starts; overrides study.timeout")
    p.add_argument("--study-name", help="Optuna study / MLflow experiment name; overrides study.name")
    p.add_argument(
        "--storage",
        help="Optuna storage URL, e.g. postgresql://user@127.0.0.1/db (the password in "
        "~/.pgpass or $PGPASSWORD, never here); overrides study.storage",
    )
    p.add_argument("--tracking-uri", help="MLflow tracking URI; overrides tracking.uri and $MLFLOW_TRACKING_URI")
    p.add_argument("--seed", type=int, help="sampler seed; overrides study.seed")
    p.add_argument(
        "--workers",
        type=workers_arg,
        help="trial processes in this sweep process: N, or 'auto' (one per visible GPU, 1 on CPU); overrides study.workers",
    )
    return p


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
    from harness import study as st

    url = st.storage_url(cfg)  # the local storage, its folder made
    lock_path = st.default_storage_path(cfg.study.name).with_name("sweep.lock")
    # Held open, and locked, for as long as the sweep runs (across the yield); closed below on every path.
    handle = open(lock_path, "w")  # noqa: SIM115
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise SweepRefused(
            f"study {cfg.study.name!r} is already running in another process on the local storage {url}. "
            "To run several workers on one study, give them a server storage: "
            "--storage postgresql://USER@HOST/DBNAME (the password in ~/.pgpass or $PGPASSWORD)"
        ) from None
    try:
        handle.write(str(os.getpid()))
        handle.flush()
        yield True
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def run(cfg, log=None) -> dict:
    """Run the sweep a validated config describes; returns the summary (also printed)."""
    runtime.quiet_libraries()
    progress_stream = sys.stderr
    from tqdm import tqdm

    from harness.redaction import redact

    # tqdm.write prints above a live progress bar instead of through it (a plain print on a pipe).
    emit = log or (lambda text: tqdm.write(text, file=progress_stream))

    def log_redacted(text: str) -> None:
        emit(redact(text))  # a line may name the storage or the tracking URI, which may hold a password

    gpus = [name for name, _ in trial_gpus(preflight.sweep_frameworks(cfg))]
    workers = preflight.plan_workers(cfg.study.workers, gpus)
    from harness.trials import TrialEngine

    engine = TrialEngine.for_config(cfg, log_redacted, workers, gpus)
    try:
        engine.warm_up()  # the trial processes import their framework while the preflight runs
        return _run_checked(cfg, engine, workers, gpus, log_redacted)
    finally:
        engine.close()


def _run_checked(cfg, engine, workers: int, gpus: list[str], log) -> dict:
    from harness import study as st
    from harness.pretrain import ensure_source_weights
    from harness.redaction import redact
    from harness.stores import SweepSetup, open_stores

    # --- preflight: everything that can refuse the sweep, before anything is created ---------
    preflight.check_mixed_precision(cfg)
    if cfg.quadrants is None:
        dataset, splits = preflight.load_data(cfg, log)
    else:
        targets = preflight.load_targets(cfg, log)
    weights = preflight.resolve_weights(cfg, lambda name: ensure_source_weights(cfg, name, log=log))

    with local_study_lock(cfg) as exclusive:
        url = st.storage_url(cfg)
        storage, tracker = open_stores(cfg)
        log(
            f"{workers} trial process(es)"
            + (f" on GPU(s) {', '.join(gpus)}" if gpus else " on CPU")
            + ("" if exclusive else f", sharing the study through {redact(url)}")
        )
        engine.use_stores(tracker, exclusive)
        setup = SweepSetup(storage, tracker, weights, engine, exclusive, log)
        status = "FINISHED"
        old_handlers = runtime.install_stop_handlers()
        try:
            if cfg.quadrants is not None:
                from harness.quadrants import run_quadrants

                return run_quadrants(cfg, targets, setup)
            from harness.single_sweep import run_single

            return run_single(cfg, dataset, splits, setup)
        except SweepRefused:
            status = "FAILED"
            raise
        except BaseException:
            status = "KILLED"
            raise
        finally:
            engine.close()  # before the parent run ends: no trial process outlives the sweep's record
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            tracker.end_study_run(status)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from harness.config import ConfigError, load_config, with_overrides
    from harness.redaction import redact

    try:
        cfg = load_config(args.config)
        missing = preflight.config_file_problems(cfg)  # the folders and files it names, before anything is written
        if missing:
            raise ConfigError("\n".join(missing))
        cfg = with_overrides(
            cfg,
            n_trials=args.n_trials,
            timeout=args.timeout,
            name=args.study_name,
            storage=args.storage,
            seed=args.seed,
            tracking_uri=args.tracking_uri,
            workers=args.workers,
        )
        preflight.check_stores(cfg)  # before a framework loads and anything is written
        preflight.check_frameworks_installed(cfg)
    except (ConfigError, SweepRefused) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    trial_gpus(preflight.sweep_frameworks(cfg))  # the frameworks' imports; GPUs kept from this process
    runtime.freeze_imported_objects()
    try:
        run(cfg)
    except (ConfigError, SweepRefused) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
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

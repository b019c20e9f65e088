"""`python -m harness.sweep [CONFIG]`: run (or resume) a transfer-learning sweep.

Order of work, so that bad input costs nothing:
  1. load and validate the config, then check the Optuna and MLflow stores read-only (no TensorFlow yet);
  2. preflight: load the dataset, check every image, resolve and test every backbone's weights;
  3. only then open the Optuna study and the MLflow parent run, and optimise;
  4. train the from-scratch baseline, print the summary and the command that opens the MLflow UI.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import signal
import sys
from pathlib import Path

from harness import runtime
from harness.config import SweepRefused

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
    from harness.study import default_storage_url

    url = default_storage_url(cfg.study.name)
    lock_path = Path(url.removeprefix("sqlite:///")).with_name("sweep.lock")
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


def plan_workers(requested, gpus: list[str]) -> int:
    """`--workers`: a count, or 'auto' (one per visible GPU, else 1). Refuses more GPUs than exist."""
    if requested == "auto":
        return max(1, len(gpus))
    if gpus and requested > len(gpus):
        raise SweepRefused(
            f"study.workers: {requested} workers asked for, but only {len(gpus)} GPU(s) are visible "
            f"({', '.join(gpus)}); use --workers auto or at most {len(gpus)}"
        )
    return requested


def check_mixed_precision(cfg) -> None:
    """`train.mixed_precision: on` needs a GPU of compute capability >= 7.0 (Tensor Cores): elsewhere
    float16 buys little or no speed and costs precision. Uses the GPUs as seen before this process hid them."""
    from harness.config import ConfigError
    from harness.runtime import TENSOR_CORES, gpu_capabilities, physical_gpus, resolve_switch

    capabilities = gpu_capabilities(physical_gpus())
    explicitly_on = resolve_switch(cfg.train.mixed_precision, [])  # with no GPU, auto is off: only on is left
    if explicitly_on and not resolve_switch("auto", capabilities):
        found = ", ".join("unknown" if c is None else f"{c[0]}.{c[1]}" for c in capabilities) or "none (CPU only)"
        raise ConfigError(
            f"{cfg.path}: train.mixed_precision: on needs a GPU of compute capability >= "
            f"{TENSOR_CORES[0]}.{TENSOR_CORES[1]}; GPUs visible: {found}. Use auto (on where it pays) or off"
        )


def check_stores(cfg) -> None:
    """The Optuna storage and the MLflow tracking store, checked read-only before anything is
    created: each problem (unreachable, corrupt, a schema of the wrong kind or version, a study of
    the other direction) is a SweepRefused naming the store, not a traceback after the night."""
    from harness import study as st

    storage = cfg.study.storage or f"sqlite:///{st.default_storage_path(cfg.study.name)}"
    st.check_storage(storage, cfg.study.name, cfg.study.direction)
    tracking_uri = planned_tracking_uri(cfg.tracking.uri)
    exists = check_tracking_store(tracking_uri)
    check_warm_start_experiments(cfg.study.warm_start, tracking_uri, exists)


def check_warm_start_experiments(warm_start, uri: str, store_exists: bool) -> None:
    """Every experiment `study.warm_start` names must exist in the tracking store (read only; a
    store not created yet holds none): the missing ones are named and the sweep refused."""
    from harness.config import warm_start_experiments
    from harness.tracking import missing_experiments, redact

    names = warm_start_experiments(warm_start)
    if not names:
        return
    missing = missing_experiments(uri, names) if store_exists else names
    if missing:
        raise SweepRefused(
            f"study.warm_start: experiment(s) {', '.join(map(repr, missing))} not found in MLflow tracking store "
            f"{redact(uri)}; name experiments that exist there, or use auto (every experiment) or off"
        )


def planned_tracking_uri(configured: str | None) -> str:
    """The tracking URI harness/tracking.py `resolve_tracking_uri` will use, without creating its folder."""
    from harness.tracking import DEFAULT_TRACKING_DB

    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_TRACKING_DB).resolve()}"


SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # the database backends MLflow's tracking store takes


def check_tracking_store(uri: str) -> bool:
    """Refuse an MLflow tracking store the sweep could not log to: a database that is unreachable,
    corrupt, or at a schema this MLflow does not run on (MLflow itself would stop with a traceback,
    or migrate another application's database); a tracking server that does not answer or refuses
    these credentials. Other stores (Databricks, ...) are left to MLflow. Returns whether the store
    exists already (False: a database MLflow will create, so it holds no experiment yet)."""
    from harness import study as st
    from harness.tracking import redact, schema_problem, tracking_server_error

    where = f"MLflow tracking store {redact(uri)}"
    if uri.split(":", 1)[0].split("+", 1)[0] in SQL_SCHEMES:
        state = st.inspect_sql_store(uri, "MLflow tracking store")
        revision = state and state[1]
        if not revision:
            return False  # a new store (or an empty database): MLflow creates its schema
        problem = schema_problem(uri, revision)
        if problem:
            raise SweepRefused(f"{where}: {problem}")
        return True
    if uri.startswith(("http://", "https://")):
        error = tracking_server_error(uri)
        if error is not None:  # unreachable, refused, not an MLflow server: all stop the sweep
            raise SweepRefused(
                f"{where}: no answer an MLflow tracking server would give ({st.short_error(error, uri)}); "
                "is the server running, and are MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                "set if it asks for them?"
            )
    return True


def resolve_weights(cfg, log) -> dict[str, str | None]:
    """Each candidate backbone's weights, checked by building the backbone once (fails fast)."""
    from harness import backbones as bb
    from harness.config import backbone_candidates

    names = backbone_candidates(cfg.search)
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
            hint = (
                " (ImageNet weights need internet the first time; offline use weights: source or a file)"
                if weights == "imagenet"
                else ""
            )
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


def run(cfg, log=None) -> dict:
    """Run the sweep a validated config describes; returns the summary (also printed)."""
    runtime.quiet_libraries()
    progress_stream = sys.stderr
    from tqdm import tqdm

    from harness.tracking import redact

    # tqdm.write prints above a live progress bar instead of through it (a plain print on a pipe).
    emit = log or (lambda text: tqdm.write(text, file=progress_stream))

    def log_redacted(text: str) -> None:
        emit(redact(text))  # a line may name the storage or the tracking URI, which may hold a password

    gpus = runtime.visible_gpus()
    workers = plan_workers(cfg.study.workers, gpus)
    from harness.trials import TrialEngine

    engine = TrialEngine.for_config(cfg, log_redacted, workers, gpus)
    try:
        engine.warm_up()  # the trial processes import TensorFlow while the preflight runs
        return _run_checked(cfg, engine, workers, gpus, log_redacted)
    finally:
        engine.close()


def _run_checked(cfg, engine, workers: int, gpus: list[str], log) -> dict:
    from harness import study as st
    from harness.data import load_dataset, make_splits
    from harness.tracking import redact

    # --- preflight: everything that can refuse the sweep, before anything is created ---------
    check_mixed_precision(cfg)
    if cfg.quadrants is None:
        dataset = load_dataset(cfg.data)
        splits = make_splits(dataset.labels, cfg.data, dataset.official)
        log(
            f"data: {dataset.name}, {dataset.num_classes} classes, "
            f"train {len(splits.train)} / val {len(splits.val)} / test {len(splits.test)} images (test held out)"
        )
    else:
        from harness.quadrants import load_targets

        targets = load_targets(cfg, log)
    weights = resolve_weights(cfg, log)

    with local_study_lock(cfg) as exclusive:
        url = st.storage_url(cfg)
        storage, tracker = open_stores(cfg)
        log(
            f"{workers} trial process(es)"
            + (f" on GPU(s) {', '.join(gpus)}" if gpus else " on CPU")
            + ("" if exclusive else f", sharing the study through {redact(url)}")
        )
        engine.use_stores(tracker, exclusive)
        status = "FINISHED"
        old_handlers = runtime.install_stop_handlers()
        try:
            if cfg.quadrants is not None:
                from harness.quadrants import run_quadrants

                return run_quadrants(cfg, targets, storage, tracker, weights, engine, exclusive, log)
            return _run_single(cfg, dataset, splits, storage, tracker, weights, engine, exclusive, log)
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


def open_stores(cfg):
    """The Optuna storage, the MLflow experiment and the sweep's parent run: created by the first
    sweep process, found by the others. Processes started at the same instant against fresh
    servers race for each; the schema race is retried (harness/study.py) and the rest is created
    under the study's claim lock, so each exists once and every process reads the same ones."""
    from harness import study as st
    from harness.tracking import Tracker, redact, resolve_tracking_uri

    url = st.storage_url(cfg)
    storage = st.make_storage(url, cfg.study.heartbeat_seconds)
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    with st.claim_lock(storage, f"{cfg.study.name}:setup"):
        tracker = Tracker(
            tracking_uri,
            cfg.tracking.experiment or cfg.study.name,
            cfg.tracking.artifact_root,
            source=f"python -m harness.sweep {cfg.path}",
        )
        recorded = tracker.existing_fingerprint(cfg.study.name)
        if recorded and recorded != cfg.fingerprint():
            raise SweepRefused(
                f"study {cfg.study.name!r} already exists in {redact(tracking_uri)} with a different config "
                f"(fingerprint {recorded}, now {cfg.fingerprint()}): resuming would mix results. "
                f"Run it under a new --study-name, or delete the old study's results first."
            )
        tracker.start_study_run(cfg.study.name, cfg.to_dict(), url, cfg.fingerprint())
    return storage, tracker


def _run_single(cfg, dataset, splits, storage, tracker, weights, engine, exclusive, log) -> dict:
    """One study: the two-phase sweep; then the winner registered and tested, the from-scratch
    baseline, the summary and the parent run's description."""
    from harness import study as st
    from harness.baseline import run_scratch_baseline
    from harness.data import dataset_inputs
    from harness.importance import log_what_mattered
    from harness.progress import Progress
    from harness.screening import screen_backbones
    from harness.summary import summarize
    from harness.tasks import Context
    from harness.tracking import redact
    from harness.trials import recover_after_crash, trial_job
    from harness.warmstart import describe_target, warm_start
    from harness.winner import deliver_winner, description

    study = st.open_study(cfg, storage, reseed=not exclusive)
    study.set_user_attr("mlflow_parent_run_id", tracker.parent_run_id)
    study.set_user_attr("mlflow_tracking_uri", redact(tracker.uri))
    recover_after_crash(study, tracker, exclusive, log, owned_roles=("baseline",))  # a killed baseline's run ends KILLED
    inputs = dataset_inputs(dataset, cfg.data, splits, with_test=True)  # hashed once: every trial run reuses them
    tracker.log_datasets(tracker.parent_run_id, inputs)
    trial_inputs = tuple(i for i in inputs if i["context"] != "test")  # no trial reads the test split
    context = Context(cfg.study.name, cfg, dataset, splits, tracker, weights, trial_inputs)
    # Score the candidate backbones first; `search.screen.keep` narrows what the trials sample from.
    trial_cfg, screening = screen_backbones(cfg, study, storage, tracker, lambda task: engine.call(context, task), log)
    # Describe the target on the parent run; study.warm_start: enqueue the nearest sweeps' best configurations.
    with st.claim_lock(storage, f"{cfg.study.name}:warm-start"):
        target = describe_target(len(splits.train), dataset.num_classes, cfg.data.image_size, screening)
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
    runtime.check_stop()

    def run_task(task, progress=None):
        return engine.call(context, task, progress)

    # Sweep processes sharing a server storage finish together: one registers and tests the winner,
    # the others find it done.
    with st.claim_lock(storage, f"{cfg.study.name}:winner"):
        winner = deliver_winner(cfg, study, tracker, run_task, log)
    runtime.check_stop()
    baseline = None
    if cfg.baseline.scratch and winner is not None:
        baseline = run_scratch_baseline(cfg, study, dataset.name, tracker, log, run_task)
    what_mattered = log_what_mattered(study, tracker, Path("results") / cfg.study.name, cfg.study.metric, log)
    summary = summarize(
        cfg, study, dataset.labels[splits.val], baseline, tracker, what_mattered=what_mattered, screening=screening
    )
    parent_metrics = {
        "test_accuracy": winner and winner["test_accuracy"],
        "scratch_test_accuracy": baseline and baseline.get("test_accuracy"),
        "scratch_train_accuracy": baseline and baseline.get("train_accuracy"),
    }
    if baseline:
        tracker.set_tags(tracker.parent_run_id, {"harness.baseline_undertrained": str(baseline.get("fitted") is False).lower()})
    tracker.log_metrics(tracker.parent_run_id, {k: v for k, v in parent_metrics.items() if v is not None})
    tracker.describe(tracker.parent_run_id, description(cfg, winner, baseline, summary["chance"], tracker))
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from harness.config import ConfigError, load_config, with_overrides
    from harness.preflight import config_file_problems
    from harness.tracking import redact

    try:
        cfg = load_config(args.config)
        missing = config_file_problems(cfg)  # the folders and files it names, before anything is written
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
        check_stores(cfg)  # before TensorFlow loads and anything is written
    except (ConfigError, SweepRefused) as exc:
        print(f"error: {redact(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        runtime.import_tensorflow_quietly()
    except ModuleNotFoundError as exc:
        if exc.name != "tensorflow":
            raise
        print(
            'error: TensorFlow is not installed. It is an extra, chosen per machine: pip install -e ".[cpu]" '
            'on a CPU-only box, pip install -e ".[gpu]" on an NVIDIA GPU box (see the README)',
            file=sys.stderr,
        )
        return EXIT_CONFIG
    runtime.hide_gpus_from_this_process()
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

"""Optuna storage, sampler, pruner, resume and heartbeat. Never logs to MLflow.

The default storage is SQLite under results/<study>/optuna.db, so re-running the same command
resumes the study. RDB storages (SQLite, PostgreSQL) get Optuna's heartbeat: a trial whose
process died stops heartbeating, is marked FAIL and its parameters are re-queued by
`RetryHeartbeatStaleTrialCallback`. n_trials counts COMPLETE and PRUNED trials only, so failed and
retried trials never eat into the budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from harness.config import SweepConfig, SweepRefused
from harness.redaction import redact

if TYPE_CHECKING:
    from optuna.storages._heartbeat import BaseHeartbeat

HEARTBEAT_SECONDS = 30  # how often a running trial proves it is alive (study.heartbeat_seconds)
GRACE_BEATS = 3  # missed beats after which a RUNNING trial counts as dead
MAX_RETRIES = 2  # re-runs of a trial whose process died
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def default_storage_path(study_name: str, results_dir: str = "results") -> Path:
    """Where the local storage of a study lives; creates nothing (the preflight reads it first)."""
    return (Path(results_dir) / study_name / "optuna.db").resolve()


def default_storage_url(study_name: str, results_dir: str = "results", create: bool = True) -> str:
    """The local storage's URL; `create`: make its folder (the preflight reads the URL first, creating nothing)."""
    path = default_storage_path(study_name, results_dir)
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def storage_url(cfg: SweepConfig, create: bool = True) -> str:
    """The storage of the study `cfg` describes: study.storage, else the local one (see default_storage_url)."""
    return cfg.study.storage or default_storage_url(cfg.study.name, create=create)


def make_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS) -> RDBStorage:
    # SQLite: wait for a competing writer instead of failing with 'database is locked'.
    engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    import random
    import time

    import sqlalchemy.exc

    for attempt in range(5):
        try:
            return RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat,
                grace_period=GRACE_BEATS * heartbeat,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES),
            )
        except (sqlalchemy.exc.ProgrammingError, sqlalchemy.exc.IntegrityError):
            # Workers started together on a fresh database race to create Optuna's schema
            # ('type "studydirection" already exists'); the loser retries and finds the tables.
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())
    raise AssertionError("unreachable: the last attempt returns or re-raises")


def make_sampler(cfg: SweepConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """`seed_offset`: a trial process opens the study afresh; offsetting the seed by the trials
    already in it keeps the sweep reproducible without every process drawing the same first point."""
    seed = cfg.study.seed + seed_offset
    if cfg.study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials still running elsewhere count as bad guesses, so parallel workers do not
    # all sample the same promising region (Optuna's advice for distributed TPE).
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, cfg.study.n_trials // 3)), constant_liar=True)


def total_epochs(cfg: SweepConfig) -> int:
    return cfg.train.head.epochs + cfg.train.finetune.epochs


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    s = cfg.study
    if s.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, s.pruner_warmup_epochs), max_resource=total_epochs(cfg))
    if s.pruner == "successive_halving":
        # One bracket of Hyperband: rungs at min_resource * 3^k steps on the harness's step axis
        # (both phases, see harness/trials.py pruning_step); the top third of each rung goes on.
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=max(1, s.pruner_warmup_epochs), reduction_factor=3)
    if s.pruner == "percentile":
        return optuna.pruners.PercentilePruner(
            25.0, n_startup_trials=s.pruner_startup_trials, n_warmup_steps=s.pruner_warmup_epochs
        )
    return optuna.pruners.MedianPruner(n_startup_trials=s.pruner_startup_trials, n_warmup_steps=s.pruner_warmup_epochs)


def open_study(cfg: SweepConfig, storage=None, reseed: bool = False) -> optuna.Study:
    """Create the study, or load it when it exists (resume). `reseed`: offset the sampler's seed
    by the number of trials already in the study (see make_sampler)."""
    storage = storage or make_storage(storage_url(cfg))
    study = optuna.create_study(
        study_name=cfg.study.name,
        storage=storage,
        sampler=make_sampler(cfg),
        pruner=make_pruner(cfg),
        direction=cfg.study.direction,
        load_if_exists=True,
    )
    if reseed:
        study.sampler = make_sampler(cfg, seed_offset=len(study.trials))
    if study.direction.name.lower() != cfg.study.direction:  # harness/preflight.py check_storage catches it sooner
        raise SweepRefused(
            direction_mismatch(cfg.study.name, storage_url(cfg), study.direction.name.lower(), cfg.study.direction)
        )
    name_metric(study, cfg.study.metric)
    return study


def open_seed_study(name: str, storage, metric: str = "test_accuracy") -> optuna.Study:
    """The study whose trials are a confirmation's seeds, created or loaded when it exists: a random
    sampler over the seed parameter, and the seed's score `metric` (higher is better) as its value."""
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.RandomSampler(seed=0),
    )
    name_metric(study, metric)
    return study


def name_metric(study: optuna.Study, metric: str) -> None:
    """Name the study's value after its metric, so optuna-dashboard labels its axis `metric` rather
    than "Objective 0". Written once: a resumed study already carries it."""
    from optuna.exceptions import ExperimentalWarning

    if study.metric_names == [metric]:
        return
    with warnings.catch_warnings():  # set_metric_names is marked experimental; a sweep's log holds its own lines
        warnings.simplefilter("ignore", ExperimentalWarning)
        study.set_metric_names([metric])


# --- a storage read without writing (harness/preflight.py checks it before the sweep creates anything) ----------


def direction_mismatch(study_name: str, url: str, found: str, wanted: str) -> str:
    return (
        f"Optuna storage {redact(url)}: study {study_name!r} exists with direction {found}, but the config says "
        f"{wanted}; a study's direction cannot change: run under a new --study-name, or set study.direction: "
        f"{found}"
    )


def sqlite_file(url: str) -> Path | None:
    """The database file of a `sqlite:///` URL (None for other URLs and in-memory databases). Pure."""
    if not url.startswith("sqlite:///"):
        return None
    path = url.removeprefix("sqlite:///").split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def read_only_url(url: str) -> str:
    """The same database, opened so that nothing can be written (SQLite); server URLs unchanged."""
    from urllib.parse import quote

    path = sqlite_file(url)
    if path is None:
        return url
    return f"sqlite:///file:{quote(str(path.resolve()))}?mode=ro&uri=true"


def short_error(exc, url: str, limit: int = 300) -> str:
    """An error's first line, shortened, with any password of `url` masked (drivers quote the URL)."""
    from urllib.parse import urlsplit

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if password:
        text = text.replace(password, "***")
    return text[:limit]


OPTUNA_TABLES = {"studies", "study_directions", "trials", "version_info"}


def stored_directions(url: str, study_name: str, where: str) -> list[str] | None:
    """The directions of study `study_name` in the Optuna storage at `url` (its schema stamped),
    read without writing; None when it holds no such study. Raises SweepRefused naming the store
    (`where`) when Optuna cannot open it (harness/preflight.py `check_storage` asks)."""
    try:
        storage = RDBStorage(read_only_url(url), skip_table_creation=True)
    except RuntimeError as exc:  # Optuna's own words: which version made the schema, and the command to upgrade it
        raise SweepRefused(f"{where}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - any other failure to open it is the store's problem, named
        raise SweepRefused(f"{where}: cannot open it: {type(exc).__name__}: {short_error(exc, url)}") from None
    try:
        study_id = storage.get_study_id_from_name(study_name)
        return [d.name.lower() for d in storage.get_study_directions(study_id)]
    except KeyError:  # no such study yet
        return None
    finally:
        storage.engine.dispose()


@contextlib.contextmanager
def claim_lock(storage, name: str):
    """Serialise "count the budget, then ask for a trial" across every process on the storage.

    Without it two sweep processes can both see one trial left and both start one, overshooting
    n_trials. PostgreSQL gets a session advisory lock keyed by `name` (a study's name; the sweep's
    set-up uses it too, so its MLflow experiment and parent run are created once). SQLite needs none:
    the local storage has a single sweep process (harness/sweep.py holds its lock file), and only
    the sweep process asks Optuna for trials.
    """
    # A study wraps its RDBStorage in Optuna's caching layer; the database engine is the backend's.
    engine = getattr(getattr(storage, "_backend", storage), "engine", None)
    if engine is None or engine.dialect.name != "postgresql":
        yield
        return
    import sqlalchemy as sa

    key = int.from_bytes(hashlib.sha1(f"harness:{name}".encode()).digest()[:8], "big", signed=True)
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
        try:
            yield
        finally:
            conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
            conn.commit()


def budget_left(study: optuna.Study, n_trials: int) -> int:
    """Trials that may still start: the budget less the finished and the running ones (anywhere)."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    taken = sum(s in FINISHED_STATES or s == TrialState.RUNNING for s in states)
    return n_trials - taken


def finished_count(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED_STATES))


def trial_states(study: optuna.Study) -> dict[int, str]:
    return {t.number: t.state.name for t in study.get_trials(deepcopy=False)}


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    try:
        return study.best_trial
    except ValueError:
        return None


# --- trials left behind by a dead process, and Optuna's storage internals -------------------------


def fail_orphaned_trials(study: optuna.Study, exclusive: bool) -> None:
    """Fail the trials a dead process left RUNNING, and queue their parameters for a retry (at
    most MAX_RETRIES times).

    With the local storage this process holds the study's lock, so every RUNNING trial is an
    orphan and fails at once. With a server storage other machines may be alive: only trials
    whose heartbeat went silent fail (Optuna's heartbeat and grace period)."""
    from optuna.storages import RetryHeartbeatStaleTrialCallback

    if not exclusive:
        optuna.storages.fail_stale_trials(study)
        return
    retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_user_attr(t._trial_id, "fail_reason", "process died while the trial ran")
        if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            retry(study, study._storage.get_trial(t._trial_id))


def storage_of(study: optuna.Study):
    """The storage a study object reads and writes (Optuna keeps it private)."""
    return study._storage


def record_heartbeat(study: optuna.Study, trial: optuna.Trial) -> None:
    """Prove that `trial` is alive now (server storages: a trial without beats goes stale)."""
    # Every study here is opened on an RDB storage (make_storage), which also implements Optuna's heartbeat.
    cast("BaseHeartbeat", study._storage).record_heartbeat(trial._trial_id)

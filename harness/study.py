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
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from harness.config import SweepConfig

HEARTBEAT_SECONDS = 30  # how often a running trial proves it is alive (study.heartbeat_seconds)
GRACE_BEATS = 3  # missed beats after which a RUNNING trial counts as dead
MAX_RETRIES = 2  # re-runs of a trial whose process died
FINISHED_STATES = (TrialState.COMPLETE, TrialState.PRUNED)


def default_storage_url(study_name: str, results_dir: str = "results") -> str:
    path = (Path(results_dir) / study_name / "optuna.db").resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def storage_url(cfg: SweepConfig) -> str:
    return cfg.study.storage or default_storage_url(cfg.study.name)


def make_storage(url: str, heartbeat: int = HEARTBEAT_SECONDS) -> RDBStorage:
    engine_kwargs = {}
    if url.startswith("sqlite"):
        # Wait for a competing writer instead of failing with 'database is locked'.
        engine_kwargs = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
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


def make_sampler(cfg: SweepConfig, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """`seed_offset`: a trial process opens the study afresh; offsetting the seed by the trials
    already in it keeps the sweep reproducible without every process drawing the same first point."""
    seed = cfg.study.seed + seed_offset
    if cfg.study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: trials still running elsewhere count as bad guesses, so parallel workers do not
    # all sample the same promising region (Optuna's advice for distributed TPE).
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, cfg.study.n_trials // 3)),
                                      constant_liar=True)


def total_epochs(cfg: SweepConfig) -> int:
    return cfg.train.head.epochs + cfg.train.finetune.epochs


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    s = cfg.study
    if s.pruner == "none":
        return optuna.pruners.NopPruner()
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, s.pruner_warmup_epochs), max_resource=total_epochs(cfg))
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
    if study.direction.name.lower() != cfg.study.direction:
        raise ValueError(f"study {cfg.study.name!r} exists with direction {study.direction.name.lower()}; the config says {cfg.study.direction}")
    return study


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


def fail_trials_of_dead_worker(study: optuna.Study, worker: str, reason: str, exclusive: bool) -> list[int]:
    """FAIL the trials a dead trial process left RUNNING, with `reason`; not retried, since the
    trial itself most likely killed its process (out of memory). Returns their numbers.

    `worker` is the trial's "worker" user attribute (host:pid). With the local storage this
    process holds the study's lock, so any RUNNING trial is the dead child's, even one it created
    but had not yet labelled."""
    failed = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if exclusive or t.user_attrs.get("worker") == worker:
            study._storage.set_trial_user_attr(t._trial_id, "fail_reason", reason)
            if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
                failed.append(t.number)
    return failed


def fail_stale_trials(study: optuna.Study) -> None:
    """Mark trials whose heartbeat stopped as FAIL now (and queue their retries)."""
    optuna.storages.fail_stale_trials(study)


class StopAfterFailures:
    """Stop the study after `limit` failed trials in a row: something is wrong with every trial."""

    def __init__(self, limit: int = 5, streak: int = 0):
        self.limit = limit
        self.streak = streak  # failures in a row carried over from earlier trial processes
        self.tripped = False

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.streak = self.streak + 1 if trial.state == TrialState.FAIL else 0
        if self.streak >= self.limit:
            self.tripped = True
            study.stop()

"""The sweep's stores, opened once the preflight has passed, and what a sweep's flow is given.

harness/sweep.py opens them (`open_stores`) under the local study lock, then hands one `SweepSetup`
to the flow it runs: harness/single_sweep.py (one study) or harness/quadrants.py (a comparison).

    >>> storage, tracker = open_stores(cfg)
    >>> setup = SweepSetup(storage, tracker, weights, engine, exclusive, log)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harness.config import SweepConfig, SweepRefused

if TYPE_CHECKING:
    from harness.tracking import Tracker
    from harness.trials import TrialEngine


@dataclass(frozen=True)
class SweepSetup:
    """What a flow runs with, beside its config and its data."""

    storage: Any  # the Optuna storage every study of the sweep lives in (harness/study.py make_storage)
    tracker: Tracker  # the MLflow experiment and the sweep's parent run
    weights: dict[str, str | None]  # each candidate backbone's weights, as the preflight resolved them
    engine: TrialEngine  # the trial processes
    exclusive: bool  # this process holds the local study lock: whatever is RUNNING is an orphan
    log: Callable[[str], None]  # a line for the sweep's log (redacted)


def open_stores(cfg: SweepConfig):
    """The Optuna storage, the MLflow experiment and the sweep's parent run: created by the first
    sweep process, found by the others. Processes started at the same instant against fresh
    servers race for each; the schema race is retried (harness/study.py) and the rest is created
    under the study's claim lock, so each exists once and every process reads the same ones."""
    from harness import study as st
    from harness.redaction import redact
    from harness.tracking import Tracker, resolve_tracking_uri

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

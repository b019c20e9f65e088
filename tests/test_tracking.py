"""Tracking URI resolution, flag overrides, and the run tree helpers against a real SQLite store."""

from __future__ import annotations

from harness.config import parse_config, with_overrides
from harness.tracking import Tracker, redact, resolve_tracking_uri
from tests.conftest import TINY


def test_flag_beats_environment_beats_local_default(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None) == f"sqlite:///{workdir}/results/mlflow.db"


def test_command_line_flags_override_the_yaml():
    cfg = with_overrides(parse_config(TINY, "t.yaml"), n_trials=7, timeout=60.0, name="other", storage="sqlite:///s.db",
                         seed=9, tracking_uri="sqlite:///m.db")
    assert (cfg.study.n_trials, cfg.study.timeout, cfg.study.name, cfg.study.storage, cfg.study.seed) == (7, 60.0, "other", "sqlite:///s.db", 9)
    assert cfg.tracking.uri == "sqlite:///m.db"
    assert with_overrides(parse_config(TINY, "t.yaml")).study.n_trials == 2  # None = not given


def test_storage_passwords_never_reach_mlflow():
    assert redact("postgresql://user:secret@127.0.0.1/db") == "postgresql://user:***@127.0.0.1/db"


def test_parent_run_is_reopened_not_duplicated_and_children_nest(workdir):
    uri = f"sqlite:///{workdir}/m.db"
    first = Tracker(uri, "exp", str(workdir / "a"))
    parent = first.start_study_run("s", {"study": {"name": "s"}}, "sqlite:///x", "abc")
    child = first.start_child("trial 0", "trial", {"optuna.trial_number": 0}, config={"a": 1})
    first.end_study_run("KILLED")
    again = Tracker(uri, "exp", str(workdir / "a"))
    assert again.start_study_run("s", {}, "sqlite:///x", "abc") == parent
    assert again.existing_fingerprint("s") == "abc"
    run = again.client.get_run(child)
    assert run.data.tags["mlflow.parentRunId"] == parent and run.data.tags["harness.role"] == "trial"
    assert [a.path for a in again.client.list_artifacts(child)] == ["config.yaml"]


def test_reconcile_kills_orphans_and_leaves_live_and_finished_runs(workdir):
    t = Tracker(f"sqlite:///{workdir}/m.db", "exp", str(workdir / "a"))
    t.start_study_run("s", {}, "x")
    runs = {n: t.start_child(f"trial {n}", "trial", {"optuna.trial_number": n}) for n in range(4)}
    t.end_run(runs[0], "FINISHED", "COMPLETE")
    t.end_run(runs[3], "FINISHED", "COMPLETE")  # logged as finished, but Optuna never heard (died in between)
    fixed = t.reconcile({0: "COMPLETE", 1: "RUNNING", 2: "FAIL", 3: "FAIL"})
    assert sorted(fixed) == sorted([runs[2], runs[3]])
    status = {n: t.client.get_run(r).info.status for n, r in runs.items()}
    assert status == {0: "FINISHED", 1: "RUNNING", 2: "KILLED", 3: "KILLED"}
    assert t.client.get_run(runs[3]).data.tags["optuna.state"] == "FAIL"

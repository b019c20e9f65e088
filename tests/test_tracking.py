"""Tracking URI resolution, flag overrides, and the run tree helpers against a real SQLite store."""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path

import pytest

from harness.config import parse_config, with_overrides
from harness.redaction import login_to_environment
from harness.tracking import (
    ARTIFACT_BARS,
    NEWEST_FIRST,
    OLDEST_FIRST,
    ROLE,
    TRIAL_TAG,
    URL_LINES_OFF,
    RunRecord,
    Tracker,
    TrackingError,
    plain_tracking_errors,
    quiet_mlflow,
    resolve_tracking_uri,
    run_filter,
    run_url,
    ui_command,
)
from tests.conftest import TINY


def test_flag_beats_environment_beats_local_default(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_tracking_uri("sqlite:///x.db") == "sqlite:///x.db"
    assert resolve_tracking_uri(None) == "http://127.0.0.1:5999"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_tracking_uri(None) == f"sqlite:///{workdir}/results/mlflow.db"


def test_command_line_flags_override_the_yaml():
    cfg = with_overrides(
        parse_config(TINY, "t.yaml"),
        n_trials=7,
        timeout=60.0,
        name="other",
        storage="sqlite:///s.db",
        seed=9,
        tracking_uri="sqlite:///m.db",
    )
    assert (cfg.study.n_trials, cfg.study.timeout, cfg.study.name, cfg.study.storage, cfg.study.seed) == (
        7,
        60.0,
        "other",
        "sqlite:///s.db",
        9,
    )
    assert cfg.tracking.uri == "sqlite:///m.db"
    assert with_overrides(parse_config(TINY, "t.yaml")).study.n_trials == 2  # None = not given


def test_the_ui_command_printed_after_a_sweep_names_no_password():
    assert ui_command("https://bob:pw@mlflow.lab", "3") == (
        "open https://bob:***@mlflow.lab/#/experiments/3?workflowType=machine_learning in a browser"
    )
    assert ui_command("postgresql://u:pw@db/mlflow").startswith("mlflow ui --backend-store-uri postgresql://u:***@db/mlflow ")


def test_nothing_a_tracker_writes_holds_a_password(workdir):
    """Config artifacts, tags, params, descriptions, texts and failures, read back from the store."""
    secret = "Zq9secretpw"
    storage = f"postgresql://harness:{secret}@127.0.0.1/db?sslpassword={secret}"
    config = {"study": {"name": "s", "storage": storage}, "tracking": {"uri": f"https://u:{secret}@mlflow.example"}}
    t = Tracker(f"sqlite:///{workdir}/m.db", "exp", str(workdir / "a"))
    parent = t.start_study_run("s", config, storage)
    child = t.start_child("baseline", "baseline", {"where": storage}, config=config)
    t.log_params(child, {"storage": storage})
    t.describe(parent, f"stored in {storage}")
    t.log_text(child, f"through {storage}", "notes.txt")
    t.log_failure(child, RuntimeError(f"cannot reach {storage}"))
    written = []
    for run_id in (parent, child):
        run = t.client.get_run(run_id)
        written += [*run.data.tags.values(), *run.data.params.values()]
        for artifact in t.client.list_artifacts(run_id):
            written.append(_artifact_text(t, run_id, artifact.path))
    assert not [text for text in written if secret in text]
    assert t.client.get_run(parent).data.tags["optuna.storage"] == "postgresql://harness:***@127.0.0.1/db?sslpassword=***"
    assert "storage: postgresql://harness:***@127.0.0.1/db?sslpassword=***" in _artifact_text(t, child, "config.yaml")


def _artifact_text(tracker, run_id: str, path: str) -> str:
    from mlflow.artifacts import download_artifacts

    return Path(download_artifacts(run_id=run_id, artifact_path=path, tracking_uri=tracker.uri)).read_text()


def test_a_login_in_an_http_tracking_uri_moves_to_mlflows_environment(monkeypatch):
    monkeypatch.setattr(os, "environ", {})  # a scratch environment: nothing set here outlives the test
    assert resolve_tracking_uri("https://bob:p%40ss@mlflow.example:8443/x") == "https://mlflow.example:8443/x"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("bob", "p@ss")
    assert login_to_environment("sqlite:////tmp/a:b@c/m.db") == "sqlite:////tmp/a:b@c/m.db"  # not a login


def test_a_pickled_tracker_carries_the_login_to_a_process_started_before_it(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    data = pickle.dumps(Tracker(f"sqlite:///{workdir}/m.db", "exp", str(workdir / "a")))
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME")
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")
    pickle.loads(data)
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("bob", "pw")


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


def test_end_orphaned_trial_runs_kills_orphans_and_leaves_live_and_finished_runs(workdir):
    t = Tracker(f"sqlite:///{workdir}/m.db", "exp", str(workdir / "a"))
    t.start_study_run("s", {}, "x")
    runs = {n: t.start_child(f"trial {n}", "trial", {"optuna.trial_number": n}) for n in range(4)}
    t.end_run(runs[0], "FINISHED", "COMPLETE")
    t.end_run(runs[3], "FINISHED", "COMPLETE")  # logged as finished, but Optuna never heard (died in between)
    fixed = t.end_orphaned_trial_runs({0: "COMPLETE", 1: "RUNNING", 2: "FAIL", 3: "FAIL"})
    assert sorted(fixed) == sorted([runs[2], runs[3]])
    status = {n: t.client.get_run(r).info.status for n, r in runs.items()}
    assert status == {0: "FINISHED", 1: "RUNNING", 2: "KILLED", 3: "KILLED"}
    assert t.client.get_run(runs[3]).data.tags["optuna.state"] == "FAIL"


def test_run_filter_names_each_criterion_given_and_nothing_else():
    assert run_filter() == ""
    assert run_filter(role="trial") == "tags.`harness.role` = 'trial'"
    assert run_filter(role="confirm", parent="p1", status="FINISHED", tags={"harness.seed": 2}) == (
        "tags.`harness.role` = 'confirm' and tags.`mlflow.parentRunId` = 'p1' and tags.`harness.seed` = '2' "
        "and attributes.status = 'FINISHED'"
    )


def test_find_runs_selects_by_role_parent_status_and_tags_and_returns_plain_records(workdir):
    t = Tracker(f"sqlite:///{workdir}/m.db", "exp", str(workdir / "a"))
    parent = t.start_study_run("s", {"study": {"direction": "minimize"}}, "x")
    made = []

    def child(name, role, tags, parent_id=None):
        time.sleep(0.01)  # distinct start times: the orders below are then the creation order
        made.append(t.start_child(name, role, tags, parent_id=parent_id))
        return made[-1]

    trial0, trial1 = child("trial 0", "trial", {TRIAL_TAG: 0}), child("trial 1", "trial", {TRIAL_TAG: 1})
    cell = child("cell", "cell", {"target": "flowers", "strategy": "full"})
    seeds = [child(f"seed {s}", "confirm", {"harness.seed": s}, parent_id=cell) for s in range(2)]
    t.log_metrics(trial0, {"objective": 0.75})
    t.log_params(trial0, {"head_lr": 0.003, "backbone": "b1"})
    t.end_run(trial0, "FINISHED", "COMPLETE")
    t.end_run(seeds[1], "FINISHED")

    trials = t.find_runs(role="trial", order_by=OLDEST_FIRST)
    assert [r.run_id for r in trials] == [trial0, trial1]
    first = trials[0]
    assert isinstance(first, RunRecord) and first.experiment_id == t.experiment_id
    assert (first.status, first.metrics, first.params) == (
        "FINISHED",
        {"objective": 0.75},
        {"head_lr": "0.003", "backbone": "b1"},
    )
    assert first.tags[ROLE] == "trial" and first.tags[TRIAL_TAG] == "0" and first.parent_id == parent
    assert first.start_time <= first.end_time and trials[1].end_time is None and trials[1].status == "RUNNING"
    assert all(type(x) is dict for x in (first.tags, first.params, first.metrics))  # plain values, not MLflow's

    assert [r.run_id for r in t.find_runs(role="trial", order_by=NEWEST_FIRST)] == [trial1, trial0]
    assert [r.run_id for r in t.find_runs(role="trial", status="RUNNING")] == [trial1]
    assert [r.run_id for r in t.find_runs(parent=cell, order_by=OLDEST_FIRST)] == seeds
    assert [r.run_id for r in t.find_runs(role="confirm", parent=cell, status="FINISHED")] == [seeds[1]]
    assert [r.run_id for r in t.find_runs(tags={"harness.seed": 0})] == [seeds[0]]
    assert [r.run_id for r in t.find_runs(role="cell", tags={"target": "flowers", "strategy": "full"})] == [cell]
    assert t.find_runs(role="cell", tags={"target": "flowers", "strategy": "features"}) == []
    assert t.find_runs(role="confirm", parent=parent) == []  # the seeds nest under their cell, not the study
    assert len(t.find_runs(parent=parent)) == 3 and len(t.find_runs()) == 6  # the study's run has no parent
    assert len(t.find_runs(role="trial", max_results=1)) == 1

    assert t.get_run_record(trial0) == first
    (study,) = t.study_runs("s")
    assert study.run_id == parent and study.parent_id is None and study.params["study.direction"] == "minimize"
    assert t.study_runs("other") == []


def test_a_store_refusal_comes_out_as_a_plain_error_with_the_stores_words(workdir):
    t = Tracker(f"sqlite:///{workdir}/m.db", "exp", str(workdir / "a"))
    with pytest.raises(TrackingError) as refused, plain_tracking_errors():
        t.get_run_record("0" * 32)
    assert "0" * 32 in refused.value.message and str(refused.value) == refused.value.message
    assert type(refused.value.__cause__).__name__ == "MlflowException"


def test_run_url():
    assert run_url("abc", "4") == "http://127.0.0.1:5000/#/experiments/4/runs/abc"
    assert run_url("abc", 4, "http://mlflow:8080/") == "http://mlflow:8080/#/experiments/4/runs/abc"
    assert run_url(None, "4") is None and run_url("abc", None) is None
    assert run_url("abc", "4", "") == "#/experiments/4/runs/abc"  # from any page of the UI: a run's description


def test_a_tracking_process_turns_off_mlflows_own_lines_unless_they_were_asked_for(monkeypatch):
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR, MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    for name in (URL_LINES_OFF, ARTIFACT_BARS):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)  # unset, as in a fresh process (and restored after the test)
    quiet_mlflow()
    assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() is True and MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is False
    monkeypatch.setenv(ARTIFACT_BARS, "true")  # the user's own choice stands
    quiet_mlflow()
    assert MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.get() is True

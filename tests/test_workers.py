"""Several workers, one study: a real PostgreSQL storage and a real MLflow tracking server.

PostgreSQL comes from `scripts/postgres.sh` (which `.ci/run` runs): its URL arrives in
HARNESS_TEST_POSTGRES. The MLflow server is started here, on 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, TINY, fresh_database, quad, serve_mlflow, write_config

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("servers")]  # module fixtures: one xdist worker


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    with serve_mlflow(folder) as uri:
        yield uri


def open_stores_at(args):
    """One sweep process's start-up (schema, experiment, parent run), released at the barrier."""
    config_text, storage, tracking, barrier = args
    from harness.config import parse_config, with_overrides
    from harness.stores import open_stores

    cfg = with_overrides(parse_config(config_text, "race.yaml"), storage=storage, tracking_uri=tracking)
    barrier.wait()
    _, tracker = open_stores(cfg)
    return tracker.experiment_id, tracker.parent_run_id


def test_sweep_processes_started_together_create_schema_experiment_and_parent_once(postgres_url, mlflow_server):
    """Four processes open the same fresh study at the same instant, ten times over: every one
    joins, and each of Optuna's schema, the MLflow experiment and the parent run exists once."""
    import multiprocessing

    base = os.environ["HARNESS_TEST_POSTGRES"]
    ctx = multiprocessing.get_context("spawn")
    client = MlflowClient(mlflow_server)
    with ctx.Pool(4) as pool, ctx.Manager() as manager:
        for round_ in range(10):
            storage = fresh_database(base)  # a fresh database: the schema race too
            name = f"race-{uuid.uuid4().hex[:8]}"
            text = TINY.replace("name: tiny", f"name: {name}")
            barrier = manager.Barrier(4)
            joined = pool.map(open_stores_at, [(text, storage, mlflow_server, barrier)] * 4)
            assert len(set(joined)) == 1, f"round {round_}: the processes disagree: {joined}"
            experiment_id, parent = joined[0]
            assert client.get_experiment_by_name(name).experiment_id == experiment_id
            runs = client.search_runs([experiment_id], run_view_type=3)  # deleted runs too: none was made twice
            assert [r.info.run_id for r in runs] == [parent]
            assert optuna.get_all_study_names(storage) == []  # schema made, and usable


def test_three_sweep_processes_fill_one_budget_exactly_and_survive_one_killed(tmp_path, postgres_url, mlflow_server):
    """Three sweep processes on PostgreSQL and an MLflow server; one is SIGKILLed mid-trial. The
    others fail its trial once its heartbeat stops, run its parameters again, and finish the budget
    exactly; every finished trial has one FINISHED run under the one parent."""
    study_name = f"workers-{uuid.uuid4().hex[:8]}"
    text = TINY.replace("scratch: true", "scratch: false").replace("pruner: none", "pruner: none\n  heartbeat_seconds: 3")
    config = write_config(tmp_path, text)
    args = [
        sys.executable,
        "-m",
        "harness.sweep",
        str(config),
        "--study-name",
        study_name,
        "--n-trials",
        "5",
        "--storage",
        postgres_url,
        "--tracking-uri",
        mlflow_server,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = []
    for i in range(3):  # each in its own folder, as on three machines
        (tmp_path / f"w{i}").mkdir()
        workers.append(
            subprocess.Popen(args, cwd=tmp_path / f"w{i}", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    victim = workers[0]
    deadline = time.monotonic() + 600
    for line in victim.stderr:  # kill it in the middle of its first trial
        if "head epoch 1/" in line:
            break
        assert time.monotonic() < deadline, "the first sweep process never started a trial"
    victim.kill()
    victim.wait()
    outputs = [w.communicate(timeout=900)[1] for w in workers[1:]]
    for w, err in zip(workers[1:], outputs):
        assert w.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    states = [t.state.name for t in study.trials]
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(finished) == 5, states  # exactly the budget
    killed = [t for t in study.trials if t.state.name == "FAIL"]
    assert len(killed) == 1, states
    assert "RUNNING" not in states and "WAITING" not in states
    assert any(t.params == killed[0].params for t in finished), "the killed trial's parameters must run again"
    assert len({t.user_attrs["sweep_process"] for t in finished}) == 2, "both surviving processes must have run trials"

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(study_name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("harness.role") == "study"]
    assert len(parents) == 1, "the processes must agree on one parent run"
    trial_runs = [r for r in runs if r.data.tags.get("harness.role") == "trial"]
    for t in finished:
        mine = [r for r in trial_runs if r.data.tags["optuna.trial_number"] == str(t.number)]
        assert len(mine) == 1 and mine[0].info.run_id == t.user_attrs["mlflow_run_id"]
        assert mine[0].info.status == "FINISHED"
        assert mine[0].data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert "history.csv" in {a.path for a in client.list_artifacts(mine[0].info.run_id)}  # artifacts via the server
    assert client.get_run(killed[0].user_attrs["mlflow_run_id"]).info.status != "RUNNING"


def test_two_machines_split_a_quadrant_sweep_with_one_cell_run_and_each_seed_once(tmp_path, postgres_url, mlflow_server):
    """Two sweep processes (as on two machines) share a quadrant sweep: its search trials and seeds
    are spread over both, every cell has exactly one cell run, and each confirmation seed runs exactly once. Its
    strategies are frozen features and scratch, whose seeds train under the from-scratch recipe
    (tests/test_quadrants.py runs features and intermediate; a partial fine-tune is the two-phase
    trial every plain sweep runs, and its confirmation plan is checked in tests/test_scratch.py).

    The backbone is VGG16, the Keras application with the fewest layers: training a backbone from
    scratch costs mostly the tracing of its graph, which grows with its layers, and at 32 px its
    convolutions are cheap. This sweep took 31 CPU-seconds with it, 78 with MobileNetV2."""
    from harness.frameworks.keras import backbones as bb

    weights = tmp_path / "src.weights.h5"
    bb.construct("VGG16", 32, None, {}).save_weights(weights)
    name = f"quadpg-{uuid.uuid4().hex[:8]}"
    text = (
        quad(weights, "[features, scratch]")
        .replace("name: quad", f"name: {name}")
        .replace("MobileNetV2: {alpha: 0.35}", "VGG16: {}")
        .replace("backbone: MobileNetV2", "backbone: VGG16")
        .replace("trials_per_cell: 2", "trials_per_cell: 1")
        .replace("logme_max_images: 40", "logme: false")
    )
    text = text.split("    - name: digits-small")[0]  # one target: two cells are enough to share
    assert "MobileNetV2" not in text
    config = write_config(tmp_path, text)
    args = [sys.executable, "-m", "harness.sweep", str(config), "--storage", postgres_url, "--tracking-uri", mlflow_server]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = []
    for i in range(2):
        (tmp_path / f"m{i}").mkdir()
        procs.append(
            subprocess.Popen(args, cwd=tmp_path / f"m{i}", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    outputs = [p.communicate(timeout=900)[1] for p in procs]
    for p, err in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]

    cells = [f"{name}.shapes-small.{s}" for s in ("features", "scratch")]
    for cell in cells:
        search = optuna.load_study(study_name=cell, storage=postgres_url)
        seeds = optuna.load_study(study_name=f"{cell}.confirm", storage=postgres_url)
        assert [t.state.name for t in search.trials] == ["COMPLETE"]
        assert sorted(t.params["seed"] for t in seeds.trials) == [0, 1]  # each seed once, none twice
        assert all(t.state.name == "COMPLETE" for t in seeds.trials)
    # Which process claims which of the six jobs (two search trials, four seeds) is a race; that
    # both took a share is not. Each process's log names what it started.
    started = [[line for line in err.splitlines() if " starts: " in line] for err in outputs]
    assert all(started), f"both sweep processes must have run work: {started}"

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], max_results=500, run_view_type=3)  # deleted runs too
    cell_runs = [r for r in runs if r.data.tags.get("harness.role") == "cell"]
    assert sorted(r.data.tags["harness.cell"] for r in cell_runs) == sorted(c.removeprefix(f"{name}.") for c in cells)
    assert all(r.info.status == "FINISHED" for r in cell_runs)
    for cell in cell_runs:
        confirms = [
            r
            for r in runs
            if r.data.tags.get("harness.role") == "confirm" and r.data.tags["mlflow.parentRunId"] == cell.info.run_id
        ]
        assert sorted(r.data.tags["harness.seed"] for r in confirms) == ["0", "1"]
        for r in confirms:  # every strategy's seeds under one rule: the scratch recipe's step floor, 6 steps in all
            assert "at least 6 optimizer steps in all" in r.data.tags["harness.training_rule"]
            if r.data.tags["strategy"] == "scratch":  # steps of every attempt: a retry at another rate adds its own
                assert r.data.metrics["cost/images_seen"] / 16 >= 6
    # a scratch seed shows its epochs as a trial does: it is never silent
    assert any(
        "shapes-small.scratch confirm [" in line and " scratch epoch " in line for err in outputs for line in err.splitlines()
    )


def test_the_claim_lock_serialises_processes_through_a_studys_own_storage(postgres_url):
    """The engine takes the lock through `study._storage`, Optuna's caching wrapper: the lock must
    reach PostgreSQL through it, so a second holder waits until the first lets go."""
    import threading

    from harness import study as st

    storage = fresh_database(os.environ["HARNESS_TEST_POSTGRES"])
    study = optuna.create_study(study_name="lock", storage=st.make_storage(storage))
    order = []
    with st.claim_lock(study._storage, "lock"):
        other = threading.Thread(target=lambda: _hold(study, order))
        other.start()
        time.sleep(1.0)
        order.append("first releases")
    other.join(timeout=30)
    assert order == ["first releases", "second holds"]


def _hold(study, order):
    from harness import study as st

    with st.claim_lock(study._storage, "lock"):
        order.append("second holds")

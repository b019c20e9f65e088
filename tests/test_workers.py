"""Several workers, one study: a real PostgreSQL storage and a real MLflow tracking server.

PostgreSQL comes from `scripts/postgres.sh` (which `.ci/run` runs): its URL arrives in
HARNESS_TEST_POSTGRES. The MLflow server is started here, on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, TINY, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def postgres_url():
    url = os.environ.get("HARNESS_TEST_POSTGRES")
    if not url:
        if os.environ.get("CI"):
            pytest.fail("HARNESS_TEST_POSTGRES is not set: .ci/run must start PostgreSQL (scripts/postgres.sh)")
        pytest.skip("no PostgreSQL: run `bash scripts/postgres.sh` and set HARNESS_TEST_POSTGRES to the URL it prints")
    # A fresh database per run, so the workers also race to create Optuna's schema, as on day one.
    import sqlalchemy as sa

    name = f"harness_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    yield url.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{uri}/health", timeout=2)
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the MLflow tracking server did not start")
            time.sleep(1)
    yield uri
    proc.terminate()
    proc.wait(timeout=30)


def test_two_workers_share_one_study_and_one_tracking_server(tmp_path, postgres_url, mlflow_server):
    study_name = f"workers-{uuid.uuid4().hex[:8]}"
    config = write_config(tmp_path, TINY.replace("scratch: true", "scratch: false"))
    args = [sys.executable, "-m", "harness.sweep", str(config), "--study-name", study_name, "--n-trials", "4",
            "--storage", postgres_url, "--tracking-uri", mlflow_server]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = []
    for i in range(2):  # each worker in its own folder, as on two machines
        (tmp_path / f"w{i}").mkdir()
        workers.append(subprocess.Popen(args, cwd=tmp_path / f"w{i}", env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True))
    outputs = [w.communicate(timeout=900)[1] for w in workers]
    for w, err in zip(workers, outputs):
        assert w.returncode == 0, err[-3000:]

    study = optuna.load_study(study_name=study_name, storage=postgres_url)
    finished = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    # MaxTrialsCallback is checked after each trial: each worker may start one more before it sees the count.
    assert 4 <= len(finished) <= 5
    assert not [t for t in study.trials if t.state.name == "RUNNING"]
    assert len({t.user_attrs["sweep_process"] for t in finished}) == 2, "both workers must have run trials"

    client = MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name(study_name)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("harness.role") == "study"]
    assert len(parents) == 1, "the workers must agree on one parent run"
    trial_runs = {r.info.run_id: r for r in runs if r.data.tags.get("harness.role") == "trial"}
    for t in finished:
        run = trial_runs[t.user_attrs["mlflow_run_id"]]
        assert run.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.info.status in ("FINISHED", "KILLED")
        assert "history.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}  # artifacts via the server

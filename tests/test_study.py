"""Store checks: every problem of the Optuna storage or the MLflow tracking store stops the sweep
with exit 2 and the store named, before the sweep creates anything (no optuna.db, sweep.lock or run)."""

from __future__ import annotations

import hashlib
import shutil
import sqlite3

import optuna
import pytest

from harness import study as st
from harness.config import SweepRefused
from harness.sweep import check_tracking_store
from tests.conftest import run_cli, write_config


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def refusal(check, *args) -> str:
    with pytest.raises(SweepRefused) as info:
        check(*args)
    return str(info.value)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """A real, current MLflow SQLite store (MLflow creates and migrates it)."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def test_the_cli_refuses_a_corrupt_mlflow_db_before_creating_anything(workdir):
    config = write_config(workdir)
    (workdir / "results").mkdir()
    (workdir / "results" / "mlflow.db").write_bytes(b"not a database, whatever it once was " * 200)
    before = files_under(workdir)
    proc = run_cli(str(config), cwd=workdir, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"MLflow tracking store sqlite:///{workdir / 'results' / 'mlflow.db'}: " in proc.stderr
    assert "is not a readable SQLite database (file is not a database)" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_under(workdir) == before  # no results/tiny/, optuna.db or sweep.lock


def test_the_cli_refuses_a_study_of_the_other_direction_before_creating_anything(workdir):
    config = write_config(workdir)
    storage = f"sqlite:///{workdir / 'results' / 'tiny' / 'optuna.db'}"
    (workdir / "results" / "tiny").mkdir(parents=True)
    optuna.create_study(study_name="tiny", storage=storage, direction="minimize")
    before = files_under(workdir)
    proc = run_cli(str(config), cwd=workdir, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"Optuna storage {storage}: study 'tiny' exists with direction minimize, but the config says maximize" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_under(workdir) == before  # no sweep.lock, no mlflow.db, no parent run
    assert len(optuna.load_study(study_name="tiny", storage=storage).trials) == 0


def test_a_store_that_does_not_exist_yet_passes_and_is_not_created(tmp_path):
    st.check_storage(f"sqlite:///{tmp_path / 'new' / 'optuna.db'}", "s", "maximize")
    check_tracking_store(f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}")
    assert files_under(tmp_path) == []


def test_an_existing_study_of_the_same_direction_passes_read_only(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url, direction="maximize")
    db = tmp_path / "optuna.db"
    # Every write SQLite commits changes the file's header (its change counter), and a write
    # transaction leaves a journal beside it: the same bytes, time and files prove none happened.
    before = (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns, files_under(tmp_path))
    st.check_storage(url, "s", "maximize")
    st.check_storage(url, "another", "minimize")
    assert (hashlib.sha256(db.read_bytes()).hexdigest(), db.stat().st_mtime_ns, files_under(tmp_path)) == before


def test_a_damaged_database_is_named_whichever_store_it_is(tmp_path, mlflow_store):
    data = mlflow_store.read_bytes()
    (tmp_path / "truncated.db").write_bytes(data[: len(data) // 2])
    url = f"sqlite:///{tmp_path / 'truncated.db'}"
    assert "database disk image is malformed" in refusal(check_tracking_store, url)
    assert refusal(st.check_storage, url, "s", "maximize").startswith(f"Optuna storage {url}: ")


def test_each_store_refuses_the_others_database(tmp_path, mlflow_store):
    optuna_url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=optuna_url)
    message = refusal(check_tracking_store, optuna_url)
    assert message.startswith(f"MLflow tracking store {optuna_url}: its schema (alembic revision v")
    assert "another application's database (an Optuna storage?)" in message
    message = refusal(st.check_storage, f"sqlite:///{mlflow_store}", "s", "maximize")
    assert "holds another application's tables (" in message and "not Optuna's" in message
    assert (tmp_path / "optuna.db").stat().st_size and mlflow_store.stat().st_size  # both untouched, still there


def test_an_mlflow_store_at_an_old_schema_is_refused_with_the_upgrade_command(tmp_path, mlflow_store):
    old = tmp_path / "old.db"
    shutil.copy(mlflow_store, old)
    with sqlite3.connect(old) as conn:
        conn.execute("UPDATE alembic_version SET version_num = '0c779009ac13'")  # one of MLflow's older revisions
    message = refusal(check_tracking_store, f"sqlite:///{old}")
    assert "its schema (revision 0c779009ac13) is older than MLflow" in message
    assert f"then run: mlflow db upgrade sqlite:///{old}" in message


def test_an_optuna_storage_at_an_old_schema_is_refused_in_optunas_words(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="s", storage=url)
    with sqlite3.connect(tmp_path / "optuna.db") as conn:
        conn.execute("UPDATE alembic_version SET version_num = 'v3.0.0.a'")
    assert "optuna storage upgrade" in refusal(st.check_storage, url, "s", "maximize")


def test_unreachable_servers_are_named_without_their_password(tmp_path):
    message = refusal(st.check_storage, "postgresql://sweeper:s3cret-pw@127.0.0.1:1/db", "s", "maximize")
    assert message.startswith("Optuna storage postgresql://sweeper:***@127.0.0.1:1/db: cannot reach or open it")
    message = refusal(check_tracking_store, "http://sweeper:s3cret-pw@127.0.0.1:1")
    assert message.startswith("MLflow tracking store http://sweeper:***@127.0.0.1:1: no answer")
    assert "s3cret-pw" not in message


def test_a_study_and_its_seed_studies_name_their_metric_for_the_dashboard(tmp_path):
    import warnings

    from optuna.exceptions import ExperimentalWarning

    from harness.config import parse_config
    from tests.conftest import TINY

    cfg = parse_config(TINY, "s.yaml")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert st.open_study(cfg, url).metric_names == [cfg.study.metric] == ["val_accuracy"]
        assert st.open_study(cfg, url, reseed=True).metric_names == ["val_accuracy"]  # resumed: still named
        assert st.open_seed_study(f"{cfg.study.name}.confirm", url).metric_names == ["test_accuracy"]
    assert not [w for w in caught if issubclass(w.category, ExperimentalWarning)]  # a sweep's log holds its own lines


def test_successive_halving_keeps_the_top_third_at_each_rung_from_the_warm_up_epochs():
    from harness.config import parse_config
    from tests.conftest import TINY

    cfg = parse_config(TINY.replace("pruner: none", "pruner: successive_halving\n  pruner_warmup_epochs: 1"), "s.yaml")
    pruner = st.make_pruner(cfg)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
    pruned = []
    for value in (0.9, 0.8, 0.7, 0.1):  # the fourth is worse than the top third at the first rung
        trial = study.ask()
        trial.report(value, step=1)
        pruned.append(trial.should_prune())
        study.tell(trial, value)
    assert pruned[-1] is True and pruned[0] is False

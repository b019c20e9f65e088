"""No secret in any record, on the shared setup: a PostgreSQL role with a password and an MLflow
tracking server behind its basic-auth app.

One tiny sweep is run with the database password inside its --storage URL (the worst a user can
do) and the server's login in MLflow's environment variables. Neither password may then appear
in anything the sweep printed, wrote under its working folder, logged to the tracking server or
stored in the study's database. PostgreSQL comes from `scripts/postgres.sh` (HARNESS_TEST_POSTGRES);
the tracking server is started here, on 127.0.0.1.
"""

from __future__ import annotations

import base64
import os
import secrets
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY, run_cli, serve_mlflow, write_config

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("secrets")]  # module fixtures: one xdist worker

ADMIN = "admin"


def pgpass_password(url: str) -> str:
    """The password libpq would use for `url`: the URL's own, else the first matching ~/.pgpass
    line ($PGPASSFILE), as scripts/postgres.sh writes it."""
    parts = urlsplit(url)
    if parts.password:
        return parts.password
    path = Path(os.environ.get("PGPASSFILE") or Path.home() / ".pgpass")
    wanted = (parts.hostname, str(parts.port or 5432), parts.path.lstrip("/"), parts.username)
    for line in path.read_text().splitlines():
        fields = line.split(":", 4)
        if len(fields) == 5 and all(f in ("*", w) for f, w in zip(fields[:4], wanted)):
            return fields[4]
    pytest.fail(f"no password for {url} in {path}")


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """`mlflow server --app-name basic-auth` on 127.0.0.1; yields (URI, admin password, its folder)."""
    folder = tmp_path_factory.mktemp("auth-server")
    password = secrets.token_hex(16)
    config = folder / "basic_auth.ini"
    config.write_text(
        f"[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///{folder}/basic_auth.db\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,  # read once, when the admin user is created
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }  # the auth app's CSRF protection
    with serve_mlflow(folder, "--app-name", "basic-auth", env=env) as uri:
        yield uri, password, folder


@pytest.fixture(scope="module")
def secret_sweep(tmp_path_factory, postgres_url, auth_server):
    """One trial, no baseline: the parent run, a trial run and the winner's test are enough to
    carry the storage URL and the tracking login into every kind of record."""
    uri, mlflow_password, _ = auth_server
    db_password = pgpass_password(postgres_url)
    parts = urlsplit(postgres_url)
    storage = urlunsplit(
        parts._replace(netloc=f"{parts.username}:{quote(db_password, safe='')}@{parts.hostname}:{parts.port or 5432}")
    )
    work = tmp_path_factory.mktemp("secret-sweep")
    name = f"secrets-{uuid.uuid4().hex[:8]}"
    config = write_config(work, TINY.replace("n_trials: 2", "n_trials: 1").replace("scratch: true", "scratch: false"))
    result = run_cli(
        str(config),
        "--study-name",
        name,
        "--storage",
        storage,
        "--tracking-uri",
        uri,
        cwd=work,
        env={"MLFLOW_TRACKING_USERNAME": ADMIN, "MLFLOW_TRACKING_PASSWORD": mlflow_password},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return {
        "work": work,
        "name": name,
        "storage": postgres_url,
        "result": result,
        "passwords": {"PostgreSQL": db_password, "MLflow": mlflow_password},
    }


def _files_holding(folder: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def _database_rows_holding(url: str, secret: str) -> list[str]:
    """Every row of every table of the study's database, as text, that holds `secret`."""
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    found = []
    with engine.connect() as conn:
        tables = conn.execute(sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars().all()
        assert "studies" in tables, tables  # Optuna's schema: the sweep did write here
        for table in tables:
            rows = conn.execute(sa.text(f'SELECT CAST(t AS text) FROM "{table}" t')).scalars().all()
            found += [f"{table}: {row}" for row in rows if secret in row]
    engine.dispose()
    return found


def test_no_password_is_printed_written_logged_or_stored(secret_sweep, auth_server):
    work, result = secret_sweep["work"], secret_sweep["result"]
    _, _, server_folder = auth_server
    for kind, secret in secret_sweep["passwords"].items():
        assert secret not in result.stdout + result.stderr, f"the {kind} password was printed"
        assert not _files_holding(work, secret), f"the {kind} password is in a file under the working folder"
        assert not _files_holding(server_folder, secret), f"the {kind} password is in the tracking store"
        assert not _database_rows_holding(secret_sweep["storage"], secret), f"the {kind} password is in the study's database"


def test_the_sweeps_log_holds_no_mlflow_run_links_download_bars_or_leak_warnings(secret_sweep):
    """A sweep on a tracking server: MLflow's "View run ... at:" lines, its artifact download bars
    (the winner's model is reloaded for its test) and the resource tracker's warning stay out."""
    log = secret_sweep["result"].stdout + secret_sweep["result"].stderr
    assert "View run" not in log and "View experiment" not in log
    assert "Downloading artifacts" not in log and "leaked semaphore" not in log


@pytest.fixture
def admin_view(secret_sweep, auth_server, monkeypatch):
    """An MLflow client logged in as the server's admin (through the environment), and the sweep's experiment."""
    uri, password, _ = auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    client = MlflowClient(uri)
    return client, client.get_experiment_by_name(secret_sweep["name"])


def test_the_storage_url_is_recorded_with_its_password_masked(secret_sweep, admin_view):
    """Not vacuous: the URL with the password did reach the records, masked."""
    client, exp = admin_view
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("harness.role") == "study")
    assert parent.data.tags["optuna.storage"].startswith("postgresql://harness:***@127.0.0.1")
    config = Path(client.download_artifacts(parent.info.run_id, "config.yaml")).read_text()
    assert "storage: postgresql://harness:***@127.0.0.1" in config
    assert "sharing the study through postgresql://harness:***@127.0.0.1" in secret_sweep["result"].stderr


def test_the_sweep_logs_to_the_authenticated_server_with_the_login_from_the_environment(admin_view):
    client, exp = admin_view
    runs = client.search_runs([exp.experiment_id])
    roles = sorted(r.data.tags.get("harness.role") for r in runs)
    assert roles == ["study", "trial"]
    assert all(r.info.status == "FINISHED" for r in runs)
    trial = next(r for r in runs if r.data.tags["harness.role"] == "trial")
    assert "history.csv" in {a.path for a in client.list_artifacts(trial.info.run_id)}  # artifacts through the server


def test_a_client_without_the_login_is_refused(auth_server):
    uri, password, _ = auth_server
    url = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
    for login in (None, f"{ADMIN}:wrong-password", f"nobody:{password}"):
        request = urllib.request.Request(url)
        if login:
            request.add_header("Authorization", "Basic " + base64.b64encode(login.encode()).decode())
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 401, login
    good = urllib.request.Request(
        url, headers={"Authorization": "Basic " + base64.b64encode(f"{ADMIN}:{password}".encode()).decode()}
    )
    assert urllib.request.urlopen(good, timeout=10).status == 200


def test_runs_ended_on_a_tracking_server_print_no_view_run_lines(auth_server, monkeypatch, capsys):
    """MLflow prints "View run ... at: http://..." and "View experiment at: ..." to stdout whenever a
    run on a server ends; a sweep's log holds only its own lines."""
    import mlflow

    from harness.tracking import URL_LINES_OFF, Tracker, global_tracking_uri

    uri, password, _ = auth_server
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    monkeypatch.setenv(URL_LINES_OFF, "")
    monkeypatch.delenv(URL_LINES_OFF)  # unset, as in a fresh process (and restored after the test)
    tracker = Tracker(uri, f"quiet-{uuid.uuid4().hex[:8]}")
    tracker.start_study_run("quiet", {}, "sqlite:///x.db")
    tracker.end_run(tracker.start_child("trial 0", "trial", {}), "FINISHED")
    with global_tracking_uri(uri), mlflow.start_run(run_id=tracker.start_child("trial 1", "trial", {})):
        pass  # the fluent API's end, as when a model is logged
    tracker.end_study_run()
    out = capsys.readouterr().out
    assert "View run" not in out and "View experiment" not in out
    monkeypatch.setenv(URL_LINES_OFF, "false")  # not vacuous: with MLflow's switch off, the same end prints them
    tracker.end_run(tracker.start_child("trial 2", "trial", {}), "FINISHED")
    assert f"View run trial 2 at: {uri}/#/experiments/{tracker.experiment_id}/runs/" in capsys.readouterr().out

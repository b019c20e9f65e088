"""Shared fixtures: tiny offline configs, run from a temporary working directory."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests choose their own stores

ROOT = Path(__file__).resolve().parent.parent

TINY = """
study:
  name: tiny
  n_trials: 2
  seed: 0
  pruner: none
data:
  source: builtin
  name: shapes
  image_size: 32
  builtin_size: 10
  classes: [pentagon, star4, three_dots]
  val_fraction: 0.3
  test_fraction: 0.2
model:
  weights: none
  backbone_options:
    MobileNetV2: {alpha: 0.35}
search:
  backbone: MobileNetV2
  unfreeze_fraction: {low: 0.2, high: 1.0}
  head_units: {choices: [0, 8]}
  head_lr: {low: 0.001, high: 0.01, log: true}
  finetune_lr: {low: 0.0001, high: 0.001, log: true}
  dropout: 0.1
  cut_fraction: 0.2         # tiny: the first 4 of MobileNetV2's 19 blocks, so a model traces in seconds and still fits
train:
  head: {epochs: 2, batch_size: 16, patience: null}
  finetune: {epochs: 2, batch_size: 16, patience: null}
baseline:
  scratch: true
  epochs: 2
  min_steps: 8              # tiny: the floor is for real data
  patience: null
  learning_rate: 0.001      # tiny: no rate search (tests/test_sweep.py runs the real sweep's, auto)
  retries: 0                # tiny: no retry at another rate (tests/test_scratch.py covers them)
"""


# Longest first: the xdist groups (tests sharing a module-scoped fixture), then the files of long
# single tests. With two workers the two longest groups start at once, one on each, and the short
# tests fill in around them. Collection order is dispatch order: xdist's own reordering by group
# size is off (--no-loadscope-reorder in pyproject.toml).
_LONGEST_GROUPS = ("quad", "sweep", "servers", "retry", "secrets")
_LONG_FILES = ("test_reliability.py", "test_scratch.py", "test_frameworks.py")


def pytest_configure(config):
    """In each test process (an xdist worker, or pytest without xdist): import TensorFlow once and
    hide its objects from the garbage collector, as trial processes do (runtime.freeze_imported_objects).
    Most tests build Keras models in process; each full collection would walk TensorFlow's objects."""
    if os.environ.get("PYTEST_XDIST_WORKER") or not getattr(config.option, "numprocesses", None):
        from harness import runtime
        from harness.frameworks import framework_named

        # The torch stack first, where the torch extra is installed: imported after TensorFlow,
        # torchvision's import of triton (CUDA builds of torch) crashes the process. A trial
        # process imports one framework only; a test process runs the tests of both.
        if importlib.util.find_spec("torchvision") is not None:
            import torchvision  # noqa: F401

        framework_named("keras")  # TensorFlow, quietly, and Keras
        import harness.tasks  # noqa: F401 - MLflow and the harness, as a trial process has them
        import harness.tracking  # noqa: F401

        runtime.freeze_imported_objects()


def pytest_collection_modifyitems(config, items):
    def rank(item):
        group = item.get_closest_marker("xdist_group")
        name = (group.args[0] if group.args else group.kwargs.get("name")) if group else None
        if name in _LONGEST_GROUPS:
            return 0, _LONGEST_GROUPS.index(name)
        return (1, _LONG_FILES.index(item.path.name)) if item.path.name in _LONG_FILES else (2, 0)

    items.sort(key=rank)  # stable: each file keeps its own order


def write_config(folder: Path, text: str = TINY, name: str = "sweep.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A fresh working directory: results/ and every store land inside tmp_path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_config(workdir) -> Path:
    return write_config(workdir)


def run_cli(*args: str, cwd: Path, timeout: float = 900, env: dict | None = None):
    """Run `python -m harness.sweep ...` as a real process; return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "harness.sweep", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_main(*args: str, cwd: Path, env: dict | None = None):
    """`python -m harness.sweep ...` run by this test process: the same `main` a sweep process
    runs, from `cwd` with `env` added, its trial processes real child processes. Returns a
    CompletedProcess whose stdout and stderr hold what was written to file descriptors 1 and 2
    (the trial processes' output too, as they share them) and what Python wrote to sys.stdout,
    sys.stderr and logging.

    For tests whose subject is not the process boundary: it saves the sweep process's start (importing
    TensorFlow, Keras and MLflow: about 5 CPU-seconds a sweep, which this process has done already).
    Signals, several sweep processes and everything a whole process writes take run_cli."""
    import logging
    import subprocess
    import tempfile
    import traceback

    from harness import sweep

    handlers = [
        h
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for h in getattr(logger, "handlers", ())
        if type(h) is logging.StreamHandler
    ]
    saved_fds = {fd: os.dup(fd) for fd in (1, 2)}
    # The whole environment comes back afterwards, not only `env`: the sweep sets variables itself
    # (a tracking server's login, TensorFlow's log level), as its own process would keep them.
    saved_environ = dict(os.environ)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, pytest.MonkeyPatch.context() as patch:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            with open(1, "w", buffering=1, closefd=False) as stdout, open(2, "w", buffering=1, closefd=False) as stderr:
                patch.setattr(sys, "stdout", stdout)
                patch.setattr(sys, "stderr", stderr)
                for h in handlers:
                    patch.setattr(h, "stream", stderr)
                os.environ.update(env or {})
                patch.chdir(cwd)
                try:
                    code = sweep.main(list(args))
                except SystemExit as exc:  # argparse's refusals, as the process would exit
                    code = exc.code if isinstance(exc.code, int) else 1
                except Exception:  # noqa: BLE001 - a crash reads as the process's would: traceback, code 1
                    traceback.print_exc()
                    code = 1
                patch.undo()  # the streams, handlers and folder, before the files close
        finally:
            os.environ.clear()
            os.environ.update(saved_environ)
            for fd, saved in saved_fds.items():
                os.dup2(saved, fd)
                os.close(saved)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(
            ["harness.sweep", *args], code, out.read().decode(errors="replace"), err.read().decode(errors="replace")
        )


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_mlflow(folder: Path, *extra_args: str, env: dict | None = None):
    """A real `mlflow server` on 127.0.0.1 over `folder` (SQLite store, local artifacts): its URI
    once /health answers; stopped on leaving the `with` block."""
    import subprocess
    import time
    import urllib.request

    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            *extra_args,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--artifacts-destination",
            str(folder / "artifacts"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        # The server's background job runner (GenAI evaluation jobs) starts nine more processes that
        # the harness never uses: on a 2-core box they only slow the test down.
        env={**os.environ, **(env or {}), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
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
                pytest.fail(f"the MLflow tracking server ({' '.join(extra_args) or 'plain'}) did not start")
            time.sleep(1)
    try:
        yield uri
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# --- small configs and helpers that several test modules share ----------------------------------


DATA = "data: {name: shapes}\n"  # the smallest loadable config: the builtin dataset needs a name


# builtin `shapes`: pentagon, t_shape, star4, tri_ring, three_dots, arc (harness/datasets_builtin.py)
BASE = """
study: {name: targets, n_trials: 1}
model: {weights: none}
search: {backbone: MobileNetV2}
data:
  source: builtin
  name: shapes
  builtin_size: 10
"""


GROUPS = {"round": ["arc", "three_dots"], "pointy": ["star4", "pentagon"], "_drop": ["t_shape", "tri_ring"]}


def problems_of(message: str) -> int:
    return int(re.search(r"(\d+) problem\(s\)", message).group(1))


QUAD = """
study:
  name: quad
  seed: 0
  pruner: none
model:
  weights: {weights}
  backbone_options:
    MobileNetV2: {{alpha: 0.35}}
search:
  backbone: MobileNetV2
  head_lr: {{low: 0.001, high: 0.01, log: true}}
  finetune_lr: {{low: 0.0001, high: 0.001, log: true}}
  dropout: 0.1
train:
  head: {{epochs: 1, batch_size: 16, patience: null}}
  finetune: {{epochs: 1, batch_size: 16, patience: null}}
baseline:                     # the scratch cells' confirmation: a short converged-style run
  epochs: 2
  min_steps: 6
  learning_rate: 0.002
  patience: null
quadrants:
  strategies: {strategies}
  trials_per_cell: 2
  confirm_seeds: 2
  logme_max_images: 40
  targets:
    - name: shapes-small
      size: small
      similarity: similar
      data: {{source: builtin, name: shapes, builtin_size: 10, classes: [pentagon, star4, arc]}}
    - name: digits-small
      size: small
      similarity: dissimilar
      data: {{source: builtin, name: digits, classes: ['0', '1'], train_per_class: 8, val_per_class: 6}}
"""


ALL = "[features, intermediate, partial, full, scratch]"


def quad(weights, strategies=ALL) -> str:
    return QUAD.format(weights=weights, strategies=strategies)


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory) -> str:
    """A MobileNetV2 (alpha 0.35, 32 px) weights file the harness wrote itself, standing in for
    pretrained weights offline."""
    import keras

    from harness.frameworks.keras import backbones as bb

    path = tmp_path_factory.mktemp("w") / "mnv2.weights.h5"
    keras.utils.set_random_seed(0)  # the same weights whatever ran before in this process
    bb.construct("MobileNetV2", 32, None, {"alpha": 0.35}).save_weights(path)
    return str(path)


@pytest.fixture
def float32_afterwards(monkeypatch):
    """For a test that switches this process to mixed_float16 or XLA: the next test starts without."""
    import keras

    from harness.frameworks.keras import device

    monkeypatch.setattr(device, "_jit_compile", "auto")
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


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


def fresh_database(url: str) -> str:
    import sqlalchemy as sa

    name = f"harness_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    admin.dispose()
    return url.rsplit("/", 1)[0] + f"/{name}"

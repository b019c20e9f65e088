"""Shared fixtures: tiny offline configs, run from a temporary working directory."""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
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
  cut_fraction: 0.4         # tiny: the first 8 of MobileNetV2's 19 blocks, so a model traces in seconds and still fits
train:
  head: {epochs: 2, batch_size: 16, patience: null}
  finetune: {epochs: 2, batch_size: 16, patience: null}
baseline:
  scratch: true
  epochs: 2
  min_steps: 8              # tiny: the floor is for real data
  patience: null            # learning_rate: auto (a short search)
  retries: 0                # tiny: no retry at another rate (tests/test_baseline.py covers them)
"""


# Longest first: the xdist groups (tests sharing a module-scoped fixture), then the files of long
# single tests. With two workers the two longest groups start at once, one on each, and the short
# tests fill in around them. Collection order is dispatch order: xdist's own reordering by group
# size is off (--no-loadscope-reorder in pyproject.toml).
_LONGEST_GROUPS = ("quad", "sweep", "servers", "retry", "secrets")
_LONG_FILES = ("test_reliability.py", "test_baseline.py")


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
        [sys.executable, "-m", "harness.sweep", *args], cwd=cwd, env=full_env,
        capture_output=True, text=True, timeout=timeout,
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
        [sys.executable, "-m", "mlflow", "server", *extra_args, "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder}/mlflow.db", "--artifacts-destination", str(folder / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
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

"""Work in a child process: results and errors come back, a vanished child is reported, and a
child never outlives the process that started it."""

from __future__ import annotations

import os
import signal

import pytest

from harness.config import ConfigError
from harness.worker import ProcessDied, describe_exit, run_isolated


def add(a, b):
    return {"sum": a + b, "pid": os.getpid()}


def refuse(message):
    raise ConfigError(message)


def die_by(sig):
    os.kill(os.getpid(), sig)


def test_result_comes_back_from_another_process():
    out = run_isolated(add, 2, 3)
    assert out["sum"] == 5 and out["pid"] != os.getpid()


def test_an_error_in_the_child_is_raised_here_as_itself():
    with pytest.raises(ConfigError, match="data.path: nope") as info:
        run_isolated(refuse, "data.path: nope")
    assert any("raised in the trial process" in note for note in info.value.__notes__)


def test_a_child_killed_by_the_os_is_reported_with_the_likely_cause():
    with pytest.raises(ProcessDied) as info:
        run_isolated(die_by, signal.SIGKILL)
    assert info.value.exitcode == -signal.SIGKILL
    assert "killed by SIGKILL" in str(info.value) and "out-of-memory killer" in str(info.value)


def test_a_child_asked_to_stop_reports_an_interruption():
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        run_isolated(die_by, signal.SIGTERM)  # handled in the child: ends its work cleanly


def test_exit_descriptions():
    assert describe_exit(-signal.SIGSEGV) == "trial process killed by SIGSEGV"
    assert "exited with code 3" in describe_exit(3)

"""Work in a child process: results and errors come back, a vanished child is reported, and a
child never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import time

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


def work_until_stopped():
    """Like training: the signal only sets the stop flag, the work checks it at its next step."""
    from harness.phases import stop_requested

    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(200):
        if stop_requested.is_set():
            raise KeyboardInterrupt("stop requested")
        time.sleep(0.05)
    return "never stopped"


def test_a_child_asked_to_stop_ends_its_work_and_reports_an_interruption():
    with pytest.raises(KeyboardInterrupt, match="stop requested"):
        run_isolated(work_until_stopped)


def test_exit_descriptions():
    assert describe_exit(-signal.SIGSEGV) == "trial process killed by SIGSEGV"
    assert "exited with code 3" in describe_exit(3)

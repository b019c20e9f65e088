"""Warm trial processes: one process runs task after task, questions come back to the parent,
errors and deaths are reported, and a child never outlives the process that started it."""

from __future__ import annotations

import os
import signal
import time

import pytest

from harness.config import ConfigError
from harness.worker import TrialProcess, describe_exit


def handle(task, channel):
    """The handler the tests' child processes run: a tiny instruction set."""
    kind, arg = task
    if kind == "add":
        return {"sum": arg[0] + arg[1], "pid": os.getpid(), "threads": os.environ.get("TEST_SLOT")}
    if kind == "ask":
        return channel.ask(arg) * 10
    if kind == "refuse":
        raise ConfigError(arg)
    if kind == "die":
        os.kill(os.getpid(), arg)
    if kind == "bar":  # as MLflow draws one when it downloads a model's artifacts
        import io

        from tqdm.auto import tqdm

        with tqdm(total=1, file=io.StringIO()) as bar:
            bar.update()
        return "drawn"
    if kind == "work_until_stopped":
        from harness.runtime import stop_requested

        while not stop_requested.is_set():
            time.sleep(0.05)
        raise KeyboardInterrupt("stop requested")
    raise ValueError(kind)


def next_outcome(proc, answer=None, timeout=120):
    """Messages until the task's outcome; questions are answered with `answer(payload)`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.conn.poll(1):
            continue
        message = proc.receive()
        if message is None or message[0] in ("done", "error", "interrupted"):
            return message
        if message[0] == "ask":
            proc.send(("reply", answer(message[1])))
    raise AssertionError("no outcome in time")


@pytest.fixture
def proc():
    p = TrialProcess(handle, env={"TEST_SLOT": "gpu-7"})
    yield p
    p.kill()


def test_one_warm_process_runs_task_after_task_with_its_environment(proc):
    proc.start_task(("add", (2, 3)))
    first = next_outcome(proc)
    proc.start_task(("add", (4, 5)))
    second = next_outcome(proc)
    assert first[0] == "done" and first[1]["sum"] == 5 and second[1]["sum"] == 9
    assert first[1]["pid"] == second[1]["pid"] == proc.pid != os.getpid()  # the same warm process
    assert first[1]["threads"] == "gpu-7"  # the slot's environment reached the child
    assert proc.ready and proc.rss > 0 and proc.tasks_started == 2


def test_a_question_is_answered_by_the_parent(proc):
    proc.start_task(("ask", 4))
    assert next_outcome(proc, answer=lambda x: x + 1)[:2] == ("done", 50)


def test_an_error_comes_back_as_itself_and_the_process_goes_on(proc):
    proc.start_task(("refuse", "data.path: nope"))
    kind, exc, _ = next_outcome(proc)
    assert kind == "error" and isinstance(exc, ConfigError) and "data.path: nope" in str(exc)
    proc.start_task(("add", (1, 1)))
    assert next_outcome(proc)[1]["sum"] == 2


def test_a_child_killed_by_the_os_reads_as_a_death_with_the_likely_cause(proc):
    proc.start_task(("die", signal.SIGKILL))
    assert next_outcome(proc) is None  # no report: the pipe closed
    assert proc.exit_code(timeout=60) == -signal.SIGKILL
    assert "out-of-memory killer" in describe_exit(proc.process.exitcode)


def test_a_child_asked_to_stop_ends_its_task_and_reports_an_interruption(proc):
    proc.start_task(("work_until_stopped", None))
    time.sleep(1)
    while not proc.ready:
        proc.receive()
    proc.interrupt()
    assert next_outcome(proc)[0] == "interrupted"


def test_a_child_dies_with_its_parent(tmp_path):
    """SIGKILL the parent: PR_SET_PDEATHSIG takes the warm child down too (no orphan)."""
    import subprocess
    import sys

    import psutil

    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(os.path.dirname(os.path.dirname(__file__)))!r})\n"
        "from harness.worker import TrialProcess\n"
        "from tests.test_worker import handle\n"
        "p = TrialProcess(handle)\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if psutil.Process(child_pid).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    else:
        raise AssertionError(f"child {child_pid} outlived its parent")


def test_a_process_that_drew_a_progress_bar_leaves_no_semaphore_behind(tmp_path):
    """The resource tracker names what a process tree left behind when the parent exits; the parent
    and its child both end by os._exit, as the sweep and its trial processes do."""
    import subprocess
    import sys

    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(os.path.dirname(os.path.dirname(__file__)))!r})\n"
        "from harness.worker import TrialProcess\n"
        "from tests.test_worker import handle, next_outcome\n"
        "if __name__ == '__main__':\n"
        "    p = TrialProcess(handle)\n"
        "    p.start_task(('bar', None))\n"
        "    print(next_outcome(p)[1], flush=True)\n"
        "    p.retire()\n"
        "    p.process.join(60)\n"
        "    os._exit(0)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "drawn", done.stderr[-3000:]
    assert "leaked" not in done.stderr, done.stderr[-3000:]


def test_exit_descriptions():
    assert "SIGKILL" in describe_exit(-signal.SIGKILL) and "out-of-memory" in describe_exit(-signal.SIGKILL)
    assert "SIGSEGV" in describe_exit(-signal.SIGSEGV)
    assert "code 3" in describe_exit(3)


def next_message(proc, kinds, timeout=120):
    """The next message of one of `kinds` (questions are not expected here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.conn.poll(1):
            message = proc.receive()
            if message is None or message[0] in kinds:
                return message
    raise AssertionError(f"no {kinds} message in time")


def test_a_successor_initializes_its_devices_only_after_its_predecessor_exited():
    """The successor imports while its predecessor still runs a task, then waits: the predecessor
    is let go only once the successor says it is waiting, and the successor, at its device
    initialization, sees the predecessor exited. A task sent meanwhile runs after that."""
    first = TrialProcess(handle)
    try:
        first.start_task(("ask", 1))
        assert next_message(first, ("ask",))[1] == 1  # busy: blocked until its question is answered
        second = TrialProcess(handle, after=first)
        try:
            assert next_message(second, ("waiting",))[1] == second.pid  # imports done, GPU untouched
            second.start_task(("add", (1, 2)))  # sent before the predecessor exits: kept until "go"
            first.send(("reply", 7))
            assert next_outcome(first)[:2] == ("done", 70)
            first.retire()
            assert next_message(second, ("ready",))[0] == "ready"
            assert second.devices["predecessor"] == first.pid
            assert second.devices["predecessor_at_init"] == "exited"
            assert first.exit_code(timeout=60) == 0  # it finished normally, not killed
            assert next_outcome(second)[1]["sum"] == 3
        finally:
            second.kill()
    finally:
        first.kill()


def test_without_a_predecessor_the_process_starts_at_once_and_reports_its_gpu_memory_rule():
    """On CPU (no predecessor to wait for) the successor is ready while the current process is
    still busy, as before; the child applied the configured rule to the GPUs it sees (none here)."""
    busy = TrialProcess(handle)
    try:
        busy.start_task(("ask", 1))
        assert next_message(busy, ("ask",))[0] == "ask"
        fresh = TrialProcess(handle, gpu_memory_limit_mib=2048)
        try:
            assert next_message(fresh, ("ready", "waiting"))[0] == "ready"  # while `busy` still runs
            assert busy.alive()
            assert fresh.devices == {"predecessor": None, "predecessor_at_init": None, "gpu_memory": {}}
        finally:
            fresh.kill()
    finally:
        busy.kill()


def test_a_successor_told_to_finish_before_its_predecessor_exits_never_touches_the_gpu():
    first = TrialProcess(handle)
    try:
        first.start_task(("ask", 1))
        next_message(first, ("ask",))
        second = TrialProcess(handle, after=first)
        assert next_message(second, ("waiting",))[0] == "waiting"
        second.retire()
        assert next_message(second, ("ready",)) is None  # it exited without a "ready"
        assert second.exit_code(timeout=60) == 0
    finally:
        first.kill()

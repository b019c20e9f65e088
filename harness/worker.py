"""Run a unit of work (a batch of trials, a quadrant cell) in a fresh child process.

Why not simply in the sweep process: Keras' `model.fit` leaks. Every fit of a MobileNetV2 keeps
~160 MB after `keras.backend.clear_session()`, `gc.collect()` and `malloc_trim`
(benchmarks/keras_fit_leak.py; upstream tensorflow#61791, keras#21090). Over an overnight sweep
that is tens of GB. A process that exits gives all of it back, GPU memory included, and a trial
the operating system kills (the kernel's out-of-memory killer sends SIGKILL) fails alone instead
of ending the sweep. The price is one Python + TensorFlow start-up per child (a few seconds).

The child is spawned (never forked: TensorFlow's threads do not survive a fork), dies with its
parent (PR_SET_PDEATHSIG), and reports back through a pipe: its result, an exception, or that it
was interrupted. When the sweep is told to stop (SIGTERM, Ctrl-C), the child is asked first, so
its running trial ends cleanly before the sweep exits.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable

STOP_GRACE_SECONDS = 120  # how long a child may take to end its trial after SIGTERM


class ProcessDied(Exception):
    """The child ended without reporting: killed by a signal (often out of memory) or crashed hard."""

    def __init__(self, pid: int, exitcode: int | None):
        self.pid, self.exitcode = pid, exitcode
        super().__init__(describe_exit(exitcode))


class ChildError(Exception):
    """The child raised an exception that could not be sent back as itself; carries its traceback."""


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = (": on Linux usually the kernel's out-of-memory killer (see `dmesg`); give the trial "
                "less memory (smaller batch or input size) or the machine more") if -exitcode == signal.SIGKILL else ""
        return f"trial process killed by {name}{hint}"
    return f"trial process exited with code {exitcode} without reporting a result"


def run_isolated(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` in a new process; returns its result or raises what it raised.

    Raises KeyboardInterrupt when the child was interrupted (or this process was, in which case
    the child is stopped first) and ProcessDied when it vanished without a word. `fn` and `args`
    must be picklable; `fn` a module-level function.
    """
    ctx = multiprocessing.get_context("spawn")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child_main, args=(send, os.getpid(), fn, args), name=f"harness-{fn.__name__}")
    child.start()
    send.close()  # only the child writes; our copy would hide its end-of-file
    try:
        message = _wait_for_report(child, receive)
    except KeyboardInterrupt:
        _stop(child)
        raise
    finally:
        receive.close()
    if message is None:
        raise ProcessDied(child.pid, child.exitcode)
    kind, payload = message
    if kind == "ok":
        return payload
    if kind == "interrupted":
        raise KeyboardInterrupt(payload)
    raise payload


def _wait_for_report(child, receive):
    while True:
        if receive.poll(0.5):
            try:
                message = receive.recv()
            except EOFError:  # the pipe closed without a report: the child died
                message = None
            child.join()
            return message
        if not child.is_alive():
            child.join()
            return receive.recv() if receive.poll(0) else None


def _stop(child) -> None:
    """Ask the child to end its running trial cleanly; kill it if it does not within the grace."""
    if child.is_alive():
        os.kill(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while child.is_alive():
        try:
            child.join(timeout=max(0.1, deadline - time.monotonic()))
        except KeyboardInterrupt:  # asked twice: stop waiting; the resume fails the orphan
            break
        if time.monotonic() >= deadline:
            break
    if child.is_alive():
        child.kill()
        child.join()


# --- the child's side -------------------------------------------------------------------------


def _child_main(report, parent_pid: int, fn: Callable[..., Any], args: tuple) -> None:
    _die_with_parent(parent_pid)
    from harness.sweep import _quiet_libraries, import_tensorflow_quietly

    import_tensorflow_quietly()  # first: other imports would pull TensorFlow in with its banner
    _install_stop_handlers()
    code = 0
    try:
        _quiet_libraries()
        report.send(("ok", fn(*args)))
    except KeyboardInterrupt as exc:
        report.send(("interrupted", str(exc) or "interrupted"))
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
        report.send(("error", _sendable(exc)))
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    # Skip the interpreter's teardown: collecting a large TensorFlow heap can take a minute.
    os._exit(code)


def _sendable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling (ConfigError, TrialFailed, ...), else its traceback."""
    import pickle

    exc.add_note("raised in the trial process:\n" + "".join(traceback.format_exception(exc)))
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - e.g. TensorFlow errors with extra constructor arguments
        return ChildError("".join(traceback.format_exception(exc)))


def _install_stop_handlers() -> None:
    """SIGTERM/SIGINT only set the stop flag: training raises KeyboardInterrupt at its next batch
    (harness/phases.py) and a new trial does not start (harness/objective.py). Raising from the
    handler itself could land inside a database transaction of Optuna or MLflow, and the clean-up
    that marks the trial FAIL and its run KILLED would then fail with it."""
    from harness.phases import stop_requested

    def handler(signum, frame):
        stop_requested.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)


def _die_with_parent(parent_pid: int) -> None:
    """A child must not outlive a sweep that was killed (SIGKILL cannot be forwarded)."""
    try:
        import ctypes
        import ctypes.util

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: watch the parent instead
        def watch():
            while os.getppid() == parent_pid:
                time.sleep(1)
            os._exit(1)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != parent_pid:  # the parent died before the signal was armed
        os._exit(1)

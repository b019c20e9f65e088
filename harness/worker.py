"""Warm trial processes: spawn one, hand it tasks one after another, watch it, stop it.

Why trials do not run in the sweep process: Keras' `model.fit` leaks. Every fit of a MobileNetV2
keeps ~160 MB after `keras.backend.clear_session()`, `gc.collect()` and `malloc_trim`
(benchmarks/keras_fit_leak.py; upstream tensorflow#61791, keras#21090). Over an overnight sweep
that is tens of GB. A process that exits gives all of it back, GPU memory included, and a trial
the operating system kills (the kernel's out-of-memory killer sends SIGKILL) fails alone instead
of ending the sweep.

Why one process does not run just one trial: a process start costs a TensorFlow import, a data
load and graph tracing (~15 s here). So a trial process stays warm and runs task after task, and
the trial engine (harness/trials.py) retires it once it has run `study.trials_per_process` tasks
or its memory has grown by `study.recycle_memory_mib` (Celery's max-tasks-per-child and
max-memory-per-child). Its successor is started while its last task still runs.

On a GPU two processes must not fight over its memory. Each trial process turns on TensorFlow's
memory growth, or caps itself at train.gpu_memory_limit_mib, before anything touches the GPU
(harness/runtime.py `configure_gpu_memory`); and a successor on the GPU of a retiring process (`after=`) imports
TensorFlow early, but initializes its devices only once the parent has seen its predecessor exit
(the parent sends "go"). On CPU there is nothing to hand over, and the successor starts at once.

The child is spawned (never forked: TensorFlow's threads do not survive a fork), dies with its
parent (PR_SET_PDEATHSIG), and talks to it over a duplex pipe:

    parent -> child   ("task", task)      run this (the handler given at spawn does the work)
                      ("reply", value)    the answer to the child's last ("ask", ...)
                      None                finish: exit after the current task
                      ("go", pid)         (a successor) its predecessor `pid` has exited: use the GPU
    child  -> parent  ("waiting", pid)    (a successor) imports done; waits for "go" before the GPU
                      ("ready", rss_mib, devices)  devices initialized: the process is warm;
                                          `devices` says which GPUs and memory settings it has
                      ("ask", payload)    a question the task needs answered (e.g. prune now?)
                      ("note", payload)   information, no answer expected (progress)
                      ("done", result, rss_mib)
                      ("error", exception, rss_mib)
                      ("interrupted", text, rss_mib)

When the sweep is told to stop (SIGTERM, Ctrl-C), the child is asked first (SIGTERM), so its
running trial ends cleanly at the next batch before the sweep exits.
"""

from __future__ import annotations

import multiprocessing
import os
import pkgutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from harness import runtime
from harness.frameworks import framework_named
from harness.tracking import quiet_mlflow

STOP_GRACE_SECONDS = 120  # how long a child may take to end its task after SIGTERM


class ChildError(Exception):
    """The child raised an exception that could not be sent back as itself; carries its traceback."""


def describe_exit(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = (
            (
                ": on Linux usually the kernel's out-of-memory killer (see `dmesg`); give the trial "
                "less memory (smaller batch or input size) or the machine more"
            )
            if -exitcode == signal.SIGKILL
            else ""
        )
        return f"trial process killed by {name}{hint}"
    return f"trial process exited with code {exitcode} without reporting a result"


class TrialProcess:
    """The parent's handle on one warm child process.

    `handler(task, channel)` runs in the child for every task; `channel.ask(payload)` sends a
    question back and returns the parent's reply, `channel.note(payload)` just informs.
    `env` is applied to the child's environment before anything is imported there (one GPU per
    process through CUDA_VISIBLE_DEVICES); `framework` is the one framework the child imports
    (harness/frameworks/), and `threads` caps its CPU threads (0 = default);
    `gpu_memory_limit_mib` caps each GPU's memory for the process (None: memory growth). `after`:
    the retiring process on the same GPU; the child initializes no device before it has exited.
    Tasks may be sent at once: the child keeps them until its devices are ready.
    """

    def __init__(
        self,
        handler: Callable[[Any, Channel], Any],
        env: dict[str, str] | None = None,
        threads: int = 0,
        name: str = "harness-trials",
        gpu_memory_limit_mib: float | None = None,
        after: TrialProcess | None = None,
        framework: str = "keras",
    ):
        ctx = multiprocessing.get_context("spawn")
        self.conn, child_end = ctx.Pipe(duplex=True)
        self._send_lock = threading.Lock()  # the "go" comes from a thread of its own
        self.process = ctx.Process(
            target=_child_main,
            args=(
                child_end,
                os.getpid(),
                _name_of(handler),
                env or {},
                threads,
                gpu_memory_limit_mib,
                after is not None,
                framework,
            ),
            name=name,
            daemon=False,
        )
        self.process.start()
        child_end.close()  # only the child holds this end: its death then reads as end-of-file here
        if after is not None:
            threading.Thread(target=self._go_after, args=(after,), daemon=True).start()
        self.devices: dict | None = None  # what the child reported with "ready"
        assert self.process.pid is not None  # a started process has one
        self.pid = self.process.pid
        self.framework = framework  # the one framework this process imports
        self.worker_id = f"{socket.gethostname()}:{self.pid}"
        self.tasks_started = 0
        self.ready = False
        self.rss_after_first: float | None = None  # resident memory after its first task
        self.rss: float | None = None
        self.busy = False

    @property
    def sentinel(self):
        return self.process.sentinel

    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, message) -> None:
        with self._send_lock:
            self.conn.send(message)

    def start_task(self, task) -> None:
        self.tasks_started += 1
        self.busy = True
        self.send(("task", task))

    def _go_after(self, predecessor: TrialProcess) -> None:
        """Tell the child to initialize its devices once `predecessor` has exited (its GPU memory
        is then back)."""
        wait_for_exit(predecessor)
        try:
            self.send(("go", predecessor.pid))
        except (BrokenPipeError, OSError):  # this child is gone too
            pass

    def receive(self):
        """The next message, or None when the child died (its pipe closed)."""
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(timeout=5)
            return None
        if message[0] == "ready":
            self.ready = True
            self.rss = message[1]
            self.devices = message[2] if len(message) > 2 else None
        elif message[0] in ("done", "error", "interrupted"):
            self.busy = False
            self.rss = message[2]
            if self.rss_after_first is None:
                self.rss_after_first = self.rss
        return message

    def exit_code(self, timeout: float = 5) -> int | None:
        """The child's exit code once it has exited (None if it still runs after `timeout` s).

        `retire` reaps the child from a thread of its own, and `receive` joins it when its pipe
        closes. When two threads wait on one child, the one that loses the race gets no code from
        the operating system (the other has reaped it), so poll until the winner has set it."""
        deadline = time.monotonic() + timeout
        while self.process.exitcode is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.process.exitcode

    def memory_growth_mib(self) -> float:
        if self.rss is None or self.rss_after_first is None:
            return 0.0
        return self.rss - self.rss_after_first

    def retire(self) -> None:
        """Let the child finish and exit on its own (it is idle)."""
        try:
            self.send(None)
        except (BrokenPipeError, OSError):
            pass
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self) -> None:
        self.process.join(timeout=STOP_GRACE_SECONDS)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()

    def interrupt(self) -> None:
        """Ask the child to end its running task cleanly (it answers "interrupted")."""
        if self.process.is_alive():
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def wait_for_exit(proc: TrialProcess) -> None:
    """Block until the child `proc` has exited, without reaping it (its owner joins it).

    Its sentinel closes while the process tears down, possibly before its GPU device files are
    closed; a zombie has closed every file. So after the sentinel, wait for the zombie state
    (`waitid` with WNOWAIT leaves the exit status for `join`)."""
    from multiprocessing.connection import wait

    wait([proc.sentinel])
    if hasattr(os, "waitid"):
        try:
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:  # already reaped: long gone
            pass


def process_state(pid: int) -> str:
    """'exited' (gone or a zombie: its memory and files are released) or 'running'."""
    import psutil

    try:
        return "exited" if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE else "running"
    except psutil.NoSuchProcess:
        return "exited"


class Channel:
    """The child's side of the pipe, as the task handler sees it."""

    def __init__(self, conn):
        self._conn = conn

    def ask(self, payload):
        return self.ask_later(payload)()

    def ask_later(self, payload) -> Callable[[], Any]:
        """Send the question now; the returned function waits for the answer. The child works on
        (logs, say) while the parent answers. Call it before asking anything else."""
        self._conn.send(("ask", payload))

        def answer():
            kind, value = self._conn.recv()
            assert kind == "reply", kind
            return value

        return answer

    def note(self, payload) -> None:
        self._conn.send(("note", payload))


# --- the child's side -------------------------------------------------------------------------


def _name_of(handler: Callable) -> str:
    """The handler as "module:qualified name", which the child imports itself with
    `pkgutil.resolve_name` (see _child_main)."""
    return f"{handler.__module__}:{handler.__qualname__}"


def _bars_lock_threads_only() -> None:
    """Progress bars drawn in this process (MLflow's, when it downloads a model's artifacts) lock
    their output with a thread lock only. tqdm's default lock adds a multiprocessing RLock: in a
    spawned process that is a named POSIX semaphore, unlinked only by the interpreter's exit, which
    a trial process skips (`os._exit`), so the resource tracker reported it leaked when the sweep
    ended. No other process shares this process's bars."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())


def _child_main(
    conn,
    parent_pid: int,
    handler_name: str,
    env: dict,
    threads: int,
    gpu_memory_limit_mib: float | None = None,
    gated: bool = False,
    framework: str = "keras",
) -> None:
    _die_with_parent(parent_pid)
    os.environ.update(env)  # before TensorFlow is imported: CUDA_VISIBLE_DEVICES is read then
    # First: any other import could pull the framework in with its start-up banner. That is why
    # the handler comes by name: unpickling the function itself would import its module (the
    # tasks, the framework) before the framework's quiet import runs.
    fw = framework_named(framework)
    handler = pkgutil.resolve_name(handler_name)
    runtime.install_stop_handlers()  # training stops at its next batch; a new task does not start
    runtime.quiet_libraries()
    quiet_mlflow()  # imports MLflow now, so that its objects are frozen with the rest
    _bars_lock_threads_only()
    runtime.freeze_imported_objects()
    channel = Channel(conn)
    early: list = []  # messages that came before "go": tasks wait for the devices
    predecessor = None
    if gated:
        conn.send(("waiting", os.getpid()))
        predecessor = _wait_for_go(conn, early)
        if predecessor is None:  # told to finish (or the parent went) before the GPU was free
            os._exit(0)
    devices = {"predecessor": predecessor, "predecessor_at_init": process_state(predecessor) if predecessor else None}
    # Several trial processes on one CPU box: each gets its share of the cores (`threads`), instead
    # of every process starting a thread per core and all of them thrashing.
    devices.update(fw.start_trial_process(threads, gpu_memory_limit_mib))
    conn.send(("ready", runtime.resident_mib(), devices))
    code = 0
    while True:
        try:
            message = early.pop(0) if early else conn.recv()
        except (EOFError, OSError):
            break
        if message is None:
            break
        _, task = message
        try:
            result = handler(task, channel)
            conn.send(("done", result, runtime.resident_mib()))
        except KeyboardInterrupt as exc:
            conn.send(("interrupted", str(exc) or "interrupted", runtime.resident_mib()))
            break  # a stop was asked for: no further task
        except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent
            conn.send(("error", _sendable(exc), runtime.resident_mib()))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip the interpreter's teardown: collecting a large TensorFlow heap can take a minute.
    os._exit(code)


def _wait_for_go(conn, early: list) -> int | None:
    """Read messages until the parent's "go"; keep the tasks sent before it, in order. Returns
    the predecessor's pid, or None when told to finish first."""
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return None
        if message is None:
            return None
        if message[0] == "go":
            return message[1]
        early.append(message)


def _sendable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling (ConfigError, TrialFailed, ...), else its traceback."""
    import pickle

    exc.add_note("raised in the trial process:\n" + "".join(traceback.format_exception(exc)))
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - e.g. TensorFlow errors with extra constructor arguments
        return ChildError("".join(traceback.format_exception(exc)))


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

"""Process-wide state, in one place: what a process sets once and everything in it then obeys.

- stop requests: SIGTERM/SIGINT only set `stop_requested`; training, the engine and the sweep
  look at it at their next safe point (raising inside a signal handler could land in a database
  transaction of Optuna or MLflow and leave a half-written record);
- the rules of the device switches (train.mixed_precision and train.jit_compile) and of how much
  GPU memory a trial process takes; each framework applies them (harness/frameworks/);
- memory between tasks: the heap handed back, resident memory measured;
- quieting the libraries' start-up noise;
- fault injection for the crash tests.

It imports nothing from the harness, so every stage may use it.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import threading
from collections.abc import Callable

# Set by the SIGTERM/SIGINT handler. Training checks it at every batch (harness/phases.py) and
# raises KeyboardInterrupt there, a point where a run's clean-up can run; the engine checks it
# every second and asks its trial processes to end their tasks.
stop_requested = threading.Event()


def request_stop(signum=None, frame=None) -> None:
    """A signal handler that only sets the flag: the engine notices it within a second, asks the
    trial processes to end their trials cleanly, and training stops at its next batch."""
    stop_requested.set()


def check_stop() -> None:
    """Raise KeyboardInterrupt at a safe point once a stop was asked for."""
    if stop_requested.is_set():
        raise KeyboardInterrupt("stop requested")


def install_stop_handlers() -> dict:
    """SIGTERM and SIGINT set `stop_requested` (`request_stop`); returns the handlers they replace."""
    return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}


# --- device switches: train.mixed_precision and train.jit_compile ----------------------------

TENSOR_CORES = (7, 0)  # compute capability from which float16 runs on Tensor Cores: V100, T4, A100, H100


def resolve_switch(setting, gpus_capabilities) -> bool:
    """On or off, for a switch set to auto | on | off (YAML's bare on/off arrive as True/False).

    `gpus_capabilities` is the compute capability of each GPU the process sees, as TensorFlow
    reports it ((major, minor); None where unknown). auto is on for a GPU of capability 7.0 or
    higher and off on CPU or older GPUs.

        >>> resolve_switch("auto", [(8, 0)]), resolve_switch("auto", []), resolve_switch("auto", [(6, 1)])
        (True, False, False)
    """
    if setting in ("on", "off") or isinstance(setting, bool):
        return setting in ("on", True)
    if setting != "auto":
        raise ValueError(f"a switch is auto, on or off; got {setting!r}")
    return any(cap is not None and tuple(cap) >= TENSOR_CORES for cap in gpus_capabilities)


def gpu_memory_plan(gpus: list[str], limit_mib: float | None) -> dict[str, str]:
    """What each GPU of a trial process gets (pure): a fixed limit of `limit_mib` MiB, or memory
    growth (None), instead of TensorFlow's default of mapping nearly all of it at start.

        >>> gpu_memory_plan(["/physical_device:GPU:0"], None), gpu_memory_plan(["/physical_device:GPU:0"], 4096)
        ({'/physical_device:GPU:0': 'memory growth'}, {'/physical_device:GPU:0': 'limit 4096 MiB'})
    """
    setting = "memory growth" if limit_mib is None else f"limit {int(limit_mib)} MiB"
    return {name: setting for name in gpus}


def trim_heap() -> None:
    """Hand freed heap pages back to the system (glibc keeps them mapped otherwise)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def resident_mib(pid: int | None = None) -> float:
    """Resident memory of a process (default: this one), in MiB: after a task's clean-up, the
    figure that must stay flat; for a child, what decides its recycling."""
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


# --- quieting and fault injection ------------------------------------------------------------


def quiet_libraries() -> None:
    """Optuna's, TensorFlow's and the warnings' noise off (MLflow's own: harness/tracking.py quiet_mlflow)."""
    import logging
    import warnings

    import optuna

    # Heartbeat and stale-trial retry are marked experimental by Optuna; they are used on purpose.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    # The engine asks and tells trials itself (harness/trials.py), with the heartbeat on: Optuna
    # warns once per sweep that the heartbeat is meant for Study.optimize, which is not used here.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
    warnings.filterwarnings("ignore", message=".*shuffle=True.*")
    # Optuna would print a traceback per failed trial; the progress line and MLflow carry the reason.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    if "tensorflow" in sys.modules:
        # A warm process traces one graph per trial; TensorFlow's "retracing" warning says so
        # every trial and means nothing here.
        sys.modules["tensorflow"].get_logger().setLevel(logging.ERROR)


FAULT_ENV = "HARNESS_INJECT_FAULT"


def inject_fault(trial_number: int, epoch: int, out_of_memory: Callable[[str], BaseException]) -> None:
    """Testing switch, at the end of the first epoch of trial N (unset, always outside tests, it
    does nothing):

      HARNESS_INJECT_FAULT=oom:N   raise TensorFlow's out-of-memory error, as a GPU allocation
                                   failure surfaces;
      HARNESS_INJECT_FAULT=kill:N  SIGKILL the trial's own process, as the kernel's out-of-memory
                                   killer ends a process that exhausted the host's memory.
    """
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or epoch != 0:
        return
    kind, _, number = spec.partition(":")
    if number != str(trial_number):
        return
    if kind == "oom":
        raise out_of_memory(f"simulated out of memory in trial {trial_number} ({FAULT_ENV})")
    if kind == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def freeze_imported_objects() -> None:
    """Move everything imported so far out of the garbage collector's sight (`gc.freeze`).

    TensorFlow, Keras and MLflow leave ~400,000 objects that live as long as the process. Every
    full collection walks them all: ~0.25 s here, paid at each `release_memory` and at every
    automatic full collection while a trial traces its graphs. Frozen, they are skipped; they
    were never garbage, so nothing that could be freed stays."""
    gc.collect()
    gc.freeze()

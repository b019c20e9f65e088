"""Process-wide state, in one place: what a process sets once and everything in it then obeys.

- stop requests: SIGTERM/SIGINT only set `stop_requested`; training, the engine and the sweep
  look at it at their next safe point (raising inside a signal handler could land in a database
  transaction of Optuna or MLflow and leave a half-written record);
- device switches: train.mixed_precision and train.jit_compile, the GPUs a process may use, and
  how much GPU memory a trial process takes;
- seeding, and memory release between tasks: a warm trial process runs many tasks, and none may
  inherit the random state or the graph of the one before;
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


def gpu_capabilities(gpus=None) -> list[tuple[int, int] | None]:
    """Compute capability of each GPU (default: the GPUs TensorFlow sees in this process)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU") if gpus is None else gpus
    return [tf.config.experimental.get_device_details(gpu).get("compute_capability") for gpu in gpus]


# This process's train.jit_compile, resolved (`apply_device_switches`), like
# Keras' global dtype policy; "auto" (never set: the sweep process, tests) leaves it to Keras.
_jit_compile: bool | str = "auto"


def set_jit_compile(on: bool) -> None:
    global _jit_compile
    _jit_compile = bool(on)


def jit_compile_setting() -> bool | str:
    """This process's train.jit_compile as `compile_for` uses it ("auto": Keras decides)."""
    return _jit_compile


def apply_device_switches(train) -> tuple[bool, bool]:
    """train.mixed_precision and train.jit_compile in this trial process, on the GPU it was given:
    Keras' global dtype policy (mixed_float16 or float32) and `compile_for`'s jit_compile. Returns
    (mixed precision, XLA). `release_memory` keeps the policy across Keras' clear_session."""
    import keras

    capabilities = gpu_capabilities()
    mixed, jit = resolve_switch(train.mixed_precision, capabilities), resolve_switch(train.jit_compile, capabilities)
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    set_jit_compile(jit)
    return mixed, jit


_GPUS_BEFORE_HIDING: list | None = None  # the sweep process's GPUs, before it hid them from itself


def physical_gpus() -> list:
    """The GPUs this process may hand to trial processes (TensorFlow's physical devices), hidden
    from itself or not."""
    import tensorflow as tf

    return _GPUS_BEFORE_HIDING if _GPUS_BEFORE_HIDING is not None else tf.config.list_physical_devices("GPU")


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them for a child process."""
    found = physical_gpus()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if listed and len(listed) >= len(found):
        return listed[: len(found)]
    return [str(i) for i in range(len(found))]


def hide_gpus_from_this_process() -> None:
    """The sweep process never trains: it only builds backbones to check them. Left to itself,
    TensorFlow would reserve most of every GPU's memory here, and the trial processes would then
    run out. Each trial process gets its own GPU (harness/trials.py)."""
    import tensorflow as tf

    global _GPUS_BEFORE_HIDING
    _GPUS_BEFORE_HIDING = tf.config.list_physical_devices("GPU")
    if _GPUS_BEFORE_HIDING:
        tf.config.set_visible_devices([], "GPU")


def gpu_memory_plan(gpus: list[str], limit_mib: float | None) -> dict[str, str]:
    """What each GPU of a trial process gets (pure): a fixed limit of `limit_mib` MiB, or memory
    growth (None), instead of TensorFlow's default of mapping nearly all of it at start.

        >>> gpu_memory_plan(["/physical_device:GPU:0"], None), gpu_memory_plan(["/physical_device:GPU:0"], 4096)
        ({'/physical_device:GPU:0': 'memory growth'}, {'/physical_device:GPU:0': 'limit 4096 MiB'})
    """
    setting = "memory growth" if limit_mib is None else f"limit {int(limit_mib)} MiB"
    return {name: setting for name in gpus}


def configure_gpu_memory(limit_mib: float | None, gpus: list | None = None) -> dict[str, str]:
    """Apply `gpu_memory_plan` to TensorFlow's GPUs (default: all this process sees); returns it.
    Must run before any GPU operation: TensorFlow refuses to change an initialized device."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU") if gpus is None else gpus
    for gpu in gpus:
        if limit_mib is None:
            tf.config.experimental.set_memory_growth(gpu, True)
        else:
            tf.config.set_logical_device_configuration(gpu, [tf.config.LogicalDeviceConfiguration(memory_limit=int(limit_mib))])
    return gpu_memory_plan([gpu.name for gpu in gpus], limit_mib)


def initialize_devices(limit_mib: float | None) -> dict:
    """Set the GPU memory rule, then initialize TensorFlow's devices (GPU contexts are created
    here, not in the first trial); returns what the parent is told."""
    import tensorflow as tf

    applied = configure_gpu_memory(limit_mib)
    tf.config.list_logical_devices()  # initializes every device, with the settings above
    return {"gpu_memory": applied}


# --- seeding and memory between tasks ---------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed every generator a task draws from, at its start: Python's `random`, NumPy's global
    generator, TensorFlow's global seed and Keras' (`keras.utils.set_random_seed` does all four and
    drops Keras' global SeedGenerator).

    A warm trial process has run other tasks before, and they leave these seeds where they were
    set last. TensorFlow's global seed matters beyond the ops: a tf.data pipeline takes its
    shuffle seeds from it when it is built, so the same `shuffle(seed=s)` gives another order
    after another task set another global seed (that made the demo's baseline differ between a
    warm and a fresh process). So seed first, then build pipelines and models."""
    import keras

    keras.utils.set_random_seed(int(seed))


def release_memory() -> None:
    """Drop Keras' graph state after a trial or a confirmation run.

    Clearing the session frees what TensorFlow lets go of, and glibc keeps freed heap pages
    mapped unless malloc_trim hands them back. It does not stop `model.fit`'s own leak (see
    harness/worker.py): that is why trials run in warm child processes that are recycled.
    """
    import keras

    policy = keras.mixed_precision.global_policy().name
    keras.backend.clear_session()  # which also resets Keras' global dtype policy to float32
    keras.mixed_precision.set_global_policy(policy)  # train.mixed_precision holds for the next trial
    _malloc_trim()


def _malloc_trim() -> None:
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


def import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up banner (oneDNN, CPU features, absl) silenced.

    Those lines are printed straight to file descriptor 2 before absl's logging is set up, so
    TF_CPP_MIN_LOG_LEVEL cannot hide them; an overnight log should start with the sweep's own
    lines. Python-level errors still surface: the descriptor is restored before they propagate.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        import tensorflow  # noqa: F401
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


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


def inject_fault(trial_number: int, epoch: int) -> None:
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
        import tensorflow as tf

        raise tf.errors.ResourceExhaustedError(None, None, f"simulated out of memory in trial {trial_number} ({FAULT_ENV})")
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

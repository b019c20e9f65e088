"""TensorFlow's side of a process: its quiet import, GPUs, device switches, threads, seeding and
memory release. The process-wide state that is not TensorFlow's (stop requests, the switches'
rule, resident memory) is harness/runtime.py's.
"""

from __future__ import annotations

import os
import sys

from harness.runtime import gpu_memory_plan, resolve_switch, trim_heap


def import_quietly() -> None:
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


def set_threads(threads: int) -> None:
    """Several trial processes on one CPU box: each gets its share of the cores, instead of every
    process starting a thread per core and all of them thrashing."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(min(2, threads))


# --- GPUs ---------------------------------------------------------------------------------------


def gpu_capabilities(gpus=None) -> list[tuple[int, int] | None]:
    """Compute capability of each GPU (default: the GPUs TensorFlow sees in this process)."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU") if gpus is None else gpus
    return [tf.config.experimental.get_device_details(gpu).get("compute_capability") for gpu in gpus]


def hide_gpus_from_this_process() -> list:
    """The sweep process never trains: it only builds backbones to check them. Left to itself,
    TensorFlow would reserve most of every GPU's memory here, and the trial processes would then
    run out. Each trial process gets its own GPU (harness/trials.py). Returns the GPUs it hid."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.set_visible_devices([], "GPU")
    return gpus


def visible_gpus(found: list) -> list[str]:
    """The GPUs `found`, as CUDA_VISIBLE_DEVICES names them for a child process."""
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if listed and len(listed) >= len(found):
        return listed[: len(found)]
    return [str(i) for i in range(len(found))]


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


# --- device switches: train.mixed_precision and train.jit_compile ---------------------------

# This process's train.jit_compile, resolved (`apply_device_switches`), like Keras' global dtype
# policy; "auto" (never set: the sweep process, tests) leaves it to Keras.
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
    trim_heap()


def trial_level_errors() -> tuple[type[BaseException], ...]:
    """TensorFlow's errors that end one trial but not the sweep (out of memory, a failed op)."""
    import tensorflow as tf

    return (
        tf.errors.ResourceExhaustedError,
        tf.errors.InvalidArgumentError,
        tf.errors.InternalError,
        tf.errors.UnknownError,
    )


def out_of_memory(message: str) -> BaseException:
    """The error a GPU allocation failure surfaces as (for the crash tests' fault injection)."""
    import tensorflow as tf

    return tf.errors.ResourceExhaustedError(None, None, message)

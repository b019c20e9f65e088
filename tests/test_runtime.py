"""Process-wide state of a trial process: the device switches (mixed precision, XLA) with their auto rule,
the GPU memory rule, and what survives clean-up. (The preflight that refuses a switch the GPUs cannot
honour: tests/test_preflight.py.)"""

from __future__ import annotations

import keras
import pytest

from harness import runtime
from harness.config import TrainConfig
from harness.runtime import resolve_switch

pytestmark = pytest.mark.usefixtures("float32_afterwards")


# --- the auto rule (pure) --------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, capabilities, expected",
    [
        ("auto", [], False),  # CPU only
        ("auto", [(6, 1)], False),  # Pascal (P100, GTX 10xx): no Tensor Cores
        ("auto", [(7, 0)], True),  # V100
        ("auto", [(7, 5)], True),  # T4
        ("auto", [(9, 0)], True),  # H100
        ("auto", [(6, 0), (8, 0)], True),  # one capable GPU is enough
        ("auto", [None], False),  # capability unknown: not assumed
        ("on", [], True),
        ("on", [(6, 1)], True),
        ("off", [(8, 0)], False),
        ("off", [], False),
        (True, [], True),  # YAML's bare `on`
        (False, [(8, 0)], False),  # YAML's bare `off`
    ],
)
def test_resolve_switch(setting, capabilities, expected):
    assert resolve_switch(setting, capabilities) is expected


def test_resolve_switch_refuses_other_settings():
    with pytest.raises(ValueError, match="auto, on or off"):
        resolve_switch("fast", [(8, 0)])


# --- the trial process -----------------------------------------------------------------------


def test_apply_device_switches_on_cpu():
    from harness.frameworks.keras import device

    assert device.apply_device_switches(TrainConfig()) == (False, False)  # auto on CPU: both off
    assert keras.mixed_precision.global_policy().name == "float32"
    assert device._jit_compile is False  # off is passed to compile explicitly, not Keras' "auto"
    assert device.apply_device_switches(TrainConfig(mixed_precision="on", jit_compile=True)) == (True, True)
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert device._jit_compile is True


def test_the_policy_survives_the_clean_up_between_trials():
    """Keras' clear_session resets the global dtype policy; the next trial must still be mixed."""
    from harness.frameworks.keras.device import release_memory

    keras.mixed_precision.set_global_policy("mixed_float16")
    release_memory()
    assert keras.mixed_precision.global_policy().name == "mixed_float16"


# --- GPU memory ------------------------------------------------------------------------------------


def test_each_gpu_gets_memory_growth_or_the_configured_limit():
    from harness.frameworks.keras.device import configure_gpu_memory
    from harness.runtime import gpu_memory_plan

    gpus = ["/physical_device:GPU:0", "/physical_device:GPU:1"]
    assert gpu_memory_plan(gpus, None) == dict.fromkeys(gpus, "memory growth")
    assert gpu_memory_plan(gpus, 4096.0) == dict.fromkeys(gpus, "limit 4096 MiB")
    assert gpu_memory_plan([], 4096) == {}
    # The rule goes through TensorFlow itself: a GPU TensorFlow does not know is refused by it.
    import tensorflow as tf

    with pytest.raises(ValueError, match="Unrecognized device"):
        configure_gpu_memory(None, [tf.config.PhysicalDevice("/physical_device:GPU:9", "GPU")])


def test_frozen_import_objects_are_skipped_and_new_garbage_is_still_collected():
    """After the freeze the collector no longer walks what the imports left, but a cycle made later
    is still freed: nothing that could be garbage is kept."""
    import gc
    import weakref

    runtime.freeze_imported_objects()
    assert gc.get_freeze_count() > 0

    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle: only the collector frees it
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None

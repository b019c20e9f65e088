"""train.mixed_precision and train.jit_compile: the auto rule, config refusals, and each switch
taking effect on a model (on CPU: the policy is set directly, bypassing the device check)."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest

from harness import runtime
from harness.config import ConfigError, TrainConfig, parse_config
from harness.model import ModelSpec, TransferModel, build_model
from harness.phases import compile_for
from harness.runtime import resolve_switch, set_jit_compile


@pytest.fixture(autouse=True)
def float32_afterwards(monkeypatch):
    """Each test may switch this process to mixed_float16 or XLA; the next test starts without."""
    monkeypatch.setattr(runtime, "_jit_compile", "auto")
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


# --- the auto rule (pure) --------------------------------------------------------------------


@pytest.mark.parametrize("setting, capabilities, expected", [
    ("auto", [], False),                  # CPU only
    ("auto", [(6, 1)], False),            # Pascal (P100, GTX 10xx): no Tensor Cores
    ("auto", [(7, 0)], True),             # V100
    ("auto", [(7, 5)], True),             # T4
    ("auto", [(9, 0)], True),             # H100
    ("auto", [(6, 0), (8, 0)], True),     # one capable GPU is enough
    ("auto", [None], False),              # capability unknown: not assumed
    ("on", [], True),
    ("on", [(6, 1)], True),
    ("off", [(8, 0)], False),
    ("off", [], False),
    (True, [], True),                     # YAML's bare `on`
    (False, [(8, 0)], False),             # YAML's bare `off`
])
def test_resolve_switch(setting, capabilities, expected):
    assert resolve_switch(setting, capabilities) is expected


def test_resolve_switch_refuses_other_settings():
    with pytest.raises(ValueError, match="auto, on or off"):
        resolve_switch("fast", [(8, 0)])


# --- config -----------------------------------------------------------------------------------

DATA = "data: {name: shapes}\n"  # the smallest loadable config: the builtin dataset needs a name


def test_both_switches_default_to_auto():
    cfg = parse_config(DATA)
    assert (cfg.train.mixed_precision, cfg.train.jit_compile) == ("auto", "auto")


@pytest.mark.parametrize("text, expected", [
    ("on", True), ("off", False), ("'on'", "on"), ("'off'", "off"), ("auto", "auto"),
])
def test_bare_and_quoted_on_off_are_accepted(text, expected):
    cfg = parse_config(f"{DATA}train:\n  mixed_precision: {text}\n  jit_compile: {text}\n")
    assert cfg.train.mixed_precision == expected and cfg.train.jit_compile == expected
    assert resolve_switch(cfg.train.mixed_precision, []) is (text in ("on", "'on'"))


@pytest.mark.parametrize("key", ["mixed_precision", "jit_compile"])
@pytest.mark.parametrize("value", ["fast", "1", "[on]", "null"])
def test_a_bad_switch_is_refused_at_load_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"sweep.yaml:3:3: train\.{key}: must be one of auto, on, off"):
        parse_config(f"{DATA}train:\n  {key}: {value}\n", "sweep.yaml")


def test_mixed_precision_on_is_refused_without_a_capable_gpu(monkeypatch):
    from harness import sweep

    cfg = parse_config(f"{DATA}train: {{mixed_precision: on}}\n", "sweep.yaml")
    monkeypatch.setattr(runtime, "_GPUS_BEFORE_HIDING", [])  # the sweep process's GPUs before hiding: none
    with pytest.raises(ConfigError, match=r"sweep.yaml: train\.mixed_precision: on needs a GPU of compute "
                                          r"capability >= 7\.0; GPUs visible: none \(CPU only\)"):
        sweep.check_mixed_precision(cfg)
    monkeypatch.setattr(runtime, "gpu_capabilities", lambda gpus=None: [(6, 1)])
    with pytest.raises(ConfigError, match=r"GPUs visible: 6\.1\. Use auto"):
        sweep.check_mixed_precision(cfg)
    monkeypatch.setattr(runtime, "gpu_capabilities", lambda gpus=None: [(6, 1), (8, 0)])
    sweep.check_mixed_precision(cfg)  # a capable GPU: accepted


@pytest.mark.parametrize("setting", ["auto", "off"])
def test_auto_and_off_pass_the_preflight_on_cpu(monkeypatch, setting):
    from harness import sweep

    monkeypatch.setattr(runtime, "_GPUS_BEFORE_HIDING", [])
    sweep.check_mixed_precision(parse_config(f"{DATA}train: {{mixed_precision: {setting}, jit_compile: on}}\n"))


# --- each switch takes effect ----------------------------------------------------------------


def tiny_transfer_model(num_classes: int = 3) -> TransferModel:
    """A small conv net with the harness's head (float32 softmax), for quick training steps."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="classifier", dtype="float32")(x)
    model = keras.Model(inputs, outputs)
    return TransferModel(model, model, [], ModelSpec("tiny", 16, num_classes, None, {}))


def two_steps(tm: TransferModel, size: int) -> float:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (16, size, size, 3)).astype("uint8")
    y = rng.integers(0, 3, 16)
    history = tm.model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return history.history["loss"][-1]


def test_mixed_precision_builds_float16_layers_and_keeps_the_softmax_float32():
    keras.mixed_precision.set_global_policy("mixed_float16")
    tm = build_model(ModelSpec("MobileNetV2", 32, 3, None, {"alpha": 0.35}, head_units=8))
    policies = {layer.name: layer.dtype_policy.name for layer in tm.model.layers}
    assert policies.pop("classifier") == "float32"
    assert set(policies.values()) == {"mixed_float16"}
    assert {l.dtype_policy.name for l in tm.backbone.layers} == {"mixed_float16"}
    assert tm.model.get_layer("head_dense").compute_dtype == "float16"
    assert tm.model.get_layer("classifier").variable_dtype == "float32"
    assert tm.model.output.dtype == "float32"  # the loss is computed on float32 probabilities
    compile_for(tm, 1e-3)
    # Keras 3 wraps the optimizer itself under mixed_float16 (compile's auto_scale_loss).
    assert isinstance(tm.model.optimizer, keras.optimizers.LossScaleOptimizer)


def test_float32_policy_builds_float32_layers():
    tm = build_model(ModelSpec("MobileNetV2", 32, 3, None, {"alpha": 0.35}))
    assert {l.dtype_policy.name for l in tm.model.layers} == {"float32"}
    compile_for(tm, 1e-3)
    assert isinstance(tm.model.optimizer, keras.optimizers.Adam)


def test_mobilenet_trains_two_steps_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    tm = build_model(ModelSpec("MobileNetV2", 32, 3, None, {"alpha": 0.35}))
    compile_for(tm, 1e-3, jit_compile=False)
    assert math.isfinite(two_steps(tm, 32))


def test_jit_compile_follows_the_argument_then_the_process_setting():
    tm = tiny_transfer_model()
    compile_for(tm, 1e-3, jit_compile=True)
    assert tm.model.jit_compile is True
    compile_for(tm, 1e-3, jit_compile=False)
    assert tm.model.jit_compile is False
    set_jit_compile(True)  # what a trial process does from train.jit_compile
    compile_for(tm, 1e-3)
    assert tm.model.jit_compile is True
    set_jit_compile(False)
    compile_for(tm, 1e-3)
    assert tm.model.jit_compile is False


def test_jit_compile_is_off_for_a_model_with_augmentation_layers_without_a_warning():
    tm = build_model(ModelSpec("MobileNetV2", 32, 3, None, {"alpha": 0.35}, augment=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_for(tm, 1e-3, jit_compile=True)
    assert tm.model.jit_compile is False


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_xla_trains_two_steps(policy):
    keras.mixed_precision.set_global_policy(policy)
    tm = tiny_transfer_model()
    compile_for(tm, 1e-2, jit_compile=True)
    assert tm.model.jit_compile is True
    assert math.isfinite(two_steps(tm, 16))


# --- the trial process -----------------------------------------------------------------------


def test_apply_device_switches_on_cpu():
    from harness.runtime import apply_device_switches

    assert apply_device_switches(TrainConfig()) == (False, False)  # auto on CPU: both off
    assert keras.mixed_precision.global_policy().name == "float32"
    assert runtime._jit_compile is False  # off is passed to compile explicitly, not Keras' "auto"
    assert apply_device_switches(TrainConfig(mixed_precision="on", jit_compile=True)) == (True, True)
    assert keras.mixed_precision.global_policy().name == "mixed_float16"
    assert runtime._jit_compile is True


def test_the_policy_survives_the_clean_up_between_trials():
    """Keras' clear_session resets the global dtype policy; the next trial must still be mixed."""
    from harness.runtime import release_memory

    keras.mixed_precision.set_global_policy("mixed_float16")
    release_memory()
    assert keras.mixed_precision.global_policy().name == "mixed_float16"

"""Keras' side of one phase: compile_for under mixed precision and XLA (on CPU: the policy is set
directly, bypassing the device check), and the keeper of the best epoch's weights."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest

from harness.frameworks.base import ModelSpec
from harness.frameworks.keras.device import set_jit_compile
from harness.frameworks.keras.loop import KerasWeightsKeeper, compile_for
from harness.frameworks.keras.model import TransferModel, build_model


def test_best_weights_keeps_the_best_epoch_and_restores_it():
    from harness.phases import EpochRecord
    from harness.training import _Best

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    best = _Best(KerasWeightsKeeper(model), "val_accuracy", "maximize")
    first = [w.copy() for w in model.get_weights()]
    best.observe(EpochRecord(0, "head", {"val_accuracy": 0.9}))
    model.set_weights([w + 1 for w in first])
    best.observe(EpochRecord(1, "finetune", {"val_accuracy": 0.5}))  # worse: not kept
    best.observe(EpochRecord(2, "finetune", {"val_accuracy": float("nan")}))  # never kept
    best.keeper.restore()
    assert best.epoch == 0 and all(np.array_equal(a, b) for a, b in zip(model.get_weights(), first))


def test_best_weights_copies_only_what_can_change_and_still_restores_every_phase():
    """An improving epoch copies the trainable variables alone; a later phase that trains more
    adds their values first, and a variable frozen since the best epoch is left as it is."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="low"), keras.layers.Dense(1, name="top")])
    low, top = model.get_layer("low"), model.get_layer("top")
    shift = lambda layer, by: layer.set_weights([w + by for w in layer.get_weights()])  # noqa: E731
    keeper = KerasWeightsKeeper(model)

    low.trainable = False  # phase 1: the top trains
    keeper.start_phase()
    keeper.keep()
    assert {id(v) for v, _ in keeper.weights.values()} == {id(v) for v in top.trainable_variables}
    best_low, best_top = [w.copy() for w in low.get_weights()], [w.copy() for w in top.get_weights()]
    shift(top, 1.0)  # a worse epoch of phase 1

    low.trainable = True  # phase 2 trains both; the copy gains `low` as it is now (unchanged since epoch 0)
    keeper.start_phase()
    shift(low, 2.0), shift(top, 3.0)  # a worse epoch of phase 2: nothing kept
    keeper.restore()
    assert all(np.array_equal(a, b) for a, b in zip(low.get_weights() + top.get_weights(), best_low + best_top))

    # A best epoch in a phase that trains only `low`: `top`, changed in an earlier phase, keeps its value now.
    top.trainable = False
    shift(top, 5.0)
    keeper.start_phase()
    keeper.keep()
    top_now, low_best = [w.copy() for w in top.get_weights()], [w.copy() for w in low.get_weights()]
    shift(low, 1.0)
    keeper.restore()
    assert all(np.array_equal(a, b) for a, b in zip(low.get_weights() + top.get_weights(), low_best + top_now))


# --- compile_for under the device switches: mixed precision and XLA take effect on a model ----


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


@pytest.mark.usefixtures("float32_afterwards")
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


@pytest.mark.usefixtures("float32_afterwards")
def test_float32_policy_builds_float32_layers():
    tm = build_model(ModelSpec("MobileNetV2", 32, 3, None, {"alpha": 0.35}))
    assert {l.dtype_policy.name for l in tm.model.layers} == {"float32"}
    compile_for(tm, 1e-3)
    assert isinstance(tm.model.optimizer, keras.optimizers.Adam)


@pytest.mark.usefixtures("float32_afterwards")
def test_mobilenet_trains_two_steps_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    tm = build_model(ModelSpec("MobileNetV2", 32, 3, None, {"alpha": 0.35}))
    compile_for(tm, 1e-3, jit_compile=False)
    assert math.isfinite(two_steps(tm, 32))


@pytest.mark.usefixtures("float32_afterwards")
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


@pytest.mark.usefixtures("float32_afterwards")
def test_jit_compile_is_off_for_a_model_with_augmentation_layers_without_a_warning():
    tm = build_model(ModelSpec("MobileNetV2", 32, 3, None, {"alpha": 0.35}, augment=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compile_for(tm, 1e-3, jit_compile=True)
    assert tm.model.jit_compile is False


@pytest.mark.usefixtures("float32_afterwards")
@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])
def test_xla_trains_two_steps(policy):
    keras.mixed_precision.set_global_policy(policy)
    tm = tiny_transfer_model()
    compile_for(tm, 1e-2, jit_compile=True)
    assert tm.model.jit_compile is True
    assert math.isfinite(two_steps(tm, 16))

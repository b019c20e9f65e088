"""The two-phase routine: one epoch timeline, early stopping per phase, NaN losses stop a trial, class weights;
compile_for under mixed precision and XLA (on CPU: the policy is set directly, bypassing the device check)."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from harness.model import ModelSpec, TransferModel, build_model
from harness.phases import NonFiniteLoss, compile_for, run_phases, two_phase_plan
from harness.runtime import set_jit_compile


def datasets(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3)).astype("uint8")
    y = rng.integers(0, 3, n)
    ds = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    return ds, ds


def tiny_model(weights=None):
    return build_model(ModelSpec("MobileNetV2", 32, 3, weights, {"alpha": 0.35}))


def test_phase2_continues_the_epoch_count_of_phase1():
    train, val = datasets()
    seen = []
    plan = two_phase_plan(2, 1e-3, None, 3, 1e-4, None, n_unfreeze=4)
    history = run_phases(tiny_model(), plan, train, val, on_epoch=lambda r: seen.append((r.phase, r.epoch)))
    assert seen == [("head", 0), ("head", 1), ("finetune", 2), ("finetune", 3), ("finetune", 4)]
    assert history.phase_start("finetune") == 2
    head, ft = history.phases
    assert ft.trainable_params > head.trainable_params  # phase 2 really unfroze something
    assert head.total_params == ft.total_params


def test_no_unfrozen_blocks_means_no_phase2():
    assert [p.name for p in two_phase_plan(3, 1e-3, None, 5, 1e-4, None, n_unfreeze=0)] == ["head"]


def test_absurd_learning_rate_ends_in_a_nonfinite_loss_error():
    train, val = datasets()
    plan = two_phase_plan(3, 1e38, None, 0, 1e-4, None, n_unfreeze=0)
    with pytest.raises(NonFiniteLoss, match="loss is"):
        run_phases(tiny_model(), plan, train, val)


def test_the_model_ends_with_the_best_epochs_weights_across_both_phases():
    """The weights scored are the weights tested: after a plan, the model is its best epoch's,
    even when that epoch was in phase 1 and phase 2 then got worse."""
    import keras

    from harness.phases import evaluate

    keras.utils.set_random_seed(0)
    train, val = datasets()
    # Phase 2 at an LR that wrecks the head: its epochs score worse than phase 1's best.
    plan = two_phase_plan(3, 1e-2, None, 2, 0.5, None, n_unfreeze=2)
    tm = tiny_model()
    history = run_phases(tm, plan, train, val, monitor="val_loss", direction="minimize")
    best = min(history.epochs, key=lambda e: e.metrics["val_loss"])
    assert best.phase == "head", [(e.phase, round(e.metrics["val_loss"], 3)) for e in history.epochs]
    assert evaluate(tm.model, val)["loss"] == pytest.approx(best.metrics["val_loss"], rel=1e-4)


def test_best_weights_keeps_the_best_epoch_and_restores_it():
    import keras

    from harness.phases import BestWeights, EpochRecord

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    keeper = BestWeights("val_accuracy", "maximize")
    first = [w.copy() for w in model.get_weights()]
    keeper.observe(model, EpochRecord(0, "head", {"val_accuracy": 0.9}))
    model.set_weights([w + 1 for w in first])
    keeper.observe(model, EpochRecord(1, "finetune", {"val_accuracy": 0.5}))  # worse: not kept
    keeper.observe(model, EpochRecord(2, "finetune", {"val_accuracy": float("nan")}))  # never kept
    keeper.restore(model)
    assert keeper.epoch == 0 and all(np.array_equal(a, b) for a, b in zip(model.get_weights(), first))


def test_best_weights_copies_only_what_can_change_and_still_restores_every_phase():
    """An improving epoch copies the trainable variables alone; a later phase that trains more
    adds their values first, and a variable frozen since the best epoch is left as it is."""
    import keras

    from harness.phases import BestWeights, EpochRecord

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, name="low"), keras.layers.Dense(1, name="top")])
    low, top = model.get_layer("low"), model.get_layer("top")
    shift = lambda layer, by: layer.set_weights([w + by for w in layer.get_weights()])  # noqa: E731
    keeper = BestWeights("val_accuracy", "maximize")

    low.trainable = False  # phase 1: the top trains
    keeper.start_phase(model)
    keeper.observe(model, EpochRecord(0, "head", {"val_accuracy": 0.9}))
    assert {id(v) for v, _ in keeper.weights.values()} == {id(v) for v in top.trainable_variables}
    best_low, best_top = [w.copy() for w in low.get_weights()], [w.copy() for w in top.get_weights()]
    shift(top, 1.0)  # a worse epoch of phase 1

    low.trainable = True  # phase 2 trains both; the copy gains `low` as it is now (unchanged since epoch 0)
    keeper.start_phase(model)
    shift(low, 2.0), shift(top, 3.0)
    keeper.observe(model, EpochRecord(1, "finetune", {"val_accuracy": 0.5}))
    keeper.restore(model)
    assert all(np.array_equal(a, b) for a, b in zip(low.get_weights() + top.get_weights(), best_low + best_top))

    # A best epoch in a phase that trains only `low`: `top`, changed in an earlier phase, keeps its value now.
    top.trainable = False
    shift(top, 5.0)
    keeper.start_phase(model)
    keeper.observe(model, EpochRecord(2, "finetune", {"val_accuracy": 0.95}))
    top_now, low_best = [w.copy() for w in top.get_weights()], [w.copy() for w in low.get_weights()]
    shift(low, 1.0)
    keeper.restore(model)
    assert all(np.array_equal(a, b) for a, b in zip(low.get_weights() + top.get_weights(), low_best + top_now))


def test_from_scratch_early_stopping_waits_for_the_step_floor_and_a_still_falling_loss():
    """The demo's baseline once stopped at a quarter of its step floor: its best val_accuracy came at
    the first validation while the validation loss kept falling."""
    from harness.phases import scratch_keeps_training

    flat_accuracy = [0.22, 0.20, 0.20, 0.20, 0.20]
    falling_loss = [1.91, 1.85, 1.78, 1.70, 1.61]
    assert scratch_keeps_training(falling_loss, flat_accuracy, "maximize", patience=3)  # the loss still falls
    stalled_loss = [1.91, 1.85, 1.86, 1.87, 1.88]
    assert not scratch_keeps_training(stalled_loss, flat_accuracy, "maximize", patience=3)  # neither moves: stop
    assert scratch_keeps_training(stalled_loss, flat_accuracy, "maximize", patience=3, min_epochs=6)  # below the floor
    assert not scratch_keeps_training(stalled_loss + [1.9], flat_accuracy + [0.2], "maximize", patience=3, min_epochs=6)
    rising_accuracy = [0.2, 0.3, 0.4, 0.5, 0.6]  # overfitting loss, better accuracy: go on
    assert scratch_keeps_training([1.5, 1.6, 1.7, 1.8, 1.9], rising_accuracy, "maximize", patience=3)
    assert scratch_keeps_training([2.0, float("nan")], [0.2, 0.2], "maximize", patience=None)  # no patience: never


def test_a_scratch_phase_runs_to_its_floor_even_when_nothing_improves():
    """A learning rate of ~0 changes nothing: the metric and the loss never improve after the first
    validation, yet the phase runs min_epochs validations before patience may end it."""
    from harness.phases import scratch_plan

    train, val = datasets()
    history = run_phases(tiny_model(), scratch_plan(12, 1e-12, patience=1, min_epochs=5), train, val)
    assert len(history.epochs) == 5


def test_a_transfer_phase_under_the_scratch_rule_runs_to_its_floor_with_steps_between_validations():
    """A confirmation seed's last transfer phase stops as a from-scratch one does: never before its
    floor (a learning rate of ~0 improves nothing), validated every `steps_per_epoch` batches of a
    pipeline that runs on across passes."""
    from harness.phases import Phase

    train, val = datasets()  # 3 batches a pass
    tm = tiny_model()
    phase = Phase("head", 12, 1e-12, 0, patience=1, min_epochs=5, stall_stopping=True, steps_per_epoch=4)
    history = run_phases(tm, [phase], train, val)
    assert len(history.epochs) == 5 and all("val_loss" in e.metrics for e in history.epochs)
    assert int(tm.model.optimizer.iterations.numpy()) == 5 * 4  # more than a pass (3 batches) between validations


def test_a_heavy_class_weight_pulls_the_predictions_toward_its_class():
    """Behaviour, not plumbing: on labels the images cannot explain, the weighted class wins."""
    import keras
    import tensorflow as tf

    from harness.model import ModelSpec, build_model
    from harness.phases import Phase, run_phases

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 32, 3)).astype("uint8")
    y = np.repeat([0, 1], 16)
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(32, seed=0).batch(16)
    val = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    mean_p1 = {}
    for heavy in (0, 1):
        keras.utils.set_random_seed(0)
        tm = build_model(ModelSpec("MobileNetV2", 32, 2, None, {"alpha": 0.35}))
        weights = {heavy: 50.0, 1 - heavy: 1.0}
        run_phases(tm, [Phase("head", 6, 3e-2, 0)], train, val, restore_best=False, class_weight=weights)
        mean_p1[heavy] = float(tm.model.predict(val, verbose=0)[:, 1].mean())
        keras.backend.clear_session()
    # Measured: 0.33 with class 0 weighted vs 0.67 with class 1 weighted (0.5 is the unweighted optimum).
    assert mean_p1[0] < 0.45 < 0.55 < mean_p1[1], mean_p1


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

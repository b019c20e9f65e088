"""The one training path (harness/training.py) through Keras: one epoch timeline, early stopping
per phase, NaN losses stop a trial, the best epoch's weights across phases, class weights."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from harness.data import Dataset, Splits
from harness.frameworks import framework_named
from harness.frameworks.base import ModelSpec, PhaseData, PhaseRun
from harness.frameworks.keras.model import build_model
from harness.phases import History, NonFiniteLoss, Phase, scratch_plan, two_phase_plan
from harness.training import Configuration, EpochHooks, Trainer, TrainingSettings, epoch_note

KERAS = framework_named("keras")


def trainer_on(x, y, classes=3, batch_size=8, monitor="val_accuracy", direction="maximize", class_weight=None) -> Trainer:
    """A trainer whose training and validation splits are both every image of `x`."""
    dataset = Dataset([str(c) for c in range(classes)], np.asarray(y, np.int64), images=x, image_size=x.shape[1])
    every = np.arange(len(y))
    settings = TrainingSettings({"head": batch_size, "finetune": batch_size}, monitor, direction, class_weight)
    return Trainer(KERAS, dataset, Splits(every, every, every[:0]), settings)


def random_trainer(n=24, seed=0, **kwargs) -> Trainer:
    rng = np.random.default_rng(seed)
    return trainer_on(rng.integers(0, 256, (n, 32, 32, 3)).astype("uint8"), rng.integers(0, 3, n), **kwargs)


def tiny_model(weights=None):
    return build_model(ModelSpec("MobileNetV2", 32, 3, weights, {"alpha": 0.35}))


def run_plan(trainer: Trainer, tm, plan, on_epoch=lambda r: None) -> History:
    return trainer.run_plan(tm, Configuration(tm.spec, tuple(plan), 0, 0), EpochHooks(on_epoch), History())


def test_phase2_continues_the_epoch_count_of_phase1():
    seen = []
    plan = two_phase_plan(2, 1e-3, None, 3, 1e-4, None, n_unfreeze=4)
    history = run_plan(random_trainer(), tiny_model(), plan, on_epoch=lambda r: seen.append((r.phase, r.epoch)))
    assert seen == [("head", 0), ("head", 1), ("finetune", 2), ("finetune", 3), ("finetune", 4)]
    assert history.phase_start("finetune") == 2
    head, ft = history.phases
    assert ft.trainable_params > head.trainable_params  # phase 2 really unfroze something
    assert head.total_params == ft.total_params


def test_absurd_learning_rate_ends_in_a_nonfinite_loss_error():
    plan = two_phase_plan(3, 1e38, None, 0, 1e-4, None, n_unfreeze=0)
    with pytest.raises(NonFiniteLoss, match="loss is"):
        run_plan(random_trainer(), tiny_model(), plan)


def test_the_model_ends_with_the_best_epochs_weights_across_both_phases():
    """The weights scored are the weights tested: after a plan, the model is its best epoch's,
    even when that epoch was in phase 1 and phase 2 then got worse."""
    keras.utils.set_random_seed(0)
    trainer = random_trainer(monitor="val_loss", direction="minimize")
    # Phase 2 at an LR that wrecks the head: its epochs score worse than phase 1's best.
    plan = two_phase_plan(3, 1e-2, None, 2, 0.5, None, n_unfreeze=2)
    tm = tiny_model()
    history = run_plan(trainer, tm, plan)
    best = min(history.epochs, key=lambda e: e.metrics["val_loss"])
    assert best.phase == "head", [(e.phase, round(e.metrics["val_loss"], 3)) for e in history.epochs]
    assert trainer.evaluate(tm, trainer.splits.val)["loss"] == pytest.approx(best.metrics["val_loss"], rel=1e-4)


def test_a_scratch_phase_runs_to_its_floor_even_when_nothing_improves():
    """A learning rate of ~0 changes nothing: the metric and the loss never improve after the first
    validation, yet the phase runs min_epochs validations before patience may end it. One batch a
    pass: the statistics re-estimated before each validation are those of the same images."""
    history = run_plan(random_trainer(batch_size=24), tiny_model(), scratch_plan(12, 1e-12, patience=1, min_epochs=5))
    assert len(history.epochs) == 5


def test_a_transfer_phase_under_the_scratch_rule_runs_to_its_floor_with_steps_between_validations():
    """A confirmation seed's last transfer phase stops as a from-scratch one does: never before its
    floor (a learning rate of ~0 improves nothing), validated every `steps_per_epoch` batches of a
    pipeline that runs on across passes."""
    tm = tiny_model()
    phase = Phase("head", 12, 1e-12, 0, patience=1, min_epochs=5, stall_stopping=True, steps_per_epoch=4)
    history = run_plan(random_trainer(), tm, [phase])  # 3 batches a pass
    assert len(history.epochs) == 5 and all("val_loss" in e.metrics for e in history.epochs)
    assert int(tm.model.optimizer.iterations.numpy()) == 5 * 4  # more than a pass (3 batches) between validations


def test_a_heavy_class_weight_pulls_the_predictions_toward_its_class():
    """Behaviour, not plumbing: on labels the images cannot explain, the weighted class wins."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 32, 3)).astype("uint8")
    y = np.repeat([0, 1], 16)
    mean_p1 = {}
    for heavy in (0, 1):
        keras.utils.set_random_seed(0)
        trainer = trainer_on(x, y, classes=2, batch_size=16, class_weight={heavy: 50.0, 1 - heavy: 1.0})
        tm = build_model(ModelSpec("MobileNetV2", 32, 2, None, {"alpha": 0.35}))
        # One phase, its last epoch's weights (the best epoch's would undo some of the pull).
        KERAS.set_trainable(tm, 0)
        run = PhaseRun(0, lambda record: None, class_weight=trainer.settings.class_weight)
        KERAS.run_phase(tm, Phase("head", 6, 3e-2, 0), PhaseData(*trainer.image_batches(16, seed=0)), run)
        mean_p1[heavy] = float(KERAS.predict(tm, trainer.split_batches(trainer.splits.val))[:, 1].mean())
        keras.backend.clear_session()
    # Measured: 0.33 with class 0 weighted vs 0.67 with class 1 weighted (0.5 is the unweighted optimum).
    assert mean_p1[0] < 0.45 < 0.55 < mean_p1[1], mean_p1


def test_a_configuration_trains_the_same_whatever_ran_before_in_the_process():
    """Seeded first, then built: the same configuration gives the same history after other work."""
    trainer = random_trainer()
    spec = ModelSpec("MobileNetV2", 32, 3, None, {"alpha": 0.35}, head_units=8, dropout=0.2)
    config = Configuration(spec, tuple(two_phase_plan(2, 1e-3, None, 1, 1e-4, None, n_unfreeze=1)), seed=7, data_seed=0)
    first = History()
    trainer.train(config, history=first)
    np.random.default_rng().random(100), keras.utils.set_random_seed(123)  # another task's leftovers
    trainer.train(Configuration(spec, config.plan, seed=8, data_seed=1))
    again = History()
    trainer.train(config, history=again)
    assert [e.metrics for e in again.epochs] == [e.metrics for e in first.epochs]


def test_an_epoch_note_carries_what_the_progress_line_and_the_pruner_read():
    from harness.phases import EpochRecord

    record = EpochRecord(7, "scratch", {"loss": 1.0, "val_accuracy": 0.5})
    note = epoch_note(2, record, 40, "val_accuracy", offset=5, phase="scratch attempt 2")
    assert note == {
        "number": 2,
        "epoch": 2,
        "phase": "scratch attempt 2",
        "phase_epoch": 0,
        "metrics": {"loss": 1.0, "val_accuracy": 0.5},
        "total_epochs": 40,
        "value": 0.5,
    }

"""The torch framework through the seam's interface alone, as the one training path drives it."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torchvision")

from harness.config import DataConfig  # noqa: E402
from harness.data import load_dataset, make_splits  # noqa: E402
from harness.frameworks import framework_for  # noqa: E402
from harness.frameworks.base import ModelSpec, PhaseData, PhaseRun  # noqa: E402
from harness.phases import scratch_plan, two_phase_plan  # noqa: E402


def test_a_two_phase_plan_through_the_interface_ends_with_its_best_epochs_weights():
    fw = framework_for("torchvision/mobilenet_v3_small")
    assert fw.name == "torch"
    cfg = DataConfig(source="builtin", name="shapes", builtin_size=10, classes=["arc", "pentagon", "star4"])
    dataset = load_dataset(cfg)
    splits = make_splits(dataset.labels, cfg)
    fw.seed(0)
    model = fw.build(ModelSpec("torchvision/mobilenet_v3_small", 32, 3, None, {}, head_units=8, cut_fraction=0.3), seed=0)
    train = fw.image_batches(dataset, splits.train, 8, shuffle=True, seed=0)
    val = fw.image_batches(dataset, splits.val, 8, shuffle=False)
    keeper, records, epoch = fw.weights_keeper(model), [], 0
    best: dict[str, float] = {}

    def on_epoch(record):  # the caller's rule: keep an improving epoch
        records.append(record)
        if record.metrics["val_accuracy"] > best.get("value", -1):
            best.update(value=record.metrics["val_accuracy"], epoch=record.epoch)
            keeper.keep()

    for phase in two_phase_plan(2, 1e-3, None, 2, 1e-4, None, n_unfreeze=1):
        counts = fw.set_trainable(model, phase.unfreeze_blocks)
        assert counts[0] < counts[1]
        epoch += fw.run_phase(model, phase, PhaseData(train, val), PhaseRun(epoch, on_epoch, keeper=keeper))
    keeper.restore()
    assert [r.epoch for r in records] == [0, 1, 2, 3]
    scored = fw.evaluate(model, val)
    assert scored["accuracy"] == pytest.approx(best["value"])  # the weights scored are the best epoch's
    probabilities = fw.predict(model, val)
    assert probabilities.shape == (len(splits.val), 3) and np.allclose(probabilities.sum(1), 1, atol=1e-5)
    assert fw.weights_digest(model) and fw.trial_level_errors()
    fw.release_memory()


def test_a_from_scratch_model_beats_chance_with_its_batchnorm_statistics_fitted():
    """Random init, BatchNorm trained and re-estimated before each validation: inference-mode
    accuracy follows training accuracy instead of sitting at chance."""
    fw = framework_for("torchvision/resnet18")
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    levels = np.array([40, 128, 215])[labels] + rng.integers(-20, 20, len(labels))  # a class per grey level
    x = np.clip(levels[:, None, None, None] + rng.integers(-10, 10, (len(labels), 32, 32, 3)), 0, 255).astype(np.uint8)
    fw.seed(0)
    model = fw.build(ModelSpec("torchvision/resnet18", 32, 3, None, {}, cut_fraction=0.4), seed=0)
    [phase] = scratch_plan(6, 3e-3, patience=None)
    fw.set_trainable(model, phase.unfreeze_blocks)
    records = []
    train, val = fw.array_batches(x, labels, 12, shuffle=True), fw.array_batches(x, labels, 12, shuffle=False)
    fw.run_phase(model, phase, PhaseData(train, val), PhaseRun(0, records.append))
    # Chance is 1/3. Fitted to the current weights, the statistics serve the first validation already
    # (measured: 1.0; with the running averages alone, 0.69).
    assert records[0].metrics["val_accuracy"] > 0.8

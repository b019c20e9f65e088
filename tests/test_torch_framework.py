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
        keeper.start_phase()
        epoch += fw.run_phase(model, phase, PhaseData(train, val), PhaseRun(epoch, on_epoch))
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


def test_short_runs_rank_rates_from_the_same_weights_and_leave_the_model_as_it_was():
    fw = framework_for("torchvision/mobilenet_v3_small")
    model = fw.build(ModelSpec("torchvision/mobilenet_v3_small", 32, 3, None, {}, cut_fraction=0.3), seed=0)
    fw.set_trainable(model, -1)
    before = fw.weights_of(model)
    rng = np.random.default_rng(0)
    train = fw.array_batches(rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8), rng.integers(0, 3, 16), 8, shuffle=True)
    losses = fw.short_runs(model, train, [1e-3, 1e30], steps=2)
    assert np.isfinite(losses[1e-3]) and not np.isfinite(losses[1e30])  # a diverged rate ranks last
    after = fw.weights_of(model)
    assert all(np.array_equal(after[k].numpy(), v.numpy()) for k, v in before.items())
    fw.load_weights(model, before)


def test_the_process_facing_methods_answer_on_a_cpu_box(tmp_path):
    fw = framework_for("torchvision/resnet18")
    assert fw.sweep_process_gpus() == []
    assert isinstance(fw.out_of_memory("simulated"), fw.trial_level_errors())
    assert fw.backbone_blocks("torchvision/resnet18", 32, None, {}) == 9
    with pytest.raises(Exception, match="cannot take 8-px images"):
        fw.backbone_blocks("torchvision/alexnet", 8, None, {})
    assert fw.decoder_name().startswith("pillow ")
    model = fw.build(ModelSpec("torchvision/resnet18", 32, 3, None, {}, cut_fraction=0.3), seed=0)
    assert fw.backbone_size(model) == sum(p.numel() for p in model.backbone.parameters()) + sum(
        b.numel() for n, b in model.backbone.named_buffers() if n.endswith(("running_mean", "running_var"))
    )


def test_a_process_that_imported_tensorflow_first_still_builds_torch_models():
    """The sweep process checks Keras and torch backbones alike: after TensorFlow, torchvision's
    import of triton would crash it (CUDA builds of torch), so torch's quiet import hides triton."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = (
        "from harness.frameworks import framework_named\n"
        "framework_named('keras')\n"
        "fw = framework_named('torch')\n"
        "print(fw.backbone_blocks('torchvision/mobilenet_v3_small', 32, None, {}))\n"
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "13"

"""One phase in plain PyTorch: the shared epoch axis, early stopping as Keras means it, NaN losses,
stop requests, steps between validations, class weights, the best weights across phases, and
BatchNorm statistics re-estimated for a from-scratch validation."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from torch import nn  # noqa: E402

from harness import runtime  # noqa: E402
from harness.frameworks.base import ModelSpec, PhaseData, PhaseRun  # noqa: E402
from harness.frameworks.torch import loop  # noqa: E402
from harness.frameworks.torch import model as tm  # noqa: E402
from harness.frameworks.torch.data import array_batches  # noqa: E402
from harness.phases import NonFiniteLoss, Phase, two_phase_plan  # noqa: E402

CPU = torch.device("cpu")


def tiny(backbone="torchvision/mobilenet_v3_small", **kw):
    """A mobilenet_v3_small cut to its first blocks: a model that trains in milliseconds a step."""
    return tm.build(ModelSpec(backbone, 32, 3, None, {}, head_units=8, cut_fraction=0.3, **kw), 0, CPU)


def data(n=16, seed=0, batch_size=8):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    y = rng.integers(0, 3, n)
    return PhaseData(array_batches(x, y, batch_size, shuffle=True, seed=seed), array_batches(x, y, batch_size, shuffle=False))


def run_plan(model, plan, phase_data, on_epoch=lambda r: None):
    """The plan's phases in turn on one epoch axis, as the one training path runs them."""
    epoch, history = 0, []

    def record(r):
        history.append(r)
        on_epoch(r)

    for phase in plan:
        tm.set_trainable(model, phase.unfreeze_blocks)
        epoch += loop.run_phase(model, phase, phase_data, PhaseRun(epoch, record))
    return history


def test_phase2_continues_the_epoch_axis_of_phase1_with_a_record_after_every_epoch():
    model, seen = tiny(), []
    plan = two_phase_plan(2, 1e-3, None, 3, 1e-4, None, n_unfreeze=2)
    history = run_plan(model, plan, data(), lambda r: seen.append((r.phase, r.epoch)))
    assert seen == [("head", 0), ("head", 1), ("finetune", 2), ("finetune", 3), ("finetune", 4)]
    assert [r.epoch for r in history] == [0, 1, 2, 3, 4]
    assert set(history[0].metrics) == {"loss", "accuracy", "val_loss", "val_accuracy"}


def test_early_stopping_ends_a_phase_that_stopped_improving_with_its_best_weights():
    model, seen = tiny(), []
    tm.set_trainable(model, 0)
    phase = Phase("head", 10, 0.0, 0, patience=2)  # a zero learning rate never improves
    ran = loop.run_phase(model, phase, data(), PhaseRun(0, seen.append))
    assert ran == 3 and len(seen) == 3  # the best at epoch 0, then two epochs of patience

    rule = loop.EarlyStopping(model, "val_accuracy", "maximize", patience=1)
    head = model.part("head")[-1].weight
    assert not rule.stops(0, {"val_accuracy": 0.5})
    kept = head.detach().clone()
    with torch.no_grad():
        head.add_(1.0)
    assert rule.stops(1, {"val_accuracy": 0.4})
    rule.finish()  # as Keras' restore_best_weights: the phase ends with epoch 0's weights
    assert torch.equal(head, kept)


def test_a_nan_loss_ends_the_trial_within_the_batch():
    model = tiny()
    tm.set_trainable(model, 0)
    with torch.no_grad():
        model.part("head")[-1].weight.fill_(math.nan)
    with pytest.raises(NonFiniteLoss, match="batch 0: loss is nan"):
        loop.run_phase(model, Phase("head", 3, 1e-3, 0), data(), PhaseRun(0, lambda r: None))


def test_a_stop_request_is_honoured_at_the_next_batch():
    model = tiny()
    tm.set_trainable(model, 0)
    runtime.stop_requested.set()
    try:
        with pytest.raises(KeyboardInterrupt, match="stop requested"):
            loop.run_phase(model, Phase("head", 3, 1e-3, 0), data(), PhaseRun(0, lambda r: None))
    finally:
        runtime.stop_requested.clear()


def test_steps_per_epoch_takes_its_steps_from_one_stream_across_passes():
    model, phase_data = tiny(), data(n=16, batch_size=8)  # two batches a pass
    drawn = []
    original = phase_data.train._batches
    phase_data.train._batches = lambda order: drawn.append(len(order)) or original(order)
    tm.set_trainable(model, 0)
    ran = loop.run_phase(model, Phase("head", 2, 1e-3, 0, steps_per_epoch=3), phase_data, PhaseRun(0, lambda r: None))
    assert ran == 2
    assert len(drawn) == 3  # 6 steps: three passes, each shuffled anew, none restarted at an epoch's end


def test_the_loss_weighs_each_example_by_its_class_weight():
    model = tiny()
    tm.set_trainable(model, 0)
    x = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    with torch.no_grad():
        each = nn.functional.cross_entropy(model.net.eval()(x).log(), y, reduction="none")
    weights = {0: 3.0, 1: 1.0, 2: 0.5}
    step = loop.Step(model, model.logits, torch.optim.SGD(model.part("head").parameters(), lr=0.0), weights)
    model.net.eval()  # no dropout: the same forward as above
    loss, (hits, weight) = step.one(x, y, 0)
    w = torch.tensor([3.0, 3.0, 1.0, 1.0, 0.5, 0.5])
    assert loss == pytest.approx(float((each * w).mean()), rel=1e-5) and float(weight) == pytest.approx(9.0)


def test_the_keeper_restores_the_best_epoch_across_phases():
    model = tiny()
    keeper = loop.WeightsKeeper(model)
    tm.set_trainable(model, 0)
    keeper.start_phase()
    keeper.keep()  # the best epoch: phase 1's
    best = {k: v.clone() for k, v in model.net.state_dict().items()}
    tm.set_trainable(model, -1)  # phase 2 trains the backbone and its BatchNorm too
    keeper.start_phase()
    loop.run_phase(model, Phase("scratch", 1, 1e-2, -1), data(), PhaseRun(1, lambda r: None))
    assert any(not torch.equal(model.net.state_dict()[k], v) for k, v in best.items())
    keeper.restore()
    for key, value in model.net.state_dict().items():
        assert torch.equal(value, best[key]), key


def test_from_scratch_validation_reestimates_batchnorm_statistics_on_training_batches():
    model = tiny()
    tm.set_trainable(model, -1)
    first = next(m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    hook = first.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    x = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    loop.reestimate_batchnorm(model, [(x, None), (x.flip(1), None)])
    hook.remove()
    expected = torch.stack([s.mean((0, 2, 3)) for s in seen]).mean(0)  # the average of the batches' means
    torch.testing.assert_close(first.running_mean, expected)
    assert first.momentum == tm.RANDOM_INIT_BN_MOMENTUM and not model.net.training


def test_the_scratch_rule_runs_to_its_floor_then_stops_when_loss_and_metric_stall():
    rule = loop.ScratchStopping("val_accuracy", "maximize", patience=1, min_epochs=3)
    stalled = {"val_loss": 1.0, "val_accuracy": 0.3}
    assert [rule.stops(e, stalled) for e in range(3)] == [False, False, True]  # min_epochs validations first

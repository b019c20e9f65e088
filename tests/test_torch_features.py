"""Frozen features of a torch model: activations at the pool or a block boundary, the part of the
model above them (sharing its weights), and the digest of the backbone's weights."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchvision")

from harness.frameworks.base import ModelSpec, PhaseData, PhaseRun  # noqa: E402
from harness.frameworks.torch import features as ft  # noqa: E402
from harness.frameworks.torch import model as tm  # noqa: E402
from harness.frameworks.torch.data import array_batches  # noqa: E402
from harness.frameworks.torch.loop import run_phase  # noqa: E402
from harness.phases import Phase  # noqa: E402

CPU = torch.device("cpu")


def mobilenet(seed=0):
    return tm.build(ModelSpec("torchvision/mobilenet_v3_small", 32, 3, None, {}, head_units=8), seed, CPU)


def images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8), rng.integers(0, 3, n)


def test_the_boundary_is_where_the_first_unfrozen_block_reads_and_a_whole_model_has_none():
    model = mobilenet()
    assert ft.boundary_layer(model, 0) == "pool"
    assert ft.boundary_layer(model, 2) == "features_10"  # 13 blocks: the top two read block 11's output
    assert ft.boundary_layer(model, model.n_blocks) is None  # nothing frozen below: no activations to cache
    vit = tm.build(ModelSpec("timm/vit_tiny_patch16_224", 32, 3, None, {"img_size": 32}), 0, CPU)
    assert ft.boundary_layer(vit, 0) == "pool" and ft.boundary_layer(vit, 2) is None


@pytest.mark.parametrize("unfrozen", [0, 2])
def test_the_part_above_the_activations_computes_what_the_whole_model_computes(unfrozen):
    model = mobilenet()
    layer = ft.boundary_layer(model, unfrozen)
    x, y = images()
    out = np.zeros((len(x), *ft.activation_shape(model, layer)), np.float32)
    ft.write_activations(model, layer, array_batches(x, y, 4, shuffle=False), out)
    assert out.shape == ((6, 576) if layer == "pool" else (6, 96, 1, 1)) and out.any()
    above = ft.model_above(model, layer)
    model.net.eval()
    with torch.no_grad():
        torch.testing.assert_close(above.logits(torch.from_numpy(out)), model.logits(torch.from_numpy(x)), rtol=1e-4, atol=1e-5)


def test_training_the_part_above_trains_the_model():
    model = mobilenet()
    layer = ft.boundary_layer(model, 1)
    x, y = images(8)
    out = np.zeros((len(x), *ft.activation_shape(model, layer)), np.float32)
    ft.write_activations(model, layer, array_batches(x, y, 4, shuffle=False), out)
    tm.set_trainable(model, 1)
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    cached = PhaseData(
        array_batches(out, y, 4, shuffle=True), array_batches(out, y, 4, shuffle=False), ft.model_above(model, layer)
    )
    records = []
    run_phase(model, Phase("finetune", 1, 1e-2, 1), cached, PhaseRun(3, records.append))
    after = model.net.state_dict()
    assert [r.epoch for r in records] == [3]
    assert not torch.equal(after["head.0.weight"], before["head.0.weight"])
    assert not torch.equal(after["backbone.features_12.0.weight"], before["backbone.features_12.0.weight"])
    assert torch.equal(after["backbone.features_11.block.0.0.weight"], before["backbone.features_11.block.0.0.weight"])


def test_the_digest_is_of_the_backbones_weight_values():
    one, two = mobilenet(0), mobilenet(0)
    assert ft.weights_digest(one) == ft.weights_digest(two)
    with torch.no_grad():
        two.part("head")[0].weight.add_(1.0)
    assert ft.weights_digest(one) == ft.weights_digest(two)  # the head is not what features depend on
    with torch.no_grad():
        next(two.backbone.parameters()).add_(1.0)
    assert ft.weights_digest(one) != ft.weights_digest(two)
    assert ft.weights_digest(one) != ft.weights_digest(mobilenet(1))

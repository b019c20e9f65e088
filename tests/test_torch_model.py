"""The torch model: which parameters train in each phase, BatchNorm statistics where nothing should
move them, the seed answer's VGG16 shape, preprocessing inside, augmentation with Keras' meaning."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torch import nn  # noqa: E402

from harness.frameworks.base import ModelSpec, PhaseData, PhaseRun  # noqa: E402
from harness.frameworks.torch import backbones as bb  # noqa: E402
from harness.frameworks.torch import model as tm  # noqa: E402
from harness.frameworks.torch.data import array_batches  # noqa: E402
from harness.frameworks.torch.loop import run_phase  # noqa: E402
from harness.phases import Phase  # noqa: E402

CPU = torch.device("cpu")


def spec(backbone="torchvision/resnet18", weights=None, **kw) -> ModelSpec:
    return ModelSpec(backbone, 32, 3, weights, kw.pop("backbone_options", {}), **{"head_units": 8, **kw})


@pytest.fixture
def weights_file(tmp_path):
    """A resnet18 backbone's weights as a file: a pretrained backbone that loads offline."""
    torch.manual_seed(1)
    path = tmp_path / "resnet18.pt"
    bb.save_state(bb.construct("torchvision/resnet18", None, {}).module, path)
    return str(path)


def batches(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8)
    y = rng.integers(0, 3, n)
    return array_batches(x, y, 8, shuffle=True, seed=seed), array_batches(x, y, 8, shuffle=False)


def trainable(model) -> set[str]:
    return {name for name, p in model.net.named_parameters() if p.requires_grad}


def batchnorm_stats(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.net.state_dict().items() if "running_" in k}


def train_one_epoch(model, unfreeze: int, lr=1e-2):
    train, val = batches()
    run_phase(model, Phase("p", 1, lr, unfreeze), PhaseData(train, val), PhaseRun(0, lambda r: None))


def test_each_phase_trains_the_head_then_the_top_blocks_and_never_a_pretrained_batchnorm(weights_file):
    model = tm.build(spec(weights=weights_file), 0, CPU)
    head = {f"head.{n}" for n, _ in model.part("head").named_parameters()}
    count, total = tm.set_trainable(model, 0)
    assert trainable(model) == head
    assert count == sum(p.numel() for p in model.part("head").parameters()) and total > count

    tm.set_trainable(model, 2)  # layer4's two residual blocks
    top = {n for n in trainable(model) if not n.startswith("head.")}
    assert top and all(n.startswith(("backbone.layer4_0.", "backbone.layer4_1.")) for n in top)
    assert not any(".bn" in n or "downsample.1" in n for n in top)  # BatchNorm stays as pretrained
    assert "backbone.layer4_0.conv1.weight" in top and "backbone.layer3_1.conv1.weight" not in trainable(model)

    everything, _ = tm.set_trainable(model, -1)  # from scratch: every parameter, BatchNorm too
    assert trainable(model) == {n for n, _ in model.net.named_parameters()}
    assert everything == sum(p.numel() for p in model.net.parameters())


def test_a_pretrained_backbones_batchnorm_statistics_stay_through_a_fine_tune_phase(weights_file):
    model = tm.build(spec(weights=weights_file, dropout=0.2), 0, CPU)
    tm.set_trainable(model, 2)
    before_stats, before = batchnorm_stats(model), {k: v.clone() for k, v in model.net.state_dict().items()}
    train_one_epoch(model, 2)
    after = model.net.state_dict()
    for key, value in before_stats.items():  # frozen blocks and unfrozen ones alike
        assert torch.equal(after[key], value), key
    assert not torch.equal(after["backbone.layer4_1.conv2.weight"], before["backbone.layer4_1.conv2.weight"])
    assert torch.equal(after["backbone.layer3_1.conv2.weight"], before["backbone.layer3_1.conv2.weight"])
    assert torch.equal(after["backbone.layer4_1.bn2.weight"], before["backbone.layer4_1.bn2.weight"])
    tm.train_mode(model)
    assert not model.backbone.training and model.part("head").training  # the head's dropout trains


def test_a_random_init_backbone_trains_batchnorm_in_its_unfrozen_blocks_only():
    model = tm.build(spec(), 0, CPU)
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and {m.momentum for m in norms} == {tm.RANDOM_INIT_BN_MOMENTUM}
    tm.set_trainable(model, 1)
    before = batchnorm_stats(model)
    train_one_epoch(model, 1)
    after = model.net.state_dict()
    moved = {k for k, v in before.items() if not torch.equal(after[k], v)}
    assert moved and all(k.startswith("backbone.layer4_1.") for k in moved)  # the unfrozen block only
    tm.train_mode(model)
    assert model.backbone.get_submodule("layer4_1").training and not model.backbone.get_submodule("layer3_1").training


def test_from_scratch_every_batchnorm_trains():
    model = tm.build(spec(backbone="torchvision/mobilenet_v3_small"), 0, CPU)
    tm.set_trainable(model, -1)
    before = batchnorm_stats(model)
    train_one_epoch(model, -1)
    after = model.net.state_dict()
    assert all(not torch.equal(after[k], v) for k, v in before.items() if k.endswith("running_mean"))
    assert {m.momentum for m in tm.training_batchnorms(model)} == {tm.RANDOM_INIT_BN_MOMENTUM}  # restored after re-estimating


def test_vgg16_features_with_the_seed_answers_head():
    """The seed answer: torchvision's VGG16, its `features` kept, `nn.Sequential(nn.Linear(...),
    nn.ReLU(), nn.Linear(..., 3))` on top, for a 3-class target."""
    vgg = torchvision.models.vgg16()
    seed_head = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 3))
    model = tm.build(ModelSpec("torchvision/vgg16", 32, 3, None, {}, head_units=32, dropout=0.0), 0, CPU)
    assert [repr(m) for m in model.backbone] == [repr(m) for m in vgg.features]
    assert repr(model.part("head")) == repr(seed_head)
    assert model.n_blocks == 5
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        probabilities = model.net.eval()(images)
    assert probabilities.shape == (2, 3) and torch.allclose(probabilities.sum(1), torch.ones(2))


def test_preprocessing_inside_the_model_is_the_weights_own_normalisation():
    model = tm.build(spec(backbone="torchvision/mobilenet_v3_small"), 0, CPU)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    mean, std = torch.tensor(bb.IMAGENET_MEAN)[:, None, None], torch.tensor(bb.IMAGENET_STD)[:, None, None]
    expected = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
    torch.testing.assert_close(model.part("preprocess")(images), expected)


def test_augmentation_flips_rotates_and_zooms_each_image_on_its_own(monkeypatch):
    images = torch.randint(0, 256, (6, 32, 32, 3), dtype=torch.uint8)
    out = tm.Augmentation(0)(images)
    assert out.dtype == torch.uint8 and out.shape == images.shape and not torch.equal(out, images)
    assert torch.equal(out, tm.Augmentation(0)(images))  # one seed, one draw
    flat = torch.full((2, 32, 32, 3), 77, dtype=torch.uint8)
    assert torch.equal(tm.Augmentation(1)(flat), flat)  # the border is reflected, never filled
    monkeypatch.setattr(tm, "ROTATION", 0.0)
    monkeypatch.setattr(tm, "ZOOM", 0.0)
    flipped = tm.Augmentation(2)(images)
    for image, result in zip(images, flipped):
        assert torch.equal(result, image) or torch.equal(result, image.flip(1))
    assert any(not torch.equal(r, i) for r, i in zip(flipped, images))


def test_augmentation_runs_in_training_only():
    model = tm.build(spec(backbone="torchvision/mobilenet_v3_small", augment=True), 0, CPU)
    assert model.augment is not None and not any("augment" in n for n, _ in model.net.named_children())
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(model.net.eval()(images), model.net(images))


def test_a_timm_models_top_blocks_unfreeze_by_its_own_parameter_groups():
    model = tm.build(spec(backbone="timm/vit_tiny_patch16_224", backbone_options={"img_size": 32}), 0, CPU)
    tm.set_trainable(model, 1)
    top = {n for n in trainable(model) if not n.startswith("head.")}
    assert top and all(n.startswith(("backbone.blocks.11.", "backbone.norm.")) for n in top)
    assert "backbone.blocks.11.attn.qkv.weight" in top and "backbone.norm.weight" in top  # the final norm joins the top block
    tm.train_mode(model)  # random init: the frozen blocks run in inference mode, the top one trains
    assert model.backbone.get_submodule("blocks.11").training and not model.backbone.get_submodule("blocks.10").training

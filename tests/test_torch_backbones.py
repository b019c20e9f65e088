"""torchvision and timm backbones: blocks from each model's own structure, weights from the zoos'
own loading code (offline: a clear error), state dicts that do not fit named layer by layer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

from torch import nn  # noqa: E402

from harness.frameworks.torch import backbones as bb  # noqa: E402
from harness.frameworks.torch.names import BackboneError  # noqa: E402


def child_types(backbone: bb.Backbone, block: list[str]) -> list[str]:
    return [type(backbone.module.get_submodule(entry)).__name__ for entry in block]


def test_vgg_blocks_are_its_five_conv_stacks_each_ending_in_its_pool():
    vgg = bb.construct("torchvision/vgg11", None, {})
    assert vgg.chain and len(vgg.blocks) == 5  # as Keras' block1..block5
    assert all(child_types(vgg, block)[-1] == "MaxPool2d" for block in vgg.blocks)
    assert child_types(vgg, vgg.blocks[0]) == ["Conv2d", "ReLU", "MaxPool2d"]
    assert [type(m) for m in vgg.module] == [type(m) for m in torchvision.models.vgg11().features]


def test_resnet_blocks_are_the_stem_then_each_residual_block_of_layer1_to_layer4():
    resnet = bb.construct("torchvision/resnet18", None, {})
    assert len(resnet.blocks) == 1 + 8
    assert child_types(resnet, resnet.blocks[0]) == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert all(child_types(resnet, block) == ["BasicBlock"] for block in resnet.blocks[1:])


def test_mobilenet_blocks_are_its_features_children():
    net = bb.construct("torchvision/mobilenet_v3_small", None, {})
    assert len(net.blocks) == len(torchvision.models.mobilenet_v3_small().features) == 13
    assert net.pools_itself is False and net.mean == bb.IMAGENET_MEAN


def test_a_timm_model_is_cut_into_timms_own_parameter_groups():
    vit = bb.construct("timm/vit_tiny_patch16_224", None, {"img_size": 32})
    assert not vit.chain and vit.pools_itself
    assert vit.blocks[0][:2] == ["cls_token", "pos_embed"]  # the stem first
    assert len(vit.blocks) == 1 + 12  # then its 12 transformer blocks; the final norm joins the last
    assert vit.blocks[-1][-1].startswith("fc_norm") or vit.blocks[-1][-1].startswith("norm")
    convnext = bb.construct("timm/convnext_atto", None, {}, pooling="max")
    assert convnext.module.head.global_pool.pool_type == "max"  # the spec's pooling, timm's own layer


def test_a_model_whose_blocks_cannot_be_found_is_refused_by_name():
    with pytest.raises(BackboneError, match="torchvision/googlenet: its blocks cannot be found"):
        bb.construct("torchvision/googlenet", None, {"init_weights": False, "aux_logits": False})


def test_intermediate_features_cut_a_chain_at_a_block_boundary_and_refuse_a_whole_model():
    net = bb.construct("torchvision/mobilenet_v3_small", None, {})
    cut = bb.cut(net, 4, "torchvision/mobilenet_v3_small")
    assert len(cut.blocks) == 4 and len(cut.module) == 4
    with torch.no_grad():
        assert cut.module(torch.zeros(1, 3, 32, 32)).shape[1] == 24  # the fourth block's channels
    vit = bb.construct("timm/vit_tiny_patch16_224", None, {"img_size": 32})
    with pytest.raises(BackboneError, match="need a backbone that is a chain"):
        bb.cut(vit, 4, "timm/vit_tiny_patch16_224")


def test_a_state_dict_that_does_not_fit_names_the_layers(tmp_path):
    small = bb.construct("torchvision/resnet18", None, {})
    path = tmp_path / "resnet18.pt"
    bb.save_state(small.module, path)
    with pytest.raises(BackboneError) as caught:
        bb.construct("torchvision/resnet34", str(path), {})
    message = str(caught.value)
    assert "do not fit this backbone" in message and "missing" in message
    assert "missing: layer1_2.conv1.weight" in message  # resnet34's layer1 has a third block, resnet18's has not
    loaded = bb.construct("torchvision/resnet18", str(path), {})  # its own file loads
    for key, value in small.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)
    assert bb.state_mismatch({"a": torch.zeros(2)}, {"a": torch.zeros(3), "b": torch.zeros(1)}) == (
        "1 unexpected: b; 1 of another shape: a (3,) for (2,)"
    )


def test_imagenet_weights_offline_name_the_file_and_the_cache_folder(tmp_path, monkeypatch):
    """torchvision's own loading code runs up to the download, which fails as it does offline."""
    from urllib.error import URLError

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(url, dst, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(BackboneError) as caught:
        bb.construct("torchvision/resnet18", "imagenet", {})
    message = str(caught.value)
    assert "torchvision/resnet18: the ImageNet weights could not be fetched" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints") in message


def test_timm_imagenet_weights_offline_name_the_repository_and_the_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(BackboneError) as caught:
        bb.construct("timm/resnet18", "imagenet", {})
    message = str(caught.value)
    assert "timm/resnet18: the ImageNet weights could not be fetched" in message
    assert "timm/resnet18.a1_in1k" in message and str(tmp_path / "hf") in message


def test_every_block_owns_a_weight_to_train():
    densenet_like = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Sequential(nn.Conv2d(4, 4, 1)), nn.BatchNorm2d(4)
    )
    blocks = bb.chain_blocks(densenet_like)
    assert blocks == [["0", "1", "2"], ["3", "4"]]  # the lone norm joins the block below it
    resnet = bb.construct("torchvision/resnet18", None, {})
    assert [b[0] for b in resnet.blocks[:3]] == ["conv1", "layer1_0", "layer1_1"]  # named by their place in the model

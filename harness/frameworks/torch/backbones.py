"""torchvision and timm backbones: built headless by name, cut into blocks by their own structure.

A backbone is one of two kinds:

- a **chain**: an `nn.Sequential` of the model's own modules, run in order, giving a feature map
  (N, C, H, W) that the model pools. torchvision's CNNs are chains: `features` for VGG, AlexNet,
  SqueezeNet, MobileNet, EfficientNet and ConvNeXt; the stem, then `layer1`-`layer4` for ResNet;
  the stem and the trunk's stages for RegNet. A stage that is itself a plain sequence of blocks
  (a ResNet layer, an EfficientNet stage) is opened into its blocks; a run of single layers (a
  stem, a VGG block) is one block up to and including its pooling layer. A chain can be cut at
  any block boundary: intermediate features, and cached activations at the freeze boundary.
- a **whole model** with its classifier removed, pooling as it was trained (timm's models, whose
  `global_pool` takes the spec's pooling where it is a CNN's; torchvision's ViT, whose output is
  its class token). Its blocks are groups of parameters: timm's own `group_matcher` (the groups
  of its layer-wise learning-rate decay), torchvision ViT's encoder layers.

Either way a block is a list of entries (a submodule's path or a parameter's name inside the
backbone), input to output, and every block owns a weight that is not a normalisation's
(`merge_weightless`, the rule the Keras side follows): unfreezing one block
always gives the optimizer something to train.

    >>> bb = construct("torchvision/resnet18", weights=None, options={}, pooling="avg")
    >>> bb.chain, len(bb.blocks)
    (True, 9)
"""

from __future__ import annotations

import contextlib
import socket
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.frameworks.keras.backbones import merge_weightless  # pure: the same rule for both frameworks
from harness.frameworks.torch.names import BackboneError, check_exists, install_problem, split_name

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DOWNLOAD_TIMEOUT_S = 30  # a silent network (offline, firewalled) fails the download after this, not after minutes

# Normalisation layers: never a block on their own (harness/frameworks/keras/backbones.py `_trains_when_unfrozen`).
NORMS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


@dataclass
class Backbone:
    module: nn.Module  # normalised float images (N, 3, H, W) -> features
    blocks: list[list[str]]  # entries of `module` (submodule paths, parameter names) per block, input to output
    chain: bool  # `module` is an nn.Sequential whose children the blocks split in order
    pools_itself: bool  # its output is already pooled, (N, features)
    mean: tuple[float, ...]  # of the pixels in [0, 1], per RGB channel, as its weights were trained
    std: tuple[float, ...]


def construct(name: str, weights: str | None, options: dict, pooling: str = "avg") -> Backbone:
    """The backbone `name` ("torchvision/<model>", "timm/<model>") with `weights`: "imagenet" (the
    zoo's own pretrained weights, through its own loading code), None (random init) or the path of
    a state dict that `save_state` wrote for this backbone."""
    zoo, model = split_name(name)
    problem = install_problem(name)
    if problem:
        raise BackboneError(problem)
    check_exists(name)
    key = (name, weights, repr(sorted(options.items())), pooling)
    cached = _LOADED.get(key) if weights is not None else None
    build_weights = "imagenet" if weights == "imagenet" and cached is None else None
    backbone = (
        _torchvision(model, build_weights, options) if zoo == "torchvision" else _timm(model, build_weights, options, pooling)
    )
    if weights == "imagenet":
        backbone.mean, backbone.std = _pretrained_normalisation(zoo, model, backbone)
    if cached is not None:
        backbone.module.load_state_dict(cached)
    elif weights not in (None, "imagenet"):
        load_state(backbone.module, weights, name)
    if weights is not None and cached is None:
        _LOADED[key] = {k: v.detach().clone() for k, v in backbone.module.state_dict().items()}
    return backbone


# Pretrained weights, read once per process: a warm trial process builds the same backbone for
# trial after trial (as harness/frameworks/keras/backbones.py `_LOADED_WEIGHTS` does for Keras).
_LOADED: dict[tuple, dict[str, torch.Tensor]] = {}


# --- torchvision -------------------------------------------------------------------------------


def _torchvision(model: str, weights: str | None, options: dict) -> Backbone:
    import torchvision

    if weights == "imagenet":
        with _fetching(f"torchvision/{model}", _torchvision_source(model)):
            net = torchvision.models.get_model(model, weights="DEFAULT", **options)
    else:
        net = torchvision.models.get_model(model, weights=None, **options)
    chain = torchvision_chain(net)
    if chain is not None:
        module = nn.Sequential(OrderedDict(open_stages(chain)))
        return Backbone(module, chain_blocks(module), True, False, IMAGENET_MEAN, IMAGENET_STD)
    if isinstance(net, torchvision.models.VisionTransformer):
        net.heads = nn.Identity()  # the class token's features (N, hidden), as the head read them
        layers = [[f"encoder.layers.{n}"] for n, _ in net.encoder.layers.named_children()]
        groups = [["conv_proj", "class_token", "encoder.pos_embedding"], *layers, ["encoder.ln"]]
        return Backbone(net, merge_weightless(groups, weighted_entries(net, groups)), False, True, IMAGENET_MEAN, IMAGENET_STD)
    raise BackboneError(
        f"torchvision/{model}: its blocks cannot be found: a {type(net).__name__} is not a chain of blocks the harness "
        "knows (VGG, AlexNet, SqueezeNet, MobileNet, EfficientNet, ConvNeXt, ResNet, RegNet, ShuffleNet, MNASNet, "
        "DenseNet, Swin, ViT); choose another backbone"
    )


def torchvision_chain(net: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The modules a torchvision classifier runs in order before its pooling and classifier, named
    by their place in it, or None when its forward is not such a chain (GoogLeNet, Inception,
    MaxViT, ViT)."""
    from torchvision import models as m

    def named(prefix: str, sequence: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"{prefix}_{n}", module) for n, module in sequence.named_children()]

    if isinstance(net, m.ResNet):
        return [(n, getattr(net, n)) for n in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")]
    if isinstance(net, m.DenseNet):
        return [*named("features", net.features), ("relu", nn.ReLU())]  # its forward applies a ReLU after `features`
    if isinstance(net, m.SwinTransformer):
        return [*named("features", net.features), ("norm", net.norm), ("permute", net.permute)]  # channels last until `permute`
    if isinstance(net, m.RegNet):
        return [("stem", net.stem), *named("trunk_output", net.trunk_output)]
    if isinstance(net, m.ShuffleNetV2):
        return [(n, getattr(net, n)) for n in ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5")]
    if isinstance(net, m.MNASNet):
        return named("layers", net.layers)
    if isinstance(net, (m.VGG, m.AlexNet, m.SqueezeNet, m.MobileNetV2, m.MobileNetV3, m.EfficientNet, m.ConvNeXt)):
        return named("features", net.features)
    return None


def _torchvision_source(model: str) -> str:
    """Where torchvision's default weights for `model` come from, and where they are cached."""
    import torchvision

    url = torchvision.models.get_model_weights(model).DEFAULT.url
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return f"it reads {url}, cached as {cache / Path(url).name}: place that file in {cache} (set TORCH_HOME to move the cache)"


# --- timm --------------------------------------------------------------------------------------


def _timm(model: str, weights: str | None, options: dict, pooling: str) -> Backbone:
    import timm
    from timm.models import group_parameters

    net: Any  # timm's models carry methods torch's typing does not know (reset_classifier, group_matcher)
    if weights == "imagenet":
        with _fetching(f"timm/{model}", _timm_source(model)):
            net = timm.create_model(model, pretrained=True, num_classes=0, **options)
    else:
        net = timm.create_model(model, pretrained=False, num_classes=0, **options)
    pools_own_way = isinstance(getattr(net, "global_pool", None), str)  # a token model (ViT): its own pooling
    if not pools_own_way:
        net.reset_classifier(0, global_pool=pooling)
    if not hasattr(net, "group_matcher"):
        raise BackboneError(f"timm/{model}: its blocks cannot be found: the model has no group_matcher")
    groups = group_parameters(net, net.group_matcher(coarse=False))
    blocks = [list(groups[k]) for k in sorted(groups)]
    if len(blocks) < 2:
        raise BackboneError(f"timm/{model}: its blocks cannot be found: group_matcher gives {len(blocks)} group")
    return Backbone(net, merge_weightless(blocks, weighted_entries(net, blocks)), False, True, IMAGENET_MEAN, IMAGENET_STD)


def _timm_source(model: str) -> str:
    from huggingface_hub import constants
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg else None
    if hub_id:
        return (
            f"it reads the Hugging Face repository {hub_id}: on a machine online run `hf download {hub_id}` and copy "
            f"its folder models--{hub_id.replace('/', '--')} into {constants.HF_HUB_CACHE} (set HF_HOME to move the cache)"
        )
    url = getattr(cfg, "url", None) if cfg else None
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    return f"it reads {url}: place that file in {cache} (set TORCH_HOME to move the cache)"


def _pretrained_normalisation(zoo: str, model: str, backbone: Backbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean and std the pretrained weights were trained with: torchvision's transforms, timm's pretrained_cfg."""
    if zoo == "torchvision":
        import torchvision

        preset = torchvision.models.get_model_weights(model).DEFAULT.transforms()
        return tuple(preset.mean), tuple(preset.std)
    cfg = getattr(backbone.module, "pretrained_cfg", None) or {}
    return tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


@contextlib.contextmanager
def _fetching(name: str, source: str):
    """Around a zoo's own download of pretrained weights: a network that does not answer fails
    after DOWNLOAD_TIMEOUT_S, and any failure to fetch says which file to place where."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        yield
    except OSError as exc:  # urllib's URLError, a timeout, huggingface_hub's LocalEntryNotFoundError
        raise BackboneError(f"{name}: the ImageNet weights could not be fetched ({type(exc).__name__}: {exc}); {source}") from exc
    finally:
        socket.setdefaulttimeout(previous)


# --- blocks ------------------------------------------------------------------------------------


def _composite(module: nn.Module) -> bool:
    return next(module.children(), None) is not None


def open_stages(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Replace each plain `nn.Sequential` of composite modules (a ResNet layer, an EfficientNet or
    ConvNeXt stage) by its modules, named `<stage>_<child>`, recursively: its blocks are blocks of
    the chain. A sequence of single layers (a conv-norm-activation) stays whole, and so does a
    module with its own forward."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in modules:
        kids = list(module.named_children())
        plain = isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
        if plain and kids and all(_composite(k) for _, k in kids):
            out.extend(open_stages([(f"{name}_{n}", k) for n, k in kids]))
        else:
            out.append((name, module))
    return out


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def chain_blocks(chain: nn.Sequential) -> list[list[str]]:
    """A chain's children (by name) grouped into blocks: each composite module is a piece, a run of
    single layers is one piece up to and including a pooling layer (VGG's blocks, a ResNet stem);
    pieces without a weight to train join the block below (`merge_weightless`)."""
    pieces: list[list[str]] = []
    run: list[str] = []
    for name, module in chain.named_children():
        if _composite(module):
            if run:
                pieces.append(run)
                run = []
            pieces.append([name])
        else:
            run.append(name)
            if isinstance(module, _POOLS):
                pieces.append(run)
                run = []
    if run:
        pieces.append(run)
    return merge_weightless(pieces, weighted_entries(chain, pieces))


def entry_parameters(module: nn.Module, entry: str) -> list[tuple[nn.Module, nn.Parameter]]:
    """(owning module, parameter) of one block entry: every parameter of a submodule, or one parameter."""
    try:
        sub = module.get_submodule(entry)
    except AttributeError:
        owner_path, _, _ = entry.rpartition(".")
        return [(module.get_submodule(owner_path), module.get_parameter(entry))]
    return [(owner, p) for owner in sub.modules() for p in owner.parameters(recurse=False)]


def weighted_entries(module: nn.Module, blocks: list[list[str]]) -> set[str]:
    """The entries that own a weight to train once unfrozen: a parameter not of a normalisation."""
    return {e for block in blocks for e in block if any(not isinstance(owner, NORMS) for owner, _ in entry_parameters(module, e))}


def cut(backbone: Backbone, keep: int, name: str) -> Backbone:
    """The first `keep` blocks of a chain (intermediate features)."""
    if not backbone.chain:
        raise BackboneError(
            f"{name}: intermediate features (cut_fraction < 1) need a backbone that is a chain of blocks "
            "(torchvision's CNNs); this one is a whole model"
        )
    assert isinstance(backbone.module, nn.Sequential)
    module = backbone.module[: position(backbone.module, backbone.blocks[keep - 1][-1]) + 1]
    return Backbone(module, backbone.blocks[:keep], True, False, backbone.mean, backbone.std)


def position(chain: nn.Sequential, child: str) -> int:
    """The index of the chain's child named `child`."""
    return list(chain._modules).index(child)


def count_blocks(name: str, image_size: int, weights: str | None, options: dict) -> int:
    """How many blocks backbone `name` has, built once with `weights` and run once on a blank image
    of `image_size` px, keeping nothing (harness/preflight.py `resolve_weights`): a download that
    cannot happen, a weights file that does not fit or a size the model cannot take fail here,
    before any trial."""
    backbone = construct(name, weights, options)
    backbone.module.eval()
    try:
        with torch.no_grad():
            backbone.module(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise BackboneError(f"{name} cannot take {image_size}-px images: {exc}") from exc
    _LOADED.clear()  # the sweep process keeps no weights
    return len(backbone.blocks)


# --- state dicts -------------------------------------------------------------------------------


def save_state(module: nn.Module, path: str | Path) -> None:
    """The backbone's weights (parameters and BatchNorm statistics) as a state dict file."""
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, str(path))


def state_mismatch(own: dict[str, torch.Tensor], found: dict[str, torch.Tensor], limit: int = 8) -> str | None:
    """What stops `found` loading into a module whose state dict is `own`, or None. Pure."""
    missing = [k for k in own if k not in found]
    unexpected = [k for k in found if k not in own]
    shapes = [
        f"{k} {tuple(found[k].shape)} for {tuple(own[k].shape)}" for k in own if k in found and found[k].shape != own[k].shape
    ]

    def listed(label: str, names: list[str]) -> str:
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return f"{len(names)} {label}: {', '.join(names[:limit])}{more}"

    parts = [
        listed(label, names)
        for label, names in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
        if names
    ]
    return "; ".join(parts) or None


def load_state(module: nn.Module, path: str, name: str) -> None:
    """Load a state dict file into the backbone; BackboneError naming the layers when it does not fit."""
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise BackboneError(f"{name}: cannot read the weights file {path}: {exc}") from exc
    if not isinstance(found, dict):
        raise BackboneError(f"{name}: {path} holds a {type(found).__name__}, not a state dict")
    problem = state_mismatch(module.state_dict(), found)
    if problem:
        raise BackboneError(f"{name}: the weights in {path} do not fit this backbone: {problem}")
    module.load_state_dict(found)

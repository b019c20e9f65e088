"""Backbone + head as one portable module, freezing by whole blocks, and the train/eval modes.

The model is an `nn.Sequential` of torch's and the zoo's own modules only, so MLflow's PyTorch
flavour pickles it and it loads where the harness is not installed:

    preprocess   uint8 (N, H, W, 3) -> permute -> /255 -> the weights' own mean and std
    backbone     a chain of the zoo model's blocks, or the whole model without its classifier
    pool         global average or max pooling (nothing for a backbone that pools itself)
    head         [Dropout, Linear(head_units), ReLU], Dropout, Linear(classes)  (zero dropout: left out)
    probabilities  Softmax

so VGG16's `features` with `nn.Sequential(nn.Linear, nn.ReLU, nn.Linear)` is `torchvision/vgg16`
with `head_units` set and no dropout. Augmentation (random flip, rotation and zoom, with Keras'
meaning) runs on uint8 batches in the training loop, outside the saved model.

Modes, as the Keras side has them (harness/frameworks/keras/model.py): a pretrained backbone runs in inference
mode in every phase, even once unfrozen (its BatchNorm statistics, dropout and stochastic depth
stay as pretrained), and its BatchNorm parameters never train. A randomly initialised backbone's
BatchNorm trains where its block trains, with momentum 0.1 (Keras' 0.9) so its statistics fit
within ~50 steps; its frozen modules run in inference mode. `train_mode` applies this after
every `nn.Module.train()`.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from torch import nn

from harness.frameworks.base import ModelSpec
from harness.frameworks.torch import backbones as bb
from harness.frameworks.torch.names import BackboneError
from harness.phases import blocks_to_keep

# torch's convention (new = (1 - momentum) * old + momentum * batch): Keras' 0.9, harness/frameworks/
# keras/model.py RANDOM_INIT_BN_MOMENTUM, which fits moving statistics within ~50 steps.
RANDOM_INIT_BN_MOMENTUM = 0.1
ROTATION = 0.1  # of a full turn either way (36 degrees), as keras.layers.RandomRotation(0.1)
ZOOM = 0.1  # +-10% of the height and width, as keras.layers.RandomZoom(0.1)


@dataclass(eq=False)
class TorchModel:
    """A built model and what the harness knows of it (the seam's opaque `Model`)."""

    net: nn.Sequential  # the portable model: uint8 images -> class probabilities
    spec: ModelSpec
    blocks: list[list[str]]  # entries of net.backbone per block, input to output
    is_chain: bool  # net.backbone is a chain of blocks (cut and cached at block boundaries)
    device: torch.device
    augment: Augmentation | None = None
    compiled: dict = field(default_factory=dict)  # id(module) -> (module, its torch.compile'd self): train.jit_compile
    logits: nn.Sequential = field(init=False)  # the model without its softmax (shares every module): what the loss reads

    def __post_init__(self):
        self.logits = self.net[:-1]

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def part(self, name: str) -> nn.Module:
        """One of the model's parts: preprocess, backbone, pool, head, probabilities."""
        return self.net.get_submodule(name)

    @property
    def backbone(self) -> nn.Module:
        return self.part("backbone")

    @property
    def chain(self) -> nn.Sequential:
        """The backbone as the chain of blocks it is (`chain` True)."""
        backbone = self.backbone
        assert isinstance(backbone, nn.Sequential), "a whole-model backbone is no chain"
        return backbone


def build(spec: ModelSpec, seed: int, device: torch.device) -> TorchModel:
    """Backbone + head for `spec`, its random initialisations drawn from `seed`, on `device`."""
    torch.manual_seed(seed)
    backbone = bb.construct(spec.backbone, spec.weights, spec.backbone_options, spec.pooling)
    if spec.cut_fraction < 1.0:
        backbone = bb.cut(backbone, blocks_to_keep(len(backbone.blocks), spec.cut_fraction), spec.backbone)
    if not spec.pretrained:
        for module in backbone.module.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = RANDOM_INIT_BN_MOMENTUM
    preprocess = preprocessing(backbone.mean, backbone.std)
    pool = nn.Identity() if backbone.pools_itself else pooling(spec.pooling)
    width = feature_width(nn.Sequential(preprocess, backbone.module, pool), spec)
    net = nn.Sequential(
        OrderedDict(
            preprocess=preprocess,
            backbone=backbone.module,
            pool=pool,
            head=head(width, spec.head_units, spec.dropout, spec.num_classes),
            probabilities=nn.Softmax(dim=1),
        )
    )
    net.to(device).eval()
    augment = Augmentation(seed) if spec.augment else None
    return TorchModel(net, spec, backbone.blocks, backbone.chain, device, augment)


def preprocessing(mean, std) -> nn.Sequential:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) normalised with the weights' own mean and std,
    from torchvision's modules alone."""
    from torchvision.ops import Permute
    from torchvision.transforms import v2

    return nn.Sequential(Permute([0, 3, 1, 2]), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)))


def pooling(kind: str) -> nn.Sequential:
    pool = nn.AdaptiveAvgPool2d(1) if kind == "avg" else nn.AdaptiveMaxPool2d(1)
    return nn.Sequential(pool, nn.Flatten(1))


def feature_width(extractor: nn.Module, spec: ModelSpec) -> int:
    """The width the head reads, from one forward pass (a timm model's `num_features` may not be
    its pooled width); BackboneError when the backbone cannot take images of the spec's size."""
    extractor.eval()
    try:
        with torch.no_grad():
            out = extractor(torch.zeros(1, spec.image_size, spec.image_size, 3, dtype=torch.uint8))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise BackboneError(
            f"{spec.backbone} cannot take {spec.image_size}-px images ({exc}); a ViT takes the size as a "
            "backbone option (torchvision: image_size, timm: img_size)"
        ) from exc
    if out.dim() != 2:
        raise BackboneError(f"{spec.backbone}: pooled features of shape {tuple(out.shape[1:])}, expected (features,)")
    return int(out.shape[1])


def head(width: int, units: int, dropout: float, classes: int) -> nn.Sequential:
    """The Keras head in torch's modules: [Dropout, Linear(units), ReLU], Dropout, Linear(classes),
    initialised as Keras' Dense is (Glorot uniform, zero bias). Zero dropout is left out."""
    layers: list[nn.Module] = []
    if units > 0:
        layers += [nn.Dropout(dropout)] if dropout > 0 else []
        layers += [nn.Linear(width, units), nn.ReLU()]
        width = units
    layers += [nn.Dropout(dropout)] if dropout > 0 else []
    layers.append(nn.Linear(width, classes))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*layers)


# --- freezing ----------------------------------------------------------------------------------


_BatchNorm = nn.modules.batchnorm._BatchNorm


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, _BatchNorm)


def set_trainable(model: TorchModel, unfreeze_blocks: int) -> tuple[int, int]:
    """Freeze the backbone, then unfreeze its top `unfreeze_blocks` whole blocks (-1: all of it,
    BatchNorm included: from scratch). A pretrained backbone's BatchNorm parameters stay frozen
    even in unfrozen blocks. The head always trains. Returns the (trainable, total) counts."""
    backbone = model.backbone
    backbone.requires_grad_(unfreeze_blocks < 0)
    model.part("head").requires_grad_(True)
    if unfreeze_blocks > 0:
        for block in model.blocks[max(0, model.n_blocks - unfreeze_blocks) :]:
            for entry in block:
                for owner, parameter in bb.entry_parameters(backbone, entry):
                    parameter.requires_grad_(not (model.spec.pretrained and _is_batchnorm(owner)))
    return count_params(model)


def count_params(model: TorchModel) -> tuple[int, int]:
    """(trainable, total): parameters the optimizer trains, and every weight of the model
    (parameters and BatchNorm's running statistics, as Keras counts its weights)."""
    params = list(model.net.parameters())
    statistics = [
        b for m in model.net.modules() if isinstance(m, _BatchNorm) for b in (m.running_mean, m.running_var) if b is not None
    ]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return trainable, sum(p.numel() for p in params) + sum(b.numel() for b in statistics)


def train_mode(model: TorchModel) -> None:
    """Training mode where training changes something, inference mode elsewhere: a pretrained
    backbone always (Keras' `backbone(x, training=False)`), and any module of a random-init
    backbone none of whose parameters train (a frozen block: its BatchNorm keeps its statistics)."""
    model.net.train()
    if model.spec.pretrained:
        model.backbone.eval()
        return
    for module in model.backbone.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()


def training_batchnorms(model: TorchModel) -> list[_BatchNorm]:
    """The BatchNorm layers whose running statistics training updates (see `train_mode`)."""
    if model.spec.pretrained:
        return []
    return [
        m
        for m in model.backbone.modules()
        if isinstance(m, _BatchNorm)
        and m.track_running_stats
        and (not list(m.parameters()) or any(p.requires_grad for p in m.parameters()))
    ]


# --- augmentation ------------------------------------------------------------------------------


class Augmentation:
    """Random horizontal flip, rotation by up to ROTATION of a turn and zoom by up to ZOOM, drawn
    per image, as keras.layers.RandomFlip("horizontal"), RandomRotation(0.1) and RandomZoom(0.1)
    do (bilinear, the border reflected), in one resampling. uint8 (N, H, W, 3) in and out, on the
    batch's device; training only (the loop calls it, the saved model has none)."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        n = images.shape[0]
        draw = torch.rand(3, n, generator=self.generator)
        angle = (draw[0] * 2 - 1) * ROTATION * 2 * math.pi
        zoom = 1 + (draw[1] * 2 - 1) * ZOOM  # > 1 samples a larger area: zoomed out
        flip = torch.where(draw[2] < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle) * zoom, torch.sin(angle) * zoom
        zero = torch.zeros(n)
        # Output -> input coordinates: zoom, rotate, then flip the input's x.
        theta = torch.stack([torch.stack([cos * flip, -sin * flip, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
        x = images.permute(0, 3, 1, 2).float()
        grid = nn.functional.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
        out = nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)

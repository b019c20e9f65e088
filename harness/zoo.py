"""The names of every backbone the harness can build, as plain data: pure, importing nothing.

- `keras.applications` backbones by their constructor's name (`MobileNetV2`): each one's module
  (whose `preprocess_input` it takes), smallest input size and block pattern, and the published
  ImageNet top-1 of its default variant;
- PyTorch backbones by zoo and name: `torchvision/<name>` (a torchvision.models builder) and
  `timm/<name>` (any timm model). Their existence is checked where the zoo is installed
  (harness/preflight.py), not here.

Config validation reads this module without importing TensorFlow or torch.

    >>> framework_of("torchvision/vgg16"), framework_of("MobileNetV2")
    ('torch', 'keras')
    >>> BACKBONES["MobileNetV2"].min_size
    32
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

TORCH_ZOOS = ("torchvision", "timm")  # name prefixes, e.g. "timm/convnext_tiny"
# How each framework's weights files end: Keras insists on its own suffix (and writes it); a torch
# state dict is read from .pt or .pth, and written as .pt.
WEIGHTS_SUFFIXES = {"keras": (".weights.h5",), "torch": (".pt", ".pth")}
# A torch model name: timm's may carry a pretrained tag after a dot ("vit_small_patch16_224.augreg_in21k").
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def framework_of(backbone: str) -> str:
    """ "torch" for a `torchvision/` or `timm/` name, else "keras"."""
    zoo, slash, _ = backbone.partition("/")
    return "torch" if slash and zoo in TORCH_ZOOS else "keras"


def frameworks_of(backbones: Iterable[str]) -> list[str]:
    """The frameworks `backbones` train with, sorted."""
    return sorted({framework_of(name) for name in backbones})


def backbone_name_problem(backbone: str) -> str | None:
    """What is wrong with a backbone's name as written, or None: an unknown keras.applications
    name (with the valid ones), a torch name that is not <zoo>/<model>."""
    zoo, slash, model = backbone.partition("/")
    if not slash:
        if backbone in BACKBONES:
            return None
        return (
            f"unknown value {backbone!r}; valid: {', '.join(sorted(BACKBONES))} "
            f"(keras.applications), or a PyTorch backbone as {' or '.join(f'{z}/<name>' for z in TORCH_ZOOS)}"
        )
    if zoo not in TORCH_ZOOS:
        return f"{backbone}: a PyTorch backbone is named <zoo>/<model>, the zoo one of {', '.join(TORCH_ZOOS)}"
    if not model:
        return f"{backbone}: no model name after '{zoo}/'"
    if not _MODEL_NAME.match(model):
        return f"{backbone}: {model!r} is not a model name (letters, digits, '_', '-' and '.' only)"
    return None


def min_input_size(backbone: str) -> int | None:
    """The smallest square input (px) a keras.applications backbone accepts; None for a torch one
    (its builder says so when preflight builds it)."""
    spec = BACKBONES.get(backbone)
    return spec.min_size if spec is not None else None


@dataclass(frozen=True)
class BackboneSpec:
    name: str  # the constructor's name in keras.applications, e.g. "ResNet50"
    module: str  # keras.applications.<module> holds its preprocess_input
    min_size: int  # smallest square input (px) the architecture accepts without weights
    # Regex whose first group names the block a layer belongs to; None = use graph cuts only.
    block_pattern: str | None = None


def _spec(names: list[str], module: str, min_size: int, pattern: str | None) -> dict[str, BackboneSpec]:
    return {n: BackboneSpec(n, module, min_size, pattern) for n in names}


BACKBONES: dict[str, BackboneSpec] = {
    **_spec(["VGG16", "VGG19"], "vgg16", 32, r"^(block\d+)_"),
    **_spec(["ResNet50", "ResNet101", "ResNet152"], "resnet", 32, r"^(conv\d_block\d+)_"),
    **_spec(["ResNet50V2", "ResNet101V2", "ResNet152V2"], "resnet_v2", 32, r"^(conv\d_block\d+)_"),
    **_spec(["InceptionV3"], "inception_v3", 75, None),
    **_spec(["InceptionResNetV2"], "inception_resnet_v2", 75, None),
    **_spec(["Xception"], "xception", 71, r"^(block\d+)_"),
    **_spec(["MobileNet"], "mobilenet", 32, r"^conv_(?:dw_|pw_|pad_)?(\d+)"),
    **_spec(["MobileNetV2"], "mobilenet_v2", 32, r"^(block_\d+|expanded_conv)_"),
    **_spec(["MobileNetV3Small", "MobileNetV3Large"], "mobilenet_v3", 32, r"^(expanded_conv(?:_\d+)?)_"),
    **_spec(["DenseNet121", "DenseNet169", "DenseNet201"], "densenet", 32, r"^(conv\d_block\d+|pool\d)_"),
    # NASNet names every layer of a cell after the cell (`normal_bn_1_7`, `adjust_conv_1_reduce_4`,
    # `separable_conv_1_reduction_left1_stem_2`); auto-named ReLUs (`activation_12`) must not match.
    **_spec(
        ["NASNetMobile", "NASNetLarge"], "nasnet", 32, r"^(?:normal|reduction|adjust|separable)_.*?_((?:stem_|reduce_)?\d+)$"
    ),
    **_spec([f"EfficientNetB{i}" for i in range(8)], "efficientnet", 32, r"^(block\d[a-z])_"),
    **_spec(
        [
            "EfficientNetV2B0",
            "EfficientNetV2B1",
            "EfficientNetV2B2",
            "EfficientNetV2B3",
            "EfficientNetV2S",
            "EfficientNetV2M",
            "EfficientNetV2L",
        ],
        "efficientnet_v2",
        32,
        r"^(block\d+[a-z])_",
    ),
    **_spec(["ConvNeXtTiny", "ConvNeXtSmall", "ConvNeXtBase"], "convnext", 32, None),
}
# VGG19 has its own module for preprocess_input (identical to VGG16's); keep it exact.
BACKBONES["VGG19"] = BackboneSpec("VGG19", "vgg19", 32, r"^(block\d+)_")

# Published ImageNet top-1 accuracy (%) of each constructor's default variant with its ImageNet
# weights: the keras.applications docs' table of available models, and for MobileNetV3 the table in
# its docstring (1.0 multiplier, 224 px). Screening ranks backbones by it as a trivial baseline that
# never looks at the user's data (harness/screening.py); a variant with other options (a MobileNet
# alpha) has no published figure here.
IMAGENET_TOP1: dict[str, float] = {
    "Xception": 79.0,
    "VGG16": 71.3,
    "VGG19": 71.3,
    "ResNet50": 74.9,
    "ResNet50V2": 76.0,
    "ResNet101": 76.4,
    "ResNet101V2": 77.2,
    "ResNet152": 76.6,
    "ResNet152V2": 78.0,
    "InceptionV3": 77.9,
    "InceptionResNetV2": 80.3,
    "MobileNet": 70.4,
    "MobileNetV2": 71.3,
    "MobileNetV3Small": 68.1,
    "MobileNetV3Large": 75.6,
    "DenseNet121": 75.0,
    "DenseNet169": 76.2,
    "DenseNet201": 77.3,
    "NASNetMobile": 74.4,
    "NASNetLarge": 82.5,
    "EfficientNetB0": 77.1,
    "EfficientNetB1": 79.1,
    "EfficientNetB2": 80.1,
    "EfficientNetB3": 81.6,
    "EfficientNetB4": 82.9,
    "EfficientNetB5": 83.6,
    "EfficientNetB6": 84.0,
    "EfficientNetB7": 84.3,
    "EfficientNetV2B0": 78.7,
    "EfficientNetV2B1": 79.8,
    "EfficientNetV2B2": 80.5,
    "EfficientNetV2B3": 82.0,
    "EfficientNetV2S": 83.9,
    "EfficientNetV2M": 85.3,
    "EfficientNetV2L": 85.7,
    "ConvNeXtTiny": 81.3,
    "ConvNeXtSmall": 82.3,
    "ConvNeXtBase": 85.3,
}

"""The frameworks behind the seam (harness/frameworks/base.py), chosen by a backbone's name.

A name with a zoo prefix is a PyTorch backbone (`torchvision/resnet50`, `timm/convnext_tiny`);
any other name is a `keras.applications` backbone. The implementation is imported only when
asked for, so a process that trains Keras backbones never imports torch, and one that trains
torch backbones never imports TensorFlow.

    >>> framework_of("torchvision/vgg16"), framework_of("MobileNetV2")
    ('torch', 'keras')
    >>> fw = framework_for("MobileNetV2")   # imports harness.frameworks.keras
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.frameworks.base import Framework

TORCH_ZOOS = ("torchvision", "timm")  # name prefixes, e.g. "timm/convnext_tiny"
FRAMEWORKS = ("keras", "torch")


def framework_of(backbone: str) -> str:
    """ "torch" for a `torchvision/` or `timm/` name, else "keras". Pure."""
    zoo, slash, _ = backbone.partition("/")
    return "torch" if slash and zoo in TORCH_ZOOS else "keras"


def framework_named(name: str) -> Framework:
    """The implementation called `name` ("keras" or "torch"), imported now."""
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}: one of {', '.join(FRAMEWORKS)}")
    return importlib.import_module(f"harness.frameworks.{name}").FRAMEWORK


def framework_for(backbone: str) -> Framework:
    """The implementation that builds and trains `backbone`."""
    return framework_named(framework_of(backbone))

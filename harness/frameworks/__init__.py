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
from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harness.frameworks.base import Framework

TORCH_ZOOS = ("torchvision", "timm")  # name prefixes, e.g. "timm/convnext_tiny"
FRAMEWORKS = ("keras", "torch")


def framework_of(backbone: str) -> str:
    """ "torch" for a `torchvision/` or `timm/` name, else "keras". Pure."""
    zoo, slash, _ = backbone.partition("/")
    return "torch" if slash and zoo in TORCH_ZOOS else "keras"


def frameworks_of(backbones: Iterable[str]) -> list[str]:
    """The frameworks `backbones` train with, sorted. Pure."""
    return sorted({framework_of(name) for name in backbones})


def framework_named(name: str) -> Framework:
    """The implementation called `name` ("keras" or "torch"), imported now: quietly first (each
    framework's `device.import_quietly`), so that no start-up banner reaches a sweep's log."""
    if name not in FRAMEWORKS:
        raise ValueError(f"unknown framework {name!r}: one of {', '.join(FRAMEWORKS)}")
    importlib.import_module(f"harness.frameworks.{name}.device").import_quietly()
    return importlib.import_module(f"harness.frameworks.{name}.framework").FRAMEWORK


def framework_for(backbone: str) -> Framework:
    """The implementation that builds and trains `backbone`."""
    return framework_named(framework_of(backbone))


GPU = tuple[str, "tuple[int, int] | None"]  # (its CUDA_VISIBLE_DEVICES name, compute capability)
_TRIAL_GPUS: list[GPU] | None = None  # the sweep process's answer, found once


def trial_gpus(frameworks: Iterable[str]) -> list[GPU]:
    """In the sweep process: the GPUs its trial processes may use, found once and kept from this
    process's own use by every framework it will need (`Framework.sweep_process_gpus`)."""
    global _TRIAL_GPUS
    if _TRIAL_GPUS is None:
        found = [framework_named(name).sweep_process_gpus() for name in sorted(set(frameworks))]
        _TRIAL_GPUS = found[0] if found else []
    return _TRIAL_GPUS


def seed_loaded_frameworks(seed: int) -> None:
    """Seed Python's and NumPy's generators and those of every framework this process has loaded
    (a trial process loads one): a task starts from seeded generators, whatever ran before it."""
    import random
    import sys

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    for name in FRAMEWORKS:
        if f"harness.frameworks.{name}.framework" in sys.modules:
            framework_named(name).seed(seed)

"""PyTorch behind the seam (harness/frameworks/base.py): torchvision and timm backbones, trained by
a plain PyTorch loop.

    backbone names   names.py       `torchvision/<name>`, `timm/<name>`: syntax without torch, existence
    backbones        backbones.py   build a zoo's model headless, find its blocks, load its weights
    model            model.py       preprocessing + backbone + pooling + head, freezing, train/eval modes
    data             data.py        (uint8 image, label) batches of a split, rows of cached activations
    one phase        loop.py        Adam over the trainable parameters, one epoch axis, early stopping
    frozen features  features.py    activations for the feature cache, the part of a model above them
    model files      io.py          MLflow's PyTorch flavour, state dicts of a backbone

Importing this package imports nothing of torch: `FRAMEWORK` is built on first use, so the
harness can check a torch backbone's name where PyTorch is not installed (names.py).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "FRAMEWORK":
        from harness.frameworks.torch.framework import FRAMEWORK

        return FRAMEWORK
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Frozen features for the feature cache (harness/features.py) and screening: what a frozen torch
backbone computes, and the part of the model above it.

A layer is "pool" (the pooled features the head reads) or, for a chain backbone, the name of the
chain's child after which a block ends (the activations that feed the blocks above). The part
above a layer is built of the model's own modules, so training it trains the model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from harness import runtime
from harness.frameworks.torch import device as dev
from harness.frameworks.torch.backbones import position
from harness.frameworks.torch.model import TorchModel

POOL = "pool"


def weights_digest(model: TorchModel) -> str:
    """A hash of the backbone's weights (parameters and BatchNorm statistics; not its step
    counters), their dtypes and shapes: the content its features depend on."""
    h = hashlib.sha256()
    for name, tensor in model.backbone.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def boundary_layer(model: TorchModel, unfrozen_blocks: int) -> str | None:
    """The chain child whose output feeds the first of the top `unfrozen_blocks` blocks ("pool"
    for none); None for a whole-model backbone, which cannot be entered at a block."""
    if unfrozen_blocks <= 0:
        return POOL
    if not model.is_chain or unfrozen_blocks >= model.n_blocks:
        return None
    return model.blocks[model.n_blocks - unfrozen_blocks - 1][-1]


def extractor(model: TorchModel, layer: str) -> nn.Sequential:
    """uint8 images -> the activations at `layer` (preprocessing included), of the model's own modules."""
    if layer == POOL:
        return nn.Sequential(model.part("preprocess"), model.backbone, model.part("pool"))
    return nn.Sequential(model.part("preprocess"), model.chain[: position(model.chain, layer) + 1])


def activation_shape(model: TorchModel, layer: str) -> tuple[int, ...]:
    """One image's activations at `layer`, from one forward pass of a blank image."""
    model.net.eval()
    blank = torch.zeros(1, model.spec.image_size, model.spec.image_size, 3, dtype=torch.uint8, device=model.device)
    with torch.inference_mode():
        return tuple(extractor(model, layer)(blank).shape[1:])


def write_activations(model: TorchModel, layer: str, batches, out: np.ndarray) -> None:
    """The frozen model's float32 activations at `layer`, batch by batch, into `out` (in memory or
    memory-mapped), in the batches' order: the peak is one batch, never the split."""
    part = extractor(model, layer)
    model.net.eval()
    device = dev.settings().device
    at = 0
    with torch.inference_mode():
        for x, _ in batches:
            runtime.check_stop()
            with dev.autocast():
                values = part(x.to(device, non_blocking=True))
            out[at : at + len(values)] = values.float().cpu().numpy()
            at += len(values)


@dataclass(eq=False)
class Above:
    """The part of a model above `layer`, trained on cached activations (PhaseData.fitted)."""

    layer: str
    logits: nn.Module  # activations -> class logits, sharing the model's modules


def model_above(model: TorchModel, layer: str) -> Above:
    """The head alone above "pool"; the chain's blocks above a boundary, pooling and head above it."""
    if layer == POOL:
        return Above(layer, nn.Sequential(model.part("head")))
    above = model.chain[position(model.chain, layer) + 1 :]
    return Above(layer, nn.Sequential(above, model.part("pool"), model.part("head")))

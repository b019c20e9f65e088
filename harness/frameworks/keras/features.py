"""Frozen activations in Keras: what the feature cache (harness/features.py) stores, and the part
of a model that trains on them.

The head trains on cached pooled features as a small Keras model made of the *same layer objects*
as the trial's model, so its trained weights are the whole model's: phase 2, confirmation, saving
and prediction see one ordinary Keras model. A fine-tune phase that leaves the bottom of the
backbone frozen trains the top blocks, pooling and head on the activations at the freeze
boundary, again with the model's own layers.
"""

from __future__ import annotations

import hashlib

import keras
import numpy as np

from harness.frameworks.keras.backbones import output_of
from harness.frameworks.keras.model import HEAD_LAYERS, TransferModel

POOLED = "pool"  # the pooled features: what the head sees


def weights_digest(tm: TransferModel) -> str:
    """A hash of the backbone's weight values and shapes: the content the features depend on."""
    h = hashlib.sha256()
    for value in tm.backbone.get_weights():
        array = np.ascontiguousarray(value)
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def boundary_layer(tm: TransferModel, unfrozen_blocks: int) -> str:
    """The backbone operation whose output feeds the first unfrozen block (a block boundary: the
    only tensor live there, so nothing else crosses it)."""
    return tm.blocks[len(tm.blocks) - unfrozen_blocks - 1][-1]


def activation_shape(tm: TransferModel, layer: str) -> tuple[int, ...]:
    tensor = tm.model.get_layer(POOLED).output if layer == POOLED else output_of(tm.backbone, layer)
    return tuple(int(d) for d in tensor.shape[1:])


def extractor(tm: TransferModel, layer: str) -> keras.Model:
    """Images -> the activations at `layer` (preprocessing included, in inference mode)."""
    if layer == POOLED:
        return keras.Model(tm.model.input, tm.model.get_layer(POOLED).output)
    bottom = keras.Model(tm.backbone.input, output_of(tm.backbone, layer))
    inputs = keras.Input(tm.model.input.shape[1:], dtype=tm.model.input.dtype)
    return keras.Model(inputs, bottom(tm.model.get_layer("preprocess")(inputs), training=False))


def write_activations(tm: TransferModel, layer: str, batches, out: np.ndarray) -> None:
    """Write the float32 activations at `layer` of every image of `batches` into `out` (an array
    in memory, or a memory-mapped file for sets larger than data.memory_cache_mib), in order,
    batch by batch: no list of batches to concatenate, so the peak stays one copy, or one batch."""
    model = extractor(tm, layer)
    at = 0
    for x, _ in batches:
        batch = np.asarray(model(x, training=False), np.float32)
        out[at : at + len(batch)] = batch
        at += len(batch)


def _through_head(tm: TransferModel, x):
    """`x` (pooled features) through the trial model's own head layers."""
    for name in HEAD_LAYERS:
        layer = next((l for l in tm.model.layers if l.name == name), None)
        if layer is not None:
            x = layer(x)
    return x


def model_above(tm: TransferModel, layer: str) -> keras.Model:
    """A model from the activations at `layer` to class probabilities, built from the trial
    model's own layers: the head alone on pooled features, or the backbone's blocks above a
    boundary with pooling and the head (in inference mode, as in the whole model)."""
    if layer == POOLED:
        pooled = tm.model.get_layer(POOLED).output
        inputs = keras.Input(pooled.shape[1:], name="pooled_features")
        return keras.Model(inputs, _through_head(tm, inputs), name=f"{tm.model.name}_head")
    boundary = output_of(tm.backbone, layer)
    top = keras.Model(boundary, tm.backbone.output, name=f"{tm.backbone.name}_top")
    inputs = keras.Input(boundary.shape[1:], name="boundary_activations")
    pooled = tm.model.get_layer(POOLED)(top(inputs, training=False))
    return keras.Model(inputs, _through_head(tm, pooled), name=f"{tm.model.name}_top")

"""Cached frozen features: phase 1 trains the head on pooled features computed once.

Phase 1 on a frozen, pretrained backbone without augmentation is a classifier on fixed inputs:
every epoch of every trial would run the same backbone forward on the same images. So the
pooled features (preprocessing, backbone in inference mode, pooling: exactly what the head sees)
are computed once per content key, saved under `train.feature_cache_dir` and shared by every
trial and every trial process. The head then trains on them as a small Keras model made of the
*same layer objects* as the trial's model, so its trained weights are the whole model's: phase 2,
confirmation, saving and prediction see one ordinary Keras model.

The key is content, never a name: a hash of the backbone's weight values as loaded (whatever file
or download they came from), the backbone and its options, the cut point, the input size, the
pooling and the split's own digest (its images or files, labels and class names). Change any of
them and the features are computed anew; nothing stale is ever read.

Dropout and Dense behave the same on cached features. Augmentation and BatchNormalization in
training mode do not, so `cache_applies` leaves those phases to the images.

    >>> cache = FeatureCache("results/features", dataset, splits)
    >>> head = cache.head_inputs(tm, batch_size=32, seed=0)   # None when the cache cannot apply
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.data import Dataset, Splits, split_digest, tf_dataset
from harness.model import HEAD_LAYERS, TransferModel

MEMORY_ENTRIES = 4  # feature sets a trial process keeps in memory: train and val of two backbones
FORMAT = 1  # bump when what is stored changes, so old files are never read as new ones


def cache_applies(tm: TransferModel, phase) -> bool:
    """Whether `phase` sees fixed features: the head phase (nothing of the backbone trains) of a
    pretrained backbone, whose BatchNormalization runs in inference mode, without augmentation."""
    return phase.name == "head" and phase.unfreeze_blocks == 0 and tm.spec.pretrained and not tm.spec.augment


def weights_digest(backbone) -> str:
    """A hash of the backbone's weight values and shapes: the content the features depend on."""
    h = hashlib.sha256()
    for value in backbone.get_weights():
        array = np.ascontiguousarray(value)
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def feature_key(tm: TransferModel, weights: str, split: str) -> str:
    """The cache key of one split's pooled features under one trial model's frozen backbone."""
    spec = tm.spec
    blob = {"format": FORMAT, "backbone": spec.backbone, "options": spec.backbone_options, "weights": weights,
            "blocks": len(tm.blocks), "cut_fraction": spec.cut_fraction, "image_size": spec.image_size,
            "pooling": spec.pooling, "split": split}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pooled_features(tm: TransferModel, dataset: Dataset, indices: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The pooled output of the frozen backbone (preprocessing included), as the head sees it, in float32."""
    import keras

    extractor = keras.Model(tm.model.input, tm.model.get_layer("pool").output)
    batches = [np.asarray(extractor(x, training=False), np.float32)
               for x, _ in tf_dataset(dataset, indices, batch_size, shuffle=False)]
    width = extractor.output.shape[-1]
    return np.concatenate(batches) if batches else np.zeros((0, width), np.float32)


def head_model(tm: TransferModel):
    """A model from pooled features to class probabilities, built from the trial model's own head
    layers: training it trains the trial model's head."""
    import keras

    pooled = tm.model.get_layer("pool").output
    inputs = keras.Input(pooled.shape[1:], name="pooled_features")
    x = inputs
    for name in HEAD_LAYERS:
        layer = next((l for l in tm.model.layers if l.name == name), None)
        if layer is not None:
            x = layer(x)
    return keras.Model(inputs, x, name=f"{tm.model.name}_head")


@dataclass
class HeadInputs:
    """What phase 1 fits instead of the whole model: the head on cached features."""

    model: object  # keras.Model sharing the trial model's head layers
    train: object  # tf.data of (features, label), shuffled like the image pipeline
    val: object


class FeatureCache:
    """Pooled features per (backbone weights, split, ...) key, on disk and in this process's memory."""

    def __init__(self, folder: str | Path, dataset: Dataset, splits: Splits):
        self.folder = Path(folder)
        self.dataset, self.splits = dataset, splits
        self._digests: dict[str, str] = {}
        self._memory: dict[str, np.ndarray] = {}
        self.computed = 0  # feature sets this process computed (the rest came from disk or memory)

    def _split_digest(self, name: str) -> str:
        if name not in self._digests:
            self._digests[name] = split_digest(self.dataset, getattr(self.splits, name))
        return self._digests[name]

    def features(self, tm: TransferModel, split: str, weights: str | None = None) -> np.ndarray:
        """The split's pooled features under `tm`'s backbone, from memory, disk, or computed now."""
        weights = weights or weights_digest(tm.backbone)
        key = feature_key(tm, weights, self._split_digest(split))
        if key in self._memory:
            return self._memory[key]
        path = self.folder / f"{tm.spec.backbone}-{key}.npy"
        indices = getattr(self.splits, split)
        try:
            found = np.load(path)
            if found.shape[0] != len(indices):
                raise ValueError(f"{path}: {found.shape[0]} rows for {len(indices)} images")
        except (OSError, ValueError):
            found = pooled_features(tm, self.dataset, indices)
            self.computed += 1
            self.folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.npy")
            np.save(partial, found)
            partial.replace(path)  # atomic: a process that dies mid-write leaves no half file behind
        self._memory[key] = found
        while len(self._memory) > MEMORY_ENTRIES:  # oldest first: a process serves one backbone at a time
            self._memory.pop(next(iter(self._memory)))
        return found

    def head_inputs(self, tm: TransferModel, batch_size: int, seed: int) -> HeadInputs:
        """The head model and its train/val pipelines on cached features."""
        import tensorflow as tf

        weights = weights_digest(tm.backbone)
        train_x, val_x = self.features(tm, "train", weights), self.features(tm, "val", weights)
        train_y, val_y = self.dataset.labels[self.splits.train], self.dataset.labels[self.splits.val]
        # The same shuffling as the image pipeline (harness.data.tf_dataset): one buffer over the
        # whole split, reshuffled each epoch.
        train = (tf.data.Dataset.from_tensor_slices((train_x, train_y)).cache()
                 .shuffle(len(train_y), seed=seed, reshuffle_each_iteration=True).batch(batch_size).prefetch(2))
        val = tf.data.Dataset.from_tensor_slices((val_x, val_y)).batch(batch_size)
        return HeadInputs(head_model(tm), train, val)

    def forget(self) -> None:
        """Drop the in-memory copies (the disk cache stays)."""
        self._memory.clear()

"""Cached frozen features: phase 1 trains the head on pooled features computed once.

Phase 1 on a frozen, pretrained backbone without augmentation is a classifier on fixed inputs:
every epoch of every trial would run the same backbone forward on the same images. So the
pooled features (preprocessing, backbone in inference mode, pooling: exactly what the head sees)
are computed once per content key, saved under `train.feature_cache_dir` and shared by every
trial and every trial process. The head then trains on them as a small Keras model made of the
*same layer objects* as the trial's model, so its trained weights are the whole model's: phase 2,
confirmation, saving and prediction see one ordinary Keras model. A set larger than
data.memory_cache_mib is never loaded: it stays memory-mapped, and each batch reads its rows, so a
trial process holds a batch, not the split.

The key is content, never a name: a hash of the backbone's weight values as loaded (whatever file
or download they came from), the backbone and its options, the cut point, the input size, the
pooling and the split's own digest (its images or files, labels and class names). Change any of
them and the features are computed anew; nothing stale is ever read.

The folder is shared by every process and bounded (harness/diskcache.py): an entry is written once
through a private temporary file and an atomic rename, the temporary files of killed processes
are deleted when a cache opens, and past train.feature_cache_max_gib the sets used longest ago are
deleted when a new one is written.

Phase 2 that unfreezes only the top blocks is the same story one level down: below the freeze
boundary nothing trains and BatchNormalization runs in inference mode, so the activations at the
boundary are cached too and phase 2 runs only the top blocks, pooling and head on them
(`boundary_applies`), as long as they fit data.memory_cache_mib.

Dropout and Dense behave the same on cached features. Augmentation and BatchNormalization in
training mode do not, so `cache_applies` and `boundary_applies` leave those phases to the images.

    >>> cache = FeatureCache("results/features", dataset, splits)
    >>> head = cache.head_inputs(tm, batch_size=32, seed=0)   # None when the cache cannot apply
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness import diskcache
from harness.config import features_are_fixed
from harness.data import Dataset, Splits, rows_pipeline, split_digest, tf_dataset
from harness.model import HEAD_LAYERS, TransferModel

MEMORY_ENTRIES = 4  # feature sets a trial process keeps in memory: train and val of two backbones
FORMAT = 1  # bump when what is stored changes, so old files are never read as new ones


def cache_applies(tm: TransferModel, phase) -> bool:
    """Whether `phase` sees fixed features: the head phase (nothing of the backbone trains) of a
    pretrained backbone, whose BatchNormalization runs in inference mode, without augmentation."""
    return phase.name == "head" and phase.unfreeze_blocks == 0 and features_are_fixed(tm.spec.pretrained, tm.spec.augment)


def boundary_applies(tm: TransferModel, phase) -> bool:
    """Whether `phase` trains only the top blocks above a frozen bottom that sees fixed inputs: a
    fine-tune phase of a pretrained backbone without augmentation that leaves some blocks frozen.
    The activations at the freeze boundary are then the same every epoch."""
    return (
        phase.name == "finetune"
        and 0 < phase.unfreeze_blocks < len(tm.blocks)
        and features_are_fixed(tm.spec.pretrained, tm.spec.augment)
    )


def boundary_layer(tm: TransferModel, unfrozen_blocks: int) -> str:
    """The backbone operation whose output feeds the first unfrozen block (a block boundary: the
    only tensor live there, so nothing else crosses it)."""
    return tm.blocks[len(tm.blocks) - unfrozen_blocks - 1][-1]


def weights_digest(backbone) -> str:
    """A hash of the backbone's weight values and shapes: the content the features depend on."""
    h = hashlib.sha256()
    for value in backbone.get_weights():
        array = np.ascontiguousarray(value)
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(array.tobytes())
    return h.hexdigest()[:16]


def feature_key(tm: TransferModel, weights: str, split: str, layer: str = "pool") -> str:
    """The cache key of one split's activations at `layer` ("pool": the pooled features, else a
    backbone operation at a freeze boundary) under one trial model's frozen backbone."""
    spec = tm.spec
    blob = {
        "format": FORMAT,
        "backbone": spec.backbone,
        "options": spec.backbone_options,
        "weights": weights,
        "blocks": len(tm.blocks),
        "cut_fraction": spec.cut_fraction,
        "image_size": spec.image_size,
        "pooling": spec.pooling if layer == "pool" else None,
        "layer": layer,
        "split": split,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def pooled_extractor(tm: TransferModel):
    """Images -> the pooled output of the frozen backbone (preprocessing included), as the head sees it."""
    import keras

    return keras.Model(tm.model.input, tm.model.get_layer("pool").output)


def pooled_features(tm: TransferModel, dataset: Dataset, indices: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The pooled features of the images at `indices`, in memory, in float32."""
    extractor = pooled_extractor(tm)
    out = np.empty((len(indices), *extractor.output.shape[1:]), np.float32)
    activations(extractor, dataset, indices, out, batch_size)
    return out


def boundary_extractor(tm: TransferModel, layer: str):
    """Images -> the backbone's activations at `layer`, preprocessing included, in inference mode."""
    import keras

    from harness.backbones import output_of

    bottom = keras.Model(tm.backbone.input, output_of(tm.backbone, layer))
    inputs = keras.Input(tm.model.input.shape[1:], dtype=tm.model.input.dtype)
    return keras.Model(inputs, bottom(tm.model.get_layer("preprocess")(inputs), training=False))


def activations(extractor, dataset: Dataset, indices: np.ndarray, out: np.ndarray, batch_size: int = 64) -> None:
    """Write `extractor`'s float32 output for the images at `indices` into `out` (an array in memory,
    or a memory-mapped file for sets larger than data.memory_cache_mib), in order, batch by batch:
    no list of batches to concatenate, so the peak stays one copy, or one batch."""
    at = 0
    for x, _ in tf_dataset(dataset, indices, batch_size, shuffle=False):
        batch = np.asarray(extractor(x, training=False), np.float32)
        out[at : at + len(batch)] = batch
        at += len(batch)


def _through_head(tm: TransferModel, x):
    """`x` (pooled features) through the trial model's own head layers."""
    for name in HEAD_LAYERS:
        layer = next((l for l in tm.model.layers if l.name == name), None)
        if layer is not None:
            x = layer(x)
    return x


def top_model(tm: TransferModel, layer: str):
    """A model from the activations at `layer` to class probabilities: the backbone's blocks above
    `layer`, pooling and head, all the trial model's own layers (in inference mode, as in the whole
    model)."""
    import keras

    from harness.backbones import output_of

    boundary = output_of(tm.backbone, layer)
    top = keras.Model(boundary, tm.backbone.output, name=f"{tm.backbone.name}_top")
    inputs = keras.Input(boundary.shape[1:], name="boundary_activations")
    pooled = tm.model.get_layer("pool")(top(inputs, training=False))
    return keras.Model(inputs, _through_head(tm, pooled), name=f"{tm.model.name}_top")


def head_model(tm: TransferModel):
    """A model from pooled features to class probabilities, built from the trial model's own head
    layers: training it trains the trial model's head."""
    import keras

    pooled = tm.model.get_layer("pool").output
    inputs = keras.Input(pooled.shape[1:], name="pooled_features")
    return keras.Model(inputs, _through_head(tm, inputs), name=f"{tm.model.name}_head")


@dataclass
class HeadInputs:
    """What phase 1 fits instead of the whole model: the head on cached features."""

    model: object  # keras.Model sharing the trial model's head layers
    train: object  # tf.data of (features, label), shuffled like the image pipeline
    val: object


class FeatureCache:
    """Pooled features per (backbone weights, split, ...) key, on disk and in this process's memory."""

    def __init__(self, folder: str | Path, dataset: Dataset, splits: Splits, max_gib: float = 20):
        self.folder = Path(folder)
        self.dataset, self.splits = dataset, splits
        self.max_bytes = diskcache.gib(max_gib)  # train.feature_cache_max_gib
        diskcache.remove_stale_partials(self.folder)  # left by processes killed while writing
        self._digests: dict[str, str] = {}
        self._memory: dict[str, np.ndarray] = {}
        self.computed = 0  # feature sets this process computed (the rest came from disk or memory)

    def _split_digest(self, name: str) -> str:
        if name not in self._digests:
            self._digests[name] = split_digest(self.dataset, getattr(self.splits, name))
        return self._digests[name]

    def features(self, tm: TransferModel, split: str, weights: str | None = None, layer: str = "pool") -> np.ndarray:
        """The split's activations at `layer` (default: the pooled features) under `tm`'s
        backbone, from memory, disk, or computed now."""
        weights = weights or weights_digest(tm.backbone)
        key = feature_key(tm, weights, self._split_digest(split), layer)
        path = self.folder / f"{tm.spec.backbone}-{key}.npy"
        if key in self._memory:
            diskcache.use(path)
            return self._memory[key]
        indices = getattr(self.splits, split)
        try:
            if not diskcache.use(path):  # touched: the least recently used go first past the cap
                raise FileNotFoundError(path)
            found = np.load(path, mmap_mode="r")  # the header and a mapping: nothing is read yet
            if found.shape[0] != len(indices):
                raise ValueError(f"{path}: {found.shape[0]} rows for {len(indices)} images")
        except (OSError, ValueError):
            found = self._compute(tm, layer, indices, path)
        if found.nbytes <= self.dataset.memory_cache_mib * 2**20:
            found = np.array(found)  # fits data.memory_cache_mib: held in memory
        # else it stays memory-mapped and each batch reads its rows (`feature_pipeline`), so the
        # process holds a batch, not the split: 1.28 million ResNet50 features are 10 GB.
        self._memory[key] = found
        while len(self._memory) > MEMORY_ENTRIES:  # oldest first: a process serves one backbone at a time
            self._memory.pop(next(iter(self._memory)))
        return found

    def _compute(self, tm: TransferModel, layer: str, indices: np.ndarray, path: Path) -> np.ndarray:
        """Compute the activations straight into a memory-mapped file, then move it into place."""
        extractor = pooled_extractor(tm) if layer == "pool" else boundary_extractor(tm, layer)
        self.folder.mkdir(parents=True, exist_ok=True)
        shape = (len(indices), *extractor.output.shape[1:])
        diskcache.evict(self.folder, self.max_bytes, incoming=4 * int(np.prod(shape)), keep=path)
        partial = diskcache.partial_path(path)  # this process's own: a racing writer has another
        try:
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
            activations(extractor, self.dataset, indices, out)
            out.flush()
            del out
            diskcache.publish(partial, path)  # atomic: a process that dies mid-write leaves no half file behind
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        self.computed += 1
        return np.load(path, mmap_mode="r")

    def head_inputs(self, tm: TransferModel, batch_size: int, seed: int) -> HeadInputs:
        """The head model and its train/val pipelines on cached pooled features."""
        weights = weights_digest(tm.backbone)
        return self._inputs(
            head_model(tm), self.features(tm, "train", weights), self.features(tm, "val", weights), batch_size, seed
        )

    def boundary_fits(self, tm: TransferModel, unfrozen_blocks: int) -> bool:
        """Whether the boundary activations of the train and val splits fit data.memory_cache_mib
        (they are held in memory while phase 2 runs; larger ones leave phase 2 on images)."""
        from harness.backbones import output_of

        shape = output_of(tm.backbone, boundary_layer(tm, unfrozen_blocks)).shape[1:]
        mib = (len(self.splits.train) + len(self.splits.val)) * int(np.prod(shape)) * 4 / 2**20
        return mib <= self.dataset.memory_cache_mib

    def top_inputs(self, tm: TransferModel, unfrozen_blocks: int, batch_size: int, seed: int) -> HeadInputs:
        """The backbone's top `unfrozen_blocks` with the head, and train/val pipelines of the cached
        activations at the freeze boundary below them."""
        weights = weights_digest(tm.backbone)
        layer = boundary_layer(tm, unfrozen_blocks)
        return self._inputs(
            top_model(tm, layer),
            self.features(tm, "train", weights, layer),
            self.features(tm, "val", weights, layer),
            batch_size,
            seed,
        )

    def _inputs(self, model, train_x: np.ndarray, val_x: np.ndarray, batch_size: int, seed: int) -> HeadInputs:
        train_y, val_y = self.dataset.labels[self.splits.train], self.dataset.labels[self.splits.val]
        return HeadInputs(
            model,
            feature_pipeline(train_x, train_y, batch_size, shuffle=True, seed=seed),
            feature_pipeline(val_x, val_y, batch_size, shuffle=False),
        )


def feature_pipeline(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
    """tf.data of (features, label) batches, shuffled as the image pipeline is (harness.data.tf_dataset):
    one buffer over the whole split, reshuffled each epoch.

    The pipeline shuffles row numbers and each batch reads its rows from `x`, in memory or
    memory-mapped (larger than data.memory_cache_mib: the rows come from disk or the page cache).
    Slicing the array itself into tf.data (`from_tensor_slices`) copies it into the graph: measured
    on 400,000 features (1,953 MiB), an epoch held 6,148 MiB of anonymous memory and took 23 s,
    against about 2,350 MiB and 7 to 10 s this way, and under 400 MiB memory-mapped."""
    if x.dtype != np.float32:
        x = np.asarray(x, np.float32)
    return rows_pipeline(x, y, batch_size, shuffle, seed)

"""Cached frozen features: phase 1 trains the head on pooled features computed once.

Phase 1 on a frozen, pretrained backbone without augmentation is a classifier on fixed inputs:
every epoch of every trial would run the same backbone forward on the same images. So the
pooled features (preprocessing, backbone in inference mode, pooling: exactly what the head sees)
are computed once per content key, saved under `train.feature_cache_dir` and shared by every
trial and every trial process. The head then trains on them as the part of the trial's model
above them (`Framework.model_above`: its own layers or modules, so its trained weights are the
whole model's), and phase 2, confirmation, saving and prediction see one ordinary model. This
module is framework-free: the rule, the key and the files are here; a framework computes the
activations and the model above them (harness/frameworks/). A set larger than
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

    >>> cache = FeatureCache("results/features", dataset, splits, framework=fw)
    >>> data = cache.head_inputs(model, batch_size=32, seed=0)   # PhaseData: the head on pooled features
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from harness import diskcache
from harness.config import features_are_fixed
from harness.data import Dataset, Splits, split_digest
from harness.frameworks.base import Framework, Model, ModelSpec, PhaseData

MEMORY_ENTRIES = 4  # feature sets a trial process keeps in memory: train and val of two backbones
FORMAT = 1  # bump when what is stored changes, so old files are never read as new ones
POOLED = "pool"  # the pooled features' layer name, in every framework


def cache_applies(spec: ModelSpec, phase) -> bool:
    """Whether `phase` sees fixed features: the head phase (nothing of the backbone trains) of a
    pretrained backbone, whose BatchNormalization runs in inference mode, without augmentation."""
    return phase.name == "head" and phase.unfreeze_blocks == 0 and features_are_fixed(spec.pretrained, spec.augment)


def boundary_applies(spec: ModelSpec, n_blocks: int, phase) -> bool:
    """Whether `phase` trains only the top blocks above a frozen bottom that sees fixed inputs: a
    fine-tune phase of a pretrained backbone without augmentation that leaves some blocks frozen.
    The activations at the freeze boundary are then the same every epoch."""
    return phase.name == "finetune" and 0 < phase.unfreeze_blocks < n_blocks and features_are_fixed(spec.pretrained, spec.augment)


def feature_key(spec: ModelSpec, n_blocks: int, weights: str, split: str, layer: str = POOLED) -> str:
    """The cache key of one split's activations at `layer` ("pool": the pooled features, else a
    backbone operation at a freeze boundary) under one trial model's frozen backbone."""
    blob = {
        "format": FORMAT,
        "backbone": spec.backbone,
        "options": spec.backbone_options,
        "weights": weights,
        "blocks": n_blocks,
        "cut_fraction": spec.cut_fraction,
        "image_size": spec.image_size,
        "pooling": spec.pooling if layer == POOLED else None,
        "layer": layer,
        "split": split,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_file_name(backbone: str, key: str) -> str:
    """A torch zoo name holds a '/', which a file name cannot."""
    return f"{backbone.replace('/', '--')}-{key}.npy"


def frozen_features(fw: Framework, model: Model, dataset: Dataset, indices: np.ndarray, layer: str = POOLED) -> np.ndarray:
    """The activations at `layer` of the images at `indices`, in memory, in float32 (uncached)."""
    out = np.empty((len(indices), *fw.activation_shape(model, layer)), np.float32)
    fw.write_activations(model, layer, fw.image_batches(dataset, indices, 64, shuffle=False), out)
    return out


class FeatureCache:
    """Pooled features per (backbone weights, split, ...) key, on disk and in this process's memory."""

    def __init__(self, folder: str | Path, dataset: Dataset, splits: Splits, framework: Framework, max_gib: float = 20):
        self.folder = Path(folder)
        self.dataset, self.splits, self.fw = dataset, splits, framework
        self.max_bytes = diskcache.gib(max_gib)  # train.feature_cache_max_gib
        diskcache.remove_stale_partials(self.folder)  # left by processes killed while writing
        self._digests: dict[str, str] = {}
        self._memory: dict[str, np.ndarray] = {}
        self.computed = 0  # feature sets this process computed (the rest came from disk or memory)

    def _split_digest(self, name: str) -> str:
        if name not in self._digests:
            self._digests[name] = split_digest(self.dataset, getattr(self.splits, name))
        return self._digests[name]

    def features(self, model: Model, split: str, weights: str | None = None, layer: str = POOLED) -> np.ndarray:
        """The split's activations at `layer` (default: the pooled features) under `model`'s
        backbone, from memory, disk, or computed now."""
        weights = weights or self.fw.weights_digest(model)
        key = feature_key(model.spec, model.n_blocks, weights, self._split_digest(split), layer)
        path = self.folder / cache_file_name(model.spec.backbone, key)
        if key in self._memory:
            diskcache.use(path)
            return self._memory[key]
        found = self._read_or_compute(model, layer, getattr(self.splits, split), path)
        if found.nbytes <= self.dataset.memory_cache_mib * 2**20:
            found = np.array(found)  # fits data.memory_cache_mib: held in memory
        # else it stays memory-mapped and each batch reads its rows (`Framework.array_batches`), so
        # the process holds a batch, not the split: 1.28 million ResNet50 features are 10 GB.
        self._memory[key] = found
        while len(self._memory) > MEMORY_ENTRIES:  # oldest first: a process serves one backbone at a time
            self._memory.pop(next(iter(self._memory)))
        return found

    def _read_or_compute(self, model: Model, layer: str, indices: np.ndarray, path: Path) -> np.ndarray:
        try:
            if not diskcache.use(path):  # touched: the least recently used go first past the cap
                raise FileNotFoundError(path)
            found = np.load(path, mmap_mode="r")  # the header and a mapping: nothing is read yet
            if found.shape[0] != len(indices):
                raise ValueError(f"{path}: {found.shape[0]} rows for {len(indices)} images")
            return found
        except (OSError, ValueError):
            return self._compute(model, layer, indices, path)

    def _compute(self, model: Model, layer: str, indices: np.ndarray, path: Path) -> np.ndarray:
        """Compute the activations straight into a memory-mapped file, then move it into place."""
        self.folder.mkdir(parents=True, exist_ok=True)
        shape = (len(indices), *self.fw.activation_shape(model, layer))
        diskcache.evict(self.folder, self.max_bytes, incoming=4 * int(np.prod(shape)), keep=path)
        partial = diskcache.partial_path(path)  # this process's own: a racing writer has another
        try:
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
            self.fw.write_activations(model, layer, self.fw.image_batches(self.dataset, indices, 64, shuffle=False), out)
            out.flush()
            del out
            diskcache.publish(partial, path)  # atomic: a process that dies mid-write leaves no half file behind
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        self.computed += 1
        return np.load(path, mmap_mode="r")

    def head_inputs(self, model: Model, batch_size: int, seed: int) -> PhaseData:
        """The head and its train/val batches of cached pooled features."""
        return self._inputs(model, POOLED, batch_size, seed)

    def boundary_fits(self, model: Model, unfrozen_blocks: int) -> bool:
        """Whether the boundary activations of the train and val splits fit data.memory_cache_mib
        (they are held in memory while phase 2 runs; larger ones leave phase 2 on images). False
        for a model that cannot be entered at that boundary (a backbone that is no chain of blocks)."""
        layer = self.fw.boundary_layer(model, unfrozen_blocks)
        if layer is None:
            return False
        shape = self.fw.activation_shape(model, layer)
        mib = (len(self.splits.train) + len(self.splits.val)) * int(np.prod(shape)) * 4 / 2**20
        return mib <= self.dataset.memory_cache_mib

    def top_inputs(self, model: Model, unfrozen_blocks: int, batch_size: int, seed: int) -> PhaseData:
        """The backbone's top `unfrozen_blocks` with the head, and train/val batches of the cached
        activations at the freeze boundary below them."""
        layer = self.fw.boundary_layer(model, unfrozen_blocks)
        assert layer is not None, "top_inputs follows boundary_fits, which refuses a model without the boundary"
        return self._inputs(model, layer, batch_size, seed)

    def _inputs(self, model: Model, layer: str, batch_size: int, seed: int) -> PhaseData:
        weights = self.fw.weights_digest(model)
        train_x, val_x = self.features(model, "train", weights, layer), self.features(model, "val", weights, layer)
        train_y, val_y = self.dataset.labels[self.splits.train], self.dataset.labels[self.splits.val]
        # Batches of row numbers, shuffled over the whole split as the image batches are; each
        # batch reads its rows from the array in memory or memory-mapped. Slicing the array itself
        # into tf.data (`from_tensor_slices`) copied it into the graph: measured on 400,000
        # features (1,953 MiB), an epoch held 6,148 MiB of anonymous memory and took 23 s, against
        # about 2,350 MiB and 7 to 10 s this way, and under 400 MiB memory-mapped.
        return PhaseData(
            self.fw.array_batches(train_x, train_y, batch_size, shuffle=True, seed=seed),
            self.fw.array_batches(val_x, val_y, batch_size, shuffle=False),
            fitted=self.fw.model_above(model, layer),
        )

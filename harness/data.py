"""Datasets: sources (image folder, TFDS, builtin), validation, stratified splits, subsampling, tf.data.

A loaded dataset is either in memory (uint8 arrays) or a list of image files decoded by tf.data.
Splits are a pure function of (labels, fractions, seed), so the same config always yields the
same train/val/test images, and small versions of a dataset (`train_per_class`) are subsets of
larger ones with the same test split: a comparison across sizes isolates size.

    >>> ds = load_dataset(cfg.data)
    >>> splits = make_splits(ds.labels, cfg.data)
    >>> train = tf_dataset(ds, splits.train, batch_size=32, shuffle=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.config import ConfigError, DataConfig

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")


class DataError(ConfigError):
    """The dataset cannot be used: missing folder, empty class, corrupt files. Stops the sweep."""


@dataclass(frozen=True)
class Dataset:
    class_names: list[str]
    labels: np.ndarray  # int64, one per example
    images: np.ndarray | None = None  # uint8 NHWC at the configured size, when in memory
    paths: list[str] | None = None  # image files, when read from a folder
    image_size: int = 32
    name: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class Splits:
    train: np.ndarray  # indices into the dataset
    val: np.ndarray
    test: np.ndarray


# --- sources ---------------------------------------------------------------------------------


def scan_folder(root: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(class names, file paths, labels) of a folder with one sub-folder per class."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path: dataset folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(class_dirs) < 2:
        raise DataError(f"data.path: {root} has {len(class_dirs)} class folder(s); a classification task needs at least two")
    names, paths, labels = [], [], []
    for label, d in enumerate(class_dirs):
        files = sorted(str(f) for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"data.path: class folder {d} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
        names.append(d.name)
        paths.extend(files)
        labels.extend([label] * len(files))
    return names, paths, np.asarray(labels, np.int64)


def find_corrupt_images(paths: list[str]) -> list[str]:
    """Files PIL cannot fully decode: checked once, before any study exists."""
    from PIL import Image

    bad = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im.load()
        except Exception:  # noqa: BLE001 - any decode failure makes the file unusable
            bad.append(p)
    return bad


def _load_tfds(name: str, size: int):
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("data.source: tfds needs tensorflow-datasets: pip install '.[tfds]'") from None
    import tensorflow as tf

    try:
        ds, info = tfds.load(name, split="all", as_supervised=True, with_info=True)
    except Exception as exc:  # noqa: BLE001 - unknown name, no network, ...
        raise DataError(f"data.name: cannot load TFDS dataset {name!r}: {exc}") from None
    ds = ds.map(lambda x, y: (tf.cast(tf.image.resize(_rgb(x), (size, size)), tf.uint8), y))
    images, labels = [], []
    for x, y in ds.batch(512).as_numpy_iterator():
        images.append(x)
        labels.append(y)
    names = info.features["label"].names
    return np.concatenate(images), np.concatenate(labels).astype(np.int64), list(names)


def _rgb(x):
    import tensorflow as tf

    return tf.image.grayscale_to_rgb(x) if x.shape[-1] == 1 else x


def load_dataset(cfg: DataConfig, check_images: bool = True) -> Dataset:
    """Load (or index) the dataset a config describes and apply the class subset."""
    if cfg.source == "builtin":
        from harness.datasets_builtin import load_builtin

        images, labels, names = load_builtin(cfg.name, cfg.image_size, cfg.builtin_size, cfg.seed)
        ds = Dataset(names, labels, images=images, image_size=cfg.image_size, name=cfg.name)
    elif cfg.source == "tfds":
        images, labels, names = _load_tfds(cfg.name, cfg.image_size)
        ds = Dataset(names, labels, images=images, image_size=cfg.image_size, name=cfg.name)
    else:
        names, paths, labels = scan_folder(cfg.path)
        if check_images:
            bad = find_corrupt_images(paths)
            if bad:
                shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
                raise DataError(f"data.path: {len(bad)} unreadable or corrupt image file(s):\n  {shown}")
        ds = Dataset(names, labels, paths=paths, image_size=cfg.image_size, name=Path(cfg.path).name)
    if cfg.classes is not None:
        ds = select_classes(ds, cfg.classes)
    return ds


def select_classes(ds: Dataset, classes: list[str]) -> Dataset:
    """Keep only `classes` (in that order) and relabel them 0..k-1."""
    missing = [c for c in classes if c not in ds.class_names]
    if missing:
        raise DataError(f"data.classes: unknown class(es) {missing}; the dataset has {ds.class_names}")
    old = [ds.class_names.index(c) for c in classes]
    keep = np.isin(ds.labels, old)
    remap = {o: n for n, o in enumerate(old)}
    labels = np.asarray([remap[v] for v in ds.labels[keep]], np.int64)
    return Dataset(
        list(classes), labels,
        images=ds.images[keep] if ds.images is not None else None,
        paths=[p for p, k in zip(ds.paths, keep) if k] if ds.paths is not None else None,
        image_size=ds.image_size, name=ds.name,
    )


# --- splits ----------------------------------------------------------------------------------


def make_splits(labels: np.ndarray, cfg: DataConfig) -> Splits:
    """Deterministic stratified train/val/test indices, then per-class subsampling of train/val.

    Pure: depends only on the labels and the config's fractions, caps and seed.
    """
    rng = np.random.default_rng(cfg.seed)
    train, val, test = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = max(1, round(len(idx) * cfg.test_fraction))
        n_val = max(1, round(len(idx) * cfg.val_fraction))
        if len(idx) - n_test - n_val < 1:
            raise DataError(f"data: class {int(c)} has only {len(idx)} image(s), too few for train/val/test splits")
        test.append(idx[:n_test])
        val.append(idx[n_test : n_test + n_val][: cfg.val_per_class])
        # Taking the first N of a fixed permutation makes smaller subsamples nested in larger ones.
        train.append(idx[n_test + n_val :][: cfg.train_per_class])
    return Splits(*(np.sort(np.concatenate(s)) for s in (train, val, test)))


# --- tf.data ---------------------------------------------------------------------------------


def tf_dataset(ds: Dataset, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0):
    """A batched, cached, prefetched tf.data pipeline of (uint8 image, label) pairs.

    Images stay uint8 here: each backbone's own preprocess_input runs inside the model.
    """
    import tensorflow as tf

    labels = ds.labels[indices]
    if ds.images is not None:
        pipe = tf.data.Dataset.from_tensor_slices((ds.images[indices], labels))
    else:
        size = ds.image_size

        def decode(path, label):
            raw = tf.io.read_file(path)
            img = tf.io.decode_image(raw, channels=3, expand_animations=False)
            img = tf.image.resize(img, (size, size))
            return tf.cast(tf.clip_by_value(img, 0, 255), tf.uint8), label

        files = [ds.paths[i] for i in indices]
        pipe = tf.data.Dataset.from_tensor_slices((files, labels)).map(decode, num_parallel_calls=tf.data.AUTOTUNE)
    pipe = pipe.cache()
    if shuffle:
        pipe = pipe.shuffle(len(indices), seed=seed, reshuffle_each_iteration=True)
    return pipe.batch(batch_size).prefetch(tf.data.AUTOTUNE)


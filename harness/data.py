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

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from harness.config import DROP_KEY, ConfigError, DataConfig, class_map_problems

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
    official: np.ndarray | None = None  # TFDS: the official split ("train", "validation", "test") of each example
    memory_cache_mib: float = 2048  # data.memory_cache_mib: folder splits up to this size stay decoded in memory
    disk_cache_dir: str | None = None  # data.disk_cache_dir: where larger splits are cached decoded, if anywhere
    disk_cache_max_gib: float = 20  # data.disk_cache_max_gib: that folder's cap (least recently used go first)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class Splits:
    train: np.ndarray  # indices into the dataset
    val: np.ndarray
    test: np.ndarray


# --- sources ---------------------------------------------------------------------------------


class FileCheck(Protocol):
    """A check of a folder's image files that `scan_folder` runs while it scans, so that the files
    it refuses join the folder's other problems in one error (harness/preflight.py `ImageFileCheck`)."""

    def unreadable(self, paths: list[str]) -> list[str]:
        """The files among `paths` that training cannot read."""
        ...

    def problem(self, bad: list[str]) -> str:
        """The line of the folder's refusal that names the files `bad` (sorted)."""
        ...

    def passed(self) -> None:
        """The folder passed every check."""
        ...


def scan_folder(
    root: str | Path, cfg: DataConfig | None = None, check: FileCheck | None = None
) -> tuple[list[str], list[str], np.ndarray]:
    """(class names, file paths, labels) of a folder with one sub-folder per class.

    Every problem is collected first and one DataError lists them all, so a bad folder costs one
    run to diagnose, not one run per problem: fewer than two classes, empty class folders,
    the files `check` finds unreadable, and, given the config, classes too small for its
    train/val/test splits (counting usable files only).

        >>> names, paths, labels = scan_folder("data/flowers", cfg.data, ImageFileCheck(cfg.data, "keras"))
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data.path: dataset folder not found: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    problems = []
    if len(class_dirs) < 2:
        problems.append(f"{root} has {len(class_dirs)} class folder(s); a classification task needs at least two")
    files = {d: sorted(str(f) for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS) for d in class_dirs}
    for d, found in files.items():
        if not found:
            problems.append(f"class folder {d} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})")
    all_paths = [p for found in files.values() for p in found]
    bad: set[str] = set()
    if check is not None:
        bad = set(check.unreadable(all_paths))
        if bad:
            problems.append(check.problem(sorted(bad)))
    if cfg is not None:
        used = set(cfg.classes) if cfg.classes is not None else {d.name for d in class_dirs}
        unknown = sorted(used - {d.name for d in class_dirs})
        if unknown:
            problems.append(f"data.classes names class(es) with no folder in {root}: {', '.join(unknown)}")
        for d, found in files.items():
            n = sum(p not in bad for p in found)
            if found and d.name in used and not splittable(n, cfg):
                problems.append(_too_few(d, n, cfg))
    if problems:
        listed = "\n".join(f"  - {p}" for p in problems)
        raise DataError(f"data.path: {root} cannot be used, {len(problems)} problem(s):\n{listed}")
    if check is not None:
        check.passed()
    names = [d.name for d in class_dirs]
    paths = [p for d in class_dirs for p in files[d]]
    labels = [label for label, d in enumerate(class_dirs) for _ in files[d]]
    return names, paths, np.asarray(labels, np.int64)


def split_sizes(n: int, cfg: DataConfig) -> tuple[int, int, int]:
    """(train, val, test) images of a class of `n`, before the per-class caps (make_splits uses it)."""
    n_test = max(1, round(n * cfg.test_fraction))
    n_val = max(1, round(n * cfg.val_fraction))
    return n - n_test - n_val, n_val, n_test


def splittable(n: int, cfg: DataConfig) -> bool:
    """Whether a class of `n` images gives >= 1 val and test image and enough train images:
    at least one, or `train_per_class` when that is set (a smaller class would silently train on
    fewer images than the config says)."""
    return n >= 3 and split_sizes(n, cfg)[0] >= (cfg.train_per_class or 1)


def min_images_per_class(cfg: DataConfig, above: int = 2) -> int | None:
    """The smallest class size over `above` that `splittable` accepts; None if there is none
    (fractions that leave no train share, which config validation refuses)."""
    return next((n for n in range(max(3, above + 1), 1_000_000) if splittable(n, cfg)), None)


def _too_few(d: Path, n: int, cfg: DataConfig) -> str:
    need = cfg.train_per_class or 1
    rule = f"val_fraction {cfg.val_fraction:g}, test_fraction {cfg.test_fraction:g}"
    rule += f", train_per_class {cfg.train_per_class}" if cfg.train_per_class else ""
    least = min_images_per_class(cfg)
    if least is None or n < least:
        needed = "no class size works" if least is None else f"a class needs at least {least}"
        return f"class folder {d} has {n} usable image(s), too few to split with {rule}: {needed}"
    # Rounding can make one size fail between sizes that work (e.g. both fractions near 0.45).
    train, val, test = split_sizes(n, cfg)
    return (
        f"class folder {d} has {n} usable image(s); {rule} round that to {val} val + {test} test, "
        f"leaving {train} for train where {need} are needed ({min_images_per_class(cfg, n)} images would split)"
    )


OFFICIAL_SPLITS = ("train", "validation", "test")


_MAGIC_SUFFIXES = ((b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"))  # file signature -> suffix


def _image_suffix(raw: bytes) -> str:
    """The file suffix of encoded image bytes, by their signature (JPEG when none matches)."""
    return next((suffix for magic, suffix in _MAGIC_SUFFIXES if raw.startswith(magic)), ".jpg")


def _load_tfds(name: str, export_root: str) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """A TFDS dataset as image files: each official split's encoded images are written once under
    `export_root` (never decoded or resized on the way), so trials stream them like a folder
    instead of holding the dataset in memory. Returns (class names, paths, labels, official split
    of each example)."""
    import json

    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError("data.source: tfds needs tensorflow-datasets: pip install '.[tfds]'") from None

    stem = name.replace("/", "_").replace(":", "_")
    try:
        info = tfds.builder(name).info
    except Exception as exc:  # noqa: BLE001 - unknown name, no network, ...
        exported = sorted(Path(export_root).glob(f"{stem}-*/index.json"))
        if not exported:
            raise DataError(f"data.name: cannot load TFDS dataset {name!r}: {exc}") from None
        info, index = None, exported[-1]  # offline, but exported before: its files are all a trial needs
    else:
        root = Path(export_root) / f"{stem}-{info.version}"
        index = root / "index.json"
    if not index.is_file():
        image_key, label_key = info.supervised_keys or ("image", "label")
        partial = root.with_name(f"{root.name}.partial{os.getpid()}")
        entries = []
        present = [s for s in OFFICIAL_SPLITS if s in info.splits] if info.splits else list(OFFICIAL_SPLITS)
        for split in present:
            try:
                pipe = tfds.load(name, split=split, decoders={image_key: tfds.decode.SkipDecoding()})
            except Exception as exc:  # noqa: BLE001 - a split this dataset does not have
                if split == "train":
                    raise DataError(f"data.name: cannot load TFDS dataset {name!r}: {exc}") from None
                continue
            for i, example in enumerate(pipe.as_numpy_iterator()):
                raw, label = example[image_key], int(example[label_key])
                path = partial / split / str(label) / f"{i}{_image_suffix(raw)}"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(raw)
                entries.append([str(path.relative_to(partial)), label, split])
        (partial / "index.json").write_text(json.dumps({"classes": list(info.features[label_key].names), "examples": entries}))
        try:
            partial.rename(root)  # atomic: a half-written export is never read
        except OSError:  # another process finished first: use its copy
            import shutil

            shutil.rmtree(partial, ignore_errors=True)
    saved = json.loads(index.read_text())
    examples = saved["examples"]
    paths = [str(index.parent / rel) for rel, _, _ in examples]
    labels = np.asarray([label for _, label, _ in examples], np.int64)
    official = np.asarray([split for _, _, split in examples])
    return saved["classes"], paths, labels, official


def load_dataset(cfg: DataConfig, check: FileCheck | None = None) -> Dataset:
    """Load (or index) the dataset a config describes and apply the class subset. `check`: the
    check of a folder's image files (harness/preflight.py `checked_dataset`); without it, none."""
    if cfg.source == "builtin":
        from harness.datasets_builtin import load_builtin

        assert cfg.name is not None  # a builtin or TFDS source is named (checked by harness/config.py)
        images, labels, names = load_builtin(cfg.name, cfg.image_size, cfg.builtin_size, cfg.seed)
        ds = Dataset(names, labels, images=images, image_size=cfg.image_size, name=cfg.name)
    elif cfg.source == "tfds":
        assert cfg.name is not None
        names, paths, labels, official = _load_tfds(cfg.name, cfg.tfds_dir)
        ds = _from_files(cfg, names, paths, labels, cfg.name, official if cfg.official_splits else None)
    else:
        assert cfg.path is not None  # a folder source has a path (checked by harness/config.py)
        names, paths, labels = scan_folder(cfg.path, cfg, check)
        ds = _from_files(cfg, names, paths, labels, Path(cfg.path).name)
    if cfg.classes is not None:
        ds = select_classes(ds, cfg.classes)
    if cfg.class_map is not None:
        ds = apply_class_map(ds, cfg.class_map)
    return ds


def _from_files(cfg: DataConfig, names: list[str], paths: list[str], labels: np.ndarray, name: str, official=None) -> Dataset:
    """A dataset of image files, decoded when read and cached as the config says."""
    return Dataset(
        names,
        labels,
        paths=paths,
        image_size=cfg.image_size,
        name=name,
        official=official,
        memory_cache_mib=cfg.memory_cache_mib,
        disk_cache_dir=cfg.disk_cache_dir,
        disk_cache_max_gib=cfg.disk_cache_max_gib,
    )


def select_classes(ds: Dataset, classes: list[str]) -> Dataset:
    """Keep only `classes` (in that order) and relabel them 0..k-1."""
    missing = [c for c in classes if c not in ds.class_names]
    if missing:
        raise DataError(f"data.classes: unknown class(es) {missing}; the dataset has {ds.class_names}")
    old = [ds.class_names.index(c) for c in classes]
    keep = np.isin(ds.labels, old)
    remap = {o: n for n, o in enumerate(old)}
    labels = np.asarray([remap[v] for v in ds.labels[keep]], np.int64)
    return _kept(ds, keep, list(classes), labels)


def apply_class_map(ds: Dataset, class_map: dict[str, list[str]]) -> Dataset:
    """Merge classes into target labels, relabelled 0..k-1 in the order of the sorted target names;
    the classes under the reserved key `_drop` are left out with their images.

    Config loading has checked the map against the class names of builtin and folder datasets;
    this checks it again against the loaded names (TFDS's are known only now), listing every problem.

        >>> ds = apply_class_map(ds, {"positive": ["happy", "surprise"], "negative": ["angry", "sad"],
        ...                           "neutral": ["neutral"], "_drop": ["contempt"]})
        >>> ds.class_names
        ['negative', 'neutral', 'positive']
    """
    problems = class_map_problems(class_map, ds.class_names)
    if problems:
        raise DataError(f"data.class_map: does not fit dataset {ds.name!r}, {len(problems)} problem(s): " + "; ".join(problems))
    targets = sorted(g for g in class_map if g != DROP_KEY)
    new_label = np.full(len(ds.class_names), -1, np.int64)  # -1: dropped
    for label, target in enumerate(targets):
        for name in class_map[target]:
            new_label[ds.class_names.index(name)] = label
    labels = new_label[ds.labels]
    keep = labels >= 0
    return _kept(ds, keep, targets, labels[keep])


def _kept(ds: Dataset, keep: np.ndarray, class_names: list[str], labels: np.ndarray) -> Dataset:
    """`ds` with only the examples `keep` marks, under new class names and `labels` (one per kept
    example); everything else (size, name, caches) as it was."""
    return dataclasses.replace(
        ds,
        class_names=class_names,
        labels=labels,
        images=ds.images[keep] if ds.images is not None else None,
        paths=[p for p, k in zip(ds.paths, keep) if k] if ds.paths is not None else None,
        official=ds.official[keep] if ds.official is not None else None,
    )


# --- splits ----------------------------------------------------------------------------------


def make_splits(labels: np.ndarray, cfg: DataConfig, official: np.ndarray | None = None) -> Splits:
    """Deterministic stratified train/val/test indices, then per-class subsampling of train/val.

    `official` (a TFDS dataset's own split of each example): its test and validation splits are
    used as they are; a split it lacks is carved from its train split by the config's fractions.
    Pure: depends only on the labels, the official splits, the config's fractions, caps and seed.
    """
    rng = np.random.default_rng(cfg.seed)
    has = set(np.unique(official)) if official is not None else set()
    train, val, test = [], [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        if official is None:
            n_train, n_val, n_test = split_sizes(len(idx), cfg)
            carved_test, carved_val, rest = idx[:n_test], idx[n_test : n_test + n_val], idx[n_test + n_val :]
        else:
            pool = idx[official[idx] == "train"]
            n_test = 0 if "test" in has else max(1, round(len(pool) * cfg.test_fraction))
            n_val = 0 if "validation" in has else max(1, round(len(pool) * cfg.val_fraction))
            n_train = len(pool) - n_test - n_val
            carved_test = idx[official[idx] == "test"] if "test" in has else pool[:n_test]
            carved_val = idx[official[idx] == "validation"] if "validation" in has else pool[n_test : n_test + n_val]
            rest = pool[n_test + n_val :]
        if n_train < 1 or not len(rest):
            raise DataError(f"data: class {int(c)} has only {len(idx)} image(s), too few for train/val/test splits")
        test.append(carved_test)
        val.append(carved_val[: cfg.val_per_class])
        # Taking the first N of a fixed permutation makes smaller subsamples nested in larger ones.
        train.append(rest[: cfg.train_per_class])
    return Splits(*(np.sort(np.concatenate(s)) for s in (train, val, test)))


# --- decoded images, where they are kept --------------------------------------------------------


DECODED_FORMAT = 2  # bump when a decoded split's file changes (2: JPEGs by the accurate transform), so old files are never read


def cache_plan(n_images: int, image_size: int, memory_cache_mib: float, disk_cache_dir: str | None) -> str:
    """Where a folder split's decoded images live between epochs: "memory" when they fit in
    `memory_cache_mib`, else "disk" (one shared file, `decoded_split`) when a folder is given, else "none"
    (decoded again every epoch). Pure."""
    decoded_mib = n_images * image_size * image_size * 3 / 2**20
    if decoded_mib <= memory_cache_mib:
        return "memory"
    return "disk" if disk_cache_dir else "none"


def split_files(ds: Dataset, indices: np.ndarray) -> np.ndarray:
    """The image files of one split, in `indices` order, of a dataset read from files."""
    assert ds.paths is not None, f"{ds.name} is held in memory: it has no files"
    return np.asarray([ds.paths[i] for i in indices])


def decoded_split_path(ds: Dataset, indices: np.ndarray) -> Path:
    """The shared file of one split's decoded images: named by its content and the input size."""
    assert ds.disk_cache_dir is not None  # used only with data.disk_cache_dir set
    return Path(ds.disk_cache_dir) / f"decoded-{split_digest(ds, indices)}-{ds.image_size}px-v{DECODED_FORMAT}.npy"


def decoded_split(ds: Dataset, indices: np.ndarray, decode: Callable[[np.ndarray, np.ndarray], None]) -> np.ndarray:
    """The split's images decoded (uint8, in `indices` order), memory-mapped from `ds.disk_cache_dir`.

    `decode(files, out)` writes the images of `files` into `out` (a framework's decoder: every
    framework's gives the same pixels, so the file is shared by all of them). Decoded once for
    every process and seed: the first process to need it writes a private temporary file and
    renames it into place (harness/diskcache.py), and later ones map that file. The folder stays
    under data.disk_cache_max_gib: the splits used longest ago are deleted first."""
    from harness import diskcache

    path = decoded_split_path(ds, indices)
    shape = (len(indices), ds.image_size, ds.image_size, 3)
    if diskcache.use(path):
        try:
            found = np.load(path, mmap_mode="r")
            if found.shape == shape and found.dtype == np.uint8:
                return found
        except (OSError, ValueError):  # truncated or foreign: decoded again below
            pass
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    diskcache.remove_stale_partials(folder)
    diskcache.evict(folder, diskcache.gib(ds.disk_cache_max_gib), incoming=int(np.prod(shape)), keep=path)
    partial = diskcache.partial_path(path)
    try:
        out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        decode(split_files(ds, indices), out)
        out.flush()
        del out
        diskcache.publish(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return np.load(path, mmap_mode="r")


# --- what a run trained on ---------------------------------------------------------------------


def split_digest(ds: Dataset, indices: np.ndarray) -> str:
    """A content hash of one split: its images (or each file's path, size and modification
    time), labels and class names. Changes whenever what the split feeds a model changes."""
    import hashlib

    h = hashlib.sha256("\0".join(ds.class_names).encode())
    h.update(np.asarray(ds.labels[indices], np.int64).tobytes())
    if ds.images is not None:
        h.update(np.ascontiguousarray(ds.images[indices]).tobytes())
    else:
        for path in split_files(ds, indices):
            stat = Path(path).stat()
            h.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def dataset_inputs(ds: Dataset, cfg: DataConfig, splits: Splits, with_test: bool = False) -> list[dict]:
    """The dataset inputs of a run (harness/tracking.py `log_datasets`): one per split it used."""
    source: str | dict[str, str]
    if cfg.source == "folder":
        assert cfg.path is not None
        source = str(Path(cfg.path).resolve())
    elif cfg.source == "tfds":
        source = f"https://www.tensorflow.org/datasets/catalog/{cfg.name}"
    else:
        source = {
            "generator": "harness.datasets_builtin",
            "name": str(cfg.name),
            "seed": str(cfg.seed),
            "images_per_class": str(cfg.builtin_size),
        }
    parts = [("train", splits.train), ("validation", splits.val)] + ([("test", splits.test)] if with_test else [])
    return [
        {
            "name": f"{ds.name}-{context}",
            "source": source,
            "digest": split_digest(ds, idx),
            "context": context,
            "images": len(idx),
        }
        for context, idx in parts
    ]

"""Batches for torch: (uint8 image, label) of one split, or (row, label) of cached activations.

Every framework sees the same images: an in-memory dataset (built-in, TFDS) gives its arrays as
they are, and a folder's files are decoded by harness/images.py, which gives what TensorFlow's
decoder gives (harness/frameworks/keras/data.py `decode_image`). As `tf_dataset` does, a folder split is decoded
once and kept in memory when it fits data.memory_cache_mib, decoded once into a file shared by
every process under data.disk_cache_dir, or else decoded again every epoch, a few batches ahead
in threads.

Shuffling draws a permutation of the split from a torch Generator seeded with `seed`, anew every
pass. The splits are harness/data.py `make_splits`'s, the same for every framework; the order
within an epoch is each framework's own.

    >>> for images, labels in image_batches(dataset, splits.train, 32, shuffle=True, seed=0): ...
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import numpy as np
import torch

from harness import data, images
from harness.data import Dataset, cache_plan, split_files

PREFETCH = 2  # batches decoded ahead of training when a folder split is decoded every epoch
READER = "harness-read-ahead"  # the reading thread's name


class Batches:
    """Re-iterable (x, label) batches of torch tensors on the CPU, x read by row number from an
    array (in memory or memory-mapped) or decoded from files; each pass shuffled anew."""

    def __init__(
        self, read: Callable[[np.ndarray], np.ndarray], labels: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0
    ):
        self.read, self.labels = read, np.asarray(labels, np.int64)
        self.batch_size, self.shuffle = batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)
        self.ahead = 0  # batches read ahead in a thread (files decoded every epoch)

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    @property
    def size(self) -> int:
        return len(self.labels)

    def _order(self) -> np.ndarray:
        n = len(self.labels)
        return torch.randperm(n, generator=self.generator).numpy() if self.shuffle else np.arange(n)

    def _batches(self, order: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for at in range(0, len(order), self.batch_size):
            rows = order[at : at + self.batch_size]
            yield torch.from_numpy(np.ascontiguousarray(self.read(rows))), torch.from_numpy(self.labels[rows])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self._batches(self._order())
        return _read_ahead(batches, self.ahead) if self.ahead else batches


def _read_ahead(batches: Iterator, depth: int) -> Iterator:
    """`batches`, produced `depth` ahead in a thread; the thread ends when the consumer stops early."""
    out: queue.Queue = queue.Queue(depth)
    stop = threading.Event()
    done = object()

    def offer(item) -> bool:
        """Queue `item` unless the consumer stopped; False once it has."""
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in batches:
                if not offer(item):
                    return
            offer(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            offer(exc)

    threading.Thread(target=produce, name=READER, daemon=True).start()
    try:
        while (item := out.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0) -> Batches:
    """(row, label) batches of `x` (cached activations, in memory or memory-mapped: each batch reads its rows)."""
    return Batches(lambda rows: np.asarray(x[rows]), y, batch_size, shuffle, seed)


def image_batches(dataset: Dataset, indices: np.ndarray, batch_size: int, shuffle: bool, seed: int = 0) -> Batches:
    """(uint8 image, label) batches of one split: the images every framework sees."""
    labels = dataset.labels[indices]
    if dataset.images is not None:
        pixels = dataset.images
        return Batches(lambda rows: pixels[indices[rows]], labels, batch_size, shuffle, seed)
    size = (dataset.image_size, dataset.image_size)
    files = split_files(dataset, indices)
    plan = cache_plan(len(indices), dataset.image_size, dataset.memory_cache_mib, dataset.disk_cache_dir)
    if plan == "disk":
        decoded = decoded_split(dataset, indices)
        return Batches(lambda rows: np.asarray(decoded[rows]), labels, batch_size, shuffle, seed)
    if plan == "memory":
        held: list[np.ndarray] = []

        def from_memory(rows: np.ndarray) -> np.ndarray:
            if not held:  # decoded on first use, like tf.data's cache
                held.append(images.read_images(files, size))
            return held[0][rows]

        return Batches(from_memory, labels, batch_size, shuffle, seed)
    batches = Batches(lambda rows: images.read_images(files[rows], size), labels, batch_size, shuffle, seed)
    batches.ahead = PREFETCH
    return batches


def decoded_split(dataset: Dataset, indices: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The split's images, decoded once into the file every process shares (harness/data.py),
    whichever framework decoded it: both give the same pixels."""

    def decode(files: np.ndarray, out: np.ndarray) -> None:
        for at in range(0, len(files), batch_size):
            images.read_images(files[at : at + batch_size], out.shape[1:3], out[at : at + batch_size])

    return data.decoded_split(dataset, indices, decode)

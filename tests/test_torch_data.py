"""Torch batches: the images and splits a Keras trial sees, in every cache plan, reshuffled each pass."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from harness.config import DataConfig  # noqa: E402
from harness.data import (  # noqa: E402
    decoded_split_path,  # noqa: E402
    load_dataset,
    make_splits,
)
from harness.frameworks.keras.data import tf_dataset  # noqa: E402
from harness.frameworks.torch.data import READER, array_batches, image_batches  # noqa: E402


@pytest.fixture(autouse=True)
def _results_outside_the_repository(tmp_path_factory, monkeypatch):
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))  # data.checked_images_dir lands here


def pairs(batches) -> list[tuple[bytes, int]]:
    return [(x.numpy().tobytes(), int(y)) for xs, ys in batches for x, y in zip(xs, ys)]


def keras_pairs(pipe) -> list[tuple[bytes, int]]:
    return [(x.tobytes(), int(y)) for xs, ys in pipe.as_numpy_iterator() for x, y in zip(xs, ys)]


def test_a_built_in_dataset_gives_a_torch_trial_the_same_splits_and_images_as_a_keras_trial():
    cfg = DataConfig(source="builtin", name="shapes", builtin_size=10, classes=["arc", "pentagon", "star4"], seed=4)
    dataset = load_dataset(cfg)
    splits = make_splits(dataset.labels, cfg)  # framework-free: the same indices for every framework
    for indices in (splits.train, splits.val, splits.test):
        assert pairs(image_batches(dataset, indices, 4, shuffle=False)) == keras_pairs(
            tf_dataset(dataset, indices, 4, shuffle=False)
        )
    first = image_batches(dataset, splits.train, 4, shuffle=True, seed=3)
    one, two = pairs(first), pairs(first)
    assert sorted(one) == sorted(two) == sorted(keras_pairs(tf_dataset(dataset, splits.train, 4, shuffle=False)))
    assert one != two  # reshuffled every pass
    assert pairs(image_batches(dataset, splits.train, 4, shuffle=True, seed=3)) == one  # the same seed, the same order


def _folder(root, fmt="PNG"):
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(9):  # odd sizes: every image is resized
            image = rng.integers(0, 256, (13 + i, 21 - i, 3), dtype=np.uint8)
            Image.fromarray(image).save(root / c / f"{i}.{fmt.lower()}", fmt)


@pytest.mark.parametrize("plan", ["memory", "stream", "disk"])
def test_a_folder_gives_the_images_tensorflow_decodes_in_every_cache_plan(tmp_path, plan):
    _folder(tmp_path / "images")
    base = DataConfig(source="folder", path=str(tmp_path / "images"), image_size=16)
    splits = make_splits(load_dataset(base).labels, DataConfig(val_fraction=0.2, test_fraction=0.2))
    keras_view = keras_pairs(tf_dataset(load_dataset(base), splits.train, 5, shuffle=False))
    options = {
        "memory": {},
        "stream": {"memory_cache_mib": 0},
        "disk": {"memory_cache_mib": 0, "disk_cache_dir": str(tmp_path / "c")},
    }
    dataset = load_dataset(base.model_copy(update=options[plan]))
    assert pairs(image_batches(dataset, splits.train, 5, shuffle=False)) == keras_view
    shuffled = image_batches(dataset, splits.train, 5, shuffle=True, seed=1)
    one, two = pairs(shuffled), pairs(shuffled)
    assert sorted(one) == sorted(two) == sorted(keras_view) and one != two
    if plan == "disk":  # the one file of the split, whichever framework decodes it: the pixels are the same
        assert [p.name for p in (tmp_path / "c").glob("decoded-*.npy")] == [decoded_split_path(dataset, splits.train).name]


def test_a_stream_that_is_left_early_stops_reading_ahead(tmp_path):
    _folder(tmp_path / "images", "JPEG")
    dataset = load_dataset(DataConfig(source="folder", path=str(tmp_path / "images"), image_size=16, memory_cache_mib=0))
    batches = image_batches(dataset, np.arange(18), 2, shuffle=True)
    assert batches.ahead > 0

    def readers() -> int:
        return sum(t.name == READER for t in threading.enumerate())

    stream = iter(batches)
    next(stream)  # one batch of nine, then the consumer leaves
    assert readers() == 1
    stream.close()
    deadline = time.monotonic() + 5
    while readers() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert readers() == 0
    assert len(pairs(batches)) == 18


def test_array_batches_read_rows_of_cached_activations_in_memory_or_mapped(tmp_path):
    x = np.lib.format.open_memmap(tmp_path / "features.npy", mode="w+", dtype=np.float32, shape=(10, 4))
    x[:] = np.arange(40, dtype=np.float32).reshape(10, 4)
    y = np.arange(10) % 2
    rows = [(tuple(a.tolist()), int(b)) for xs, ys in array_batches(x, y, 3, shuffle=True, seed=0) for a, b in zip(xs, ys)]
    assert sorted(rows) == [(tuple(x[i].tolist()), int(y[i])) for i in range(10)]
    assert len(array_batches(x, y, 3, shuffle=False)) == 4


def test_jpeg_bytes_decode_with_pillows_accurate_transform():
    from harness import images

    raw = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(raw, "JPEG")
    pixels = images.decode_image(raw.getvalue(), (9, 9))
    np.testing.assert_array_equal(pixels, np.asarray(Image.open(io.BytesIO(raw.getvalue())).convert("RGB")))

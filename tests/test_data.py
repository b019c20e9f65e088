"""Data: deterministic stratified splits, nested subsampling, folders, class subsets, bad images."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from harness.config import DataConfig
from harness.data import DataError, load_dataset, make_splits, select_classes, tf_dataset

LABELS = np.repeat(np.arange(4), 50)


def test_splits_are_deterministic_stratified_and_disjoint():
    cfg = DataConfig(val_fraction=0.2, test_fraction=0.2, seed=3)
    a, b = make_splits(LABELS, cfg), make_splits(LABELS, cfg)
    for x, y in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        np.testing.assert_array_equal(x, y)
    assert not set(a.train) & set(a.test) and not set(a.val) & set(a.test) and not set(a.train) & set(a.val)
    assert np.bincount(LABELS[a.test]).tolist() == [10, 10, 10, 10]
    other = make_splits(LABELS, dataclasses.replace(cfg, seed=4))
    assert not np.array_equal(other.test, a.test)


def test_small_subsamples_are_nested_in_large_ones_with_the_same_test_split():
    small = make_splits(LABELS, DataConfig(train_per_class=5, seed=1))
    large = make_splits(LABELS, DataConfig(train_per_class=20, seed=1))
    assert np.bincount(LABELS[small.train]).tolist() == [5, 5, 5, 5]
    assert set(small.train) <= set(large.train)
    np.testing.assert_array_equal(small.test, large.test)


def test_builtin_dataset_and_class_subset():
    ds = load_dataset(DataConfig(source="builtin", name="shapes", builtin_size=10, classes=["arc", "pentagon"]))
    assert ds.class_names == ["arc", "pentagon"] and ds.images.shape == (20, 32, 32, 3)
    assert sorted(set(ds.labels.tolist())) == [0, 1]
    with pytest.raises(DataError, match="unknown class"):
        select_classes(ds, ["arc", "dodecahedron"])


def _write_folder(root, classes=("cat", "dog"), n=6):
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_is_read_and_piped_through_tf_data(tmp_path):
    _write_folder(tmp_path)
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=16))
    assert ds.class_names == ["cat", "dog"] and len(ds.paths) == 12  # binary task
    splits = make_splits(ds.labels, DataConfig(val_fraction=0.2, test_fraction=0.2))
    images, labels = next(iter(tf_dataset(ds, splits.train, 32, shuffle=False)))
    assert images.shape[1:] == (16, 16, 3) and images.dtype.name == "uint8"
    assert sorted(set(labels.numpy().tolist())) == [0, 1]


def test_empty_class_folder_is_named(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "empty_one").mkdir()
    with pytest.raises(DataError, match="empty_one holds no images"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path)))


def test_a_single_class_folder_is_refused(tmp_path):
    _write_folder(tmp_path, classes=("only",))
    with pytest.raises(DataError, match="at least two"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path)))


def test_corrupt_images_are_listed_before_anything_runs(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "dog" / "text.jpg").write_text("hello")
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(source="folder", path=str(tmp_path)))
    assert "2 unreadable or corrupt" in str(info.value)
    assert "broken.png" in str(info.value) and "text.jpg" in str(info.value)


def test_digits_are_real_scans_upscaled_to_rgb():
    ds = load_dataset(DataConfig(source="builtin", name="digits", image_size=32))
    assert ds.num_classes == 10 and ds.images.shape == (1797, 32, 32, 3)

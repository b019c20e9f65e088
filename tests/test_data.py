"""Data: deterministic stratified splits, nested subsampling, folders, class subsets and merged classes.
(Bad images, found by the preflight as a folder is scanned: tests/test_preflight.py.)"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from PIL import Image

from harness.config import DataConfig, parse_config
from harness.data import (
    DataError,
    Dataset,
    apply_class_map,
    cache_plan,
    load_dataset,
    make_splits,
    min_images_per_class,
    select_classes,
    splittable,
)
from harness.frameworks.keras.data import tf_dataset
from tests.conftest import GROUPS, problems_of

LABELS = np.repeat(np.arange(4), 50)


@pytest.fixture(autouse=True)
def _results_outside_the_repository(tmp_path_factory, monkeypatch):
    """Run from a folder of its own: whatever a load writes under results/ lands there, never in the
    repository and never in a dataset root under test."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


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
            Image.fromarray(np.full((20, 24, 3), 40 * i % 256, np.uint8)).save(root / c / f"{i}.png")


def test_image_folder_is_read_and_piped_through_tf_data(tmp_path):
    _write_folder(tmp_path)
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=16))
    assert ds.class_names == ["cat", "dog"] and len(ds.paths) == 12  # binary task
    splits = make_splits(ds.labels, DataConfig(val_fraction=0.2, test_fraction=0.2))
    images, labels = next(iter(tf_dataset(ds, splits.train, 32, shuffle=False)))
    assert images.shape[1:] == (16, 16, 3) and images.dtype.name == "uint8"
    assert sorted(set(labels.numpy().tolist())) == [0, 1]


def test_a_split_too_large_for_memory_streams_from_disk_or_a_disk_cache():
    # 1,000 images at 224 px decode to 143.6 MiB
    assert cache_plan(1000, 224, 2048, None) == "memory"
    assert cache_plan(1000, 224, 100, None) == "none"
    assert cache_plan(1000, 224, 100, "/cache") == "disk"
    assert cache_plan(1000, 224, 0, None) == "none"


def _epochs(pipe, n=2):
    out = []
    for _ in range(n):
        pairs = [(int(y), int(x[0, 0, 0])) for xs, ys in pipe for x, y in zip(xs.numpy(), ys.numpy())]
        out.append(pairs)
    return out


def test_streamed_and_disk_cached_pipelines_yield_every_image_once_per_epoch_reshuffled(tmp_path):
    """Whatever the cache plan, an epoch is the whole split, each image once, in a new order."""
    root = tmp_path / "images"
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(20):  # each image carries its own grey level, so the pairs identify it
            Image.fromarray(np.full((8, 8, 3), 6 * i + (120 if c == "dog" else 0), np.uint8)).save(root / c / f"{i}.png")
    base = DataConfig(source="folder", path=str(root), image_size=8)
    splits = make_splits(load_dataset(base).labels, DataConfig(val_fraction=0.2, test_fraction=0.2))
    memory = _epochs(tf_dataset(load_dataset(base), splits.train, 5, shuffle=True, seed=3))
    for plan in ({"memory_cache_mib": 0}, {"memory_cache_mib": 0, "disk_cache_dir": str(tmp_path / "cache")}):
        ds = load_dataset(dataclasses.replace(base, **plan))
        first, second = _epochs(tf_dataset(ds, splits.train, 5, shuffle=True, seed=3))
        assert sorted(first) == sorted(second) == sorted(memory[0]) and len(first) == len(splits.train)
        assert first != second  # reshuffled every epoch
        ordered = _epochs(tf_dataset(ds, splits.val, 5, shuffle=False), 1)[0]
        assert ordered == _epochs(tf_dataset(load_dataset(base), splits.val, 5, shuffle=False), 1)[0]
    assert len(list((tmp_path / "cache").glob("decoded-*.npy"))) == 2, "the disk plan writes one file per split"


def test_tfds_is_exported_once_as_files_and_keeps_its_official_splits(tmp_path):
    """On TFDS's own mock data (offline): the encoded images are written once and stream like a
    folder; the official validation and test splits are used as they are."""
    tfds = pytest.importorskip("tensorflow_datasets")
    cfg = DataConfig(
        source="tfds", name="beans", image_size=16, tfds_dir=str(tmp_path / "tfds"), val_fraction=0.2, test_fraction=0.2
    )
    with tfds.testing.mock_data(num_examples=30, policy=tfds.testing.MockPolicy.USE_CODE):
        ds = load_dataset(cfg)
    assert ds.images is None and len(ds.paths) == 90 and ds.class_names == ["angular_leaf_spot", "bean_rust", "healthy"]
    assert all(p.startswith(str(tmp_path / "tfds")) for p in ds.paths)
    splits = make_splits(ds.labels, cfg, ds.official)
    assert set(ds.official[splits.train]) == {"train"} and len(splits.train) == 30
    assert set(ds.official[splits.val]) == {"validation"} and set(ds.official[splits.test]) == {"test"}
    images, _ = next(iter(tf_dataset(ds, splits.train, 8, shuffle=True)))
    assert images.shape[1:] == (16, 16, 3)
    # Offline and without the mock, the export is all a later load needs.
    again = load_dataset(cfg)
    assert again.paths == ds.paths and np.array_equal(again.official, ds.official)
    # official_splits: false pools every split and cuts by the fractions.
    pooled = load_dataset(dataclasses.replace(cfg, official_splits=False))
    cut = make_splits(pooled.labels, cfg, pooled.official)
    assert pooled.official is None and len(cut.train) + len(cut.val) + len(cut.test) == 90
    assert set(ds.official[cut.test]) != {"test"}


def test_a_tfds_split_missing_from_the_dataset_is_carved_from_train():
    labels = np.repeat(np.arange(2), 20)
    official = np.asarray(["train"] * 15 + ["test"] * 5 + ["train"] * 15 + ["test"] * 5)
    splits = make_splits(labels, DataConfig(val_fraction=0.2, test_fraction=0.2), official)
    assert set(official[splits.test]) == {"test"} and len(splits.test) == 10
    assert set(official[splits.val]) == {"train"} and len(splits.val) == 6  # 20% of each class's 15 train images
    assert len(splits.train) == 24 and not set(splits.val) & set(splits.train)


def test_empty_class_folder_is_named(tmp_path):
    _write_folder(tmp_path)
    (tmp_path / "empty_one").mkdir()
    with pytest.raises(DataError, match="empty_one holds no images"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path)))


def test_a_single_class_folder_is_refused(tmp_path):
    _write_folder(tmp_path, classes=("only",))
    with pytest.raises(DataError, match="at least two"):
        load_dataset(DataConfig(source="folder", path=str(tmp_path)))


def test_digits_are_real_scans_upscaled_to_rgb():
    ds = load_dataset(DataConfig(source="builtin", name="digits", image_size=32))
    assert ds.num_classes == 10 and ds.images.shape == (1797, 32, 32, 3)


def test_the_minimum_class_size_follows_the_fractions_and_train_per_class(tmp_path):
    assert min_images_per_class(DataConfig(val_fraction=0.2, test_fraction=0.2)) == 3
    assert min_images_per_class(DataConfig(val_fraction=0.2, test_fraction=0.2, train_per_class=10)) == 16  # 16 - 3 test - 3 val
    _write_folder(tmp_path, n=12)
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(source="folder", path=str(tmp_path), train_per_class=10))
    text = str(info.value)
    assert "2 problem(s)" in text and "cat has 12 usable image(s)" in text and "train_per_class 10" in text
    assert "a class needs at least 16" in text
    # Classes left out by data.classes are not held to the size rule.
    _write_folder(tmp_path, classes=("bird",), n=2)
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(source="folder", path=str(tmp_path), classes=["cat", "dog"], train_per_class=10))
    assert "bird" not in str(info.value)


def test_a_class_size_that_rounds_to_no_train_image_is_explained(tmp_path):
    # 0.45 + 0.45: 3 images split 1/1/1, but 4 round to 2 val + 2 test and leave none to train.
    _write_folder(tmp_path, classes=("cat",), n=4)
    _write_folder(tmp_path, classes=("dog",), n=3)
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(source="folder", path=str(tmp_path), val_fraction=0.45, test_fraction=0.45))
    text = str(info.value)
    assert "1 problem(s)" in text and "cat has 4 usable image(s)" in text
    assert "2 val + 2 test, leaving 0 for train where 1 are needed" in text


@pytest.mark.parametrize(
    "val,test,train_per_class",
    [(0.2, 0.2, None), (0.1, 0.3, None), (0.45, 0.45, None), (0.15, 0.05, None), (0.2, 0.2, 4), (0.3, 0.1, 2)],
)
def test_splittable_agrees_exactly_with_make_splits(val, test, train_per_class):
    cfg = DataConfig(val_fraction=val, test_fraction=test, train_per_class=train_per_class)
    for n in range(1, 60):
        labels = np.repeat([0, 1], [n, 50])
        try:
            splits = make_splits(labels, cfg)
        except DataError:
            made = False
        else:
            made = (labels[splits.train] == 0).sum() >= (train_per_class or 1)
        assert splittable(n, cfg) == made, n


# --- decoded splits in the shared disk cache (its file discipline: tests/test_diskcache.py) -----------


def _grey_folder(root, n=12):
    """Two classes of images that each carry their own grey level."""
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((8, 8, 3), 6 * i + (120 if c == "dog" else 0), np.uint8)).save(root / c / f"{i}.png")


def _decode_in_child(ds, indices, out_queue):
    from harness.frameworks.keras.data import decoded_split

    out_queue.put(np.array(decoded_split(ds, indices)))


def test_a_decoded_split_is_one_shared_file_whatever_the_process_or_seed(tmp_path):
    import multiprocessing

    from harness.frameworks.keras.data import decoded_split

    _grey_folder(tmp_path / "images")
    cache = tmp_path / "cache"
    ds = load_dataset(
        DataConfig(source="folder", path=str(tmp_path / "images"), image_size=8, memory_cache_mib=0, disk_cache_dir=str(cache))
    )
    splits = make_splits(ds.labels, DataConfig())
    expected = np.concatenate(
        [x.numpy() for x, _ in tf_dataset(dataclasses.replace(ds, disk_cache_dir=None), splits.train, 64, shuffle=False)]
    )
    # Two processes start on an empty cache at once: both end up with the complete split.
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    racers = [ctx.Process(target=_decode_in_child, args=(ds, splits.train, queue)) for _ in range(2)]
    for p in racers:
        p.start()
    results = [queue.get(timeout=300) for _ in racers]
    for p in racers:
        p.join()
    for result in results:
        np.testing.assert_array_equal(result, expected)
    assert [p.name for p in cache.iterdir()] == [f"{p.name}" for p in cache.glob("decoded-*.npy")]  # no temp left
    assert len(list(cache.iterdir())) == 1
    # Pipelines of other seeds, in this process too, read that same file.
    for seed in (0, 1, 2):
        _epochs(tf_dataset(ds, splits.train, 5, shuffle=True, seed=seed), 1)
    np.testing.assert_array_equal(decoded_split(ds, splits.train), expected)
    assert len(list(cache.iterdir())) == 1


def test_past_the_cap_the_split_used_longest_ago_is_deleted_and_the_one_just_used_kept(tmp_path):
    import time

    from harness.data import decoded_split_path
    from harness.frameworks.keras.data import decoded_split

    _grey_folder(tmp_path / "images")
    ds = load_dataset(
        DataConfig(
            source="folder",
            path=str(tmp_path / "images"),
            image_size=8,
            memory_cache_mib=0,
            disk_cache_dir=str(tmp_path / "cache"),
        )
    )
    splits = make_splits(ds.labels, DataConfig(val_fraction=0.25, test_fraction=0.25))
    train, val, test = (decoded_split_path(ds, s) for s in (splits.train, splits.val, splits.test))
    decoded_split(ds, splits.train)
    decoded_split(ds, splits.val)
    long_ago = time.time() - 3600
    for path in (train, val):  # both written an hour ago...
        os.utime(path, (long_ago, long_ago))
    os.utime(train, (long_ago - 60, long_ago - 60))  # ...train first
    decoded_split(ds, splits.train)  # ...but train is used now
    # A cap that holds two of the three splits (val and test are the same size): writing test
    # deletes val, used longest ago.
    capped = dataclasses.replace(ds, disk_cache_max_gib=(train.stat().st_size + val.stat().st_size + 64) / 2**30)
    decoded_split(capped, splits.test)
    assert train.exists() and test.exists() and not val.exists()
    # The evicted split is decoded again when needed.
    assert decoded_split(capped, splits.val).shape[0] == len(splits.val)


# --- data.class_map: merging -------------------------------------------------------------------


def test_class_map_merges_builtin_classes_into_sorted_target_labels():
    raw = load_dataset(DataConfig(source="builtin", name="shapes", builtin_size=10))
    ds = load_dataset(DataConfig(source="builtin", name="shapes", builtin_size=10, class_map=GROUPS))
    assert ds.class_names == ["pointy", "round"]  # sorted target names, _drop is no label
    assert ds.num_classes == 2 and len(ds.labels) == 40 and ds.images.shape == (40, 32, 32, 3)
    target_of = {c: t for t, members in GROUPS.items() if t != "_drop" for c in members}
    kept = [i for i, label in enumerate(raw.labels) if raw.class_names[label] in target_of]
    expected = [ds.class_names.index(target_of[raw.class_names[raw.labels[i]]]) for i in kept]
    assert ds.labels.tolist() == expected  # every image keeps its order and gets its group's label
    np.testing.assert_array_equal(ds.images, raw.images[kept])
    assert np.bincount(ds.labels).tolist() == [20, 20]
    splits = make_splits(ds.labels, DataConfig(val_fraction=0.2, test_fraction=0.2))
    assert set(ds.labels[splits.test].tolist()) == {0, 1}  # stratified on the merged labels


def test_class_map_relabels_a_folder_dataset(tmp_path):
    from PIL import Image

    for c in ("cat", "dog", "owl", "bat"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(
        DataConfig(
            source="folder",
            path=str(tmp_path),
            image_size=8,
            class_map={"pet": ["cat", "dog"], "bird": ["owl"], "_drop": ["bat"]},
        )
    )
    assert ds.class_names == ["bird", "pet"] and len(ds.paths) == 15
    assert all(("/owl/" in p) == (label == 0) for p, label in zip(ds.paths, ds.labels))
    assert not any("/bat/" in p for p in ds.paths)


def test_a_subset_or_a_class_map_keeps_each_kept_examples_file_and_split_and_the_caches():
    ds = Dataset(
        ["a", "b", "c"],
        np.array([0, 1, 2, 1]),
        paths=["a0.png", "b0.png", "c0.png", "b1.png"],
        image_size=8,
        name="files",
        official=np.array(["train", "test", "train", "validation"]),
        memory_cache_mib=1,
        disk_cache_dir="/cache",
        disk_cache_max_gib=2,
    )
    for kept in (select_classes(ds, ["b", "c"]), apply_class_map(ds, {"x": ["c"], "y": ["b"], "_drop": ["a"]})):
        assert kept.paths == ["b0.png", "c0.png", "b1.png"] and kept.official.tolist() == ["test", "train", "validation"]
        assert (kept.image_size, kept.name, kept.memory_cache_mib, kept.disk_cache_dir, kept.disk_cache_max_gib) == (
            8,
            "files",
            1,
            "/cache",
            2,
        )
        assert kept.images is None
    assert select_classes(ds, ["b", "c"]).labels.tolist() == [0, 1, 0]
    assert apply_class_map(ds, {"x": ["c"], "y": ["b"], "_drop": ["a"]}).labels.tolist() == [1, 0, 1]


def test_a_tfds_class_map_is_checked_when_the_names_are_known():
    """TFDS names are only known after loading: config load accepts the map, loading lists every problem."""
    cfg = parse_config(
        "study: {name: t}\nmodel: {weights: none}\ndata: {source: tfds, name: beans, "
        "class_map: {sick: [angular_leaf_spot, bean_rustt], well: [healthy]}}\n",
        "s.yaml",
    )
    assert cfg.data.class_map["well"] == ["healthy"]
    ds = Dataset(
        ["angular_leaf_spot", "bean_rust", "healthy"],
        np.array([0, 1, 2]),
        images=np.zeros((3, 8, 8, 3), np.uint8),
        image_size=8,
        name="beans",
    )
    with pytest.raises(DataError) as info:
        apply_class_map(ds, cfg.data.class_map)
    message = str(info.value)
    assert message.startswith("data.class_map:") and problems_of(message) == 2
    assert "data.class_map.sick: unknown class(es) 'bean_rustt'" in message
    assert "class(es) bean_rust are in no target label" in message

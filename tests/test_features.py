"""Cached frozen features: when they apply, that phase 1 on them is phase 1 on images, that the
cache is keyed by content and shared, and that a config asking for the impossible is refused."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from harness.config import ConfigError, parse_config
from harness.data import load_dataset, make_splits
from harness.features import FeatureCache, cache_applies
from harness.frameworks import framework_named
from harness.frameworks.base import PhaseRun
from harness.frameworks.keras.model import ModelSpec, build_model
from harness.phases import History, Phase, two_phase_plan
from harness.pretrain import ASSETS
from harness.training import Configuration, EpochHooks, Trainer, TrainingSettings

KERAS = framework_named("keras")

SHIPPED = str(ASSETS / "MobileNetV2-5b2c197669.weights.h5")  # the demo's pretrained source backbone
CONFIG = """
study: {name: feat, seed: 0}
model: {weights: WEIGHTS, backbone_options: {MobileNetV2: {alpha: 0.35}}}
data: {source: builtin, name: shapes-source, classes: [circle, square, triangle, star5, cross, hexagon],
       builtin_size: 40, image_size: 32, seed: 0}
search: {backbone: MobileNetV2, head_lr: 0.005, dropout: 0.2}
train:
  head: {epochs: 3, batch_size: 16, patience: null}
  finetune: {epochs: 1, batch_size: 16, patience: null}
""".replace("WEIGHTS", SHIPPED)


@pytest.fixture(scope="module")
def task():
    cfg = parse_config(CONFIG, "feat.yaml")
    dataset = load_dataset(cfg.data)
    return cfg, dataset, make_splits(dataset.labels, cfg.data)


def model(weights=SHIPPED, **spec):
    keras.utils.set_random_seed(0)
    return build_model(ModelSpec("MobileNetV2", 32, 6, weights, {"alpha": 0.35}, **spec), seed=0)


def head_phase(cfg, epochs=3):
    return [p for p in two_phase_plan(epochs, 0.005, None, 0, 1e-4, None, 0)]


def run_plan(cfg, dataset, splits, tm, plan, cache=None, on_features=lambda phase, seconds: None) -> History:
    """The one training path on the task's data, with or without the feature cache, seed 0."""
    settings = TrainingSettings({"head": cfg.train.head.batch_size, "finetune": cfg.train.finetune.batch_size})
    trainer = Trainer(KERAS, dataset, splits, settings, cache)
    return trainer.run_plan(tm, Configuration(tm.spec, tuple(plan), 0, 0), EpochHooks(on_features=on_features), History())


def cache_of(folder, dataset, splits, **kwargs) -> FeatureCache:
    return FeatureCache(folder, dataset, splits, KERAS, **kwargs)


def val_scores(tm, dataset, splits) -> dict[str, float]:
    """The whole model on the validation images."""
    return KERAS.evaluate(tm, KERAS.image_batches(dataset, splits.val, 16, shuffle=False))


def test_the_cache_applies_to_the_frozen_head_phase_of_a_pretrained_backbone_without_augmentation():
    head, finetune = Phase("head", 3, 1e-3, 0, None), Phase("finetune", 3, 1e-4, 2, None)
    assert cache_applies(model().spec, head)
    assert not cache_applies(model().spec, finetune)  # part of the backbone trains
    assert not cache_applies(model(augment=True).spec, head)  # the backbone's input changes every epoch
    assert not cache_applies(model(weights=None).spec, head)  # random init: BatchNormalization trains


def test_phase1_on_cached_features_scores_as_phase1_on_images(task, tmp_path):
    """Same seed, same data order: the validation accuracy of every epoch agrees within 0.01, and
    the model that comes back is the whole Keras model with the trained head in it."""
    cfg, dataset, splits = task
    uncached = model()
    plain = run_plan(cfg, dataset, splits, uncached, head_phase(cfg))
    cached_model = model()
    cache = cache_of(tmp_path, dataset, splits)
    took = []
    cached = run_plan(cfg, dataset, splits, cached_model, head_phase(cfg), cache, lambda phase, seconds: took.append(phase))
    assert cache.computed == 2 and took == ["head"]  # train and val, once each
    a = [e.metrics["val_accuracy"] for e in plain.epochs]
    b = [e.metrics["val_accuracy"] for e in cached.epochs]
    assert len(a) == len(b) == 3 and np.allclose(a, b, atol=0.01), (a, b)
    assert max(b) > 0.5  # a real pretrained backbone, a head that learned (6 classes: chance is 0.17)
    # The whole model scores on images what the head scored on features (best epoch restored).
    whole = val_scores(cached_model, dataset, splits)
    assert whole["accuracy"] == pytest.approx(cached.best("val_accuracy", "maximize"), abs=1e-6)
    # ... and phase 2 continues from it, the backbone's top blocks training.
    more = run_plan(cfg, dataset, splits, cached_model, [Phase("finetune", 1, 1e-4, 2, None)], cache)
    assert [p.name for p in more.phases] == ["finetune"] and more.phases[0].trainable_params > cached.phases[0].trainable_params


def test_phase2_on_cached_boundary_activations_scores_as_phase2_on_images(task, tmp_path):
    """Phase 2 that unfreezes the top 3 blocks runs them on cached activations at the freeze
    boundary: every epoch's validation accuracy agrees with phase 2 on images within 0.01, the top
    blocks' weights really change, the frozen bottom's do not, and the whole model scores on
    images what phase 2 scored."""
    from harness.features import boundary_applies

    cfg, dataset, splits = task
    plan = two_phase_plan(2, 0.005, None, 3, 3e-4, None, 3)
    tm = model()
    assert boundary_applies(tm.spec, tm.n_blocks, plan[1])
    assert not boundary_applies(model(augment=True).spec, tm.n_blocks, plan[1])
    assert not boundary_applies(tm.spec, tm.n_blocks, Phase("finetune", 3, 1e-4, -1, None))  # everything trains: no boundary
    on_images = model()
    plain = run_plan(cfg, dataset, splits, on_images, plan)
    cached_model = model()
    before = {w.path: np.array(w) for w in cached_model.backbone.weights}
    cache = cache_of(tmp_path, dataset, splits)
    took = []
    cached = run_plan(cfg, dataset, splits, cached_model, plan, cache, lambda phase, seconds: took.append(phase))
    assert took == ["head", "finetune"] and cache.computed == 4  # pooled and boundary, train and val
    a = [e.metrics["val_accuracy"] for e in plain.epochs]
    b = [e.metrics["val_accuracy"] for e in cached.epochs]
    assert len(a) == len(b) == 5 and np.allclose(a, b, atol=0.01), (a, b)
    whole = val_scores(cached_model, dataset, splits)
    assert whole["accuracy"] == pytest.approx(cached.best("val_accuracy", "maximize"), abs=1e-6)
    # One more cached phase-2 epoch, kept whatever it scores: only the top blocks' weights move.
    KERAS.set_trainable(cached_model, 3)
    KERAS.run_phase(cached_model, plan[1], cache.top_inputs(cached_model, 3, 16, 0), PhaseRun(0, lambda record: None))
    top = {n for block in cached_model.blocks[-3:] for n in block}
    layer_of = {id(w): layer.name for layer in cached_model.backbone.layers for w in layer.weights}
    changed = {layer_of[id(w)] for w in cached_model.backbone.weights if not np.array_equal(before[w.path], np.array(w))}
    assert changed and changed <= top, (changed, top)


def test_cached_features_are_shared_on_disk_and_keyed_by_content(task, tmp_path):
    cfg, dataset, splits = task
    first = cache_of(tmp_path, dataset, splits)
    features = first.features(model(), "train")
    assert first.computed == 1 and len(list(tmp_path.glob("*.npy"))) == 1
    # Another process (a fresh cache object) reads the same file instead of recomputing.
    again = cache_of(tmp_path, dataset, splits)
    assert np.array_equal(again.features(model(), "train"), features) and again.computed == 0
    # Different weights, a different cut, different pooling, a different split: all recomputed.
    other = model(weights=None)  # the same architecture, other weight values
    assert not np.array_equal(again.features(other, "train"), features)
    again.features(model(cut_fraction=0.5), "train")
    again.features(model(pooling="max"), "train")
    again.features(model(), "val")
    assert again.computed == 4 and len(list(tmp_path.glob("*.npy"))) == 5
    # Other images under the same split name: a new key.
    reshuffled = make_splits(dataset.labels, parse_config(CONFIG.replace("seed: 0}", "seed: 1}"), "f.yaml").data)
    moved = cache_of(tmp_path, dataset, reshuffled)
    moved.features(model(), "train")
    assert moved.computed == 1
    # A truncated or foreign file is recomputed, not trusted.
    for path in tmp_path.glob("*.npy"):
        np.save(path, np.zeros((1, 3), np.float32))
    assert np.array_equal(cache_of(tmp_path, dataset, splits).features(model(), "train"), features)


def test_features_larger_than_memory_cache_mib_stay_on_disk_and_train_the_same(task, tmp_path):
    """Past data.memory_cache_mib the features are memory-mapped, not loaded: the pipeline reads each
    batch's rows, in the order of features held in memory (shuffled, and reshuffled each epoch),
    and phase 1 scores the same."""
    import dataclasses

    cfg, dataset, splits = task
    held_cache = cache_of(tmp_path, dataset, splits)
    mapped_cache = cache_of(tmp_path, dataclasses.replace(dataset, memory_cache_mib=0), splits)
    held, mapped = held_cache.features(model(), "train"), mapped_cache.features(model(), "train")
    assert not isinstance(held, np.memmap) and isinstance(mapped, np.memmap) and mapped_cache.computed == 0
    assert np.array_equal(held, mapped)
    labels = dataset.labels[splits.train]
    in_memory, on_disk = (
        KERAS.array_batches(held, labels, 16, shuffle=True, seed=3),
        KERAS.array_batches(mapped, labels, 16, shuffle=True, seed=3),
    )
    orders = []
    for _ in range(2):  # two epochs: reshuffled, the same way in both
        batches = list(zip(in_memory, on_disk))
        assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in batches)
        orders.append(np.concatenate([np.asarray(a[1]) for a, _ in batches]))
    assert not np.array_equal(*orders)
    runs = [run_plan(cfg, dataset, splits, model(), head_phase(cfg), cache) for cache in (held_cache, mapped_cache)]
    a, b = ([e.metrics["val_accuracy"] for e in run.epochs] for run in runs)
    assert np.allclose(a, b, atol=1e-6), (a, b)


def test_asking_for_the_cache_where_it_can_never_apply_is_refused_with_the_key():
    with pytest.raises(ConfigError, match=r"train\.feature_cache: true, but model\.weights is none"):
        parse_config(
            "study: {name: f}\ndata: {source: builtin, name: shapes}\nmodel: {weights: none}\ntrain: {feature_cache: true}\n",
            "f.yaml",
        )
    with pytest.raises(ConfigError, match=r"feat\.yaml:\d+:\d+: train\.feature_cache: true, but search\.augment is always true"):
        parse_config(CONFIG.replace("dropout: 0.2}", "dropout: 0.2, augment: true}") + "  feature_cache: true\n", "feat.yaml")
    # The default stays quiet where it cannot apply, and off is always fine.
    assert (
        parse_config(
            "study: {name: f}\ndata: {source: builtin, name: shapes}\nmodel: {weights: none}\n", "f.yaml"
        ).train.feature_cache
        is True
    )
    assert parse_config(
        "study: {name: f}\ndata: {source: builtin, name: shapes}\nmodel: {weights: none}\ntrain: {feature_cache: false}\n",
        "f.yaml",
    )


def test_a_trials_resolved_config_says_whether_it_used_the_cache_and_loads_again():
    import yaml

    cfg = parse_config(CONFIG.replace("dropout: 0.2}", "dropout: 0.2, augment: {choices: [true, false]}}"), "feat.yaml")
    with_aug = cfg.resolved({"backbone": "MobileNetV2", "augment": True}, 0)
    without = cfg.resolved({"backbone": "MobileNetV2", "augment": False}, 1)
    assert with_aug["train"]["feature_cache"] is False and without["train"]["feature_cache"] is True
    for resolved in (with_aug, without):
        assert parse_config(yaml.safe_dump(resolved), "r.yaml").train.feature_cache == resolved["train"]["feature_cache"]


def test_the_feature_folder_drops_dead_writers_files_and_keeps_under_its_cap_least_recently_used_first(task, tmp_path):
    import os
    import subprocess
    import sys
    import time

    from harness import diskcache

    _, dataset, splits = task
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = tmp_path / f"MobileNetV2-0123.partial-{diskcache._host()}-{dead.pid}.npy"  # its writer was killed
    killed.write_bytes(b"half a file")
    cache = cache_of(tmp_path, dataset, splits)
    assert not killed.exists()  # gone when the next process opens the cache
    cache.features(model(), "train")
    cache.features(model(), "val")
    train, val = (tmp_path / f"MobileNetV2-{k}.npy" for k in (_key(cache, model(), "train"), _key(cache, model(), "val")))
    long_ago = time.time() - 3600
    os.utime(train, (long_ago - 60, long_ago - 60))
    os.utime(val, (long_ago, long_ago))
    # Train was written first but is used again now (from this process's memory: still touched).
    cache.features(model(), "train")
    # A cap that holds the two sets already there, not a third: the one used longest ago (val) goes.
    capped = cache_of(tmp_path, dataset, splits, max_gib=(train.stat().st_size + val.stat().st_size + 64) / 2**30)
    capped.features(model(cut_fraction=0.5), "val")
    assert train.exists() and not val.exists() and len(list(tmp_path.glob("*.npy"))) == 2
    assert capped.features(model(), "val").shape[0] == len(splits.val)  # computed again when needed


def _key(cache, tm, split):
    from harness.features import feature_key

    return feature_key(tm.spec, tm.n_blocks, KERAS.weights_digest(tm), cache._split_digest(split))

"""Transferability scores on frozen features: k-NN accuracy, LogME's ranking, balanced subsets, published top-1,
and the parameters the screening reads, as phase 1 does."""

from __future__ import annotations

import math

import numpy as np

from harness import screening as sc
from harness import transferability as tr
from harness.config import parse_config
from tests.test_screening import _config


def _two_backbones(n_per_class: int = 30, classes: int = 3, seed: int = 0):
    """Labels, features that separate the classes (a clear cluster per class), and pure noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    centres = rng.normal(size=(classes, 16)) * 4
    separable = centres[labels] + rng.normal(size=(len(labels), 16))
    noise = rng.normal(size=(len(labels), 16))
    return labels, separable, noise


def test_knn_on_separable_features_is_near_perfect_and_on_noise_near_chance():
    labels, separable, noise = _two_backbones()
    assert tr.knn_accuracy(separable, labels) > 0.95
    assert tr.knn_accuracy(noise, labels) < 0.6  # chance is 1/3


def test_the_separable_backbone_ranks_first_by_knn_and_by_logme():
    labels, separable, noise = _two_backbones()
    rows = {"noise": tr.feature_scores(noise, labels), "separable": tr.feature_scores(separable, labels)}
    assert sc.rank(rows, "knn") == ["separable", "noise"]
    assert sc.rank(rows, "logme") == ["separable", "noise"]


def test_knn_uses_fewer_folds_for_small_classes_and_gives_up_on_a_single_image():
    labels, separable, _ = _two_backbones(n_per_class=2)
    assert tr.knn_accuracy(separable, labels) > 0.9  # 2 folds, 1 neighbour
    assert math.isnan(tr.knn_accuracy(separable[:5], np.array([0, 0, 1, 1, 2])))


def test_l2_normalise_gives_unit_rows_and_keeps_a_zero_row():
    out = tr.l2_normalise(np.array([[3.0, 4.0], [0.0, 0.0]]))
    assert np.allclose(out, [[0.6, 0.8], [0.0, 0.0]])


def test_balanced_positions_take_the_same_share_of_every_class():
    labels = np.array([0] * 10 + [1] * 3 + [2] * 10)
    pos = tr.balanced_positions(labels, 12)
    assert np.bincount(labels[pos]).tolist() == [4, 3, 4]


def test_published_top1_only_for_imagenet_weights_of_the_default_variant():
    assert tr.published_top1("ResNet50", "imagenet", {}) == 74.9
    assert tr.published_top1("MobileNetV2", "imagenet", {"alpha": 0.35}) is None
    assert tr.published_top1("ResNet50", "/w/source.weights.h5", {}) is None
    from harness.frameworks.keras.backbones import BACKBONES, IMAGENET_TOP1

    assert set(IMAGENET_TOP1) <= set(BACKBONES) and all(50 < v < 90 for v in IMAGENET_TOP1.values())


def test_screening_params_match_what_phase_one_reads():
    cfg = parse_config(_config("absent", extra="  pooling: {choices: [max, avg]}\n"), "s.yaml")
    params = tr.screening_params(cfg, "MobileNetV2")
    assert params["pooling"] == "avg" and params["cut_fraction"] == 1.0 and params["augment"] is False

"""Scores that rank backbones from frozen features of a target's training split, before training.

- LogME (harness/logme.py): the evidence of a Bayesian linear model of the labels on the features;
- k-NN accuracy: a plain k-nearest-neighbour classifier on L2-normalised features, cross-validated
  within the training split (never the validation or test split, which the search and the final
  test read);
- size: the backbone's parameter count and, with ImageNet weights, its published ImageNet top-1.

The pure scores come first; `score_backbones` computes them in a trial process (harness/tasks.py
`ScreeningTask`), and harness/screening.py ranks, narrows and judges them.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from harness.frameworks.keras.backbones import IMAGENET_TOP1

KNN_NEIGHBOURS = 5
KNN_FOLDS = 5


def l2_normalise(features: np.ndarray) -> np.ndarray:
    """Each row scaled to unit length (a zero row stays zero): k-NN then compares directions."""
    x = np.asarray(features, np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norms > 0, norms, 1.0)


def knn_accuracy(
    features: np.ndarray, labels: np.ndarray, neighbours: int = KNN_NEIGHBOURS, folds: int = KNN_FOLDS, seed: int = 0
) -> float:
    """Mean accuracy of a k-NN classifier on L2-normalised features, stratified-k-fold cross-validated
    within the given (training) images. Fewer folds and neighbours when the smallest class has few
    images; NaN when a class has a single image (no fold could hold it out and still train on it)."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    y = np.asarray(labels)
    smallest = int(np.bincount(np.unique(y, return_inverse=True)[1]).min())
    n_splits = min(folds, smallest)
    if n_splits < 2:
        return math.nan
    # No more neighbours than the smallest class keeps in a training fold: past that, its images
    # could never hold a majority of the vote, however well the features separate it.
    k = max(1, min(neighbours, smallest - math.ceil(smallest / n_splits)))
    cv = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return float(cross_val_score(KNeighborsClassifier(n_neighbors=k), l2_normalise(features), y, cv=cv).mean())


def balanced_positions(labels: np.ndarray, max_images: int) -> np.ndarray:
    """Positions of up to `max_images` images, the same share from every class (the first of each)."""
    y = np.asarray(labels)
    classes = np.unique(y)
    per_class = max(1, max_images // len(classes))
    return np.sort(np.concatenate([np.flatnonzero(y == c)[:per_class] for c in classes]))


def feature_scores(features: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """LogME and k-NN accuracy of one backbone's features of the training images."""
    from harness.logme import logme

    try:
        evidence = logme(features, labels)
    except ValueError:  # degenerate features (all zero, not finite): no evidence to rank by
        evidence = math.nan
    return {"logme": evidence, "knn": knn_accuracy(features, labels)}


def published_top1(backbone: str, weights: str | None, options: dict | None) -> float | None:
    """The backbone's published ImageNet top-1 (%), where it applies: ImageNet weights of the
    constructor's default variant (other options, such as a MobileNet alpha, are another model)."""
    if weights != "imagenet" or options:
        return None
    return IMAGENET_TOP1.get(backbone)


def screening_params(cfg, backbone: str) -> dict:
    """Trial parameters whose frozen pooled features are what phase 1 of a trial of `backbone` reads
    (so the feature cache entry is the trials' own): fixed values as configured, the searched
    pooling's first choice ("avg" when offered), the whole backbone unless its cut is fixed."""
    search = cfg.search

    def fixed_or(name, default):
        p = search.get(name)
        return p.value if p is not None and p.fixed else default

    pooling = search.get("pooling")
    if pooling is not None and not pooling.fixed:
        pooling_value = "avg" if "avg" in (pooling.choices or ()) else (pooling.choices or ("avg",))[0]
    else:
        pooling_value = fixed_or("pooling", "avg")
    return {
        "backbone": backbone,
        "head_units": 0,
        "dropout": 0.0,
        "pooling": pooling_value,
        "augment": False,
        "cut_fraction": fixed_or("cut_fraction", 1.0),
    }


def score_backbones(runner, backbones: list[str], max_images: int, note=lambda payload: None) -> dict[str, dict]:
    """Every backbone's scores from frozen features of the training split (inside a trial process).

    With the feature cache on, the whole split's features are read from (or written to) the entry
    the trials' phase 1 uses; the scores read a class-balanced subsample of at most `max_images`."""
    dataset, splits = runner.dataset, runner.splits
    train_labels = dataset.labels[splits.train]
    positions = balanced_positions(train_labels, max_images)
    out = {}
    for backbone in backbones:
        started = time.perf_counter()
        row = backbone_row(runner, backbone, positions)
        row["seconds"] = round(time.perf_counter() - started, 2)
        out[backbone] = row
        note(
            (
                "message",
                f"screening {backbone}: LogME {row['logme']:.4f}, k-NN {row['knn']:.4f}, "
                f"{row['params']:,} parameters ({row['seconds']:.1f} s)",
            )
        )
    return out


def backbone_row(runner, backbone: str, positions: np.ndarray) -> dict[str, Any]:
    """One backbone's scores on the training images at `positions`, and its facts."""
    from harness.config import feature_cache_impossible
    from harness.features import frozen_features

    cfg, dataset, splits = runner.cfg, runner.dataset, runner.splits
    trainer = runner.trainer(backbone)
    fw = trainer.fw
    # The trials' cache entry, where trials can read it; elsewhere only the subsample is computed.
    cache = trainer.features if feature_cache_impossible(cfg) is None else None
    weights = runner.weights.get(backbone)
    model = fw.build(runner.spec(screening_params(cfg, backbone)), seed=cfg.study.seed)
    try:
        if cache is not None:
            features = np.asarray(cache.features(model, "train")[positions])
        else:
            features = frozen_features(fw, model, dataset, splits.train[positions])
        row: dict[str, Any] = feature_scores(features, dataset.labels[splits.train][positions])  # then facts of the backbone
        row.update(
            params=fw.backbone_size(model),
            images=len(positions),
            imagenet_top1=published_top1(backbone, weights, cfg.model.backbone_options.get(backbone)),
        )
    finally:
        model = None
        fw.release_memory()
    return row


def logme_of_backbone(backbone: str, image_size: int, options: dict, weights: str | None, dataset, indices) -> float:
    """LogME of one backbone's frozen pooled features of the images at `indices` (a quadrant
    sweep's per-target ranking, computed where the sweep runs)."""
    from harness.features import frozen_features
    from harness.frameworks import framework_for
    from harness.frameworks.base import ModelSpec
    from harness.logme import logme

    fw = framework_for(backbone)
    model = fw.build(ModelSpec(backbone, image_size, dataset.num_classes, weights, dict(options)), seed=0)
    score = logme(frozen_features(fw, model, dataset, indices), dataset.labels[indices])
    del model
    fw.release_memory()
    return score

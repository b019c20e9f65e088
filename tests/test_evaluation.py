"""Scores of a test split beyond accuracy: AUC, per-class accuracy, the confusion matrix, metric keys."""

from __future__ import annotations

import numpy as np
import pytest

from harness.evaluation import class_metric_keys, classification_metrics, confusion_csv


def test_classification_metrics_on_hand_made_binary_probabilities():
    from sklearn.metrics import roc_auc_score

    p1 = np.array([0.9, 0.2, 0.6, 0.4, 0.8, 0.1, 0.7])
    labels = np.array([1, 0, 0, 1, 1, 0, 1])
    m = classification_metrics(np.stack([1 - p1, p1], axis=1), labels, 2)
    # predicted: 1 0 1 0 1 0 1 -> true 0: [2 right, 1 called 1]; true 1: [1 called 0, 3 right]
    assert m["confusion"].tolist() == [[2, 1], [1, 3]]
    assert m["per_class_accuracy"] == pytest.approx([2 / 3, 3 / 4])
    assert m["auc"] == pytest.approx(roc_auc_score(labels, p1))
    assert m["auc"] == pytest.approx(11 / 12)  # 11 of the 12 (positive, negative) pairs ranked right


def test_classification_metrics_on_three_classes_and_missing_ones():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    m = classification_metrics(probabilities, np.array([0, 1, 1, 0]), 3)
    assert m["confusion"].tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert m["per_class_accuracy"][:2] == [0.5, 0.5] and np.isnan(m["per_class_accuracy"][2])  # no class-2 image
    assert m["auc"] is None  # AUC only for binary targets
    one_class = classification_metrics(np.array([[0.3, 0.7], [0.6, 0.4]]), np.array([1, 1]), 2)
    assert np.isnan(one_class["auc"])  # undefined, not an exception


def test_class_names_become_safe_unique_metric_keys():
    assert class_metric_keys(["happy", "not sure?", "a/b", "..", "a_b", "é"]) == [
        "happy",
        "not sure_",
        "a_b",
        "class_3",
        "a_b_4",
        "_",
    ]
    from mlflow.utils.validation import _validate_metric_name

    for key in class_metric_keys(["happy", "not sure?", "a/b", "..", ".", "x/../y", " ", "ü"]):
        _validate_metric_name(f"test_accuracy/{key}")


def test_confusion_csv_has_true_rows_and_predicted_columns():
    import io

    import pandas as pd

    frame = pd.read_csv(io.StringIO(confusion_csv(np.array([[2, 1], [0, 3]]), ["neg", "pos"])), index_col=0)
    assert frame.index.name == "true / predicted" and list(frame.index) == ["neg", "pos"]
    assert list(frame.columns) == ["neg", "pos"] and frame.loc["neg", "pos"] == 1 and frame.loc["pos", "pos"] == 3

"""What a model scores on a split, from its class probabilities (pure, NumPy): accuracy and loss,
per-class accuracy, ROC AUC on binary targets, the confusion matrix as CSV and as a figure.
"""

from __future__ import annotations

import math
import re

import numpy as np


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and mean cross-entropy of class probabilities against integer labels."""
    probabilities = np.asarray(probabilities, np.float64)
    picked = probabilities[np.arange(len(labels)), labels]
    return {
        "accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
        "loss": float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0)))),
    }


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """What a single accuracy hides, from class probabilities and integer labels (pure):

    - `confusion`: int64 [num_classes, num_classes], rows = true class, columns = predicted;
    - `per_class_accuracy`: accuracy on each class's images (its recall), NaN for a class with none;
    - `auc`: for two classes, ROC AUC of class 1's probability (NaN when one class is absent);
      None for more classes.

        >>> m = classification_metrics(model.predict(test_ds), labels, 2)
        >>> m["confusion"], m["per_class_accuracy"], m["auc"]
    """
    probabilities = np.asarray(probabilities, np.float64)
    labels = np.asarray(labels, np.int64)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, probabilities.argmax(axis=1)), 1)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(confusion) / support, np.nan)
    auc = None
    if num_classes == 2:
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(labels, probabilities[:, 1])) if len(np.unique(labels)) == 2 else math.nan
    return {"confusion": confusion, "per_class_accuracy": [float(a) for a in per_class], "auc": auc}


def class_metric_keys(class_names: list[str]) -> list[str]:
    """MLflow-safe metric key parts for class names, unique: characters other than letters, digits,
    `_ - . space` become `_` (a `/` too: keys like `test_accuracy/<class>` nest one level)."""
    keys: list[str] = []
    for i, name in enumerate(class_names):
        key = re.sub(r"[^A-Za-z0-9_\-. ]", "_", str(name)).strip()
        if not key.strip("."):  # "", "." and ".." are not usable path parts
            key = f"class_{i}"
        while key in keys:
            key = f"{key}_{i}"
        keys.append(key)
    return keys


def confusion_csv(confusion: np.ndarray, class_names: list[str]) -> str:
    """The confusion matrix as CSV: a row per true class, a column per predicted class."""
    import pandas as pd

    frame = pd.DataFrame(confusion, index=list(class_names), columns=list(class_names))
    return frame.to_csv(index_label="true / predicted")


def confusion_figure(confusion: np.ndarray, class_names: list[str]):
    """The confusion matrix as a heatmap with every count written in its cell."""
    from harness.plots import plt

    k = len(class_names)
    side = min(2.5 + 0.6 * k, 16)
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    ax.imshow(confusion, cmap="Blues")
    top = confusion.max() if confusion.size else 0
    for (row, col), count in np.ndenumerate(confusion):
        ax.text(
            col,
            row,
            str(count),
            ha="center",
            va="center",
            fontsize=8 if k > 10 else 10,
            color="white" if count > top / 2 else "black",
        )
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix, test split (images)")
    fig.tight_layout()
    return fig


def is_number(value) -> bool:
    """A finite float (not None, NaN or infinite): a score worth printing."""
    return value is not None and math.isfinite(value)

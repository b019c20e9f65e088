"""Figures: a trial's learning curve with the unfreeze point marked."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: sweeps run on servers without a display
import matplotlib.pyplot as plt  # noqa: E402


def learning_curve_figure(history):
    """Loss and accuracy (train and val) over the shared epoch axis; a line where phase 2 began."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    epochs = [e.epoch + 1 for e in history.epochs]
    for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [e.metrics.get(prefix + key) for e in history.epochs]
            if any(v is not None for v in values):
                ax.plot(epochs, values, style, marker="o", ms=3, label=(prefix or "train_") + key)
        for p in history.phases[1:]:
            ax.axvline(p.start_epoch + 0.5, color="grey", ls=":", lw=1)
            ax.text(p.start_epoch + 0.6, ax.get_ylim()[1], f"{p.name} starts", va="top", fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

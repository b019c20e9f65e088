"""The morning's deliverable: the winning model registered, tested once, and named in the UI.

During the search, every trial that matches or beats the best value known when it started logs
its trained model (the best epoch's weights, across both phases) to its MLflow run, so the
winner's model exists however the sweep ends. Afterwards:

1. the winner's logged model becomes a new version of the registered model named after the sweep
   (tagged with the sweep, the trial and its value);
2. that registered version is loaded in a trial process and scored once on the held-out test
   split: the model reported is the model tested;
3. the parent run's description names the winner, its value, its test score and links its run;
4. the models of the trials it overtook are deleted (`delete_overtaken_models`): only the
   winner's, and any model a registered version was made from, stay on disk.

    >>> winner = deliver_winner(cfg, study, tracker, run_task, log)
    >>> winner["test_accuracy"], winner["model_uri"]
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness import study as st
from harness.tracking import MODEL_URI_TAG, REGISTERED_TAG, Tracker, global_tracking_uri

WINNER_TAG = "harness.winner"
MODEL_DELETED_TAG = "harness.model_deleted"  # on a run whose logged model was deleted: why
# The registry alias of the sweep's winning version: `models:/<study>@champion` follows the winner
# when a resumed sweep crowns a new one, while `models:/<study>/<version>` stays fixed.
CHAMPION_ALIAS = "champion"


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and mean cross-entropy of class probabilities against integer labels."""
    probabilities = np.asarray(probabilities, np.float64)
    picked = probabilities[np.arange(len(labels)), labels]
    return {"accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
            "loss": float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))}


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
        ax.text(col, row, str(count), ha="center", va="center", fontsize=8 if k > 10 else 10,
                color="white" if count > top / 2 else "black")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix, test split (images)")
    fig.tight_layout()
    return fig


def load_logged_model(tracking_uri: str, model_uri: str):
    """A model logged by the harness, from its `models:/` URI (a logged model or a registry version)."""
    import mlflow

    import harness.model  # noqa: F401 - registers the layer that models saved by earlier versions hold

    with global_tracking_uri(tracking_uri):
        return mlflow.keras.load_model(model_uri)


@dataclass(frozen=True)
class TestTask:
    """Load a logged model in a trial process and score it on the validation and test splits."""

    context_key: str
    model_uri: str
    run_id: str
    context: Any = None

    def run(self, runner, channel) -> dict[str, float]:
        from harness.data import tf_dataset

        model = load_logged_model(runner.tracker.uri, self.model_uri)
        names = runner.dataset.class_names
        out, details = {}, {}
        for split, indices in (("val", runner.splits.val), ("test", runner.splits.test)):
            pipe = tf_dataset(runner.dataset, indices, runner.cfg.train.head.batch_size, shuffle=False)
            probabilities, labels = model.predict(pipe, verbose=0), runner.dataset.labels[indices]
            result = scores(probabilities, labels)
            out.update({f"{split}_accuracy": result["accuracy"], f"{split}_loss": result["loss"]})
            details[split] = classification_metrics(probabilities, labels, len(names))
            if _number(details[split]["auc"]):  # binary targets
                out[f"{split}_auc"] = details[split]["auc"]
        # The test split is read here once, for a model chosen on validation alone.
        test = details["test"]
        metrics = {"test_accuracy": out["test_accuracy"], "test_loss": out["test_loss"],
                   "reloaded_val_accuracy": out["val_accuracy"], **{k: out[k] for k in ("test_auc", "val_auc") if k in out}}
        metrics.update({f"test_accuracy/{key}": acc for key, acc in zip(class_metric_keys(names), test["per_class_accuracy"])
                        if _number(acc)})
        runner.tracker.log_metrics(self.run_id, metrics)
        runner.tracker.log_text(self.run_id, confusion_csv(test["confusion"], names), "confusion_matrix.csv")
        fig = confusion_figure(test["confusion"], names)
        try:
            runner.tracker.log_figure(self.run_id, fig, "confusion_matrix.png")
        finally:
            from harness.plots import plt

            plt.close(fig)
        return out


def deliver_winner(cfg, study, tracker: Tracker, run_task, log) -> dict | None:
    """Register the best trial's logged model and score it on the test split; None without a winner.

    `run_task(task)` runs a task in a trial process (harness/trials.py `TrialEngine.call`). A
    resumed sweep whose winner was already registered re-uses that version and its test score."""
    best = st.best_trial(study)
    if best is None:
        return None
    run_id = best.user_attrs.get("mlflow_run_id")
    winner = {"trial": best.number, "value": best.value, "run_id": run_id, "model_uri": None, "version": None,
              "test_accuracy": None}
    run = tracker.client.get_run(run_id)
    logged = run.data.tags.get(MODEL_URI_TAG)
    if not logged:
        log(f"best trial {best.number} has no logged model (it ran before models were logged, or its process died "
            f"while logging): nothing to register")
        return winner
    version = run.data.tags.get(REGISTERED_TAG)
    if version is None:
        version = tracker.register_model(
            logged, cfg.study.name, run_id,
            tags={"harness.sweep": cfg.study.name, "harness.trial": best.number, "harness.metric": cfg.study.metric,
                  "harness.value": f"{best.value:.6g}"},
            description=f"trial {best.number} of sweep {cfg.study.name}: {cfg.study.metric} {best.value:.4f}")
        tracker.set_tags(run_id, {REGISTERED_TAG: version})
        log(f"registered the winner (trial {best.number}) as model {cfg.study.name!r} version {version}, "
            f"alias {CHAMPION_ALIAS!r}")
    # On a resume too: a sweep killed between registering and here left a version without the alias.
    tracker.set_alias(cfg.study.name, CHAMPION_ALIAS, version)
    winner.update(model_uri=f"models:/{cfg.study.name}/{version}", version=version)
    deleted = delete_overtaken_models(tracker, study, best.number, run_id)
    if deleted:
        log(f"deleted the logged models of {len(deleted)} overtaken trial(s); the winner's and every registered one stay")
    test = run.data.metrics.get("test_accuracy")
    if test is None:
        result = run_task(TestTask(cfg.study.name, winner["model_uri"], run_id))
        test = result["test_accuracy"]
        log(f"winner on the held-out test split: accuracy {test:.4f} (registered model reloaded: "
            f"{cfg.study.metric.replace('val_', 'validation ')} {result['val_accuracy']:.4f})")
    winner["test_accuracy"] = test
    mark_former_winners(tracker, run.data.tags.get("mlflow.parentRunId"), run_id)
    tracker.set_tags(run_id, {WINNER_TAG: "true", "mlflow.runName": f"trial {best.number} (winner)"})
    return winner


def delete_overtaken_models(tracker: Tracker, study, winner_number: int, winner_run: str) -> list[str]:
    """Delete the logged models of the study's trials other than the winner; returns their runs.

    Every trial that matched the best value known when it started logged its model, so a long
    sweep leaves many; once the winner is registered only its model is used. A model that some
    registered version was made from stays (a former winner of a resumed sweep, one registered by
    hand), and so does the winner's. The run keeps its metrics and says why its model is gone."""
    deleted = []
    for trial in study.get_trials(deepcopy=False):
        run_id = trial.user_attrs.get("mlflow_run_id")
        if not run_id or run_id == winner_run:
            continue
        tags = tracker.run_tags(run_id)
        model_uri = tags.get(MODEL_URI_TAG)
        if not model_uri or tags.get(REGISTERED_TAG) or tracker.has_registered_version(run_id):
            continue
        tracker.delete_logged_model(model_uri)
        tracker.delete_tag(run_id, MODEL_URI_TAG)
        tracker.set_tags(run_id, {MODEL_DELETED_TAG: f"{model_uri}: overtaken by trial {winner_number}, the registered winner"})
        deleted.append(run_id)
    return deleted


def mark_former_winners(tracker: Tracker, parent_id: str, winner_run: str) -> None:
    """A resumed sweep can crown a new winner: the old one's run name and tag go back to normal."""
    runs = tracker.search_runs(f"tags.`{WINNER_TAG}` = 'true' and tags.`mlflow.parentRunId` = '{parent_id}'")
    for run in runs:
        if run.info.run_id != winner_run:
            number = run.data.tags.get("optuna.trial_number", "?")
            tracker.set_tags(run.info.run_id, {WINNER_TAG: "false", "mlflow.runName": f"trial {number}"})


def description(cfg, winner: dict | None, baseline: dict | None, chance: float, tracker: Tracker) -> str:
    """The parent run's description (markdown): the result a person opens the UI for."""
    metric = cfg.study.metric
    if winner is None:
        return f"Sweep **{cfg.study.name}**: no trial completed."
    lines = [f"**Winner: [trial {winner['trial']}]({tracker.run_link(winner['run_id'])})**, "
             f"best {metric} {winner['value']:.4f}"
             + (f", test accuracy {winner['test_accuracy']:.4f}" if _number(winner.get("test_accuracy")) else "") + "."]
    if winner.get("version"):
        lines.append(f"Registered model: `{winner['model_uri']}`, alias `{CHAMPION_ALIAS}` "
                     f"(`python -m harness.predict {cfg.study.name}@{CHAMPION_ALIAS} FOLDER`).")
    if baseline and baseline.get("fitted") is False:
        lines.append(f"Same architecture from scratch: **under-trained, not a result** (training accuracy "
                     f"{baseline['train_accuracy']:.4f} < 0.95; [run]({tracker.run_link(baseline['run_id'])})).")
    elif baseline:
        text = f"Same architecture from scratch: {metric} {baseline['value']:.4f}"
        if _number(baseline.get("train_accuracy")):
            text += f" (training accuracy {baseline['train_accuracy']:.4f})"
        if _number(baseline.get("test_accuracy")):
            text += f", test accuracy {baseline['test_accuracy']:.4f}"
        lines.append(text + f" ([run]({tracker.run_link(baseline['run_id'])})).")
    lines.append(f"Chance (majority class): {chance:.4f}.")
    return "\n\n".join(lines)


def _number(value) -> bool:
    return value is not None and math.isfinite(value)

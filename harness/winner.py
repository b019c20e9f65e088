"""The morning's deliverable: the winning model registered, tested once, and named in the UI.

During the search, every trial that matches or beats the best value known when it started logs
its trained model (the best epoch's weights, across both phases) to its MLflow run, so the
winner's model exists however the sweep ends. Afterwards:

1. the winner's logged model becomes a new version of the registered model named after the sweep
   (tagged with the sweep, the trial and its value);
2. that registered version is loaded in a trial process and scored once on the held-out test
   split: the model reported is the model tested;
3. the parent run's description names the winner, its value, its test score and links its run.

    >>> winner = deliver_winner(cfg, study, tracker, run_task, log)
    >>> winner["test_accuracy"], winner["model_uri"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness import study as st
from harness.tracking import MODEL_URI_TAG, REGISTERED_TAG, Tracker, global_tracking_uri

WINNER_TAG = "harness.winner"


def scores(probabilities: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy and mean cross-entropy of class probabilities against integer labels."""
    probabilities = np.asarray(probabilities, np.float64)
    picked = probabilities[np.arange(len(labels)), labels]
    return {"accuracy": float(np.mean(probabilities.argmax(axis=1) == labels)),
            "loss": float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))}


def load_logged_model(tracking_uri: str, model_uri: str):
    """A model logged by the harness, from its `models:/` URI (a logged model or a registry version)."""
    import mlflow

    import harness.model  # noqa: F401 - registers the harness's own layers for deserialisation

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
        out = {}
        for split, indices in (("val", runner.splits.val), ("test", runner.splits.test)):
            pipe = tf_dataset(runner.dataset, indices, runner.cfg.train.head.batch_size, shuffle=False)
            result = scores(model.predict(pipe, verbose=0), runner.dataset.labels[indices])
            out.update({f"{split}_accuracy": result["accuracy"], f"{split}_loss": result["loss"]})
        # The test split is read here once, for a model chosen on validation alone.
        runner.tracker.log_metrics(self.run_id, {"test_accuracy": out["test_accuracy"], "test_loss": out["test_loss"],
                                                 "reloaded_val_accuracy": out["val_accuracy"]})
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
        log(f"registered the winner (trial {best.number}) as model {cfg.study.name!r} version {version}")
    winner.update(model_uri=f"models:/{cfg.study.name}/{version}", version=version)
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
        lines.append(f"Registered model: `{winner['model_uri']}` "
                     f"(`python -m harness.predict {cfg.study.name} FOLDER`).")
    if baseline:
        text = f"Same architecture from scratch: {metric} {baseline['value']:.4f}"
        if _number(baseline.get("test_accuracy")):
            text += f", test accuracy {baseline['test_accuracy']:.4f}"
        lines.append(text + f" ([run]({tracker.run_link(baseline['run_id'])})).")
    lines.append(f"Chance (majority class): {chance:.4f}.")
    return "\n\n".join(lines)


def _number(value) -> bool:
    return value is not None and math.isfinite(value)

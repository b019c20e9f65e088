"""The morning's deliverable: the winning model registered, tested once, and named in the UI.

During the search, every trial that matches or beats the best value known when it started logs
its trained model (the best epoch's weights, across both phases) to its MLflow run, so the
winner's model exists however the sweep ends. Afterwards:

1. the winner's logged model becomes a new version of the registered model named after the sweep
   (tagged with the sweep, the trial and its value);
2. that registered version is loaded in a trial process and scored once on the held-out test
   split (harness/tasks.py `TestTask`): the model reported is the model tested;
3. the parent run's description names the winner, its value, its test score and links its run;
4. the models of the trials it overtook are deleted (`delete_overtaken_models`): only the
   winner's, and any model a registered version was made from, stay on disk.

    >>> winner = deliver_winner(cfg, study, tracker, run_task, log)
    >>> winner["test_accuracy"], winner["model_uri"]
"""

from __future__ import annotations

from typing import Any

from harness import study as st
from harness.evaluation import is_number
from harness.frameworks import framework_of
from harness.tasks import TestTask
from harness.tracking import MODEL_URI_TAG, REGISTERED_TAG, TRIAL_TAG, Tracker, run_url

WINNER_TAG = "harness.winner"
MODEL_DELETED_TAG = "harness.model_deleted"  # on a run whose logged model was deleted: why
# The registry alias of the sweep's winning version: `models:/<study>@champion` follows the winner
# when a resumed sweep crowns a new one, while `models:/<study>/<version>` stays fixed.
CHAMPION_ALIAS = "champion"


def deliver_winner(cfg, study, tracker: Tracker, run_task, log) -> dict | None:
    """Register the best trial's logged model and score it on the test split; None without a winner.

    `run_task(task)` runs a task in a trial process (harness/trials.py `TrialEngine.call`). A
    resumed sweep whose winner was already registered re-uses that version and its test score."""
    best = st.best_trial(study)
    if best is None:
        return None
    run_id = best.user_attrs.get("mlflow_run_id")
    assert run_id is not None  # a trial's run is opened before it trains (harness/trials.py `trial_job`)
    winner: dict[str, Any] = {
        "trial": best.number,
        "value": best.value,
        "run_id": run_id,
        "model_uri": None,
        "version": None,
        "test_accuracy": None,
    }
    run = tracker.get_run_record(run_id)
    logged = run.tags.get(MODEL_URI_TAG)
    if not logged:
        log(
            f"best trial {best.number} has no logged model (it ran before models were logged, or its process died "
            f"while logging): nothing to register"
        )
        return winner
    version = run.tags.get(REGISTERED_TAG)
    if version is None:
        version = _register(cfg, tracker, best, run_id, logged, log)
    # On a resume too: a sweep killed between registering and here left a version without the alias.
    tracker.set_alias(cfg.study.name, CHAMPION_ALIAS, version)
    winner.update(model_uri=f"models:/{cfg.study.name}/{version}", version=version)
    deleted = delete_overtaken_models(tracker, study, best.number, run_id)
    if deleted:
        log(f"deleted the logged models of {len(deleted)} overtaken trial(s); the winner's and every registered one stay")
    test = run.metrics.get("test_accuracy")
    if test is None:
        framework = framework_of(best.params["backbone"])
        result = run_task(TestTask(cfg.study.name, winner["model_uri"], run_id, framework))
        test = result["test_accuracy"]
        log(
            f"winner on the held-out test split: accuracy {test:.4f} (registered model reloaded: "
            f"{cfg.study.metric.replace('val_', 'validation ')} {result['val_accuracy']:.4f})"
        )
    winner["test_accuracy"] = test
    mark_former_winners(tracker, run.parent_id, run_id)
    tracker.set_tags(run_id, {WINNER_TAG: "true", "mlflow.runName": f"trial {best.number} (winner)"})
    return winner


def _register(cfg, tracker: Tracker, best, run_id: str, model_uri: str, log) -> str:
    """Register the best trial's logged model as a new version of the model named after the sweep;
    returns the version, also kept on the trial's run."""
    version = tracker.register_model(
        model_uri,
        cfg.study.name,
        run_id,
        tags={
            "harness.sweep": cfg.study.name,
            "harness.trial": best.number,
            "harness.metric": cfg.study.metric,
            "harness.value": f"{best.value:.6g}",
        },
        description=f"trial {best.number} of sweep {cfg.study.name}: {cfg.study.metric} {best.value:.4f}",
    )
    tracker.set_tags(run_id, {REGISTERED_TAG: version})
    log(f"registered the winner (trial {best.number}) as model {cfg.study.name!r} version {version}, alias {CHAMPION_ALIAS!r}")
    return version


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


def mark_former_winners(tracker: Tracker, parent_id: str | None, winner_run: str) -> None:
    """A resumed sweep can crown a new winner: the old one's run name and tag go back to normal."""
    if parent_id is None:  # a run outside the sweep's tree has no former winners beside it
        return
    for run in tracker.find_runs(parent=parent_id, tags={WINNER_TAG: "true"}):
        if run.run_id != winner_run:
            number = run.tags.get(TRIAL_TAG, "?")
            tracker.set_tags(run.run_id, {WINNER_TAG: "false", "mlflow.runName": f"trial {number}"})


def description(cfg, winner: dict | None, baseline: dict | None, chance: float, tracker: Tracker) -> str:
    """The parent run's description (markdown): the result a person opens the UI for."""
    metric = cfg.study.metric
    if winner is None:
        return f"Sweep **{cfg.study.name}**: no trial completed."

    def link(run_id: str) -> str | None:  # relative: it works from any page of the MLflow UI
        return run_url(run_id, tracker.experiment_id, ui_url="")

    lines = [
        f"**Winner: [trial {winner['trial']}]({link(winner['run_id'])})**, "
        f"best {metric} {winner['value']:.4f}"
        + (f", test accuracy {winner['test_accuracy']:.4f}" if is_number(winner.get("test_accuracy")) else "")
        + "."
    ]
    if winner.get("version"):
        lines.append(
            f"Registered model: `{winner['model_uri']}`, alias `{CHAMPION_ALIAS}` "
            f"(`python -m harness.predict {cfg.study.name}@{CHAMPION_ALIAS} FOLDER`)."
        )
    if baseline and baseline.get("fitted") is False:
        lines.append(
            f"Same architecture from scratch: **under-trained, not a result** (training accuracy "
            f"{baseline['train_accuracy']:.4f} < 0.95; [run]({link(baseline['run_id'])}))."
        )
    elif baseline:
        text = f"Same architecture from scratch: {metric} {baseline['value']:.4f}"
        if is_number(baseline.get("train_accuracy")):
            text += f" (training accuracy {baseline['train_accuracy']:.4f})"
        if is_number(baseline.get("test_accuracy")):
            text += f", test accuracy {baseline['test_accuracy']:.4f}"
        lines.append(text + f" ([run]({link(baseline['run_id'])})).")
    lines.append(f"Chance (majority class): {chance:.4f}.")
    return "\n\n".join(lines)

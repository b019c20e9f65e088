"""The winner's delivery: registration, and the models of overtaken trials deleted from the store."""

from __future__ import annotations

import optuna
import pytest


def test_once_the_winner_is_registered_the_models_of_overtaken_trials_are_deleted(tmp_path):
    """Every trial that matched the best so far logged a model; after registration only the
    winner's, and one registered by hand, remain: the others' files are gone from the store."""
    from pathlib import Path

    import keras
    from mlflow.exceptions import MlflowException

    from harness.config import parse_config
    from harness.tracking import MODEL_URI_TAG, Tracker, load_keras_model
    from harness.winner import MODEL_DELETED_TAG, deliver_winner

    cfg = parse_config("study: {name: caps}\ndata: {name: shapes}\nsearch: {backbone: MobileNetV2, head_lr: 0.01}\n", "c.yaml")
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "caps", str(tmp_path / "artifacts"))
    tracker.start_study_run("caps", cfg.to_dict(), "sqlite://")
    study = optuna.create_study(direction="maximize")
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2, activation="softmax")])
    runs, uris = {}, {}
    for number, (value, leads) in enumerate([(0.5, True), (0.7, True), (0.7, True), (0.3, False), (0.9, True)]):
        trial = study.ask()
        runs[number] = tracker.start_child(f"trial {number}", "trial", {"optuna.trial_number": number})
        trial.set_user_attr("mlflow_run_id", runs[number])
        if leads:  # it matched or beat the best so far when it ran
            uris[number] = tracker.log_keras_model(runs[number], model, ["a", "b"], 8)
        study.tell(trial, value)
    tracker.register_model(uris[0], "kept-by-hand", runs[0], tags={})  # someone registered trial 0's model
    tracker.log_metrics(runs[4], {"test_accuracy": 0.8})  # scored before: no test task needed here

    def model_dir(uri):
        return Path(tracker.client.get_logged_model(uri.removeprefix("models:/")).artifact_location.removeprefix("file://"))

    dirs = {n: model_dir(u) for n, u in uris.items()}
    assert all(any(d.iterdir()) for d in dirs.values())
    messages = []
    winner = deliver_winner(cfg, study, tracker, run_task=None, log=messages.append)
    assert winner["trial"] == 4 and str(winner["version"]) == "1"
    for number in (1, 2):  # overtaken: files gone, the run says why, nothing points at the model
        assert not dirs[number].exists() or not any(dirs[number].rglob("*"))
        tags = tracker.run_tags(runs[number])
        assert MODEL_URI_TAG not in tags and "overtaken by trial 4" in tags[MODEL_DELETED_TAG]
        with pytest.raises(MlflowException, match="not found"):  # deleted in the store too
            tracker.client.get_logged_model(uris[number].removeprefix("models:/"))
    for number in (0, 4):  # registered, by hand or as the winner: kept and loadable
        assert any(dirs[number].rglob("*.keras")) and MODEL_URI_TAG in tracker.run_tags(runs[number])
    assert load_keras_model("models:/caps/1", tracker.uri).output_shape == (None, 2)
    assert load_keras_model(uris[0], tracker.uri).output_shape == (None, 2)
    assert any("overtaken" in m for m in messages)
    # A resumed sweep delivers the same winner again: nothing more to delete, nothing breaks.
    assert str(deliver_winner(cfg, study, tracker, run_task=None, log=messages.append)["version"]) == "1"

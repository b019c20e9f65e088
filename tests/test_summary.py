"""The sweep's own summary: Optuna's trials table with each trial's MLflow run id."""

from __future__ import annotations

import optuna
import pandas as pd

from harness import summary


def _study_with_trials() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")

    def objective(trial):
        trial.set_user_attr("mlflow_run_id", f"t{trial.number}")
        return trial.suggest_float("head_lr", 1e-3, 1e-2, log=True)

    study.optimize(objective, n_trials=2)
    return study


def test_summary_table_is_optunas_trials_dataframe_with_the_run_id():
    study = _study_with_trials()
    frame = summary.trials_frame(study)
    expected = study.trials_dataframe(
        attrs=("number", "value", "datetime_start", "datetime_complete", "duration", "params", "user_attrs", "state")
    )
    assert list(frame["mlflow_run_id"]) == ["t0", "t1"]
    pd.testing.assert_frame_equal(frame.drop(columns=["mlflow_run_id"]), expected.drop(columns=["user_attrs_mlflow_run_id"]))
    empty = summary.trials_frame(optuna.create_study())
    assert {"number", "value", "state", "mlflow_run_id"} <= set(empty.columns) and empty.empty


def test_the_summary_table_keeps_its_value_column_when_the_study_names_its_metric():
    study = _study_with_trials()
    before = summary.trials_frame(study)
    study.set_metric_names(["val_accuracy"])  # Optuna's own table then says value_val_accuracy
    assert "value_val_accuracy" in study.trials_dataframe().columns
    pd.testing.assert_frame_equal(summary.trials_frame(study), before)

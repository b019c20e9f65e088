"""harness.importance on real in-memory Optuna studies with synthetic objectives (no training)."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import optuna
import pandas as pd
import pytest

from harness import importance

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _study(n_trials: int, params=("finetune_lr", "dropout", "backbone"), seed: int = 0) -> optuna.Study:
    """finetune_lr decides the score (a peak at 1e-3); dropout and the backbone barely move it."""
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=seed))

    def objective(trial):
        value = 0.5
        if "finetune_lr" in params:
            lr = trial.suggest_float("finetune_lr", 1e-5, 1e-1, log=True)
            value += 0.4 - 0.1 * abs(__import__("math").log10(lr) + 3)
        if "dropout" in params:
            value += 1e-4 * trial.suggest_float("dropout", 0.0, 0.5)
        if "backbone" in params:
            value += 1e-4 * (trial.suggest_categorical("backbone", ["MobileNetV2", "EfficientNetB0", "ResNet50"]) == "ResNet50")
        return value

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study.optimize(objective, n_trials=n_trials)
    return study


def test_the_parameter_that_decides_the_score_ranks_first_and_the_result_is_reproducible():
    study = _study(40)
    found = importance.param_importances(study)
    assert next(iter(found)) == "finetune_lr" and found["finetune_lr"] > 0.8
    assert set(found) == {"finetune_lr", "dropout", "backbone"}  # the categorical one is assessed too
    assert sum(found.values()) == pytest.approx(1.0)
    assert importance.param_importances(study) == found  # seeded: the same study, the same numbers


def test_importances_round_trip_through_the_table_and_the_metrics():
    found = importance.param_importances(_study(20))
    frame = importance.importance_frame(found)
    assert list(frame.columns) == ["rank", "param", "importance"] and list(frame["rank"]) == [1, 2, 3]
    assert list(frame.param) == list(found)
    metrics = importance.importance_metrics(found)
    assert set(metrics) == {f"importance/{p}" for p in found}
    assert importance.importances_from_metrics({**metrics, "best_val_accuracy": 0.9}) == found


def test_plots_are_non_empty_pngs_and_the_figures_are_closed(tmp_path):
    study = _study(12)
    open_before = len(plt.get_fignums())
    paths = importance.plot_study(study, tmp_path, metric="val_accuracy")
    assert sorted(p.name for p in paths) == sorted(
        f"{n}.png" for n in ("optimization_history", "slice", "parallel_coordinate", "contour", "param_importances")
    )
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
    assert len(plt.get_fignums()) == open_before


def test_the_contour_shows_the_two_most_important_parameters():
    study = _study(30)
    plan = importance.plot_plan(study, {"dropout": 0.6, "backbone": 0.3, "finetune_lr": 0.1})
    assert plan["contour"] == (None, ["dropout", "backbone"])


@pytest.mark.parametrize("n_trials", [0, 1])
def test_too_few_trials_skip_with_one_line_and_no_error(tmp_path, n_trials):
    study = _study(n_trials)
    lines = []
    assert importance.param_importances(study) == {}
    assert "need 2" in importance.skip_reason(study)
    paths = importance.plot_study(study, tmp_path, log=lines.append)
    assert len(lines) == 1 and lines[0].startswith("plots skipped:") and "contour" in lines[0]
    assert [p.name for p in paths] == (["optimization_history.png"] if n_trials else [])


def test_a_single_parameter_has_all_the_importance_and_no_contour(tmp_path):
    study = _study(6, params=("finetune_lr",))
    assert importance.param_importances(study) == {"finetune_lr": pytest.approx(1.0)}
    lines = []
    names = {p.name for p in importance.plot_study(study, tmp_path, log=lines.append)}
    assert "contour.png" not in names and {"slice.png", "optimization_history.png"} <= names
    assert lines == ["plots skipped: contour (needs 2 searched parameters that varied, found 1)"]


def test_a_parameter_that_never_varied_is_left_out():
    study = optuna.create_study(direction="maximize")
    for lr, value in ((1e-3, 0.9), (1e-2, 0.5), (1e-4, 0.6)):
        study.enqueue_trial({"finetune_lr": lr, "backbone": "MobileNetV2"})
        study.optimize(
            lambda t, v=value: (
                v
                + 0 * t.suggest_float("finetune_lr", 1e-5, 1e-1, log=True)
                + 0 * len(t.suggest_categorical("backbone", ["MobileNetV2", "ResNet50"]))
            ),
            n_trials=1,
        )
    assert importance.varying_params(importance.complete_trials(study)) == ["finetune_lr"]
    assert list(importance.param_importances(study)) == ["finetune_lr"]


def test_when_every_trial_scored_the_same_no_parameter_mattered(tmp_path):
    """Not an equal share each (Optuna's normalisation of zero variance): nothing explained anything."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: 0.5 + 0 * t.suggest_float("x", 0, 1) + 0 * t.suggest_int("units", 0, 64), n_trials=4)
    assert importance.param_importances(study) == {"x": 0.0, "units": 0.0}
    result = importance.log_what_mattered(study, RecordingTracker(), tmp_path, "val_accuracy", lambda line: None)
    assert list(pd.read_csv(tmp_path / importance.IMPORTANCE_FILE)["rank"]) == [1, 1]  # a tie
    assert (
        importance.summary_lines(result)[0]
        == "what mattered: no parameter moved the score (all 4 complete trials scored the same)"
    )
    assert "param_importances.png" not in {p.name for p in result["plots"]} and "contour.png" in {p.name for p in result["plots"]}
    assert "all 0: every complete trial scored the same" in importance.importance_markdown(result["importances"])


class RecordingTracker:
    parent_run_id, uri, experiment_id = "parent", "sqlite:///nowhere.db", "1"

    def __init__(self, fail_on_metrics: bool = False):
        self.metrics, self.files, self.fail_on_metrics = {}, [], fail_on_metrics

    def log_metrics(self, run_id, metrics, step=0):
        if self.fail_on_metrics:
            raise ConnectionError("tracking server went away")
        self.metrics.update(metrics)

    def log_file(self, run_id, path, artifact_path=None):
        self.files.append((run_id, artifact_path, Path(path).name))


def test_the_end_of_a_sweep_logs_table_metrics_and_plots_on_the_parent_run(tmp_path):
    study, tracker, lines = _study(15), RecordingTracker(), []
    result = importance.log_what_mattered(study, tracker, tmp_path, "val_accuracy", lines.append)
    assert lines == []
    assert next(iter(result["importances"])) == "finetune_lr"
    assert tracker.metrics == importance.importance_metrics(result["importances"])
    assert ("parent", None, "param_importances.csv") in tracker.files
    assert {name for _, where, name in tracker.files if where == "plots"} >= {"contour.png", "slice.png"}
    table = pd.read_csv(tmp_path / importance.IMPORTANCE_FILE)
    assert table.param.iloc[0] == "finetune_lr"
    text = "\n".join(importance.summary_lines(result))
    assert "what mattered (fANOVA over 15 complete trials" in text and "finetune_lr" in text and "contour" in text

    from types import SimpleNamespace

    import numpy as np

    from harness.summary import summarize

    cfg = SimpleNamespace(study=SimpleNamespace(name="tiny", direction="maximize", metric="val_accuracy"))
    shown = summarize(cfg, study, np.array([0, 1, 1]), None, tracker, results_dir=str(tmp_path), what_mattered=result)
    assert text in shown["text"]


def test_a_failure_is_logged_and_never_raised(tmp_path):
    lines = []
    result = importance.log_what_mattered(
        _study(5), RecordingTracker(fail_on_metrics=True), tmp_path, "val_accuracy", lines.append
    )
    assert [line for line in lines if "ConnectionError" in line] == [
        "parameter importances failed: ConnectionError: tracking server went away"
    ]
    assert result["plots"], "the plots are still drawn"
    assert (tmp_path / importance.IMPORTANCE_FILE).exists()  # the local table stands
    assert "what mattered (fANOVA over 5 complete trials" in importance.summary_lines(result)[0]

    empty = importance.log_what_mattered(optuna.create_study(), RecordingTracker(), tmp_path / "e", "val_accuracy", lines.append)
    assert empty["importances"] == {} and empty["plots"] == []
    assert importance.summary_lines(empty) == ["what mattered: not computed (0 complete trial(s), need 2)"]

"""End-of-sweep summary: Optuna's per-trial table (CSV), best vs from-scratch vs chance, UI command.

The table is written to results/<study>/optuna_trials.csv (OPTUNA_TRIALS_FILE): Optuna's own
`study.trials_dataframe()` columns, plus mlflow_run_id. It has its own file name because
`python -m harness.report` writes a different table, built from the MLflow runs, to trials.csv.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd

from harness.importance import summary_lines
from harness.screening import log_agreement
from harness.tracking import Tracker, ui_command

OPTUNA_TRIALS_FILE = "optuna_trials.csv"
# Optuna's columns, less system_attrs (internal bookkeeping such as queued params, as Python dict reprs).
_ATTRS = ("number", "value", "datetime_start", "datetime_complete", "duration", "params", "user_attrs", "state")


def trials_frame(study) -> pd.DataFrame:
    """One row per trial, Optuna's `trials_dataframe()`: number, value, datetime_start,
    datetime_complete, duration, params_<name>, user_attrs_<name> (e.g. user_attrs_fail_reason),
    state; the trial's MLflow run is the column mlflow_run_id (blank before its run exists)."""
    frame = study.trials_dataframe(attrs=_ATTRS)
    # A study that names its metric gets the column value_<metric>: the table keeps Optuna's plain name.
    frame = frame.rename(columns={f"value_{name}": "value" for name in study.metric_names or []})
    if frame.empty:
        frame = pd.DataFrame(columns=["number", "value", "state"])
    frame = frame.rename(columns={"user_attrs_mlflow_run_id": "mlflow_run_id"})
    if "mlflow_run_id" not in frame.columns:
        frame["mlflow_run_id"] = None
    return frame


def chance_level(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class."""
    counts = np.bincount(labels)
    return float(counts.max() / counts.sum())


def _shown(frame: pd.DataFrame, ascending: bool) -> pd.DataFrame:
    """The printed top of the table: number, state, value, params (prefix dropped), duration in s."""
    shown = frame.sort_values("value", ascending=ascending, na_position="last")
    params = [c for c in shown.columns if c.startswith("params_")]
    out = shown[["number", "state", "value", *params]].rename(columns={p: p.removeprefix("params_") for p in params})
    if "duration" in shown.columns:
        out["duration_s"] = pd.to_timedelta(shown["duration"]).dt.total_seconds().round(1)
    return out


def baseline_line(metric: str, baseline: dict) -> str:
    """The from-scratch baseline in one line: its score, or that it is no result (under-trained)."""
    fit = baseline.get("train_accuracy")
    fit_text = f", training accuracy {fit:.4f}" if fit is not None else ""
    if baseline.get("fitted") is False:
        return (
            f"same architecture from scratch: UNDER-TRAINED, not a result (training accuracy {fit:.4f} < 0.95 on "
            f"its own training images; {metric} {baseline['value']:.4f}): raise baseline.min_steps or set "
            f"baseline.learning_rate"
        )
    return f"same architecture from scratch: {metric} {baseline['value']:.4f}{fit_text}"


def summarize(
    cfg,
    study,
    val_labels: np.ndarray,
    baseline: dict | None,
    tracker: Tracker,
    results_dir: str = "results",
    what_mattered: dict | None = None,
    screening: dict | None = None,
) -> dict:
    """`what_mattered`: harness/importance.py `log_what_mattered`'s result, shown as its lines.
    `screening`: harness/screening.py's record; each score's Kendall tau against the best value
    each backbone reached is logged and shown beside the size-only ranking's."""
    frame = trials_frame(study)
    out_dir = Path(results_dir) / cfg.study.name
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / OPTUNA_TRIALS_FILE
    frame.to_csv(path, index=False)
    parent = cast(str, tracker.parent_run_id)  # open while the sweep is summarized (a test's stand-in may hold None)
    tracker.log_file(parent, path)

    best = study.best_trial if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)) else None
    chance = chance_level(val_labels)
    numbers = {
        "best_value": best.value if best else None,
        "chance": chance,
        "scratch_value": baseline["value"] if baseline else None,
    }
    # Named after the metric, so the runs table sorts parents and trials by the same column.
    logged = {
        f"best_{cfg.study.metric}": numbers["best_value"],
        "chance": chance,
        f"scratch_{cfg.study.metric}": numbers["scratch_value"],
    }
    tracker.log_metrics(parent, {k: v for k, v in logged.items() if v is not None})

    shown = _shown(frame, ascending=cfg.study.direction == "minimize")
    lines = [
        "",
        f"study {cfg.study.name}: {len(frame)} trial(s)",
        shown.head(10).to_string(index=False, float_format=lambda v: f"{v:.4g}"),
        "",
    ]
    if best:
        lines.append(f"best trial {best.number}: {cfg.study.metric} {best.value:.4f}")
    if baseline:
        lines.append(baseline_line(cfg.study.metric, baseline))
    lines.append(f"chance (majority class of the val split): {chance:.4f}")
    lines.extend(summary_lines(what_mattered))
    lines.extend(log_agreement(screening, study, tracker, cfg.study.direction))
    lines.append(f"per-trial table (Optuna): {path}")
    lines.append(f"per-trial table from MLflow, comparison tables: python -m harness.report {cfg.study.name}")
    lines.append(f"open the MLflow UI: {ui_command(tracker.uri, tracker.experiment_id)}")
    return {**numbers, "text": "\n".join(lines), "frame": frame}

"""End-of-sweep summary: the per-trial table (CSV), best vs from-scratch vs chance, UI command."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.tracking import Tracker, ui_command


def trials_frame(study) -> pd.DataFrame:
    """One row per trial: number, state, value, params, duration, MLflow run id, fail reason."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        rows.append({
            "trial": t.number, "state": t.state.name, "value": t.value, **t.params,
            "duration_s": round(duration, 1) if duration is not None else None,
            "mlflow_run_id": t.user_attrs.get("mlflow_run_id"), "fail_reason": t.user_attrs.get("fail_reason"),
        })
    return pd.DataFrame(rows)


def chance_level(labels: np.ndarray) -> float:
    """Accuracy of always predicting the most frequent class."""
    counts = np.bincount(labels)
    return float(counts.max() / counts.sum())


def summarize(cfg, study, val_labels: np.ndarray, baseline: dict | None, tracker: Tracker, results_dir: str = "results") -> dict:
    frame = trials_frame(study)
    out_dir = Path(results_dir) / cfg.study.name
    out_dir.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out_dir / "trials.csv", index=False)
    tracker.log_file(tracker.parent_run_id, out_dir / "trials.csv")

    best = study.best_trial if any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)) else None
    chance = chance_level(val_labels)
    numbers = {"best_value": best.value if best else None, "chance": chance,
               "scratch_value": baseline["value"] if baseline else None}
    tracker.log_metrics(tracker.parent_run_id, {k: v for k, v in numbers.items() if v is not None})

    shown = frame.sort_values("value", ascending=cfg.study.direction == "minimize", na_position="last")
    cols = [c for c in shown.columns if c not in ("mlflow_run_id", "fail_reason")]
    lines = ["", f"study {cfg.study.name}: {len(frame)} trial(s)", shown[cols].head(10).to_string(index=False, float_format=lambda v: f"{v:.4g}"), ""]
    if best:
        lines.append(f"best trial {best.number}: {cfg.study.metric} {best.value:.4f}")
    if baseline:
        lines.append(f"same architecture from scratch: {cfg.study.metric} {baseline['value']:.4f}")
    lines.append(f"chance (majority class of the val split): {chance:.4f}")
    lines.append(f"per-trial table: {out_dir / 'trials.csv'}")
    lines.append(f"open the MLflow UI: {ui_command(tracker.uri)}")
    return {**numbers, "text": "\n".join(lines), "frame": frame}

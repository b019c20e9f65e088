"""`python -m harness.report [SWEEP or CONFIG]`: comparison tables from the MLflow records.

Reads the sweep's runs (never retrains anything) and writes to results/<sweep>/:
comparison.csv/.md/.tex/.html, heatmap.png, trials.csv (one row per trial) and logme.csv, then
logs the same files as artifacts of the sweep's parent run under report/.
A plain (non-quadrant) sweep gets its per-trial table only.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from harness.tracking import PARENT_TAG, ROLE, Tracker, resolve_tracking_uri

RESULTS = "results"


def _runs(tracker: Tracker, role: str) -> list:
    return tracker.search_runs(f"tags.`{ROLE}` = '{role}'")


def _seconds(run) -> float | None:
    if run.info.end_time and run.info.start_time:
        return round((run.info.end_time - run.info.start_time) / 1000, 1)
    return None


def trials_table(tracker: Tracker, cell_runs: list) -> pd.DataFrame:
    """One row per trial: cell, number, state, params, per-phase val metrics, duration, run id."""
    cells = {r.info.run_id: r.data.tags for r in cell_runs}
    rows = []
    for run in _runs(tracker, "trial"):
        tags = cells.get(run.data.tags.get(PARENT_TAG), run.data.tags)
        m = run.data.metrics
        rows.append({
            "target": tags.get("target", run.data.tags.get("dataset")), "strategy": tags.get("strategy", ""),
            "trial": int(run.data.tags.get("optuna.trial_number", -1)), "state": run.data.tags.get("optuna.state"),
            "objective": m.get("objective"), "head_best_val_accuracy": m.get("head/best_val_accuracy"),
            "finetune_best_val_accuracy": m.get("finetune/best_val_accuracy"),
            "scratch_best_val_accuracy": m.get("scratch/best_val_accuracy"),
            **{f"param_{k}": v for k, v in sorted(run.data.params.items()) if k not in ("strategy",)},
            "duration_s": _seconds(run), "status": run.info.status, "mlflow_run_id": run.info.run_id,
        })
    frame = pd.DataFrame(rows)
    return frame.sort_values(["target", "strategy", "trial"]).reset_index(drop=True) if len(frame) else frame


def cells_table(tracker: Tracker, cell_runs: list, logme: pd.DataFrame) -> pd.DataFrame:
    """One row per (quadrant, strategy) cell: search's best val, confirmation test mean and std."""
    confirms = _runs(tracker, "confirm")
    rows = []
    for cell in cell_runs:
        tags = cell.data.tags
        mine = [c for c in confirms if c.data.tags.get(PARENT_TAG) == cell.info.run_id and c.info.status == "FINISHED"]
        tests = [c.data.metrics["test_accuracy"] for c in mine if "test_accuracy" in c.data.metrics]
        backbone = mine[0].data.params.get("backbone") if mine else None
        score = logme.loc[(logme.target == tags["target"]) & (logme.backbone == backbone), "logme"] if len(logme) else []
        rows.append({
            "quadrant": tags["quadrant"], "size": tags["size"], "similarity": tags["similarity"], "target": tags["target"],
            "strategy": tags["strategy"], "best_val": cell.data.metrics.get("best_val", np.nan),
            "test_mean": float(np.mean(tests)) if tests else np.nan,
            "test_std": float(np.std(tests, ddof=1)) if len(tests) > 1 else np.nan,
            "n_seeds": len(tests), "logme": float(score.iloc[0]) if len(score) else np.nan,
        })
    return pd.DataFrame(rows)


def logme_table(tracker: Tracker, trials: pd.DataFrame) -> pd.DataFrame:
    """LogME per (target, backbone) beside the best accuracy that backbone reached on that target,
    with the rank correlation across backbones: would the cheap score have picked the right one?"""
    rows = [{"target": r.data.tags["target"], "backbone": r.data.tags["backbone"], "logme": r.data.metrics.get("logme")}
            for r in _runs(tracker, "logme")]
    frame = pd.DataFrame(rows, columns=["target", "backbone", "logme"])
    if not len(frame):
        return frame
    transfer = trials[(trials.strategy != "scratch") & trials.state.isin(["COMPLETE", "PRUNED"])] if len(trials) else trials
    best = transfer.groupby(["target", "param_backbone"])["objective"].max() if len(transfer) else pd.Series(dtype=float)
    frame["best_val_accuracy"] = [best.get((t, b), np.nan) for t, b in zip(frame.target, frame.backbone)]
    spearman, picked = {}, {}
    for target, group in frame.groupby("target"):
        g = group.dropna()
        if len(g) >= 2:
            spearman[target] = g["logme"].rank().corr(g["best_val_accuracy"].rank())
            picked[target] = bool(g.loc[g.logme.idxmax(), "backbone"] == g.loc[g.best_val_accuracy.idxmax(), "backbone"])
    frame["spearman_across_backbones"] = frame.target.map(spearman)
    frame["logme_picked_best_backbone"] = frame.target.map(picked)
    return frame


def build_report(sweep: str, tracker: Tracker, out_dir: str | Path | None = None, log=print) -> dict[str, Path]:
    from harness.export import write_comparison

    out = Path(out_dir or Path(RESULTS) / sweep)
    out.mkdir(parents=True, exist_ok=True)
    parents = tracker.study_runs(sweep)
    if not parents:
        raise SystemExit(f"error: no sweep named {sweep!r} in {tracker.uri}")
    tracker.parent_run_id = parents[0].info.run_id
    cell_runs = _runs(tracker, "cell")
    trials = trials_table(tracker, cell_runs)
    if not cell_runs:
        path = out / "trials.csv"
        trials.to_csv(path, index=False)
        (out / "trials.md").write_text(trials.to_string(index=False) + "\n")
        paths = {"trials": path, "trials_md": out / "trials.md"}
    else:
        logme = logme_table(tracker, trials)
        cells = cells_table(tracker, cell_runs, logme)
        paths = write_comparison(cells, out, title=f"Transfer strategies by quadrant: {sweep}",
                                 extra_tables={"trials": trials, "logme": logme})
    for path in paths.values():
        tracker.log_file(tracker.parent_run_id, path, "report")
    for kind, path in sorted(paths.items()):
        log(f"  {kind:>8}: {path}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", default="demo", help="sweep (study) name, or the sweep's YAML config")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: config, $MLFLOW_TRACKING_URI, results/mlflow.db)")
    parser.add_argument("--out", help="output folder (default results/<sweep>/)")
    args = parser.parse_args(argv)
    uri, name, experiment = args.tracking_uri, args.sweep, args.sweep
    if args.sweep.endswith((".yaml", ".yml")):
        from harness.config import ConfigError, load_config

        try:
            cfg = load_config(args.sweep)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        name, experiment = cfg.study.name, cfg.tracking.experiment or cfg.study.name
        uri = uri or cfg.tracking.uri
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    uri = resolve_tracking_uri(uri)
    if not Tracker.experiment_exists(uri, experiment):
        print(f"error: no MLflow experiment {experiment!r} at {uri}; run the sweep first", file=sys.stderr)
        return 2
    tracker = Tracker(uri, experiment)
    print(f"report of sweep {name!r} from {uri}:")
    build_report(name, tracker, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m harness.report [SWEEP or CONFIG] [--ui-url URL]`: comparison tables from the MLflow records.

Reads the sweep's runs (never retrains anything) and writes to results/<sweep>/:
comparison.csv/.md/.tex/.html, heatmap.png, trials.csv (one row per trial, from MLflow) and
logme.csv, then logs the same files as artifacts of the sweep's parent run under report/.
A plain (non-quadrant) sweep gets its per-trial table (trials.csv and trials.md), and in trials.md
what mattered: the parameter importances the sweep logged on its parent run.

trials.csv has one schema, `trials_table`'s, whoever writes it: the end-of-sweep summary writes
Optuna's own table to a different file, optuna_trials.csv (harness/summary.py).
Markdown and HTML cells link to their runs in the MLflow UI at --ui-url (default: the tracking
server when the tracking URI is http(s), else http://127.0.0.1:5000, where `mlflow ui` listens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness import stats
from harness.export import markdown_table, write_comparison
from harness.importance import importance_markdown, importances_from_metrics
from harness.redaction import redact
from harness.screening import screening_markdown
from harness.tracking import DEFAULT_UI_URL, RunRecord, Tracker, resolve_tracking_uri

RESULTS = "results"
TRIALS_FILE = "trials.csv"  # trials_table's schema only (see the module docstring)
# Training phases whose `<phase>/epochs` and `<phase>/seconds` metrics add up to a run's cost.
PHASES = ("head", "finetune", "scratch")


def _runs(tracker: Tracker, role: str) -> list[RunRecord]:
    return tracker.find_runs(role=role)


def _seconds(run: RunRecord) -> float | None:
    if run.end_time and run.start_time:
        return round((run.end_time - run.start_time) / 1000, 1)
    return None


def _param_value(text: str):
    """An MLflow param (always a string) back as the number or text it was logged from."""
    for kind in (int, float):
        try:
            return kind(text)
        except (TypeError, ValueError):
            pass
    return text


def trials_table(tracker: Tracker, cell_runs: list[RunRecord]) -> pd.DataFrame:
    """One row per trial: cell, number, state, params, per-phase val metrics, duration, run id."""
    # Looked up by parent id, which is None for a top-level run (that finds no cell).
    cells: dict[str | None, dict[str, str]] = {r.run_id: r.tags for r in cell_runs}
    rows = []
    for run in _runs(tracker, "trial"):
        tags = cells.get(run.parent_id, run.tags)
        m = run.metrics
        rows.append(
            {
                "target": tags.get("target", run.tags.get("dataset")),
                "strategy": tags.get("strategy", ""),
                "trial": int(run.tags.get("optuna.trial_number", -1)),
                "state": run.tags.get("optuna.state"),
                "objective": m.get("objective"),
                "head_best_val_accuracy": m.get("head/best_val_accuracy"),
                "finetune_best_val_accuracy": m.get("finetune/best_val_accuracy"),
                "scratch_best_val_accuracy": m.get("scratch/best_val_accuracy"),
                **{f"param_{k}": _param_value(v) for k, v in sorted(run.params.items()) if k not in ("strategy",)},
                "duration_s": _seconds(run),
                "status": run.status,
                "mlflow_run_id": run.run_id,
            }
        )
    frame = pd.DataFrame(rows)
    return frame.sort_values(["target", "strategy", "trial"]).reset_index(drop=True) if len(frame) else frame


def _cost(runs: list[RunRecord], what: str) -> float:
    """Mean over `runs` of the run's total `<phase>/<what>` over PHASES; NaN when no run logged any."""
    totals = [
        sum(r.metrics[f"{p}/{what}"] for p in PHASES if f"{p}/{what}" in r.metrics)
        for r in runs
        if any(f"{p}/{what}" in r.metrics for p in PHASES)
    ]
    return float(np.mean(totals)) if totals else np.nan


def _mean_metric(runs: list[RunRecord], key: str, fallback: float) -> float:
    """Mean of a metric over the runs that logged it; `fallback` when none did (older runs)."""
    values = [r.metrics[key] for r in runs if key in r.metrics]
    return float(np.mean(values)) if values else fallback


def _seed(run: RunRecord) -> int:
    try:
        return int(run.tags.get("harness.seed", ""))
    except ValueError:
        return 1 << 30  # an untagged seed sorts last


def _best_seed_run(runs: list[RunRecord], direction: str) -> RunRecord | None:
    """The seed run with the best validation score (best_val), first seed on ties: chosen on
    validation like the model the sweep registers, never on the test score. None without one."""
    scored = [r for r in runs if "best_val" in r.metrics]
    if not scored:
        return None
    sign = -1.0 if direction == "minimize" else 1.0
    return max(scored, key=lambda r: sign * r.metrics["best_val"])


def cells_table(tracker: Tracker, cell_runs: list[RunRecord], logme: pd.DataFrame, direction: str = "maximize") -> pd.DataFrame:
    """One row per (quadrant, strategy) cell, in harness.export's input schema: the search's best
    val; the finished confirmation seeds' test accuracies (test_accuracies, in seed order) with
    their mean, std and count; the mean training cost per seed (train_epochs, train_seconds: blank
    when the runs logged none); the cell's MLflow run and its best seed's run (best validation
    score in the study's `direction`); the confirmed configuration as param_<name> columns; and
    LogME of the cell's backbone on its target."""
    confirms = _runs(tracker, "confirm")
    rows = []
    for cell in cell_runs:
        tags = cell.tags
        mine = sorted(
            (c for c in confirms if c.parent_id == cell.run_id and c.status == "FINISHED" and "test_accuracy" in c.metrics),
            key=_seed,
        )
        tests = [c.metrics["test_accuracy"] for c in mine]
        summary = stats.describe(tests)
        best = _best_seed_run(mine, direction)
        logged = mine[0].params if mine else {}  # every seed trains the same configuration
        params = {k: _param_value(v) for k, v in sorted(logged.items()) if k not in ("seed", "strategy")}
        backbone = params.get("backbone")
        # The cell's backbone's LogME scores (a Series), or [] when no LogME run was logged.
        score: Any = logme.loc[(logme.target == tags["target"]) & (logme.backbone == backbone), "logme"] if len(logme) else []
        rows.append(
            {
                "quadrant": tags["quadrant"],
                "size": tags["size"],
                "similarity": tags["similarity"],
                "target": tags["target"],
                "strategy": tags["strategy"],
                "best_val": cell.metrics.get("best_val", np.nan),
                "test_mean": summary.mean,
                "test_std": summary.std,
                "n_seeds": summary.n,
                "logme": float(score.iloc[0]) if len(score) else np.nan,
                "test_accuracies": tests,
                "train_epochs": _mean_metric(mine, "cost/epochs", _cost(mine, "epochs")),
                "train_seconds": _mean_metric(mine, "cost/seconds", _cost(mine, "seconds")),
                "train_images_seen": _mean_metric(mine, "cost/images_seen", np.nan),
                "undertrained": float(any(c.tags.get("harness.undertrained") == "true" for c in mine)) if mine else np.nan,
                # how its seeds were trained (one rule per cell; several, '; '-joined, would be a config change mid-sweep)
                "training_rule": "; ".join(
                    sorted({c.tags["harness.training_rule"] for c in mine if c.tags.get("harness.training_rule")})
                )
                or None,
                "cell_run_id": cell.run_id,
                "best_confirm_run_id": best.run_id if best else None,
                **{f"param_{k}": v for k, v in params.items()},
            }
        )
    return pd.DataFrame(rows)


def logme_table(tracker: Tracker, trials: pd.DataFrame, direction: str = "maximize") -> pd.DataFrame:
    """LogME per (target, backbone) beside the accuracy that backbone reached on that target (the
    best search value of its transfer trials; `add_confirmed_accuracy` replaces it with confirmed
    test accuracy once the cells are known)."""
    rows = [
        {"target": r.tags["target"], "backbone": r.tags["backbone"], "logme": r.metrics.get("logme")}
        for r in _runs(tracker, "logme")
    ]
    frame = pd.DataFrame(rows, columns=["target", "backbone", "logme"])
    if not len(frame):
        return frame
    transfer = trials[(trials.strategy != "scratch") & trials.state.isin(["COMPLETE", "PRUNED"])] if len(trials) else trials
    pick = "max" if direction == "maximize" else "min"  # a val_loss sweep's best trial has the lowest value
    best = transfer.groupby(["target", "param_backbone"])["objective"].agg(pick) if len(transfer) else pd.Series(dtype=float)
    frame["best_search_value"] = [best.get((t, b), np.nan) for t, b in zip(frame.target, frame.backbone)]
    return frame


def backbone_confirmations(tracker: Tracker) -> pd.DataFrame:
    """One row per (target, transfer strategy, backbone) that was retrained with seeds and tested:
    each cell's winner (role `confirm`) and the other backbones' best trials (`backbone_confirm`).
    Columns: target, strategy, backbone, val_mean (the seeds' mean best_val), test_mean, n_seeds."""
    rows = []
    for role in ("confirm", "backbone_confirm"):
        for run in _runs(tracker, role):
            m = run.metrics
            if run.status != "FINISHED" or "test_accuracy" not in m or run.tags.get("strategy") == "scratch":
                continue
            rows.append(
                {
                    "target": run.tags.get("target"),
                    "strategy": run.tags.get("strategy"),
                    "backbone": run.params.get("backbone"),
                    "val": m.get("best_val", np.nan),
                    "test": m["test_accuracy"],
                }
            )
    columns = ["target", "strategy", "backbone", "val_mean", "test_mean", "n_seeds"]
    if not rows:
        return pd.DataFrame(columns=columns)
    grouped = pd.DataFrame(rows).groupby(["target", "strategy", "backbone"])
    return grouped.agg(val_mean=("val", "mean"), test_mean=("test", "mean"), n_seeds=("test", "size")).reset_index()[columns]


def add_confirmed_accuracy(logme: pd.DataFrame, confirmations: pd.DataFrame, direction: str = "maximize") -> pd.DataFrame:
    """Would the cheap score have picked the right backbone? Beside each LogME score, the confirmed
    test accuracy of that backbone on that target: of its transfer strategy with the best
    validation score (chosen on validation, like every model the harness reports; `direction` is
    the search metric's), as `confirmed_test_accuracy` and `confirmed_strategy`. Then Kendall's tau
    and Spearman's rho between LogME and that accuracy, across the backbones of each target and
    across every (backbone, target) pair."""
    if not len(logme):
        return logme
    frame = logme.copy()
    ranked = confirmations.dropna(subset=["val_mean", "test_mean"]).sort_values(
        "val_mean", ascending=direction != "maximize", kind="stable"
    )
    chosen = ranked.groupby(["target", "backbone"]).head(1).set_index(["target", "backbone"])
    keys = list(zip(frame.target, frame.backbone))
    frame["confirmed_test_accuracy"] = [chosen.test_mean.get(k, np.nan) for k in keys]
    frame["confirmed_strategy"] = [chosen.strategy.get(k) for k in keys]
    per_target = {}
    for target, group in frame.groupby("target"):
        tau, rho = stats.rank_agreement(group.logme, group.confirmed_test_accuracy)
        scored = group.dropna(subset=["logme", "confirmed_test_accuracy"])
        picked = (
            bool(scored.loc[scored.logme.idxmax(), "backbone"] == scored.loc[scored.confirmed_test_accuracy.idxmax(), "backbone"])
            if len(scored) >= 2
            else None
        )
        per_target[target] = (tau, rho, picked)
    frame["kendall_across_backbones"] = frame.target.map(lambda t: per_target[t][0])
    frame["spearman_across_backbones"] = frame.target.map(lambda t: per_target[t][1])
    frame["logme_picked_best_backbone"] = frame.target.map(lambda t: per_target[t][2])
    frame["kendall_all_pairs"], frame["spearman_all_pairs"] = stats.rank_agreement(frame.logme, frame.confirmed_test_accuracy)
    return frame


def default_ui_url(tracking_uri: str) -> str:
    """Where run links point: the tracking server itself when it serves the UI, else `mlflow ui`'s default."""
    return tracking_uri.rstrip("/") if tracking_uri.startswith(("http://", "https://")) else DEFAULT_UI_URL


class SweepNotFound(LookupError):
    """The store holds no parent run of the sweep a report was asked for."""


def build_report(
    sweep: str, tracker: Tracker, out_dir: str | Path | None = None, log=print, ui_url: str | None = None
) -> dict[str, Path]:
    """The sweep's report files, also logged under report/ on its parent run; `SweepNotFound` when
    the store has no such sweep."""
    ui_url = redact(ui_url or default_ui_url(tracker.uri))  # every run link in the tables starts with it
    out = Path(out_dir or Path(RESULTS) / sweep)
    out.mkdir(parents=True, exist_ok=True)
    parents = tracker.study_runs(sweep)
    if not parents:
        raise SweepNotFound(f"no sweep named {sweep!r} in {redact(tracker.uri)}")
    parent_run_id = parents[0].run_id
    cell_runs = _runs(tracker, "cell")
    trials = trials_table(tracker, cell_runs)
    if not cell_runs:
        path = out / TRIALS_FILE
        trials.to_csv(path, index=False)
        text = markdown_table(trials, tracker.experiment_id, ui_url) if len(trials.columns) else "(no trials)"
        mattered = importance_markdown(importances_from_metrics(parents[0].metrics))
        screened = screening_markdown(parents[0].metrics)  # each score's tau beside the size-only one
        mattered = "\n".join(part for part in (mattered, screened) if part)
        (out / "trials.md").write_text(
            f"# Trials of sweep {sweep}\n\n{text}\n" + (f"\n{mattered}" if mattered else ""), encoding="utf-8"
        )
        paths = {"trials": path, "trials_md": out / "trials.md"}
    else:
        direction = parents[0].params.get("study.direction", "maximize")
        logme = logme_table(tracker, trials, direction)
        cells = cells_table(tracker, cell_runs, logme, direction)
        logme = add_confirmed_accuracy(logme, backbone_confirmations(tracker), direction)
        # extra table "trials" -> trials.csv: the same trials_table schema as a plain sweep's.
        paths = write_comparison(
            cells,
            out,
            title=f"Transfer strategies by quadrant: {sweep}",
            extra_tables={"trials": trials, "logme": logme},
            experiment_id=tracker.experiment_id,
            ui_url=ui_url,
        )
    for path in paths.values():
        tracker.log_file(parent_run_id, path, "report")
    for kind, path in sorted(paths.items()):
        log(f"  {kind:>8}: {path}")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", nargs="?", default="demo", help="sweep (study) name, or the sweep's YAML config")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: config, $MLFLOW_TRACKING_URI, results/mlflow.db)")
    parser.add_argument("--out", help="output folder (default results/<sweep>/)")
    parser.add_argument(
        "--ui-url",
        help=f"MLflow UI address the run links point to (default: the tracking server "
        f"if the tracking URI is http(s), else {DEFAULT_UI_URL})",
    )
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
        print(f"error: no MLflow experiment {experiment!r} at {redact(uri)}; run the sweep first", file=sys.stderr)
        return 2
    tracker = Tracker(uri, experiment)
    print(f"report of sweep {name!r} from {redact(uri)}:")
    try:
        build_report(name, tracker, args.out, ui_url=args.ui_url)
    except SweepNotFound as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

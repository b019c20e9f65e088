"""harness.report and harness.summary on hand-made MLflow runs and a tiny Optuna study (no training).

The fake tracker answers the few calls the report makes (find_runs by role, study_runs,
log_file) from a list of the tracker's plain run records."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from harness import report, summary
from harness.tracking import PARENT_TAG, ROLE, RunRecord
from tests.test_summary import _study_with_trials

EXPERIMENT = "12"


def run(run_id: str, role: str, parent: str | None = None, tags=None, metrics=None, params=None, status="FINISHED"):
    return RunRecord(
        run_id=run_id,
        experiment_id=EXPERIMENT,
        status=status,
        start_time=1_000,
        end_time=13_500,
        tags={ROLE: role, **({PARENT_TAG: parent} if parent else {}), **(tags or {})},
        metrics=dict(metrics or {}),
        params=dict(params or {}),
    )


class FakeTracker:
    def __init__(self, runs, uri="sqlite:///nowhere.db"):
        self.runs, self.uri, self.experiment_id, self.parent_run_id, self.logged = runs, uri, EXPERIMENT, None, []

    def find_runs(self, role, **_):
        return [r for r in self.runs if r.tags[ROLE] == role]

    def study_runs(self, sweep):
        return [r for r in self.runs if r.tags[ROLE] == "study"]

    def log_file(self, run_id, path, artifact_path=None):
        self.logged.append((run_id, str(path), artifact_path))

    def log_metrics(self, run_id, metrics, step=0):
        pass


CELL = {"quadrant": "small-similar", "size": "small", "similarity": "similar", "target": "flowers"}
PARAMS = {
    "backbone": "MobileNetV2",
    "head_lr": "0.003",
    "finetune_lr": "1e-05",
    "unfreeze_fraction": "0.0",
    "cut_fraction": "1.0",
    "head_units": "0",
}


def quadrant_runs() -> list:
    """A sweep with two cells: features (3 seeds with cost metrics, one seed failed) and full (2 seeds)."""
    runs = [
        run("parent", "study"),
        run("cellF", "cell", "parent", {**CELL, "strategy": "features"}, {"best_val": 0.84}),
        run("cellU", "cell", "parent", {**CELL, "strategy": "full"}, {"best_val": 0.80}),
        run("logme1", "logme", "parent", {"target": "flowers", "backbone": "MobileNetV2"}, {"logme": 1.5}),
    ]
    for seed, acc, val in ((2, 0.80, 0.85), (0, 0.82, 0.86), (1, 0.83, 0.84)):
        runs.append(
            run(
                f"confF{seed}",
                "confirm",
                "cellF",
                {**CELL, "strategy": "features", "harness.seed": str(seed)},
                {"test_accuracy": acc, "best_val": val, "head/epochs": 10 + seed, "head/seconds": 20.0 + seed},
                {**PARAMS, "strategy": "features", "seed": str(seed)},
            )
        )
    runs.append(
        run(
            "confF3",
            "confirm",
            "cellF",
            {**CELL, "strategy": "features", "harness.seed": "3"},
            {"head/epochs": 1},
            PARAMS,
            status="FAILED",
        )
    )  # died: not a seed of the cell
    for seed, acc in ((0, 0.60), (1, 0.62)):
        full = {**PARAMS, "unfreeze_fraction": "1.0", "finetune_lr": "0.0001"}
        runs.append(
            run(
                f"confU{seed}",
                "confirm",
                "cellU",
                {**CELL, "strategy": "full", "harness.seed": str(seed)},
                {"test_accuracy": acc, "best_val": 0.70},
                {**full, "strategy": "full", "seed": str(seed)},
            )
        )
    for i, (strategy, cell) in enumerate((("features", "cellF"), ("full", "cellU"))):
        runs.append(
            run(
                f"trial{i}",
                "trial",
                cell,
                {"optuna.trial_number": "0", "optuna.state": "COMPLETE"},
                {"objective": 0.8, "head/best_val_accuracy": 0.8},
                {**PARAMS, "strategy": strategy},
            )
        )
    return runs


def plain_runs() -> list:
    return [
        run("parent", "study"),
        *[
            run(
                f"t{n}",
                "trial",
                "parent",
                {"optuna.trial_number": str(n), "optuna.state": "COMPLETE", "dataset": "shapes"},
                {"objective": 0.5 + n / 10, "finetune/best_val_accuracy": 0.5 + n / 10},
                PARAMS,
            )
            for n in range(2)
        ],
    ]


def test_cells_table_carries_seeds_runs_cost_and_the_confirmed_config():
    tracker = FakeTracker(quadrant_runs())
    cells_runs = tracker.find_runs(role="cell")
    logme = report.logme_table(tracker, report.trials_table(tracker, cells_runs))
    cells = report.cells_table(tracker, cells_runs, logme).set_index("strategy")

    features = cells.loc["features"]
    assert features.test_accuracies == [0.82, 0.83, 0.80]  # seed order; the failed seed is left out
    assert features.n_seeds == 3 and features.test_mean == pytest.approx(0.8166667)
    assert features.test_std == pytest.approx(np.std([0.82, 0.83, 0.80], ddof=1))
    # The best seed is chosen on validation (seed 0), not on test (seed 1 scored highest there).
    assert features.cell_run_id == "cellF" and features.best_confirm_run_id == "confF0"
    assert features.train_epochs == pytest.approx(11.0) and features.train_seconds == pytest.approx(21.0)
    assert features.param_head_lr == 0.003 and features.param_backbone == "MobileNetV2" and features.logme == 1.5
    assert "param_seed" not in cells.columns and "param_strategy" not in cells.columns

    full = cells.loc["full"]
    assert full.test_accuracies == [0.60, 0.62] and full.best_confirm_run_id == "confU0"  # equal val: first seed
    assert np.isnan(full.train_epochs) and np.isnan(full.train_seconds)  # no cost metrics logged: blank
    assert full.param_finetune_lr == 0.0001
    # A minimized metric (say val_loss) picks the lowest best_val.
    minimize = report.cells_table(tracker, cells_runs, logme, "minimize").set_index("strategy")
    assert minimize.loc["features", "best_confirm_run_id"] == "confF1"


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs.append(dict(attrs)["href"])


def test_quadrant_report_links_runs_and_tests_over_seeds(tmp_path):
    tracker = FakeTracker(quadrant_runs())
    paths = report.build_report("quad", tracker, tmp_path, log=lambda *_: None, ui_url="http://ui.test:5000")
    assert {p.name for p in paths.values()} >= {"comparison.csv", "comparison.html", "trials.csv", "logme.csv"}
    assert {artifact for _, _, artifact in tracker.logged} == {"report"}
    assert {run_id for run_id, _, _ in tracker.logged} == {"parent"} and tracker.parent_run_id is None  # left as it was

    long = pd.read_csv(paths["csv"]).set_index("strategy")
    assert json.loads(long.loc["features", "test_accuracies"]) == [0.82, 0.83, 0.80]
    assert long.loc["features", "cell_run_id"] == "cellF" and long.loc["features", "train_epochs"] == 11.0
    from scipy.stats import ttest_ind

    assert long.loc["features", "p_value"] == pytest.approx(ttest_ind([0.82, 0.83, 0.80], [0.60, 0.62], equal_var=False).pvalue)

    parser = Links()
    parser.feed(paths["html"].read_text(encoding="utf-8"))
    for run_id in ("cellF", "cellU", "confF0", "confU0", "trial0"):
        assert f"http://ui.test:5000/#/experiments/{EXPERIMENT}/runs/{run_id}" in parser.hrefs

    # The trials section leaves the fine-tune LR of `features` blank, and shows full's.
    md = paths["md"].read_text(encoding="utf-8")
    trials_section = md.split("## trials")[1].split("## logme")[0]
    header = [c.strip() for c in trials_section.strip().splitlines()[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in trials_section.strip().splitlines()[2:]]
    lr = {row[header.index("strategy")]: row[header.index("finetune lr")] for row in rows}
    assert lr == {"features": "", "full": "1e-05"}


def test_ui_url_defaults_to_mlflow_ui_or_the_tracking_server(capsys):
    assert report.default_ui_url("sqlite:///results/mlflow.db") == "http://127.0.0.1:5000"
    assert report.default_ui_url("http://mlflow.lab:8080/") == "http://mlflow.lab:8080"
    with pytest.raises(SystemExit) as exit_info:
        report.main(["--help"])
    assert exit_info.value.code == 0 and "--ui-url" in capsys.readouterr().out


def test_report_links_and_lines_never_carry_a_password(tmp_path):
    """A run link starts with the tracking server's address: its login must not come along."""
    tracker = FakeTracker(quadrant_runs(), uri="https://bob:Pw4711@mlflow.lab")
    lines = []
    paths = report.build_report("quad", tracker, tmp_path, log=lines.append)
    texts = [p.read_text(encoding="utf-8") for p in paths.values() if p.suffix in (".csv", ".md", ".html", ".tex")]
    assert "https://bob:***@mlflow.lab/#/experiments/" in paths["html"].read_text(encoding="utf-8")
    assert not [t for t in texts + lines if "Pw4711" in t]
    with pytest.raises(report.SweepNotFound) as refused:
        report.build_report("quad", FakeTracker([], uri="https://bob:Pw4711@mlflow.lab"), tmp_path)
    assert "Pw4711" not in str(refused.value) and "bob:***@mlflow.lab" in str(refused.value)


def test_the_report_command_says_when_the_store_holds_no_such_sweep(tmp_path, capsys):
    from harness.tracking import Tracker

    uri = f"sqlite:///{tmp_path}/m.db"
    Tracker(uri, "quad", str(tmp_path / "a"))  # the experiment exists, but no sweep ran in it
    assert report.main(["quad", "--tracking-uri", uri, "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"error: no sweep named 'quad' in {uri}"


def test_report_and_summary_never_write_two_tables_to_one_file_name(tmp_path):
    """A plain sweep: the summary writes Optuna's table, then the report its MLflow table. Each file
    name holds one schema, and neither writer overwrites the other's file."""
    study = _study_with_trials()
    tracker = FakeTracker(plain_runs())
    cfg = SimpleNamespace(study=SimpleNamespace(name="tiny", direction="maximize", metric="val_accuracy"))
    result = summary.summarize(cfg, study, np.array([0, 1, 1]), None, tracker, results_dir=str(tmp_path))
    out = tmp_path / "tiny"
    assert summary.OPTUNA_TRIALS_FILE in result["text"]
    assert sorted(p.name for p in out.iterdir()) == [summary.OPTUNA_TRIALS_FILE]
    optuna_table = (out / summary.OPTUNA_TRIALS_FILE).read_bytes()

    paths = report.build_report("tiny", tracker, out, log=lambda *_: None)
    assert paths["trials"].name == report.TRIALS_FILE != summary.OPTUNA_TRIALS_FILE
    assert (out / summary.OPTUNA_TRIALS_FILE).read_bytes() == optuna_table  # untouched by the report

    mlflow_table = pd.read_csv(out / report.TRIALS_FILE)
    assert list(mlflow_table["trial"]) == [0, 1] and list(mlflow_table["mlflow_run_id"]) == ["t0", "t1"]
    assert list(mlflow_table["objective"]) == pytest.approx([0.5, 0.6])
    # The quadrant report's trials.csv has the same schema as the plain one's: trials_table's.
    quad = report.trials_table(FakeTracker(quadrant_runs()), FakeTracker(quadrant_runs()).find_runs(role="cell"))
    assert list(quad.columns) == list(mlflow_table.columns)
    assert "number" in pd.read_csv(out / summary.OPTUNA_TRIALS_FILE).columns and "number" not in mlflow_table.columns
    md = (out / "trials.md").read_text(encoding="utf-8")
    assert md.startswith("# Trials of sweep tiny") and "| trial" in md and "0.500" in md


def test_a_plain_reports_markdown_says_what_mattered_from_the_parent_runs_importances(tmp_path):
    runs = plain_runs()
    runs[0].metrics.update({"importance/head_lr": 0.25, "importance/finetune_lr": 0.75, "best_val_accuracy": 0.6})
    report.build_report("tiny", FakeTracker(runs), tmp_path, log=lambda *_: None)
    md = (tmp_path / "trials.md").read_text(encoding="utf-8")
    section = md[md.index("## What mattered") :]
    assert section.index("finetune_lr") < section.index("head_lr") and "0.750" in section and "best_val" not in section

    report.build_report("tiny", FakeTracker(plain_runs()), tmp_path, log=lambda *_: None)  # a sweep that logged none
    assert "What mattered" not in (tmp_path / "trials.md").read_text(encoding="utf-8")


def test_logme_is_judged_against_confirmed_test_accuracy_per_target_and_across_pairs():
    logme = pd.DataFrame({"target": ["a", "a", "b", "b"], "backbone": ["M", "R", "M", "R"], "logme": [1.0, 2.0, 0.5, 0.1]})
    confirmations = pd.DataFrame(
        {
            "target": ["a", "a", "a", "b", "b", "b"],
            "strategy": ["features", "full", "features", "features", "full", "full"],
            "backbone": ["M", "R", "R", "M", "R", "M"],
            "val_mean": [0.6, 0.9, 0.5, 0.7, 0.9, 0.2],
            "test_mean": [0.6, 0.8, 0.95, 0.7, 0.9, 0.99],
            "n_seeds": 3,
        }
    )
    out = report.add_confirmed_accuracy(logme, confirmations).set_index(["target", "backbone"])
    # a backbone's score is its strategy with the best validation score, never its best test score
    assert out.loc[("a", "R"), "confirmed_test_accuracy"] == 0.8 and out.loc[("a", "R"), "confirmed_strategy"] == "full"
    assert out.loc[("b", "M"), "confirmed_test_accuracy"] == 0.7
    assert out.loc[("a", "M"), "spearman_across_backbones"] == pytest.approx(1.0) and bool(
        out.loc[("a", "M"), "logme_picked_best_backbone"]
    )
    assert (
        out.loc[("b", "M"), "kendall_across_backbones"] == pytest.approx(-1.0)
        and not out.loc[("b", "M"), "logme_picked_best_backbone"]
    )
    import scipy.stats

    assert out["kendall_all_pairs"].iloc[0] == pytest.approx(
        scipy.stats.kendalltau([1.0, 2.0, 0.5, 0.1], [0.6, 0.8, 0.7, 0.9]).statistic
    )
    # a val_loss sweep chooses the lowest validation value
    low = report.add_confirmed_accuracy(logme, confirmations, "minimize").set_index(["target", "backbone"])
    assert low.loc[("a", "R"), "confirmed_strategy"] == "features" and low.loc[("b", "M"), "confirmed_test_accuracy"] == 0.99


def test_logme_search_values_follow_the_metrics_direction():
    tracker = FakeTracker(quadrant_runs())
    trials = report.trials_table(tracker, tracker.find_runs(role="cell"))
    trials.loc[len(trials)] = {**trials.iloc[0].to_dict(), "objective": 0.1}  # a second, lower value
    best_max = report.logme_table(tracker, trials, "maximize")["best_search_value"].iloc[0]
    best_min = report.logme_table(tracker, trials, "minimize")["best_search_value"].iloc[0]
    assert best_max > best_min == 0.1

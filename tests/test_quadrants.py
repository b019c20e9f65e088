"""Quadrant comparison: strategy -> trainable layers, equal budgets, confirmation, report read back."""

from __future__ import annotations

import optuna
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import quad, run_main, write_config

# The end-to-end sweep keeps to two strategies that train no backbone, so the suite stays short:
# frozen features (the feature cache, a head-only confirmation extended to the floor) and
# intermediate features (a searched cut of the backbone, frozen). Scratch cells (the from-scratch
# recipe) run end to end in tests/test_workers.py; a partial fine-tune is the two-phase trial every
# plain sweep runs; every strategy's confirmation plan is checked in tests/test_scratch.py.
E2E_STRATEGIES = ("features", "intermediate")
E2E = f"[{', '.join(E2E_STRATEGIES)}]"
TARGETS = ("shapes-small", "digits-small")


# The end-to-end sweep ranks two backbones pretrained by the harness, so LogME has a ranking to be
# judged on: the shipped ones (harness/assets/, sweeps/quadrants-demo.yaml's source block), so nothing
# is pretrained here (tests/test_pretrain.py pretrains one).
TWO_SOURCES = """
source:
  data: {source: builtin, name: shapes-source, image_size: 32, builtin_size: 600, val_fraction: 0.1,
         test_fraction: 0.1, seed: 1}
  epochs: 40
  batch_size: 64
  learning_rate: 0.001
model:
  weights: source
  backbone_options:
    MobileNetV2: {alpha: 0.35}
    MobileNetV3Small: {alpha: 0.75}
"""
BACKBONES = ("MobileNetV2", "MobileNetV3Small")


def two_backbone_quad(weights_file, strategies) -> str:
    text = quad(weights_file, strategies)
    head, rest = text.split("model:", 1)
    rest = rest.split("search:", 1)[1]
    return (head + TWO_SOURCES.lstrip("\n") + "search:" + rest).replace(
        "  backbone: MobileNetV2\n", f"  backbone: {{choices: [{', '.join(BACKBONES)}]}}\n"
    )


@pytest.fixture(scope="module")
def quad_sweep(tmp_path_factory, weights_file):
    work = tmp_path_factory.mktemp("quad")
    config = write_config(work, two_backbone_quad(weights_file, E2E))
    proc = run_main(str(config), "--workers", "2", cwd=work)  # cells spread over two processes
    assert proc.returncode == 0, proc.stderr[-4000:]
    return work, proc


@pytest.mark.xdist_group("quad")  # one worker runs the shared sweep
def test_every_cell_gets_its_own_study_with_the_same_budget(quad_sweep):
    work, _ = quad_sweep
    storage = f"sqlite:///{work}/results/quad/optuna.db"
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    cells = [f"quad.{t}.{s}" for t in TARGETS for s in E2E_STRATEGIES]
    seed_studies = {f"{c}.confirm" for c in cells}  # a search study and a seeds study per cell
    # and, in transfer cells (here every cell), a seeds study for the backbone that did not win (LogME's ground truth)
    checks = {n for n in names if ".confirm." in n}
    assert len(checks) == len(TARGETS) * len(E2E_STRATEGIES)
    assert all(n.rsplit(".", 1)[-1] in BACKBONES for n in checks)
    assert names == sorted(cells + list(seed_studies | checks))
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        assert len([t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]) == 2 == len(study.trials)
        if ".confirm" in name:  # each seed ran exactly once
            assert sorted(t.params["seed"] for t in study.trials) == [0, 1]
        else:  # every candidate backbone got a trial in every cell
            assert sorted(t.params["backbone"] for t in study.trials) == sorted(BACKBONES)
    # both trial processes ran cells: some two trials overlapped in time (processes are recycled
    # after trials_per_process tasks, so worker ids alone do not count the slots)
    spans = sorted(
        (t.datetime_start, t.datetime_complete)
        for name in names
        for t in optuna.load_study(study_name=name, storage=storage).trials
    )
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), "trials never ran side by side"


@pytest.mark.xdist_group("quad")  # one worker runs the shared sweep
def test_confirmation_retrains_each_cell_with_k_seeds_and_reads_test_once(quad_sweep):
    work, _ = quad_sweep
    client = MlflowClient(f"sqlite:///{work}/results/mlflow.db")
    exp = client.get_experiment_by_name("quad")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    cells = [r for r in runs if r.data.tags.get("harness.role") == "cell"]
    assert len(cells) == len(TARGETS) * len(E2E_STRATEGIES) and all(c.info.status == "FINISHED" for c in cells)
    for cell in cells:
        confirms = [
            r
            for r in runs
            if r.data.tags.get("harness.role") == "confirm" and r.data.tags["mlflow.parentRunId"] == cell.info.run_id
        ]
        assert sorted(r.data.tags["harness.seed"] for r in confirms) == ["0", "1"]
        assert all(0.0 <= r.data.metrics["test_accuracy"] <= 1.0 for r in confirms)
    # test metrics appear on confirmation runs only
    assert not [
        r
        for r in runs
        if r.data.tags.get("harness.role") not in ("confirm", "backbone_confirm") and "test_accuracy" in r.data.metrics
    ]
    checks = [r for r in runs if r.data.tags.get("harness.role") == "backbone_confirm"]
    assert len(checks) == len(TARGETS) * len(E2E_STRATEGIES) * 2  # two seeds in every transfer cell
    assert all("test_accuracy" in r.data.metrics and "harness.model_uri" not in r.data.tags for r in checks)
    # every seed says how it was trained, and shows its epochs as a trial does
    # ... every strategy under one rule, the scratch seeds' step floor: 6 steps in all (scratch: tests/test_workers.py)
    assert {r.data.tags["harness.training_rule"] for r in runs if r.data.tags.get("harness.role") == "confirm"} == {
        (
            "to convergence: at least 6 optimizer steps in all and 2 epochs, no early stopping; a transfer model's head "
            "phase (1 epochs, patience off) counts toward them; from scratch, up to 2 retries at the next learning rate "
            "when unfitted"
        )
    }
    batches_per_pass = {"shapes-small": 2, "digits-small": 1}  # 18 and 16 training images, batch 16
    for r in (r for r in runs if r.data.tags.get("harness.role") in ("confirm", "backbone_confirm")):
        # the head phase is these strategies' only phase: extended to the floor (no patience here)
        steps = r.data.metrics["cost/epochs"] * batches_per_pass[r.data.tags["target"]]
        assert steps == pytest.approx(6), (r.data.tags["target"], r.data.tags["strategy"])
    lines = quad_sweep[1].stderr.splitlines()
    assert any(line.startswith("shapes-small.intermediate confirm [") and " head epoch " in line for line in lines)
    assert any(line.startswith("digits-small.features confirm [") and " head epoch " in line for line in lines)
    for check in checks:  # the backbone that did not win its cell
        cell = next(c for c in cells if c.info.run_id == check.data.tags["mlflow.parentRunId"])
        winner = next(
            r
            for r in runs
            if r.data.tags.get("harness.role") == "confirm" and r.data.tags["mlflow.parentRunId"] == cell.info.run_id
        )
        assert check.data.params["backbone"] != winner.data.params["backbone"]
    logme = [r for r in runs if r.data.tags.get("harness.role") == "logme"]
    assert sorted((r.data.tags["target"], r.data.tags["backbone"]) for r in logme) == [
        (t, b) for t in ("digits-small", "shapes-small") for b in BACKBONES
    ]


@pytest.mark.xdist_group("quad")
def test_each_cell_registers_its_best_confirmed_model(quad_sweep):
    """Chosen on validation among the cell's seeds, never on test; one registered model per cell."""
    work, _ = quad_sweep
    client = MlflowClient(f"sqlite:///{work}/results/mlflow.db")
    exp = client.get_experiment_by_name("quad")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    for cell in (r for r in runs if r.data.tags.get("harness.role") == "cell"):
        name = f"quad.{cell.data.tags['harness.cell']}"
        (version,) = client.search_model_versions(f"name = '{name}'")
        confirms = [
            r
            for r in runs
            if r.data.tags.get("harness.role") == "confirm" and r.data.tags["mlflow.parentRunId"] == cell.info.run_id
        ]
        best_val = max(r.data.metrics["best_val"] for r in confirms)
        chosen = client.get_run(version.run_id)
        assert chosen.info.run_id in {r.info.run_id for r in confirms}
        assert chosen.data.metrics["best_val"] == best_val
        assert version.tags["strategy"] == cell.data.tags["strategy"] and version.tags["target"] == cell.data.tags["target"]


@pytest.mark.xdist_group("quad")  # one worker runs the shared sweep
def test_report_files_parse_back_to_the_mlflow_numbers(quad_sweep):
    work, proc = quad_sweep
    out = work / "results" / "quad"
    for name in (
        "comparison.csv",
        "comparison.md",
        "comparison.tex",
        "comparison.html",
        "heatmap.png",
        "trials.csv",
        "logme.csv",
    ):
        assert (out / name).is_file(), name
    table = pd.read_csv(out / "comparison.csv")
    client = MlflowClient(f"sqlite:///{work}/results/mlflow.db")
    exp = client.get_experiment_by_name("quad")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    for cell in (r for r in runs if r.data.tags.get("harness.role") == "cell"):
        row = table[(table.target == cell.data.tags["target"]) & (table.strategy == cell.data.tags["strategy"])].iloc[0]
        assert row.test_mean == pytest.approx(cell.data.metrics["test_mean"])
        assert row.best_val == pytest.approx(cell.data.metrics["best_val"])
        assert row.n_seeds == 2
    trials = pd.read_csv(out / "trials.csv")
    assert len(trials) == len(TARGETS) * len(E2E_STRATEGIES) * 2 and set(trials.state) <= {"COMPLETE", "PRUNED"}
    logme = pd.read_csv(out / "logme.csv")
    assert len(logme) == 4 and logme.confirmed_test_accuracy.notna().all()  # every backbone confirmed on every target
    assert set(logme.confirmed_strategy) <= set(E2E_STRATEGIES) and -1 <= logme.kendall_all_pairs.iloc[0] <= 1
    # the report is also attached to the sweep's parent run
    parent = next(r for r in runs if r.data.tags.get("harness.role") == "study")
    assert "report/comparison.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}


def test_cells_trained_under_different_rules_get_no_decisive_verdict(tmp_path, weights_file):
    """A converged scratch cell against budget-limited transfer (an older sweep's records): the report
    names the rules and does not call the better one the winner; cells under one rule get their verdict."""
    from harness.config import load_config
    from harness.export import write_comparison
    from harness.scratch import training_rule
    from harness.verdicts import quadrant_verdicts

    cfg = load_config(write_config(tmp_path, quad(weights_file)))
    rule = training_rule(cfg)  # every strategy's seeds, today
    assert "at least 6 optimizer steps in all" in rule and "head phase (1 epochs" in rule
    # an older sweep's records: scratch converged, transfer on the search's epoch budget
    scratch = rule
    full = partial = "two-phase: head 1 epochs (patience off), fine-tune 1 epochs (patience off), early stopping on val_accuracy"

    def cells(scratch_rule):
        return pd.DataFrame(
            [
                {
                    "quadrant": "large-similar",
                    "size": "large",
                    "similarity": "similar",
                    "target": "t",
                    "strategy": s,
                    "best_val": m,
                    "test_mean": m,
                    "test_std": 0.005,
                    "n_seeds": 3,
                    "training_rule": r,
                    "test_accuracies": [m - 0.005, m, m + 0.005],
                }
                for s, m, r in (("full", 0.864, full), ("partial", 0.80, partial), ("scratch", 0.944, scratch_rule))
            ]
        )

    mixed = quadrant_verdicts(cells(scratch)).iloc[0]
    assert mixed["winner"] == "scratch" and mixed["significant"] and not mixed["decisive"]
    assert mixed["verdict"] == "scratch, not decisive: training rules differ"
    assert mixed["training_rules"] == "; ".join(sorted({full, scratch}))
    one_rule = quadrant_verdicts(cells(full)).iloc[0]
    assert one_rule["decisive"] and one_rule["verdict"] == "scratch"
    paths = write_comparison(cells(scratch), tmp_path / "out", "rules")
    text = paths["md"].read_text()
    assert "trained under different rules, so no winner is called" in text
    assert f"Trained under: {scratch}; {full}." in text

"""harness.export: the verdicts' values (Welch over seeds, tie sets), and every written file read back."""

from __future__ import annotations

import base64
import io
import json
import math
import re
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as scipy_stats

from harness.export import (
    CELL_STAT_COLUMNS,
    CELL_VERDICT_COLUMNS,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    STRATEGY_ORDER,
    TEXTBOOK,
    VERDICT_COLUMNS,
    comparison_long,
    comparison_table,
    heatmap_figure,
    quadrant_verdicts,
    run_url,
    write_comparison,
)

NAN = math.nan

# (quadrant, size, similarity, target) -> {strategy: (best_val, test accuracy per seed, logme)}
# Designed so that each quadrant exercises a different verdict:
#   small-similar     features beats everyone significantly         -> decisive, agrees
#   small-dissimilar  full, partial, intermediate within noise      -> tie of three; full is not the
#                     rule's, but the rule's partial/intermediate are in the tie -> agrees
#   large-similar     partial and scratch tie; the rule's full is significantly worse -> tie, disagrees
#   large-dissimilar  one seed each: no test possible               -> tie of all five, agrees
DESIGN = {
    ("small-similar", "small", "similar", "cifar_10"): {
        "features": (0.8249, [0.81, 0.82, 0.83], 1.25),
        "intermediate": (0.8011, [0.70, 0.71, 0.72], 1.10),
        "partial": (0.79, [0.66, 0.68, 0.70], NAN),
        "full": (0.78, [0.60, 0.62, 0.64], NAN),
        "scratch": (0.45, [0.30, 0.35, 0.40], NAN),
    },
    ("small-dissimilar", "small", "dissimilar", "med%scan&x"): {
        "features": (0.56, [0.55, 0.56, 0.54], 0.5),
        "intermediate": (0.67, [0.68, 0.70, 0.66], 0.7),
        "partial": (0.71, [0.69, 0.71, 0.67], NAN),
        "full": (0.72, [0.70, 0.74, 0.66], NAN),
        "scratch": (0.53, [0.50, 0.52, 0.48], NAN),
    },
    ("large-similar", "large", "similar", "places_365"): {
        "features": (0.81, [0.80, 0.81, 0.79], NAN),
        "intermediate": (0.79, [0.78, 0.79, 0.77], NAN),
        "partial": (0.96, [0.95, 0.96, 0.94], NAN),
        "full": (0.92, [0.90, 0.91, 0.89], NAN),
        "scratch": (0.95, [0.94, 0.97, 0.91], NAN),
    },
    ("large-dissimilar", "large", "dissimilar", "x_ray"): {
        "features": (0.61, [0.60], NAN),
        "intermediate": (0.71, [0.70], NAN),
        "partial": (0.86, [0.85], NAN),
        "full": (0.88, [0.87], NAN),
        "scratch": (0.89, [0.88], NAN),
    },
}


def make_cells(with_seeds: bool = True) -> pd.DataFrame:
    rows = []
    for (quadrant, size, similarity, target), by_strategy in DESIGN.items():
        for strategy, (best_val, seeds, logme) in by_strategy.items():
            row = {"quadrant": quadrant, "size": size, "similarity": similarity, "target": target,
                   "strategy": strategy, "best_val": best_val, "test_mean": float(np.mean(seeds)),
                   "test_std": float(np.std(seeds, ddof=1)) if len(seeds) > 1 else NAN,
                   "n_seeds": len(seeds), "logme": logme}
            if with_seeds:
                row["test_accuracies"] = seeds
            rows.append(row)
    return pd.DataFrame(rows)


def seeds_of(quadrant: str, strategy: str) -> list[float]:
    return next(v for k, v in DESIGN.items() if k[0] == quadrant)[strategy][1]


def set_seeds(cells: pd.DataFrame, quadrant: str, strategy: str, seeds: list[float]) -> None:
    """Replace one cell's seeds, and its mean and std with them."""
    i = cells.index[(cells.quadrant == quadrant) & (cells.strategy == strategy)][0]
    cells.at[i, "test_accuracies"] = seeds
    cells.loc[i, ["test_mean", "test_std"]] = [float(np.mean(seeds)), float(np.std(seeds, ddof=1))]


@pytest.fixture
def cells() -> pd.DataFrame:
    return make_cells()


def verdict(verdicts: pd.DataFrame, quadrant: str) -> pd.Series:
    rows = verdicts[verdicts["quadrant"] == quadrant]
    assert len(rows) == 1
    return rows.iloc[0]


# --- verdicts -----------------------------------------------------------------------------------

def test_textbook_rules():
    assert TEXTBOOK[("small", "similar")] == ("features",)
    assert set(TEXTBOOK[("small", "dissimilar")]) == {"intermediate", "partial"}
    assert TEXTBOOK[("large", "similar")] == ("full",)
    assert set(TEXTBOOK[("large", "dissimilar")]) == {"full", "scratch"}
    assert STRATEGY_ORDER == ["features", "intermediate", "partial", "full", "scratch"]


def test_p_value_is_welch_over_seeds_winner_vs_runner_up(cells):
    v = quadrant_verdicts(cells)
    assert list(v.columns) == VERDICT_COLUMNS
    for quadrant, winner, runner in [("small-similar", "features", "intermediate"),
                                     ("small-dissimilar", "full", "partial"),
                                     ("large-similar", "partial", "scratch")]:
        row = verdict(v, quadrant)
        assert (row.winner, row.runner_up) == (winner, runner)
        expected = scipy_stats.ttest_ind(seeds_of(quadrant, winner), seeds_of(quadrant, runner), equal_var=False).pvalue
        assert row.p_value == pytest.approx(expected, rel=1e-12)
        assert bool(row.significant) == (expected < 0.05)
    # A known number, worked by hand: t = 0.11 / sqrt(2 * 0.01**2 / 3) = 13.472, df = 4, p = 2 * P(T_4 > t).
    assert verdict(v, "small-similar").p_value == pytest.approx(1.7564e-4, rel=1e-4)
    # One seed each: no test, so nothing is significant.
    ld = verdict(v, "large-dissimilar")
    assert math.isnan(ld.p_value) and not ld.significant
    assert v["significant"].dtype == bool and v["decisive"].dtype == bool and v["agrees_with_textbook"].dtype == bool


def test_clear_gap_is_decisive(cells):
    ss = verdict(quadrant_verdicts(cells), "small-similar")
    assert ss.decisive and ss.significant
    assert ss.verdict == "features" and ss.tie_set == "features"
    assert ss.margin == pytest.approx(0.11) and ss.textbook == "features" and ss.agrees_with_textbook


def test_near_tie_is_not_decisive_and_names_every_tied_strategy(cells):
    sd = verdict(quadrant_verdicts(cells), "small-dissimilar")
    assert not sd.decisive and not sd.significant
    assert sd.tie_set == "full, partial, intermediate"  # best first; features and scratch are significantly worse
    assert sd.verdict == "tie: full, partial, intermediate"
    # The best mean (full) is not what the rule recommends, but the rule's strategies are in the tie.
    assert sd.textbook == "intermediate or partial" and sd.agrees_with_textbook


def test_agreement_is_judged_against_the_tie_set(cells):
    ls = verdict(quadrant_verdicts(cells), "large-similar")
    assert ls.tie_set == "partial, scratch" and not ls.decisive
    assert ls.textbook == "full" and not ls.agrees_with_textbook  # full is significantly worse than partial
    ld = verdict(quadrant_verdicts(cells), "large-dissimilar")
    assert ld.tie_set == "scratch, full, partial, intermediate, features" and ld.agrees_with_textbook


def test_runner_up_significant_but_a_noisy_third_ties(cells):
    # partial: a mean below the runner-up's, but so noisy that Welch cannot separate it from the winner.
    set_seeds(cells, "small-similar", "partial", [0.45, 0.95, 0.70])
    ss = verdict(quadrant_verdicts(cells), "small-similar")
    assert ss.runner_up == "intermediate" and ss.significant  # winner vs runner-up: significant
    assert not ss.decisive and ss.verdict == "tie: features, partial"  # but not vs every other strategy


def test_summary_numbers_give_the_same_test_as_the_seeds():
    with_seeds, without = quadrant_verdicts(make_cells(True)), quadrant_verdicts(make_cells(False))
    np.testing.assert_allclose(with_seeds["p_value"], without["p_value"], rtol=1e-9)
    assert list(with_seeds["tie_set"]) == list(without["tie_set"])
    assert list(with_seeds["decisive"]) == list(without["decisive"])


def test_exact_tie_is_ranked_by_strategy_order_and_never_decisive(cells):
    for strategy in ("features", "intermediate"):
        set_seeds(cells, "small-similar", strategy, [0.81, 0.82, 0.83])
    ss = verdict(quadrant_verdicts(cells), "small-similar")
    assert (ss.winner, ss.runner_up, ss.margin) == ("features", "intermediate", 0.0)
    assert ss.p_value == pytest.approx(1.0) and not ss.decisive and ss.tie_set == "features, intermediate"


def test_constant_seeds(cells):
    # Identical accuracies on every seed: different constants are separated (p = 0), equal ones tie.
    # Binary fractions, so the std is exactly 0 and scipy sees the degenerate case.
    set_seeds(cells, "large-similar", "partial", [0.96875] * 3)
    set_seeds(cells, "large-similar", "scratch", [0.9375] * 3)
    ls = verdict(quadrant_verdicts(cells), "large-similar")
    assert ls.p_value == 0.0 and ls.decisive and ls.verdict == "partial"
    assert ls.p_value == verdict(quadrant_verdicts(cells.drop(columns=["test_accuracies"])), "large-similar").p_value
    set_seeds(cells, "large-similar", "scratch", [0.96875] * 3)
    ls = verdict(quadrant_verdicts(cells), "large-similar")
    assert math.isnan(ls.p_value) and ls.tie_set == "partial, scratch"


def test_missing_cells_do_not_crash(cells, tmp_path):
    # small-similar lost its winner; large-dissimilar ran scratch only; small-dissimilar's full has no score.
    cells = cells[~((cells.quadrant == "small-similar") & (cells.strategy == "features"))]
    cells = cells[~((cells.quadrant == "large-dissimilar") & (cells.strategy != "scratch"))].copy()
    full = cells.index[(cells.quadrant == "small-dissimilar") & (cells.strategy == "full")][0]
    cells.at[full, "test_mean"], cells.at[full, "test_accuracies"] = NAN, None
    v = quadrant_verdicts(cells)

    ss = verdict(v, "small-similar")
    assert (ss.winner, ss.runner_up, ss.verdict) == ("intermediate", "partial", "tie: intermediate, partial")
    assert not ss.agrees_with_textbook

    sd = verdict(v, "small-dissimilar")  # full's NaN score is out of the ranking
    assert (sd.winner, sd.runner_up) == ("partial", "intermediate") and sd.agrees_with_textbook

    ld = verdict(v, "large-dissimilar")
    assert ld.winner == "scratch" and pd.isna(ld.runner_up) and pd.isna(ld.runner_up_test_mean)
    assert math.isnan(ld.margin) and math.isnan(ld.p_value) and not ld.decisive and ld.agrees_with_textbook
    assert ld.verdict == "scratch (no other strategy has a test score)"

    wide = comparison_table(cells).set_index("quadrant")
    assert wide.loc["small-similar", "features"] == ""
    assert wide.loc["small-dissimilar", "full"] == ""
    assert wide.loc["large-dissimilar", "full"] == ""
    assert wide.loc["large-dissimilar", "scratch"] == "0.880"  # one seed: no interval

    paths = write_comparison(cells, tmp_path, "missing cells")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    assert len(pd.read_csv(paths["csv"])) == len(cells)


def test_quadrant_with_no_scores_and_no_rule():
    cells = pd.DataFrame([
        {"quadrant": "odd", "size": "medium", "similarity": "similar", "target": "t", "strategy": "full",
         "best_val": NAN, "test_mean": NAN, "test_std": NAN, "n_seeds": 0},
    ])
    row = quadrant_verdicts(cells).iloc[0]
    assert pd.isna(row.winner) and row.textbook == "" and not row.agrees_with_textbook
    assert not row.significant and not row.decisive and row.verdict == "" and row.tie_set == ""


def test_bad_input_is_refused(cells, tmp_path):
    with pytest.raises(ValueError, match="test_std"):
        quadrant_verdicts(cells.drop(columns=["test_std"]))
    with pytest.raises(ValueError, match="more than one row"):
        quadrant_verdicts(pd.concat([cells, cells.iloc[[0]]]))
    with pytest.raises(ValueError, match="reserved"):
        write_comparison(cells, tmp_path / "a", "t", extra_tables={"comparison": cells})
    with pytest.raises(ValueError, match="letters"):
        write_comparison(cells, tmp_path / "b", "t", extra_tables={"../escape": cells})
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # checked before writing


# --- tables and files ---------------------------------------------------------------------------

def test_long_form_schema_and_intervals(cells):
    cells["param_backbone"] = "MobileNetV2"
    long = comparison_long(cells)
    verdict_columns = [c for c in VERDICT_COLUMNS if c not in ("quadrant", "size", "similarity", "target")]
    assert list(long.columns) == [*REQUIRED_COLUMNS, *CELL_STAT_COLUMNS, *OPTIONAL_COLUMNS, "param_backbone",
                                  *CELL_VERDICT_COLUMNS, *verdict_columns]
    assert len(long) == 20 and long["is_winner"].sum() == 4
    assert long.groupby("quadrant")["in_tie_set"].sum().to_dict() == {
        "small-similar": 1, "small-dissimilar": 3, "large-similar": 2, "large-dissimilar": 5}

    row = long[(long.quadrant == "small-similar") & (long.strategy == "features")].iloc[0]
    low, high = scipy_stats.t.interval(0.95, 2, loc=0.82, scale=scipy_stats.sem([0.81, 0.82, 0.83]))
    assert (row.ci_low, row.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert json.loads(row.test_accuracies) == [0.81, 0.82, 0.83]
    one_seed = long[long.quadrant == "large-dissimilar"]
    assert one_seed["ci_low"].isna().all() and one_seed["ci_high"].isna().all()  # n < 2: NaN
    # Every quadrant row carries the quadrant's p-value; each cell its own p against the winner.
    partial = long[(long.quadrant == "small-similar") & (long.strategy == "partial")].iloc[0]
    assert partial.p_vs_winner == pytest.approx(scipy_stats.ttest_ind(
        [0.81, 0.82, 0.83], [0.66, 0.68, 0.70], equal_var=False).pvalue)
    assert long.groupby("quadrant")["p_value"].nunique(dropna=False).eq(1).all()
    # Cost columns are there even when no cell had them, blank.
    assert long["train_epochs"].isna().all() and long["train_seconds"].isna().all()


def test_run_url():
    assert run_url("abc", "4") == "http://127.0.0.1:5000/#/experiments/4/runs/abc"
    assert run_url("abc", 4, "http://mlflow:8080/") == "http://mlflow:8080/#/experiments/4/runs/abc"
    assert run_url(None, "4") is None and run_url("abc", None) is None


@pytest.fixture
def written(cells, tmp_path):
    cells["cell_run_id"] = [f"cell{i:02d}" + "0" * 26 for i in range(len(cells))]
    cells["best_confirm_run_id"] = [f"seed{i:02d}" + "0" * 26 for i in range(len(cells))]
    cells["train_epochs"] = 12.0
    cells["param_finetune_lr"] = 1e-4
    cells["param_cut_fraction"] = 0.5
    cells["param_head_lr"] = 0.0031622776601683794
    budget = pd.DataFrame({"strategy": STRATEGY_ORDER, "param_unfreeze_fraction": [0.0, 0.0, 0.5, 1.0, 1.0],
                           "gpu_hours": [0.5, 0.7, 1.25, 2.0, 3.125], "mlflow_run_id": list("abcde")})
    paths = write_comparison(cells, tmp_path / "out", "Transfer_strategies 100% & more",
                             extra_tables={"budget": budget}, experiment_id="7", ui_url="http://ui.test:5000")
    return cells, paths, budget


def test_returns_every_kind(written):
    _, paths, _ = written
    assert set(paths) == {"csv", "md", "tex", "heatmap", "html", "budget"}
    assert {p.name for p in paths.values()} == {"comparison.csv", "comparison.md", "comparison.tex",
                                               "heatmap.png", "comparison.html", "budget.csv"}
    assert all(p.exists() for p in paths.values())


def test_csv_reads_back_to_the_same_numbers(written):
    cells, paths, budget = written
    back = pd.read_csv(paths["csv"])
    key = ["quadrant", "strategy"]
    merged = cells.merge(back, on=key, suffixes=("_in", "_out"), validate="one_to_one")
    assert len(merged) == len(cells) == len(back)
    for column in ("best_val", "test_mean", "test_std", "n_seeds", "logme", "train_epochs", "param_head_lr"):
        np.testing.assert_array_equal(merged[f"{column}_in"].to_numpy(float), merged[f"{column}_out"].to_numpy(float))
    for column in ("size", "similarity", "target", "cell_run_id", "best_confirm_run_id"):
        assert list(merged[f"{column}_in"]) == list(merged[f"{column}_out"])
    assert [json.loads(s) for s in merged["test_accuracies_out"]] == list(merged["test_accuracies_in"])

    # The verdict columns are there too, per cell, and parse back as numbers and booleans.
    verdicts = quadrant_verdicts(cells).set_index("quadrant")
    for quadrant, rows in back.groupby("quadrant"):
        assert set(rows["winner"]) == {verdicts.loc[quadrant, "winner"]}
        assert set(rows["verdict"]) == {verdicts.loc[quadrant, "verdict"]}
        np.testing.assert_allclose(rows["p_value"], verdicts.loc[quadrant, "p_value"], rtol=1e-15)
        assert rows["significant"].iloc[0] == verdicts.loc[quadrant, "significant"]
        assert rows["agrees_with_textbook"].iloc[0] == verdicts.loc[quadrant, "agrees_with_textbook"]
    assert back["significant"].dtype == bool and back["decisive"].dtype == bool
    # A comparison.csv is valid input again and gives the same verdicts.
    pd.testing.assert_frame_equal(quadrant_verdicts(back), quadrant_verdicts(cells))

    pd.testing.assert_frame_equal(pd.read_csv(paths["budget"]), budget)  # extra CSVs are written as given


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table in `text` as rows of stripped cell strings (the --- rule dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(set(c) <= {"-", ":"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def link(text: str, run: str) -> str:
    return f"[{text}](http://ui.test:5000/#/experiments/7/runs/{run})"


RAW_NAMES = ("margin_exceeds_spread", "agrees_with_textbook", "p_value", "runner_up", "n_seeds", "best_val",
             "test_mean", "param_", "tie_set", "is_winner")


def test_markdown_wide_table_rounds_links_and_names_the_tie(written):
    cells, paths, _ = written
    text = paths["md"].read_text(encoding="utf-8")
    assert text.startswith("# Transfer_strategies 100% & more")
    assert "Welch's t-test over the seeds' test accuracies, winner (best mean) vs runner-up" in text
    wide, detail, budget = markdown_tables(text)
    header, rows = wide[0], {r[0]: dict(zip(wide[0], r)) for r in wide[1:]}
    assert header == ["Quadrant", "Target", *STRATEGY_ORDER, "Winner", "Runner-up", "Margin", "p (Welch)",
                      "Significant", "Textbook rule", "Agrees with rule"]
    assert not [h for t in (wide, detail, budget) for h in t[0] if any(raw in h for raw in RAW_NAMES)]
    assert list(rows) == ["small-similar", "small-dissimilar", "large-similar", "large-dissimilar"]

    ss = rows["small-similar"]
    runs = {(q, s): r for q, s, r in zip(cells.quadrant, cells.strategy, cells.cell_run_id)}
    # Decisive winner: bold, linked to its cell run, "mean [95% interval]" with 3 decimals.
    assert ss["features"] == "**" + link("0.820 [0.795, 0.845]", runs[("small-similar", "features")]) + "**"
    assert ss["intermediate"] == link("0.710 [0.685, 0.735]", runs[("small-similar", "intermediate")])
    assert ss["Winner"] == "features" and ss["Margin"] == "0.110" and ss["p (Welch)"] == "0.000176"
    assert ss["Significant"] == "yes" and ss["Agrees with rule"] == "yes"

    sd = rows["small-dissimilar"]  # a tie: no bold, every tied strategy in italics and in the Winner column
    assert sd["Winner"] == "tie: full, partial, intermediate" and sd["Significant"] == "no"
    assert sd["Target"] == "med%scan&x" and sd["Textbook rule"] == "intermediate or partial"
    assert sd["full"].startswith("_[0.700 [") and sd["intermediate"].startswith("_[0.680 [")
    assert not sd["features"].startswith(("_", "*")) and "**" not in "".join(sd.values())
    assert re.fullmatch(r"0\.\d{3}|\d\.\d\de-\d\d|0\.0*\d{3}", sd["p (Welch)"])  # 3 significant digits
    ld = rows["large-dissimilar"]
    assert ld["scratch"] == "_" + link("0.880", runs[("large-dissimilar", "scratch")]) + "_"
    assert ld["p (Welch)"] == ""  # one seed: no p

    assert "## Verdicts" in text and "## budget" in text
    assert "large-similar (target places_365): no decisive winner; tie between partial, scratch" in text
    assert "small-similar (target cifar_10): features wins" in text


def test_markdown_detail_leaves_parameters_that_do_not_apply_blank(written):
    _, paths, _ = written
    _, detail, budget = markdown_tables(paths["md"].read_text(encoding="utf-8"))
    rows = {(r[0], r[1]): dict(zip(detail[0], r)) for r in detail[1:]}
    assert [rows[("small-similar", s)]["finetune lr"] for s in STRATEGY_ORDER] == ["", "", "0.0001", "0.0001", ""]
    assert [rows[("small-similar", s)]["cut fraction"] for s in STRATEGY_ORDER] == ["", "0.5", "", "", ""]
    assert {rows[("small-similar", s)]["head lr"] for s in STRATEGY_ORDER} == {"0.00316"}  # 3 significant
    features = rows[("small-similar", "features")]
    assert features["Test mean"] == "0.820" and features["Std"] == "0.010" and features["95% CI"] == "[0.795, 0.845]"
    assert features["Seeds"] == "3" and features["LogME"] == "1.250" and features["Epochs per seed"] == "12"
    assert features["p vs winner"] == "" and features["Cell run"].startswith("[cell00")
    assert rows[("small-similar", "partial")]["LogME"] == ""
    assert rows[("small-similar", "scratch")]["Tied with winner"] == "no"
    assert "Train seconds per seed" not in detail[0]  # blank for every cell: left out
    by_strategy = {r[0]: dict(zip(budget[0], r)) for r in budget[1:]}
    assert budget[0] == ["strategy", "unfreeze fraction", "gpu hours", "mlflow run id"]
    assert by_strategy["features"]["unfreeze fraction"] == "" and by_strategy["scratch"]["unfreeze fraction"] == ""
    assert by_strategy["partial"]["unfreeze fraction"] == "0.5" and by_strategy["partial"]["gpu hours"] == "1.25"
    assert by_strategy["full"]["mlflow run id"] == link("d", "d")


def test_latex_is_escaped_and_bolds_only_a_decisive_winner(written):
    _, paths, _ = written
    tex = paths["tex"].read_text(encoding="utf-8")
    assert "\\begin{tabular}" in tex and "\\end{tabular}" in tex and "\\toprule" in tex
    assert r"cifar\_10" in tex and r"med\%scan\&x" in tex and r"places\_365" in tex
    assert "cifar_10" not in tex.replace(r"cifar\_10", "")  # no unescaped underscore left behind
    assert r"\textbf{0.820 [0.795, 0.845]}" in tex  # the decisive winner
    assert r"\textit{0.700 [" in tex  # a member of a tie
    assert tex.count(r"\textbf{") == 1
    rows = [line for line in tex.splitlines() if line.endswith(r"\\")]
    # header + 4 quadrants, each with 2 + 5 strategies + 7 verdict columns
    assert len(rows) == 5 and all(line.count(" & ") == 13 for line in rows)
    assert "margin_exceeds_spread" not in tex and "Agrees with rule" in tex


class TableParser(HTMLParser):
    """Collects every <table> as rows of cell texts, every <a href> per table, every <img src>."""

    def __init__(self):
        super().__init__()
        self.tables, self.links, self.images, self._cell = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.tables.append([])
            self.links.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "a":
            self.links[-1].append(attrs.get("href"))
        elif tag == "img":
            self.images.append(attrs.get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_html_is_self_contained_links_runs_and_holds_the_numbers(written):
    cells, paths, _ = written
    page = paths["html"].read_text(encoding="utf-8")
    for forbidden in ("<script", "<link", 'src="http', "url("):  # nothing is loaded from elsewhere
        assert forbidden not in page.lower()
    assert "<style>" in page and 'src="data:image/png;base64,' in page

    parser = TableParser()
    parser.feed(page)
    assert len(parser.images) == 1
    png = base64.b64decode(parser.images[0].removeprefix("data:image/png;base64,"))
    assert png == paths["heatmap"].read_bytes()

    wide, detail, budget = parser.tables
    rows = {r[0]: dict(zip(wide[0], r)) for r in wide[1:]}
    assert rows["small-similar"]["features"] == "0.820 [0.795, 0.845]"
    assert rows["small-similar"]["Winner"] == "features"
    assert rows["small-dissimilar"]["Target"] == "med%scan&x"  # escaped as &amp; then parsed back
    assert rows["small-dissimilar"]["Winner"] == "tie: full, partial, intermediate"
    assert rows["small-dissimilar"]["Margin"] == "0.010" and rows["small-dissimilar"]["Significant"] == "no"
    assert rows["large-dissimilar"]["p (Welch)"] == ""

    # Every strategy cell links to its cell run; the detail table to the cell run and the best seed's run.
    expected = {f"http://ui.test:5000/#/experiments/7/runs/{r}" for r in cells["cell_run_id"]}
    assert set(parser.links[0]) == expected and len(parser.links[0]) == 20
    seeds = {f"http://ui.test:5000/#/experiments/7/runs/{r}" for r in cells["best_confirm_run_id"]}
    assert set(parser.links[1]) == expected | seeds
    assert parser.links[2] == [f"http://ui.test:5000/#/experiments/7/runs/{r}" for r in "abcde"]
    assert len(detail) == 21 and budget[0] == ["strategy", "unfreeze fraction", "gpu hours", "mlflow run id"]
    assert "<h1>Transfer_strategies 100% &amp; more</h1>" in page


def test_html_marks_the_decisive_winner_and_the_tie(written):
    _, paths, _ = written
    page = paths["html"].read_text(encoding="utf-8")
    marked = re.findall(r'<td id="T_comparison_row(\d)_col(\d+)" class="data row\d col\d+ (winner|tie)"', page)
    # row 0 small-similar: features (col 2) decisive; row 2 large-similar: partial (4) and scratch (6) tie
    assert ("0", "2", "winner") in marked and [m for m in marked if m[2] == "winner"] == [("0", "2", "winner")]
    assert {(c, k) for r, c, k in marked if r == "2"} == {("4", "tie"), ("6", "tie")}


def test_heatmap_colours_each_quadrant_row_on_its_own_scale(cells):
    fig = heatmap_figure(cells, "t")
    try:
        data = fig.axes[0].images[0].get_array()
        assert data.shape == (4, 5)
        values = np.ma.filled(data.astype(float), np.nan)
        np.testing.assert_allclose(np.nanmin(values, axis=1), 0.0)
        np.testing.assert_allclose(np.nanmax(values, axis=1), 1.0)
        # small-similar: (mean - row min) / (row max - row min), from the test means 0.82 .. 0.35
        np.testing.assert_allclose(values[0], (np.array([0.82, 0.71, 0.68, 0.62, 0.35]) - 0.35) / 0.47)
        labels = [t.get_text() for t in fig.axes[0].texts]
        assert "0.820\n[0.795, 0.845]\nbest" in labels and "0.710\n[0.685, 0.735]\n−0.110" in labels
    finally:
        plt.close(fig)


def test_heatmap_row_of_equal_scores_and_cells_not_run(cells):
    cells = cells[~((cells.quadrant == "small-similar") & (cells.strategy == "scratch"))].copy()
    cells.loc[cells.quadrant == "large-dissimilar", "test_mean"] = 0.5
    fig = heatmap_figure(cells)
    try:
        data = fig.axes[0].images[0].get_array()
        assert data.mask[0, 4]  # not run: masked, drawn grey
        assert np.allclose(data[3].filled(np.nan), 1.0)  # all equal: all best, no division by zero
        assert "not run" in [t.get_text() for t in fig.axes[0].texts]
    finally:
        plt.close(fig)


def test_heatmap_png_opens(written):
    _, paths, _ = written
    with Image.open(paths["heatmap"]) as image:
        image.verify()
    with Image.open(io.BytesIO(paths["heatmap"].read_bytes())) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 400 <= width <= 3000 and 200 <= height <= 2000 and width > height


def test_a_tie_names_its_cheapest_member_and_its_share_of_the_cost():
    from harness.export import _verdict_sentence

    cells = pd.DataFrame([
        {"quadrant": "small-similar", "size": "small", "similarity": "similar", "target": "t", "strategy": s,
         "best_val": m, "test_mean": m, "test_std": 0.03, "n_seeds": 3, "train_images_seen": seen}
        for s, m, seen in (("features", 0.80, 1000), ("full", 0.81, 8000))
    ])
    v = quadrant_verdicts(cells).iloc[0]
    assert not v["decisive"] and v["cheapest_in_tie"] == "features" and v["cheapest_cost_share"] == 0.125
    assert "features is within the tie at 1/8 of full's training cost" in _verdict_sentence(v)

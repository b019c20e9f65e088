"""harness.export: every written file read back; each format shows the analysis of harness.verdicts unchanged."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness import export
from harness.config import STRATEGIES, ParamSpec
from harness.export import comparison_table, heatmap_figure, write_comparison
from harness.strategies import UNUSED_PARAMETERS, strategy_search
from harness.verdicts import analyse, quadrant_verdicts
from tests.test_verdicts import NAN, make_cells, one_quadrant


@pytest.fixture
def cells() -> pd.DataFrame:
    return make_cells()


# --- what every renderer is handed --------------------------------------------------------------


def test_write_comparison_analyses_once(cells, tmp_path, monkeypatch):
    calls = []

    def counted(frame):
        calls.append(len(frame))
        return analyse(frame)

    monkeypatch.setattr(export, "analyse", counted)
    write_comparison(cells, tmp_path, "once", extra_tables={"budget": pd.DataFrame({"a": [1]})})
    assert calls == [len(cells)]


def test_missing_cells_do_not_crash(cells, tmp_path):
    # small-similar lost its winner; large-dissimilar ran scratch only; small-dissimilar's full has no score.
    cells = cells[~((cells.quadrant == "small-similar") & (cells.strategy == "features"))]
    cells = cells[~((cells.quadrant == "large-dissimilar") & (cells.strategy != "scratch"))].copy()
    full = cells.index[(cells.quadrant == "small-dissimilar") & (cells.strategy == "full")][0]
    cells.at[full, "test_mean"], cells.at[full, "test_accuracies"] = NAN, None

    wide = comparison_table(cells).set_index("quadrant")
    assert wide.loc["small-similar", "features"] == ""
    assert wide.loc["small-dissimilar", "full"] == ""
    assert wide.loc["large-dissimilar", "full"] == ""
    assert wide.loc["large-dissimilar", "scratch"] == "0.880"  # one seed: no interval

    paths = write_comparison(cells, tmp_path, "missing cells")
    assert all(p.exists() and p.stat().st_size > 0 for p in paths.values())
    assert len(pd.read_csv(paths["csv"])) == len(cells)


def test_bad_input_is_refused_before_anything_is_written(cells, tmp_path):
    with pytest.raises(ValueError, match="test_std"):
        write_comparison(cells.drop(columns=["test_std"]), tmp_path / "c", "t")
    with pytest.raises(ValueError, match="reserved"):
        write_comparison(cells, tmp_path / "a", "t", extra_tables={"comparison": cells})
    with pytest.raises(ValueError, match="letters"):
        write_comparison(cells, tmp_path / "b", "t", extra_tables={"../escape": cells})
    with pytest.raises(ValueError, match="empty"):
        write_comparison(cells.iloc[:0], tmp_path / "d", "t")
    assert not any((tmp_path / name).exists() for name in "abcd")  # checked before writing


# --- tables and files ---------------------------------------------------------------------------


@pytest.fixture
def written(cells, tmp_path):
    cells["cell_run_id"] = [f"cell{i:02d}" + "0" * 26 for i in range(len(cells))]
    cells["best_confirm_run_id"] = [f"seed{i:02d}" + "0" * 26 for i in range(len(cells))]
    cells["train_epochs"] = 12.0
    cells["param_finetune_lr"] = 1e-4
    cells["param_cut_fraction"] = 0.5
    cells["param_head_lr"] = 0.0031622776601683794
    budget = pd.DataFrame(
        {
            "strategy": list(STRATEGIES),
            "param_unfreeze_fraction": [0.0, 0.0, 0.5, 1.0, 1.0],
            "gpu_hours": [0.5, 0.7, 1.25, 2.0, 3.125],
            "mlflow_run_id": list("abcde"),
        }
    )
    paths = write_comparison(
        cells,
        tmp_path / "out",
        "Transfer_strategies 100% & more",
        extra_tables={"budget": budget},
        experiment_id="7",
        ui_url="http://ui.test:5000",
    )
    return cells, paths, budget


def test_returns_every_kind(written):
    _, paths, _ = written
    assert set(paths) == {"csv", "md", "tex", "heatmap", "html", "budget"}
    assert {p.name for p in paths.values()} == {
        "comparison.csv",
        "comparison.md",
        "comparison.tex",
        "heatmap.png",
        "comparison.html",
        "budget.csv",
    }
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


RAW_NAMES = ("agrees_with_textbook", "p_value", "runner_up", "n_seeds", "best_val", "test_mean", "param_", "tie_set", "is_winner")


def test_markdown_wide_table_rounds_links_and_names_the_tie(written):
    cells, paths, _ = written
    text = paths["md"].read_text(encoding="utf-8")
    assert text.startswith("# Transfer_strategies 100% & more")
    assert "Welch's t-test over the seeds' test accuracies, winner (best mean) vs runner-up" in text
    wide, detail, budget = markdown_tables(text)
    header, rows = wide[0], {r[0]: dict(zip(wide[0], r)) for r in wide[1:]}
    assert header == [
        "Quadrant",
        "Target",
        *STRATEGIES,
        "Winner",
        "Runner-up",
        "Margin",
        "p (Welch)",
        "Significant",
        "Textbook rule",
        "Agrees with rule",
    ]
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
    assert [rows[("small-similar", s)]["finetune lr"] for s in STRATEGIES] == ["", "", "0.0001", "0.0001", ""]
    assert [rows[("small-similar", s)]["cut fraction"] for s in STRATEGIES] == ["", "0.5", "", "", ""]
    assert {rows[("small-similar", s)]["head lr"] for s in STRATEGIES} == {"0.00316"}  # 3 significant
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
    assert not [raw for raw in RAW_NAMES if raw in tex or raw.replace("_", r"\_") in tex] and "Agrees with rule" in tex


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


def sentence(cells: pd.DataFrame) -> str:
    return export._verdict_sentence(next(analyse(cells).quadrants.itertuples(index=False)))


def test_each_kind_of_verdict_gets_its_own_sentence():
    decisive = sentence(one_quadrant([("features", 0.80, {}), ("full", 0.70, {})]))
    assert decisive.startswith("small-similar (target t): features wins (0.800 vs 0.700, margin 0.100)")
    assert "significant, and every other strategy is significantly worse" in decisive
    assert decisive.endswith("Textbook: features; the result agrees.")
    tie = sentence(one_quadrant([("features", 0.80, {}), ("full", 0.805, {})]))
    assert "no decisive winner; tie between full, features" in tie and tie.endswith("the result agrees.")
    rules = sentence(one_quadrant([("features", 0.80, {"training_rule": "a"}), ("full", 0.70, {"training_rule": "b"})]))
    assert "features scores best (0.800 vs 0.700)" in rules and "trained under different rules, so no winner is called" in rules
    assert rules.endswith("Trained under: a; b.")
    alone = sentence(one_quadrant([("full", 0.80, {})], "large", "similar"))
    assert alone.startswith("large-similar (target t): only full has a test score (0.800); nothing to compare")
    assert sentence(one_quadrant([("full", NAN, {})], "medium")) == "medium-similar (target t): no strategy has a test score."
    one_seed = sentence(one_quadrant([("features", 0.80, {"n_seeds": 1}), ("full", 0.805, {"n_seeds": 1})]))
    assert "no p-value (fewer than 2 seeds" in one_seed
    assert one_seed.endswith(", not significant. Textbook: features; the result agrees.")


def test_a_tie_names_its_cheapest_member_and_its_share_of_the_cost():
    cells = one_quadrant(
        [
            ("features", 0.80, {"train_images_seen": 1000}),
            ("partial", 0.805, {"train_images_seen": 6000}),
            ("full", 0.81, {"train_images_seen": 8000}),
        ]
    )
    cells["test_std"] = 0.03
    assert "features is within the tie at 1/8 of full's training cost" in sentence(cells)
    cells.loc[cells.strategy == "features", "train_images_seen"] = 6000
    assert "features is within the tie at 75% of full's training cost" in sentence(cells)
    assert "within the tie" not in sentence(cells.drop(columns=["train_images_seen"]))  # no cost, no claim


# --- parameters a strategy does not use ---------------------------------------------------------


def test_a_report_leaves_blank_exactly_the_parameters_the_search_pins():
    """One statement of applicability: what strategy_search does not search, the detail table leaves blank."""
    search = {
        "head_lr": ParamSpec("head_lr", "float", low=1e-4, high=1e-2),
        "finetune_lr": ParamSpec("finetune_lr", "float", low=1e-5, high=1e-3),
    }
    quadrants = SimpleNamespace(cut_range=(0.3, 0.7), partial_range=(0.2, 0.8))
    params = ("head_lr", "finetune_lr", "unfreeze_fraction", "cut_fraction")
    cells = one_quadrant([(s, 0.8 - 0.01 * i, {f"param_{p}": 0.5 for p in params}) for i, s in enumerate(STRATEGIES)])
    detail = export._detail_display(analyse(cells), None, export.DEFAULT_UI_URL).texts
    for strategy, row in zip(STRATEGIES, detail.itertuples(index=False)):
        pinned = {p for p, spec in strategy_search(strategy, search, quadrants).items() if spec.fixed}
        shown = dict(zip(detail.columns, row))
        blank = {p for p in params if shown[p.replace("_", " ")] == ""}
        assert blank == UNUSED_PARAMETERS[strategy] & set(params), strategy
        # A parameter a strategy does not use is never searched (full pins unfreeze_fraction at 1: it uses all).
        assert blank <= pinned, strategy


# --- under-trained cells ------------------------------------------------------------------------


def test_an_undertrained_cell_is_shown_as_such():
    cells = one_quadrant(
        [("features", 0.80, {"undertrained": 0}), ("full", 0.70, {"undertrained": 0}), ("scratch", 0.95, {"undertrained": 1})]
    )
    assert comparison_table(cells).iloc[0]["scratch"] == "0.950 [0.925, 0.975] (under-trained)"
    assert comparison_table(cells).iloc[0]["features"] == "0.800 [0.775, 0.825]"


def test_the_heatmap_greys_an_undertrained_cell_out_of_its_rows_scale():
    cells = one_quadrant(
        [("features", 0.80, {"undertrained": 0}), ("full", 0.70, {"undertrained": 0}), ("scratch", 0.95, {"undertrained": 1})]
    )
    fig = heatmap_figure(cells)
    scaled = fig.axes[0].images[0].get_array()
    texts = [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    assert scaled.mask[0, 2] and scaled[0, 0] == 1.0 and scaled[0, 1] == 0.0  # features is the row's best
    assert "under-trained" in texts

"""harness.export: the verdicts' values, and every written file read back and checked for content."""

from __future__ import annotations

import base64
import io
import math
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from harness.export import (
    STRATEGY_ORDER,
    TEXTBOOK,
    comparison_long,
    comparison_table,
    quadrant_verdicts,
    write_comparison,
)

NAN = math.nan

# (quadrant, size, similarity, target) -> {strategy: (best_val, test_mean, test_std, n_seeds, logme)}
# Designed so that each quadrant exercises a different verdict:
#   small-similar     features wins by 0.0222456 > spread 0.010         -> exceeds, agrees
#   small-dissimilar  full wins by 0.01 < spread 0.03 (partial's rule)  -> does not exceed, disagrees
#   large-similar     full wins by 0.02 > spread 0.004                  -> exceeds, agrees
#   large-dissimilar  one seed each (std NaN): scratch by 0.01 > 0      -> exceeds, agrees
DESIGN = {
    ("small-similar", "small", "similar", "cifar_10"): {
        "features": (0.8249, 0.8123456, 0.005, 3, 1.25),
        "intermediate": (0.8011, 0.7901, 0.010, 3, 1.10),
        "partial": (0.79, 0.77, 0.020, 3, NAN),
        "full": (0.78, 0.75, 0.030, 3, NAN),
        "scratch": (0.45, 0.40, 0.050, 3, NAN),
    },
    ("small-dissimilar", "small", "dissimilar", "med%scan&x"): {
        "features": (0.56, 0.55, 0.020, 3, 0.5),
        "intermediate": (0.67, 0.66, 0.010, 3, 0.7),
        "partial": (0.71, 0.69, 0.020, 3, NAN),
        "full": (0.72, 0.70, 0.030, 3, NAN),
        "scratch": (0.53, 0.52, 0.040, 3, NAN),
    },
    ("large-similar", "large", "similar", "places_365"): {
        "features": (0.81, 0.80, 0.004, 3, NAN),
        "intermediate": (0.79, 0.78, 0.004, 3, NAN),
        "partial": (0.94, 0.93, 0.004, 3, NAN),
        "full": (0.96, 0.95, 0.002, 3, NAN),
        "scratch": (0.91, 0.90, 0.006, 3, NAN),
    },
    ("large-dissimilar", "large", "dissimilar", "x_ray"): {
        "features": (0.61, 0.60, NAN, 1, NAN),
        "intermediate": (0.71, 0.70, NAN, 1, NAN),
        "partial": (0.86, 0.85, NAN, 1, NAN),
        "full": (0.88, 0.87, NAN, 1, NAN),
        "scratch": (0.89, 0.88, NAN, 1, NAN),
    },
}


def make_cells() -> pd.DataFrame:
    rows = []
    for (quadrant, size, similarity, target), by_strategy in DESIGN.items():
        for strategy, (best_val, mean, std, n_seeds, logme) in by_strategy.items():
            rows.append({"quadrant": quadrant, "size": size, "similarity": similarity, "target": target,
                         "strategy": strategy, "best_val": best_val, "test_mean": mean, "test_std": std,
                         "n_seeds": n_seeds, "logme": logme})
    return pd.DataFrame(rows)


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


def test_verdicts_values(cells):
    v = quadrant_verdicts(cells)
    assert list(v["quadrant"]) == ["small-similar", "small-dissimilar", "large-similar", "large-dissimilar"]

    ss = verdict(v, "small-similar")
    assert (ss.winner, ss.runner_up, ss.target) == ("features", "intermediate", "cifar_10")
    assert ss.winner_test_mean == 0.8123456 and ss.runner_up_test_mean == 0.7901
    assert ss.margin == pytest.approx(0.0222456)
    assert ss.spread == pytest.approx(0.010)
    assert ss.margin_exceeds_spread
    assert bool(ss.agrees_with_textbook) and ss.textbook == "features"

    sd = verdict(v, "small-dissimilar")
    assert (sd.winner, sd.runner_up) == ("full", "partial")
    assert sd.margin == pytest.approx(0.01) and sd.spread == pytest.approx(0.03)
    assert not sd.margin_exceeds_spread
    assert not sd.agrees_with_textbook and sd.textbook == "intermediate or partial"

    ls = verdict(v, "large-similar")
    assert (ls.winner, ls.runner_up) == ("full", "partial")
    assert ls.margin == pytest.approx(0.02) and ls.spread == pytest.approx(0.004)
    assert ls.margin_exceeds_spread and ls.agrees_with_textbook

    # One seed: stds are NaN, so the margin is judged against a spread of 0.
    ld = verdict(v, "large-dissimilar")
    assert (ld.winner, ld.runner_up) == ("scratch", "full")
    assert ld.margin == pytest.approx(0.01) and ld.spread == 0.0
    assert ld.margin_exceeds_spread and ld.agrees_with_textbook and ld.textbook == "full or scratch"

    assert v["margin_exceeds_spread"].dtype == bool and v["agrees_with_textbook"].dtype == bool
    assert not v["tied"].any()


def test_tie_is_broken_by_strategy_order_and_never_exceeds_spread(cells):
    # features and intermediate tie exactly; with float noise, partial and full tie in another quadrant.
    cells.loc[(cells.quadrant == "small-similar") & (cells.strategy == "intermediate"), "test_mean"] = 0.8123456
    dis = cells.quadrant == "large-dissimilar"
    cells.loc[dis & (cells.strategy == "scratch"), "test_mean"] = 0.1 + 0.2  # 0.30000000000000004
    cells.loc[dis & (cells.strategy == "full"), "test_mean"] = 0.3
    cells.loc[dis & cells.strategy.isin(["features", "intermediate", "partial"]), "test_mean"] = 0.1
    v = quadrant_verdicts(cells)

    ss = verdict(v, "small-similar")
    assert (ss.winner, ss.runner_up, ss.margin, bool(ss.tied)) == ("features", "intermediate", 0.0, True)
    assert not ss.margin_exceeds_spread

    ld = verdict(v, "large-dissimilar")  # spread 0 (one seed) and margin 0: still not "exceeds"
    assert (ld.winner, ld.runner_up, ld.margin, ld.spread, bool(ld.tied)) == ("full", "scratch", 0.0, 0.0, True)
    assert not ld.margin_exceeds_spread


def test_zero_std_counts_as_zero_spread(cells):
    quadrant = cells.quadrant == "large-similar"
    cells.loc[quadrant, "test_std"] = 0.0
    ls = verdict(quadrant_verdicts(cells), "large-similar")
    assert ls.spread == 0.0 and ls.margin_exceeds_spread


def test_missing_cells_do_not_crash(cells, tmp_path):
    # small-similar lost its winner; large-dissimilar ran scratch only; small-dissimilar's full has no score.
    cells = cells[~((cells.quadrant == "small-similar") & (cells.strategy == "features"))]
    cells = cells[~((cells.quadrant == "large-dissimilar") & (cells.strategy != "scratch"))].copy()
    cells.loc[(cells.quadrant == "small-dissimilar") & (cells.strategy == "full"), "test_mean"] = NAN
    v = quadrant_verdicts(cells)

    ss = verdict(v, "small-similar")
    assert (ss.winner, ss.runner_up) == ("intermediate", "partial")
    assert ss.margin == pytest.approx(0.0201) and not ss.agrees_with_textbook

    sd = verdict(v, "small-dissimilar")  # full's NaN score is out of the ranking
    assert (sd.winner, sd.runner_up) == ("partial", "intermediate") and sd.agrees_with_textbook

    ld = verdict(v, "large-dissimilar")
    assert ld.winner == "scratch" and pd.isna(ld.runner_up) and pd.isna(ld.runner_up_test_mean)
    assert math.isnan(ld.margin) and not ld.margin_exceeds_spread and ld.agrees_with_textbook

    wide = comparison_table(cells).set_index("quadrant")
    assert wide.loc["small-similar", "features"] == ""
    assert wide.loc["small-dissimilar", "full"] == ""
    assert wide.loc["large-dissimilar", "full"] == ""
    assert wide.loc["large-dissimilar", "scratch"] == "0.880 (val 0.890)"  # one seed: no '±'

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
    assert not row.margin_exceeds_spread


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

def test_long_form_keeps_every_cell_and_adds_verdicts(cells):
    long = comparison_long(cells)
    assert len(long) == 20
    assert long["is_winner"].sum() == 4
    winners = long[long.is_winner].set_index("quadrant")["strategy"].to_dict()
    assert winners == {"small-similar": "features", "small-dissimilar": "full",
                       "large-similar": "full", "large-dissimilar": "scratch"}
    assert {"winner", "margin", "spread", "margin_exceeds_spread", "agrees_with_textbook", "logme"} <= set(long.columns)


@pytest.fixture
def written(cells, tmp_path):
    budget = pd.DataFrame({"strategy": STRATEGY_ORDER, "gpu_hours": [0.5, 0.7, 1.25, 2.0, 3.125]})
    paths = write_comparison(cells, tmp_path / "out", "Transfer_strategies 100% & more",
                             extra_tables={"budget": budget})
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
    for column in ("best_val", "test_mean", "test_std", "n_seeds", "logme"):
        np.testing.assert_array_equal(merged[f"{column}_in"].to_numpy(float), merged[f"{column}_out"].to_numpy(float))
    for column in ("size", "similarity", "target"):
        assert list(merged[f"{column}_in"]) == list(merged[f"{column}_out"])

    # The verdict columns are there too, per cell, and parse back as numbers and booleans.
    verdicts = quadrant_verdicts(cells).set_index("quadrant")
    for quadrant, rows in back.groupby("quadrant"):
        assert set(rows["winner"]) == {verdicts.loc[quadrant, "winner"]}
        assert rows["margin"].iloc[0] == pytest.approx(verdicts.loc[quadrant, "margin"], abs=1e-15)
        assert rows["margin_exceeds_spread"].iloc[0] == verdicts.loc[quadrant, "margin_exceeds_spread"]
        assert rows["agrees_with_textbook"].iloc[0] == verdicts.loc[quadrant, "agrees_with_textbook"]
    assert back["margin_exceeds_spread"].dtype == bool

    pd.testing.assert_frame_equal(pd.read_csv(paths["budget"]), budget)


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every pipe table in `text` as rows of stripped cell strings (the --- rule dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= {"-", ":"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


def test_markdown_wide_table_and_verdicts(written):
    _, paths, _ = written
    text = paths["md"].read_text(encoding="utf-8")
    assert text.startswith("# Transfer_strategies 100% & more")
    wide, detail, budget = markdown_tables(text)
    header, rows = wide[0], {r[0]: dict(zip(wide[0], r)) for r in wide[1:]}
    assert header[:7] == ["quadrant", "target", *STRATEGY_ORDER]
    assert list(rows) == ["small-similar", "small-dissimilar", "large-similar", "large-dissimilar"]

    ss = rows["small-similar"]
    assert ss["winner"] == "features" and ss["margin"] == "0.022" and ss["spread"] == "0.010"
    assert ss["margin_exceeds_spread"] == "yes" and ss["agrees_with_textbook"] == "yes"
    assert ss["features"] == "**0.812 ± 0.005 (val 0.825)**"  # the winner is bold
    assert ss["intermediate"] == "0.790 ± 0.010 (val 0.801)"

    sd = rows["small-dissimilar"]
    assert sd["winner"] == "full" and sd["target"] == "med%scan&x"
    assert sd["margin_exceeds_spread"] == "no" and sd["agrees_with_textbook"] == "no"
    assert sd["textbook"] == "intermediate or partial"
    assert rows["large-dissimilar"]["scratch"] == "**0.880 (val 0.890)**"  # one seed: no std to show

    # Per-cell detail shows LogME, blank where it is NaN.
    detail_rows = {(r[0], r[1]): dict(zip(detail[0], r)) for r in detail[1:]}
    assert detail_rows[("small-similar", "features")]["logme"] == "1.250"
    assert detail_rows[("small-similar", "partial")]["logme"] == ""
    assert detail_rows[("large-dissimilar", "full")]["n_seeds"] == "1"

    assert "## Verdicts" in text and "## budget" in text
    assert budget[0] == ["strategy", "gpu_hours"] and budget[3] == ["partial", "1.250"]


def test_latex_tabular_is_escaped(written):
    _, paths, _ = written
    tex = paths["tex"].read_text(encoding="utf-8")
    assert "\\begin{tabular}" in tex and "\\end{tabular}" in tex
    assert r"cifar\_10" in tex and r"med\%scan\&x" in tex and r"places\_365" in tex
    assert "cifar_10" not in tex.replace(r"cifar\_10", "")  # no unescaped underscore left behind
    assert r"$\mathbf{0.812 \pm 0.005}$" in tex  # the winner
    assert r"$0.790 \pm 0.010$" in tex
    body = [line for line in tex.splitlines() if line.startswith("small-dissimilar")]
    assert len(body) == 1 and body[0].endswith(r"\\")
    # every row has as many cells as the header: 2 + 5 strategies + 6 verdict columns
    rows = [line for line in tex.splitlines() if line.endswith(r"\\")]
    assert len(rows) == 5 and all(line.count(" & ") == 12 for line in rows)


class TableParser(HTMLParser):
    """Collects every <table> as rows of cell texts, and every <img src>."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs).get("src", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_html_is_self_contained_and_holds_the_numbers(written):
    _, paths, _ = written
    page = paths["html"].read_text(encoding="utf-8")
    for forbidden in ("http://", "https://", "<script src", "<link"):
        assert forbidden not in page.lower()
    assert "<style>" in page and 'src="data:image/png;base64,' in page

    parser = TableParser()
    parser.feed(page)
    assert len(parser.images) == 1
    png = base64.b64decode(parser.images[0].removeprefix("data:image/png;base64,"))
    assert png == paths["heatmap"].read_bytes()

    wide, detail, budget = parser.tables
    rows = {r[0]: dict(zip(wide[0], r)) for r in wide[1:]}
    assert rows["small-similar"]["features"] == "0.812 ± 0.005 (val 0.825)"
    assert rows["small-similar"]["winner"] == "features"
    assert rows["small-dissimilar"]["target"] == "med%scan&x"  # escaped as &amp; then parsed back
    assert rows["small-dissimilar"]["margin"] == "0.010" and rows["small-dissimilar"]["spread"] == "0.030"
    assert rows["small-dissimilar"]["margin_exceeds_spread"] == "no"
    assert rows["large-dissimilar"]["winner"] == "scratch" and rows["large-dissimilar"]["spread"] == "0.000"
    assert 'class="winner"' in page
    assert len(detail) == 21 and budget[0] == ["strategy", "gpu_hours"]
    assert "<h1>Transfer_strategies 100% &amp; more</h1>" in page


def test_heatmap_png_opens(written):
    _, paths, _ = written
    with Image.open(paths["heatmap"]) as image:
        image.verify()
    with Image.open(io.BytesIO(paths["heatmap"].read_bytes())) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 400 <= width <= 3000 and 200 <= height <= 2000 and width > height

"""Export the strategy-by-quadrant comparison: per-quadrant verdicts, tables and a heatmap.

The sweep compares transfer-learning strategies (``features``, ``intermediate``, ``partial``,
``full``, ``scratch``) in four quadrants (target size small|large x similarity to the pretraining
data similar|dissimilar). Each (quadrant, strategy) cell was searched, its best configuration was
retrained with several seeds and tested once. This module turns those cells into:

* ``quadrant_verdicts``: who won each quadrant, by how much, whether the gap beats the seed-to-seed
  spread, and whether the winner is what the textbook rule recommends;
* ``comparison_long`` / ``comparison_table``: the machine-readable long form and the human wide form;
* ``write_comparison``: CSV, Markdown, LaTeX, a PNG heatmap and one offline HTML page.

Everything here is pure pandas + matplotlib (Agg backend): no TensorFlow, MLflow or Optuna, so a
report can be rebuilt from a CSV on any laptop.

    >>> import pandas as pd
    >>> from harness.export import quadrant_verdicts, write_comparison
    >>> cells = pd.DataFrame([
    ...     {"quadrant": "small-similar", "size": "small", "similarity": "similar", "target": "flowers",
    ...      "strategy": "features", "best_val": 0.83, "test_mean": 0.81, "test_std": 0.01, "n_seeds": 3},
    ...     {"quadrant": "small-similar", "size": "small", "similarity": "similar", "target": "flowers",
    ...      "strategy": "full", "best_val": 0.80, "test_mean": 0.78, "test_std": 0.02, "n_seeds": 3},
    ... ])
    >>> v = quadrant_verdicts(cells).iloc[0]
    >>> v.winner, round(float(v.margin), 3), bool(v.margin_exceeds_spread), bool(v.agrees_with_textbook)
    ('features', 0.03, True, True)
    >>> paths = write_comparison(cells, "results/comparison", title="Transfer strategies")
    >>> sorted(paths)
    ['csv', 'heatmap', 'html', 'md', 'tex']

Numbers in the human-readable outputs (Markdown, LaTeX, HTML, heatmap) are rounded to 3 decimals;
the CSV files keep full precision so that ``pd.read_csv`` gives back exactly the numbers passed in.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

# --- the rules and the fixed orders -------------------------------------------------------------

# (size, similarity) -> the strategies the textbook rule recommends for that quadrant.
TEXTBOOK: dict[tuple[str, str], tuple[str, ...]] = {
    ("small", "similar"): ("features",),
    ("small", "dissimilar"): ("intermediate", "partial"),
    ("large", "similar"): ("full",),
    ("large", "dissimilar"): ("full", "scratch"),
}

# Roughly "how much of the network is trained", cheapest first. Used for column order and to break
# exact ties: when two strategies score the same, the one that trains less is the sensible pick.
STRATEGY_ORDER = ["features", "intermediate", "partial", "full", "scratch"]

# Rows are shown small before large, similar before dissimilar (the order the rules are stated in).
_SIZE_ORDER = ["small", "large"]
_SIMILARITY_ORDER = ["similar", "dissimilar"]

REQUIRED_COLUMNS = ("quadrant", "size", "similarity", "target", "strategy",
                    "best_val", "test_mean", "test_std", "n_seeds")
_NUMERIC_COLUMNS = ("best_val", "test_mean", "test_std", "n_seeds", "logme")

VERDICT_COLUMNS = ["quadrant", "size", "similarity", "target", "winner", "winner_test_mean",
                   "runner_up", "runner_up_test_mean", "margin", "spread", "margin_exceeds_spread",
                   "textbook", "agrees_with_textbook", "tied"]

# Test means closer than this are a tie: averages of the same accuracies can differ in the last bit
# (0.1 + 0.2 != 0.3), and such a "margin" must not count as beating a spread of 0.
_TIE_TOLERANCE = 1e-9

# Names of the files write_comparison always writes, and the keys of the dict it returns; an extra
# table with one of these names would overwrite one of them or shadow its key.
_RESERVED_NAMES = {"comparison", "heatmap", "csv", "md", "tex", "html"}


# --- input checks and orderings -----------------------------------------------------------------

def _validated(cells: pd.DataFrame) -> pd.DataFrame:
    """A checked copy of `cells`: required columns present, numbers numeric, one row per cell."""
    missing = [c for c in REQUIRED_COLUMNS if c not in cells.columns]
    if missing:
        raise ValueError(f"cells is missing column(s) {missing}; it needs {list(REQUIRED_COLUMNS)}")
    cells = cells.copy()
    for column in ("quadrant", "size", "similarity", "target", "strategy"):
        cells[column] = cells[column].astype(str)
    for column in _NUMERIC_COLUMNS:
        if column in cells.columns:
            # errors="raise": a typo like "0,81" must fail loudly, not silently become a blank cell.
            cells[column] = pd.to_numeric(cells[column], errors="raise").astype(float)
    duplicated = cells.duplicated(["quadrant", "strategy"], keep=False)
    if duplicated.any():
        pairs = sorted(set(zip(cells.loc[duplicated, "quadrant"], cells.loc[duplicated, "strategy"])))
        raise ValueError(f"cells has more than one row for (quadrant, strategy) {pairs}")
    return cells


def _strategy_key(name: str) -> tuple[int, str]:
    """Sort key: STRATEGY_ORDER first, any other strategy after them alphabetically."""
    return (STRATEGY_ORDER.index(name) if name in STRATEGY_ORDER else len(STRATEGY_ORDER), name)


def _strategies(cells: pd.DataFrame) -> list[str]:
    """The strategies that appear anywhere in `cells`, in display order."""
    return sorted(cells["strategy"].unique(), key=_strategy_key)


def _rule(size: str, similarity: str) -> tuple[str, ...]:
    return TEXTBOOK.get((size.strip().lower(), similarity.strip().lower()), ())


def _quadrant_groups(cells: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(quadrant, its rows) in display order: small before large, similar before dissimilar."""
    def key(item):
        name, group = item
        size = str(group["size"].iloc[0]).lower()
        similarity = str(group["similarity"].iloc[0]).lower()
        return (_SIZE_ORDER.index(size) if size in _SIZE_ORDER else len(_SIZE_ORDER),
                _SIMILARITY_ORDER.index(similarity) if similarity in _SIMILARITY_ORDER else len(_SIMILARITY_ORDER),
                name)
    return sorted(cells.groupby("quadrant", sort=False), key=key)


def _zero_if_nan(value: float) -> float:
    # A single seed has no std (NaN): the spec compares the margin against 0 in that case.
    return 0.0 if value is None or not math.isfinite(value) else float(value)


# --- verdicts and tables ------------------------------------------------------------------------

def quadrant_verdicts(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per quadrant: the winner, its margin over the runner-up, and the textbook check.

    `cells` has one row per (quadrant, strategy) with columns quadrant, size, similarity, target,
    strategy, best_val, test_mean, test_std, n_seeds and optionally logme. Cells without a test
    score (not run, or NaN) take no part in the ranking.

    Columns returned: quadrant, size, similarity, target, winner, winner_test_mean, runner_up,
    runner_up_test_mean, margin (winner minus runner-up test mean), spread (the larger of the two
    stds, NaN counted as 0), margin_exceeds_spread (margin > spread), textbook (the rule's
    strategies joined by ' or '), agrees_with_textbook (winner in the rule), and tied (the top two
    test means are equal; the tie is broken by STRATEGY_ORDER and the margin is 0).
    """
    cells = _validated(cells)
    rows = []
    for quadrant, group in _quadrant_groups(cells):
        first = group.iloc[0]
        rule = _rule(first["size"], first["similarity"])
        scored = group.dropna(subset=["test_mean"]).copy()
        # Rounding the sort key makes float-noise ties fall through to the STRATEGY_ORDER tie-break.
        scored["_score"] = scored["test_mean"].round(9)
        scored["_order"] = [_strategy_key(s) for s in scored["strategy"]]
        ranked = scored.sort_values(["_score", "_order"], ascending=[False, True])

        winner = ranked.iloc[0] if len(ranked) >= 1 else None
        runner = ranked.iloc[1] if len(ranked) >= 2 else None
        if winner is None:
            margin, spread = math.nan, math.nan
        elif runner is None:
            margin, spread = math.nan, _zero_if_nan(winner["test_std"])
        else:
            margin = float(winner["test_mean"] - runner["test_mean"])
            spread = max(_zero_if_nan(winner["test_std"]), _zero_if_nan(runner["test_std"]))
        tied = runner is not None and abs(margin) <= _TIE_TOLERANCE
        if tied:
            margin = 0.0
        rows.append({
            "quadrant": quadrant, "size": first["size"], "similarity": first["similarity"],
            "target": first["target"],
            "winner": winner["strategy"] if winner is not None else None,
            "winner_test_mean": float(winner["test_mean"]) if winner is not None else math.nan,
            "runner_up": runner["strategy"] if runner is not None else None,
            "runner_up_test_mean": float(runner["test_mean"]) if runner is not None else math.nan,
            "margin": margin,
            "spread": spread,
            # NaN margin (no runner-up) compares False: one strategy alone proves nothing.
            "margin_exceeds_spread": bool(margin > spread),
            "textbook": " or ".join(rule),
            "agrees_with_textbook": winner is not None and winner["strategy"] in rule,
            "tied": bool(tied),
        })
    return pd.DataFrame(rows, columns=VERDICT_COLUMNS).astype(
        {"margin_exceeds_spread": bool, "agrees_with_textbook": bool, "tied": bool})


def comparison_long(cells: pd.DataFrame) -> pd.DataFrame:
    """The machine-readable long form: every input cell (all its columns, numbers unrounded), an
    is_winner flag, and its quadrant's verdict columns. This is what comparison.csv holds."""
    cells = _validated(cells)
    verdicts = quadrant_verdicts(cells).drop(columns=["size", "similarity", "target"])
    long = cells.merge(verdicts, on="quadrant", how="left")
    long["is_winner"] = long["strategy"] == long["winner"]

    # Known cell columns first, then whatever else the caller passed (e.g. backbone), then verdicts.
    cell_columns = [c for c in (*REQUIRED_COLUMNS, "logme") if c in cells.columns]
    other_columns = [c for c in cells.columns if c not in cell_columns]
    verdict_columns = [c for c in verdicts.columns if c != "quadrant"]
    long = long[cell_columns + other_columns + ["is_winner"] + verdict_columns]

    quadrant_rank = {q: i for i, (q, _) in enumerate(_quadrant_groups(cells))}
    order = sorted(range(len(long)), key=lambda i: (quadrant_rank[long["quadrant"].iloc[i]],
                                                    _strategy_key(long["strategy"].iloc[i])))
    return long.iloc[order].reset_index(drop=True)


def _cell_text(test_mean: float, test_std: float, best_val: float) -> str:
    """'0.812 ± 0.010 (val 0.830)'; no '± …' without a std (one seed), '' when not run."""
    if not math.isfinite(test_mean):
        return ""
    text = f"{test_mean:.3f}"
    if math.isfinite(test_std):
        text += f" ± {test_std:.3f}"
    if math.isfinite(best_val):
        text += f" (val {best_val:.3f})"
    return text


def comparison_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The human wide form: one row per quadrant, one text column per strategy, then the verdict.

    Strategy columns read 'mean ± std (val best_val)': the test accuracy over seeds with the
    search's best validation score beside it; a blank string means the cell was not run. Only
    strategies that appear somewhere in `cells` get a column. The verdict columns (winner,
    runner_up, margin, spread, margin_exceeds_spread, textbook, agrees_with_textbook, tied) stay
    numeric/boolean. For the machine-readable long form use `comparison_long`.
    """
    cells = _validated(cells)
    verdicts = quadrant_verdicts(cells)
    strategies = _strategies(cells)
    by_cell = {(r.quadrant, r.strategy): r for r in cells.itertuples(index=False)}
    rows = []
    for v in verdicts.itertuples(index=False):
        row = {"quadrant": v.quadrant, "target": v.target}
        for strategy in strategies:
            cell = by_cell.get((v.quadrant, strategy))
            row[strategy] = "" if cell is None else _cell_text(cell.test_mean, cell.test_std, cell.best_val)
        row.update({"winner": v.winner, "runner_up": v.runner_up, "margin": v.margin, "spread": v.spread,
                    "margin_exceeds_spread": v.margin_exceeds_spread, "textbook": v.textbook,
                    "agrees_with_textbook": v.agrees_with_textbook, "tied": v.tied})
        rows.append(row)
    columns = ["quadrant", "target", *strategies, "winner", "runner_up", "margin", "spread",
               "margin_exceeds_spread", "textbook", "agrees_with_textbook", "tied"]
    return pd.DataFrame(rows, columns=columns)


# --- text formatting shared by the writers ------------------------------------------------------

def _text(value, column: str = "") -> str:
    """One value as display text: 3 decimals, yes/no for booleans, '' for missing."""
    if value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(value)):
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        if column == "n_seeds" and float(value).is_integer():
            return str(int(value))  # seeds are counts even if a NaN elsewhere made the column float
        return f"{value:.3f}"
    if value is pd.NA or value is pd.NaT:
        return ""
    return str(value)


def _verdict_sentence(v) -> str:
    """One plain-language line per quadrant (markdown/HTML verdict lists)."""
    head = f"{v.quadrant} (target {v.target})"
    if v.winner is None or (isinstance(v.winner, float) and math.isnan(v.winner)):
        return f"{head}: no strategy has a test score."
    text = f"{head}: winner {v.winner} ({v.winner_test_mean:.3f})"
    if isinstance(v.runner_up, str):
        text += f", runner-up {v.runner_up} ({v.runner_up_test_mean:.3f})"
        if v.tied:
            text += "; a tie, broken in favour of the strategy that trains less"
        comparison = ">" if v.margin_exceeds_spread else "≤"
        verdict = "larger than" if v.margin_exceeds_spread else "within"
        text += f"; margin {v.margin:.3f} {comparison} spread {v.spread:.3f}, {verdict} the seed-to-seed spread"
        if v.spread == 0:
            text += " (spread 0: a single seed or identical seeds)"
    else:
        text += "; no runner-up (only one strategy has a test score)"
    agreement = "agrees" if v.agrees_with_textbook else "disagrees"
    rule = v.textbook or "no rule for this quadrant"
    return text + f". Textbook: {rule}; the result {agreement}."


def _detail_frame(cells: pd.DataFrame) -> pd.DataFrame:
    """The per-cell numbers shown under the wide table (this is where LogME is visible)."""
    long = comparison_long(cells)
    columns = ["quadrant", "strategy", "test_mean", "test_std", "best_val", "n_seeds"]
    if "logme" in long.columns:
        columns.append("logme")
    return long[columns + ["is_winner"]]


def _extra_frame(table: pd.DataFrame) -> pd.DataFrame:
    """An extra table as written: a meaningful index (named, or not 0..n-1) becomes columns."""
    is_default_index = isinstance(table.index, pd.RangeIndex) and table.index.name is None \
        and table.index.start == 0 and table.index.step == 1
    frame = table if is_default_index else table.reset_index()
    frame = frame.copy()
    frame.columns = [str(c) for c in frame.columns]
    return frame


# --- Markdown -----------------------------------------------------------------------------------

def _md_escape(text: str) -> str:
    # A '|' would split the cell; a newline would end the row.
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_table(frame: pd.DataFrame, bold: set[tuple[int, str]] = frozenset()) -> str:
    """A GitHub-style pipe table written by hand (no `tabulate` dependency). `bold` holds
    (row position, column) pairs whose text is wrapped in ** (the quadrant winners)."""
    header = "| " + " | ".join(_md_escape(str(c)) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    lines = [header, rule]
    for i, row in enumerate(frame.itertuples(index=False)):
        texts = []
        for column, value in zip(frame.columns, row):
            text = _md_escape(_text(value, column))
            texts.append(f"**{text}**" if (i, column) in bold and text else text)
        lines.append("| " + " | ".join(texts) + " |")
    return "\n".join(lines)


def _winner_positions(wide: pd.DataFrame) -> set[tuple[int, str]]:
    return {(i, w) for i, w in enumerate(wide["winner"]) if isinstance(w, str) and w in wide.columns}


def _markdown(cells: pd.DataFrame, title: str, extra: dict[str, pd.DataFrame]) -> str:
    wide = comparison_table(cells)
    verdicts = quadrant_verdicts(cells)
    parts = [
        f"# {title}", "",
        "Test accuracy per quadrant and strategy: mean ± std over seeds, with the search's best "
        "validation score in brackets. **Bold** marks the quadrant's winner; a blank cell was not run.", "",
        _markdown_table(wide, _winner_positions(wide)), "",
        "## Verdicts", "",
        *[f"- {_verdict_sentence(v)}" for v in verdicts.itertuples(index=False)], "",
        "## Per-cell detail", "",
        _markdown_table(_detail_frame(cells)), "",
    ]
    for name, table in extra.items():
        parts += [f"## {name}", "", _markdown_table(_extra_frame(table)), ""]
    return "\n".join(parts)


# --- LaTeX --------------------------------------------------------------------------------------

_LATEX_SPECIALS = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def _latex_escape(text: str) -> str:
    # One pass, so the backslashes this inserts are not themselves escaped again.
    return re.sub(r"[\\&%$#_{}~^]", lambda m: _LATEX_SPECIALS[m.group()], text)


def _latex(cells: pd.DataFrame, title: str) -> str:
    """A plain `tabular` (only \\hline, so it compiles without booktabs) to \\input into a paper.
    Cells show the test mean ± std; the search's best val is left to the CSV to keep it printable."""
    cells = _validated(cells)
    verdicts = quadrant_verdicts(cells)
    strategies = _strategies(cells)
    by_cell = {(r.quadrant, r.strategy): r for r in cells.itertuples(index=False)}
    header = ["Quadrant", "Target", *strategies, "Winner", "Margin", "Spread", "Margin $>$ spread",
              "Textbook", "Agrees"]
    lines = [
        "% " + title.replace("\n", " "),
        "% Test accuracy, mean $\\pm$ std over seeds; bold = the quadrant's winner; blank = not run.",
        "\\begin{tabular}{ll" + "c" * len(strategies) + "lrrlll}",
        "\\hline",
        " & ".join(h if h.startswith("Margin $") else _latex_escape(h) for h in header) + " \\\\",
        "\\hline",
    ]
    for v in verdicts.itertuples(index=False):
        row = [_latex_escape(v.quadrant), _latex_escape(v.target)]
        for strategy in strategies:
            cell = by_cell.get((v.quadrant, strategy))
            if cell is None or not math.isfinite(cell.test_mean):
                row.append("")
                continue
            math_text = f"{cell.test_mean:.3f}"
            if math.isfinite(cell.test_std):
                math_text += f" \\pm {cell.test_std:.3f}"
            # \textbf does not reach inside math mode; \mathbf bolds the digits of the winner.
            row.append(f"$\\mathbf{{{math_text}}}$" if strategy == v.winner else f"${math_text}$")
        row += [_latex_escape(_text(v.winner)), _text(v.margin), _text(v.spread),
                _text(v.margin_exceeds_spread), _latex_escape(v.textbook), _text(v.agrees_with_textbook)]
        lines.append(" & ".join(row) + " \\\\")
    lines += ["\\hline", "\\end{tabular}", ""]
    return "\n".join(lines)


# --- heatmap ------------------------------------------------------------------------------------

def heatmap_figure(cells: pd.DataFrame, title: str = ""):
    """Quadrant x strategy matrix of test_mean, each cell annotated 'mean ± std', the winner outlined.
    Cells not run are grey and say so. Returns the matplotlib Figure (the caller closes it)."""
    cells = _validated(cells)
    verdicts = quadrant_verdicts(cells)
    strategies = _strategies(cells)
    quadrants = list(verdicts["quadrant"])
    means = np.full((len(quadrants), len(strategies)), np.nan)
    stds = np.full_like(means, np.nan)
    for r in cells.itertuples(index=False):
        i, j = quadrants.index(r.quadrant), strategies.index(r.strategy)
        means[i, j], stds[i, j] = r.test_mean, r.test_std

    fig, ax = plt.subplots(figsize=(1.7 * len(strategies) + 3.0, 0.9 * len(quadrants) + 1.8))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # masked (not run) cells are grey
    finite = means[np.isfinite(means)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    image = ax.imshow(np.ma.masked_invalid(means), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")

    for i in range(len(quadrants)):
        for j in range(len(strategies)):
            if not np.isfinite(means[i, j]):
                ax.text(j, i, "not run", ha="center", va="center", fontsize=8, color="#555555")
                continue
            label = f"{means[i, j]:.3f}" + (f"\n± {stds[i, j]:.3f}" if np.isfinite(stds[i, j]) else "")
            # Dark text on light colours and vice versa, so every label stays readable.
            r, g, b, _ = cmap(image.norm(means[i, j]))
            ax.text(j, i, label, ha="center", va="center", fontsize=8,
                    color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white")

    for i, winner in enumerate(verdicts["winner"]):
        if isinstance(winner, str):
            ax.add_patch(Rectangle((strategies.index(winner) - 0.5, i - 0.5), 1, 1,
                                   fill=False, edgecolor="#d62728", linewidth=3,
                                   clip_on=False))  # edge cells: keep the outline whole

    ax.set_xticks(range(len(strategies)), strategies)
    ax.set_yticks(range(len(quadrants)), [f"{q}\n({t})" for q, t in zip(quadrants, verdicts["target"])])
    ax.tick_params(length=0)
    fig.colorbar(image, ax=ax, label="test accuracy (mean over seeds)")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)  # figures are global state in pyplot; a long sweep must not accumulate them
    return buffer.getvalue()


# --- HTML ---------------------------------------------------------------------------------------

# Inline on purpose: the page must open offline, from an e-mail attachment or an archived run.
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td.winner { font-weight: bold; background: #fff3c4; }
td.yes { color: #1a7f37; } td.no { color: #b42318; }
img { max-width: 100%; }
"""


def _html_table(frame: pd.DataFrame, winners: set[tuple[int, str]] = frozenset()) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for i, row in enumerate(frame.itertuples(index=False)):
        tds = []
        for column, value in zip(frame.columns, row):
            classes = []
            if (i, column) in winners:
                classes.append("winner")
            if isinstance(value, (bool, np.bool_)):
                classes.append("yes" if value else "no")
            attr = f' class="{" ".join(classes)}"' if classes else ""
            tds.append(f"<td{attr}>{html.escape(_text(value, column))}</td>")
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n" + "\n".join(body) + "\n</tbody>\n</table>"


def _html(cells: pd.DataFrame, title: str, png: bytes, extra: dict[str, pd.DataFrame]) -> str:
    wide = comparison_table(cells)
    verdicts = quadrant_verdicts(cells)
    image = base64.b64encode(png).decode("ascii")
    sentences = "\n".join(f"<li>{html.escape(_verdict_sentence(v))}</li>" for v in verdicts.itertuples(index=False))
    sections = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>',
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>Test accuracy per quadrant and strategy: mean ± std over seeds, with the search's best "
        "validation score in brackets. Highlighted cells are the quadrant's winner; a blank cell was not run.</p>",
        _html_table(wide, _winner_positions(wide)),
        "<h2>Verdicts</h2>",
        f"<ul>\n{sentences}\n</ul>",
        "<h2>Heatmap</h2>",
        f'<img alt="test accuracy heatmap, quadrant by strategy" src="data:image/png;base64,{image}">',
        "<h2>Per-cell detail</h2>",
        _html_table(_detail_frame(cells)),
    ]
    for name, table in extra.items():
        sections += [f"<h2>{html.escape(name)}</h2>", _html_table(_extra_frame(table))]
    sections += ["</body>", "</html>", ""]
    return "\n".join(sections)


# --- writing everything -------------------------------------------------------------------------

def _check_extra_names(extra: dict[str, pd.DataFrame]) -> None:
    for name in extra:
        # The name becomes a file name: keep it to one plain path component.
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise ValueError(f"extra table name {name!r}: use letters, digits, '_', '.', '-' only")
        if name.lower() in _RESERVED_NAMES:
            raise ValueError(f"extra table name {name!r} is reserved; reserved: {sorted(_RESERVED_NAMES)}")


def write_comparison(cells: pd.DataFrame, out_dir, title: str,
                     extra_tables: dict[str, pd.DataFrame] | None = None) -> dict[str, Path]:
    """Write the comparison into `out_dir` (created if needed) and return {kind: path}:

    csv      comparison.csv, the long form (see `comparison_long`), full precision;
    md       comparison.md, the wide table, verdict sentences, per-cell detail;
    tex      comparison.tex, a LaTeX tabular with escaped names and $\\pm$;
    heatmap  heatmap.png, quadrant x strategy test means, winners outlined;
    html     comparison.html, one self-contained page (inline CSS, heatmap as a data: URI).

    Each entry of `extra_tables` adds <name>.csv (returned under key <name>) and a section in the
    Markdown and HTML pages. Everything is checked before the first file is written.
    """
    extra = dict(extra_tables or {})
    _check_extra_names(extra)
    cells = _validated(cells)
    if cells.empty:
        raise ValueError("cells is empty: there is nothing to compare")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    paths = {"csv": out / "comparison.csv", "md": out / "comparison.md", "tex": out / "comparison.tex",
             "heatmap": out / "heatmap.png", "html": out / "comparison.html"}
    comparison_long(cells).to_csv(paths["csv"], index=False)
    png = _png_bytes(heatmap_figure(cells, title))
    paths["heatmap"].write_bytes(png)
    paths["md"].write_text(_markdown(cells, title, extra), encoding="utf-8")
    paths["tex"].write_text(_latex(cells, title), encoding="utf-8")
    paths["html"].write_text(_html(cells, title, png, extra), encoding="utf-8")
    for name, table in extra.items():
        paths[name] = out / f"{name}.csv"
        _extra_frame(table).to_csv(paths[name], index=False)
    return paths

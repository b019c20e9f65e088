"""Render the strategy-by-quadrant comparison: CSV, Markdown, LaTeX, a PNG heatmap and one HTML page.

harness/verdicts.py analyses the cells once (`verdicts.analyse`: winners, Welch's tests, tie sets,
why a verdict is not decisive); this module only formats that analysis:

* ``comparison_table``: the human wide form (one row per quadrant, one text column per strategy);
* ``heatmap_figure``: quadrant x strategy, colour scaled per quadrant row;
* ``markdown_table``: any other table (trials, LogME, ...) formatted as in the report;
* ``write_comparison``: analyses once and writes every file from that one analysis.

Everything here is pure pandas + scipy + matplotlib (Agg backend): no TensorFlow, MLflow or Optuna,
so a report can be rebuilt from a CSV on any laptop.

    >>> import pandas as pd
    >>> from harness.export import write_comparison
    >>> cell = {"quadrant": "small-similar", "size": "small", "similarity": "similar", "target": "flowers"}
    >>> cells = pd.DataFrame([
    ...     {**cell, "strategy": "features", "best_val": 0.83, "test_mean": 0.81, "test_std": 0.01, "n_seeds": 3,
    ...      "test_accuracies": [0.80, 0.81, 0.82]},
    ...     {**cell, "strategy": "full", "best_val": 0.80, "test_mean": 0.71, "test_std": 0.01, "n_seeds": 3,
    ...      "test_accuracies": [0.70, 0.71, 0.72]},
    ... ])
    >>> paths = write_comparison(cells, "results/comparison", title="Transfer strategies", experiment_id="1")
    >>> sorted(paths)
    ['csv', 'heatmap', 'html', 'md', 'tex']

Rendered outputs (Markdown, LaTeX, HTML, heatmap) round accuracies to 3 decimals and p-values to
3 significant digits, and leave blank the parameters a strategy does not use (harness/strategies.py
says which); the CSV files keep full precision and every value, so that ``pd.read_csv`` gives back
exactly the numbers passed in.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: reports are built on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from harness import stats  # noqa: E402
from harness.strategies import uses  # noqa: E402
from harness.tracking import DEFAULT_UI_URL, run_url  # noqa: E402
from harness.verdicts import ALONE, DECISIVE, NO_SCORE, RULES_DIFFER, TIE_TOLERANCE, Comparison, analyse  # noqa: E402

# Names of the files write_comparison always writes, and the keys of the dict it returns; an extra
# table with one of these names would overwrite one of them or shadow its key.
_RESERVED_NAMES = {"comparison", "heatmap", "csv", "md", "tex", "html"}


def _share_text(share: float) -> str:
    return f"1/{round(1 / share)}" if share <= 0.5 else f"{share:.0%}"


# --- text formatting shared by the renderers ----------------------------------------------------


def _acc(value: float) -> str:
    return f"{value:.3f}" if value is not None and math.isfinite(value) else ""


def _p(value: float) -> str:
    return f"{value:.3g}" if value is not None and math.isfinite(value) else ""


def _cell_text(test_mean: float, ci_low: float, ci_high: float) -> str:
    """'0.812 [0.800, 0.824]': mean and 95% interval over seeds; the mean alone with one seed; '' when not run."""
    if not math.isfinite(test_mean):
        return ""
    if math.isfinite(ci_low) and math.isfinite(ci_high):
        return f"{test_mean:.3f} [{ci_low:.3f}, {ci_high:.3f}]"
    return f"{test_mean:.3f}"


# Columns whose numbers are accuracies or scores on the same scale: 3 decimals.
_SCORE_COLUMN = re.compile(r"accuracy|(^|_)val($|_)|test|objective|logme|mean|std|margin|ci_|spearman")


def _value_text(value, column: str = "") -> str:
    """One value of a generic table as display text: accuracies 3 decimals, p-values and anything
    else 3 significant digits (learning rates stay readable), counts as integers, yes/no, '' for missing."""
    if value is None or value is pd.NA or value is pd.NaT:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        number = float(value)
        if not math.isfinite(number):
            return ""
        if column == "p" or column.startswith("p_"):
            return f"{number:.3g}"
        if _SCORE_COLUMN.search(column):
            return f"{number:.3f}"
        if number.is_integer():
            return str(int(number))
        return f"{number:.0f}" if abs(number) >= 100 else f"{number:.3g}"
    return str(value)


def _header(column: str) -> str:
    """A generic table's column name, readable: 'param_head_lr' -> 'head lr'."""
    return str(column).removeprefix("param_").replace("_", " ")


def _not_applicable(strategy, column: str) -> bool:
    """Whether `column` (a parameter, 'param_'-prefixed or bare) means nothing for `strategy`."""
    return not uses(str(strategy), str(column).removeprefix("param_"))


@dataclass
class _Table:
    """A rendered table before it is Markdown, HTML or LaTeX: display texts with readable headers,
    an optional link per cell, and an emphasis per cell ('winner', 'tie' or '')."""

    texts: pd.DataFrame
    links: pd.DataFrame
    marks: pd.DataFrame

    @classmethod
    def of(cls, texts: pd.DataFrame) -> _Table:
        empty = pd.DataFrame("", index=texts.index, columns=texts.columns)
        return cls(texts, pd.DataFrame(None, index=texts.index, columns=texts.columns, dtype=object), empty)


# --- the tables a reader sees -------------------------------------------------------------------

_ALPHA_TEXT = f"{stats.ALPHA:g}"
_WIDE_HEADERS = {
    "verdict": "Winner",
    "runner_up": "Runner-up",
    "margin": "Margin",
    "p_value": "p (Welch)",
    "significant": "Significant",
    "textbook": "Textbook rule",
    "agrees_with_textbook": "Agrees with rule",
}


def comparison_table(cells: pd.DataFrame) -> pd.DataFrame:
    """The human wide form: one row per quadrant, one text column per strategy, then the verdict.

    Strategy columns read 'mean [ci_low, ci_high]' (test accuracy over seeds, 95% t-interval; the
    mean alone with one seed; blank when not run). Only strategies that appear somewhere in `cells`
    get a column. Then verdict (the winner, or 'tie: a, b'), runner_up, margin, p_value,
    significant, tie_set, decisive, textbook, agrees_with_textbook, unformatted. For the
    machine-readable long form use `verdicts.comparison_long`."""
    return _wide(analyse(cells))


# The verdict of each quadrant, as the wide table shows it beside the strategies' scores.
WIDE_VERDICT_COLUMNS = (
    "verdict",
    "runner_up",
    "margin",
    "p_value",
    "significant",
    "tie_set",
    "decisive",
    "textbook",
    "agrees_with_textbook",
)


def _wide(comparison: Comparison) -> pd.DataFrame:
    strategies = comparison.strategies
    by_cell = {(r.quadrant, r.strategy): r for r in comparison.cells.itertuples(index=False)}
    rows = []
    for v in comparison.verdicts.itertuples(index=False):
        row = {"quadrant": v.quadrant, "target": v.target}
        for strategy in strategies:
            cell = by_cell.get((v.quadrant, strategy))
            row[strategy] = (
                ""
                if cell is None
                else _cell_text(cell.test_mean, cell.ci_low, cell.ci_high) + (" (under-trained)" if cell.undertrained > 0 else "")
            )
        row.update({c: getattr(v, c) for c in WIDE_VERDICT_COLUMNS})
        rows.append(row)
    columns = ["quadrant", "target", *strategies, *WIDE_VERDICT_COLUMNS]
    return pd.DataFrame(rows, columns=columns)


def _wide_display(comparison: Comparison, experiment_id, ui_url: str) -> _Table:
    """The wide table as shown: each strategy's cell links to its cell run and carries its highlight
    (the decisive winner 'winner', the members of an undecided tie 'tie')."""
    wide = _wide(comparison)
    strategies = comparison.strategies
    formats = {"margin": _acc, "p_value": _p}
    texts = pd.DataFrame(
        {
            "Quadrant": wide["quadrant"],
            "Target": wide["target"],
            **{s: wide[s] for s in strategies},
            **{header: [formats.get(column, _value_text)(x) for x in wide[column]] for column, header in _WIDE_HEADERS.items()},
        }
    )
    table = _Table.of(texts)
    row_of = {quadrant: i for i, quadrant in enumerate(wide["quadrant"])}
    for cell, highlight in zip(comparison.cells.itertuples(index=False), comparison.highlight):
        i, j = row_of[cell.quadrant], texts.columns.get_loc(cell.strategy)
        table.links.iat[i, j] = run_url(cell.cell_run_id, experiment_id, ui_url)
        table.marks.iat[i, j] = highlight
    return table


def _detail_display(comparison: Comparison, experiment_id, ui_url: str) -> _Table:
    """One row per cell: mean, std, interval, seeds, p against the winner, cost, the confirmed
    configuration (blank where the strategy does not use a parameter) and links to its runs.
    Optional columns that are blank for every cell are left out."""
    long = comparison.cells
    params = [c for c in long.columns if c.startswith("param_")]
    columns = {
        "Quadrant": long["quadrant"],
        "Strategy": long["strategy"],
        "Test mean": [_acc(x) for x in long["test_mean"]],
        "Std": [_acc(x) for x in long["test_std"]],
        "95% CI": [f"[{lo:.3f}, {hi:.3f}]" if math.isfinite(lo) else "" for lo, hi in zip(long["ci_low"], long["ci_high"])],
        "Seeds": [_value_text(x, "n_seeds") for x in long["n_seeds"]],
        "p vs winner": [_p(x) for x in long["p_vs_winner"]],
        "Tied with winner": [
            _value_text(bool(t)) if not w and math.isfinite(m) else ""
            for t, w, m in zip(long["in_tie_set"], long["is_winner"], long["test_mean"])
        ],
        "Best val (search)": [_acc(x) for x in long["best_val"]],
        "LogME": [_acc(x) for x in long["logme"]],
        "Epochs per seed": [_value_text(x) for x in long["train_epochs"]],
        "Train seconds per seed": [_value_text(x) for x in long["train_seconds"]],
        "Images seen per seed": [_value_text(x, "n_seeds") for x in long["train_images_seen"]],
        "Under-trained": ["yes" if u > 0 else "" for u in long["undertrained"]],
        **{
            _header(p): ["" if _not_applicable(s, p) else _value_text(x, p) for s, x in zip(long["strategy"], long[p])]
            for p in params
        },
        "Cell run": [r[:8] if isinstance(r, str) else "" for r in long["cell_run_id"]],
        "Best seed run": [r[:8] if isinstance(r, str) else "" for r in long["best_confirm_run_id"]],
    }
    texts = pd.DataFrame(columns)
    optional = {
        "LogME",
        "Epochs per seed",
        "Train seconds per seed",
        "Images seen per seed",
        "Under-trained",
        "Cell run",
        "Best seed run",
        *map(_header, params),
    }
    texts = texts[[c for c in texts.columns if c not in optional or (texts[c] != "").any()]]
    table = _Table.of(texts)
    for name, column in (("Cell run", "cell_run_id"), ("Best seed run", "best_confirm_run_id")):
        if name in texts.columns:
            table.links[name] = [run_url(r, experiment_id, ui_url) for r in long[column]]
    return table


def _extra_frame(table: pd.DataFrame) -> pd.DataFrame:
    """An extra table as written: a meaningful index (named, or not 0..n-1) becomes columns."""
    is_default_index = (
        isinstance(table.index, pd.RangeIndex) and table.index.name is None and table.index.start == 0 and table.index.step == 1
    )
    frame = table if is_default_index else table.reset_index()
    frame = frame.copy()
    frame.columns = [str(c) for c in frame.columns]
    return frame


def _extra_display(table: pd.DataFrame, experiment_id=None, ui_url: str = DEFAULT_UI_URL) -> _Table:
    """A generic table (trials, LogME, ...) as shown: readable headers, rounded numbers, parameters
    the row's strategy does not use left blank, an mlflow_run_id linked to its run."""
    frame = _extra_frame(table).reset_index(drop=True)
    strategies = frame["strategy"] if "strategy" in frame.columns else pd.Series([""] * len(frame))
    texts = pd.DataFrame(
        {
            column: ["" if _not_applicable(s, column) else _value_text(x, column) for s, x in zip(strategies, frame[column])]
            for column in frame.columns
        },
        index=frame.index,
    )
    result = _Table.of(texts)
    if "mlflow_run_id" in frame.columns:
        result.links["mlflow_run_id"] = [run_url(r, experiment_id, ui_url) for r in frame["mlflow_run_id"]]
    headers = {c: _header(c) for c in frame.columns}
    if len(set(headers.values())) == len(headers):  # keep raw names rather than merge two columns
        for attr in ("texts", "links", "marks"):
            setattr(result, attr, getattr(result, attr).rename(columns=headers))
    return result


def _verdict_sentence(v) -> str:
    """One plain-language line per quadrant (Markdown/HTML verdict lists); `v` is a row of
    `Comparison.quadrants`."""
    head = f"{v.quadrant} (target {v.target})"
    if v.outcome == NO_SCORE:
        return f"{head}: no strategy has a test score."
    if v.outcome == ALONE:
        text = f"{head}: only {v.winner} has a test score ({v.winner_test_mean:.3f}); nothing to compare"
    else:
        test = f"Welch's t-test over seeds, {v.winner} vs runner-up {v.runner_up}: " + (
            f"p = {_p(v.p_value)}"
            if math.isfinite(v.p_value)
            else "no p-value (fewer than 2 seeds, or every seed of both scored the same)"
        )
        if v.outcome == RULES_DIFFER:
            text = (
                f"{head}: {v.winner} scores best ({v.winner_test_mean:.3f} vs {v.runner_up_test_mean:.3f}); {test}, "
                f"but the cells were trained under different rules, so no winner is called"
            )
        elif v.outcome == DECISIVE:
            text = (
                f"{head}: {v.winner} wins ({v.winner_test_mean:.3f} vs {v.runner_up_test_mean:.3f}, "
                f"margin {v.margin:.3f}); {test}, significant, and every other strategy is significantly worse"
            )
        else:
            text = (
                f"{head}: no decisive winner; tie between {v.tie_set} (no significant difference from the "
                f"best, {v.winner} {v.winner_test_mean:.3f}, at p < {_ALPHA_TEXT}); {test}"
                + (", significant" if v.significant else ", not significant")
            )
    if v.cheaper_in_tie:
        text += f"; {v.cheapest_in_tie} is within the tie at {_share_text(v.cheapest_cost_share)} of {v.winner}'s training cost"
    agreement = "agrees" if v.agrees_with_textbook else "disagrees"
    rule = v.textbook or "no rule for this quadrant"
    trained = f" Trained under: {v.training_rules}." if isinstance(v.training_rules, str) else ""
    return text + f". Textbook: {rule}; the result {agreement}.{trained}"


def _intro(marks_note: str) -> str:
    return (
        f"Test accuracy per quadrant and strategy: mean over confirmation seeds with its 95% t-interval "
        f"[low, high]; a blank cell was not run. p (Welch) is Welch's t-test over the seeds' test accuracies, "
        f"winner (best mean) vs runner-up. A winner is named only when it is significantly better "
        f"(p < {_ALPHA_TEXT}) than every other strategy of its quadrant; otherwise the Winner column names the "
        f"tie: every strategy the test cannot tell apart from the best. {marks_note}"
    )


# --- Markdown (pandas' to_markdown, i.e. tabulate) ----------------------------------------------


def _md_cell(text: str, link: str | None, mark: str) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")  # a '|' would split the cell
    if text and isinstance(link, str):
        text = f"[{text}]({link})"
    if text and mark:
        text = f"**{text}**" if mark == "winner" else f"_{text}_"
    return text


def _markdown_table(table: _Table) -> str:
    shown = pd.DataFrame(
        {c: [_md_cell(t, lk, m) for t, lk, m in zip(table.texts[c], table.links[c], table.marks[c])] for c in table.texts.columns}
    )
    shown.columns = [c.replace("|", "\\|") for c in shown.columns]
    # disable_numparse: tabulate would otherwise reformat '0.010' as '0.01'.
    return shown.to_markdown(index=False, disable_numparse=True)


def markdown_table(frame: pd.DataFrame, experiment_id=None, ui_url: str = DEFAULT_UI_URL) -> str:
    """A generic table (e.g. trials) as a Markdown pipe table, formatted as in the report."""
    return _markdown_table(_extra_display(frame, experiment_id, ui_url))


def _markdown(comparison: Comparison, title, extra, experiment_id, ui_url) -> str:
    note = "**Bold**: the decisive winner; _italic_: the strategies of an undecided tie."
    if experiment_id not in (None, ""):
        note += " Cells link to their MLflow runs."
    parts = [
        f"# {title}",
        "",
        _intro(note),
        "",
        _markdown_table(_wide_display(comparison, experiment_id, ui_url)),
        "",
        "## Verdicts",
        "",
        *[f"- {_verdict_sentence(v)}" for v in comparison.quadrants.itertuples(index=False)],
        "",
        "## Per-cell detail",
        "",
        "Parameters are the confirmed configuration; a blank parameter is not used by that strategy.",
        "",
        _markdown_table(_detail_display(comparison, experiment_id, ui_url)),
        "",
    ]
    for name, table in extra.items():
        parts += [f"## {name}", "", _markdown_table(_extra_display(table, experiment_id, ui_url)), ""]
    return "\n".join(parts)


# --- LaTeX (pandas' Styler.to_latex) ------------------------------------------------------------


def _latex(comparison: Comparison, title: str) -> str:
    """A booktabs `tabular` of the wide table to \\input into a paper (needs \\usepackage{booktabs})."""
    table = _wide_display(comparison, None, DEFAULT_UI_URL)
    commands = {"winner": "textbf:--rwrap;", "tie": "textit:--rwrap;", "": ""}
    styler = (
        table.texts.style.hide(axis="index")
        .format(escape="latex")
        .format_index(escape="latex", axis=1)
        .apply(lambda _: table.marks.map(commands.get), axis=None)
    )
    n_strategies = len(table.texts.columns) - 2 - len(_WIDE_HEADERS)
    body = styler.to_latex(hrules=True, column_format="ll" + "c" * n_strategies + "llrrllc")
    header = [
        "% " + title.replace("\n", " "),
        "% Test accuracy: mean [95% t-interval] over seeds; p: Welch's t-test over seeds, winner vs runner-up.",
        f"% Bold: winner significantly better than every other strategy (p < {_ALPHA_TEXT}); italic: an undecided tie.",
        "% Needs \\usepackage{booktabs}.",
    ]
    return "\n".join(header) + "\n" + body


# --- heatmap ------------------------------------------------------------------------------------


def heatmap_figure(cells: pd.DataFrame, title: str = ""):
    """Quadrant x strategy heatmap with one colour scale per quadrant row: colour is the cell's
    test mean rescaled within its row (0 = the row's worst, 1 = its best), so the differences inside a
    quadrant show even when quadrants sit at very different accuracies. Each cell reads 'mean', its
    interval and its difference from the row's best; the decisive winner is outlined solid, the
    members of an undecided tie dashed. Cells not run, and under-trained from-scratch cells, are grey.
    Returns the Figure (caller closes it)."""
    return _heatmap(analyse(cells), title)


@dataclass
class _HeatmapGrid:
    """The heatmap's numbers: one row per quadrant, one column per strategy."""

    quadrants: list[str]
    strategies: list[str]
    means: np.ndarray  # test means; NaN where not run or under-trained
    lows: np.ndarray  # 95% interval
    highs: np.ndarray
    marks: np.ndarray  # "winner", a tie's mark, or ""
    undertrained: np.ndarray  # bool
    best: np.ndarray  # each row's best mean
    scaled: np.ndarray  # each mean within its row: 0 = the row's worst, 1 = its best


def _heatmap_grid(comparison: Comparison) -> _HeatmapGrid:
    strategies = list(comparison.strategies)
    quadrants = list(comparison.verdicts["quadrant"])
    means = np.full((len(quadrants), len(strategies)), np.nan)
    lows, highs = np.full_like(means, np.nan), np.full_like(means, np.nan)
    marks = np.full(means.shape, "", dtype=object)
    undertrained = np.zeros(means.shape, dtype=bool)
    for r, highlight in zip(comparison.cells.itertuples(index=False), comparison.highlight):
        i, j = quadrants.index(r.quadrant), strategies.index(r.strategy)
        means[i, j], lows[i, j], highs[i, j] = r.test_mean, r.ci_low, r.ci_high
        undertrained[i, j] = r.undertrained > 0
        marks[i, j] = highlight
    # An under-trained cell is no result: grey, left out of its row's scale and of "best".
    means[undertrained] = np.nan
    best = np.array([np.nanmax(row) if np.isfinite(row).any() else np.nan for row in means])
    worst = np.array([np.nanmin(row) if np.isfinite(row).any() else np.nan for row in means])
    span = best - worst
    with np.errstate(invalid="ignore", divide="ignore"):
        # A row whose cells all score the same is all "best" (1), not a division by zero.
        scaled = np.where(span[:, None] > 0, (means - worst[:, None]) / span[:, None], 1.0)
    scaled[~np.isfinite(means)] = np.nan
    return _HeatmapGrid(quadrants, strategies, means, lows, highs, marks, undertrained, best, scaled)


def _heatmap(comparison: Comparison, title: str):
    grid = _heatmap_grid(comparison)
    quadrants, strategies = grid.quadrants, grid.strategies
    fig, ax = plt.subplots(figsize=(1.9 * len(strategies) + 3.0, 1.0 * len(quadrants) + 1.8))
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")  # masked (not run) cells are grey
    image = ax.imshow(np.ma.masked_invalid(grid.scaled), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(quadrants)):
        for j in range(len(strategies)):
            _draw_heatmap_cell(ax, grid, i, j, cmap(image.norm(grid.scaled[i, j])))
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set_yticks(range(len(quadrants)), [f"{q}\n({t})" for q, t in zip(quadrants, comparison.verdicts["target"])])
    ax.tick_params(length=0)
    fig.colorbar(image, ax=ax, label="test mean within its quadrant (0 = worst, 1 = best)")
    ax.set_title(
        (title + "\n" if title else "") + f"solid outline: significant winner; dashed: tie (Welch p ≥ {_ALPHA_TEXT})", fontsize=9
    )
    fig.tight_layout()
    return fig


def _draw_heatmap_cell(ax, grid: _HeatmapGrid, i: int, j: int, colour) -> None:
    """Cell (i, j)'s text (mean, interval, gap to the row's best) and its winner or tie outline;
    `colour` is the cell's own, which the text must stand out from."""
    if not np.isfinite(grid.means[i, j]):
        text = "under-trained" if grid.undertrained[i, j] else "not run"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color="#555555")
        return
    label = _cell_text(grid.means[i, j], grid.lows[i, j], grid.highs[i, j]).replace(" [", "\n[")
    gap = grid.means[i, j] - grid.best[i]
    label += "\nbest" if gap > -TIE_TOLERANCE else f"\n{gap:+.3f}".replace("-", "−")
    # Dark text on light colours and vice versa, so every label stays readable.
    r, g, b, _ = colour
    ax.text(
        j, i, label, ha="center", va="center", fontsize=7, color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
    )
    mark = grid.marks[i, j]
    if mark:
        # Inset, so the outlines of neighbouring tied cells stay apart.
        ax.add_patch(
            Rectangle(
                (j - 0.46, i - 0.46),
                0.92,
                0.92,
                fill=False,
                edgecolor="#d62728",
                linewidth=3 if mark == "winner" else 2,
                linestyle="-" if mark == "winner" else "--",
            )
        )


def _png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)  # figures are global state in pyplot; a long sweep must not accumulate them
    return buffer.getvalue()


# --- HTML (pandas' Styler.to_html) --------------------------------------------------------------

# Inline on purpose: the page must open offline, from an e-mail attachment or an archived run.
# Links point at the MLflow UI, which only works where that server runs; nothing is loaded from it.
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; }
th { background: #f3f3f3; }
td.winner { font-weight: bold; background: #fff3c4; }
td.tie { font-style: italic; background: #eef4ff; }
img { max-width: 100%; }
"""


def _html_table(table: _Table, uuid: str) -> str:
    shown = pd.DataFrame(
        {
            c: [
                f'<a href="{html.escape(lk)}">{html.escape(t)}</a>' if t and isinstance(lk, str) else html.escape(t)
                for t, lk in zip(table.texts[c], table.links[c])
            ]
            for c in table.texts.columns
        }
    )
    # Cells are escaped above (links must stay markup); headers are escaped by the Styler.
    styler = (
        shown.style.hide(axis="index")
        .set_uuid(uuid)
        .format_index(escape="html", axis=1)
        .set_td_classes(table.marks.set_axis(shown.columns, axis=1))
    )
    return styler.to_html()


def _html(comparison: Comparison, title, png, extra, experiment_id, ui_url) -> str:
    image = base64.b64encode(png).decode("ascii")
    sentences = "\n".join(f"<li>{html.escape(_verdict_sentence(v))}</li>" for v in comparison.quadrants.itertuples(index=False))
    links = " Cells link to their MLflow runs." if experiment_id not in (None, "") else ""
    sections = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        f'<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>',
        "<body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(_intro('Highlighted bold: the decisive winner; italic: the strategies of an undecided tie.'))}"
        f"{links}</p>",
        _html_table(_wide_display(comparison, experiment_id, ui_url), "comparison"),
        "<h2>Verdicts</h2>",
        f"<ul>\n{sentences}\n</ul>",
        "<h2>Heatmap</h2>",
        f'<img alt="test accuracy heatmap, quadrant by strategy, colour scaled per quadrant" '
        f'src="data:image/png;base64,{image}">',
        "<h2>Per-cell detail</h2>",
        "<p>Parameters are the confirmed configuration; a blank parameter is not used by that strategy.</p>",
        _html_table(_detail_display(comparison, experiment_id, ui_url), "detail"),
    ]
    for name, table in extra.items():
        sections += [f"<h2>{html.escape(name)}</h2>", _html_table(_extra_display(table, experiment_id, ui_url), name)]
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


def write_comparison(
    cells: pd.DataFrame,
    out_dir,
    title: str,
    extra_tables: dict[str, pd.DataFrame] | None = None,
    experiment_id: str | None = None,
    ui_url: str = DEFAULT_UI_URL,
) -> dict[str, Path]:
    """Write the comparison into `out_dir` (created if needed) and return {kind: path}:

    csv      comparison.csv, the long form (see `verdicts.comparison_long`), full precision;
    md       comparison.md, the wide table, verdict sentences, per-cell detail;
    tex      comparison.tex, the wide table as a booktabs tabular;
    heatmap  heatmap.png, quadrant x strategy, colour scaled per quadrant row;
    html     comparison.html, one self-contained page (inline CSS, heatmap as a data: URI).

    With `experiment_id`, Markdown and HTML cells link to their MLflow runs at
    `{ui_url}/#/experiments/{experiment_id}/runs/{run_id}`. Each entry of `extra_tables` adds
    <name>.csv (returned under key <name>, written as given) and a section in the Markdown and HTML
    pages. Everything is checked, and the comparison analysed once, before the first file is written.
    """
    extra = dict(extra_tables or {})
    _check_extra_names(extra)
    comparison = analyse(cells)
    if comparison.cells.empty:
        raise ValueError("cells is empty: there is nothing to compare")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    paths = {
        "csv": out / "comparison.csv",
        "md": out / "comparison.md",
        "tex": out / "comparison.tex",
        "heatmap": out / "heatmap.png",
        "html": out / "comparison.html",
    }
    comparison.cells.to_csv(paths["csv"], index=False)
    png = _png_bytes(_heatmap(comparison, title))
    paths["heatmap"].write_bytes(png)
    paths["md"].write_text(_markdown(comparison, title, extra, experiment_id, ui_url), encoding="utf-8")
    paths["tex"].write_text(_latex(comparison, title), encoding="utf-8")
    paths["html"].write_text(_html(comparison, title, png, extra, experiment_id, ui_url), encoding="utf-8")
    for name, table in extra.items():
        paths[name] = out / f"{name}.csv"
        _extra_frame(table).to_csv(paths[name], index=False)
    return paths

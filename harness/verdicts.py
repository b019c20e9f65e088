"""The strategy-by-quadrant comparison's analysis, computed once: every verdict the reports show.

The sweep compares transfer-learning strategies (``features``, ``intermediate``, ``partial``,
``full``, ``scratch``) in four quadrants (target size small|large x similarity to the pretraining
data similar|dissimilar). Each (quadrant, strategy) cell was searched, its best configuration was
retrained with several seeds and tested once. `analyse` turns those cells into a `Comparison`:

* per quadrant: the best test mean, Welch's t-test of it against the runner-up over the
  confirmation seeds, the tie set (every strategy the test cannot tell apart from the best), whether
  the verdict is decisive and if not why, and whether the tie set holds what the textbook rule
  recommends;
* per cell: its 95% t-interval, its p-value against the winner, its place in the verdict.

A winner is called only when it is significantly better (p < ``stats.ALPHA``) than *every* other
strategy of its quadrant, and only among cells trained under one rule; otherwise the verdict names
the tie. Statistics live in harness/stats.py; harness/export.py renders a `Comparison` and decides
nothing. Pure pandas + scipy: no rendering, no files, no MLflow.

    >>> import pandas as pd
    >>> cell = {"quadrant": "small-similar", "size": "small", "similarity": "similar", "target": "flowers"}
    >>> cells = pd.DataFrame([
    ...     {**cell, "strategy": "features", "best_val": 0.83, "test_mean": 0.81, "test_std": 0.01, "n_seeds": 3,
    ...      "test_accuracies": [0.80, 0.81, 0.82]},
    ...     {**cell, "strategy": "full", "best_val": 0.80, "test_mean": 0.71, "test_std": 0.01, "n_seeds": 3,
    ...      "test_accuracies": [0.70, 0.71, 0.72]},
    ... ])
    >>> v = analyse(cells).verdicts.iloc[0]
    >>> v.winner, v.verdict, bool(v.significant), bool(v.decisive), bool(v.agrees_with_textbook)
    ('features', 'features', True, True, True)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pandas as pd

from harness import stats
from harness.config import STRATEGIES

# --- the rules and the fixed orders -------------------------------------------------------------

# (size, similarity) -> the strategies the textbook rule recommends for that quadrant.
TEXTBOOK: dict[tuple[str, str], tuple[str, ...]] = {
    ("small", "similar"): ("features",),
    ("small", "dissimilar"): ("intermediate", "partial"),
    ("large", "similar"): ("full",),
    ("large", "dissimilar"): ("full", "scratch"),
}

# Columns, and exact ties, follow config.STRATEGIES: roughly "how much of the network is trained",
# cheapest first. When two strategies score the same, the one that trains less is the sensible pick.

# Rows are shown small before large, similar before dissimilar (the order the rules are stated in).
_SIZE_ORDER = ["small", "large"]
_SIMILARITY_ORDER = ["similar", "dissimilar"]

REQUIRED_COLUMNS = ("quadrant", "size", "similarity", "target", "strategy", "best_val", "test_mean", "test_std", "n_seeds")
# Optional per-cell columns. comparison.csv always has them (blank where the caller had none), so
# the file has one schema: logme (score of the cell's backbone on the target), test_accuracies
# (JSON list, one test accuracy per confirmation seed), train_epochs / train_seconds (total over
# the phases, mean over seeds), train_images_seen (training images fed, mean over seeds), undertrained
# (1: a from-scratch cell whose models did not fit their training data; it takes no part in the
# verdict), cell_run_id / best_confirm_run_id (MLflow runs), training_rule (how its seeds were
# trained, in words: a winner is called only among cells trained under one rule).
OPTIONAL_COLUMNS = (
    "logme",
    "test_accuracies",
    "train_epochs",
    "train_seconds",
    "train_images_seen",
    "undertrained",
    "cell_run_id",
    "best_confirm_run_id",
    "training_rule",
)
_NUMERIC_COLUMNS = (
    "best_val",
    "test_mean",
    "test_std",
    "n_seeds",
    "logme",
    "train_epochs",
    "train_seconds",
    "train_images_seen",
    "undertrained",
)
_TEXT_COLUMNS = ("cell_run_id", "best_confirm_run_id", "training_rule")

VERDICT_COLUMNS = [
    "quadrant",
    "size",
    "similarity",
    "target",
    "winner",
    "winner_test_mean",
    "runner_up",
    "runner_up_test_mean",
    "margin",
    "p_value",
    "significant",
    "tie_set",
    "decisive",
    "verdict",
    "textbook",
    "agrees_with_textbook",
    "cheapest_in_tie",
    "cheapest_cost_share",
    "training_rules",
]
# Per-cell columns the long form adds: the 95% t-interval, and the cell's place in the verdict.
CELL_STAT_COLUMNS = ["ci_low", "ci_high"]
CELL_VERDICT_COLUMNS = ["is_winner", "in_tie_set", "p_vs_winner"]

# What kind of verdict a quadrant got (the `outcome` column), so a renderer can phrase it without
# deciding it again.
NO_SCORE = "no score"  # no strategy has a test score
ALONE = "alone"  # one strategy has a test score: nothing to compare
DECISIVE = "decisive"  # the winner is significantly better than every other strategy, all under one rule
RULES_DIFFER = "rules differ"  # the winner alone in its tie set, but the cells were trained under different rules
TIE = "tie"  # the test cannot tell the winner from at least one other strategy
# How a cell is emphasised (the `highlight` column): the decisive winner, a member of an undecided tie, or ''.
WINNER = "winner"
TIED = "tie"

# Test means closer than this are equal: averages of the same accuracies can differ in the last bit
# (0.1 + 0.2 != 0.3), and such a "margin" must not decide who is ranked first.
TIE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Comparison:
    """The analysis of one comparison, everything a renderer shows.

    cells: the machine-readable long form, exactly what comparison.csv holds: one row per input
        cell in display order (quadrants small before large, similar before dissimilar; strategies
        in STRATEGIES), see `comparison_long`.
    quadrants: one row per quadrant in display order: VERDICT_COLUMNS plus `outcome` (NO_SCORE, ALONE,
        DECISIVE, RULES_DIFFER or TIE) and `cheaper_in_tie` (cheapest_in_tie is another strategy than
        the winner and trains at a known share below 1 of its cost).
    highlight: per row of `cells`, how the cell is emphasised: WINNER, TIED or ''.
    strategies: every strategy that appears, in display order.
    """

    cells: pd.DataFrame
    quadrants: pd.DataFrame
    highlight: pd.Series
    strategies: tuple[str, ...]

    @property
    def verdicts(self) -> pd.DataFrame:
        """One row per quadrant with VERDICT_COLUMNS (see `quadrant_verdicts`)."""
        return self.quadrants[VERDICT_COLUMNS]


# --- input checks and orderings -----------------------------------------------------------------


def _seeds(value) -> tuple[float, ...] | None:
    """test_accuracies as a tuple of floats: from a list/array, a JSON string (the CSV), or None."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        if not value.strip():
            return None
        value = json.loads(value)
    return tuple(float(v) for v in value)


def validated(cells: pd.DataFrame) -> pd.DataFrame:
    """A checked copy of `cells`: required columns present, numbers numeric, one row per cell,
    every optional column present, test_accuracies parsed to tuples. ValueError otherwise."""
    missing = [c for c in REQUIRED_COLUMNS if c not in cells.columns]
    if missing:
        raise ValueError(f"cells is missing column(s) {missing}; it needs {list(REQUIRED_COLUMNS)}")
    cells = cells.reset_index(drop=True).copy()
    for column in ("quadrant", "size", "similarity", "target", "strategy"):
        cells[column] = cells[column].astype(str)
    for column in _NUMERIC_COLUMNS:
        if column in cells.columns:
            # errors="raise": a typo like "0,81" must fail loudly, not silently become a blank cell.
            cells[column] = pd.to_numeric(cells[column], errors="raise").astype(float)
        else:
            cells[column] = math.nan
    for column in _TEXT_COLUMNS:
        cells[column] = [
            v if isinstance(v, str) and v else None for v in (cells[column] if column in cells.columns else [None] * len(cells))
        ]
    seeds = cells["test_accuracies"] if "test_accuracies" in cells.columns else [None] * len(cells)
    cells["test_accuracies"] = pd.Series([_seeds(v) for v in seeds], index=cells.index, dtype=object)
    duplicated = cells.duplicated(["quadrant", "strategy"], keep=False)
    if duplicated.any():
        pairs = sorted(set(zip(cells.loc[duplicated, "quadrant"], cells.loc[duplicated, "strategy"])))
        raise ValueError(f"cells has more than one row for (quadrant, strategy) {pairs}")
    return cells


def strategy_key(name: str) -> tuple[int, str]:
    """Sort key: STRATEGIES first, any other strategy after them alphabetically."""
    return (STRATEGIES.index(name) if name in STRATEGIES else len(STRATEGIES), name)


def _rule(size: str, similarity: str) -> tuple[str, ...]:
    return TEXTBOOK.get((size.strip().lower(), similarity.strip().lower()), ())


def _quadrant_groups(cells: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(quadrant, its rows) in display order: small before large, similar before dissimilar."""

    def key(item):
        name, group = item
        size = str(group["size"].iloc[0]).lower()
        similarity = str(group["similarity"].iloc[0]).lower()
        return (
            _SIZE_ORDER.index(size) if size in _SIZE_ORDER else len(_SIZE_ORDER),
            _SIMILARITY_ORDER.index(similarity) if similarity in _SIMILARITY_ORDER else len(_SIMILARITY_ORDER),
            name,
        )

    return sorted(cells.groupby("quadrant", sort=False), key=key)


# --- verdicts -----------------------------------------------------------------------------------


def _p_between(a: pd.Series, b: pd.Series) -> float:
    """Welch's p between two cells: from their seeds when both have them, else from mean, std, n
    (the same number; a table that kept only the summary still gets its test)."""
    if a["test_accuracies"] is not None and b["test_accuracies"] is not None:
        return stats.welch_p(a["test_accuracies"], b["test_accuracies"])
    return stats.welch_p_from_stats(a["test_mean"], a["test_std"], a["n_seeds"], b["test_mean"], b["test_std"], b["n_seeds"])


def _cost_of(row) -> float:
    """A cell's training cost: images seen per seed, else training seconds per seed."""
    for column in ("train_images_seen", "train_seconds"):
        if math.isfinite(row[column]) and row[column] > 0:
            return float(row[column])
    return math.nan


def _cheapest(ranked: pd.DataFrame, tie: list[str], winner) -> dict:
    """The cheapest strategy the data cannot tell from the winner, and its cost as a share of the
    winner's ('features is within the tie at 1/8 of the cost'). NaN share when costs are missing."""
    if winner is None:
        return {"cheapest_in_tie": None, "cheapest_cost_share": math.nan}
    members = ranked[ranked["strategy"].isin(tie)]
    costs = {row["strategy"]: _cost_of(row) for _, row in members.iterrows()}
    known = {s: c for s, c in costs.items() if math.isfinite(c)}
    winner_cost = costs.get(winner["strategy"], math.nan)
    if not known or not math.isfinite(winner_cost):
        return {"cheapest_in_tie": winner["strategy"], "cheapest_cost_share": math.nan}
    cheapest = min(known, key=lambda s: (known[s], strategy_key(s)))
    return {"cheapest_in_tie": cheapest, "cheapest_cost_share": known[cheapest] / winner_cost}


def _outcome(winner, runner, tie: list[str], decisive: bool) -> str:
    if winner is None:
        return NO_SCORE
    if runner is None:
        return ALONE
    if decisive:
        return DECISIVE
    return RULES_DIFFER if len(tie) == 1 else TIE


def _verdict_text(outcome: str, tie: list[str]) -> str:
    """The `verdict` column: the winner's name when decisive, else why there is none. The tie set
    starts with the winner."""
    if outcome == NO_SCORE:
        return ""
    if outcome == ALONE:
        return f"{tie[0]} (no other strategy has a test score)"
    if outcome == RULES_DIFFER:
        return f"{tie[0]}, not decisive: training rules differ"
    return tie[0] if outcome == DECISIVE else "tie: " + ", ".join(tie)


@dataclass(frozen=True)
class _Standing:
    """How one quadrant's scored cells stand against its best one."""

    ranked: pd.DataFrame  # the scored cells, best first (ties broken by STRATEGIES)
    winner: pd.Series | None
    runner: pd.Series | None
    p_vs_winner: dict  # cell index -> Welch's p against the winner (NaN for the winner itself)
    tie: list[str]  # the winner, and every strategy not significantly worse than it
    rules: list[str]  # the training rules the scored cells were trained under
    decisive: bool


def _standing(group: pd.DataFrame) -> _Standing:
    # An under-trained from-scratch cell is no result: it cannot win, tie or lose.
    scored = group.dropna(subset=["test_mean"])
    scored = scored[~(scored["undertrained"] > 0)].copy()
    # Rounding the sort key makes float-noise ties fall through to the STRATEGIES tie-break.
    scored["_score"] = scored["test_mean"].round(9)
    scored["_order"] = [strategy_key(s) for s in scored["strategy"]]
    ranked = scored.sort_values(["_score", "_order"], ascending=[False, True])
    winner = ranked.iloc[0] if len(ranked) >= 1 else None
    runner = ranked.iloc[1] if len(ranked) >= 2 else None
    winner_index = winner.name if winner is not None else None  # without a winner, `ranked` has no rows to compare
    p_vs_winner = {i: math.nan if i == winner_index else _p_between(winner, row) for i, row in ranked.iterrows()}
    tie = [row["strategy"] for i, row in ranked.iterrows() if i == winner_index or not stats.significant(p_vs_winner[i])]
    # The rules the scored cells were trained under: a strategy that beats another only under a
    # longer schedule has not been shown better, so mixed rules never give a decisive verdict.
    rules = sorted({r for r in ranked["training_rule"] if isinstance(r, str)})
    # Decisive: someone to beat, every other strategy significantly worse, all under one rule.
    decisive = runner is not None and len(tie) == 1 and len(rules) <= 1
    return _Standing(ranked, winner, runner, p_vs_winner, tie, rules, decisive)


def _verdict_row(quadrant: str, first: pd.Series, standing: _Standing) -> dict:
    """The quadrant's verdict row: VERDICT_COLUMNS, outcome and cheaper_in_tie."""
    winner, runner, tie = standing.winner, standing.runner, standing.tie
    rule = _rule(first["size"], first["similarity"])
    # A runner-up implies a winner (the two best of `ranked`).
    margin = float(winner["test_mean"] - runner["test_mean"]) if winner is not None and runner is not None else math.nan
    if abs(margin) <= TIE_TOLERANCE:
        margin = 0.0
    p_value = standing.p_vs_winner[runner.name] if runner is not None else math.nan
    outcome = _outcome(winner, runner, tie, standing.decisive)
    cheapest = _cheapest(standing.ranked, tie, winner)
    return {
        "quadrant": quadrant,
        "size": first["size"],
        "similarity": first["similarity"],
        "target": first["target"],
        "winner": winner["strategy"] if winner is not None else None,
        "winner_test_mean": float(winner["test_mean"]) if winner is not None else math.nan,
        "runner_up": runner["strategy"] if runner is not None else None,
        "runner_up_test_mean": float(runner["test_mean"]) if runner is not None else math.nan,
        "margin": margin,
        "p_value": p_value,
        "significant": stats.significant(p_value),
        "tie_set": ", ".join(tie),
        "decisive": standing.decisive,
        "verdict": _verdict_text(outcome, tie),
        "textbook": " or ".join(rule),
        # Judged against the tie set: a rule strategy the data cannot tell from the best agrees.
        "agrees_with_textbook": bool(set(rule) & set(tie)),
        **cheapest,
        "training_rules": "; ".join(standing.rules) or None,
        "outcome": outcome,
        "cheaper_in_tie": (
            isinstance(cheapest["cheapest_in_tie"], str)
            and winner is not None
            and cheapest["cheapest_in_tie"] != winner["strategy"]
            and math.isfinite(cheapest["cheapest_cost_share"])
            and cheapest["cheapest_cost_share"] < 1
        ),
    }


def _cell_rows(group: pd.DataFrame, standing: _Standing) -> dict:
    """cell index -> its CELL_VERDICT_COLUMNS and highlight, for each cell of one quadrant."""
    rows = {}
    for i, row in group.iterrows():
        in_tie_set = row["strategy"] in standing.tie and i in standing.p_vs_winner
        # Emphasis only where there was a comparison: the decisive winner, or every member of an undecided tie.
        compared = in_tie_set and standing.runner is not None
        rows[i] = {
            "is_winner": standing.winner is not None and i == standing.winner.name,
            "in_tie_set": in_tie_set,
            "p_vs_winner": standing.p_vs_winner.get(i, math.nan),
            "highlight": "" if not compared else WINNER if standing.decisive else TIED,
        }
    return rows


def _judge(cells: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one verdict row per quadrant: VERDICT_COLUMNS, outcome, cheaper_in_tie;
    one row per cell of `cells`: CELL_VERDICT_COLUMNS and highlight)."""
    verdict_rows, cell_rows = [], {}
    for quadrant, group in _quadrant_groups(cells):
        standing = _standing(group)
        verdict_rows.append(_verdict_row(quadrant, group.iloc[0], standing))
        cell_rows.update(_cell_rows(group, standing))
    quadrants = pd.DataFrame(verdict_rows, columns=[*VERDICT_COLUMNS, "outcome", "cheaper_in_tie"]).astype(
        {"significant": bool, "decisive": bool, "agrees_with_textbook": bool, "cheaper_in_tie": bool}
    )
    per_cell = pd.DataFrame.from_dict(cell_rows, orient="index", columns=[*CELL_VERDICT_COLUMNS, "highlight"])
    per_cell = per_cell.reindex(cells.index)
    return quadrants, per_cell.astype({"is_winner": bool, "in_tie_set": bool, "p_vs_winner": float})


def _json_seeds(seeds: tuple[float, ...] | None) -> str | None:
    return None if seeds is None else json.dumps(list(seeds))


def analyse(cells: pd.DataFrame) -> Comparison:
    """The whole analysis of `cells`, once.

    `cells` has one row per (quadrant, strategy) with columns REQUIRED_COLUMNS and optionally
    OPTIONAL_COLUMNS and any other (e.g. param_backbone, kept as given). Welch's test runs on
    test_accuracies (one per seed) where both cells have them, else on mean/std/n_seeds. Cells
    without a test score (not run, or NaN) and under-trained cells take no part in the verdict.
    See `quadrant_verdicts` for the verdict columns and `Comparison` for the rest.
    """
    cells = validated(cells)
    quadrants, per_cell = _judge(cells)
    long = cells.copy()
    intervals = [stats.t_interval(m, s, n) for m, s, n in zip(long["test_mean"], long["test_std"], long["n_seeds"])]
    long["ci_low"] = [low for low, _ in intervals]
    long["ci_high"] = [high for _, high in intervals]
    long["test_accuracies"] = [_json_seeds(s) for s in long["test_accuracies"]]
    verdicts = quadrants[VERDICT_COLUMNS].drop(columns=["size", "similarity", "target"])
    long = long.join(per_cell[CELL_VERDICT_COLUMNS]).merge(verdicts, on="quadrant", how="left")

    # Known cell columns first, then whatever else the caller passed (e.g. param_backbone), then verdicts.
    known = [*REQUIRED_COLUMNS, *CELL_STAT_COLUMNS, *OPTIONAL_COLUMNS]
    other = [c for c in cells.columns if c not in known]
    verdict_columns = [c for c in VERDICT_COLUMNS if c not in ("quadrant", "size", "similarity", "target")]
    long = long[known + other + CELL_VERDICT_COLUMNS + verdict_columns]

    quadrant_rank = {q: i for i, q in enumerate(quadrants["quadrant"])}
    order = sorted(
        range(len(long)), key=lambda i: (quadrant_rank[long["quadrant"].iloc[i]], strategy_key(long["strategy"].iloc[i]))
    )
    long = long.iloc[order].reset_index(drop=True)
    highlight = per_cell["highlight"].iloc[order].reset_index(drop=True)
    strategies = tuple(sorted(long["strategy"].unique(), key=strategy_key))
    return Comparison(cells=long, quadrants=quadrants, highlight=highlight, strategies=strategies)


def quadrant_verdicts(cells: pd.DataFrame) -> pd.DataFrame:
    """One row per quadrant: the best test mean, Welch's test against the runner-up, the tie set.

    `cells` has one row per (quadrant, strategy) with columns quadrant, size, similarity, target,
    strategy, best_val, test_mean, test_std, n_seeds and optionally OPTIONAL_COLUMNS. Welch's test
    runs on test_accuracies (one per seed) where both cells have them, else on mean/std/n_seeds.
    Cells without a test score (not run, or NaN) take no part.

    Columns returned: quadrant, size, similarity, target; winner (highest test mean, exact ties
    broken by STRATEGIES) and winner_test_mean; runner_up and runner_up_test_mean; margin
    (winner minus runner-up); p_value (Welch, winner vs runner-up; NaN when either has < 2 seeds);
    significant (p_value < stats.ALPHA); tie_set (the winner and every strategy whose test against
    it is not significant, best first, ', '-joined); decisive (a runner-up exists, the tie set
    is the winner alone, and every scored cell has the same training_rule); verdict (the winner's
    name when decisive, '<winner>, not decisive: training rules differ' when only the rules stand
    in the way, else 'tie: a, b, ...'); textbook (the rule's strategies joined by ' or ');
    agrees_with_textbook (the rule names a strategy in the tie set); cheapest_in_tie and
    cheapest_cost_share; training_rules (the scored cells' training rules, '; '-joined).

    Only the verdicts, without the per-cell long form, so that a comparison.csv (which already
    holds per-cell verdict columns) is valid input again.
    """
    return _judge(validated(cells))[0][VERDICT_COLUMNS]


def comparison_long(cells: pd.DataFrame) -> pd.DataFrame:
    """The machine-readable long form, exactly what comparison.csv holds: every input cell (its
    columns, numbers unrounded, test_accuracies as a JSON list), ci_low/ci_high (95% t-interval
    over seeds), every OPTIONAL_COLUMNS (blank where missing), is_winner / in_tie_set /
    p_vs_winner, and its quadrant's verdict columns."""
    return analyse(cells).cells

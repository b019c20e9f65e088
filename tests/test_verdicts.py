"""harness.verdicts: the comparison's analysis (Welch over seeds, tie sets, why a verdict is not decisive)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from harness.verdicts import (
    ALONE,
    CELL_STAT_COLUMNS,
    CELL_VERDICT_COLUMNS,
    DECISIVE,
    NO_SCORE,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    RULES_DIFFER,
    TIE,
    TIED,
    VERDICT_COLUMNS,
    WINNER,
    analyse,
    comparison_long,
    quadrant_verdicts,
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
            row = {
                "quadrant": quadrant,
                "size": size,
                "similarity": similarity,
                "target": target,
                "strategy": strategy,
                "best_val": best_val,
                "test_mean": float(np.mean(seeds)),
                "test_std": float(np.std(seeds, ddof=1)) if len(seeds) > 1 else NAN,
                "n_seeds": len(seeds),
                "logme": logme,
            }
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


def one_quadrant(rows, size: str = "small", similarity: str = "similar", **common) -> pd.DataFrame:
    """Cells of one quadrant from (strategy, test_mean, {extra columns}) with std 0.01 over 3 seeds."""
    return pd.DataFrame(
        [
            {
                "quadrant": f"{size}-{similarity}",
                "size": size,
                "similarity": similarity,
                "target": "t",
                "strategy": s,
                "best_val": m,
                "test_mean": m,
                "test_std": 0.01,
                "n_seeds": 3,
                **common,
                **extra,
            }
            for s, m, extra in rows
        ]
    )


@pytest.fixture
def cells() -> pd.DataFrame:
    return make_cells()


def verdict(verdicts: pd.DataFrame, quadrant: str) -> pd.Series:
    rows = verdicts[verdicts["quadrant"] == quadrant]
    assert len(rows) == 1
    return rows.iloc[0]


# --- the verdict columns ------------------------------------------------------------------------


def test_p_value_is_welch_over_seeds_winner_vs_runner_up(cells):
    v = quadrant_verdicts(cells)
    assert list(v.columns) == VERDICT_COLUMNS
    for quadrant, winner, runner in [
        ("small-similar", "features", "intermediate"),
        ("small-dissimilar", "full", "partial"),
        ("large-similar", "partial", "scratch"),
    ]:
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


def test_the_textbook_rule_follows_size_and_similarity_in_any_spelling():
    def rule(size, similarity):
        return quadrant_verdicts(one_quadrant([("full", 0.8, {})], size, similarity)).iloc[0].textbook

    assert rule("small", "similar") == "features"
    assert rule("small", "dissimilar") == "intermediate or partial"
    assert rule("large", "similar") == "full"
    assert rule(" Large", "DISSIMILAR ") == "full or scratch"  # case and spaces do not matter
    assert rule("medium", "similar") == ""  # no rule for a quadrant outside the four


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


def test_float_noise_is_no_margin_and_the_cheaper_strategy_ranks_first():
    # 0.1 + 0.2 + 0.6 is a hair above 0.9: the same score, so full (cheaper than scratch) is ranked first.
    cells = one_quadrant([("scratch", 0.1 + 0.2 + 0.6, {}), ("full", 0.9, {})], "large", "dissimilar")
    v = quadrant_verdicts(cells).iloc[0]
    assert (v.winner, v.runner_up, v.margin) == ("full", "scratch", 0.0)


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


def test_missing_cells_take_no_part(cells):
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


def test_quadrant_with_no_scores_and_no_rule():
    cells = pd.DataFrame(
        [
            {
                "quadrant": "odd",
                "size": "medium",
                "similarity": "similar",
                "target": "t",
                "strategy": "full",
                "best_val": NAN,
                "test_mean": NAN,
                "test_std": NAN,
                "n_seeds": 0,
            },
        ]
    )
    row = quadrant_verdicts(cells).iloc[0]
    assert pd.isna(row.winner) and row.textbook == "" and not row.agrees_with_textbook
    assert not row.significant and not row.decisive and row.verdict == "" and row.tie_set == ""


def test_an_undertrained_scratch_cell_takes_no_part_in_the_verdict():
    cells = one_quadrant(
        [("features", 0.80, {"undertrained": 0}), ("full", 0.70, {"undertrained": 0}), ("scratch", 0.95, {"undertrained": 1})]
    )
    v = quadrant_verdicts(cells).iloc[0]
    assert v["winner"] == "features" and v["runner_up"] == "full"
    assert "scratch" not in v["tie_set"]
    scratch = analyse(cells).cells.set_index("strategy").loc["scratch"]
    assert not scratch.is_winner and not scratch.in_tie_set and math.isnan(scratch.p_vs_winner)


def test_cells_trained_under_different_rules_get_no_winner():
    longer, shorter = "at least 2000 optimizer steps", "head 1 epochs, fine-tune 1 epochs"
    rows = [
        ("full", 0.864, {"training_rule": shorter}),
        ("partial", 0.80, {"training_rule": shorter}),
        ("scratch", 0.944, {"training_rule": longer}),
    ]
    mixed = quadrant_verdicts(one_quadrant(rows, "large", "similar")).iloc[0]
    assert mixed["winner"] == "scratch" and mixed["significant"] and not mixed["decisive"]
    assert mixed["verdict"] == "scratch, not decisive: training rules differ"
    assert mixed["training_rules"] == f"{longer}; {shorter}"  # sorted, '; '-joined
    one_rule = quadrant_verdicts(one_quadrant([(s, m, {"training_rule": shorter}) for s, m, _ in rows])).iloc[0]
    assert one_rule["decisive"] and one_rule["verdict"] == "scratch" and one_rule["training_rules"] == shorter


def test_a_tie_names_its_cheapest_member_and_its_share_of_the_cost():
    cells = one_quadrant([("features", 0.80, {"train_images_seen": 1000}), ("full", 0.81, {"train_images_seen": 8000})])
    cells["test_std"] = 0.03
    q = analyse(cells).quadrants.iloc[0]
    assert not q["decisive"] and q["cheapest_in_tie"] == "features" and q["cheapest_cost_share"] == 0.125
    assert q["cheaper_in_tie"]
    # Training seconds count where images seen are missing; no cost at all names the winner and no share.
    seconds = one_quadrant([("features", 0.80, {"train_seconds": 30.0}), ("full", 0.81, {"train_seconds": 60.0})])
    seconds["test_std"] = 0.03
    assert analyse(seconds).quadrants.iloc[0]["cheapest_cost_share"] == 0.5
    unknown = analyse(one_quadrant([("features", 0.80, {}), ("full", 0.81, {})])).quadrants.iloc[0]
    assert unknown["cheapest_in_tie"] == "full" and math.isnan(unknown["cheapest_cost_share"])
    assert not unknown["cheaper_in_tie"]
    # The same cost: the cheaper-to-train strategy is named, but it is not cheaper than the winner.
    same = analyse(one_quadrant([("features", 0.80, {"train_seconds": 60.0}), ("full", 0.805, {"train_seconds": 60.0})]))
    same = same.quadrants.iloc[0]
    assert same["cheapest_in_tie"] == "features" and same["cheapest_cost_share"] == 1.0 and not same["cheaper_in_tie"]


def test_bad_input_is_refused(cells):
    with pytest.raises(ValueError, match="test_std"):
        quadrant_verdicts(cells.drop(columns=["test_std"]))
    with pytest.raises(ValueError, match="more than one row"):
        quadrant_verdicts(pd.concat([cells, cells.iloc[[0]]]))
    cells["test_mean"] = cells["test_mean"].astype(object)
    cells.loc[0, "test_mean"] = "0,81"
    with pytest.raises(ValueError):
        quadrant_verdicts(cells)  # a typo is refused, not read as a missing score


# --- the analysis as one object -----------------------------------------------------------------


def test_each_quadrant_gets_the_kind_of_verdict_a_renderer_phrases(cells):
    outcomes = analyse(cells).quadrants.set_index("quadrant")["outcome"].to_dict()
    assert outcomes == {"small-similar": DECISIVE, "small-dissimilar": TIE, "large-similar": TIE, "large-dissimilar": TIE}
    rows = [("full", 0.864, {"training_rule": "b"}), ("scratch", 0.944, {"training_rule": "a"})]
    assert analyse(one_quadrant(rows)).quadrants.iloc[0].outcome == RULES_DIFFER
    assert analyse(one_quadrant(rows[:1])).quadrants.iloc[0].outcome == ALONE
    assert analyse(one_quadrant([("full", NAN, {})])).quadrants.iloc[0].outcome == NO_SCORE


def test_highlight_marks_the_decisive_winner_and_every_member_of_an_undecided_tie(cells):
    comparison = analyse(cells)
    marked = {(q, s): h for q, s, h in zip(comparison.cells.quadrant, comparison.cells.strategy, comparison.highlight)}
    assert {k for k, h in marked.items() if h == WINNER} == {("small-similar", "features")}
    assert {s for (q, s), h in marked.items() if q == "large-similar" and h == TIED} == {"partial", "scratch"}
    assert {s for (q, s), h in marked.items() if q == "small-dissimilar" and h == TIED} == {"full", "partial", "intermediate"}
    assert marked[("small-similar", "intermediate")] == ""
    # Alone in its quadrant: nothing to compare, so nothing is emphasised.
    assert list(analyse(one_quadrant([("full", 0.8, {})])).highlight) == [""]


def test_cells_and_quadrants_come_in_display_order():
    shuffled = make_cells().sample(frac=1.0, random_state=3)
    shuffled.loc[shuffled.strategy == "features", "strategy"] = "adapters"  # unknown: after the known ones
    comparison = analyse(shuffled)
    assert list(comparison.quadrants.quadrant) == ["small-similar", "small-dissimilar", "large-similar", "large-dissimilar"]
    assert comparison.strategies == ("intermediate", "partial", "full", "scratch", "adapters")
    first = comparison.cells[comparison.cells.quadrant == "small-similar"]
    assert list(first.strategy) == list(comparison.strategies)
    assert comparison.cells.index.equals(pd.RangeIndex(len(shuffled)))


def test_long_form_schema_and_intervals(cells):
    cells["param_backbone"] = "MobileNetV2"
    long = comparison_long(cells)
    verdict_columns = [c for c in VERDICT_COLUMNS if c not in ("quadrant", "size", "similarity", "target")]
    assert list(long.columns) == [
        *REQUIRED_COLUMNS,
        *CELL_STAT_COLUMNS,
        *OPTIONAL_COLUMNS,
        "param_backbone",
        *CELL_VERDICT_COLUMNS,
        *verdict_columns,
    ]
    assert len(long) == 20 and long["is_winner"].sum() == 4
    assert long.groupby("quadrant")["in_tie_set"].sum().to_dict() == {
        "small-similar": 1,
        "small-dissimilar": 3,
        "large-similar": 2,
        "large-dissimilar": 5,
    }

    row = long[(long.quadrant == "small-similar") & (long.strategy == "features")].iloc[0]
    low, high = scipy_stats.t.interval(0.95, 2, loc=0.82, scale=scipy_stats.sem([0.81, 0.82, 0.83]))
    assert (row.ci_low, row.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert json.loads(row.test_accuracies) == [0.81, 0.82, 0.83]
    one_seed = long[long.quadrant == "large-dissimilar"]
    assert one_seed["ci_low"].isna().all() and one_seed["ci_high"].isna().all()  # n < 2: NaN
    # Every quadrant row carries the quadrant's p-value; each cell its own p against the winner.
    partial = long[(long.quadrant == "small-similar") & (long.strategy == "partial")].iloc[0]
    assert partial.p_vs_winner == pytest.approx(
        scipy_stats.ttest_ind([0.81, 0.82, 0.83], [0.66, 0.68, 0.70], equal_var=False).pvalue
    )
    assert long.groupby("quadrant")["p_value"].nunique(dropna=False).eq(1).all()
    # Cost columns are there even when no cell had them, blank.
    assert long["train_epochs"].isna().all() and long["train_seconds"].isna().all()


def test_the_long_form_is_the_analysis_and_its_verdicts_the_quadrant_rows(cells):
    comparison = analyse(cells)
    pd.testing.assert_frame_equal(comparison.cells, comparison_long(cells))
    pd.testing.assert_frame_equal(comparison.verdicts, quadrant_verdicts(cells))
    by_quadrant = comparison.cells.drop_duplicates("quadrant").set_index("quadrant")
    for q in comparison.verdicts.itertuples(index=False):
        assert by_quadrant.loc[q.quadrant, "verdict"] == q.verdict
        assert by_quadrant.loc[q.quadrant, "decisive"] == q.decisive


def test_analysis_does_not_change_its_input(cells):
    before = cells.copy(deep=True)
    analyse(cells)
    pd.testing.assert_frame_equal(cells, before)

"""From-scratch training done properly: budget in steps, a learning-rate search, the fit check."""

from __future__ import annotations

import pandas as pd
import pytest


def test_a_small_training_set_gets_the_step_floor_not_a_few_epochs():
    from harness.baseline import scratch_budget

    budget = scratch_budget(train_images=120, batch_size=32, epochs=60, min_steps=2000, patience=20)
    assert budget.steps == 2000  # 60 epochs of 4 steps would be 240
    assert budget.steps_per_round == 50 and budget.rounds == 40  # validated at most 40 times
    assert budget.patience == 10  # never less than a quarter of the run


def test_a_large_training_set_keeps_its_epochs():
    from harness.baseline import scratch_budget

    budget = scratch_budget(train_images=50_000, batch_size=100, epochs=30, min_steps=2000, patience=5)
    assert budget.steps_per_round == 500 and budget.rounds == 30 and budget.steps == 15_000
    assert budget.patience == 7  # a quarter of 30 rounds beats 5 epochs


def test_the_search_picks_the_rate_with_the_lowest_training_loss_and_never_a_diverged_one():
    from harness.baseline import pick_learning_rate

    assert pick_learning_rate({3e-4: 1.2, 1e-3: 0.7, 3e-3: 0.9}) == 1e-3
    assert pick_learning_rate({3e-4: 1.2, 1e-3: float("nan"), 3e-3: float("inf")}) == 3e-4
    assert pick_learning_rate({3e-4: float("inf"), 1e-3: float("inf")}) == 3e-4  # all diverged: the smallest


def test_the_fit_check_flags_a_model_that_did_not_fit_a_small_set():
    from harness.baseline import fit_verdict

    assert not fit_verdict(0.38, 120)  # the old demo baseline: not a result
    assert fit_verdict(0.96, 120)
    assert fit_verdict(0.60, 20_000)  # large sets need not be fitted to count


def test_an_undertrained_scratch_cell_takes_no_part_in_the_verdict():
    from harness.export import comparison_table, quadrant_verdicts

    cells = pd.DataFrame([
        {"quadrant": "small-similar", "size": "small", "similarity": "similar", "target": "t", "strategy": s,
         "best_val": m, "test_mean": m, "test_std": 0.01, "n_seeds": 3, "undertrained": u}
        for s, m, u in (("features", 0.80, 0), ("full", 0.70, 0), ("scratch", 0.95, 1))
    ])
    verdict = quadrant_verdicts(cells).iloc[0]
    assert verdict["winner"] == "features" and verdict["runner_up"] == "full"
    assert "under-trained" in comparison_table(cells).iloc[0]["scratch"]


def test_fewer_than_two_confirmation_seeds_are_refused_at_load(tmp_path):
    from harness.config import ConfigError, load_config
    from tests.conftest import write_config
    from tests.test_quadrants import quad

    text = quad("none").replace("confirm_seeds: 2", "confirm_seeds: 1")
    with pytest.raises(ConfigError, match="quadrants.confirm_seeds"):
        load_config(write_config(tmp_path, text))


def test_baseline_learning_rate_must_be_auto_or_a_rate(tmp_path):
    from harness.config import ConfigError, load_config
    from tests.conftest import write_config

    with pytest.raises(ConfigError, match="baseline.learning_rate"):
        load_config(write_config(tmp_path, open(write_config(tmp_path)).read().replace("min_steps: 8", "min_steps: 8\n  learning_rate: fast")))


def test_the_heatmap_greys_an_undertrained_cell_out_of_its_rows_scale():
    import matplotlib.pyplot as plt

    from harness.export import heatmap_figure

    cells = pd.DataFrame([
        {"quadrant": "small-similar", "size": "small", "similarity": "similar", "target": "t", "strategy": s,
         "best_val": m, "test_mean": m, "test_std": 0.01, "n_seeds": 3, "undertrained": u}
        for s, m, u in (("features", 0.80, 0), ("full", 0.70, 0), ("scratch", 0.95, 1))
    ])
    fig = heatmap_figure(cells)
    scaled = fig.axes[0].images[0].get_array()
    texts = [t.get_text() for t in fig.axes[0].texts]
    plt.close(fig)
    assert scaled.mask[0, 2] and scaled[0, 0] == 1.0 and scaled[0, 1] == 0.0  # features is the row's best
    assert "under-trained" in texts

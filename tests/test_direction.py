"""'Better' in the metric's direction: the one rule every best-of in the harness follows."""

from __future__ import annotations

import math

from harness.direction import at_least_as_good, best_of, better, sign


def test_at_least_as_good_follows_the_direction_and_refuses_what_is_not_finite():
    assert at_least_as_good(0.5, None, "maximize") and at_least_as_good(0.5, 0.5, "maximize")
    assert not at_least_as_good(0.4, 0.5, "maximize")
    assert at_least_as_good(0.4, 0.5, "minimize") and not at_least_as_good(0.6, 0.5, "minimize")
    assert not at_least_as_good(math.nan, None, "maximize") and not at_least_as_good(math.inf, 0.1, "minimize")
    assert at_least_as_good(0.1, math.nan, "maximize")  # a leader that is not a number leads nothing


def test_better_is_strict_and_anything_beats_nothing():
    assert better(0.6, 0.5, "maximize") and not better(0.5, 0.5, "maximize")
    assert better(0.4, 0.5, "minimize") and not better(0.5, 0.5, "minimize")
    assert better(-1.0, None, "maximize") and better(9.0, None, "minimize")


def test_best_of_picks_the_first_of_equals_in_either_direction():
    rows = [("a", 0.3), ("b", 0.7), ("c", 0.7), ("d", 0.1)]
    assert best_of(rows, "maximize", key=lambda r: r[1]) == ("b", 0.7)
    assert best_of(rows, "minimize", key=lambda r: r[1]) == ("d", 0.1)
    assert best_of([2.0, 1.0, 3.0], "minimize") == 1.0


def test_sign_turns_any_direction_into_higher_is_better():
    assert sorted([0.2, 0.9], key=lambda v: sign("minimize") * v)[-1] == 0.2
    assert sign("maximize") == 1.0

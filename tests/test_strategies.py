"""Transfer strategies as pins on the search space, and the one statement of which parameters each uses."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.config import ParamSpec
from harness.strategies import UNUSED_PARAMETERS, strategy_search, uses

SEARCH = {"head_lr": ParamSpec("head_lr", "float", low=1e-4, high=1e-2, log=True),
          "finetune_lr": ParamSpec("finetune_lr", "float", low=1e-5, high=1e-3, log=True),
          "unfreeze_fraction": ParamSpec("unfreeze_fraction", "float", low=0.1, high=0.9)}


def test_uses_follows_the_one_table_and_an_unknown_strategy_uses_everything():
    assert not uses("features", "finetune_lr") and not uses("scratch", "finetune_lr")
    assert uses("partial", "finetune_lr") and uses("full", "unfreeze_fraction")
    assert uses("intermediate", "cut_fraction") and not uses("partial", "cut_fraction")
    assert uses("a-strategy-of-tomorrow", "cut_fraction")
    assert set(UNUSED_PARAMETERS) == {"features", "intermediate", "partial", "full", "scratch"}


def test_the_search_pins_what_a_strategy_does_not_use_and_refuses_an_unknown_one():
    quadrants = SimpleNamespace(cut_range=(0.5, 0.5), partial_range=(0.2, 0.8))
    features = strategy_search("features", SEARCH, quadrants)
    assert features["finetune_lr"].fixed and features["finetune_lr"].value == 1e-5  # the range's low end, pinned
    assert features["head_lr"] == SEARCH["head_lr"]  # what it uses is searched as configured
    partial = strategy_search("partial", SEARCH, quadrants)
    assert partial["finetune_lr"] == SEARCH["finetune_lr"]
    assert (partial["unfreeze_fraction"].low, partial["unfreeze_fraction"].high) == (0.2, 0.8)  # quadrants.partial_range
    intermediate = strategy_search("intermediate", SEARCH, quadrants)
    assert intermediate["cut_fraction"].fixed and intermediate["cut_fraction"].value == 0.5  # an empty range is a pin
    scratch = strategy_search("scratch", SEARCH, quadrants)
    assert [name for name, spec in scratch.items() if not spec.fixed] == ["head_lr"]  # its one phase trains at head_lr
    assert scratch["unfreeze_fraction"].value == 1.0 and scratch["strategy"].value == "scratch"
    with pytest.raises(ValueError, match="unknown strategy 'linear'"):
        strategy_search("linear", SEARCH, quadrants)

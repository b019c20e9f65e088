"""Transfer strategies as pins on the search space, and the one statement of which parameters each uses."""

from __future__ import annotations

import math
from types import SimpleNamespace

import keras
import pytest

from harness.config import ParamSpec, parse_config
from harness.strategies import UNUSED_PARAMETERS, strategy_search, uses
from tests.conftest import quad

SEARCH = {
    "head_lr": ParamSpec("head_lr", "float", low=1e-4, high=1e-2, log=True),
    "finetune_lr": ParamSpec("finetune_lr", "float", low=1e-5, high=1e-3, log=True),
    "unfreeze_fraction": ParamSpec("unfreeze_fraction", "float", low=0.1, high=0.9),
}


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


# --- each strategy on a real backbone ----------------------------------------------------------------


def test_each_strategy_pins_what_it_means(weights_file):
    cfg = parse_config(quad(weights_file), "q.yaml")
    q = cfg.quadrants
    s = {name: strategy_search(name, cfg.search, q) for name in q.strategies}
    assert s["features"]["unfreeze_fraction"].value == 0.0 and s["features"]["cut_fraction"].value == 1.0
    assert s["intermediate"]["unfreeze_fraction"].value == 0.0
    assert (s["intermediate"]["cut_fraction"].low, s["intermediate"]["cut_fraction"].high) == tuple(q.cut_range)
    assert (s["partial"]["unfreeze_fraction"].low, s["partial"]["unfreeze_fraction"].high) == tuple(q.partial_range)
    assert s["full"]["unfreeze_fraction"].value == 1.0
    assert s["scratch"]["strategy"].value == "scratch"
    # parameters a strategy cannot use are pinned, not searched
    assert s["features"]["finetune_lr"].fixed and not s["partial"]["finetune_lr"].fixed


@pytest.mark.parametrize("strategy", ["features", "intermediate", "partial", "full", "scratch"])
def test_strategy_maps_to_the_trainable_layers_of_each_phase(strategy, weights_file):
    from harness.frameworks.keras.model import build_model, set_trainable
    from harness.objective import model_spec, plan_for

    cfg = parse_config(quad(weights_file), "q.yaml")
    search = strategy_search(strategy, cfg.search, cfg.quadrants)
    params = {n: (p.value if p.fixed else (p.low if p.low is not None else p.choices[0])) for n, p in search.items()}
    tm = build_model(model_spec(cfg, params, 3, str(weights_file)))
    plan = plan_for(cfg, params, len(tm.blocks))
    trainable = []
    for phase in plan:
        set_trainable(tm, phase.unfreeze_blocks)
        trainable.append({l.name for l in tm.backbone.layers if l.trainable and l.weights})
    all_layers = {l.name for l in tm.backbone.layers if l.weights}
    bn = {l.name for l in tm.backbone.layers if isinstance(l, keras.layers.BatchNormalization)}
    if strategy == "features":
        assert [p.name for p in plan] == ["head"] and trainable == [set()] and len(tm.blocks) == 19
    elif strategy == "intermediate":
        assert [p.name for p in plan] == ["head"] and trainable == [set()]
        low = cfg.quadrants.cut_range[0]
        assert len(tm.blocks) == math.ceil(19 * low) < 19  # cut after an earlier block
    elif strategy == "partial":
        top = {n for b in tm.blocks[-round(19 * cfg.quadrants.partial_range[0]) :] for n in b}
        assert trainable[0] == set() and trainable[1] == (all_layers & top) - bn
        assert "Conv1" not in trainable[1]  # the first blocks stay frozen
    elif strategy == "full":
        assert trainable[0] == set() and trainable[1] == all_layers - bn
    else:
        assert [p.name for p in plan] == ["scratch"] and trainable == [all_layers]  # BN included
        assert not tm.spec.pretrained

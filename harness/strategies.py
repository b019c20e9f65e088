"""Transfer strategies as search-space edits (pure: no TensorFlow).

Every strategy is the same two-phase machinery with some parameters pinned:

| strategy      | backbone weights | kept blocks            | unfrozen in phase 2          |
| ------------- | ---------------- | ---------------------- | ---------------------------- |
| features      | pretrained       | all                    | none (phase 1 only)          |
| intermediate  | pretrained       | first share, searched  | none (phase 1 only)          |
| partial       | pretrained       | all                    | top share, searched          |
| full          | pretrained       | all                    | all                          |
| scratch       | random init      | all                    | all, BN too, in one phase    |

    >>> search = strategy_search("features", cfg.search, cfg.quadrants)
    >>> search["unfreeze_fraction"].value
    0.0
"""

from __future__ import annotations

from harness.config import ParamSpec, QuadrantsConfig


def _fixed(name: str, kind: str, value) -> ParamSpec:
    return ParamSpec(name, kind, value=value)


def _range(name: str, low: float, high: float) -> ParamSpec:
    if low == high:
        return _fixed(name, "float", low)
    return ParamSpec(name, "float", low=low, high=high)


# The one statement of which strategy uses which parameter: the search parameters each strategy
# does not use. strategy_search pins them, so the sampler spends its budget on the ones that matter,
# and reports leave them blank instead of showing the placeholder. No phase 2 means no fine-tune LR
# and nothing unfrozen (scratch trains everything in its one phase, at head_lr); only `intermediate`
# cuts the backbone.
UNUSED_PARAMETERS: dict[str, frozenset[str]] = {
    "features": frozenset({"finetune_lr", "unfreeze_fraction", "unfreeze_blocks", "cut_fraction"}),
    "intermediate": frozenset({"finetune_lr", "unfreeze_fraction", "unfreeze_blocks"}),
    "partial": frozenset({"cut_fraction"}),
    "full": frozenset({"cut_fraction"}),
    "scratch": frozenset({"finetune_lr", "unfreeze_fraction", "unfreeze_blocks", "cut_fraction"}),
}

# The share of the kept blocks a strategy unfreezes (None: searched in quadrants.partial_range).
# scratch's 1.0 is not a choice but what its single phase means: every layer trains, BN too, at
# head_lr (the head LR range is the scratch LR range).
_UNFROZEN: dict[str, float | None] = {"features": 0.0, "intermediate": 0.0, "partial": None, "full": 1.0, "scratch": 1.0}


def uses(strategy: str, parameter: str) -> bool:
    """Whether `strategy` uses the search parameter `parameter`; every parameter counts as used by a
    strategy this module does not know."""
    return parameter not in UNUSED_PARAMETERS.get(strategy, ())


def strategy_search(strategy: str, search: dict[str, ParamSpec], q: QuadrantsConfig) -> dict[str, ParamSpec]:
    """The cell's search space: the sweep's search block with the strategy's parameters pinned.

    Parameters a strategy does not use (UNUSED_PARAMETERS) are pinned too, so the sampler spends
    its budget on the ones that matter (the fine-tune LR means nothing without a phase 2).
    """
    out = {k: v for k, v in search.items() if k not in ("unfreeze_blocks", "unfreeze_fraction", "cut_fraction")}
    finetune_lr = search["finetune_lr"]
    if strategy not in UNUSED_PARAMETERS:
        raise ValueError(f"unknown strategy {strategy!r}")
    if not uses(strategy, "finetune_lr"):
        out["finetune_lr"] = _fixed("finetune_lr", "float", finetune_lr.value if finetune_lr.fixed else finetune_lr.low)
    unfrozen = _UNFROZEN[strategy]
    out["unfreeze_fraction"] = (
        _range("unfreeze_fraction", *q.partial_range) if unfrozen is None else _fixed("unfreeze_fraction", "float", unfrozen)
    )
    out["cut_fraction"] = (
        _range("cut_fraction", *q.cut_range) if uses(strategy, "cut_fraction") else _fixed("cut_fraction", "float", 1.0)
    )
    out["strategy"] = _fixed("strategy", "str", strategy)
    return out

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


def strategy_search(strategy: str, search: dict[str, ParamSpec], q: QuadrantsConfig) -> dict[str, ParamSpec]:
    """The cell's search space: the sweep's search block with the strategy's parameters pinned.

    Parameters a strategy does not use are pinned too, so the sampler spends its budget on the
    ones that matter (the fine-tune LR means nothing without a phase 2).
    """
    out = {k: v for k, v in search.items() if k not in ("unfreeze_blocks", "unfreeze_fraction", "cut_fraction")}
    finetune_lr = search["finetune_lr"]
    no_phase2 = _fixed("finetune_lr", "float", finetune_lr.value if finetune_lr.fixed else finetune_lr.low)
    if strategy == "features":
        out.update(unfreeze_fraction=_fixed("unfreeze_fraction", "float", 0.0), cut_fraction=_fixed("cut_fraction", "float", 1.0), finetune_lr=no_phase2)
    elif strategy == "intermediate":
        out.update(unfreeze_fraction=_fixed("unfreeze_fraction", "float", 0.0), cut_fraction=_range("cut_fraction", *q.cut_range), finetune_lr=no_phase2)
    elif strategy == "partial":
        out.update(unfreeze_fraction=_range("unfreeze_fraction", *q.partial_range), cut_fraction=_fixed("cut_fraction", "float", 1.0))
    elif strategy == "full":
        out.update(unfreeze_fraction=_fixed("unfreeze_fraction", "float", 1.0), cut_fraction=_fixed("cut_fraction", "float", 1.0))
    elif strategy == "scratch":
        # One phase at head_lr: the head LR range is the scratch LR range.
        out.update(unfreeze_fraction=_fixed("unfreeze_fraction", "float", 1.0), cut_fraction=_fixed("cut_fraction", "float", 1.0), finetune_lr=no_phase2)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    out["strategy"] = _fixed("strategy", "str", strategy)
    return out


def is_pretrained(strategy: str) -> bool:
    return strategy != "scratch"

"""The search-space block -> `trial.suggest_*` calls.

Fixed parameters are returned as they are (and logged like sampled ones), so a run always
records every value that shaped it.

    >>> params = suggest(trial, cfg.search)
    >>> params["backbone"], params["finetune_lr"]
    ('MobileNetV2', 3.2e-05)
"""

from __future__ import annotations

from typing import Any

import optuna

from harness.config import ParamSpec


def suggest_one(trial: optuna.Trial, p: ParamSpec) -> Any:
    if p.fixed:
        return p.value
    if p.choices is not None:
        return trial.suggest_categorical(p.name, list(p.choices))
    assert p.low is not None and p.high is not None  # neither fixed nor choices: a range (harness/config.py)
    if p.kind == "int":
        return trial.suggest_int(p.name, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
    return trial.suggest_float(p.name, float(p.low), float(p.high), step=p.step, log=p.log)


def suggest(trial: optuna.Trial, search: dict[str, ParamSpec]) -> dict[str, Any]:
    """Every parameter's value for this trial, sampled or fixed, in config order."""
    return {name: suggest_one(trial, p) for name, p in search.items()}

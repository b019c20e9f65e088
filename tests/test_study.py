"""The study's pruners. (The storage's checks before a sweep: tests/test_preflight.py.)"""

from __future__ import annotations

import optuna

from harness import study as st


def test_successive_halving_keeps_the_top_third_at_each_rung_from_the_warm_up_epochs():
    from harness.config import parse_config
    from tests.conftest import TINY

    cfg = parse_config(TINY.replace("pruner: none", "pruner: successive_halving\n  pruner_warmup_epochs: 1"), "s.yaml")
    pruner = st.make_pruner(cfg)
    assert isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner)
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
    pruned = []
    for value in (0.9, 0.8, 0.7, 0.1):  # the fourth is worse than the top third at the first rung
        trial = study.ask()
        trial.report(value, step=1)
        pruned.append(trial.should_prune())
        study.tell(trial, value)
    assert pruned[-1] is True and pruned[0] is False

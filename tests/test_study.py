"""The study's pruners and metric names. (The storage's checks before a sweep: tests/test_preflight.py.)"""

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


def test_a_study_and_its_seed_studies_name_their_metric_for_the_dashboard(tmp_path):
    import warnings

    from optuna.exceptions import ExperimentalWarning

    from harness.config import parse_config
    from tests.conftest import TINY

    cfg = parse_config(TINY, "s.yaml")
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert st.open_study(cfg, url).metric_names == [cfg.study.metric] == ["val_accuracy"]
        assert st.open_study(cfg, url, reseed=True).metric_names == ["val_accuracy"]  # resumed: still named
        assert st.open_seed_study(f"{cfg.study.name}.confirm", url).metric_names == ["test_accuracy"]
    assert not [w for w in caught if issubclass(w.category, ExperimentalWarning)]  # a sweep's log holds its own lines

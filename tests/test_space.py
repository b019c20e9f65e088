"""The search block -> `trial.suggest_*`: fixed values pass through, the rest are sampled in their own range."""

from __future__ import annotations

import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from harness.config import ParamSpec
from harness.space import suggest


def test_suggest_keeps_fixed_values_and_samples_the_rest_in_config_order_within_their_ranges():
    search = {
        "backbone": ParamSpec("backbone", "str", value="MobileNetV2"),
        "head_units": ParamSpec("head_units", "int", choices=(0, 8, 64)),
        "batch": ParamSpec("batch", "int", low=8, high=64, step=8),
        "head_lr": ParamSpec("head_lr", "float", low=1e-4, high=1e-2, log=True),
        "dropout": ParamSpec("dropout", "float", low=0.0, high=0.5, step=0.1),
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        params = suggest(trial, search)
        assert list(params) == list(search)  # every parameter, fixed ones too, in config order
        assert params["backbone"] == "MobileNetV2" and params["head_units"] in (0, 8, 64)
        assert isinstance(params["batch"], int) and 8 <= params["batch"] <= 64 and params["batch"] % 8 == 0
        assert 1e-4 <= params["head_lr"] <= 1e-2
        assert round(params["dropout"] * 10, 6) in {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}
        study.tell(trial, 0.5)
    # Optuna sees the sampled parameters only, each with the distribution the config asked for.
    distributions = study.trials[0].distributions
    assert "backbone" not in distributions
    assert distributions["head_units"] == CategoricalDistribution([0, 8, 64])
    assert distributions["batch"] == IntDistribution(8, 64, step=8)
    assert distributions["head_lr"] == FloatDistribution(1e-4, 1e-2, log=True)
    assert distributions["dropout"] == FloatDistribution(0.0, 0.5, step=0.1)
    assert len({t.params["head_lr"] for t in study.trials}) > 1  # sampled, not pinned

"""A trial's training plan: class weights against imbalance, computed on the train split and passed to every phase."""

from __future__ import annotations

import numpy as np
import pytest

from harness.config import ConfigError, DataConfig, parse_config
from harness.data import Dataset, make_splits
from harness.objective import class_weights, train_class_weights
from tests.conftest import BASE


def test_balanced_class_weights_match_scikit_learn_on_imbalanced_labels():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.array([0] * 80 + [1] * 15 + [2] * 5)
    weights = class_weights(labels, 3)
    assert weights == pytest.approx({0: 100 / (3 * 80), 1: 100 / (3 * 15), 2: 100 / (3 * 5)})
    assert list(weights.values()) == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=labels))
    assert sum(w * n for w, n in zip(weights.values(), (80, 15, 5))) == pytest.approx(len(labels))  # same total weight


def test_class_weight_config_and_the_train_split_it_is_computed_on():
    assert parse_config(BASE, "s.yaml").train.class_weight == "none"
    cfg = parse_config(BASE + "train: {class_weight: balanced}\n", "s.yaml")
    assert cfg.train.class_weight == "balanced"
    with pytest.raises(ConfigError, match=r"s\.yaml:\d+:\d+: train\.class_weight: must be one of none, balanced"):
        parse_config(BASE + "train: {class_weight: inverse}\n", "s.yaml")
    labels = np.array([0] * 40 + [1] * 10)
    ds = Dataset(["a", "b"], labels, images=np.zeros((50, 8, 8, 3), np.uint8), image_size=8)
    splits = make_splits(labels, DataConfig(val_fraction=0.2, test_fraction=0.2))
    weights = train_class_weights(cfg, ds, splits)
    assert weights == pytest.approx(class_weights(labels[splits.train], 2)) and weights[1] > weights[0]
    assert train_class_weights(parse_config(BASE, "s.yaml"), ds, splits) is None


def test_the_trainer_passes_the_class_weights_to_every_phase(monkeypatch):
    from harness.data import Splits
    from harness.frameworks.base import ModelSpec
    from harness.phases import History, Phase
    from harness.training import Configuration, EpochHooks, Trainer, TrainingSettings

    class Keeper:
        start_phase = keep = restore = staticmethod(lambda: None)

    class Recorder:  # a framework that records what each phase is given
        seen: list = []

        def image_batches(self, *args, **kwargs):
            return None

        def set_trainable(self, model, unfreeze_blocks):
            return 0, 0

        def weights_keeper(self, model):
            return Keeper()

        def run_phase(self, model, phase, data, run):
            self.seen.append(run.class_weight)
            return 0

    fw = Recorder()
    ds = Dataset(["a", "b"], np.array([0, 1]), images=np.zeros((2, 8, 8, 3), np.uint8), image_size=8)
    everything = np.arange(2)
    weights = {0: 0.5, 1: 3.0}
    trainer = Trainer(
        fw, ds, Splits(everything, everything, everything), TrainingSettings({"head": 1, "finetune": 1}, class_weight=weights)
    )
    plan = (Phase("head", 1, 1e-3, 0), Phase("finetune", 1, 1e-4, 2))

    class Model:
        spec, n_blocks = ModelSpec("MobileNetV2", 8, 2, None, {}), 4

    trainer.run_plan(Model(), Configuration(Model.spec, plan, 0, 0), EpochHooks(), History())
    assert fw.seen == [weights, weights]

"""Keras and PyTorch backbones in one harness: a study that searches both, a torch sweep on a
machine without TensorFlow (its winner served by harness.predict there too), and the same images
and splits in both frameworks."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, TINY, run_cli, run_main, write_config

pytestmark = pytest.mark.slow

TORCH = "torchvision/mobilenet_v3_small"
# Both zoos in one search; cut to their first blocks, so every model traces and trains in seconds.
# Seed 4 samples MobileNetV2, the torch model, then MobileNetV2 twice: the one process swaps framework twice.
MIXED = (
    TINY.replace("n_trials: 2", "n_trials: 4")
    .replace("seed: 0", "seed: 4", 1)
    .replace("backbone: MobileNetV2", f"backbone: {{choices: [MobileNetV2, {TORCH}]}}")
    .replace("scratch: true", "scratch: false")
)
TORCH_ONLY = TINY.replace("backbone: MobileNetV2", f"backbone: {TORCH}").replace("scratch: true", "scratch: false")
WITHOUT_TENSORFLOW = str(ROOT / "tests" / "without_tensorflow")  # its sitecustomize hides TensorFlow and Keras


def _records(work):
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{work}/results/tiny/optuna.db")
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/results/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id], max_results=100)
    return study, client, runs


def test_one_study_trains_keras_and_torch_backbones_and_records_them_alike(tmp_path):
    config = write_config(tmp_path, MIXED)
    done = run_main(str(config), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    study, client, runs = _records(tmp_path)
    trials = [t for t in study.trials if t.state.name == "COMPLETE"]
    by_backbone = {t.params["backbone"]: t for t in trials}
    assert set(by_backbone) == {"MobileNetV2", TORCH}, [t.params for t in study.trials]
    # Each framework's trials ran in processes of their own: a process never loads both.
    workers = {name: {t.user_attrs["worker"] for t in trials if t.params["backbone"] == name} for name in by_backbone}
    assert not workers["MobileNetV2"] & workers[TORCH]
    # A torch trial's run looks like a Keras trial's: the same params, metrics, curves and artifacts.
    keras_run, torch_run = (client.get_run(by_backbone[name].user_attrs["mlflow_run_id"]) for name in ("MobileNetV2", TORCH))
    assert set(keras_run.data.params) == set(torch_run.data.params)
    assert set(keras_run.data.metrics) - {"system/rss_mib"} <= set(torch_run.data.metrics)
    for run in (keras_run, torch_run):
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(len(history))) and len(history) >= 2  # one epoch axis
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "history.csv", "learning_curve.png"} <= artifacts, artifacts
        assert [d.dataset.name for d in run.inputs.dataset_inputs]  # the datasets it trained on
    # The winner, whichever framework it is, was registered and tested once on the held-out split.
    version = client.get_model_version_by_alias("tiny", "champion")
    winner = client.get_run(version.run_id)
    assert "test_accuracy" in winner.data.metrics and "reloaded_val_accuracy" in winner.data.metrics


def test_a_torch_sweep_runs_and_its_winner_predicts_where_tensorflow_is_not_installed(tmp_path):
    from PIL import Image

    config = write_config(tmp_path, TORCH_ONLY)
    env = {"PYTHONPATH": f"{WITHOUT_TENSORFLOW}:{ROOT}"}
    done = run_cli(str(config), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    study, client, runs = _records(tmp_path)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert not [r for r in runs if r.info.status == "RUNNING"]
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (40 + i, 30, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    import subprocess
    import sys

    served = subprocess.run(
        [sys.executable, "-m", "harness.predict", "tiny@champion", str(folder), "--out", str(tmp_path / "p.csv")],
        cwd=tmp_path,
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert served.returncode == 0, served.stderr[-3000:]
    import pandas as pd

    table = pd.read_csv(tmp_path / "p.csv")
    assert table["file"].tolist() == ["0.png", "1.png", "2.png"]
    assert np.allclose(table.filter(like="p_").sum(axis=1), 1.0, atol=1e-4)


def test_a_torch_backbone_where_torch_is_missing_is_refused_naming_the_extra(tmp_path, monkeypatch):
    import importlib.util

    from harness.config import SweepRefused, parse_config
    from harness.preflight import check_frameworks_installed

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torchvision" else real(name, *a))
    with pytest.raises(SweepRefused, match=r'torchvision is not installed: pip install -e "\.\[torch\]"'):
        check_frameworks_installed(parse_config(TORCH_ONLY, "t.yaml"))


def test_unknown_torch_names_are_refused_with_the_closest_names(tmp_path):
    config = write_config(tmp_path, TORCH_ONLY.replace(TORCH, "torchvision/mobilenet_v3_smal"))
    done = run_main(str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert "torchvision has no model 'mobilenet_v3_smal'; closest: torchvision/mobilenet_v3_small" in done.stderr
    assert not (tmp_path / "results" / "mlflow.db").exists()  # refused before anything was written


@pytest.mark.parametrize("source", ["builtin", "folder"])
def test_every_source_gives_both_frameworks_the_same_images_in_the_same_splits(tmp_path, source):
    """The splits are the framework-free harness/data.py's; the pixels of a split, read in order,
    are the same from tf.data and from the torch batches (a folder of PNGs and JPEGs of odd sizes too)."""
    from PIL import Image

    from harness.config import DataConfig
    from harness.data import load_dataset, make_splits
    from harness.frameworks import framework_named

    if source == "folder":
        rng = np.random.default_rng(1)
        for c in ("cat", "dog"):
            (tmp_path / c).mkdir()
            for i in range(6):
                pixels = rng.integers(0, 256, (37 + i, 29 + 2 * i, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / c / f"{i}.{'jpg' if i % 2 else 'png'}")
        cfg = DataConfig(source="folder", path=str(tmp_path), image_size=24, val_fraction=0.25, test_fraction=0.25)
    else:
        cfg = DataConfig(source="builtin", name="shapes", image_size=32, builtin_size=10, seed=3)
    dataset = load_dataset(cfg)
    splits = make_splits(dataset.labels, cfg)
    for split in (splits.train, splits.val, splits.test):
        seen = []
        for name in ("keras", "torch"):
            batches = framework_named(name).image_batches(dataset, split, 4, shuffle=False)
            images, labels = zip(*((np.asarray(x), np.asarray(y)) for x, y in batches))
            seen.append((np.concatenate(images), np.concatenate(labels)))
        (keras_x, keras_y), (torch_x, torch_y) = seen
        np.testing.assert_array_equal(keras_y, torch_y)
        np.testing.assert_array_equal(keras_x, torch_x)

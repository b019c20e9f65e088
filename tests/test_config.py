"""Config validation: every bad input gets a message naming the key path (and file:line:col)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.config import ConfigError, load_config, parse_config
from tests.conftest import TINY, run_cli, write_config


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "s.yaml")
    return str(info.value)


def test_tiny_config_loads_with_defaults_filled_in():
    cfg = parse_config(TINY, "s.yaml")
    assert cfg.study.name == "tiny"
    assert cfg.search["backbone"].fixed and cfg.search["backbone"].value == "MobileNetV2"
    assert cfg.search["head_lr"].log and cfg.search["head_lr"].low == 0.001
    assert cfg.search["augment"].value is False  # default filled in
    assert cfg.to_dict()["search"]["head_units"] == {"choices": [0, 8]}


SHIPPED = sorted(p.name for p in (Path(__file__).resolve().parent.parent / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_sweep_config_is_valid(name):
    """Validation only: nothing is downloaded (TFDS and ImageNet configs included)."""
    from tests.conftest import ROOT

    cfg = load_config(ROOT / "sweeps" / name)
    assert cfg.study.name == name.removesuffix(".yaml")


def test_the_shipped_sweeps_include_the_demo_and_both_quadrant_sweeps():
    assert {"demo.yaml", "quadrants-demo.yaml", "quadrants-imagenet.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("study:\n  name: [x\n  n_trials: 3\n", "s.yaml:3:11: malformed YAML: expected ',' or ']'"),
        ("study:\n  nmae: x\n", "s.yaml:2:3: study.nmae: unknown key; valid keys: name,"),
        ("studdy: {}\n", "s.yaml:1:1: studdy: unknown key"),
        ("study:\n  n_trials: many\n", "study.n_trials: must be int; got str 'many'"),
        ("study:\n  n_trials: 0\n", "study.n_trials: must be >= 1; got 0"),
        ("study:\n  direction: up\n", "study.direction: must be one of maximize, minimize; got 'up'"),
        ("data:\n  image_size: 4\n", "data.image_size: must be >= 8"),
        ("search:\n  backbone: ResNet42\n", "search.backbone: unknown value 'ResNet42'; valid: ConvNeXtBase"),
        ("search:\n  backbone: {choices: [MobileNetV2, Xception]}\n", "data.image_size: 32 px is below Xception's minimum input size of 71 px"),
        ("search:\n  dropout: 1.5\n", "search.dropout: must be within [0.0, 0.95]; got 1.5"),
        ("search:\n  head_lr: {low: 0, high: 0.1, log: true}\n", "search.head_lr.low: must be within"),
        ("search:\n  head_units: {low: 64, high: 8}\n", "search.head_units: low (64) must not exceed high (8)"),
        ("search:\n  widht: 3\n", "search.widht: unknown search parameter"),
        ("search:\n  pooling: {low: 1, high: 2}\n", "search.pooling: a str parameter takes a fixed value or {choices: [...]}"),
        ("search:\n  unfreeze_fraction: 0.5\n  unfreeze_blocks: 3\n", "set either unfreeze_fraction or unfreeze_blocks"),
        ("data:\n  source: folder\n  path: /nonexistent/dir\n", "data.path: dataset folder not found: /nonexistent/dir"),
        ("data:\n  name: shapes\n  classes: [star4]\n", "data.classes: a classification task needs at least two classes"),
        ("data:\n  name: cifar1000\n", "data.name: unknown builtin dataset 'cifar1000'"),
        ("model:\n  weights: /no/such.weights.h5\n", "model.weights: weights file not found"),
        ("model:\n  weights: source\n", "model.weights: 'source' needs a source: block"),
        ("model:\n  backbone_options: {ResNet42: {}}\n", "model.backbone_options.ResNet42: unknown backbone"),
        ("train:\n  head: {epochs: 0}\n", "train.head.epochs: phase 1 must train the head"),
        ("- a\n- b\n", "top level must be a mapping"),
    ],
)
def test_bad_input_is_refused_with_its_key_path(text, expected):
    base = "data:\n  name: shapes\n" if "data:" not in text and not text.startswith("- ") else ""
    assert expected in error_of(text + base)


def test_yaml_tags_that_would_construct_python_objects_are_refused():
    message = error_of("study: !!python/object/apply:os.system ['echo pwned']\n")
    assert "malformed YAML" in message


def test_cli_refuses_bad_config_without_traceback_or_side_effects(workdir):
    bad = write_config(workdir, TINY.replace("n_trials: 2", "n_trials: -1"), "bad.yaml")
    proc = run_cli(str(bad), cwd=workdir, timeout=120)
    assert proc.returncode == 2
    assert "bad.yaml:4:3: study.n_trials: must be >= 1; got -1" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "results").exists()  # no study, no MLflow store


def test_cli_refuses_a_missing_config_file(workdir):
    proc = run_cli("nope.yaml", cwd=workdir, timeout=120)
    assert proc.returncode == 2 and "nope.yaml: config file not found" in proc.stderr

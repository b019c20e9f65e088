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


# --- the name rule: a name becomes a path, an experiment, a registered model and a filter value ---------------


@pytest.mark.parametrize("name, reason", [
    ("../../escaped", "contains '/'"),
    ("team/flowers", "contains '/'"),
    ("it's", "contains \"'\""),
    ("tick`name", "contains '`'"),
    ("model:v1", "contains ':'"),
    ("best@champion", "contains '@'"),
    ("two words", "contains ' '"),
    (".hidden", "starts with '.'"),
    ("a..b", "contains '..'"),
    ("", "is empty"),
    ("x" * 101, "is 101 characters long"),
])
def test_names_outside_the_rule_are_named_with_the_reason(name, reason):
    from harness.config import name_problem

    assert name_problem(name) == reason


@pytest.mark.parametrize("name", ["demo", "flowers-v2", "tiny.trial-3", "Q_2026.cells", "x" * 100])
def test_names_inside_the_rule_pass(name):
    from harness.config import name_problem

    assert name_problem(name) is None


def test_a_bad_study_name_in_the_yaml_is_refused_at_load_with_its_line():
    message = error_of('study:\n  name: "team/flowers"\ndata:\n  name: shapes\n')
    assert "s.yaml:2:3: study.name: 'team/flowers' contains '/'" in message
    assert "names are 1 to 100 characters" in message


def test_every_bad_target_name_is_reported_in_one_error():
    text = ("study: {name: q}\nmodel: {weights: none}\nquadrants:\n  strategies: [scratch]\n  targets:\n"
            "    - {name: \"a'b\", data: {name: shapes}}\n    - {name: ok, data: {name: shapes}}\n"
            "    - {name: ../up, data: {name: shapes}}\n")
    message = error_of(text)
    assert "quadrants.targets[0].name: \"a'b\" contains \"'\"" in message
    assert "quadrants.targets[2].name: '../up' contains '/'" in message
    assert "targets[1]" not in message


@pytest.mark.parametrize("name, reason", [("../../escaped", "contains '/'"), ("team/flowers", "contains '/'"),
                                          ("it's", "contains \"'\"")])
def test_cli_refuses_a_bad_study_name_flag_before_writing_anything(workdir, name, reason):
    config = write_config(workdir)
    before = sorted(p.relative_to(workdir.parent) for p in workdir.parent.rglob("*"))
    proc = run_cli(str(config), "--study-name", name, cwd=workdir, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"--study-name: {name!r} {reason}; names are 1 to 100 characters" in proc.stderr
    assert "Traceback" not in proc.stderr
    # nothing anywhere in the temporary tree: no results/, no optuna.db or sweep.lock beside it, no MLflow store
    assert sorted(p.relative_to(workdir.parent) for p in workdir.parent.rglob("*")) == before


# --- YAML that parses, but not into what its author meant -----------------------------------------------------


def test_duplicate_keys_are_refused_naming_both_lines_and_every_duplicate():
    text = "study:\n  name: a\n  n_trials: 3\n  name: b\ndata:\n  name: shapes\nstudy:\n  seed: 1\n"
    message = error_of(text)
    assert "2 duplicate key(s)" in message
    assert "s.yaml:4:3: study.name: duplicate key (first set at line 2)" in message
    assert "s.yaml:7:1: study: duplicate key (first set at line 1)" in message


def test_a_merge_key_overridden_on_purpose_is_not_a_duplicate():
    cfg = parse_config("data: {name: shapes}\n"
                       "train:\n  head: &h {epochs: 2, batch_size: 8}\n  finetune:\n    <<: *h\n    epochs: 3\n", "s.yaml")
    assert cfg.train.finetune.epochs == 3 and cfg.train.finetune.batch_size == 8


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "~\n"])
def test_an_empty_config_gets_its_own_message(text):
    assert error_of(text) == ("s.yaml: config file is empty; a sweep needs at least a data: block "
                              "(sweeps/demo.yaml is a complete example)")


def test_cli_names_an_empty_config_and_a_directory_given_as_the_config(workdir):
    (workdir / "empty.yaml").write_text("# nothing yet\n")
    (workdir / "sweeps").mkdir()
    empty = run_cli("empty.yaml", cwd=workdir, timeout=120)
    assert empty.returncode == 2 and "empty.yaml: config file is empty" in empty.stderr
    folder = run_cli("sweeps", cwd=workdir, timeout=120)
    assert folder.returncode == 2 and "sweeps: is a directory, expected a YAML file" in folder.stderr
    dup = write_config(workdir, TINY + "study:\n  seed: 3\n", "dup.yaml")
    duplicated = run_cli(str(dup), cwd=workdir, timeout=120)
    assert duplicated.returncode == 2 and "study: duplicate key (first set at line 2)" in duplicated.stderr
    assert not (workdir / "results").exists()


# --- study.warm_start ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [("auto", []), ("off", None), ("false", None), ("[team, flowers-v2]", ["team", "flowers-v2"])],
)
def test_warm_start_takes_auto_off_or_a_list_of_experiments(value, expected):
    from harness.config import warm_start_experiments

    cfg = parse_config(f"study:\n  warm_start: {value}\ndata:\n  name: shapes\n", "s.yaml")
    assert warm_start_experiments(cfg.study.warm_start) == expected


def test_warm_start_is_off_by_default_and_changes_no_fingerprint_and_no_trials_config():
    plain = parse_config(TINY, "s.yaml")
    assert plain.study.warm_start == "off" and plain.study.warm_start_trials == 3
    warm = parse_config(
        TINY.replace("  pruner: none\n", "  pruner: none\n  warm_start: auto\n  warm_start_trials: 5\n"), "s.yaml"
    )
    assert warm.fingerprint() == plain.fingerprint()  # which trials come first, never what a trial computes
    assert warm.resolved({"backbone": "MobileNetV2"}, 0)["study"]["warm_start"] == "off"


def test_every_warm_start_problem_is_reported_with_its_key_and_line():
    message = error_of("study:\n  warm_start: [team, 3, '', team]\ndata:\n  name: shapes\n")
    assert message.splitlines() == [
        "s.yaml:2:22: study.warm_start[1]: must be an experiment name (a non-empty string); got 3",
        "s.yaml:2:25: study.warm_start[2]: must be an experiment name (a non-empty string); got ''",
        "s.yaml:2:29: study.warm_start[3]: experiment 'team' is listed twice",
    ]
    assert error_of("study:\n  warm_start: on\ndata:\n  name: shapes\n") == (
        "s.yaml:2:3: study.warm_start: must be auto, off or a list of MLflow experiment names; got True"
    )
    assert "study.warm_start: an empty list learns from nothing" in error_of("study: {warm_start: []}\ndata: {name: shapes}\n")
    assert "study.warm_start_trials: must be >= 1; got 0" in error_of("study: {warm_start_trials: 0}\ndata: {name: shapes}\n")


def test_a_quadrant_sweep_refuses_a_warm_start():
    from tests.conftest import ROOT

    text = (ROOT / "sweeps" / "quadrants-demo.yaml").read_text()
    assert "study:\n" in text
    message = error_of(text.replace("study:\n", "study:\n  warm_start: auto\n", 1))
    assert "study.warm_start: a quadrant sweep runs one study per cell and is not warm-started; leave it off" in message

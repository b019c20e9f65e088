"""Config validation: every bad input gets a message naming the key path (and file:line:col)."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from harness.config import ConfigError, load_config, parse_config
from harness.runtime import resolve_switch
from tests.conftest import BASE, DATA, GROUPS, TINY, problems_of, quad, run_cli, write_config


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
        (
            "search:\n  backbone: {choices: [MobileNetV2, Xception]}\n",
            "data.image_size: 32 px is below Xception's minimum input size of 71 px",
        ),
        ("search:\n  dropout: 1.5\n", "search.dropout: must be within [0.0, 0.95]; got 1.5"),
        ("search:\n  head_lr: {low: 0, high: 0.1, log: true}\n", "search.head_lr.low: must be within"),
        ("search:\n  head_units: {low: 64, high: 8}\n", "search.head_units: low (64) must not exceed high (8)"),
        ("search:\n  widht: 3\n", "search.widht: unknown search parameter"),
        ("search:\n  pooling: {low: 1, high: 2}\n", "search.pooling: a str parameter takes a fixed value or {choices: [...]}"),
        ("search:\n  unfreeze_fraction: 0.5\n  unfreeze_blocks: 3\n", "set either unfreeze_fraction or unfreeze_blocks"),
        ("data:\n  name: shapes\n  classes: [star4]\n", "data.classes: a classification task needs at least two classes"),
        ("data:\n  name: cifar1000\n", "data.name: unknown builtin dataset 'cifar1000'"),
        ("model:\n  weights: /no/such.h5\n", "model.weights: Keras 3 weights files end in .weights.h5; got /no/such.h5"),
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


@pytest.mark.parametrize(
    "name, reason",
    [
        ("../../escaped", "contains '/'"),
        ("team/flowers", "contains '/'"),
        ("it's", 'contains "\'"'),
        ("tick`name", "contains '`'"),
        ("model:v1", "contains ':'"),
        ("best@champion", "contains '@'"),
        ("two words", "contains ' '"),
        (".hidden", "starts with '.'"),
        ("a..b", "contains '..'"),
        ("", "is empty"),
        ("x" * 101, "is 101 characters long"),
    ],
)
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
    text = (
        "study: {name: q}\nmodel: {weights: none}\nquadrants:\n  strategies: [scratch]\n  targets:\n"
        '    - {name: "a\'b", data: {name: shapes}}\n    - {name: ok, data: {name: shapes}}\n'
        "    - {name: ../up, data: {name: shapes}}\n"
    )
    message = error_of(text)
    assert 'quadrants.targets[0].name: "a\'b" contains "\'"' in message
    assert "quadrants.targets[2].name: '../up' contains '/'" in message
    assert "targets[1]" not in message


@pytest.mark.parametrize(
    "name, reason", [("../../escaped", "contains '/'"), ("team/flowers", "contains '/'"), ("it's", 'contains "\'"')]
)
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
    cfg = parse_config(
        "data: {name: shapes}\ntrain:\n  head: &h {epochs: 2, batch_size: 8}\n  finetune:\n    <<: *h\n    epochs: 3\n", "s.yaml"
    )
    assert cfg.train.finetune.epochs == 3 and cfg.train.finetune.batch_size == 8


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "~\n"])
def test_an_empty_config_gets_its_own_message(text):
    assert error_of(text) == (
        "s.yaml: config file is empty; a sweep needs at least a data: block (sweeps/demo.yaml is a complete example)"
    )


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


# --- data.class_map: refused at config load, every problem at once --------------------------


MAPPED = "{pentagon: [pentagon], star4: [star4], _drop: [t_shape, tri_ring, three_dots, arc]}"


def config_error(data_lines: str, base: str = BASE) -> str:
    text = base + textwrap.indent(textwrap.dedent(data_lines), "  ")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "s.yaml")
    return str(info.value)


def test_a_valid_class_map_loads_and_its_resolved_config_loads_again():
    import yaml

    cfg = parse_config(
        BASE + "  class_map: {round: [arc, three_dots], pointy: [star4, pentagon], _drop: [t_shape, tri_ring]}\n", "s.yaml"
    )
    assert cfg.data.class_map == GROUPS
    again = parse_config(yaml.safe_dump(cfg.resolved({"backbone": "MobileNetV2"}, 0)), "r.yaml")
    assert again.data.class_map == GROUPS


def test_unknown_builtin_classes_are_named_with_their_group():
    msg = config_error(
        "class_map: {pointy: [pentagon, star5, hexagon], round: [arc, circle], _drop: [t_shape, tri_ring, three_dots, star4]}\n"
    )
    assert re.match(r"s\.yaml:\d+:\d+: data\.class_map: 2 problem\(s\)", msg)
    assert "data.class_map.pointy: unknown class(es) 'star5', 'hexagon'; the dataset has pentagon, t_shape" in msg
    assert "data.class_map.round: unknown class(es) 'circle'" in msg


def test_a_class_in_two_groups_is_refused():
    msg = config_error(
        "class_map: {a: [pentagon, star4], b: [star4, arc], c: [arc], _drop: [t_shape, tri_ring, three_dots, pentagon]}\n"
    )
    assert problems_of(msg) == 3
    assert "data.class_map.b: class 'star4' is already in data.class_map.a" in msg
    assert "data.class_map.c: class 'arc' is already in data.class_map.b" in msg
    assert "data.class_map._drop: class 'pentagon' is already in data.class_map.a" in msg


def test_a_group_with_no_classes_is_refused():
    msg = config_error(
        "class_map:\n  a: [pentagon, star4]\n  b: []\n  c:\n  d: [arc]\n  _drop: [t_shape, tri_ring, three_dots]\n"
    )
    assert problems_of(msg) == 2
    assert "data.class_map.b: a target label needs at least one class" in msg
    assert "data.class_map.c: a target label needs at least one class" in msg  # `c:` alone is null


def test_unmapped_classes_are_refused_unless_dropped():
    msg = config_error("class_map: {pointy: [pentagon, star4], round: [arc]}\n")
    assert problems_of(msg) == 1
    assert (
        "data.class_map: class(es) t_shape, tri_ring, three_dots are in no target label; map them, or list them "
        "under _drop to leave them out"
    ) in msg
    ok = parse_config(
        BASE + "  class_map: {pointy: [pentagon, star4], round: [arc], _drop: [t_shape, tri_ring, three_dots]}\n", "s.yaml"
    )
    assert ok.data.class_map["_drop"] == ["t_shape", "tri_ring", "three_dots"]


def test_every_problem_of_a_class_map_is_listed_in_one_error():
    msg = config_error("class_map: {a: [pentagon, star5], b: [], c: [pentagon], _other: [arc], d: [0]}\n")
    expected = [
        "data.class_map.a: unknown class(es) 'star5'",
        "data.class_map.b: a target label needs at least one class",
        "data.class_map.c: class 'pentagon' is already in data.class_map.a",
        "data.class_map._other: target names starting with '_' are reserved; _drop lists classes to leave out",
        "data.class_map.d[0]: class names are strings; got int 0 (quote it)",
        "data.class_map: class(es) t_shape, star4, tri_ring, three_dots are in no target label",
    ]
    for part in expected:
        assert part in msg
    assert problems_of(msg) == len(expected) and "\n" not in msg  # one line


def test_fewer_than_two_target_labels_is_refused():
    msg = config_error("class_map: {all: [pentagon, star4, arc], _drop: [t_shape, tri_ring, three_dots]}\n")
    assert "data.class_map: a classification task needs at least two target labels; got 1" in msg


def test_classes_and_class_map_together_are_refused():
    msg = config_error(f"classes: [pentagon, star4]\nclass_map: {MAPPED}\n")
    assert "data.class_map: set either data.classes or data.class_map, not both" in msg


def test_the_source_datasets_class_map_is_checked_under_its_own_key():
    text = BASE + "source:\n  data: {source: builtin, name: shapes, class_map: {a: [pentagon], b: [star4]}}\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "s.yaml")
    assert re.match(r"s\.yaml:\d+:\d+: source\.data\.class_map: 1 problem", str(info.value))
    assert "source.data.class_map: class(es) t_shape, tri_ring, three_dots, arc are in no target label" in str(info.value)


# --- train.mixed_precision and train.jit_compile ------------------------------------------------


def test_both_switches_default_to_auto():
    cfg = parse_config(DATA)
    assert (cfg.train.mixed_precision, cfg.train.jit_compile) == ("auto", "auto")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("on", True),
        ("off", False),
        ("'on'", "on"),
        ("'off'", "off"),
        ("auto", "auto"),
    ],
)
def test_bare_and_quoted_on_off_are_accepted(text, expected):
    cfg = parse_config(f"{DATA}train:\n  mixed_precision: {text}\n  jit_compile: {text}\n")
    assert cfg.train.mixed_precision == expected and cfg.train.jit_compile == expected
    assert resolve_switch(cfg.train.mixed_precision, []) is (text in ("on", "'on'"))


@pytest.mark.parametrize("key", ["mixed_precision", "jit_compile"])
@pytest.mark.parametrize("value", ["fast", "1", "[on]", "null"])
def test_a_bad_switch_is_refused_at_load_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"sweep.yaml:3:3: train\.{key}: must be one of auto, on, off"):
        parse_config(f"{DATA}train:\n  {key}: {value}\n", "sweep.yaml")


# --- cache caps ---------------------------------------------------------------------------------


def test_cache_caps_are_checked_at_load_with_their_key():
    from harness.config import ConfigError, parse_config

    base = "study: {name: caps}\nsearch: {backbone: MobileNetV2, head_lr: 0.01}\n"
    cfg = parse_config(base + "data: {name: shapes}\n", "c.yaml")
    assert cfg.data.disk_cache_max_gib == 20 and cfg.train.feature_cache_max_gib == 20
    assert cfg.train.gpu_memory_limit_mib is None  # memory growth
    for key, text in (
        ("data.disk_cache_max_gib", "data: {name: shapes, disk_cache_max_gib: -1}\n"),
        ("train.feature_cache_max_gib", "train: {feature_cache_max_gib: many}\n"),
        ("train.gpu_memory_limit_mib", "train: {gpu_memory_limit_mib: 10}\n"),
    ):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            parse_config(base + ("" if text.startswith("data") else "data: {name: shapes}\n") + text, "c.yaml")
    limited = parse_config(base + "data: {name: shapes}\ntrain: {gpu_memory_limit_mib: 4096}\n", "c.yaml")
    assert limited.train.gpu_memory_limit_mib == 4096


# --- baseline and quadrants.confirm_seeds ----------------------------------------------------------


def test_fewer_than_two_confirmation_seeds_are_refused_at_load(tmp_path):
    text = quad("none").replace("confirm_seeds: 2", "confirm_seeds: 1")
    with pytest.raises(ConfigError, match="quadrants.confirm_seeds"):
        load_config(write_config(tmp_path, text))


def test_baseline_learning_rate_must_be_auto_or_a_rate(tmp_path):
    with pytest.raises(ConfigError, match="baseline.learning_rate"):
        load_config(
            write_config(tmp_path, write_config(tmp_path).read_text().replace("learning_rate: 0.001", "learning_rate: fast"))
        )


def test_baseline_retries_is_a_count_named_on_bad_input(tmp_path):
    default = write_config(tmp_path).read_text().replace("  retries: 0", "")
    assert load_config(write_config(tmp_path, default)).baseline.retries == 2
    for bad in ("-1", "two"):
        text = write_config(tmp_path).read_text().replace("retries: 0", f"retries: {bad}")
        with pytest.raises(ConfigError, match="baseline.retries"):
            load_config(write_config(tmp_path, text))


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


# --- every problem of a file at once; the resolved config; the generated key reference ----------


def test_every_problem_of_a_file_is_reported_in_one_error_in_the_order_of_the_file():
    message = error_of(
        "study: {n_trials: 0, direction: up}\ndata: {name: shapes, image_size: 4}\nsearch: {dropout: 2, widht: 1}\n"
    )
    assert message.splitlines() == [
        "s.yaml:1:9: study.n_trials: must be >= 1; got 0",
        "s.yaml:1:22: study.direction: must be one of maximize, minimize; got 'up'",
        "s.yaml:2:22: data.image_size: must be >= 8; got 4",
        "s.yaml:3:10: search.dropout: must be within [0.0, 0.95]; got 2",
        "s.yaml:3:22: search.widht: unknown search parameter; valid: backbone, unfreeze_fraction, unfreeze_blocks, "
        "cut_fraction, head_units, head_lr, finetune_lr, dropout, pooling, augment, strategy (and screen: how the "
        "backbones are narrowed)",
    ]
    across = error_of("data: {name: cifar, classes: [a]}\ntrain: {head: {epochs: 0}}\nmodel: {weights: source}\n")
    assert across.splitlines() == [
        "s.yaml:1:8: data.name: unknown builtin dataset 'cifar'; valid: shapes-source, shapes, digits",
        "s.yaml:1:21: data.classes: a classification task needs at least two classes",
        "s.yaml:2:16: train.head.epochs: phase 1 must train the head for at least one epoch",
        "s.yaml:3:9: model.weights: 'source' needs a source: block describing the source pretraining",
    ]


def test_union_typed_keys_keep_their_values_as_written():
    assert parse_config("study: {workers: auto}\n" + DATA).study.workers == "auto"
    assert parse_config("study: {workers: 3}\n" + DATA).study.workers == 3
    rate = parse_config("baseline: {learning_rate: 1}\n" + DATA).baseline.learning_rate
    assert rate == 1 and type(rate) is int  # as written: the resolved config and the fingerprint keep 1


@pytest.mark.parametrize("name", ["TINY", *SHIPPED])
def test_a_resolved_config_round_trips_to_an_equal_config(name):
    import yaml

    from tests.conftest import ROOT

    text = TINY if name == "TINY" else (ROOT / "sweeps" / name).read_text()
    cfg = parse_config(text, "s.yaml")
    if cfg.quadrants is not None:  # each trial of a quadrant sweep resolves its cell's config
        from harness.quadrants import cell_config

        cfg = cell_config(cfg, cfg.quadrants.targets[0], "full")
    params = {n: p.value if p.fixed else p.choices[-1] if p.choices else p.high for n, p in cfg.search.items()}
    resolved = cfg.resolved(params, 3)
    again = parse_config(yaml.safe_dump(resolved), "config.yaml")
    assert again.to_dict() == resolved and again.resolved(params, 0)["search"] == resolved["search"]


def test_the_key_reference_in_the_docs_is_generated_from_the_schema():
    import subprocess
    import sys

    from tests.conftest import ROOT

    proc = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # names the command that makes it current
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert "| `warm_start_trials` | int >= 1 | `3` | warm start: the best configurations enqueued" in page

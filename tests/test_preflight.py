"""Preflight: what a loaded config names on disk is there, each problem with its key and file:line:col."""

from __future__ import annotations

import pytest

from harness.config import parse_config
from harness.preflight import config_file_problems
from tests.conftest import ROOT, problems_of, run_cli, write_config


def problems(text: str) -> list[str]:
    return config_file_problems(parse_config(text, "s.yaml"))


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "data:\n  source: folder\n  path: /nonexistent/dir\n",
            "s.yaml:3:3: data.path: dataset folder not found: /nonexistent/dir",
        ),
        (
            "model:\n  weights: /no/such.weights.h5\ndata:\n  name: shapes\n",
            "s.yaml:2:3: model.weights: weights file not found: /no/such.weights.h5",
        ),
        (
            "model: {weights: source}\nsource:\n  data: {source: folder, path: /no/source}\ndata: {name: shapes}\n",
            "s.yaml:3:26: source.data.path: dataset folder not found: /no/source",
        ),
    ],
)
def test_a_missing_file_or_folder_is_named_with_its_key_and_line(text, expected):
    assert problems(text) == [expected]


def test_every_missing_folder_of_a_quadrant_sweep_is_named():
    text = (
        "study: {name: q}\nmodel: {weights: none}\nquadrants:\n  strategies: [scratch]\n  targets:\n"
        "    - {name: a, data: {source: folder, path: /no/a}}\n    - {name: b, data: {name: shapes}}\n"
        "    - {name: c, data: {source: folder, path: /no/c}}\n"
    )
    assert problems(text) == [
        "s.yaml:6:40: quadrants.targets[0].data.path: dataset folder not found: /no/a",
        "s.yaml:8:40: quadrants.targets[2].data.path: dataset folder not found: /no/c",
    ]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "sweeps").glob("*.yaml")))
def test_the_shipped_sweeps_name_nothing_missing(name, monkeypatch):
    monkeypatch.chdir(ROOT)  # their weights files are relative to the repository
    from harness.config import load_config

    assert config_file_problems(load_config(ROOT / "sweeps" / name)) == []


def test_unknown_folder_classes_are_found_from_the_sub_folders(tmp_path):
    for c in ("cat", "dog", "owl", ".cache"):
        (tmp_path / c).mkdir()
    base = f"study: {{name: t}}\nmodel: {{weights: none}}\ndata:\n  source: folder\n  path: {tmp_path}\n"
    (msg,) = problems(base + "  class_map: {pet: [cat, dgo], bird: [owl]}\n")
    assert msg.startswith("s.yaml:6:3: data.class_map: 2 problem(s): ")
    assert problems_of(msg) == 2
    assert "data.class_map.pet: unknown class(es) 'dgo'; the dataset has cat, dog, owl" in msg  # hidden folder ignored
    assert "data.class_map: class(es) dog are in no target label" in msg
    assert problems(base + "  class_map: {pet: [cat, dog], bird: [owl]}\n") == []


def test_cli_refuses_a_missing_dataset_folder_before_writing_anything(workdir):
    config = write_config(workdir, "study: {name: t}\nmodel: {weights: none}\ndata: {source: folder, path: nowhere}\n")
    proc = run_cli(str(config), cwd=workdir, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "sweep.yaml:3:24: data.path: dataset folder not found: nowhere" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir / "results").exists()  # no study, no MLflow store

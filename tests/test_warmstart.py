"""Warm start from the tracking store: describe the target, find the nearest finished sweeps, enqueue
their best configurations fitted to the new search space. Real MLflow and Optuna SQLite stores,
history written with the tracker's own methods; nothing is trained."""

from __future__ import annotations

import dataclasses
import math
import shutil

import optuna
import pytest

from harness import warmstart as ws
from harness.config import ParamSpec, parse_config
from harness.space import suggest
from harness.tracking import STATE_TAG, TRIAL_TAG, Tracker
from tests.conftest import TINY, run_cli, run_main, write_config

# TINY's search: backbone MobileNetV2 (fixed), unfreeze_fraction 0.2..1.0, head_units {0, 8},
# head_lr 0.001..0.01 (log), finetune_lr 0.0001..0.001 (log), dropout 0.1 (fixed).
GOOD = {"unfreeze_fraction": 0.5, "head_units": 8, "head_lr": 0.003, "finetune_lr": 0.0002}
NEAR = ws.TargetDescription(images=60, classes=3, image_size=32)


def config(warm_start: str = "auto", trials: int = 3):
    text = TINY.replace("  pruner: none\n", f"  pruner: none\n  warm_start: {warm_start}\n  warm_start_trials: {trials}\n")
    return parse_config(text, "s.yaml")


def params_of(trial_params: dict, **changes) -> dict:
    """A trial's params as the sweep logs them: every parameter, fixed ones included."""
    return {
        "backbone": "MobileNetV2",
        "dropout": 0.1,
        "cut_fraction": 0.2,  # fixed in the tiny config (tests/conftest.py TINY)
        "pooling": "avg",
        "augment": False,
        **trial_params,
        **changes,
    }


def history_sweep(uri, artifacts, name, target, trials, status="FINISHED", experiment=None):
    """A finished sweep in the store: its parent run (with the target's description unless None)
    and one trial run per (params, value, optuna state)."""
    tracker = Tracker(uri, experiment or name, str(artifacts))
    tracker.start_study_run(name, {"study": {"direction": "maximize", "metric": "val_accuracy"}}, "sqlite:///elsewhere", "fp")
    if target is not None:
        tracker.log_metrics(tracker.parent_run_id, ws.description_metrics(target))
        screened = {f"screen/{b}/{s}": v for b, row in target.screening.items() for s, v in row.items()}
        if screened:
            tracker.log_metrics(tracker.parent_run_id, screened)
    for number, (params, value, state) in enumerate(trials):
        run_id = tracker.start_child(f"trial {number}", "trial", {TRIAL_TAG: number, STATE_TAG: "RUNNING"})
        tracker.log_params(run_id, params)
        if value is not None:
            tracker.log_metrics(run_id, {"objective": value})
        tracker.end_run(run_id, "FINISHED" if state != "FAIL" else "FAILED", optuna_state=state)
    tracker.end_study_run(status)
    return tracker


@pytest.fixture(scope="module")
def blank_store(tmp_path_factory):
    """An empty, current MLflow SQLite store, made once: creating its schema takes seconds."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("blank") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def stores(tmp_path, blank_store):
    shutil.copy(blank_store, tmp_path / "mlflow.db")
    return f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", f"sqlite:///{tmp_path / 'optuna.db'}"


def new_sweep(stores, cfg, target=NEAR):
    """The new sweep's parent run and study, warm-started; returns (tracker, study, enqueued, log lines)."""
    uri, artifacts, storage = stores
    tracker = Tracker(uri, cfg.study.name, str(artifacts))
    tracker.start_study_run(cfg.study.name, cfg.to_dict(), storage, cfg.fingerprint())
    study = optuna.create_study(study_name=cfg.study.name, storage=storage, direction="maximize")
    lines: list[str] = []
    enqueued = ws.warm_start(cfg, study, tracker, target, lines.append)
    return tracker, study, enqueued, lines


def first_asked(study, cfg, n: int = 1) -> list[dict]:
    """What the first `n` trials the sampler hands out look like (enqueued ones come first)."""
    asked = []
    for _ in range(n):
        trial = study.ask()
        asked.append(suggest(trial, cfg.search))
        study.tell(trial, 0.5)
    return asked


# --- the distance (pure) ----------------------------------------------------------------------------


def test_identical_targets_are_at_distance_zero_and_each_part_counts_as_documented():
    a = ws.TargetDescription(1000, 10, 32)
    assert ws.distance(a, a) == 0.0
    parts = ws.distance_parts(a, ws.TargetDescription(100, 100, 64))
    assert parts == pytest.approx({"images": 1.0, "classes": 1.0, "image_size": 0.5})
    assert ws.distance(a, ws.TargetDescription(100, 10, 32)) == ws.distance(ws.TargetDescription(100, 10, 32), a)


def test_screening_scores_count_over_the_shared_backbones_only():
    a = ws.TargetDescription(100, 5, 32, {"MobileNetV2": {"logme": 1.0, "knn": 0.8}, "EfficientNetB0": {"knn": 0.1}})
    b = ws.TargetDescription(100, 5, 32, {"MobileNetV2": {"logme": 0.5, "knn": 0.6}, "MobileNetV3Small": {"knn": 0.9}})
    assert ws.distance_parts(a, b) == pytest.approx({"images": 0, "classes": 0, "image_size": 0, "logme": 0.5, "knn": 0.4})
    unscreened = ws.TargetDescription(100, 5, 32)
    assert "logme" not in ws.distance_parts(a, unscreened) and ws.distance(a, unscreened) == 0.0


def test_nearest_first_orders_by_distance_and_keeps_the_order_of_ties():
    target = ws.TargetDescription(100, 5, 32)
    history = [
        ("far", ws.TargetDescription(10_000, 5, 32)),
        ("near", ws.TargetDescription(120, 5, 32)),
        ("tie-a", ws.TargetDescription(1000, 5, 32)),
        ("tie-b", ws.TargetDescription(10, 5, 32)),
    ]
    assert [k for k, _ in ws.nearest_first(target, history)] == ["near", "tie-a", "tie-b", "far"]


def test_a_description_is_read_back_from_the_parent_runs_metrics_and_none_when_incomplete():
    metrics = {
        "target/images": 60.0,
        "target/classes": 3.0,
        "target/image_size": 32.0,
        "screen/MobileNetV2/logme": 1.5,
        "screen/MobileNetV2/rank": 1.0,
        "screen/tau/logme": 0.3,  # the after-sweep agreement: no backbone
        "screen/MobileNetV2/knn": math.nan,
    }
    d = ws.description_from_metrics(metrics)
    assert d == ws.TargetDescription(60, 3, 32, {"MobileNetV2": {"logme": 1.5}})
    assert ws.description_from_metrics({"target/images": 60.0, "target/classes": 3.0}) is None
    assert ws.description_from_metrics({**metrics, "target/classes": 0.0}) is None
    record = {"scores": {"MobileNetV2": {"logme": 1.5, "knn": None, "params": 10}, "MobileNetV3Small": {"logme": math.nan}}}
    assert ws.describe_target(60, 3, 32, record) == d


def test_fitting_clips_ranges_onto_their_grid_and_refuses_a_value_outside_the_choices():
    search = {
        "unfreeze_fraction": ParamSpec("unfreeze_fraction", "float", low=0.2, high=1.0, step=0.2),
        "head_units": ParamSpec("head_units", "int", choices=(0, 8)),
        "head_lr": ParamSpec("head_lr", "float", low=1e-3, high=1e-2, log=True),
        "augment": ParamSpec("augment", "bool", choices=(True, False)),
        "dropout": ParamSpec("dropout", "float", value=0.1),
        "unfreeze_blocks": ParamSpec("unfreeze_blocks", "int", low=0, high=4),
    }
    raw = {"unfreeze_fraction": "0.45", "head_units": "8", "head_lr": "0.05", "augment": "False", "dropout": "0.3"}
    params, notes = ws.fit_to_space(raw, search)
    # dropout is fixed here (the new config's value); unfreeze_blocks was not in that sweep (the sampler's).
    assert params == {"unfreeze_fraction": 0.4, "head_units": 8, "head_lr": 0.01, "augment": False}
    assert notes == ["unfreeze_fraction 0.45 clipped to 0.4 (range 0.2..1)", "head_lr 0.05 clipped to 0.01 (range 0.001..0.01)"]
    assert ws.fit_to_space({**raw, "unfreeze_fraction": "0.4"}, search)[1] == notes[1:]  # on the grid: unchanged
    assert ws.fit_to_space({**raw, "head_units": "16"}, search) == (
        None,
        ["head_units=16 is not among this search's choices (0, 8)"],
    )
    assert ws.fit_to_space({**raw, "head_lr": "fast"}, search)[0] is None
    assert ws.fit_to_space({**raw, "unfreeze_blocks": "9"}, search)[0]["unfreeze_blocks"] == 4


# --- warm start on real stores ------------------------------------------------------------------------


def test_the_nearest_sweeps_best_configuration_is_the_first_trial_and_the_parent_run_says_so(stores):
    uri, artifacts, _ = stores
    history_sweep(
        uri,
        artifacts,
        "near",
        ws.TargetDescription(50, 3, 32),
        [(params_of(GOOD), 0.9, "COMPLETE"), (params_of(GOOD, head_lr=0.001), 0.5, "COMPLETE")],
    )
    far_best = {**GOOD, "head_units": 0, "unfreeze_fraction": 1.0}
    history_sweep(uri, artifacts, "far", ws.TargetDescription(50_000, 100, 128), [(params_of(far_best), 0.95, "COMPLETE")])
    cfg = config("auto", trials=2)
    tracker, study, enqueued, lines = new_sweep(stores, cfg)
    assert enqueued == [GOOD, far_best]  # nearest first, each sweep's best (not the far sweep's higher value first)
    first, second = first_asked(study, cfg, 2)
    assert first == params_of(GOOD) and second == params_of(far_best)
    assert study.trials[0].user_attrs["warm_start_from"] == "near"
    assert lines[-1].startswith("warm start: 2 first trial(s) from the nearest sweep(s): near (distance 0.0792, best 0.9), far")
    parent = tracker.get_run_record(tracker.parent_run_id)
    assert parent.metrics["target/images"] == 60 and parent.metrics["target/classes"] == 3
    assert parent.tags["harness.warm_start.from"].startswith("near (distance 0.0792); far (distance ")
    (csv,) = [p for p in artifacts.rglob("warm_start.csv") if parent.run_id in str(p)]
    table = csv.read_text().splitlines()
    assert table[0].startswith("rank,sweep,experiment,parent_run,distance,images")
    assert table[1].startswith("1,near,near,") and table[1].endswith(",0.9,true,")


def test_warm_start_trials_caps_what_is_enqueued(stores):
    uri, artifacts, _ = stores
    for name, images in (("a", 50), ("b", 500)):
        history_sweep(
            uri, artifacts, name, ws.TargetDescription(images, 3, 32), [(params_of(GOOD, head_lr=images / 1e5), 0.8, "COMPLETE")]
        )
    _, _, enqueued, _ = new_sweep(stores, config("auto", trials=1))
    assert enqueued == [{**GOOD, "head_lr": 0.001}]  # a's 0.0005 clipped to the range; b not asked for


def test_an_incompatible_configuration_is_clipped_or_skipped_with_a_line_each(stores):
    uri, artifacts, _ = stores
    history_sweep(uri, artifacts, "wide-lr", ws.TargetDescription(60, 3, 32), [(params_of(GOOD, head_lr=0.05), 0.9, "COMPLETE")])
    history_sweep(
        uri,
        artifacts,
        "other-backbone",
        ws.TargetDescription(60, 3, 32),
        [(params_of(GOOD, backbone="EfficientNetB0"), 0.8, "COMPLETE")],
    )
    history_sweep(
        uri, artifacts, "big-head", ws.TargetDescription(61, 3, 32), [(params_of(GOOD, head_units=64), 0.7, "COMPLETE")]
    )
    cfg = config("auto")
    # The backbone searched: screening may have narrowed it to one choice the other sweep did not use.
    cfg = dataclasses.replace(cfg, search={**cfg.search, "backbone": ParamSpec("backbone", "str", choices=("MobileNetV2",))})
    _, study, enqueued, lines = new_sweep(stores, cfg)
    assert enqueued == [{**GOOD, "backbone": "MobileNetV2", "head_lr": 0.01}]
    assert (
        "warm start: the best configuration of sweep wide-lr, fitted: head_lr 0.05 clipped to 0.01 (range 0.001..0.01)" in lines
    )
    assert (
        "warm start: skipped the best configuration of sweep other-backbone: backbone='EfficientNetB0' is not among "
        "this search's choices (MobileNetV2)" in lines
    )
    assert (
        "warm start: skipped the best configuration of sweep big-head: head_units=64 is not among this search's choices (0, 8)"
        in lines
    )
    assert first_asked(study, cfg)[0]["head_lr"] == 0.01


def test_incomplete_history_sweeps_are_skipped_with_a_line_never_a_crash(stores):
    uri, artifacts, _ = stores
    history_sweep(uri, artifacts, "undescribed", None, [(params_of(GOOD), 0.99, "COMPLETE")])
    history_sweep(uri, artifacts, "no-trials", NEAR, [(params_of(GOOD), None, "FAIL"), (params_of(GOOD), 0.4, "PRUNED")])
    history_sweep(uri, artifacts, "garbled", NEAR, [(params_of(GOOD, head_lr="fast"), 0.9, "COMPLETE")])
    history_sweep(uri, artifacts, "killed", NEAR, [(params_of(GOOD), 0.9, "COMPLETE")], status="KILLED")
    history_sweep(uri, artifacts, "good", ws.TargetDescription(600, 3, 32), [(params_of(GOOD), 0.7, "COMPLETE")])
    _, _, enqueued, lines = new_sweep(stores, config("auto"))
    assert enqueued == [GOOD]
    assert (
        "warm start: skipped sweep undescribed: no description of its target (target/images, target/classes, target/image_size)"
        in lines
    )
    assert "warm start: skipped sweep no-trials: no completed trial" in lines
    assert "warm start: skipped the best configuration of sweep garbled: head_lr: unreadable value " in "\n".join(lines)
    assert not any("killed" in line for line in lines)  # only finished sweeps are history
    assert lines[-1].startswith("warm start: 1 first trial(s) from the nearest sweep(s): good (distance 1, best 0.7)")


def test_auto_with_an_empty_store_does_nothing_and_says_so_in_one_line(stores):
    tracker, study, enqueued, lines = new_sweep(stores, config("auto"))
    assert enqueued == [] and study.trials == []
    assert lines == ["warm start: no finished sweep in the tracking store to learn from; the study starts cold"]
    assert tracker.get_run_record(tracker.parent_run_id).metrics["target/image_size"] == 32  # described all the same


def test_off_only_describes_the_target_and_a_study_with_trials_is_not_warm_started(stores):
    uri, artifacts, storage = stores
    history_sweep(uri, artifacts, "near", NEAR, [(params_of(GOOD), 0.9, "COMPLETE")])
    tracker, study, enqueued, lines = new_sweep(stores, config("off"))
    assert enqueued == [] and lines == [] and study.trials == []
    assert tracker.get_run_record(tracker.parent_run_id).metrics["target/images"] == 60
    first_asked(study, config("off"))
    lines.clear()
    assert ws.warm_start(config("auto"), study, tracker, NEAR, lines.append) == []
    assert lines == ["warm start: study 'tiny' already has trials; nothing enqueued (only a new study is warm-started)"]


def test_a_list_learns_from_the_listed_experiments_only(stores):
    uri, artifacts, _ = stores
    history_sweep(
        uri, artifacts, "listed", ws.TargetDescription(6000, 3, 32), [(params_of(GOOD), 0.6, "COMPLETE")], experiment="team"
    )
    history_sweep(uri, artifacts, "nearer", NEAR, [(params_of(GOOD, head_units=0), 0.9, "COMPLETE")])
    _, _, enqueued, lines = new_sweep(stores, config("[team]"))
    assert enqueued == [GOOD]
    assert lines[-1].startswith("warm start: 1 first trial(s) from the nearest sweep(s): team/listed (distance 2,")


# --- refused before anything is written ---------------------------------------------------------


def files_under(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_a_listed_experiment_missing_from_the_store_is_named_and_refused_before_anything_is_written(workdir):
    uri = f"sqlite:///{workdir / 'results' / 'mlflow.db'}"
    (workdir / "results").mkdir()
    Tracker(uri, "team", str(workdir / "results" / "art"))
    text = TINY.replace("  pruner: none\n", "  pruner: none\n  warm_start: [team, nowhere]\n")
    config_path = write_config(workdir, text)
    before = files_under(workdir)
    proc = run_cli(str(config_path), cwd=workdir, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"error: study.warm_start: experiment(s) 'nowhere' not found in MLflow tracking store {uri}" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert files_under(workdir) == before  # no results/tiny/, optuna.db or sweep.lock
    assert not Tracker.experiment_exists(uri, "tiny")


def test_a_listed_experiment_is_refused_when_the_store_does_not_exist_yet(tmp_path):
    from harness.config import SweepRefused
    from harness.preflight import check_stores

    cfg = config("[team]")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = dataclasses.replace(
        cfg,
        study=dataclasses.replace(cfg.study, storage=f"sqlite:///{tmp_path / 'optuna.db'}"),
        tracking=dataclasses.replace(cfg.tracking, uri=uri),
    )
    with pytest.raises(SweepRefused, match="experiment\\(s\\) 'team' not found"):
        check_stores(cfg)
    assert files_under(tmp_path) == []


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_sweep_on_more_data_starts_from_the_first_sweeps_best_configuration(workdir):
    first_text = TINY.replace("name: tiny", "name: first").replace("scratch: true", "scratch: false")
    first = run_main(str(write_config(workdir, first_text, "first.yaml")), cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    second_text = (
        first_text.replace("name: first", "name: second")
        .replace("n_trials: 2", "n_trials: 1\n  warm_start: auto")
        .replace("builtin_size: 10", "builtin_size: 20")
    )
    second = run_main(str(write_config(workdir, second_text, "second.yaml")), cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "warm start: 1 first trial(s) from the nearest sweep(s): first (distance 0.301" in second.stderr
    first_study = optuna.load_study(study_name="first", storage=f"sqlite:///{workdir / 'results' / 'first' / 'optuna.db'}")
    started = optuna.load_study(study_name="second", storage=f"sqlite:///{workdir / 'results' / 'second' / 'optuna.db'}")
    # The tiny sweep's trials often tie on its few validation images: any configuration with the best value is a best one.
    best_configurations = [t.params for t in first_study.trials if t.value == first_study.best_value]
    assert started.trials[0].params in best_configurations
    assert started.trials[0].user_attrs["warm_start_from"] == "first"

"""Screening: ranking backbones by their scores, narrowing, Kendall tau and its verdict, config refusals,
and one tiny sweep over two backbones read back through Optuna and MLflow (the scores: test_transferability.py)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest
from mlflow.tracking import MlflowClient

from harness import screening as sc
from harness.config import ConfigError, backbone_candidates, parse_config
from tests.conftest import run_main, write_config


def test_size_ranks_by_parameter_count_and_a_missing_score_ranks_last():
    rows = {
        "small": {"params": 1e6, "logme": math.nan},
        "big": {"params": 2e7, "logme": -1.0},
        "mid": {"params": 5e6, "logme": -0.5},
    }
    assert sc.rank(rows, "size") == ["big", "mid", "small"]
    assert sc.rank(rows, "logme") == ["mid", "big", "small"]


def test_narrowing_keeps_the_top_k_in_the_configs_order():
    candidates = ["A", "B", "C", "D"]
    ranking = ["C", "A", "D", "B"]
    assert sc.narrow(candidates, ranking, 2) == ["A", "C"]
    assert sc.narrow(candidates, ranking, None) == candidates
    assert sc.narrow(candidates, ranking, 4) == candidates
    with pytest.raises(ValueError):
        sc.narrow(candidates, ranking, 0)


def test_the_narrowed_search_samples_only_the_kept_backbones():
    cfg = parse_config(_config(keep=None), "s.yaml")
    search = sc.narrowed_search(cfg.search, ["MobileNetV3Small"])
    assert search["backbone"].choices == ("MobileNetV3Small",)
    assert cfg.search["backbone"].choices == ("MobileNetV2", "MobileNetV3Small")  # the config is left alone
    study = optuna.create_study()
    from harness.space import suggest

    assert {suggest(study.ask(), search)["backbone"] for _ in range(5)} == {"MobileNetV3Small"}


def _trial(backbone, value, state="COMPLETE"):
    return SimpleNamespace(params={"backbone": backbone}, value=value, state=SimpleNamespace(name=state))


def test_best_per_backbone_reads_completed_trials_only():
    trials = [_trial("A", 0.5), _trial("A", 0.7), _trial("B", 0.9, "PRUNED"), _trial("B", 0.4)]
    assert sc.best_per_backbone(trials, "maximize") == {"A": 0.7, "B": 0.4}
    assert sc.best_per_backbone(trials, "minimize") == {"A": 0.5, "B": 0.4}


def test_tau_against_the_study_and_the_verdict_say_which_ranking_won():
    # The study: C > B > A. LogME orders them A > B > C (tau -1), size B > C > A... (tau 1/3), k-NN exactly (tau 1).
    rows = {
        "A": {"logme": 3.0, "knn": 0.1, "params": 1},
        "B": {"logme": 2.0, "knn": 0.5, "params": 3},
        "C": {"logme": 1.0, "knn": 0.9, "params": 2},
    }
    best = {"A": 0.2, "B": 0.5, "C": 0.8}
    taus = sc.agreement(rows, best, "maximize")
    assert taus["logme"] == pytest.approx(-1.0)
    assert taus["knn"] == pytest.approx(1.0)
    assert taus["size"] == pytest.approx(1 / 3)
    assert "imagenet_top1" not in taus  # no published figure for any of them
    assert (
        sc.verdict("logme", taus["logme"], taus["size"])
        == "LogME tau -1.00 vs size-only 0.33: size-only ranked better on this data"
    )
    assert sc.verdict("knn", taus["knn"], taus["size"]) == "k-NN tau 1.00 vs size-only 0.33: k-NN ranked better on this data"
    assert sc.verdict("logme", 0.5, 0.5).endswith("tied on this data")
    # minimize: lower values are better, so the same scores now disagree with the study
    assert sc.agreement(rows, best, "minimize")["knn"] == pytest.approx(-1.0)


def test_the_summary_lines_say_when_tau_cannot_be_computed():
    record = {"scores": {"A": {"logme": 1.0, "knn": 0.5, "params": 1}, "B": {"logme": 2.0, "knn": 0.6, "params": 2}}}
    lines, taus = sc.agreement_lines(record, [_trial("A", 0.5), _trial("A", 0.6)], "maximize")
    assert taus == {} and "1 backbone(s) completed trials, so Kendall's tau cannot be computed" in lines[0]
    lines, taus = sc.agreement_lines(record, [_trial("A", 0.5), _trial("B", 0.6)], "maximize")
    assert taus["logme"] == pytest.approx(1.0)
    assert any("LogME tau 1.00 vs size-only 1.00: tied on this data" in line for line in lines)
    assert sc.agreement_lines(None, [], "maximize") == ([], {})


def test_the_report_section_is_made_from_the_taus_logged_on_the_parent_run():
    text = sc.screening_markdown(
        {"screen/tau/logme": 0.33, "screen/tau/size": 0.67, "screen/tau/knn": 1.0, "best_val_accuracy": 0.9}
    )
    assert "- LogME tau 0.33 vs size-only 0.67: size-only ranked better on this data" in text
    assert "- k-NN tau 1.00 vs size-only 0.67: k-NN ranked better on this data" in text
    assert sc.screening_markdown({"best_val_accuracy": 0.9}) == ""
    assert "not comparable on this data" in sc.verdict("knn", math.nan, 1.0)


def test_the_csv_and_the_metrics_hold_every_score_and_what_was_kept():
    record = {
        "scores": {
            "A": {"logme": 1.5, "knn": 0.5, "params": 10, "imagenet_top1": None, "images": 9, "seconds": 1.0},
            "B": {"logme": 2.5, "knn": math.nan, "params": 20, "imagenet_top1": None, "images": 9, "seconds": 2.0},
        },
        "by": "logme",
        "keep": 1,
        "ranking": ["B", "A"],
        "kept": ["B"],
    }
    csv = sc.screening_csv(record).splitlines()
    assert csv[0] == "rank,backbone,logme,knn,params,imagenet_top1,images,seconds,kept"
    assert csv[1] == "1,B,2.5,,20,,9,2,true" and csv[2] == "2,A,1.5,0.5,10,,9,1,false"
    metrics = sc.parent_metrics(record)
    assert metrics["screen/A/logme"] == 1.5 and metrics["screen/B/rank"] == 1 and "screen/B/knn" not in metrics
    assert "ranked by logme; the search keeps 1" in sc.screening_text(record)


# --- config ------------------------------------------------------------------------------------------


def _config(keep, by="logme", weights="imagenet", study="screen", extra="") -> str:
    screen = "" if keep == "absent" else f"  screen: {{keep: {'null' if keep is None else keep}, by: {by}}}\n"
    return f"""
study: {{name: {study}, n_trials: 2, seed: 0, pruner: none}}
data: {{source: builtin, name: shapes, image_size: 32, builtin_size: 10, classes: [pentagon, star4, three_dots]}}
model:
  weights: {weights}
  backbone_options:
    MobileNetV2: {{alpha: 0.35}}
    MobileNetV3Small: {{alpha: 0.75}}
search:
  backbone: {{choices: [MobileNetV2, MobileNetV3Small]}}
{screen}{extra}"""


@pytest.mark.parametrize(
    "keep, expected",
    [
        (0, "s.yaml:11:12: search.screen.keep: must be >= 1; got 0"),
        (-1, "search.screen.keep: must be >= 1; got -1"),
        (
            3,
            "s.yaml:11:12: search.screen.keep: keeps 3 backbones, but search.backbone has only 2 candidate(s) "
            "(MobileNetV2, MobileNetV3Small)",
        ),
    ],
)
def test_keep_outside_one_to_the_candidates_is_refused_naming_the_key(keep, expected):
    with pytest.raises(ConfigError) as err:
        parse_config(_config(keep), "s.yaml")
    assert expected in str(err.value)


def test_screen_is_refused_without_pretrained_weights_and_with_an_unknown_score():
    with pytest.raises(ConfigError, match="search.screen: model.weights is none"):
        parse_config(_config(1, weights="none"), "s.yaml")
    with pytest.raises(ConfigError, match="search.screen.by: must be one of logme, knn, size; got 'accuracy'"):
        parse_config(_config(1, by="accuracy"), "s.yaml")


def test_screen_is_kept_in_the_config_record_and_only_a_set_one_changes_the_fingerprint():
    absent = parse_config(_config("absent"), "s.yaml")
    assert absent.screen is None and "screen" not in absent.to_dict()["search"]
    kept = parse_config(_config(1, by="knn"), "s.yaml")
    assert kept.screen.keep == 1 and kept.screen.by == "knn"
    assert kept.to_dict()["search"]["screen"] == {"keep": 1, "by": "knn", "max_images": 2000}
    assert kept.fingerprint() != absent.fingerprint()
    assert "screen" not in kept.resolved({"backbone": "MobileNetV2"}, 0)["search"]  # a trial's own config
    assert backbone_candidates(kept.search) == ["MobileNetV2", "MobileNetV3Small"]


class _Recorder:
    """Where screening's parent-run records land (the MLflow side is read back in the end-to-end test)."""

    parent_run_id = "parent"

    def __init__(self):
        self.metrics, self.texts, self.tags = {}, {}, {}

    def log_metrics(self, run_id, metrics, step=0):
        self.metrics.update(metrics)

    def log_text(self, run_id, text, name):
        self.texts[name] = text

    def set_tags(self, run_id, tags):
        self.tags.update(tags)


def test_screening_narrows_once_and_a_resume_reuses_the_recorded_list_without_scoring_again():
    cfg = parse_config(_config(1, by="knn"), "s.yaml")
    study = optuna.create_study(study_name="screen")
    calls, lines = [], []

    def run_task(task):
        calls.append(task.backbones)
        return {
            "MobileNetV2": {"logme": 2.0, "knn": 0.4, "params": 10},
            "MobileNetV3Small": {"logme": 1.0, "knn": 0.9, "params": 5},
        }

    tracker = _Recorder()
    trial_cfg, record = sc.screen_backbones(cfg, study, study._storage, tracker, run_task, lines.append)
    assert calls == [("MobileNetV2", "MobileNetV3Small")]
    assert record["kept"] == ["MobileNetV3Small"] and trial_cfg.search["backbone"].choices == ("MobileNetV3Small",)
    assert study.user_attrs[sc.SCREENING_ATTR]["kept"] == ["MobileNetV3Small"]
    assert tracker.metrics["screen/MobileNetV3Small/knn"] == 0.9 and "screening.csv" in tracker.texts
    assert "ranked by knn; the search keeps 1" in lines[-1]

    again, _ = sc.screen_backbones(cfg, study, study._storage, _Recorder(), run_task, lines.append)
    assert len(calls) == 1 and again.search["backbone"].choices == ("MobileNetV3Small",)

    # A study that already sampled from both backbones before screening is scored, not narrowed.
    from harness.space import suggest

    old = optuna.create_study(study_name="old")
    trial = old.ask()
    suggest(trial, cfg.search)
    old.tell(trial, 0.5)
    unchanged, record = sc.screen_backbones(cfg, old, old._storage, _Recorder(), run_task, lines.append)
    assert record["kept"] == ["MobileNetV2", "MobileNetV3Small"] and unchanged is cfg


def test_after_the_sweep_the_taus_are_logged_on_the_parent_run_and_shown():
    from optuna.distributions import CategoricalDistribution

    study = optuna.create_study(direction="maximize")
    dist = {"backbone": CategoricalDistribution(["A", "B"])}
    for backbone, value in (("A", 0.6), ("B", 0.9), ("B", 0.7)):
        study.add_trial(optuna.trial.create_trial(params={"backbone": backbone}, distributions=dist, value=value))
    record = {"scores": {"A": {"logme": 2.0, "knn": 0.3, "params": 1}, "B": {"logme": 1.0, "knn": 0.8, "params": 9}}}
    tracker = _Recorder()
    lines = sc.log_agreement(record, study, tracker, "maximize")
    assert tracker.metrics == {"screen/tau/logme": -1.0, "screen/tau/knn": 1.0, "screen/tau/size": 1.0}
    assert "  LogME tau -1.00 vs size-only 1.00: size-only ranked better on this data" in lines


def test_one_backbone_or_random_weights_are_not_screened():
    one = parse_config(_config("absent").replace("{choices: [MobileNetV2, MobileNetV3Small]}", "MobileNetV2"), "s.yaml")
    lines = []
    assert sc.screen_backbones(one, None, None, None, None, lines.append) == (one, None)
    random_init = parse_config(_config("absent", weights="none"), "s.yaml")
    assert sc.screen_backbones(random_init, None, None, None, None, lines.append) == (random_init, None)
    assert lines == ["screening skipped: model.weights is none, and frozen random features rank no backbone"]


# --- end to end ---------------------------------------------------------------------------------------

# The shipped source backbones (harness/assets/: sweeps/quadrants-demo.yaml's source block and options),
# so nothing is pretrained here.
E2E = """
study: {name: screened, n_trials: 2, seed: 0, pruner: none}
data: {source: builtin, name: shapes, image_size: 32, builtin_size: 10, classes: [pentagon, star4, three_dots],
       val_fraction: 0.3, test_fraction: 0.2}
source:
  data: {source: builtin, name: shapes-source, image_size: 32, builtin_size: 600, val_fraction: 0.1,
         test_fraction: 0.1, seed: 1}
  epochs: 40
  batch_size: 64
  learning_rate: 0.001
model:
  weights: source
  backbone_options:
    MobileNetV2: {alpha: 0.35}
    MobileNetV3Small: {alpha: 0.75}
search:
  backbone: {choices: [MobileNetV2, MobileNetV3Small]}
  screen: {keep: 1, by: logme}
  head_lr: {low: 0.001, high: 0.01, log: true}
  dropout: 0.1
train:
  head: {epochs: 1, batch_size: 16, patience: null}
  finetune: {epochs: 1, batch_size: 16, patience: null}
baseline: {scratch: false}
"""


@pytest.mark.slow
def test_a_two_backbone_sweep_logs_its_screening_and_keeps_one_backbone_also_on_resume(workdir):
    config = write_config(workdir, E2E)
    first = run_main(str(config), cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_main(str(config), "--n-trials", "3", cwd=workdir)
    assert second.returncode == 0, second.stderr[-3000:]

    study = optuna.load_study(study_name="screened", storage=f"sqlite:///{workdir}/results/screened/optuna.db")
    record = study.user_attrs[sc.SCREENING_ATTR]
    assert record["ranking"][0] == max(record["scores"], key=lambda b: record["scores"][b]["logme"])
    assert record["kept"] == record["ranking"][:1]
    assert [t.params["backbone"] for t in study.trials] == record["kept"] * 3  # the resume samples the same list
    assert "screening: scores and kept backbones as recorded in the study (resumed)" in second.stderr
    assert "ranked by logme; the search keeps 1" in first.stderr
    assert "so Kendall's tau cannot be computed" in first.stderr  # one backbone completed trials

    client = MlflowClient(tracking_uri=f"sqlite:///{workdir}/results/mlflow.db")
    parent = next(
        r
        for r in client.search_runs([client.get_experiment_by_name("screened").experiment_id])
        if r.data.tags.get("harness.role") == "study"
    )
    for backbone in ("MobileNetV2", "MobileNetV3Small"):
        assert math.isfinite(parent.data.metrics[f"screen/{backbone}/logme"])
        assert 0.0 <= parent.data.metrics[f"screen/{backbone}/knn"] <= 1.0
        assert parent.data.metrics[f"screen/{backbone}/params"] > 0
    local = client.download_artifacts(parent.info.run_id, "screening.csv", str(workdir))
    rows = Path(local).read_text().splitlines()
    assert rows[0].startswith("rank,backbone,logme,knn,params") and len(rows) == 3
    assert rows[1].split(",")[1] == record["kept"][0] and rows[1].endswith(",true")

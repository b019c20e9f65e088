"""Targets as users have them: merged classes (data.class_map), class weights against imbalance,
and what a winner's test reports beyond accuracy (AUC, per-class accuracy, confusion matrix)."""

from __future__ import annotations

import re
import textwrap

import numpy as np
import pytest

from harness.config import ConfigError, DataConfig, parse_config
from harness.data import DataError, Dataset, apply_class_map, load_dataset, make_splits
from harness.objective import class_weights, train_class_weights
from harness.evaluation import class_metric_keys, classification_metrics, confusion_csv

# builtin `shapes`: pentagon, t_shape, star4, tri_ring, three_dots, arc (harness/datasets_builtin.py)
BASE = """
study: {name: targets, n_trials: 1}
model: {weights: none}
search: {backbone: MobileNetV2}
data:
  source: builtin
  name: shapes
  builtin_size: 10
"""


def config_error(data_lines: str, base: str = BASE) -> str:
    text = base + textwrap.indent(textwrap.dedent(data_lines), "  ")
    with pytest.raises(ConfigError) as info:
        parse_config(text, "s.yaml")
    return str(info.value)


def problems_of(message: str) -> int:
    return int(re.search(r"(\d+) problem\(s\)", message).group(1))


# --- data.class_map: merging ----------------------------------------------------------------

GROUPS = {"round": ["arc", "three_dots"], "pointy": ["star4", "pentagon"], "_drop": ["t_shape", "tri_ring"]}


def test_class_map_merges_builtin_classes_into_sorted_target_labels():
    raw = load_dataset(DataConfig(source="builtin", name="shapes", builtin_size=10))
    ds = load_dataset(DataConfig(source="builtin", name="shapes", builtin_size=10, class_map=GROUPS))
    assert ds.class_names == ["pointy", "round"]  # sorted target names, _drop is no label
    assert ds.num_classes == 2 and len(ds.labels) == 40 and ds.images.shape == (40, 32, 32, 3)
    target_of = {c: t for t, members in GROUPS.items() if t != "_drop" for c in members}
    kept = [i for i, label in enumerate(raw.labels) if raw.class_names[label] in target_of]
    expected = [ds.class_names.index(target_of[raw.class_names[raw.labels[i]]]) for i in kept]
    assert ds.labels.tolist() == expected  # every image keeps its order and gets its group's label
    np.testing.assert_array_equal(ds.images, raw.images[kept])
    assert np.bincount(ds.labels).tolist() == [20, 20]
    splits = make_splits(ds.labels, DataConfig(val_fraction=0.2, test_fraction=0.2))
    assert set(ds.labels[splits.test].tolist()) == {0, 1}  # stratified on the merged labels


def test_class_map_relabels_a_folder_dataset(tmp_path):
    from PIL import Image

    for c in ("cat", "dog", "owl", "bat"):
        (tmp_path / c).mkdir()
        for i in range(5):
            Image.fromarray(np.full((8, 8, 3), i * 40, np.uint8)).save(tmp_path / c / f"{i}.png")
    ds = load_dataset(DataConfig(source="folder", path=str(tmp_path), image_size=8,
                                 class_map={"pet": ["cat", "dog"], "bird": ["owl"], "_drop": ["bat"]}))
    assert ds.class_names == ["bird", "pet"] and len(ds.paths) == 15
    assert all(("/owl/" in p) == (label == 0) for p, label in zip(ds.paths, ds.labels))
    assert not any("/bat/" in p for p in ds.paths)


def test_a_valid_class_map_loads_and_its_resolved_config_loads_again():
    import yaml

    cfg = parse_config(BASE + "  class_map: {round: [arc, three_dots], pointy: [star4, pentagon], "
                              "_drop: [t_shape, tri_ring]}\n", "s.yaml")
    assert cfg.data.class_map == GROUPS
    again = parse_config(yaml.safe_dump(cfg.resolved({"backbone": "MobileNetV2"}, 0)), "r.yaml")
    assert again.data.class_map == GROUPS


def test_a_tfds_class_map_is_checked_when_the_names_are_known():
    """TFDS names are only known after loading: config load accepts the map, loading lists every problem."""
    cfg = parse_config("study: {name: t}\nmodel: {weights: none}\ndata: {source: tfds, name: beans, "
                       "class_map: {sick: [angular_leaf_spot, bean_rustt], well: [healthy]}}\n", "s.yaml")
    assert cfg.data.class_map["well"] == ["healthy"]
    ds = Dataset(["angular_leaf_spot", "bean_rust", "healthy"], np.array([0, 1, 2]), images=np.zeros((3, 8, 8, 3), np.uint8),
                 image_size=8, name="beans")
    with pytest.raises(DataError) as info:
        apply_class_map(ds, cfg.data.class_map)
    message = str(info.value)
    assert message.startswith("data.class_map:") and problems_of(message) == 2
    assert "data.class_map.sick: unknown class(es) 'bean_rustt'" in message
    assert "class(es) bean_rust are in no target label" in message


# --- data.class_map: refused at config load, every problem at once --------------------------

MAPPED = "{pentagon: [pentagon], star4: [star4], _drop: [t_shape, tri_ring, three_dots, arc]}"


def test_unknown_builtin_classes_are_named_with_their_group():
    msg = config_error("class_map: {pointy: [pentagon, star5, hexagon], round: [arc, circle],"
                       " _drop: [t_shape, tri_ring, three_dots, star4]}\n")
    assert re.match(r"s\.yaml:\d+:\d+: data\.class_map: 2 problem\(s\)", msg)
    assert "data.class_map.pointy: unknown class(es) 'star5', 'hexagon'; the dataset has pentagon, t_shape" in msg
    assert "data.class_map.round: unknown class(es) 'circle'" in msg


def test_unknown_folder_classes_are_found_from_the_sub_folders_at_config_load(tmp_path):
    for c in ("cat", "dog", "owl", ".cache"):
        (tmp_path / c).mkdir()
    base = f"study: {{name: t}}\nmodel: {{weights: none}}\ndata:\n  source: folder\n  path: {tmp_path}\n"
    msg = config_error("class_map: {pet: [cat, dgo], bird: [owl]}\n", base)
    assert problems_of(msg) == 2
    assert "data.class_map.pet: unknown class(es) 'dgo'; the dataset has cat, dog, owl" in msg  # hidden folder ignored
    assert "data.class_map: class(es) dog are in no target label" in msg


def test_a_class_in_two_groups_is_refused():
    msg = config_error("class_map: {a: [pentagon, star4], b: [star4, arc], c: [arc], "
                       "_drop: [t_shape, tri_ring, three_dots, pentagon]}\n")
    assert problems_of(msg) == 3
    assert "data.class_map.b: class 'star4' is already in data.class_map.a" in msg
    assert "data.class_map.c: class 'arc' is already in data.class_map.b" in msg
    assert "data.class_map._drop: class 'pentagon' is already in data.class_map.a" in msg


def test_a_group_with_no_classes_is_refused():
    msg = config_error("class_map:\n  a: [pentagon, star4]\n  b: []\n  c:\n  d: [arc]\n"
                       "  _drop: [t_shape, tri_ring, three_dots]\n")
    assert problems_of(msg) == 2
    assert "data.class_map.b: a target label needs at least one class" in msg
    assert "data.class_map.c: a target label needs at least one class" in msg  # `c:` alone is null


def test_unmapped_classes_are_refused_unless_dropped():
    msg = config_error("class_map: {pointy: [pentagon, star4], round: [arc]}\n")
    assert problems_of(msg) == 1
    assert ("data.class_map: class(es) t_shape, tri_ring, three_dots are in no target label; map them, or list them "
            "under _drop to leave them out") in msg
    ok = parse_config(BASE + "  class_map: {pointy: [pentagon, star4], round: [arc], "
                             "_drop: [t_shape, tri_ring, three_dots]}\n", "s.yaml")
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


# --- metrics of the winner's test -------------------------------------------------------------


def test_classification_metrics_on_hand_made_binary_probabilities():
    from sklearn.metrics import roc_auc_score

    p1 = np.array([0.9, 0.2, 0.6, 0.4, 0.8, 0.1, 0.7])
    labels = np.array([1, 0, 0, 1, 1, 0, 1])
    m = classification_metrics(np.stack([1 - p1, p1], axis=1), labels, 2)
    # predicted: 1 0 1 0 1 0 1 -> true 0: [2 right, 1 called 1]; true 1: [1 called 0, 3 right]
    assert m["confusion"].tolist() == [[2, 1], [1, 3]]
    assert m["per_class_accuracy"] == pytest.approx([2 / 3, 3 / 4])
    assert m["auc"] == pytest.approx(roc_auc_score(labels, p1))
    assert m["auc"] == pytest.approx(11 / 12)  # 11 of the 12 (positive, negative) pairs ranked right


def test_classification_metrics_on_three_classes_and_missing_ones():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.5, 0.4, 0.1], [0.2, 0.2, 0.6]])
    m = classification_metrics(probabilities, np.array([0, 1, 1, 0]), 3)
    assert m["confusion"].tolist() == [[1, 0, 1], [1, 1, 0], [0, 0, 0]]
    assert m["per_class_accuracy"][:2] == [0.5, 0.5] and np.isnan(m["per_class_accuracy"][2])  # no class-2 image
    assert m["auc"] is None  # AUC only for binary targets
    one_class = classification_metrics(np.array([[0.3, 0.7], [0.6, 0.4]]), np.array([1, 1]), 2)
    assert np.isnan(one_class["auc"])  # undefined, not an exception


def test_class_names_become_safe_unique_metric_keys():
    assert class_metric_keys(["happy", "not sure?", "a/b", "..", "a_b", "é"]) == \
        ["happy", "not sure_", "a_b", "class_3", "a_b_4", "_"]
    from mlflow.utils.validation import _validate_metric_name

    for key in class_metric_keys(["happy", "not sure?", "a/b", "..", ".", "x/../y", " ", "ü"]):
        _validate_metric_name(f"test_accuracy/{key}")


def test_confusion_csv_has_true_rows_and_predicted_columns():
    import io

    import pandas as pd

    frame = pd.read_csv(io.StringIO(confusion_csv(np.array([[2, 1], [0, 3]]), ["neg", "pos"])), index_col=0)
    assert frame.index.name == "true / predicted" and list(frame.index) == ["neg", "pos"]
    assert list(frame.columns) == ["neg", "pos"] and frame.loc["neg", "pos"] == 1 and frame.loc["pos", "pos"] == 3


# --- train.class_weight ------------------------------------------------------------------------


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


def test_run_plan_passes_the_class_weights_to_every_phase(monkeypatch):
    import harness.objective as objective
    from harness.phases import Phase

    seen = []
    monkeypatch.setattr(objective, "run_phases", lambda *a, **kw: seen.append(kw["class_weight"]))
    cfg = parse_config(BASE, "s.yaml")
    plan = [Phase("head", 1, 1e-3, 0), Phase("finetune", 1, 1e-4, 2)]
    objective.run_plan(cfg, None, plan, lambda batch: (None, None), class_weight={0: 0.5, 1: 3.0})
    assert seen == [{0: 0.5, 1: 3.0}, {0: 0.5, 1: 3.0}]


def test_a_heavy_class_weight_pulls_the_predictions_toward_its_class():
    """Behaviour, not plumbing: on labels the images cannot explain, the weighted class wins."""
    import keras
    import tensorflow as tf

    from harness.model import ModelSpec, build_model
    from harness.phases import Phase, run_phases

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 32, 3)).astype("uint8")
    y = np.repeat([0, 1], 16)
    train = tf.data.Dataset.from_tensor_slices((x, y)).shuffle(32, seed=0).batch(16)
    val = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    mean_p1 = {}
    for heavy in (0, 1):
        keras.utils.set_random_seed(0)
        tm = build_model(ModelSpec("MobileNetV2", 32, 2, None, {"alpha": 0.35}))
        weights = {heavy: 50.0, 1 - heavy: 1.0}
        run_phases(tm, [Phase("head", 6, 3e-2, 0)], train, val, restore_best=False, class_weight=weights)
        mean_p1[heavy] = float(tm.model.predict(val, verbose=0)[:, 1].mean())
        keras.backend.clear_session()
    # Measured: 0.33 with class 0 weighted vs 0.67 with class 1 weighted (0.5 is the unweighted optimum).
    assert mean_p1[0] < 0.45 < 0.55 < mean_p1[1], mean_p1


# --- the winner's test, end to end on a real MLflow store -------------------------------------


def test_the_winners_test_logs_auc_per_class_accuracy_and_the_confusion_matrix(tmp_path):
    """A binary target (merged with class_map): TestTask scores the logged model and logs every extra."""
    from types import SimpleNamespace

    import pandas as pd

    from harness.model import ModelSpec, build_model
    from harness.tracking import Tracker
    from harness.tasks import TestTask

    cfg = parse_config(BASE + "  class_map: {round: [arc, three_dots], pointy: [star4, pentagon], "
                              "_drop: [t_shape, tri_ring]}\n", "s.yaml")
    ds = load_dataset(cfg.data)
    splits = make_splits(ds.labels, cfg.data)
    tracker = Tracker(f"sqlite:///{tmp_path}/m.db", "targets", str(tmp_path / "a"))
    run_id = tracker.client.create_run(tracker.experiment_id).info.run_id
    tm = build_model(ModelSpec("MobileNetV2", 32, 2, None, {"alpha": 0.35}))
    uri = tracker.log_keras_model(run_id, tm.model, ds.class_names, 32)
    runner = SimpleNamespace(tracker=tracker, dataset=ds, splits=splits, cfg=cfg)
    out = TestTask("targets", uri, run_id).run(runner, None)

    metrics = tracker.client.get_run(run_id).data.metrics
    for key in ("test_auc", "val_auc", "test_accuracy", "test_accuracy/pointy", "test_accuracy/round"):
        assert key in metrics, key
    assert metrics["test_auc"] == pytest.approx(out["test_auc"]) and 0.0 <= metrics["test_auc"] <= 1.0
    n_test = np.bincount(ds.labels[splits.test])
    cm = pd.read_csv(tracker.client.download_artifacts(run_id, "confusion_matrix.csv", str(tmp_path)), index_col=0)
    assert list(cm.index) == list(cm.columns) == ["pointy", "round"]
    assert cm.sum(axis=1).tolist() == n_test.tolist()  # every test image counted once, in its true row
    recall = np.diag(cm.to_numpy()) / n_test
    assert [metrics["test_accuracy/pointy"], metrics["test_accuracy/round"]] == pytest.approx(recall.tolist())
    assert metrics["test_accuracy"] == pytest.approx(np.trace(cm.to_numpy()) / n_test.sum())
    artifacts = {a.path for a in tracker.client.list_artifacts(run_id)}
    assert {"confusion_matrix.csv", "confusion_matrix.png"} <= artifacts

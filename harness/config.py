"""Sweep config: YAML -> frozen dataclasses, with every check done at load time.

Every error names the dotted key path and, where the YAML has one, its file:line:col, so a user
fixes a config without reading a traceback. Configs are data: only `yaml.safe_load`-level
constructs are accepted and nothing is evaluated. This module never imports TensorFlow.

    >>> cfg = load_config("sweeps/demo.yaml")
    >>> cfg.study.name
    'demo'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from harness.frameworks.keras.backbones import BACKBONES


class ConfigError(Exception):
    """The sweep cannot run as configured. Message names the key path (and file:line:col)."""


class SweepRefused(Exception):
    """The sweep cannot start or go on (lock held, weights unusable, every trial failing): exit 2."""


# --- the name rule -----------------------------------------------------------------------------
# A study or target name becomes a folder under results/, an Optuna study, an MLflow experiment, a
# registered model (MLflow refuses '/' and ':', and '@' starts an alias in models:/name@alias) and a
# quoted value in MLflow filter strings (a quote or backtick ends it). One conservative rule serves all.
# 100 characters keep a quadrant cell's model name (study.target.strategy) within MLflow's 256.
NAME_MAX_LENGTH = 100
NAME_RULE = (
    f"names are 1 to {NAME_MAX_LENGTH} characters: letters, digits, '.', '_' and '-', starting with a "
    "letter or digit, with no '..'"
)
_NAME_CHARS = re.compile(r"[A-Za-z0-9._-]")


def name_problem(name: str) -> str | None:
    """What is wrong with `name` as a study or target name, or None when it follows the rule. Pure.

    >>> name_problem("flowers-v2")
    >>> name_problem("team/flowers")
    "contains '/'"
    """
    if not name:
        return "is empty"
    bad = sorted({c for c in name if not _NAME_CHARS.fullmatch(c)})
    if bad:
        return "contains " + ", ".join(repr(c) for c in bad)
    if not name[0].isalnum():
        return f"starts with {name[0]!r}"
    if ".." in name:
        return "contains '..'"
    if len(name) > NAME_MAX_LENGTH:
        return f"is {len(name)} characters long"
    return None


# --- the schema ------------------------------------------------------------------------------
# Field metadata: "min"/"max" bound numbers (inclusive), "doc" is the comment users see in --help
# of the YAML reference in the README.


def _f(default, doc: str, **bounds):
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc, **bounds})
    return field(default=default, metadata={"doc": doc, **bounds})


@dataclass(frozen=True)
class StudyConfig:
    name: str = _f(
        "sweep", "Optuna study name; also the MLflow experiment, registered model and results/<name>/ folder (see NAME_RULE)"
    )
    direction: Literal["maximize", "minimize"] = _f("maximize", "maximize | minimize the metric")
    metric: Literal["val_accuracy", "val_loss"] = _f("val_accuracy", "objective: best epoch's value")
    n_trials: int = _f(10, "trials to finish (completed + pruned); re-runs resume up to this", min=1)
    timeout: float | None = _f(None, "seconds after which no new trial starts; null = none", min=1)
    seed: int = _f(0, "sampler seed (and default data seed)", min=0)
    sampler: Literal["tpe", "random"] = _f("tpe", "Optuna sampler")
    pruner: Literal["median", "percentile", "hyperband", "successive_halving", "none"] = _f("median", "Optuna pruner")
    pruner_warmup_epochs: int = _f(
        2, "epochs a trial runs before it may be pruned (hyperband, successive_halving: the first rung's epochs)", min=0
    )
    pruner_startup_trials: int = _f(3, "finished trials before pruning starts", min=0)
    storage: str | None = _f(None, "Optuna storage URL; null = sqlite:///results/<name>/optuna.db")
    max_consecutive_failures: int = _f(5, "failed trials in a row that stop the sweep (something fails every trial)", min=1)
    trials_per_process: int = _f(
        20, "trials a warm trial process runs before a fresh one replaces it (Keras leaks a little per fit)", min=1
    )
    recycle_memory_mib: float = _f(
        1024, "MiB a trial process's resident memory may grow past its size after its first trial before it is replaced", min=64
    )
    heartbeat_seconds: int = _f(
        30,
        "server storages: how often a running trial proves it is alive; one silent for "
        "3 beats is failed and its parameters run again",
        min=1,
    )
    workers: Any = _f(1, "trial processes this sweep process runs at once: a count, or 'auto' = one per visible GPU (1 on CPU)")
    # Checked in _check_warm_start: 'auto', 'off' (also a bare YAML off) or a list of experiment names.
    warm_start: Any = _f(
        "off",
        "auto | off | [experiment, ...]: a new study's first trials are the best configurations of the nearest "
        "finished sweeps in the tracking store (auto: every experiment; a list: those experiments only)",
    )
    warm_start_trials: int = _f(3, "warm start: the best configurations enqueued, one from each of the nearest sweeps", min=1)


# data.class_map's reserved key: the classes listed under it are left out of the target.
DROP_KEY = "_drop"


@dataclass(frozen=True)
class DataConfig:
    source: Literal["builtin", "folder", "tfds"] = _f("builtin", "builtin | folder | tfds")
    name: str | None = _f(None, "builtin: shapes-source|shapes|digits; tfds: dataset name")
    path: str | None = _f(None, "folder: root with one sub-folder of images per class")
    image_size: int = _f(32, "square input size in px", min=8, max=1024)
    classes: list[str] | None = _f(None, "keep only these class names (a target with fewer labels)")
    # Typed loosely so that load-time validation can list every problem of the map at once.
    class_map: dict[str, Any] | None = _f(
        None,
        "merge classes into target labels: {target: [class, ...]}; the labels are the target names sorted; "
        f"every class goes to exactly one target or under {DROP_KEY} (left out); not with classes",
    )
    train_per_class: int | None = _f(None, "subsample the train split to N images per class", min=1)
    val_per_class: int | None = _f(None, "subsample the val split to N images per class", min=1)
    val_fraction: float = _f(0.2, "share of each class held out for validation", min=0.01, max=0.9)
    test_fraction: float = _f(0.2, "share of each class held out for the final test", min=0.01, max=0.9)
    seed: int = _f(0, "split and subsample seed", min=0)
    builtin_size: int = _f(200, "builtin generated sets: images generated per class", min=10)
    memory_cache_mib: float = _f(
        2048,
        "folder datasets: a split whose decoded images take at most this many MiB is decoded once and kept "
        "in memory; a larger one streams from disk, so a trial process holds batches, not the dataset",
        min=0,
    )
    official_splits: bool = _f(
        True,
        "tfds: use the dataset's own train / validation / test splits where it has them (a missing one is "
        "carved from train by the fractions); false = pool every split and cut by the fractions",
    )
    tfds_dir: str = _f(
        "results/tfds",
        "tfds: where each dataset's encoded images are written once, so trials stream them from disk like a folder",
    )
    checked_images_dir: str | None = _f(
        "results/image-checks",
        "folder datasets: where the preflight remembers which image files (path, size, "
        "modification time) training's decoder read without error, so a resumed sweep decodes only new or changed "
        "files; null = decode every file at every start",
    )
    disk_cache_dir: str | None = _f(
        None,
        "folder datasets too large for memory: decode each split once into a file here (keyed by the "
        "split's content, shared by every trial process) instead of decoding every epoch; null = decode every epoch",
    )
    disk_cache_max_gib: float = _f(
        20,
        "GiB data.disk_cache_dir may hold: past it, the decoded splits used longest ago are deleted when a new "
        "one is written (shared by every process using that folder)",
        min=0,
    )


@dataclass(frozen=True)
class SourceConfig:
    """A source backbone the harness pretrains itself (used when model.weights is 'source')."""

    data: DataConfig = _f(DataConfig(name="shapes-source"), "source dataset (same keys as data)")
    epochs: int = _f(20, "pretraining epochs", min=1)
    batch_size: int = _f(64, "pretraining batch size", min=1)
    learning_rate: float = _f(2e-3, "pretraining Adam learning rate", min=1e-8, max=1.0)
    cache_dir: str = _f("results/sources", "where pretrained weights are cached, keyed by a hash")


@dataclass(frozen=True)
class ModelConfig:
    weights: str = _f("imagenet", "imagenet | none | source | path/to/file.weights.h5")
    backbone_options: dict[str, dict[str, Any]] = _f({}, "constructor kwargs per backbone, e.g. MobileNetV2: {alpha: 0.35}")


@dataclass(frozen=True)
class PhaseConfig:
    epochs: int = _f(5, "maximum epochs of this phase (0 skips it)", min=0)
    batch_size: int = _f(32, "batch size", min=1)
    patience: int | None = _f(3, "early-stopping patience in epochs on the objective; null = off", min=1)


@dataclass(frozen=True)
class TrainConfig:
    head: PhaseConfig = _f(PhaseConfig(), "phase 1: frozen backbone, new head")
    finetune: PhaseConfig = _f(PhaseConfig(), "phase 2: top of the backbone unfrozen, low LR")
    class_weight: Literal["none", "balanced"] = _f(
        "none",
        "none | balanced: each class's loss weighted n_train / (n_classes * its train images), in every "
        "phase, confirmation seed and the scratch baseline",
    )
    # Bare YAML on/off are read as true/false: both spellings are accepted (see _check_cross).
    mixed_precision: Any = _f(
        "auto",
        "auto | on | off: Keras' mixed_float16 policy in trial processes (float16 compute, float32 weights and "
        "softmax); auto = on for a GPU of compute capability >= 7.0, off on CPU; on is refused without such a GPU",
    )
    jit_compile: Any = _f(
        "auto",
        "auto | on | off: XLA compilation of the train and test steps (model.compile's jit_compile); auto = on "
        "for a GPU of compute capability >= 7.0, off on CPU",
    )
    feature_cache: bool = _f(
        True,
        "phase 1 on a frozen pretrained backbone without augmentation trains the head on pooled features "
        "computed once and shared by every trial (harness/features.py); the result is the same model",
    )
    feature_cache_dir: str = _f("results/features", "where cached features are kept, keyed by content")
    feature_cache_max_gib: float = _f(
        20,
        "GiB train.feature_cache_dir may hold: past it, the feature sets used longest ago are deleted when a new one is written",
        min=0,
    )
    gpu_memory_limit_mib: float | None = _f(
        None,
        "MiB of GPU memory each trial process may take; null = memory growth (TensorFlow takes what the "
        "process needs as it needs it, instead of nearly all the GPU at start)",
        min=64,
    )


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = _f(None, "MLflow tracking URI; null = $MLFLOW_TRACKING_URI or sqlite:///results/mlflow.db")
    experiment: str | None = _f(None, "MLflow experiment name; null = the study name")
    artifact_root: str = _f("results/mlartifacts", "artifact location of new experiments on a local store")
    system_metrics_seconds: float = _f(
        10, "how often each trial run samples CPU, memory and GPU use (MLflow system metrics); 0 = off", min=0
    )


@dataclass(frozen=True)
class BaselineConfig:
    """From-scratch training, for the baseline of a sweep and the `scratch` cells' confirmation; its
    step floor and early stopping are every strategy's confirmation rule (harness/quadrants.py).

    A from-scratch model needs far more updates than a fine-tune (He et al., 2019), so its budget
    is optimizer steps with a floor, not epochs of a small training set."""

    scratch: bool = _f(True, "after the search, train the best trial's architecture from random init")
    epochs: int = _f(30, "from-scratch epochs of the training set, unless min_steps asks for more", min=1)
    min_steps: int = _f(3000, "optimizer steps at least, however small the training set", min=1)
    learning_rate: Any = _f(
        "auto",
        "Adam learning rate, or 'auto': a short search picks it (1e-4, 3e-4, 1e-3, "
        "each for 5% of the steps; the lowest training loss wins)",
    )
    patience: int | None = _f(
        8,
        "early-stopping patience in epochs of the training set (at least 3 "
        "validations), counted while neither the validation loss nor the metric improves; "
        "never stops before min_steps; null = off",
        min=1,
    )
    retries: int = _f(
        2,
        "a run that does not fit its training data (accuracy < 0.95 on up to 5,000 images) is trained "
        "again at the learning-rate search's next-ranked rate, this many times at most",
        min=0,
    )
    augment: bool | None = _f(None, "augmentation for the baseline; null = as the best trial")


STRATEGIES = ("features", "intermediate", "partial", "full", "scratch")


@dataclass(frozen=True)
class TargetConfig:
    """One target dataset of a quadrant comparison."""

    name: str = _f("target", "short name used in study names, model names and tables (see NAME_RULE)")
    size: Literal["small", "large"] = _f("small", "small | large (made by data.train_per_class)")
    similarity: Literal["similar", "dissimilar"] = _f("similar", "similar | dissimilar to the source data")
    data: DataConfig = _f(DataConfig(), "the target dataset (same keys as data)")


@dataclass(frozen=True)
class QuadrantsConfig:
    """Strategy-by-quadrant comparison: one Optuna study per (target, strategy) cell."""

    targets: list[TargetConfig] = _f([], "target datasets, each with its quadrant")
    strategies: list[str] = _f(list(STRATEGIES), "features | intermediate | partial | full | scratch")
    trials_per_cell: int = _f(4, "trials of every (target, strategy) study: equal budgets", min=1)
    confirm_seeds: int = _f(
        3,
        "seeds the best configuration of each cell is retrained with; at least 2, since "
        "the report's Welch t-test compares cells over their seeds",
        min=2,
    )
    cut_range: list[float] = _f([0.3, 0.8], "intermediate: searched share of backbone blocks kept")
    partial_range: list[float] = _f([0.2, 0.8], "partial: searched share of top blocks unfrozen")
    logme: bool = _f(True, "score every (backbone, target) with LogME before training")
    logme_max_images: int = _f(2000, "training images LogME reads per target", min=10)


SCREEN_SCORES = ("logme", "knn", "size")


@dataclass(frozen=True)
class ScreenConfig:
    """search.screen: every candidate backbone is scored from frozen features of the training split
    before the search (harness/screening.py); `keep` narrows the search to the best few."""

    keep: int | None = _f(
        None,
        "backbones the search keeps: the top K by `by`; null = all (still scored and "
        "logged when more than one backbone is searched)",
        min=1,
    )
    by: Literal["logme", "knn", "size"] = _f(
        "logme",
        "logme | knn | size: LogME, k-NN accuracy cross-validated "
        "on the training split, or parameter count (never looks at the data)",
    )
    max_images: int = _f(2000, "training images each score reads, the same share from every class", min=10)


# Search-space parameters: name -> (kind, allowed range or choices, doc).
# A YAML value is either fixed (a scalar) or searched: {choices: [...]} or {low, high, log?, step?}.
PARAMS: dict[str, tuple[str, Any, str]] = {
    "backbone": ("str", sorted(BACKBONES), "keras.applications model name"),
    "unfreeze_fraction": ("float", (0.0, 1.0), "share of backbone blocks (from the top) unfrozen in phase 2"),
    "unfreeze_blocks": ("int", (0, 10_000), "number of top backbone blocks unfrozen in phase 2"),
    "cut_fraction": ("float", (0.05, 1.0), "share of backbone blocks kept (1 = whole backbone; less = intermediate features)"),
    "head_units": ("int", (0, 65_536), "hidden Dense units of the head; 0 = linear classifier"),
    # Learning rates are bounded only by float32: an absurd value is a legitimate (failing) trial.
    "head_lr": ("float", (1e-12, 1e38), "phase-1 Adam learning rate"),
    "finetune_lr": ("float", (1e-12, 1e38), "phase-2 Adam learning rate (well below head_lr)"),
    "dropout": ("float", (0.0, 0.95), "dropout before the classifier"),
    "pooling": ("str", ["avg", "max"], "global pooling of the feature map"),
    "augment": ("bool", [True, False], "random flip/rotation/zoom layers inside the model"),
    "strategy": (
        "str",
        list(STRATEGIES),
        "how the backbone is used (quadrants pin one per cell); default: the "
        "two-phase routine as the other parameters describe it",
    ),
}
DEFAULT_SEARCH: dict[str, Any] = {
    "backbone": "MobileNetV2",
    "unfreeze_fraction": 0.5,
    "head_units": 0,
    "head_lr": 1e-3,
    "finetune_lr": 1e-4,
    "dropout": 0.2,
    "pooling": "avg",
    "augment": False,
}


@dataclass(frozen=True)
class ParamSpec:
    """One search-space entry: fixed `value`, or `choices`, or a `low`..`high` range."""

    name: str
    kind: str
    value: Any = None
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None

    @property
    def fixed(self) -> bool:
        return self.choices is None and self.low is None


@dataclass(frozen=True)
class SweepConfig:
    study: StudyConfig
    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    tracking: TrackingConfig
    baseline: BaselineConfig
    search: dict[str, ParamSpec]
    source: SourceConfig | None = None
    quadrants: QuadrantsConfig | None = None
    path: str = "<memory>"  # where the config came from (for messages and artifacts)
    screen: ScreenConfig | None = None  # search.screen; None = not set: score, keep every backbone

    def to_dict(self) -> dict:
        """The resolved config as plain data (the first artifact of every run)."""
        out = {
            k: _plain(getattr(self, k))
            for k in ("study", "data", "model", "train", "tracking", "baseline", "source", "quadrants")
        }
        out["search"] = {n: _param_plain(p) for n, p in self.search.items()}
        if self.screen is not None:  # only when set, so a config without it keeps its fingerprint
            out["search"]["screen"] = _plain(self.screen)
        return out

    def resolved(self, params: dict, trial_number: int, seed: int | None = None) -> dict:
        """The config of one trial, re-runnable as it is: `python -m harness.sweep config.yaml`.

        Every search parameter holds the value the trial used, and the study's seed is the one
        that trial's weights were initialised with, under a study (and results folder) of its own,
        in the same MLflow experiment; no pruning, no baseline, one trial."""
        out = self.to_dict()
        out["search"] = {name: value for name, value in params.items() if name in PARAMS}
        out["study"].update(
            name=f"{self.study.name}.trial-{trial_number}",
            n_trials=1,
            timeout=None,
            storage=None,
            pruner="none",
            workers=1,
            warm_start="off",
            seed=self.study.seed + trial_number if seed is None else seed,
        )
        out["tracking"]["experiment"] = self.tracking.experiment or self.study.name
        out["baseline"]["scratch"] = False
        out["quadrants"] = None
        if not features_are_fixed(out["model"]["weights"] != "none", out["search"].get("augment") is True):
            out["train"]["feature_cache"] = False  # what this trial ran with: it could not use the cache
        return out

    def fingerprint(self) -> str:
        """Hash of everything that decides what a trial computes (not budgets or where things go),
        so resuming with a changed config is caught instead of mixing results."""
        d = self.to_dict()
        for key in (
            "n_trials",
            "timeout",
            "storage",
            "max_consecutive_failures",
            "trials_per_process",
            "recycle_memory_mib",
            "workers",
            "heartbeat_seconds",
            "warm_start",  # which trials come first, never what a trial computes
            "warm_start_trials",
        ):
            d["study"].pop(key, None)
        d.pop("tracking", None)
        for key in ("feature_cache_dir", "feature_cache_max_gib", "gpu_memory_limit_mib"):
            d["train"].pop(key, None)
        datas = [
            d["data"],
            *([d["source"]["data"]] if d.get("source") else []),
            *([t["data"] for t in d["quadrants"]["targets"]] if d.get("quadrants") else []),
        ]
        for data in datas:  # where images are kept, never which ones
            for key in ("memory_cache_mib", "disk_cache_dir", "disk_cache_max_gib", "tfds_dir", "checked_images_dir"):
                data.pop(key, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _plain(obj):
    if dataclasses.is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def _param_plain(p: ParamSpec):
    if p.fixed:
        return p.value
    if p.choices is not None:
        return {"choices": list(p.choices)}
    out = {"low": p.low, "high": p.high}
    if p.log:
        out["log"] = True
    if p.step is not None:
        out["step"] = p.step
    return out


# --- loading ---------------------------------------------------------------------------------


class _Locator:
    """Maps dotted key paths to 'file:line:col' using the YAML node tree."""

    def __init__(self, filename: str, root: yaml.Node | None):
        self.filename = filename
        self.marks: dict[str, yaml.Mark] = {}
        if root is not None:
            self._walk(root, "")

    def _walk(self, node, path):
        self.marks[path] = node.start_mark
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                key = f"{path}.{k.value}" if path else str(k.value)
                self.marks[key] = k.start_mark
                self._walk(v, key)
                self.marks[key] = k.start_mark
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                self._walk(v, f"{path}[{i}]")

    def where(self, path: str) -> str:
        probe = path
        while probe not in self.marks and probe:
            probe = probe.rpartition(".")[0]
        mark = self.marks.get(probe)
        if mark is None:
            return self.filename
        return f"{self.filename}:{mark.line + 1}:{mark.column + 1}"

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {path}: {message}" if path else f"{self.filename}: {message}")


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value, tp, path: str, loc: _Locator, meta: dict):
    """Check `value` against the annotation `tp`; return it (ints are accepted for floats)."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) < len(typing.get_args(tp)):
                return None
            raise loc.error(path, "must not be null")
        return _coerce(value, args[0], path, loc, meta)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise loc.error(path, f"must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, loc)
    if origin is list:
        if not isinstance(value, list):
            raise loc.error(path, f"must be a list; got {type(value).__name__}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{path}[{i}]", loc, {}) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise loc.error(path, f"must be a mapping; got {type(value).__name__}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(v, vt, f"{path}.{k}", loc, {}) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept plain numeric strings only.
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise loc.error(path, f"must be {_type_name(tp)}; got {type(value).__name__} {value!r}")
    if "min" in meta and value < meta["min"]:
        raise loc.error(path, f"must be >= {meta['min']}; got {value!r}")
    if "max" in meta and value > meta["max"]:
        raise loc.error(path, f"must be <= {meta['max']}; got {value!r}")
    return value


def _build(cls, raw, path: str, loc: _Locator):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise loc.error(path, f"must be a mapping; got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            raise loc.error(f"{path}.{key}" if path else str(key), f"unknown key; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in raw:
            kwargs[name] = _coerce(raw[name], hints[name], f"{path}.{name}" if path else name, loc, dict(f.metadata))
    return cls(**kwargs)


def _param(name: str, raw, loc: _Locator) -> ParamSpec:
    path = f"search.{name}"
    if name not in PARAMS:
        raise loc.error(
            path, f"unknown search parameter; valid: {', '.join(PARAMS)} (and screen: how the backbones are narrowed)"
        )
    kind, allowed, _ = PARAMS[name]
    py = {"str": str, "int": int, "float": float, "bool": bool}[kind]

    def check(v, where):
        if kind == "float" and isinstance(v, (int, str)) and not isinstance(v, bool):
            v = _coerce(v, float, where, loc, {})
        if not isinstance(v, py) or (py is int and isinstance(v, bool)):
            raise loc.error(where, f"must be {kind}; got {type(v).__name__} {v!r}")
        if isinstance(allowed, tuple) and not (allowed[0] <= v <= allowed[1]):
            raise loc.error(where, f"must be within [{allowed[0]}, {allowed[1]}]; got {v!r}")
        if isinstance(allowed, list) and v not in allowed:
            raise loc.error(where, f"unknown value {v!r}; valid: {', '.join(map(str, allowed))}")
        return v

    if not isinstance(raw, dict):
        return ParamSpec(name, kind, value=check(raw, path))
    keys = set(raw)
    if keys == {"choices"}:
        if not isinstance(raw["choices"], list) or not raw["choices"]:
            raise loc.error(f"{path}.choices", "must be a non-empty list")
        choices = tuple(check(v, f"{path}.choices[{i}]") for i, v in enumerate(raw["choices"]))
        return ParamSpec(name, kind, choices=choices)
    if {"low", "high"} <= keys <= {"low", "high", "log", "step"}:
        if kind not in ("int", "float"):
            raise loc.error(path, f"a {kind} parameter takes a fixed value or {{choices: [...]}}")
        low, high = check(raw["low"], f"{path}.low"), check(raw["high"], f"{path}.high")
        if low > high:
            raise loc.error(path, f"low ({low}) must not exceed high ({high})")
        log = raw.get("log", False)
        if not isinstance(log, bool):
            raise loc.error(f"{path}.log", f"must be bool; got {log!r}")
        if log and low <= 0:
            raise loc.error(f"{path}.low", "must be > 0 on a log scale")
        step = raw.get("step")
        if step is not None and (not isinstance(step, (int, float)) or step <= 0):
            raise loc.error(f"{path}.step", f"must be a positive number; got {step!r}")
        if log and step is not None:
            raise loc.error(path, "log and step cannot be combined (Optuna refuses it)")
        return ParamSpec(name, kind, low=low, high=high, log=log, step=step)
    raise loc.error(path, "must be a fixed value, {choices: [...]}, or {low: .., high: .., log?: .., step?: ..}")


def backbone_candidates(search: dict[str, ParamSpec]) -> list[str]:
    """The backbones a search block can choose, each once, in its order: the one list that weights
    checks, screening, LogME and each cell's first trials go through."""
    return [str(name) for name in dict.fromkeys(_param_values(search["backbone"]))]


def _param_values(p: ParamSpec) -> list:
    """Every value a parameter can take (endpoints for ranges) - enough for feasibility checks."""
    if p.fixed:
        return [p.value]
    if p.choices is not None:
        return list(p.choices)
    return [p.low, p.high]


def _check_cross(cfg: SweepConfig, loc: _Locator) -> None:
    """Checks that span several keys: impossible combinations are refused before anything runs."""
    workers = cfg.study.workers
    if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise loc.error("study.workers", f"must be a count >= 1 or 'auto'; got {workers!r}")
    lr = cfg.baseline.learning_rate
    if lr != "auto" and (isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 1e-8 <= lr <= 1.0):
        raise loc.error("baseline.learning_rate", f"must be 'auto' or a number in [1e-08, 1.0]; got {lr!r}")
    search = cfg.search
    if "unfreeze_fraction" in search and "unfreeze_blocks" in search:
        raise loc.error("search.unfreeze_blocks", "set either unfreeze_fraction or unfreeze_blocks, not both")
    backbones = _param_values(search["backbone"])
    for name in backbones if cfg.quadrants is None else ():
        min_size = BACKBONES[name].min_size
        if cfg.data.image_size < min_size:
            raise loc.error(
                "data.image_size",
                f"{cfg.data.image_size} px is below {name}'s minimum input size of {min_size} px",
            )
        if cfg.source is not None and cfg.model.weights == "source" and cfg.source.data.image_size != cfg.data.image_size:
            raise loc.error("source.data.image_size", "must equal data.image_size (the source backbone is reused as is)")
    if cfg.screen is not None:
        _check_screen(cfg, loc)
    _check_warm_start(cfg, loc)
    for name in cfg.model.backbone_options:
        if name not in BACKBONES:
            raise loc.error(f"model.backbone_options.{name}", f"unknown backbone; valid: {', '.join(sorted(BACKBONES))}")
    if cfg.model.weights == "source" and cfg.source is None:
        raise loc.error("model.weights", "'source' needs a source: block describing the source pretraining")
    weights = cfg.model.weights
    if weights not in ("imagenet", "none", "source"):
        if not Path(weights).is_file():
            raise loc.error("model.weights", f"weights file not found: {weights}")
        if not weights.endswith(".weights.h5"):
            raise loc.error("model.weights", f"Keras 3 weights files end in .weights.h5; got {weights}")
    # A quadrant sweep reads its targets' data blocks; the top-level data block is unused there.
    top = None if cfg.quadrants is not None else cfg.data
    for key, data in (("data", top), ("source.data", cfg.source.data if cfg.source else None)):
        if data is not None:
            _check_data(key, data, loc)
    if cfg.quadrants is not None:
        _check_quadrants(cfg, loc)
    if cfg.train.head.epochs < 1:
        raise loc.error("train.head.epochs", "phase 1 must train the head for at least one epoch")
    for key in ("mixed_precision", "jit_compile"):
        value = getattr(cfg.train, key)
        # YAML 1.1 reads a bare on/off (also yes/no, true/false) as a boolean: it means on/off here.
        if not isinstance(value, bool) and value not in ("auto", "on", "off"):
            raise loc.error(f"train.{key}", f"must be one of auto, on, off; got {value!r}")


WARM_START_MODES = ("auto", "off")


def warm_start_experiments(value: Any) -> list[str] | None:
    """The experiments a checked `study.warm_start` learns from: a list of names, [] for every
    experiment (auto), None for none (off; a bare YAML off reads as false). Pure."""
    if value is False or value == "off":
        return None
    return [] if value == "auto" else list(value)


def warm_start_problems(value: Any) -> list[tuple[str, str]]:
    """Every problem of a `study.warm_start` value as (dotted key, message); empty when usable. Pure."""
    key = "study.warm_start"
    if value is False or value in WARM_START_MODES:
        return []
    if not isinstance(value, list):
        return [(key, f"must be auto, off or a list of MLflow experiment names; got {value!r}")]
    if not value:
        return [(key, "an empty list learns from nothing; use off, auto or name at least one experiment")]
    problems = []
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            problems.append((f"{key}[{i}]", f"must be an experiment name (a non-empty string); got {name!r}"))
        elif value.index(name) != i:
            problems.append((f"{key}[{i}]", f"experiment {name!r} is listed twice"))
    return problems


def _check_warm_start(cfg: SweepConfig, loc: _Locator) -> None:
    """study.warm_start: every problem in one error, each with its key and file:line:col."""
    problems = warm_start_problems(cfg.study.warm_start)
    if not problems and cfg.quadrants is not None and warm_start_experiments(cfg.study.warm_start) is not None:
        problems = [("study.warm_start", "a quadrant sweep runs one study per cell and is not warm-started; leave it off")]
    if problems:
        raise ConfigError("\n".join(str(loc.error(key, message)) for key, message in problems))


def _check_screen(cfg: SweepConfig, loc: _Locator) -> None:
    """search.screen can only narrow what there is, and needs features worth scoring."""
    if cfg.quadrants is not None:
        raise loc.error(
            "search.screen", "a quadrant sweep scores its backbones per target with quadrants.logme; leave search.screen out"
        )
    if cfg.model.weights == "none":
        raise loc.error(
            "search.screen",
            "model.weights is none: frozen features of randomly initialised backbones "
            "say nothing about how each transfers; leave search.screen out or use pretrained weights",
        )
    assert cfg.screen is not None  # called for a screened sweep only
    keep = cfg.screen.keep
    candidates = backbone_candidates(cfg.search)
    if keep is not None and keep > len(candidates):
        raise loc.error(
            "search.screen.keep",
            f"keeps {keep} backbones, but search.backbone has only {len(candidates)} candidate(s) ({', '.join(candidates)})",
        )


def _check_data(key: str, data: DataConfig, loc: _Locator) -> None:
    if data.val_fraction + data.test_fraction >= 0.95:
        raise loc.error(f"{key}.test_fraction", "val_fraction + test_fraction must leave at least 5% for training")
    if data.source == "folder":
        if not data.path:
            raise loc.error(f"{key}.path", "a folder dataset needs a path")
        if not Path(data.path).is_dir():
            raise loc.error(f"{key}.path", f"dataset folder not found: {data.path}")
    elif not data.name:
        raise loc.error(f"{key}.name", f"a {data.source} dataset needs a name")
    if data.source == "builtin":
        from harness.datasets_builtin import BUILTIN

        if data.name not in BUILTIN:
            raise loc.error(f"{key}.name", f"unknown builtin dataset {data.name!r}; valid: {', '.join(BUILTIN)}")
    if data.classes is not None and len(set(data.classes)) < 2:
        raise loc.error(f"{key}.classes", "a classification task needs at least two classes")
    if data.class_map is not None:
        if data.classes is not None:
            raise loc.error(
                f"{key}.class_map",
                f"set either {key}.classes or {key}.class_map, not both (to keep only "
                f"some classes, list the others under {DROP_KEY})",
            )
        problems = class_map_problems(data.class_map, _known_classes(data), f"{key}.class_map")
        if problems:
            raise loc.error(f"{key}.class_map", f"{len(problems)} problem(s): " + "; ".join(problems))


SHOWN_CLASSES = 20  # class names listed in a message; a larger dataset's list ends with a count


def class_map_problems(class_map: dict, known: list[str] | None, key: str = "data.class_map") -> list[str]:
    """Every problem of a class_map, each naming its dotted key (empty: the map is usable).

    `known` is the dataset's class names, or None where they are not known before loading (TFDS):
    then unknown and unmapped classes are checked by harness/data.py `apply_class_map` at load.

        >>> class_map_problems({"pos": ["happy"], "neg": ["happy", "sad"]}, ["happy", "sad", "calm"])
        ["data.class_map.neg: class 'happy' is already in data.class_map.pos", ...]
    """
    problems = []
    group_of: dict[str, str] = {}  # class -> the first group that names it
    targets = [g for g in class_map if g != DROP_KEY]
    if len(targets) < 2:
        problems.append(f"{key}: a classification task needs at least two target labels; got {len(targets)}")
    for group, members in class_map.items():
        where = f"{key}.{group}"
        if group.startswith("_") and group != DROP_KEY:
            problems.append(f"{where}: target names starting with '_' are reserved; {DROP_KEY} lists classes to leave out")
        if members is None or members == []:
            if group != DROP_KEY:
                problems.append(f"{where}: a target label needs at least one class")
            continue
        if not isinstance(members, list):
            problems.append(f"{where}: must be a list of class names; got {type(members).__name__} {members!r}")
            continue
        unknown = []
        for i, name in enumerate(members):
            if not isinstance(name, str):
                problems.append(f"{where}[{i}]: class names are strings; got {type(name).__name__} {name!r} (quote it)")
            elif name in group_of:
                first = group_of[name]
                problems.append(
                    f"{where}: class {name!r} listed twice"
                    if first == group
                    else f"{where}: class {name!r} is already in {key}.{first}"
                )
            else:
                group_of[name] = group
                if known is not None and name not in known:
                    unknown.append(name)
        if unknown and known is not None:  # only a known class list finds unknown ones
            problems.append(f"{where}: unknown class(es) {', '.join(map(repr, unknown))}; the dataset has {_listed(known)}")
    if known is not None:
        unmapped = [c for c in known if c not in group_of]
        if unmapped:
            problems.append(
                f"{key}: class(es) {_listed(unmapped)} are in no target label; map them, or list them "
                f"under {DROP_KEY} to leave them out"
            )
    return problems


def _listed(names: list[str]) -> str:
    more = f" ... and {len(names) - SHOWN_CLASSES} more" if len(names) > SHOWN_CLASSES else ""
    return ", ".join(names[:SHOWN_CLASSES]) + more


def _known_classes(data: DataConfig) -> list[str] | None:
    """A dataset's class names where they are cheap to know without loading it; None for TFDS."""
    if data.source == "builtin" and data.name is not None:
        from harness.datasets_builtin import SOURCE_CLASSES, TARGET_CLASSES

        # scikit-learn's digits are labelled 0-9 (datasets_builtin.make_digits names them str(d)).
        return {"shapes-source": list(SOURCE_CLASSES), "shapes": list(TARGET_CLASSES), "digits": [str(d) for d in range(10)]}.get(
            data.name
        )
    if data.source == "folder" and data.path is not None:  # the sub-folder names, as harness/data.py scan_folder reads them
        return sorted(p.name for p in Path(data.path).iterdir() if p.is_dir() and not p.name.startswith("."))
    return None


def _check_quadrants(cfg: SweepConfig, loc: _Locator) -> None:
    q = cfg.quadrants
    assert q is not None  # called for a quadrant sweep only
    if not q.targets:
        raise loc.error("quadrants.targets", "list at least one target dataset")
    names = [t.name for t in q.targets]
    for i, t in enumerate(q.targets):
        if names.count(t.name) > 1:
            raise loc.error(f"quadrants.targets[{i}].name", f"duplicate target name {t.name!r}")
        _check_data(f"quadrants.targets[{i}].data", t.data, loc)
        for name in _param_values(cfg.search["backbone"]):
            if t.data.image_size < BACKBONES[name].min_size:
                raise loc.error(
                    f"quadrants.targets[{i}].data.image_size",
                    f"{t.data.image_size} px is below {name}'s minimum input size of {BACKBONES[name].min_size} px",
                )
        if cfg.model.weights == "source" and cfg.source is not None and t.data.image_size != cfg.source.data.image_size:
            raise loc.error(
                f"quadrants.targets[{i}].data.image_size",
                "must equal source.data.image_size (the source backbone is reused as is)",
            )
    for i, s in enumerate(q.strategies):
        if s not in STRATEGIES:
            raise loc.error(f"quadrants.strategies[{i}]", f"unknown strategy {s!r}; valid: {', '.join(STRATEGIES)}")
    if len(set(q.strategies)) != len(q.strategies) or not q.strategies:
        raise loc.error("quadrants.strategies", "list each strategy once, at least one")
    for key, rng, lo in (("cut_range", q.cut_range, 0.05), ("partial_range", q.partial_range, 0.0)):
        if len(rng) != 2 or not (lo <= rng[0] <= rng[1] <= 1.0):
            raise loc.error(f"quadrants.{key}", f"must be [low, high] with {lo} <= low <= high <= 1; got {rng}")
    if cfg.model.weights == "none" and set(q.strategies) - {"scratch"}:
        raise loc.error("model.weights", "transfer strategies need pretrained weights (imagenet, source or a file)")


def parse_config(text: str, filename: str = "<string>") -> SweepConfig:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        raise ConfigError(f"{where}: malformed YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}: malformed YAML: {exc}") from None
    loc = _Locator(filename, root)
    if raw is None:  # no text, only comments, or a lone null
        raise ConfigError(
            f"{filename}: config file is empty; a sweep needs at least a data: block (sweeps/demo.yaml is a complete example)"
        )
    duplicates = duplicate_keys(root, filename)
    if duplicates:
        listed = "\n".join(f"  - {d}" for d in duplicates)
        raise ConfigError(
            f"{filename}: {len(duplicates)} duplicate key(s); YAML would silently keep the last value of each:\n{listed}"
        )
    if not isinstance(raw, dict):
        raise loc.error("", f"top level must be a mapping; got {type(raw).__name__}")
    sections = {
        "study": StudyConfig,
        "data": DataConfig,
        "model": ModelConfig,
        "train": TrainConfig,
        "tracking": TrackingConfig,
        "baseline": BaselineConfig,
        "source": SourceConfig,
        "quadrants": QuadrantsConfig,
    }
    for key in raw:
        if key not in sections and key != "search":
            raise loc.error(str(key), f"unknown key; valid keys: {', '.join([*sections, 'search'])}")
    optional = ("source", "quadrants")  # absent means "not used", not "defaults"
    built = {k: _build(cls, raw.get(k), k, loc) for k, cls in sections.items() if k not in optional}
    for k in optional:
        built[k] = _build(sections[k], raw[k], k, loc) if raw.get(k) is not None else None
    _check_names(built["study"], built["quadrants"], loc)
    search_raw = raw.get("search") or {}
    if not isinstance(search_raw, dict):
        raise loc.error("search", "must be a mapping of parameter -> value or range")
    # search.screen is no search parameter: how the backbone choices are narrowed before the search.
    screen_raw = search_raw.get("screen")
    search_raw = {k: v for k, v in search_raw.items() if k != "screen"}
    screen = _build(ScreenConfig, screen_raw, "search.screen", loc) if screen_raw is not None else None
    merged = dict(DEFAULT_SEARCH)
    if "unfreeze_blocks" in search_raw:
        merged.pop("unfreeze_fraction")
    merged.update(search_raw)
    search = {name: _param(name, value, loc) for name, value in merged.items()}
    cfg = SweepConfig(search=search, path=filename, screen=screen, **built)
    _check_cross(cfg, loc)
    if isinstance(raw.get("train"), dict) and raw["train"].get("feature_cache") is True:
        # The default (true) quietly applies wherever it can; asked for by name, it must be able to.
        reason = feature_cache_impossible(cfg)
        if reason:
            raise loc.error(
                "train.feature_cache",
                f"true, but {reason}, so no phase ever sees fixed features; set it to false or leave it out",
            )
    return cfg


def duplicate_keys(root: yaml.Node | None, filename: str) -> list[str]:
    """Every key that appears twice in one YAML mapping, each naming both lines. Pure.

    PyYAML keeps the last value of a repeated key without a word, so a config with two `study:`
    blocks would run with half of what its author wrote. Merge keys (`<<: *anchor`) may be
    overridden by design and are not duplicates."""
    found, seen_nodes = [], set()

    def walk(node, path):
        if id(node) in seen_nodes:  # an alias: already walked where its anchor was defined
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple, yaml.Node] = {}
            for key, value in node.value:
                if key.tag == "tag:yaml.org,2002:merge":
                    continue
                name = key.value if isinstance(key, yaml.ScalarNode) else str(key.start_mark)
                dotted = f"{path}.{name}" if path else str(name)
                ident = (key.tag, name)
                if ident in first:
                    was = first[ident].start_mark
                    found.append(
                        f"{filename}:{key.start_mark.line + 1}:{key.start_mark.column + 1}: {dotted}: "
                        f"duplicate key (first set at line {was.line + 1})"
                    )
                else:
                    first[ident] = key
                walk(value, dotted)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                walk(value, f"{path}[{i}]")

    if root is not None:
        walk(root, "")
    return found


def _check_names(study: StudyConfig, quadrants: QuadrantsConfig | None, loc: _Locator) -> None:
    """The study name and every target name follow the name rule; all bad names in one error."""
    named = [("study.name", study.name)]
    if quadrants is not None:
        named += [(f"quadrants.targets[{i}].name", t.name) for i, t in enumerate(quadrants.targets)]
    problems = [(key, value, name_problem(value)) for key, value in named]
    lines = [str(loc.error(key, f"{value!r} {problem}")) for key, value, problem in problems if problem]
    if lines:
        raise ConfigError(
            "\n".join(lines) + f"\n({NAME_RULE}: a name becomes a folder under results/, an MLflow "
            "experiment, a registered model and part of MLflow search filters)"
        )


def features_are_fixed(pretrained: bool, augment: bool) -> bool:
    """The feature cache's one rule: a frozen backbone's outputs are the same every epoch, so they
    can be computed once, only when its weights are pretrained (its BatchNormalization then runs in
    inference mode) and no augmentation changes the images. harness/features.py adds which phases
    see a frozen backbone; `feature_cache_impossible` and `SweepConfig.resolved` apply it to a
    sweep and to one trial."""
    return pretrained and not augment


def feature_cache_impossible(cfg: SweepConfig) -> str | None:
    """Why no trial of this config could train its head on cached features (None: some can)."""
    if not features_are_fixed(pretrained=cfg.model.weights != "none", augment=False):
        return "model.weights is none (every backbone starts from random init)"
    augment = cfg.search.get("augment")
    if augment is not None and augment.fixed and not features_are_fixed(pretrained=True, augment=bool(augment.value)):
        return "search.augment is always true (augmentation changes the backbone's input every epoch)"
    return None


def load_config(path: str | Path) -> SweepConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory, expected a YAML file (e.g. sweeps/demo.yaml)")
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None
    return parse_config(text, str(path))


def with_overrides(cfg: SweepConfig, **study_overrides) -> SweepConfig:
    """Command-line flags win over the YAML; None means 'not given'. `name` is --study-name."""
    flag_name = study_overrides.get("name")
    if flag_name is not None and name_problem(flag_name):
        raise ConfigError(
            f"--study-name: {flag_name!r} {name_problem(flag_name)}; {NAME_RULE} (the name becomes a "
            "folder under results/, an MLflow experiment, a registered model and part of MLflow "
            "search filters)"
        )
    study_kw = {
        k: v for k, v in study_overrides.items() if v is not None and k in {f.name for f in dataclasses.fields(StudyConfig)}
    }
    cfg = dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, **study_kw))
    if study_overrides.get("tracking_uri"):
        cfg = dataclasses.replace(cfg, tracking=dataclasses.replace(cfg.tracking, uri=study_overrides["tracking_uri"]))
    return cfg

"""Sweep config: YAML -> frozen pydantic models, with every check that needs no disk done at load time.

Every error names the dotted key path and, where the YAML has one, its file:line:col, and a file's
errors come all at once, so a user fixes a config in one pass without reading a traceback. Configs
are data: only `yaml.safe_load`-level constructs are accepted and nothing is evaluated. What the
config names on disk (dataset folders, weights files) is checked by harness/preflight.py. Each
field's description is the one documentation of its key: docs/configuration.md's key reference is
generated from them (`python scripts/config_reference.py`). This module never imports TensorFlow.

    >>> cfg = load_config("sweeps/demo.yaml")
    >>> cfg.study.name
    'demo'
"""

from __future__ import annotations

import hashlib
import json
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    PositiveInt,
    PrivateAttr,
    Tag,
    ValidationError,
    WrapValidator,
    create_model,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from harness.zoo import WEIGHTS_SUFFIXES, backbone_name_problem, framework_of, min_input_size


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
_NAME_BECOMES = "a folder under results/, an MLflow experiment, a registered model and part of MLflow search filters"


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


# --- value types -------------------------------------------------------------------------------
# Values are checked strictly (an int is no str, a bool no int). The types below add this project's
# wording where pydantic's would be unclear: a union's failure is one message, not one per member.

Problem = tuple[str, str]  # (dotted key, message)


def _several(problems: list[Problem]) -> PydanticCustomError:
    """One validation error carrying several problems, each at its own key below the field's
    (`("[2]", "...")` for a list item); the loader reports each at its own file:line:col."""
    return PydanticCustomError("problems", "; ".join(message for _, message in problems), {"problems": problems})


def _explained(message: str) -> WrapValidator:
    """Any failure of the wrapped type is reported as `message; got <value>`."""

    def validate(value: Any, handler: Callable[[Any], Any]) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("explained", f"{message}; got {value!r}") from None

    return WrapValidator(validate)


def _yaml_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string and `1` as an int: both are numbers where one is due."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return float(value) if isinstance(value, int) and not isinstance(value, bool) else value


def _follows_name_rule(name: str) -> str:
    problem = name_problem(name)
    if problem:
        raise PydanticCustomError("name_rule", f"{name!r} {problem}")
    return name


Float = Annotated[float, BeforeValidator(_yaml_float)]
Name = Annotated[str, AfterValidator(_follows_name_rule)]  # a study or target name (NAME_RULE)
Key = Annotated[str, BeforeValidator(str)]  # a mapping's key, as YAML wrote it (`0:` is "0")
Workers = Annotated[Literal["auto"] | PositiveInt, _explained("must be a count >= 1 or 'auto'")]
# YAML 1.1 reads a bare on/off (also yes/no, true/false) as a boolean: it means on/off here.
Switch = Annotated[Literal["auto", "on", "off"] | bool, _explained("must be one of auto, on, off")]
# An int stays an int, as written: the resolved config and the fingerprint keep `1` as 1.
LearningRate = Annotated[
    Literal["auto"] | Annotated[int | float, Field(ge=1e-8, le=1.0)],
    _explained("must be 'auto' or a number in [1e-08, 1.0]"),
]
Strategy = Literal["features", "intermediate", "partial", "full", "scratch"]
STRATEGIES: tuple[Strategy, ...] = typing.get_args(Strategy)
ScreenScore = Literal["logme", "knn", "size"]
SCREEN_SCORES: tuple[ScreenScore, ...] = typing.get_args(ScreenScore)
WARM_START_MODES = ("auto", "off")


def warm_start_experiments(value: Any) -> list[str] | None:
    """The experiments a checked `study.warm_start` learns from: a list of names, [] for every
    experiment (auto), None for none (off; a bare YAML off reads as false). Pure."""
    if value is False or value == "off":
        return None
    return [] if value == "auto" else list(value)


def warm_start_problems(value: Any) -> list[Problem]:
    """Every problem of a `study.warm_start` value as (key below study.warm_start: "" or "[i]",
    message); empty when usable. Pure."""
    if value is False or value in WARM_START_MODES:
        return []
    if not isinstance(value, list):
        return [("", f"must be auto, off or a list of MLflow experiment names; got {value!r}")]
    if not value:
        return [("", "an empty list learns from nothing; use off, auto or name at least one experiment")]
    problems = []
    for i, name in enumerate(value):
        if not isinstance(name, str) or not name.strip():
            problems.append((f"[{i}]", f"must be an experiment name (a non-empty string); got {name!r}"))
        elif value.index(name) != i:
            problems.append((f"[{i}]", f"experiment {name!r} is listed twice"))
    return problems


def _warm_start(value: Any, handler: Callable[[Any], Any]) -> Any:
    problems = warm_start_problems(value)
    if problems:
        raise _several(problems)
    return handler(value)


WarmStart = Annotated[Literal["auto", "off", False] | list[str], WrapValidator(_warm_start)]


# --- the schema ----------------------------------------------------------------------------------
# Each field's docstring is its description: the one documentation of the key (docs/configuration.md's
# key reference is generated from them by scripts/config_reference.py).


class _Section(BaseModel):
    """A block of the YAML: unknown keys are errors, and a loaded config never changes."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_block_is_defaults(cls, data: Any) -> Any:
        return {} if data is None else data  # `train:` with nothing under it keeps every default


class StudyConfig(_Section):
    name: Name = Field(
        "sweep",
        description="Optuna study name; also the MLflow experiment, the registered model and the results/<name>/ "
        f"folder ({NAME_RULE})",
    )
    direction: Literal["maximize", "minimize"] = "maximize"
    """whether a higher or a lower metric is better"""
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    """the objective: its best epoch's value"""
    n_trials: int = Field(10, ge=1)
    """trials to finish (completed + pruned); a re-run resumes up to this"""
    timeout: Float | None = Field(None, ge=1)
    """seconds after which no new trial starts; null = none"""
    seed: int = Field(0, ge=0)
    """sampler seed (and the default data seed)"""
    sampler: Literal["tpe", "random"] = "tpe"
    """Optuna sampler"""
    pruner: Literal["median", "percentile", "hyperband", "successive_halving", "none"] = "median"
    """Optuna pruner"""
    pruner_warmup_epochs: int = Field(2, ge=0)
    """epochs a trial runs before it may be pruned (hyperband, successive_halving: the first rung's epochs;
    rungs at 3x the steps before, on the step axis of both phases)"""
    pruner_startup_trials: int = Field(3, ge=0)
    """finished trials before pruning starts"""
    storage: str | None = None
    """Optuna storage URL (postgresql://... for several machines); null = sqlite:///results/<name>/optuna.db"""
    max_consecutive_failures: int = Field(5, ge=1)
    """failed trials in a row that stop the sweep (something fails every trial)"""
    trials_per_process: int = Field(20, ge=1)
    """trials a warm trial process runs before a fresh one replaces it (Keras leaks a little per fit)"""
    recycle_memory_mib: Float = Field(1024, ge=64)
    """MiB a trial process's resident memory may grow past its size after its first trial before it is replaced"""
    heartbeat_seconds: int = Field(30, ge=1)
    """server storages: how often a running trial proves it is alive; one silent for 3 beats is failed and
    its parameters run again"""
    workers: Workers = 1
    """trial processes this sweep process runs at once: a count, or auto = one per visible GPU (1 on CPU)"""
    warm_start: WarmStart = "off"
    """a new study's first trials are the best configurations of the nearest finished sweeps in the
    tracking store (auto: every experiment; a list: those experiments only; a bare off reads as false).
    See "Warm start" below"""
    warm_start_trials: int = Field(3, ge=1)
    """warm start: the best configurations enqueued, one from each of the nearest sweeps"""


# data.class_map's reserved key: the classes listed under it are left out of the target.
DROP_KEY = "_drop"


class DataConfig(_Section):
    source: Literal["builtin", "folder", "tfds"] = "builtin"
    """builtin: generated offline sets; folder: images on disk; tfds: a TensorFlow Datasets name"""
    name: str | None = None
    """builtin: shapes-source, shapes or digits; tfds: the dataset name"""
    path: str | None = None
    """folder: the root, with one sub-folder of images per class"""
    image_size: int = Field(32, ge=8, le=1024)
    """square input size in px (checked against every backbone's minimum)"""
    classes: list[str] | None = None
    """keep only these class names (a target with fewer labels)"""
    # Values are loose on purpose: class_map_problems lists every problem of the map at once.
    class_map: dict[Key, Any] | None = None
    """merge classes into target labels: {target: [class, ...]}, e.g. {positive: [happy, surprise],
    negative: [angry, sad], _drop: [contempt]}; the labels are the target names sorted; every class goes
    to exactly one target, or under the reserved key _drop to be left out; not with classes. The names
    are checked before the sweep starts (TFDS: when loaded)"""
    train_per_class: int | None = Field(None, ge=1)
    """subsample the train split to N images per class (a "small" target)"""
    val_per_class: int | None = Field(None, ge=1)
    """subsample the val split to N images per class"""
    val_fraction: Float = Field(0.2, ge=0.01, le=0.9)
    """share of each class held out for validation"""
    test_fraction: Float = Field(0.2, ge=0.01, le=0.9)
    """share of each class held out for the final test (the search never sees it)"""
    seed: int = Field(0, ge=0)
    """split and subsample seed"""
    builtin_size: int = Field(200, ge=10)
    """builtin generated sets: images generated per class"""
    memory_cache_mib: Float = Field(2048, ge=0)
    """folder and tfds datasets: a split whose decoded images take at most this many MiB is decoded once
    and kept in memory; a larger one streams from disk, so a trial process holds batches, not the dataset"""
    official_splits: bool = True
    """tfds: use the dataset's own train / validation / test splits where it has them (a missing one is
    carved from train by the fractions); false = pool every split and cut by the fractions"""
    tfds_dir: str = "results/tfds"
    """tfds: where each dataset's encoded images are written once, so trials stream them from disk like a folder"""
    checked_images_dir: str | None = "results/image-checks"
    """folder datasets: where the preflight remembers which image files (path, size, modification time)
    training's decoder read without error, so a resumed sweep decodes only new or changed files;
    null = decode every file at every start"""
    disk_cache_dir: str | None = None
    """folder datasets too large for memory: decode each split once into a file here (keyed by the split's
    content, shared by every trial process) instead of decoding every epoch; null = decode every epoch"""
    disk_cache_max_gib: Float = Field(20, ge=0)
    """GiB data.disk_cache_dir may hold: past it, the decoded splits used longest ago are deleted when a new
    one is written (shared by every process using that folder)"""


class SourceConfig(_Section):
    """A source backbone the harness pretrains itself (used when model.weights is 'source')."""

    data: DataConfig = DataConfig(name="shapes-source")
    """the source dataset"""
    epochs: int = Field(20, ge=1)
    """pretraining epochs"""
    batch_size: int = Field(64, ge=1)
    """pretraining batch size"""
    learning_rate: Float = Field(2e-3, ge=1e-8, le=1.0)
    """pretraining Adam learning rate"""
    cache_dir: str = "results/sources"
    """where pretrained weights are cached, keyed by a hash"""


class ModelConfig(_Section):
    weights: str = "imagenet"
    """imagenet, none (random init), source (the harness's own pretraining: a source block) or path/to/file.weights.h5"""
    backbone_options: dict[Key, dict[Key, Any]] = {}
    """constructor kwargs per backbone, e.g. {MobileNetV2: {alpha: 0.35}}"""


class PhaseConfig(_Section):
    epochs: int = Field(5, ge=0)
    """maximum epochs of this phase (0 skips it)"""
    batch_size: int = Field(32, ge=1)
    """batch size"""
    patience: int | None = Field(3, ge=1)
    """early-stopping patience in epochs on the objective; null = off"""


class TrainConfig(_Section):
    head: PhaseConfig = PhaseConfig()
    """phase 1: frozen backbone, new head (train.finetune has the same keys)"""
    finetune: PhaseConfig = PhaseConfig()
    """phase 2: the top of the backbone unfrozen, at a low learning rate"""
    class_weight: Literal["none", "balanced"] = "none"
    """balanced: each class's loss weighted n_train / (n_classes * its train images), in every phase,
    confirmation seed and the scratch baseline (param class_weight)"""
    mixed_precision: Switch = "auto"
    """Keras' mixed_float16 policy in trial processes (float16 compute, float32 weights and softmax);
    auto = on for a GPU of compute capability >= 7.0, off on CPU; on is refused without such a GPU"""
    jit_compile: Switch = "auto"
    """XLA compilation of the train and test steps (model.compile's jit_compile); auto = on for a GPU of
    compute capability >= 7.0, off on CPU"""
    feature_cache: bool = True
    """phase 1 on a frozen pretrained backbone without augmentation trains the head on pooled features
    computed once and shared by every trial (harness/features.py); the result is the same model. Set to
    true where no phase can use it, it is refused"""
    feature_cache_dir: str = "results/features"
    """where cached features are kept, keyed by content"""
    feature_cache_max_gib: Float = Field(20, ge=0)
    """GiB train.feature_cache_dir may hold: past it, the feature sets used longest ago are deleted when a
    new one is written"""
    gpu_memory_limit_mib: Float | None = Field(None, ge=64)
    """MiB of GPU memory each trial process may take; null = memory growth (TensorFlow takes what the
    process needs as it needs it, instead of nearly all the GPU at start)"""


class TrackingConfig(_Section):
    uri: str | None = None
    """MLflow tracking URI; null = $MLFLOW_TRACKING_URI or sqlite:///results/mlflow.db"""
    experiment: str | None = None
    """MLflow experiment name; null = the study name"""
    artifact_root: str = "results/mlartifacts"
    """artifact location of new experiments on a local store"""
    system_metrics_seconds: Float = Field(10, ge=0)
    """how often each trial run samples CPU, memory and GPU use (MLflow system metrics); 0 = off"""


class BaselineConfig(_Section):
    """From-scratch training, for the baseline of a sweep and the `scratch` cells' confirmation; its
    step floor and early stopping are every strategy's confirmation rule (harness/quadrants.py).

    A from-scratch model needs far more updates than a fine-tune (He et al., 2019), so its budget
    is optimizer steps with a floor, not epochs of a small training set."""

    scratch: bool = True
    """after the search, train the best trial's architecture from random init"""
    epochs: int = Field(30, ge=1)
    """from-scratch epochs of the training set, unless min_steps asks for more"""
    min_steps: int = Field(3000, ge=1)
    """optimizer steps at least, however small the training set"""
    learning_rate: LearningRate = "auto"
    """Adam learning rate, or auto: a short search picks it (1e-4, 3e-4, 1e-3, each for 5% of the steps;
    the lowest training loss wins)"""
    patience: int | None = Field(8, ge=1)
    """early-stopping patience in epochs of the training set (at least 3 validations), counted while
    neither the validation loss nor the metric improves; never stops before min_steps; null = off"""
    retries: int = Field(2, ge=0)
    """a run that does not fit its training data (accuracy < 0.95 on up to 5,000 images) is trained again
    at the learning-rate search's next-ranked rate, this many times at most"""
    augment: bool | None = None
    """augmentation for the baseline; null = as the best trial"""


class TargetConfig(_Section):
    """One target dataset of a quadrant comparison."""

    name: Name = "target"
    """short name used in study names, model names and tables (the name rule of study.name)"""
    size: Literal["small", "large"] = "small"
    """the quadrant's size (made by data.train_per_class)"""
    similarity: Literal["similar", "dissimilar"] = "similar"
    """the quadrant's similarity to the source data"""
    data: DataConfig = DataConfig()
    """the target dataset"""


class QuadrantsConfig(_Section):
    """Strategy-by-quadrant comparison: one Optuna study per (target, strategy) cell."""

    targets: list[TargetConfig] = []
    """target datasets, each with its quadrant"""
    strategies: list[Strategy] = list(STRATEGIES)
    """the strategies compared, each once"""
    trials_per_cell: int = Field(4, ge=1)
    """trials of every (target, strategy) study: equal budgets"""
    confirm_seeds: int = Field(3, ge=2)
    """seeds the best configuration of each cell is retrained with; at least 2, since the report's Welch
    t-test compares cells over their seeds"""
    cut_range: list[Float] = [0.3, 0.8]
    """intermediate: searched share of backbone blocks kept, [low, high]"""
    partial_range: list[Float] = [0.2, 0.8]
    """partial: searched share of top blocks unfrozen, [low, high]"""
    logme: bool = True
    """score every (backbone, target) with LogME before training"""
    logme_max_images: int = Field(2000, ge=10)
    """training images LogME reads per target"""


class ScreenConfig(_Section):
    """search.screen: every candidate backbone is scored from frozen features of the training split
    before the search (harness/screening.py); `keep` narrows the search to the best few."""

    keep: int | None = Field(None, ge=1)
    """backbones the search keeps: the top K by `by`; null = all (still scored and logged when more than
    one backbone is searched)"""
    by: ScreenScore = "logme"
    """LogME, k-NN accuracy cross-validated on the training split, or parameter count (never looks at the data)"""
    max_images: int = Field(2000, ge=10)
    """training images each score reads, the same share from every class"""


# --- the search space ----------------------------------------------------------------------------


def _backbone_name(name: str) -> str:
    problem = backbone_name_problem(name)
    if problem:
        raise PydanticCustomError("backbone", problem)
    return name


BACKBONE_NAME = AfterValidator(_backbone_name)  # a backbone's name, as harness/zoo.py reads it
# Search-space parameters: name -> (kind, allowed range or choices, description).
# A YAML value is either fixed (a scalar) or searched: {choices: [...]} or {low, high, log?, step?}.
PARAMS: dict[str, tuple[str, Any, str]] = {
    "backbone": (
        "str",
        BACKBONE_NAME,
        "a keras.applications model name (MobileNetV2), or a PyTorch one: torchvision/<name> (a torchvision.models "
        "builder) or timm/<name> (any timm model)",
    ),
    "unfreeze_fraction": ("float", (0.0, 1.0), "share of backbone blocks (from the top) unfrozen in phase 2"),
    "unfreeze_blocks": ("int", (0, 10_000), "number of top backbone blocks unfrozen in phase 2 (not with unfreeze_fraction)"),
    "cut_fraction": ("float", (0.05, 1.0), "share of backbone blocks kept (1 = whole backbone; less = intermediate features)"),
    "head_units": ("int", (0, 65_536), "hidden Dense units of the head; 0 = linear classifier on pooled features"),
    # Learning rates are bounded only by float32: an absurd value is a legitimate (failing) trial.
    "head_lr": ("float", (1e-12, 1e38), "phase-1 Adam learning rate"),
    "finetune_lr": ("float", (1e-12, 1e38), "phase-2 Adam learning rate (well below head_lr)"),
    "dropout": ("float", (0.0, 0.95), "dropout before the classifier"),
    "pooling": ("str", ["avg", "max"], "global pooling of the feature map"),
    "augment": ("bool", [True, False], "random flip/rotation/zoom layers inside the model"),
    "strategy": (
        "str",
        list(STRATEGIES),
        "how the backbone is used (quadrant cells pin one each); default: the two-phase routine as the other "
        "parameters describe it",
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


V = TypeVar("V")


class Choices(_Section, Generic[V]):
    """A searched parameter's `{choices: [...]}`."""

    model_config = ConfigDict(use_attribute_docstrings=False)  # no key of the reference; reading the source is slow
    choices: list[V] = Field(min_length=1)


class Range(_Section, Generic[V]):
    """A searched number's `{low: .., high: .., log?: .., step?: ..}`."""

    model_config = ConfigDict(use_attribute_docstrings=False)  # as Choices
    low: V
    high: V
    log: bool = False
    step: Annotated[int | float, Field(gt=0), _explained("must be a positive number")] | None = None

    @model_validator(mode="after")
    def _usable(self) -> Range:
        problems = []
        if self.low > self.high:  # type: ignore[operator]  # V is a number here: Range serves int and float only
            problems.append(("", f"low ({self.low}) must not exceed high ({self.high})"))
        if self.log and self.low <= 0:  # type: ignore[operator]
            problems.append((".low", "must be > 0 on a log scale"))
        if self.log and self.step is not None:
            problems.append(("", "log and step cannot be combined (Optuna refuses it)"))
        if problems:
            raise _several(problems)
        return self


def _param_shape(value: Any) -> str | None:
    """Which of a search value's three shapes it has; None for a mapping that is none of them."""
    if not isinstance(value, dict):
        return "fixed"
    if set(value) == {"choices"}:
        return "choices"
    return "range" if {"low", "high"} <= set(value) <= {"low", "high", "log", "step"} else None


def _param_type(kind: str, allowed: Any) -> Any:
    """A search parameter's type: its value type, fixed or in one of the searched shapes."""
    if kind == "bool":
        value: Any = bool
    elif allowed is BACKBONE_NAME:
        value = Annotated[str, BACKBONE_NAME]
    elif isinstance(allowed, list):
        value = Literal[tuple(allowed)]
    else:
        value = Annotated[int if kind == "int" else Float, Field(ge=allowed[0], le=allowed[1])]
    shapes: list[Any] = [Annotated[value, Tag("fixed")], Annotated[Choices[value], Tag("choices")]]
    if kind in ("int", "float"):
        shapes.append(Annotated[Range[value], Tag("range")])
        message = "must be a fixed value, {choices: [...]}, or {low: .., high: .., log?: .., step?: ..}"
    else:
        message = f"a {kind} parameter takes a fixed value or {{choices: [...]}}"
    shape = Discriminator(_param_shape, custom_error_type="shape", custom_error_message=message)
    return Annotated[Union[tuple(shapes)], shape]  # noqa: UP007 - a union of a list of types has no `|` spelling


# Made from PARAMS, the one table of search parameters. A parameter left out takes its
# DEFAULT_SEARCH value (None: not searched at all).
SearchSpace = create_model(  # type: ignore[call-overload]
    "SearchSpace",
    __base__=_Section,
    __doc__="The search block: each parameter fixed or searched, and how the backbones are screened.",
    **{
        name: (_param_type(kind, allowed), Field(DEFAULT_SEARCH.get(name), description=doc))
        for name, (kind, allowed, doc) in PARAMS.items()
    },
    screen=(
        ScreenConfig | None,
        Field(
            None,
            description="more than one backbone: each is scored first on frozen features of the training split "
            "(LogME, k-NN accuracy cross-validated there, parameter count; with imagenet weights also the published "
            "top-1) and logged on the parent run (screen/* metrics, screening.csv); keep: K narrows the search to "
            "the top K. The summary gives each score's Kendall tau against the best value each backbone reached, "
            "beside the size-only ranking's. Not a search parameter; null = score, keep every backbone",
        ),
    ),
)


def _search_specs(space: Any, written: list[str]) -> dict[str, ParamSpec]:
    """The search block as ParamSpecs: the defaults first, then the parameters the YAML added, in its
    order (the order the sampler suggests them). unfreeze_blocks replaces the default unfreeze_fraction."""
    names = [n for n in DEFAULT_SEARCH if not (n == "unfreeze_fraction" and "unfreeze_blocks" in written)]
    names += [n for n in written if n in PARAMS and n not in names]
    specs = {}
    for name in names:
        kind, value = PARAMS[name][0], getattr(space, name)
        if isinstance(value, Choices):
            specs[name] = ParamSpec(name, kind, choices=tuple(value.choices))
        elif isinstance(value, Range):
            specs[name] = ParamSpec(name, kind, low=value.low, high=value.high, log=value.log, step=value.step)
        else:
            specs[name] = ParamSpec(name, kind, value=value)
    return specs


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


class ConfigFile(_Section):
    """What a sweep's YAML file holds: every block optional."""

    study: StudyConfig = StudyConfig()
    """the Optuna study, and how the sweep runs its trials"""
    data: DataConfig = DataConfig()
    """the dataset (a quadrant sweep reads its targets' instead)"""
    model: ModelConfig = ModelConfig()
    """the backbones' starting weights and options"""
    train: TrainConfig = TrainConfig()
    """the two training phases of every trial"""
    tracking: TrackingConfig = TrackingConfig()
    """where MLflow records the sweep"""
    baseline: BaselineConfig = BaselineConfig()
    """from scratch: the sweep's baseline, and the step floor and stopping of every confirmation seed"""
    source: SourceConfig | None = None
    """only for model.weights: source (the harness's own pretraining of a source backbone)"""
    quadrants: QuadrantsConfig | None = None
    """a strategy-by-quadrant comparison instead of one sweep"""
    search: SearchSpace = SearchSpace()  # made from PARAMS above
    """values are fixed (dropout: 0.2) or searched: {choices: [...]} or {low: .., high: .., log: true|false,
    step: ..} (numbers only; log and step not together)"""


SECTIONS = ("study", "data", "model", "train", "tracking", "baseline", "source", "quadrants")


# --- the config ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Locator:
    """Maps dotted key paths to 'file:line:col' using the YAML node tree."""

    filename: str
    marks: dict[str, tuple[int, int]]  # dotted key -> (line, column), 1-based

    @classmethod
    def of(cls, filename: str, root: yaml.Node | None) -> _Locator:
        marks: dict[str, tuple[int, int]] = {}

        def walk(node, path):
            marks[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
            if isinstance(node, yaml.MappingNode):
                for k, v in node.value:
                    key = f"{path}.{k.value}" if path else str(k.value)
                    walk(v, key)
                    marks[key] = (k.start_mark.line + 1, k.start_mark.column + 1)  # a key is where its name is
            elif isinstance(node, yaml.SequenceNode):
                for i, v in enumerate(node.value):
                    walk(v, f"{path}[{i}]")

        if root is not None:
            walk(root, "")
        return cls(filename, marks)

    def mark(self, path: str) -> tuple[int, int] | None:
        """Where `path` is written, or where its nearest written parent is."""
        probe = path
        while probe not in self.marks and probe:
            probe = probe.rpartition(".")[0]
        return self.marks.get(probe)

    def where(self, path: str) -> str:
        mark = self.mark(path)
        return f"{self.filename}:{mark[0]}:{mark[1]}" if mark else self.filename

    def error(self, path: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where(path)}: {path}: {message}" if path else f"{self.filename}: {message}")


class SweepConfig(BaseModel):
    """A loaded sweep config: the file's blocks, with `search` as one ParamSpec per parameter."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
    _locator: _Locator | None = PrivateAttr(None)

    def where(self, key: str) -> str:
        """'file:line:col' of a dotted key in the file this config was loaded from (of its nearest
        parent where the key itself is not written; the file alone for a config made in code)."""
        return self._locator.where(key) if self._locator is not None else self.path

    def to_dict(self) -> dict:
        """The resolved config as plain data (the first artifact of every run)."""
        out: dict[str, Any] = {}
        for key in SECTIONS:
            section = getattr(self, key)
            out[key] = None if section is None else section.model_dump()
        out["search"] = {n: _param_plain(p) for n, p in self.search.items()}
        if self.screen is not None:  # only when set, so a config without it keeps its fingerprint
            out["search"]["screen"] = self.screen.model_dump()
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


# --- schema errors, in this project's words ------------------------------------------------------

_TYPE_NAMES = {"int_type": "int", "float_type": "float", "bool_type": "bool", "string_type": "str"}


def _dotted(loc: tuple) -> str:
    """A pydantic error location as the YAML's dotted key: ('study', 'warm_start', 1) -> study.warm_start[1]."""
    parts = list(loc)
    if len(parts) > 2 and parts[0] == "search" and parts[1] in PARAMS:
        del parts[2]  # the shape a search value took (fixed, choices, range): no key of the YAML
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in parts).removeprefix(".")


def blocks_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The blocks (sections) a field's type holds: `list[TargetConfig] | None` -> TargetConfig. A
    search value's shapes (Choices, Range) are none."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and not issubclass(annotation, (Choices, Range)):
        yield annotation
    for arg in typing.get_args(annotation):
        yield from blocks_in(arg)


def _unknown_key(loc: tuple) -> str:
    model: type[BaseModel] = ConfigFile
    for part in loc[:-1]:  # down to the block that holds the unknown key
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is not None:
            model = next(blocks_in(field.annotation), model)
    if model is SearchSpace:
        return f"unknown search parameter; valid: {', '.join(PARAMS)} (and screen: how the backbones are narrowed)"
    return f"unknown key; valid keys: {', '.join(model.model_fields)}"


def _message(error: ErrorDetails) -> str:
    """One pydantic error in this project's words (a search parameter's bounds and choices come from PARAMS)."""
    kind, value, ctx, loc = error["type"], error["input"], error.get("ctx", {}), error["loc"]
    param = PARAMS.get(str(loc[1])) if len(loc) > 1 and loc[0] == "search" else None
    if kind == "extra_forbidden":
        return _unknown_key(loc)
    if kind in ("model_type", "dict_type"):
        what = "a mapping of parameter -> value or range" if loc == ("search",) else "a mapping"
        return f"must be {what}; got {type(value).__name__}"
    if param and kind in ("list_type", "too_short"):
        return "must be a non-empty list"
    if kind == "list_type":
        return f"must be a list; got {type(value).__name__}"
    if value is None and (kind in _TYPE_NAMES or kind == "literal_error"):
        return "must not be null"
    if kind in _TYPE_NAMES:
        return f"must be {_TYPE_NAMES[kind]}; got {type(value).__name__} {value!r}"
    if param and kind in ("greater_than_equal", "less_than_equal"):
        return f"must be within [{param[1][0]}, {param[1][1]}]; got {value!r}"
    if kind in ("greater_than_equal", "less_than_equal"):
        bound = ctx["ge" if kind == "greater_than_equal" else "le"]
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound  # a float field's 0 is 0.0 here
        return f"must be {'>=' if kind == 'greater_than_equal' else '<='} {bound}; got {value!r}"
    if param and kind == "literal_error":
        return f"unknown value {value!r}; valid: {', '.join(map(str, param[1]))}"
    if kind == "literal_error":  # pydantic lists the choices as "'a', 'b' or 'c'"
        choices = re.findall(r"'([^']*)'", ctx["expected"])
        return f"must be one of {', '.join(choices)}; got {value!r}"
    return error["msg"]  # this module's own checks word their messages themselves


def _schema_problems(exc: ValidationError) -> list[Problem]:
    problems: list[Problem] = []
    for error in exc.errors():
        key = _dotted(error["loc"])
        if error["type"] == "problems":
            problems += [(key + below, message) for below, message in error["ctx"]["problems"]]
        else:
            problems.append((key, _message(error)))
    return problems


def _refusal(problems: list[Problem], loc: _Locator, names: bool = False) -> ConfigError:
    """One error naming every problem, in the order of the file, each at its file:line:col."""
    ordered = sorted(problems, key=lambda p: loc.mark(p[0]) or (0, 0))
    text = "\n".join(str(loc.error(key, message)) for key, message in ordered)
    return ConfigError(text + (f"\n({NAME_RULE}: a name becomes {_NAME_BECOMES})" if names else ""))


# --- checks across keys --------------------------------------------------------------------------


def _cross_problems(cfg: SweepConfig) -> list[Problem]:
    """Checks that span several keys: every impossible combination, refused before anything runs."""
    problems = _search_problems(cfg) + _model_problems(cfg)
    if cfg.quadrants is None:  # a quadrant sweep reads its targets' data blocks; the top-level one is unused
        problems += _data_problems("data", cfg.data) + _input_size_problems("data", cfg.data, cfg)
        if cfg.source is not None and cfg.model.weights == "source" and cfg.source.data.image_size != cfg.data.image_size:
            problems.append(("source.data.image_size", "must equal data.image_size (the source backbone is reused as is)"))
    else:
        problems += _quadrant_problems(cfg)
    if cfg.source is not None:
        problems += _data_problems("source.data", cfg.source.data)
    if cfg.screen is not None:
        problems += _screen_problems(cfg)
    if cfg.quadrants is not None and warm_start_experiments(cfg.study.warm_start) is not None:
        problems.append(("study.warm_start", "a quadrant sweep runs one study per cell and is not warm-started; leave it off"))
    if cfg.train.head.epochs < 1:
        problems.append(("train.head.epochs", "phase 1 must train the head for at least one epoch"))
    reason = feature_cache_impossible(cfg)
    # The default (true) quietly applies wherever it can; asked for by name, it must be able to.
    if reason and cfg.train.feature_cache and "feature_cache" in cfg.train.model_fields_set:
        message = f"true, but {reason}, so no phase ever sees fixed features; set it to false or leave it out"
        problems.append(("train.feature_cache", message))
    return problems


def _search_problems(cfg: SweepConfig) -> list[Problem]:
    if "unfreeze_fraction" in cfg.search and "unfreeze_blocks" in cfg.search:
        return [("search.unfreeze_blocks", "set either unfreeze_fraction or unfreeze_blocks, not both")]
    return []


def _model_problems(cfg: SweepConfig) -> list[Problem]:
    problems = [
        (f"model.backbone_options.{name}", (backbone_name_problem(name) or "").replace("unknown value", "unknown backbone", 1))
        for name in cfg.model.backbone_options
        if backbone_name_problem(name)
    ]
    weights = cfg.model.weights
    if weights == "source" and cfg.source is None:
        problems.append(("model.weights", "'source' needs a source: block describing the source pretraining"))
    if weights not in ("imagenet", "none", "source"):
        for framework in sorted({framework_of(name) for name in backbone_candidates(cfg.search)}):
            suffixes = WEIGHTS_SUFFIXES[framework]
            if not weights.endswith(suffixes):
                what = "Keras 3 weights files" if framework == "keras" else "PyTorch state dicts"
                problems.append(("model.weights", f"{what} end in {' or '.join(suffixes)}; got {weights}"))
    return problems


def _input_size_problems(key: str, data: DataConfig, cfg: SweepConfig) -> list[Problem]:
    return [
        (f"{key}.image_size", f"{data.image_size} px is below {name}'s minimum input size of {min_input_size(name)} px")
        for name in backbone_candidates(cfg.search)
        if data.image_size < (min_input_size(name) or 0)
    ]


def _data_problems(key: str, data: DataConfig) -> list[Problem]:
    """A data block's own consistency; what it names on disk is harness/preflight.py's."""
    from harness.datasets_builtin import BUILTIN

    problems = []
    if data.val_fraction + data.test_fraction >= 0.95:
        problems.append((f"{key}.test_fraction", "val_fraction + test_fraction must leave at least 5% for training"))
    if data.source == "folder":
        if not data.path:
            problems.append((f"{key}.path", "a folder dataset needs a path"))
    elif not data.name:
        problems.append((f"{key}.name", f"a {data.source} dataset needs a name"))
    elif data.source == "builtin" and data.name not in BUILTIN:
        problems.append((f"{key}.name", f"unknown builtin dataset {data.name!r}; valid: {', '.join(BUILTIN)}"))
    if data.classes is not None and len(set(data.classes)) < 2:
        problems.append((f"{key}.classes", "a classification task needs at least two classes"))
    if data.class_map is not None and data.classes is not None:
        both = f"set either {key}.classes or {key}.class_map, not both"
        problems.append((f"{key}.class_map", f"{both} (to keep only some classes, list the others under {DROP_KEY})"))
    elif data.class_map is not None:
        summary = class_map_summary(data.class_map, _builtin_classes(data), f"{key}.class_map")
        problems += [(f"{key}.class_map", summary)] if summary else []
    return problems


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


def class_map_summary(class_map: dict, known: list[str] | None, key: str) -> str | None:
    """Every problem of a class_map on one line ("2 problem(s): ...; ..."), or None when usable."""
    problems = class_map_problems(class_map, known, key)
    return f"{len(problems)} problem(s): " + "; ".join(problems) if problems else None


def _listed(names: list[str]) -> str:
    more = f" ... and {len(names) - SHOWN_CLASSES} more" if len(names) > SHOWN_CLASSES else ""
    return ", ".join(names[:SHOWN_CLASSES]) + more


def _builtin_classes(data: DataConfig) -> list[str] | None:
    """A builtin dataset's class names (no disk read); None for the others: a folder's classes are
    checked by harness/preflight.py, a TFDS dataset's when it is loaded."""
    if data.source != "builtin" or data.name is None:
        return None
    from harness.datasets_builtin import SOURCE_CLASSES, TARGET_CLASSES

    # scikit-learn's digits are labelled 0-9 (datasets_builtin.make_digits names them str(d)).
    return {"shapes-source": list(SOURCE_CLASSES), "shapes": list(TARGET_CLASSES), "digits": [str(d) for d in range(10)]}.get(
        data.name
    )


def _quadrant_problems(cfg: SweepConfig) -> list[Problem]:
    q = cfg.quadrants
    assert q is not None  # called for a quadrant sweep only
    problems = [] if q.targets else [("quadrants.targets", "list at least one target dataset")]
    names = [t.name for t in q.targets]
    for i, t in enumerate(q.targets):
        key = f"quadrants.targets[{i}]"
        if t.name in names[:i]:
            problems.append((f"{key}.name", f"duplicate target name {t.name!r}"))
        problems += _data_problems(f"{key}.data", t.data) + _input_size_problems(f"{key}.data", t.data, cfg)
        if cfg.model.weights == "source" and cfg.source is not None and t.data.image_size != cfg.source.data.image_size:
            problems.append((f"{key}.data.image_size", "must equal source.data.image_size (the source backbone is reused as is)"))
    if len(set(q.strategies)) != len(q.strategies) or not q.strategies:
        problems.append(("quadrants.strategies", "list each strategy once, at least one"))
    for key, rng, lo in (("cut_range", q.cut_range, 0.05), ("partial_range", q.partial_range, 0.0)):
        if len(rng) != 2 or not (lo <= rng[0] <= rng[1] <= 1.0):
            problems.append((f"quadrants.{key}", f"must be [low, high] with {lo} <= low <= high <= 1; got {rng}"))
    if cfg.model.weights == "none" and set(q.strategies) - {"scratch"}:
        problems.append(("model.weights", "transfer strategies need pretrained weights (imagenet, source or a file)"))
    return problems


def _screen_problems(cfg: SweepConfig) -> list[Problem]:
    """search.screen can only narrow what there is, and needs features worth scoring."""
    if cfg.quadrants is not None:
        return [
            ("search.screen", "a quadrant sweep scores its backbones per target with quadrants.logme; leave search.screen out")
        ]
    if cfg.model.weights == "none":
        message = (
            "model.weights is none: frozen features of randomly initialised backbones "
            "say nothing about how each transfers; leave search.screen out or use pretrained weights"
        )
        return [("search.screen", message)]
    assert cfg.screen is not None  # called for a screened sweep only
    keep, candidates = cfg.screen.keep, backbone_candidates(cfg.search)
    if keep is not None and keep > len(candidates):
        message = f"keeps {keep} backbones, but search.backbone has only {len(candidates)} candidate(s) ({', '.join(candidates)})"
        return [("search.screen.keep", message)]
    return []


# --- loading -------------------------------------------------------------------------------------


def _read_yaml(text: str, filename: str) -> tuple[yaml.Node | None, Any]:
    """The YAML's node tree (for file:line:col) and its data; refuses malformed, empty and
    duplicate-key YAML, each naming where."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{filename}:{mark.line + 1}:{mark.column + 1}" if mark else filename
        raise ConfigError(f"{where}: malformed YAML: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{filename}: malformed YAML: {exc}") from None
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
    return root, raw


def parse_config(text: str, filename: str = "<string>") -> SweepConfig:
    """A sweep config from YAML text; one ConfigError lists every problem, each at its file:line:col.
    The schema's problems come first: the checks across keys need a config that fits it."""
    root, raw = _read_yaml(text, filename)
    loc = _Locator.of(filename, root)
    if not isinstance(raw, dict):
        raise loc.error("", f"top level must be a mapping; got {type(raw).__name__}")
    try:
        file = ConfigFile.model_validate(raw)
    except ValidationError as exc:
        names = any(error["type"] == "name_rule" for error in exc.errors())
        raise _refusal(_schema_problems(exc), loc, names) from None
    sections = {key: getattr(file, key) for key in SECTIONS}
    written = list(raw.get("search") or {})
    space: Any = file.search  # its fields are made from PARAMS: no static type knows them
    cfg = SweepConfig(**sections, search=_search_specs(space, written), screen=space.screen, path=filename)
    cfg._locator = loc
    problems = _cross_problems(cfg)
    if problems:
        raise _refusal(problems, loc)
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
            f"--study-name: {flag_name!r} {name_problem(flag_name)}; {NAME_RULE} (the name becomes {_NAME_BECOMES})"
        )
    study_kw = {k: v for k, v in study_overrides.items() if v is not None and k in StudyConfig.model_fields}
    cfg = cfg.model_copy(update={"study": cfg.study.model_copy(update=study_kw)})
    if study_overrides.get("tracking_uri"):
        cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": study_overrides["tracking_uri"]})})
    return cfg

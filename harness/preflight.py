"""Every read-only check before the night: what can refuse a sweep is refused before it starts.

harness/sweep.py runs them in this order, so that bad input costs nothing:
  0. the files and folders the config names (`config_file_problems`), right after it loads;
  1. the Optuna storage and the MLflow tracking store (`check_stores`), before TensorFlow loads;
  2. the trial processes a machine can hold (`plan_workers`) and its mixed precision (`check_mixed_precision`);
  3. the data, every image decoded by training's decoder (`load_data`, `load_targets`);
  4. each candidate backbone built once with its weights (`resolve_weights`).
Each check raises ConfigError or SweepRefused naming the input, and a check that can find several
problems of one input lists them all in one error.

    >>> check_stores(cfg)
    >>> dataset, splits = load_data(cfg, log)
    >>> weights = resolve_weights(cfg, source_weights)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from harness import runtime
from harness.config import ConfigError, DataConfig, SweepConfig, SweepRefused, TargetConfig, class_map_summary
from harness.data import Dataset, Splits, load_dataset, make_splits
from harness.frameworks import framework_for, framework_named, trial_gpus
from harness.frameworks.base import Framework
from harness.zoo import framework_of, frameworks_of

# --- config files ------------------------------------------------------------------------------------


def config_file_problems(cfg: SweepConfig) -> list[str]:
    """Every file and folder the config names that is missing or does not fit, each as
    'file:line:col: key: problem' (empty: all there)."""
    problems = weights_file_problems(cfg)
    for key, data in used_data_blocks(cfg):
        problems += dataset_folder_problems(cfg, key, data)
    return problems


def used_data_blocks(cfg: SweepConfig) -> list[tuple[str, DataConfig]]:
    """The data blocks a sweep reads, each with its dotted key: a quadrant sweep reads its
    targets' (its top-level data block is unused), any sweep with a source block the source's."""
    if cfg.quadrants is not None:
        blocks = [(f"quadrants.targets[{i}].data", t.data) for i, t in enumerate(cfg.quadrants.targets)]
    else:
        blocks = [("data", cfg.data)]
    return blocks + ([("source.data", cfg.source.data)] if cfg.source is not None else [])


def weights_file_problems(cfg: SweepConfig) -> list[str]:
    """model.weights naming a file: the file must exist."""
    weights = cfg.model.weights
    if weights in ("imagenet", "none", "source") or Path(weights).is_file():
        return []
    return [f"{cfg.where('model.weights')}: model.weights: weights file not found: {weights}"]


def dataset_folder_problems(cfg: SweepConfig, key: str, data: DataConfig) -> list[str]:
    """A folder dataset's root must exist, and its class_map must name its sub-folders: each class
    once, every class mapped or dropped."""
    if data.source != "folder" or not data.path:
        return []
    if not Path(data.path).is_dir():
        return [f"{cfg.where(f'{key}.path')}: {key}.path: dataset folder not found: {data.path}"]
    if data.class_map is None:
        return []
    summary = class_map_summary(data.class_map, folder_classes(Path(data.path)), f"{key}.class_map")
    return [f"{cfg.where(f'{key}.class_map')}: {key}.class_map: {summary}"] if summary else []


def folder_classes(root: Path) -> list[str]:
    """A folder dataset's class names: its sub-folders, as harness/data.py `scan_folder` reads them."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


# --- devices ---------------------------------------------------------------------------------------


def plan_workers(requested, gpus: list[str]) -> int:
    """`--workers`: a count, or 'auto' (one per visible GPU, else 1). Refuses more GPUs than exist."""
    if requested == "auto":
        return max(1, len(gpus))
    if gpus and requested > len(gpus):
        raise SweepRefused(
            f"study.workers: {requested} workers asked for, but only {len(gpus)} GPU(s) are visible "
            f"({', '.join(gpus)}); use --workers auto or at most {len(gpus)}"
        )
    return requested


def sweep_frameworks(cfg: SweepConfig) -> list[str]:
    """The frameworks a sweep's candidate backbones train with, sorted."""
    from harness.config import backbone_candidates

    return frameworks_of(backbone_candidates(cfg.search))


TENSORFLOW_EXTRA = 'pip install -e ".[cpu]" on a CPU-only box, pip install -e ".[gpu]" on an NVIDIA GPU box (see the README)'


def check_frameworks_installed(cfg: SweepConfig) -> None:
    """Every framework the sweep's backbones need is installed (found without importing it): a
    Keras backbone needs TensorFlow, a torchvision or timm one torch, torchvision (and timm)."""
    import importlib.util

    from harness.config import backbone_candidates
    from harness.frameworks.torch.names import install_problem

    problems = []
    names = backbone_candidates(cfg.search)
    keras = [name for name in names if framework_of(name) == "keras"]
    if keras and importlib.util.find_spec("tensorflow") is None:
        problems.append(
            f"{', '.join(keras)}: TensorFlow is not installed. It is an extra, chosen per machine: {TENSORFLOW_EXTRA}"
        )
    problems += [problem for name in names if framework_of(name) == "torch" and (problem := install_problem(name))]
    if problems:
        raise SweepRefused("search.backbone: " + "\n  ".join(problems))


def training_decoder(cfg: SweepConfig) -> str:
    """The framework whose image decoder checks the data: the sweep's first (every framework's
    decoder reads the same files into the same pixels)."""
    return sweep_frameworks(cfg)[0]


def check_mixed_precision(cfg: SweepConfig) -> None:
    """`train.mixed_precision: on` needs a GPU of compute capability >= 7.0 (Tensor Cores): elsewhere
    float16 buys little or no speed and costs precision. Uses the GPUs as seen before this process hid them."""
    capabilities = [capability for _, capability in trial_gpus(sweep_frameworks(cfg))]
    explicitly_on = runtime.resolve_switch(cfg.train.mixed_precision, [])  # with no GPU, auto is off: only on is left
    if explicitly_on and not runtime.resolve_switch("auto", capabilities):
        found = ", ".join("unknown" if c is None else f"{c[0]}.{c[1]}" for c in capabilities) or "none (CPU only)"
        tensor_cores = runtime.TENSOR_CORES
        raise ConfigError(
            f"{cfg.path}: train.mixed_precision: on needs a GPU of compute capability >= "
            f"{tensor_cores[0]}.{tensor_cores[1]}; GPUs visible: {found}. Use auto (on where it pays) or off"
        )


# --- stores: read only, before anything is created ----------------------------------------------------


def check_stores(cfg: SweepConfig) -> None:
    """The Optuna storage and the MLflow tracking store, checked read-only before anything is
    created: each problem (unreachable, corrupt, a schema of the wrong kind or version, a study of
    the other direction) is a SweepRefused naming the store, not a traceback after the night."""
    from harness import study as st

    check_storage(st.storage_url(cfg, create=False), cfg.study.name, cfg.study.direction)
    tracking_uri = planned_tracking_uri(cfg.tracking.uri)
    exists = check_tracking_store(tracking_uri)
    check_warm_start_experiments(cfg.study.warm_start, tracking_uri, exists)


def inspect_sql_store(url: str, label: str) -> tuple[set[str], str | None] | None:
    """(table names, alembic revision or None) of a SQL store, read without writing anything, or
    None for a SQLite file that does not exist yet (it will be created). Raises SweepRefused naming
    the store (`label` and its redacted URL) when it cannot be reached or read.

    Optuna and MLflow both stamp their schema in an `alembic_version` table, so the revision says
    whose database it is and how old its schema is."""
    import sqlalchemy as sa

    from harness.redaction import redact
    from harness.study import read_only_url, short_error, sqlite_file

    where = f"{label} {redact(url)}"
    path = sqlite_file(url)
    if path is not None:
        if not path.exists():
            return None
        if path.is_dir():
            raise SweepRefused(f"{where}: {path} is a directory, not a database file")
        _sqlite_integrity(path, where)
    connect_args = {"connect_timeout": 10} if url.startswith("postgresql") else {}
    try:
        engine = sa.create_engine(read_only_url(url), connect_args=connect_args)
    except (ImportError, sa.exc.ArgumentError) as exc:
        raise SweepRefused(f"{where}: cannot open it: {type(exc).__name__}: {short_error(exc, url)}") from None
    try:
        with engine.connect() as conn:
            tables = set(sa.inspect(conn).get_table_names())
            revision = None
            if "alembic_version" in tables:
                revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except sa.exc.OperationalError as exc:
        # Connection refused, unknown host, authentication failed: the server never answered a query.
        raise SweepRefused(f"{where}: cannot reach or open it: {short_error(exc.orig or exc, url)}") from None
    except sa.exc.SQLAlchemyError as exc:
        raise SweepRefused(f"{where}: cannot read it: {type(exc).__name__}: {short_error(exc, url)}") from None
    finally:
        engine.dispose()
    return tables, revision


def _sqlite_integrity(path: Path, where: str) -> None:
    """Refuse a SQLite file that is not a database or whose pages are damaged (PRAGMA quick_check,
    read-only: a few seconds for a store of a few hundred MiB)."""
    import sqlite3
    from urllib.parse import quote

    try:
        conn = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro", uri=True, timeout=60)
        try:
            result = [row[0] for row in conn.execute("PRAGMA quick_check")]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise SweepRefused(
            f"{where}: {path} is not a readable SQLite database ({exc}); move it aside and "
            "start afresh, or restore it from a backup"
        ) from None
    if result != ["ok"]:
        raise SweepRefused(
            f"{where}: {path} is damaged (SQLite integrity check: {'; '.join(result[:3])}); "
            "restore it from a backup, or move it aside and start afresh"
        )


# --- Optuna storage ----------------------------------------------------------------------------------


def check_storage(url: str, study_name: str, direction: str) -> None:
    """Refuse, before anything is created, an Optuna storage the sweep could not use: unreachable,
    corrupt, another application's database, a schema this Optuna cannot read, or holding the
    study with the other direction. A store that does not exist yet, or is empty, passes."""
    from harness import study as st
    from harness.redaction import redact

    where = f"Optuna storage {redact(url)}"
    state = inspect_sql_store(url, "Optuna storage")
    if state is None:
        return
    tables, revision = state
    if not tables >= st.OPTUNA_TABLES:
        if revision is not None:  # another schema managed by alembic (MLflow's, say): Optuna's stamp would clash
            foreign = ", ".join(sorted(tables - {"alembic_version"})[:6])
            raise SweepRefused(
                f"{where}: holds another application's tables ({foreign}), not Optuna's; give the study a database of its own"
            )
        return  # empty, or another sweep process is creating Optuna's tables right now
    if revision is None:
        return  # Optuna stamps its schema right after creating the tables: a process is doing so now
    found = st.stored_directions(url, study_name, where)
    if found is not None and found != [direction]:
        raise SweepRefused(st.direction_mismatch(study_name, url, " and ".join(found), direction))


# --- MLflow store ------------------------------------------------------------------------------------


def planned_tracking_uri(configured: str | None) -> str:
    """The tracking URI harness/tracking.py `resolve_tracking_uri` will use, without creating its folder."""
    from harness.tracking import DEFAULT_TRACKING_DB

    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(DEFAULT_TRACKING_DB).resolve()}"


SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")  # the database backends MLflow's tracking store takes


def check_tracking_store(uri: str) -> bool:
    """Refuse an MLflow tracking store the sweep could not log to: a database that is unreachable,
    corrupt, or at a schema this MLflow does not run on (MLflow itself would stop with a traceback,
    or migrate another application's database); a tracking server that does not answer or refuses
    these credentials. Other stores (Databricks, ...) are left to MLflow. Returns whether the store
    exists already (False: a database MLflow will create, so it holds no experiment yet)."""
    from harness.redaction import redact
    from harness.study import short_error
    from harness.tracking import schema_problem, tracking_server_error

    where = f"MLflow tracking store {redact(uri)}"
    if uri.split(":", 1)[0].split("+", 1)[0] in SQL_SCHEMES:
        state = inspect_sql_store(uri, "MLflow tracking store")
        revision = state and state[1]
        if not revision:
            return False  # a new store (or an empty database): MLflow creates its schema
        problem = schema_problem(uri, revision)
        if problem:
            raise SweepRefused(f"{where}: {problem}")
        return True
    if uri.startswith(("http://", "https://")):
        error = tracking_server_error(uri)
        if error is not None:  # unreachable, refused, not an MLflow server: all stop the sweep
            raise SweepRefused(
                f"{where}: no answer an MLflow tracking server would give ({short_error(error, uri)}); "
                "is the server running, and are MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                "set if it asks for them?"
            )
    return True


def check_warm_start_experiments(warm_start, uri: str, store_exists: bool) -> None:
    """Every experiment `study.warm_start` names must exist in the tracking store (read only; a
    store not created yet holds none): the missing ones are named and the sweep refused."""
    from harness.config import warm_start_experiments
    from harness.redaction import redact
    from harness.tracking import missing_experiments

    names = warm_start_experiments(warm_start)
    if not names:
        return
    missing = missing_experiments(uri, names) if store_exists else names
    if missing:
        raise SweepRefused(
            f"study.warm_start: experiment(s) {', '.join(map(repr, missing))} not found in MLflow tracking store "
            f"{redact(uri)}; name experiments that exist there, or use auto (every experiment) or off"
        )


# --- data and images ---------------------------------------------------------------------------------


def load_data(cfg: SweepConfig, log) -> tuple[Dataset, Splits]:
    """A single sweep's dataset, every image checked, and its splits."""
    dataset = checked_dataset(cfg.data, training_decoder(cfg))
    splits = make_splits(dataset.labels, cfg.data, dataset.official)
    log(
        f"data: {dataset.name}, {dataset.num_classes} classes, "
        f"train {len(splits.train)} / val {len(splits.val)} / test {len(splits.test)} images (test held out)"
    )
    return dataset, splits


def load_targets(cfg: SweepConfig, log) -> list[tuple[TargetConfig, Dataset, Splits]]:
    """Load and split every target up front, so a bad dataset stops the sweep before it starts."""
    assert cfg.quadrants is not None  # only quadrant sweeps have targets (harness/sweep.py checks)
    out = []
    for target in cfg.quadrants.targets:
        dataset = checked_dataset(target.data, training_decoder(cfg))
        splits = make_splits(dataset.labels, target.data, dataset.official)
        log(
            f"target {target.name} ({target.size}, {target.similarity}): {dataset.name}, {dataset.num_classes} classes, "
            f"train {len(splits.train)} / val {len(splits.val)} / test {len(splits.test)}"
        )
        out.append((target, dataset, splits))
    return out


def checked_dataset(data: DataConfig, decoder: str, decode: bool = True) -> Dataset:
    """The dataset `data` describes; a folder's image files are checked as it is scanned, so a bad
    file joins the folder's other problems in one refusal (harness/data.py `scan_folder`).
    `decode`: every file decoded by the training decoder of the framework `decoder`; without it,
    only empty files are refused.

        >>> ds = checked_dataset(cfg.data, "keras")
    """
    return load_dataset(data, ImageFileCheck(data, decoder, decode))


class ImageFileCheck:
    """The `harness.data.FileCheck` of a folder: which of its files training's decoder cannot read.
    With `data.checked_images_dir`, files read before and unchanged since are not decoded again, and
    the files of a folder that passed are remembered for the next run."""

    def __init__(self, data: DataConfig, decoder: str, decode: bool = True):
        self.data, self.decoder, self.decode = data, decoder, decode
        self.checks: ImageChecks | None = None

    def unreadable(self, paths: list[str]) -> list[str]:
        if not self.decode:
            return [p for p in paths if _is_empty(p)]
        fw = framework_named(self.decoder)
        if self.data.checked_images_dir:
            assert self.data.path is not None  # only a folder source is scanned
            self.checks = ImageChecks.of_folder(self.data.checked_images_dir, self.data.path, fw.decoder_name())
        return find_corrupt_images(fw, paths, self.data.image_size, self.checks)

    def problem(self, bad: list[str]) -> str:
        return _unreadable(bad, framework_named(self.decoder).decoder_formats)

    def passed(self) -> None:
        if self.checks is not None:
            self.checks.save()  # only a folder that passed: a refused run writes nothing


SHOWN_FILES = 20  # unreadable files listed by name; the count is always the total


def _unreadable(bad: list[str], formats: str) -> str:
    shown = "\n      ".join(f"{p}{_what_it_is(p)}" for p in bad[:SHOWN_FILES])
    more = f"\n      ... and {len(bad) - SHOWN_FILES} more" if len(bad) > SHOWN_FILES else ""
    return (
        f"{len(bad)} unreadable or corrupt image file(s): training's decoder ({formats}) cannot read them; "
        f"delete, convert or replace them:\n      {shown}{more}"
    )


# Leading bytes of formats PIL opens but training's decoder refuses, to say what a misnamed file really is.
_FOREIGN_FORMATS = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"P1", "PBM"),
    (b"P2", "PGM"),
    (b"P3", "PPM"),
    (b"P4", "PBM"),
    (b"P5", "PGM"),
    (b"P6", "PPM"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)


def _what_it_is(path: str) -> str:
    """' (a TIFF file)' for a file whose bytes name a format training cannot read, ' (0 bytes)' for an
    empty one, '' otherwise: the reason a check fails is then visible in its listing."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as exc:
        return f" ({exc.strerror or 'unreadable'})"
    if not head:
        return " (0 bytes)"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return " (a HEIF/AVIF file)"
    name = next((fmt for magic, fmt in _FOREIGN_FORMATS if head.startswith(magic)), None)
    return f" ({'an' if name[0] in 'AEIOU' else 'a'} {name} file)" if name else ""


def _is_empty(path: str) -> bool:
    try:
        return os.path.getsize(path) == 0
    except OSError:  # vanished or unreadable: as unusable as an empty file
        return True


def find_corrupt_images(fw: Framework, paths: list[str], image_size: int = 32, checks: ImageChecks | None = None) -> list[str]:
    """Files training cannot read (empty ones included), found by decoding each with the function
    every training pipeline of `fw` decodes with (`Framework.undecodable`): a TIFF or ICO named
    .png opens in PIL but not in TensorFlow, so only the training decoder can tell. Run once,
    before any study exists.

    `checks`: files it remembers as read before, unchanged since (path, size, modification time),
    are not decoded again; the files that pass now are added to it (saved by the caller)."""
    stamps = {p: _stamp(p) for p in paths}
    bad = [p for p, stamp in stamps.items() if stamp is None or stamp[0] == 0]
    todo = [p for p, stamp in stamps.items() if stamp and stamp[0] and not (checks and checks.remembers(p, stamp))]
    bad += fw.undecodable(todo, image_size)
    if checks is not None:
        rejected = set(bad)
        checks.keep({p: stamp for p, stamp in stamps.items() if stamp is not None and p not in rejected})
    return bad


def _stamp(path: str) -> tuple[int, int] | None:
    """(size in bytes, modification time in ns), or None for a file that cannot be stat'ed."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


class ImageChecks:
    """Which image files of one folder training's decoder has read, remembered across runs in a
    small JSON file (one per folder and TensorFlow version: another version may decode differently),
    so a resumed sweep decodes only new or changed files. A file is trusted while its path, size and
    modification time are those it was read with. Written with an atomic rename: a killed run leaves
    the old record or the new one, never half of one.

        >>> checks = ImageChecks.of_folder("results/image-checks", "data/flowers", fw.decoder_name())
        >>> bad = find_corrupt_images(fw, paths, 224, checks)
        >>> checks.save()
    """

    def __init__(self, path: Path, decoder: str):
        self.path, self.decoder = Path(path), decoder
        self.remembered: dict[str, tuple[int, int]] = {}
        self.passed: dict[str, tuple[int, int]] = {}
        try:
            saved = json.loads(self.path.read_text())
            if saved.get("decoder") == decoder:
                self.remembered = {p: tuple(stamp) for p, stamp in saved["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # no record yet, or an unreadable one: every file is decoded again

    @classmethod
    def of_folder(cls, checks_dir: str | Path, root: str | Path, decoder: str) -> ImageChecks:
        key = hashlib.sha256(f"{Path(root).resolve()}\0{decoder}".encode()).hexdigest()[:16]
        return cls(Path(checks_dir) / f"{key}.json", decoder)

    def remembers(self, path: str, stamp: tuple[int, int]) -> bool:
        return self.remembered.get(path) == tuple(stamp)

    def keep(self, passed: dict[str, tuple[int, int]]) -> None:
        self.passed.update(passed)

    def save(self) -> None:
        """Record the files that passed this time (files gone from the folder are forgotten)."""
        if self.passed == self.remembered:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"decoder": self.decoder, "files": {p: list(s) for p, s in self.passed.items()}}))
        os.replace(tmp, self.path)


# --- weights -----------------------------------------------------------------------------------------


def resolve_weights(cfg: SweepConfig, source_weights: Callable[[str], str | Path]) -> dict[str, str | None]:
    """Each candidate backbone's weights, checked by building the backbone once (fails fast).

    `source_weights(name)`: the file of the harness's own pretrained weights for backbone `name`
    (model.weights: source), pretrained first if need be (harness/pretrain.py `ensure_source_weights`).
    It is passed in because pretraining reads its source data through this module's checks."""
    from harness.config import backbone_candidates
    from harness.frameworks.torch.names import BackboneError, existence_problem

    size = cfg.quadrants.targets[0].data.image_size if cfg.quadrants else cfg.data.image_size
    resolved: dict[str, str | None] = {}
    for name in backbone_candidates(cfg.search):
        unknown = existence_problem(name) if framework_of(name) == "torch" else None
        if unknown:  # named, with the closest names its zoo has
            raise SweepRefused(f"search.backbone: {unknown}")
        w = cfg.model.weights
        if w == "none":
            weights = None
        elif w == "source":
            weights = str(source_weights(name))
        else:
            weights = w
        try:
            n_blocks = framework_for(name).backbone_blocks(name, size, weights, cfg.model.backbone_options.get(name, {}))
        except BackboneError as exc:  # says itself what is wrong and where (layers, files, the cache folder)
            raise SweepRefused(f"model.weights: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any failure here means no trial could run
            if weights not in (None, "imagenet"):
                problem = f"weights file {weights} does not fit {name} with options {cfg.model.backbone_options.get(name, {})}"
            else:
                problem = f"cannot build {name} with weights {weights!r}"
            hint = (
                " (ImageNet weights need internet the first time; offline use weights: source or a file)"
                if weights == "imagenet"
                else ""
            )
            raise SweepRefused(f"model.weights: {problem}: {type(exc).__name__}: {str(exc)[:300]}{hint}") from None
        check_freeze_depth(cfg, name, n_blocks)
        resolved[name] = weights
    return resolved


def check_freeze_depth(cfg: SweepConfig, name: str, n_blocks: int) -> None:
    """A freeze depth in blocks must exist in every candidate backbone."""
    spec = cfg.search.get("unfreeze_blocks")
    if spec is None:
        return
    deepest = max(v for v in (spec.value, spec.high, *(spec.choices or ())) if v is not None)
    if deepest > n_blocks:
        raise SweepRefused(
            f"search.unfreeze_blocks: {deepest} is impossible for {name}, which has {n_blocks} blocks "
            f"(use unfreeze_fraction to mean the same depth across backbones)"
        )

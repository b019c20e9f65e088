"""Warm start: a new study's first trials are the best configurations of the nearest earlier sweeps.

Every single sweep records a description of its target on its parent run: the training images,
the classes and the image size (metrics `target/images`, `target/classes`, `target/image_size`),
beside the per-backbone screening scores screening logs there (`screen/<backbone>/logme|knn`).
With `study.warm_start: auto` (every experiment of the tracking store) or a list of experiments,
a new study compares its own description with each finished sweep's, nearest first, and enqueues
the best completed trial of each of the `study.warm_start_trials` nearest ones whose
configuration fits the search space (Optuna `enqueue_trial`): the sampler starts after them.

Fitting a configuration to the new space:
- a value outside a searched range is clipped to the range (and put on its step grid);
- a categorical value not among the choices (a backbone screening dropped, say) skips that
  configuration;
- a fixed parameter takes the new config's value, and a searched one the old sweep did not have
  is left to the sampler.
A history sweep whose records are incomplete (no description, no completed trial, a value that
cannot be read) is skipped with a log line. The parent run records which sweeps were used and
how near each was (tag `harness.warm_start.from`, artifact warm_start.csv).

    >>> a = TargetDescription(images=1000, classes=10, image_size=32)
    >>> round(distance(a, TargetDescription(images=100, classes=10, image_size=64)), 2)
    1.5
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from harness.config import ParamSpec, warm_start_experiments
from harness.direction import best_of
from harness.frameworks.keras.backbones import BACKBONES

TARGET_KEYS = ("images", "classes", "image_size")  # the parent run's metrics target/<key>
SCREEN_SCORES = ("logme", "knn")  # the data scores screening logs per backbone
# How much each part of the description weighs in the distance (see `distance_parts`).
WEIGHTS = {"images": 1.0, "classes": 1.0, "image_size": 0.5, "logme": 1.0, "knn": 2.0}
OBJECTIVE = "objective"  # the metric every completed trial run holds (harness/tasks.py)
CSV_COLUMNS = (
    "rank",
    "sweep",
    "experiment",
    "parent_run",
    "distance",
    "images",
    "classes",
    "image_size",
    "trial_run",
    "value",
    "used",
    "note",
)


# --- the description of a target, and the distance between two (pure) ------------------------------


@dataclass(frozen=True)
class TargetDescription:
    """What a sweep knows of its target before the search: the training images, the classes, the
    image size, and each screened backbone's scores ({backbone: {"logme": .., "knn": ..}})."""

    images: int
    classes: int
    image_size: int
    screening: dict[str, dict[str, float]] = field(default_factory=dict)


def describe_target(images: int, classes: int, image_size: int, screening: dict | None) -> TargetDescription:
    """The new sweep's description; `screening` is the record harness/screening.py returns (or None)."""
    scores = (screening or {}).get("scores", {})
    kept = {
        name: {s: float(row[s]) for s in SCREEN_SCORES if row.get(s) is not None and math.isfinite(float(row[s]))}
        for name, row in scores.items()
    }
    return TargetDescription(int(images), int(classes), int(image_size), {n: v for n, v in kept.items() if v})


def description_metrics(target: TargetDescription) -> dict[str, float]:
    """The parent run's metrics target/<key> (the screening scores are logged by screening)."""
    return {f"target/{key}": float(getattr(target, key)) for key in TARGET_KEYS}


def description_from_metrics(metrics: dict[str, float]) -> TargetDescription | None:
    """A sweep's description read back from its parent run's metrics; None when one of
    target/images, target/classes or target/image_size is missing or not a positive number."""
    values = [metrics.get(f"target/{key}") for key in TARGET_KEYS]
    if any(v is None or not math.isfinite(v) or v <= 0 for v in values):
        return None
    screening: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        # screen/<backbone>/<score>; screen/tau/<score> (the after-sweep agreement) is no backbone.
        backbone_score = len(parts) == 3 and parts[0] == "screen" and parts[1] in BACKBONES and parts[2] in SCREEN_SCORES
        if backbone_score and math.isfinite(value):
            screening.setdefault(parts[1], {})[parts[2]] = float(value)
    images, classes, size = (int(round(v or 0)) for v in values)
    return TargetDescription(images, classes, size, screening)


def distance_parts(a: TargetDescription, b: TargetDescription) -> dict[str, float]:
    """Each part of the distance, weighted (WEIGHTS):

    - images, classes: decades apart (|log10 a/b|): 100 vs 1,000 images is 1;
    - image_size: doublings apart (|log2 a/b|): 32 vs 64 px is 1 (weight 0.5);
    - logme, knn: the mean absolute difference of that score over the backbones both sweeps
      screened (k-NN accuracy weighs 2: a 0.1 difference is 0.2); left out when none is shared.
    """
    parts = {
        "images": abs(math.log10(a.images / b.images)),
        "classes": abs(math.log10(a.classes / b.classes)),
        "image_size": abs(math.log2(a.image_size / b.image_size)),
    }
    for score in SCREEN_SCORES:
        diffs = [
            abs(a.screening[n][score] - b.screening[n][score])
            for n in a.screening
            if n in b.screening and score in a.screening[n] and score in b.screening[n]
        ]
        if diffs:
            parts[score] = sum(diffs) / len(diffs)
    return {k: WEIGHTS[k] * v for k, v in parts.items()}


def distance(a: TargetDescription, b: TargetDescription) -> float:
    """How far apart two targets are (0: alike); the sum of `distance_parts`."""
    return sum(distance_parts(a, b).values())


def nearest_first(target: TargetDescription, history: list[tuple[str, TargetDescription]]) -> list[tuple[str, float]]:
    """(key, distance) of every described history sweep, nearest first; ties keep the history's order."""
    return sorted(((key, distance(target, d)) for key, d in history), key=lambda item: item[1])


# --- a configuration fitted to the new search space (pure) ----------------------------------------


def parse_param(text: str, spec: ParamSpec) -> Any:
    """A parameter's value as MLflow keeps it (a string) back in the kind of `spec`; ValueError
    when it cannot be read as that kind."""
    if spec.kind == "bool":
        if text not in ("True", "False"):
            raise ValueError(f"not a bool: {text!r}")
        return text == "True"
    if spec.kind == "int":
        number = float(text)
        if not number.is_integer():
            raise ValueError(f"not an integer: {text!r}")
        return int(number)
    if spec.kind == "float":
        number = float(text)
        if not math.isfinite(number):
            raise ValueError(f"not a finite number: {text!r}")
        return number
    return text


def _on_grid(value: float, spec: ParamSpec) -> float:
    """`value` clipped to the spec's range, on its step grid (a range of ints steps by 1 at least)."""
    assert spec.low is not None and spec.high is not None
    low, high = spec.low, spec.high
    value = min(max(value, low), high)
    step = spec.step or (1 if spec.kind == "int" else None)
    if step:
        k = (value - low) / step
        if abs(k - round(k)) > 1e-8:  # off the grid by more than Optuna's own tolerance
            value = min(low + round(k) * step, low + math.floor((high - low) / step + 1e-8) * step)
    return int(round(value)) if spec.kind == "int" else float(value)


def fit_to_space(raw: dict[str, str], search: dict[str, ParamSpec]) -> tuple[dict[str, Any] | None, list[str]]:
    """An earlier trial's params (strings, as MLflow keeps them) fitted to `search`: (the params to
    enqueue, or None when the configuration cannot be used, and one note per change or reason).

        >>> from harness.config import ParamSpec
        >>> fit_to_space({"dropout": "0.9"}, {"dropout": ParamSpec("dropout", "float", low=0.0, high=0.5)})
        ({'dropout': 0.5}, ['dropout 0.9 clipped to 0.5 (range 0..0.5)'])
    """
    params: dict[str, Any] = {}
    notes = []
    for name, spec in search.items():
        if spec.fixed or name not in raw:
            continue  # fixed: the new config's value; not in the old sweep: the sampler's choice
        try:
            value = parse_param(raw[name], spec)
        except ValueError as exc:
            return None, [f"{name}: unreadable value ({exc})"]
        if spec.choices is not None:
            if value not in spec.choices:
                return None, [f"{name}={value!r} is not among this search's choices ({', '.join(map(str, spec.choices))})"]
            params[name] = value
            continue
        fitted = _on_grid(value, spec)
        if fitted != value:
            notes.append(f"{name} {value:g} clipped to {fitted:g} (range {spec.low:g}..{spec.high:g})")
        params[name] = fitted
    return params, notes


# --- in the sweep process -----------------------------------------------------------------------


@dataclass
class HistorySweep:
    """One earlier sweep as warm start considers it (a row of warm_start.csv)."""

    label: str
    experiment: str
    parent_run: str
    description: TargetDescription | None
    distance: float | None = None
    trial_run: str = ""
    value: float | None = None
    used: bool = False
    note: str = ""


def sweep_label(study_name: str, experiment: str) -> str:
    """A sweep's name in log lines: its study, with its experiment where that has another name."""
    return study_name if study_name == experiment else f"{experiment}/{study_name}"


def history_csv(rows: list[HistorySweep]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return str(v).lower()
        text = f"{v:.6g}" if isinstance(v, float) else str(v)
        return f'"{text}"' if "," in text else text

    lines = [",".join(CSV_COLUMNS)]
    for i, r in enumerate(rows):
        d = r.description
        values = (i + 1, r.label, r.experiment, r.parent_run, r.distance, d and d.images, d and d.classes, d and d.image_size)
        lines.append(",".join(cell(v) for v in (*values, r.trial_run, r.value, r.used, r.note)))
    return "\n".join(lines) + "\n"


def warm_start(cfg, study, tracker, target: TargetDescription, log) -> list[dict[str, Any]]:
    """Record the target's description on the parent run, then (study.warm_start not off, a study
    with no trial yet) enqueue the best configurations of the nearest finished sweeps. Returns the
    params enqueued. `cfg` is the config the trials sample from (after screening narrowed it)."""
    from harness.tracking import OLDEST_FIRST

    tracker.log_metrics(tracker.parent_run_id, description_metrics(target))
    experiments = warm_start_experiments(cfg.study.warm_start)
    if experiments is None:
        return []
    if study.trials:
        log(f"warm start: study {cfg.study.name!r} already has trials; nothing enqueued (only a new study is warm-started)")
        return []
    names = tracker.experiment_names(experiments or None)  # id -> name; every active experiment for auto
    where = "the tracking store" if not experiments else "experiment(s) " + ", ".join(experiments)
    parents = [
        r
        for r in tracker.find_runs(role="study", status="FINISHED", order_by=OLDEST_FIRST, experiment_ids=list(names))
        if r.run_id != tracker.parent_run_id
    ]
    if not parents:
        log(f"warm start: no finished sweep in {where} to learn from; the study starts cold")
        return []
    rows = _history_rows(parents, names, target, log)
    wanted = min(cfg.study.warm_start_trials, cfg.study.n_trials)
    by_id = {p.run_id: p for p in parents}
    enqueued: list[dict[str, Any]] = []
    for row in rows:
        if row.description is None or len(enqueued) >= wanted:
            continue
        params, notes = _fitted_best(cfg.search, tracker, row, by_id[row.parent_run], log)
        if params is None:
            continue
        if params in enqueued:
            row.note = "the same configuration as a nearer sweep's"
            continue
        if notes:
            row.note = "; ".join(notes)
            log(f"warm start: the best configuration of sweep {row.label}, fitted: {row.note}")
        study.enqueue_trial(params, user_attrs={"warm_start_from": row.label}, skip_if_exists=True)
        row.used = True
        enqueued.append(params)
    _record_history(tracker, rows, where, log)
    return enqueued


def _history_rows(parents: list, names: dict[str, str], target: TargetDescription, log) -> list[HistorySweep]:
    """One row per finished sweep, nearest target first (sweeps without a description last)."""
    from harness.tracking import STUDY_TAG

    rows = []
    for run in parents:
        label = sweep_label(run.tags.get(STUDY_TAG, run.run_id), names.get(run.experiment_id, run.experiment_id))
        row = HistorySweep(label, names.get(run.experiment_id, ""), run.run_id, description_from_metrics(run.metrics))
        if row.description is None:
            row.note = "no description of its target (target/images, target/classes, target/image_size)"
            log(f"warm start: skipped sweep {label}: {row.note}")
        else:
            row.distance = distance(target, row.description)
        rows.append(row)
    rows.sort(key=lambda r: (r.distance is None, r.distance or 0.0))
    return rows


def _fitted_best(search, tracker, row: HistorySweep, run, log) -> tuple[dict[str, Any] | None, list[str]]:
    """The best configuration of the past sweep `run` fitted to this sweep's `search` space, and
    what fitting changed; None (the reason in `row.note`, and logged) when it has none that fits.
    Sets the row's best trial and value."""
    from harness.tracking import STATE_TAG

    direction = run.params.get("study.direction", "maximize")
    trials = [
        t
        for t in tracker.find_runs(
            role="trial", parent=run.run_id, tags={STATE_TAG: "COMPLETE"}, experiment_ids=[run.experiment_id]
        )
        if math.isfinite(t.metrics.get(OBJECTIVE, math.nan))
    ]
    if direction not in ("maximize", "minimize") or not trials:
        row.note = "no completed trial" if trials == [] else f"unreadable direction {direction!r}"
        log(f"warm start: skipped sweep {row.label}: {row.note}")
        return None, []
    best = best_of(trials, direction, key=lambda t: t.metrics[OBJECTIVE])
    row.trial_run, row.value = best.run_id, best.metrics[OBJECTIVE]
    params, notes = fit_to_space(best.params, search)
    if params is None:
        row.note = notes[0]
        log(f"warm start: skipped the best configuration of sweep {row.label}: {row.note}")
    return params, notes


def _record_history(tracker, rows: list[HistorySweep], where: str, log) -> None:
    """warm_start.csv and the sweeps used, on the parent run, and the line that says which."""
    used = [r for r in rows if r.used]
    tracker.log_text(tracker.parent_run_id, history_csv(rows), "warm_start.csv")
    tracker.set_tags(
        tracker.parent_run_id,
        {"harness.warm_start.from": "; ".join(f"{r.label} (distance {r.distance:.3g})" for r in used) or "none"},
    )
    if used:
        log(
            f"warm start: {len(used)} first trial(s) from the nearest sweep(s): "
            + ", ".join(f"{r.label} (distance {r.distance:.3g}, best {r.value:.4g})" for r in used)
        )
    else:
        log(f"warm start: none of the {len(rows)} finished sweep(s) in {where} gave a usable configuration; starting cold")

"""Screening: rank the candidate backbones from frozen features before the search spends trials.

A sweep that searches over several backbones first scores each one on frozen pooled features of
the training split (never the validation or test split, which the search and the final test read):

- LogME (harness/logme.py): the evidence of a Bayesian linear model of the labels on the features;
- k-NN accuracy: a plain k-nearest-neighbour classifier on L2-normalised features, cross-validated
  within the training split (a plain k-NN beat 23 published transferability metrics over 16 data
  sets, Sorkhei et al., 2025);
- size: the backbone's parameter count, a ranking that never looks at the data; with ImageNet
  weights also the published ImageNet top-1 (harness/frameworks/keras/backbones.py IMAGENET_TOP1).

The size-only ranking matters because on the common benchmark it ranked backbones better than LogME
(Kendall's tau about 0.91 against 0.57; Singh, Hess and Vanschoren, ICLR 2026). So after the sweep
each score's tau against the best value each backbone reached is shown beside the size ranking's,
with a plain verdict of which ranked better on this data.

The scores are computed in a trial process (harness/transferability.py, harness/tasks.py
`ScreeningTask`). The features come from the trials' own feature cache entry (harness/features.py, the same key phase
1 computes), so the trials of a kept backbone read them instead of computing them again.
`search.screen.keep` narrows the backbone choices to the top K before the sampler starts; the
scores and the kept list are recorded once as a study user attribute, and a resumed sweep reuses
them, so its trials sample from the same list.

    >>> rank({"A": {"logme": -0.2, "params": 4e6}, "B": {"logme": 0.3, "params": 2e6}}, "logme")
    ['B', 'A']
    >>> verdict("logme", 0.33, 0.67)
    'LogME tau 0.33 vs size-only 0.67: size-only ranked better on this data'
"""

from __future__ import annotations

import dataclasses
import math

from harness import stats
from harness.direction import better, sign
from harness.frameworks import framework_of, frameworks_of

SCREENING_ATTR = "screening"  # the study user attribute: scores, ranking rule and kept backbones
SCORE_NAMES = {"logme": "LogME", "knn": "k-NN", "size": "size-only", "imagenet_top1": "ImageNet top-1"}
DATA_SCORES = ("logme", "knn")
CSV_COLUMNS = ("rank", "backbone", "logme", "knn", "params", "imagenet_top1", "images", "seconds", "kept")


# --- ranking and narrowing (pure) ---------------------------------------------------------------


def score_of(row: dict, by: str) -> float:
    """The value a row is ranked by; `size` is the parameter count (bigger ranks higher)."""
    value = row.get("params" if by == "size" else by)
    return math.nan if value is None else float(value)


def rank(rows: dict[str, dict], by: str) -> list[str]:
    """Backbones best first by `by` (higher is better for every score); a missing or NaN score
    ranks last, and ties keep the candidates' order."""

    def key(item):
        i, name = item
        value = score_of(rows[name], by)
        return (0, -value, i) if math.isfinite(value) else (1, 0.0, i)

    return [name for _, name in sorted(enumerate(rows), key=key)]


def narrow(candidates: list[str], ranking: list[str], keep: int | None) -> list[str]:
    """The candidates among the top `keep` of `ranking`, in the candidates' own order (None: all)."""
    if keep is None:
        return list(candidates)
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    top = set(ranking[:keep])
    return [c for c in candidates if c in top]


def narrowed_search(search: dict, kept: list[str]) -> dict:
    """The search space with the backbone choices cut down to `kept`."""
    backbone = dataclasses.replace(search["backbone"], choices=tuple(kept), value=None)
    return {**search, "backbone": backbone}


# --- agreement with the study (pure) ------------------------------------------------------------


def best_per_backbone(trials, direction: str) -> dict[str, float]:
    """backbone -> the best value its completed trials reached (`trials`: Optuna FrozenTrials)."""
    best: dict[str, float] = {}
    for t in trials:
        if t.state.name != "COMPLETE" or t.value is None or "backbone" not in t.params:
            continue
        name, value = t.params["backbone"], float(t.value)
        held = best.get(name)
        if better(value, held, direction):
            best[name] = value
    return best


def agreement(rows: dict[str, dict], best: dict[str, float], direction: str) -> dict[str, float]:
    """Each score's Kendall tau against the best value each backbone reached (1: the score orders
    the backbones as the study found them). Only backbones with a completed trial count; NaN with
    fewer than two of them or a score that does not vary."""
    names = [n for n in rows if n in best]
    outcome = [sign(direction) * best[n] for n in names]  # higher = better
    scores = ["logme", "knn", "size"] + (["imagenet_top1"] if any(rows[n].get("imagenet_top1") is not None for n in rows) else [])
    return {s: stats.rank_agreement([score_of(rows[n], s) for n in names], outcome)[0] for s in scores}


def verdict(score: str, tau: float, size_tau: float) -> str:
    """One plain sentence: did `score` rank the backbones better than size alone, on this data?

    >>> verdict("logme", 0.33, 0.67)
    'LogME tau 0.33 vs size-only 0.67: size-only ranked better on this data'
    """
    name = SCORE_NAMES[score]
    head = f"{name} tau {_tau(tau)} vs size-only {_tau(size_tau)}"
    if not (math.isfinite(tau) and math.isfinite(size_tau)):
        return f"{head}: not comparable on this data (a score equal for every backbone ranks nothing)"
    if tau > size_tau:
        return f"{head}: {name} ranked better on this data"
    if tau < size_tau:
        return f"{head}: size-only ranked better on this data"
    return f"{head}: tied on this data"


def _tau(value: float) -> str:
    return f"{value:.2f}" if math.isfinite(value) else "n/a"


def agreement_lines(screening: dict | None, trials, direction: str) -> tuple[list[str], dict[str, float]]:
    """The summary's lines on how well each score predicted the study, and the taus to log."""
    if not screening:
        return [], {}
    rows = screening["scores"]
    best = best_per_backbone(trials, direction)
    done = [n for n in rows if n in best]
    if len(done) < 2:
        return [
            f"screening vs the study: {len(done)} backbone(s) completed trials, so Kendall's tau cannot be "
            f"computed (it needs at least 2)"
        ], {}
    taus = agreement(rows, best, direction)
    lines = [
        f"screening vs the study ({len(done)} backbones with completed trials; Kendall's tau against the best "
        f"value each reached):"
    ]
    lines += [f"  {verdict(s, taus[s], taus['size'])}" for s in DATA_SCORES]
    if "imagenet_top1" in taus:
        lines.append(f"  {verdict('imagenet_top1', taus['imagenet_top1'], taus['size'])}")
    return lines, taus


def log_agreement(screening: dict | None, study, tracker, direction: str) -> list[str]:
    """After the sweep: each score's tau against the study, logged on the parent run as
    screen/tau/<score> (where it could be computed); returns the summary's lines."""
    lines, taus = agreement_lines(screening, study.get_trials(deepcopy=False), direction)
    logged = {f"screen/tau/{k}": v for k, v in taus.items() if math.isfinite(v)}
    if logged:
        tracker.log_metrics(tracker.parent_run_id, logged)
    return lines


def screening_markdown(metrics: dict[str, float]) -> str:
    """The report's section on screening, from the taus the sweep logged on its parent run
    (screen/tau/<score>); empty when none were logged."""
    taus = {k.removeprefix("screen/tau/"): v for k, v in metrics.items() if k.startswith("screen/tau/")}
    if "size" not in taus:
        return ""
    lines = [f"- {verdict(s, taus[s], taus['size'])}" for s in (*DATA_SCORES, "imagenet_top1") if s in taus]
    return (
        "## Screening vs the study\n\nKendall's tau of each score against the best value each backbone "
        "reached (table: the parent run's screening.csv).\n\n" + "\n".join(lines) + "\n"
    )


# --- tables (pure) ------------------------------------------------------------------------------


def table_rows(screening: dict) -> list[dict]:
    """One row per backbone, in the order of the ranking screening used."""
    rows, kept = screening["scores"], set(screening["kept"])
    return [
        {"rank": i + 1, "backbone": name, **{c: rows[name].get(c) for c in CSV_COLUMNS[2:-1]}, "kept": name in kept}
        for i, name in enumerate(screening["ranking"])
    ]


def screening_csv(screening: dict) -> str:
    def cell(v):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return ""
        return str(v).lower() if isinstance(v, bool) else (f"{v:.6g}" if isinstance(v, float) else str(v))

    lines = [",".join(CSV_COLUMNS)]
    lines += [",".join(cell(r[c]) for c in CSV_COLUMNS) for r in table_rows(screening)]
    return "\n".join(lines) + "\n"


def screening_text(screening: dict) -> str:
    """The printed table: ranked by the configured score, with what the search keeps."""
    import pandas as pd

    frame = pd.DataFrame(table_rows(screening), columns=list(CSV_COLUMNS)).drop(columns=["images"])
    frame["kept"] = frame["kept"].map({True: "yes", False: "no"})
    if frame["imagenet_top1"].isna().all():
        frame = frame.drop(columns=["imagenet_top1"])
    table = frame.to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="-")
    scores = list(screening["scores"].values())
    n_images = scores[0].get("images") if scores else None
    return (
        f"screening: {len(screening['scores'])} backbones scored on frozen features of {n_images} training images, "
        f"ranked by {screening['by']}; the search keeps {len(screening['kept'])}\n{table}"
    )


def parent_metrics(screening: dict) -> dict[str, float]:
    """screen/<backbone>/<score> for the parent run (NaN and missing scores left out)."""
    out = {}
    for name, row in screening["scores"].items():
        for key in ("logme", "knn", "params", "imagenet_top1"):
            value = row.get(key)
            if value is not None and math.isfinite(float(value)):
                out[f"screen/{name}/{key}"] = float(value)
        out[f"screen/{name}/rank"] = screening["ranking"].index(name) + 1
    return out


# --- in the sweep process -----------------------------------------------------------------------


def screen_backbones(cfg, study, storage, tracker, run_task, log):
    """Score the candidates (once per study), log the scores on the parent run and print them, and
    return (the config the trials sample from, the screening record or None).

    `run_task(task)` runs a task in a trial process (harness/trials.py TrialEngine.call). Nothing is
    screened with one candidate, or without pretrained weights (random features rank nothing)."""
    from harness import study as st
    from harness.config import ScreenConfig, backbone_candidates
    from harness.tasks import ScreeningTask

    candidates = backbone_candidates(cfg.search)
    if len(candidates) < 2:
        return cfg, None
    if cfg.model.weights == "none":
        log("screening skipped: model.weights is none, and frozen random features rank no backbone")
        return cfg, None
    screen = cfg.screen or ScreenConfig()
    # Several sweep processes on one server storage: one scores, the others read its record.
    with st.claim_lock(storage, f"{cfg.study.name}:screening"):
        record = study.user_attrs.get(SCREENING_ATTR)
        if record is None:
            rows = {}
            for framework in frameworks_of(candidates):  # a trial process loads one framework
                mine = tuple(name for name in candidates if framework_of(name) == framework)
                rows.update(run_task(ScreeningTask(cfg.study.name, mine, screen.max_images)))
            rows = {name: rows[name] for name in candidates}
            ranking = rank(rows, screen.by)
            kept = narrow(candidates, ranking, screen.keep)
            if study.trials and kept != candidates:
                # A study that sampled from every backbone before: a narrower list would clash with it.
                log(f"screening: study {cfg.study.name!r} already has trials from every backbone; not narrowed")
                kept = candidates
            record = {"scores": rows, "by": screen.by, "keep": screen.keep, "ranking": ranking, "kept": kept}
            study.set_user_attr(SCREENING_ATTR, record)  # once: a resume samples from the same list
            tracker.log_metrics(tracker.parent_run_id, parent_metrics(record))
            tracker.log_text(tracker.parent_run_id, screening_csv(record), "screening.csv")
            tracker.set_tags(tracker.parent_run_id, {"harness.screen.kept": ", ".join(kept)})
        else:
            log("screening: scores and kept backbones as recorded in the study (resumed)")
    log(screening_text(record))
    kept = list(record["kept"])
    if kept == candidates:
        return cfg, record
    return dataclasses.replace(cfg, search=narrowed_search(cfg.search, kept)), record

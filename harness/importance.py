"""What mattered: parameter importances and Optuna's standard plots of a finished study.

    >>> importances = param_importances(study)        # {"finetune_lr": 0.71, "head_lr": 0.2, ...}
    >>> paths = plot_study(study, Path("results/demo/plots"), importances)

At the end of a sweep, `log_what_mattered` writes results/<study>/param_importances.csv and
results/<study>/plots/*.png and logs them on the parent run (the importances also as metrics
`importance/<param>`, which `python -m harness.report` reads back). Nothing here may cost the
night's results: every failure is logged as one line and the sweep goes on.

The evaluator is fANOVA, not Optuna's default PED-ANOVA. fANOVA answers "how much of the spread
of the score does each parameter explain" over every complete trial, which is the morning's
question; PED-ANOVA answers "what did the top 10% of trials have in common", and by its own
documentation needs at least 5 trials in that top 10% (about 50 complete trials) to be stable,
more than a small night sweep has. fANOVA's random forest is seeded, so a study gives the same
importances each time they are computed. It sees only parameters that every complete trial
sampled; the harness's search spaces have no conditional parameters. Importances sum to 1, or
are all 0 when every complete trial scored the same (nothing to explain).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: sweeps run on servers without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

IMPORTANCE_FILE = "param_importances.csv"
PLOTS_DIR = "plots"  # beside the table locally, and the parent run's artifact folder
METRIC_PREFIX = "importance/"  # the parent run's metric importance/<param>
MIN_TRIALS = 2  # complete trials: with fewer there is no spread to explain
SEED = 0  # fANOVA's random forest: the same study gives the same importances


def complete_trials(study: optuna.Study) -> list:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def varying_params(trials: list) -> list[str]:
    """Parameters every trial sampled that took at least two values, in the order first seen.
    A fixed parameter is never sampled, so it is not in a trial's params at all."""
    if not trials:
        return []
    names = [n for n in trials[0].params if all(n in t.params for t in trials)]
    return [n for n in names if len({repr(t.params[n]) for t in trials}) >= 2]


def skip_reason(study: optuna.Study) -> str | None:
    """Why importances cannot be computed for this study, or None when they can."""
    trials = complete_trials(study)
    if len(trials) < MIN_TRIALS:
        return f"{len(trials)} complete trial(s), need {MIN_TRIALS}"
    if not varying_params(trials):
        return "no searched parameter took two values in the complete trials"
    return None


def all_scored_the_same(trials: list) -> bool:
    return len({t.value for t in trials}) < 2


def param_importances(study: optuna.Study, seed: int = SEED) -> dict[str, float]:
    """fANOVA importance of each searched parameter that varied, over the study's COMPLETE trials,
    normalised to sum to 1, most important first; {} when `skip_reason` names a reason.
    When every complete trial scored the same, no parameter explained anything: all are 0
    (Optuna would split the importance equally, as if each had mattered as much as the others)."""
    if skip_reason(study) is not None:
        return {}
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    trials = complete_trials(study)
    params = varying_params(trials)
    if all_scored_the_same(trials):
        return {name: 0.0 for name in params}
    found = get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=seed), params=params)
    return {name: float(value) for name, value in sorted(found.items(), key=lambda kv: -kv[1])}


def importance_frame(importances: dict[str, float]) -> pd.DataFrame:
    """The table param_importances.csv holds: rank (1 = most important; ties share one), param, importance."""
    ranked = sorted(importances.items(), key=lambda kv: -kv[1])
    frame = pd.DataFrame({"param": [k for k, _ in ranked], "importance": [float(v) for _, v in ranked]})
    frame.insert(0, "rank", frame.importance.rank(method="min", ascending=False).astype(int))
    return frame


def importance_metrics(importances: dict[str, float]) -> dict[str, float]:
    return {f"{METRIC_PREFIX}{name}": value for name, value in importances.items()}


def importances_from_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """A run's importance/<param> metrics back as {param: importance}, most important first."""
    found = {k.removeprefix(METRIC_PREFIX): v for k, v in metrics.items() if k.startswith(METRIC_PREFIX)}
    return dict(sorted(found.items(), key=lambda kv: -kv[1]))


def importance_markdown(importances: dict[str, float]) -> str:
    """The report's section on what mattered; '' when the sweep logged no importances."""
    if not importances:
        return ""
    table = importance_frame(importances).to_markdown(index=False, floatfmt=".3f")
    verdict = (
        "(sums to 1)"
        if any(importances.values())
        else "(all 0: every complete trial scored the same, so no parameter moved the score)"
    )
    return (
        f"## What mattered\n\nfANOVA importance of each searched parameter for the score, over the study's "
        f"complete trials {verdict}. Optuna's plots of the study are the sweep run's artifacts under "
        f"{PLOTS_DIR}/.\n\n{table}\n"
    )


def importance_text(importances: dict[str, float]) -> str:
    """'finetune_lr 0.71, head_lr 0.20, ...'"""
    return ", ".join(f"{name} {value:.2f}" for name, value in importances.items())


# --- plots ---------------------------------------------------------------------------------


def _save(axes, path: Path) -> Path:
    """Save the figure Optuna drew (an Axes, or an array of them) as a PNG, then close it."""
    figure = np.asarray(axes, dtype=object).flat[0].figure
    try:
        figure.savefig(path, dpi=100, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path


def plot_plan(study: optuna.Study, importances: dict[str, float]) -> dict[str, tuple[str | None, list[str] | None]]:
    """Which plots can be drawn: name -> (why not, or None; the parameters to draw)."""
    trials = complete_trials(study)
    varied = varying_params(trials)
    # The contour's two axes: the two most important parameters that varied (config order without importances).
    ranked = [p for p in importances if p in varied] + [p for p in varied if p not in importances]
    few = f"{len(trials)} complete trial(s), need {MIN_TRIALS}" if len(trials) < MIN_TRIALS else None
    return {
        "optimization_history": ("no complete trial" if not trials else None, None),
        "slice": (few or ("no searched parameter varied" if not varied else None), varied),
        "parallel_coordinate": (few or ("no searched parameter varied" if not varied else None), varied),
        "contour": (
            few or (f"needs 2 searched parameters that varied, found {len(varied)}" if len(varied) < 2 else None),
            ranked[:2],
        ),
        "param_importances": (
            "no importances"
            if not importances
            else "every complete trial scored the same"
            if not any(importances.values())
            else None,
            None,
        ),
    }


def plot_study(
    study: optuna.Study,
    out_dir: str | Path,
    importances: dict[str, float] | None = None,
    metric: str = "Objective Value",
    log=None,
) -> list[Path]:
    """Optuna's standard plots of the study as PNGs in `out_dir`: optimization history, slice,
    parallel coordinate, the contour of the two most important parameters, and the importances.
    The plots that cannot be drawn (too few trials or parameters) are skipped with one line to
    `log`; one that fails is logged and the rest are still drawn. Returns the files written."""
    from optuna.visualization import matplotlib as ovm

    log = log or (lambda text: None)
    importances = param_importances(study) if importances is None else importances
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw = {
        "optimization_history": lambda params: ovm.plot_optimization_history(study, target_name=metric),
        "slice": lambda params: ovm.plot_slice(study, params=params, target_name=metric),
        "parallel_coordinate": lambda params: ovm.plot_parallel_coordinate(study, params=params, target_name=metric),
        "contour": lambda params: ovm.plot_contour(study, params=params, target_name=metric),
        "param_importances": lambda params: _importance_bars(importances, metric),
    }
    written: list[Path] = []
    skipped: dict[str, list[str]] = {}  # reason -> the plots it skipped
    with matplotlib.rc_context():  # Optuna's plots switch the style to ggplot: put it back after
        _draw_all(draw, plot_plan(study, importances), out, written, skipped, log)
    if skipped:  # one line for all of them
        log("plots skipped: " + "; ".join(f"{', '.join(names)} ({why})" for why, names in skipped.items()))
    return written


def _draw_all(draw: dict, plan: dict, out: Path, written: list, skipped: dict, log) -> None:
    from optuna.exceptions import ExperimentalWarning

    for name, (why_not, params) in plan.items():
        if why_not:
            skipped.setdefault(why_not, []).append(name)
            continue
        before = set(plt.get_fignums())
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                written.append(_save(draw[name](params), out / f"{name}.png"))
        except Exception as exc:  # noqa: BLE001 - one plot must not cost the others
            for number in set(plt.get_fignums()) - before:  # the failed plot's figures only
                plt.close(number)
            log(f"plots: {name} failed ({type(exc).__name__}: {str(exc)[:200]})")


def _importance_bars(importances: dict[str, float], metric: str):
    """The importances as horizontal bars, most important on top (the values this module logged,
    not a second evaluation)."""
    names = list(importances)[::-1]
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(names) + 1.2))
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize=8)
    ax.set_xlabel(f"fANOVA importance for {metric} (sums to 1)")
    ax.set_xlim(0, 1.1)
    ax.set_title("What mattered")
    fig.tight_layout()
    return ax


# --- the end of a sweep ----------------------------------------------------------------------


def log_what_mattered(study: optuna.Study, tracker, out_dir: str | Path, metric: str, log) -> dict:
    """Importances and plots of the study, written under `out_dir` and logged on the parent run:
    metrics importance/<param>, param_importances.csv, plots/<name>.png. Never raises (except on
    an interrupt): a failure is logged and the sweep's results stand.
    Returns {"importances": {...}, "plots": [Path, ...], "skipped": reason or None, "n_trials": N}."""
    result: dict[str, Any] = {"importances": {}, "plots": [], "skipped": None, "n_trials": 0}
    out = Path(out_dir)
    try:
        result["n_trials"] = len(complete_trials(study))
        result["skipped"] = skip_reason(study)
        if result["skipped"]:
            log(f"parameter importances skipped ({result['skipped']})")
        else:
            result["importances"] = param_importances(study)
            out.mkdir(parents=True, exist_ok=True)
            table = out / IMPORTANCE_FILE
            importance_frame(result["importances"]).to_csv(table, index=False)
            tracker.log_metrics(tracker.parent_run_id, importance_metrics(result["importances"]))
            tracker.log_file(tracker.parent_run_id, table)
    except Exception as exc:  # noqa: BLE001 - the night's results must survive a failed analysis
        result["skipped"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        log(f"parameter importances {result['skipped']}")
    try:
        result["plots"] = plot_study(study, out / PLOTS_DIR, result["importances"], metric, log)
        for path in result["plots"]:
            tracker.log_file(tracker.parent_run_id, path, PLOTS_DIR)
    except Exception as exc:  # noqa: BLE001
        log(f"plots failed ({type(exc).__name__}: {str(exc)[:200]})")
    return result


def summary_lines(result: dict | None) -> list[str]:
    """The summary's lines on what mattered."""
    if not result:
        return []
    if result["importances"] and not any(result["importances"].values()):
        lines = [f"what mattered: no parameter moved the score (all {result['n_trials']} complete trials scored the same)"]
    elif result["importances"]:
        lines = [
            (
                f"what mattered (fANOVA over {result['n_trials']} complete trials, sums to 1): "
                f"{importance_text(result['importances'])}"
            )
        ]
    else:
        lines = [f"what mattered: not computed ({result['skipped']})"]
    if result["plots"]:
        lines.append(f"study plots: {Path(result['plots'][0]).parent}/ ({', '.join(Path(p).stem for p in result['plots'])})")
    return lines

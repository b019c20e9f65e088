"""Does the night pay? Warm starts, screening, transferability scores and pruners, measured.

Every number comes from real `python -m harness.sweep` runs on the offline zoo (sweeps/zoo-demo.yaml:
four shipped backbones of different families) and is read back from each sweep's Optuna storage.
For each target and seed, one sweep per arm, all with the same trial budget:

  cold      the search over all four backbones from scratch, median pruner (the reference);
  warm      the same, with study.warm_start: the history is the cold sweeps of the *other* targets,
            so no target is ever in its own history;
  screened  search.screen {keep: 2, by: logme}: the two backbones LogME ranks best;
  <pruner>  the cold sweep with study.pruner successive_halving (and hyperband with --pruners).

"Within 1 point" means a completed trial reached the cold sweep's final best minus 0.01. Seconds
are trial seconds as Optuna recorded them (start to end of each trial, pruned and failed ones
included), so they count building models and reading cached features, not only fit(). Each arm
gets a fresh feature cache, so no arm reads features another one computed.

It measures:
  (a) warm vs cold: trials and seconds to come within 1 point of the cold best;
  (b) screening keeps 2 of 4 vs none: how often the cold winner's backbone was kept, seconds saved,
      best value lost;
  (c) each score's Kendall tau (LogME, k-NN, size only) against the best value each backbone reached,
      pooled over the arms that searched all four backbones;
  (d) the pruners: trial seconds, trials pruned, best value.

A finished arm is recorded in its folder (arm.json) and not run again, so an interrupted benchmark
resumes where it stopped. Usage:

    python benchmarks/night.py [--targets shapes,digits,source-shapes] [--seeds 3] [--trials 8]
                               [--pruners successive_halving] [--work results/night] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.compute import write_section  # noqa: E402
from benchmarks.engine import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
POINT = 0.01  # "within 1 point" of an accuracy

# Three targets of the zoo's backbones (pretrained on the 16 classes of shapes-source, seed 1),
# none of them in another's history: 20 training images per class each.
TARGETS: dict[str, dict] = {
    # 6 other shape classes: similar to the source
    "shapes": {"name": "shapes", "builtin_size": 200, "seed_offset": 10},
    # real handwritten digit scans: dissimilar
    "digits": {"name": "digits", "seed_offset": 0},
    # 6 of the source's own classes, freshly drawn images: the nearest possible target
    "source-shapes": {
        "name": "shapes-source",
        "builtin_size": 100,
        "classes": ["triangle", "ring", "star5", "ellipse", "crescent", "heart"],
        "seed_offset": 10,
    },
}
ARMS = ("cold", "warm", "screened")


# --- configs ---------------------------------------------------------------------------------------


def sweep_config(target: str, seed: int, arm: str, n_trials: int, work: Path, history: list[str]) -> dict:
    """sweeps/zoo-demo.yaml (its source block keys the shipped weights) with this run's changes."""
    cfg = yaml.safe_load((ROOT / "sweeps" / "zoo-demo.yaml").read_text())
    spec = dict(TARGETS[target])
    offset = spec.pop("seed_offset")
    cfg["data"] = {
        "source": "builtin",
        "image_size": 32,
        "train_per_class": 20,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        **spec,
        "seed": offset + seed,
    }
    cfg["study"].update(
        name=study_name(target, seed, arm),
        n_trials=n_trials,
        seed=seed,
        warm_start=history if arm == "warm" else "off",
        warm_start_trials=3,
        pruner=arm if arm not in ARMS else "median",
    )
    cfg["search"]["screen"] = {"keep": 2, "by": "logme"} if arm == "screened" else {"by": "logme"}
    cfg["train"] = {
        "head": {"epochs": 5, "batch_size": 32, "patience": 3},
        "finetune": {"epochs": 5, "batch_size": 32, "patience": 3},
        "feature_cache_dir": str(arm_dir(work, target, seed, arm) / "features"),
    }
    cfg["tracking"] = {"uri": f"sqlite:///{work / 'mlflow.db'}", "artifact_root": str(work / "mlartifacts")}
    return cfg


def study_name(target: str, seed: int, arm: str) -> str:
    return f"night-{target}-s{seed}-{arm.replace('_', '-')}"


def arm_dir(work: Path, target: str, seed: int, arm: str) -> Path:
    return work / target / f"seed{seed}" / arm


# --- running an arm and reading it back ----------------------------------------------------------


def run_arm(cfg: dict, folder: Path) -> dict:
    """Run the sweep in `folder` (once: a finished arm's record is read back) and return its trials."""
    record = folder / "arm.json"
    if record.exists():
        return json.loads(record.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sweep.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    with open(folder / "sweep.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "harness.sweep", "sweep.yaml"], cwd=folder, env=env, stdout=log, stderr=log)
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(f"{cfg['study']['name']}: the sweep failed (exit {code}); see {folder / 'sweep.log'}")
    result = {"wall": wall, **read_study(folder, cfg["study"]["name"])}
    record.write_text(json.dumps(result, indent=1))
    return result


def read_study(folder: Path, name: str) -> dict:
    import optuna

    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'results' / name / 'optuna.db'}")
    trials = [
        {
            "number": t.number,
            "state": t.state.name,
            "value": t.value,
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds(),
            "backbone": t.params.get("backbone"),
            "warm_from": t.user_attrs.get("warm_start_from"),
        }
        for t in sorted(study.trials, key=lambda t: t.number)
        if t.datetime_start and t.datetime_complete
    ]
    return {"trials": trials, "screening": study.user_attrs.get("screening")}


# --- measures (pure) -------------------------------------------------------------------------------


def best(trials: list[dict]) -> float:
    return max((t["value"] for t in trials if t["state"] == "COMPLETE" and t["value"] is not None), default=-math.inf)


def reach(trials: list[dict], threshold: float) -> tuple[int | None, float | None]:
    """(trials run, seconds spent) until a completed trial first reached `threshold`; (None, None) if none did."""
    seconds = 0.0
    for count, t in enumerate(trials, 1):
        seconds += t["seconds"]
        if t["state"] == "COMPLETE" and t["value"] is not None and t["value"] >= threshold:
            return count, seconds
    return None, None


def total_seconds(trials: list[dict]) -> float:
    return sum(t["seconds"] for t in trials)


def winner_backbone(trials: list[dict]) -> str | None:
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    return max(done, key=lambda t: t["value"])["backbone"] if done else None


def pooled_best_per_backbone(*arms: dict) -> dict[str, float]:
    pooled: dict[str, float] = {}
    for arm in arms:
        for t in arm["trials"]:
            if t["state"] == "COMPLETE" and t["value"] is not None and t["backbone"]:
                pooled[t["backbone"]] = max(pooled.get(t["backbone"], -math.inf), t["value"])
    return pooled


def saved(before: float | None, after: float | None) -> float | None:
    """The share of `before` that `after` saves (0.4 = 40% fewer seconds)."""
    if before is None or after is None or before <= 0:
        return None
    return 1.0 - after / before


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def median(values: list) -> float | None:
    present = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(present) if present else None


# --- sections -------------------------------------------------------------------------------------


def warm_section(runs: dict) -> str:
    rows = [
        "| target | seed | cold best | warm best | trials to within 1 point: cold | warm | seconds: cold | warm "
        "| warm's first trials came from |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    halves, reached, ratios = 0, 0, []
    for (target, seed), arms in runs.items():
        cold, warm = arms["cold"], arms["warm"]
        threshold = best(cold["trials"]) - POINT
        (ct, cs), (wt, ws) = reach(cold["trials"], threshold), reach(warm["trials"], threshold)
        sources = sorted({t["warm_from"] for t in warm["trials"] if t["warm_from"]})
        reached += wt is not None
        halves += wt is not None and ct is not None and wt <= ct / 2
        ratios.append(None if wt is None or ct is None else wt / ct)
        rows.append(
            f"| {target} | {seed} | {fmt(best(cold['trials']))} | {fmt(best(warm['trials']))} | {fmt(ct)} | {fmt(wt)} | "
            f"{fmt(cs, 0)} | {fmt(ws, 0)} | {', '.join(sources) or '-'} |"
        )
    n = len(runs)
    return "\n".join(rows) + (
        f"\n\n- Warm reached within 1 point of the cold best in **{reached} of {n}** runs; in at most half the trials "
        f"the cold sweep needed in **{halves} of {n}** (goal: every run). Median warm/cold trials to get there: "
        f"**{fmt(median(ratios), 2)}**."
    )


def screening_section(runs: dict) -> str:
    rows = [
        "| target | seed | kept (LogME top 2) | cold winner | kept it | cold best | screened best | lost | "
        "trial seconds: cold | screened | saved | seconds to within 1 point: cold | screened | saved |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    kept_winner, within, total_saved, reach_saved = 0, 0, [], []
    for (target, seed), arms in runs.items():
        cold, screened = arms["cold"], arms["screened"]
        kept = (screened.get("screening") or {}).get("kept", [])
        winner = winner_backbone(cold["trials"])
        cold_best, screened_best = best(cold["trials"]), best(screened["trials"])
        threshold = cold_best - POINT
        (_, cs), (_, ss) = reach(cold["trials"], threshold), reach(screened["trials"], threshold)
        ct, st = total_seconds(cold["trials"]), total_seconds(screened["trials"])
        kept_winner += winner in kept
        within += screened_best >= threshold
        total_saved.append(saved(ct, st))
        reach_saved.append(saved(cs, ss))
        rows.append(
            f"| {target} | {seed} | {', '.join(kept)} | {winner} | {'yes' if winner in kept else 'no'} | {fmt(cold_best)} | "
            f"{fmt(screened_best)} | {fmt(cold_best - screened_best)} | {fmt(ct, 0)} | {fmt(st, 0)} | {pct(saved(ct, st))} | "
            f"{fmt(cs, 0)} | {fmt(ss, 0)} | {pct(saved(cs, ss))} |"
        )
    n = len(runs)
    return "\n".join(rows) + (
        f"\n\n- The cold winner's backbone was kept in **{kept_winner} of {n}** runs.\n"
        f"- The screened sweep's best was within 1 point of the cold best in **{within} of {n}** runs (goal: at least 90%).\n"
        f"- Trial seconds saved at the same trial budget: median **{pct(median(total_saved))}**; seconds to "
        f"come within 1 point of the cold best, screened against cold: median **{pct(median(reach_saved))}** "
        "saved, over the runs where the screened sweep got there (goal: at least 40%)."
    )


def tau_section(runs: dict, pruners: list[str]) -> str:
    from harness.screening import agreement

    rows = [
        "| target | seed | backbones with a completed trial | LogME | k-NN | size only | beat size only |",
        "|---|---|---|---|---|---|---|",
    ]
    taus: dict[str, list[float]] = {"logme": [], "knn": [], "size": []}
    beat = {"logme": 0, "knn": 0}
    counted = 0
    for (target, seed), arms in runs.items():
        record = arms["cold"].get("screening")
        if not record:
            continue
        pooled = pooled_best_per_backbone(arms["cold"], arms["warm"], *(arms[p] for p in pruners))
        tau = agreement(record["scores"], pooled, "maximize")
        for s in taus:
            taus[s].append(tau[s])
        winners = [s for s in beat if math.isfinite(tau[s]) and math.isfinite(tau["size"]) and tau[s] > tau["size"]]
        if all(math.isfinite(tau[s]) for s in taus):
            counted += 1
            for s in winners:
                beat[s] += 1
        rows.append(
            f"| {target} | {seed} | {len(pooled)} | {fmt(tau['logme'], 2)} | {fmt(tau['knn'], 2)} | {fmt(tau['size'], 2)} | "
            f"{', '.join({'logme': 'LogME', 'knn': 'k-NN'}[s] for s in winners) or 'neither'} |"
        )
    means = {
        s: (statistics.fmean([v for v in vs if math.isfinite(v)]) if any(math.isfinite(v) for v in vs) else None)
        for s, vs in taus.items()
    }
    text = "\n".join(rows) + (
        f"\n\n- Mean tau: LogME **{fmt(means['logme'], 2)}**, k-NN **{fmt(means['knn'], 2)}**, size only "
        f"**{fmt(means['size'], 2)}**. LogME beat the size-only ranking in {beat['logme']} of {counted} runs, "
        f"k-NN in {beat['knn']} of {counted}."
    )
    return text


def pruner_section(runs: dict, pruners: list[str]) -> str:
    rows = ["| target | seed | pruner | trial seconds | trials pruned | best |", "|---|---|---|---|---|---|"]
    by_pruner: dict[str, dict[str, list[float]]] = {p: {"seconds": [], "best": []} for p in ["median", *pruners]}
    for (target, seed), arms in runs.items():
        for pruner, arm in [("median", arms["cold"]), *((p, arms[p]) for p in pruners)]:
            pruned = sum(t["state"] == "PRUNED" for t in arm["trials"])
            by_pruner[pruner]["seconds"].append(total_seconds(arm["trials"]))
            by_pruner[pruner]["best"].append(best(arm["trials"]))
            seconds, value = total_seconds(arm["trials"]), best(arm["trials"])
            rows.append(f"| {target} | {seed} | {pruner} | {fmt(seconds, 0)} | {pruned} | {fmt(value)} |")
    lines = [
        f"- {p}: mean trial seconds **{statistics.fmean(v['seconds']):.0f}**, mean best **{statistics.fmean(v['best']):.3f}**"
        for p, v in by_pruner.items()
    ]
    for p in pruners:
        diffs = [b - m for b, m in zip(by_pruner[p]["best"], by_pruner["median"]["best"])]
        higher, equal, lower = sum(d > 0 for d in diffs), sum(d == 0 for d in diffs), sum(d < 0 for d in diffs)
        ratio = statistics.fmean(by_pruner[p]["seconds"]) / statistics.fmean(by_pruner["median"]["seconds"])
        lines.append(
            f"- {p} against median: {ratio:.2f}x the seconds; best value {statistics.fmean(diffs):+.3f} on average "
            f"(higher in {higher}, equal in {equal}, lower in {lower} of {len(diffs)} runs)."
        )
    return "\n".join(rows) + "\n\n" + "\n".join(lines)


# --- main ------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated, of {', '.join(TARGETS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8, help="trials of every sweep")
    parser.add_argument("--pruners", default="successive_halving", help="pruners measured against the median pruner")
    parser.add_argument("--work", type=Path, default=ROOT / "results" / "night", help="sweeps' folders; a finished arm is kept")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    pruners = [p.strip() for p in args.pruners.split(",") if p.strip()]
    problems = [f"--targets: unknown {t!r} (valid: {', '.join(TARGETS)})" for t in targets if t not in TARGETS]
    problems += [f"--pruners: unknown {p!r}" for p in pruners if p not in ("successive_halving", "hyperband", "percentile")]
    if len(targets) < 2:
        problems.append("--targets: at least 2, so every target has a history of other targets")
    if problems:
        parser.error("; ".join(problems))
    work = args.work.resolve()
    started = time.perf_counter()
    keys = [(t, s) for s in range(args.seeds) for t in targets]

    def run(target: str, seed: int, arm: str, history: list[str]) -> dict:
        cfg = sweep_config(target, seed, arm, args.trials, work, history)
        result = run_arm(cfg, arm_dir(work, target, seed, arm))
        print(
            f"{study_name(target, seed, arm)}: best {fmt(best(result['trials']))}, trial seconds "
            f"{total_seconds(result['trials']):.0f}, sweep {result['wall']:.0f} s ({time.perf_counter() - started:.0f} s in)",
            flush=True,
        )
        return result

    runs: dict[tuple[str, int], dict] = {key: {} for key in keys}
    for target, seed in keys:  # every cold sweep first: they are the warm starts' history
        runs[target, seed]["cold"] = run(target, seed, "cold", [])
    for target, seed in keys:
        history = [study_name(t, s, "cold") for t, s in keys if t != target]
        for arm in ("warm", "screened", *pruners):
            runs[target, seed][arm] = run(target, seed, arm, history)

    sections = [
        ("(a) Warm start against cold", warm_section(runs)),
        ("(b) Screening: keep 2 of 4 (LogME) against no screening", screening_section(runs)),
        ("(c) Transferability scores against the size-only ranking", tau_section(runs, pruners)),
        ("(d) Pruners", pruner_section(runs, pruners)),
    ]
    walls = sum(arm["wall"] for arms in runs.values() for arm in arms.values())
    head = (
        "## The night: warm start, screening, transferability scores and pruners "
        f"({len(targets)} targets x {args.seeds} seeds)\n\n"
        f"`python benchmarks/night.py --targets {','.join(targets)} --seeds {args.seeds} --trials {args.trials} "
        f"--pruners {','.join(pruners)}`: {len(targets) * args.seeds * (3 + len(pruners))} sweeps of {args.trials} trials on "
        "the offline zoo (sweeps/zoo-demo.yaml's four shipped backbones, 5 + 5 epochs, 20 training images per class), "
        f"{walls / 60:.0f} min of sweeps. Targets: {', '.join(targets)}; each target's warm start learns from the cold "
        "sweeps of the other targets only. Within 1 point: a completed trial reached the cold sweep's final best minus "
        "0.01. Seconds: Optuna's trial durations (pruned trials included)."
    )
    body = "\n\n".join(f"### {title}\n\n{text}" for title, text in sections)
    stamp = f"Measured on {datetime.date.today().isoformat()} on {machine()}."
    write_section(args.out, "night", f"{head}\n\n{body}\n\n{stamp}")
    print(f"wrote section night to {args.out}", flush=True)


if __name__ == "__main__":
    main()

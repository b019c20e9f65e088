"""Benchmark of the trial engine; writes benchmarks/RESULTS.md (with the machine it ran on).

The same enqueued trials (`--trials` trials of 3 + 3 epochs on 900 real digit scans, 10 classes,
with the demo's source backbone; no pruning, no baseline) run in four ways (five with --before), each as a fresh process
timed end to end:

  plain          a plain in-process Keras loop: one Python process builds, trains and evaluates
                 every trial with the harness's own model and phase code, and nothing else
                 (no Optuna, no MLflow, no trial processes): the floor;
  before         (with --before DIR) the harness checked out in DIR, from before warm processes:
                 a fresh child process per trial, started when the previous one ended;
  fresh          `python -m harness.sweep` with study.trials_per_process: 1: a fresh trial process
                 per trial, each started while the previous trial runs;
  warm           `python -m harness.sweep` as shipped: warm trial processes, --workers 1;
  warm x2        the same with --workers 2 (each process gets half the cores).

It reports harness/plain (goal <= 1.10), the fixed cost per trial of fresh and warm processes
((sweep - plain) / trials), and the throughput of --workers 2 over --workers 1 (goal >= 1.5x).
It then runs benchmarks/trial_memory.py's measurement (resident memory of the process that ran
each trial) for `--memory-trials` tiny trials. Usage:

    python benchmarks/engine.py [--trials 6] [--memory-trials 30] [--before DIR] [--out benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORKLOAD = """
study:
  name: bench
  n_trials: {n_trials}
  seed: 0
  pruner: none
  trials_per_process: {trials_per_process}
data:
  source: builtin
  name: digits
  image_size: 32
  train_per_class: 90
  seed: 0
model:
  weights: {weights}
  backbone_options:
    MobileNetV2: {{alpha: 0.35}}
search:
  backbone: MobileNetV2
  unfreeze_fraction: {{low: 0.0, high: 1.0}}
  head_units: {{choices: [0, 64]}}
  head_lr: {{low: 0.001, high: 0.01, log: true}}
  finetune_lr: {{low: 0.00001, high: 0.001, log: true}}
  dropout: {{low: 0.0, high: 0.4}}
  pooling: avg
  augment: false
train:
  head: {{epochs: 3, batch_size: 32, patience: null}}
  finetune: {{epochs: 3, batch_size: 32, patience: null}}
baseline:
  scratch: false
"""

PLAIN_LOOP = """
import sys, time
started = time.perf_counter()
sys.path.insert(0, {root!r})
import keras
from harness.config import load_config
from harness.data import load_dataset, make_splits, tf_dataset
from harness.frameworks.keras.model import build_model
from harness.objective import model_spec, plan_for, run_plan
cfg = load_config({config!r})
dataset = load_dataset(cfg.data)
splits = make_splits(dataset.labels, cfg.data)
cache = {{}}
def pipelines(batch):
    if batch not in cache:
        cache[batch] = (tf_dataset(dataset, splits.train, batch, shuffle=True, seed=0),
                        tf_dataset(dataset, splits.val, batch, shuffle=False))
    return cache[batch]
fixed = {{n: p.value for n, p in cfg.search.items() if p.fixed}}
for number, params in enumerate({trials!r}):
    params = {{**fixed, **params}}
    keras.utils.set_random_seed(number)
    tm = build_model(model_spec(cfg, params, dataset.num_classes, {weights!r}), seed=number)
    run_plan(cfg, tm, plan_for(cfg, params, len(tm.blocks)), pipelines)
    keras.backend.clear_session()
print(time.perf_counter() - started)
"""


def trial_params(n: int) -> list[dict]:
    """The same `n` parameter sets for every mode (drawn once, seeded)."""
    import random

    rng = random.Random(0)
    return [
        {
            "unfreeze_fraction": round(rng.uniform(0.0, 1.0), 3),
            "head_units": rng.choice([0, 64]),
            "head_lr": round(10 ** rng.uniform(-3, -2), 5),
            "finetune_lr": round(10 ** rng.uniform(-5, -3), 7),
            "dropout": round(rng.uniform(0.0, 0.4), 3),
        }
        for _ in range(n)
    ]


def source_weights() -> str:
    from harness.config import load_config
    from harness.pretrain import ensure_source_weights

    return str(ensure_source_weights(load_config(ROOT / "sweeps" / "demo.yaml"), "MobileNetV2"))


def run_plain(work: Path, config: Path, trials: list[dict], weights: str) -> float:
    script = work / "plain.py"
    script.write_text(PLAIN_LOOP.format(root=str(ROOT), config=str(config), trials=trials, weights=weights))
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, str(script)], cwd=work, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    )
    if out.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{out.stderr[-3000:]}")
    return time.perf_counter() - started


def run_sweep(work: Path, config: Path, trials: list[dict], workers: int, code: Path = ROOT) -> float:
    """Enqueue the trials in the study's storage first, so the sweep runs exactly them."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{work}/results/bench/optuna.db"
    (work / "results" / "bench").mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="bench", storage=storage, direction="maximize", load_if_exists=True)
    for params in trials:
        study.enqueue_trial(params)
    started = time.perf_counter()
    flags = ["--workers", str(workers)] if workers != 1 else []
    out = subprocess.run(
        [sys.executable, "-m", "harness.sweep", str(config), *flags],
        cwd=work,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(code), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"sweep failed:\n{out.stderr[-3000:]}")
    done = optuna.load_study(study_name="bench", storage=storage)
    ran = [{k: t.params[k] for k in trials[0]} for t in done.trials if t.state.name == "COMPLETE"]
    assert sorted(map(str, ran)) == sorted(map(str, trials)), "the sweep must have run exactly the enqueued trials"
    return wall


def commit_of(folder: Path) -> str:
    out = subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def machine() -> str:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpus = "no GPU"
    try:
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        if listed.returncode == 0 and listed.stdout.strip():
            gpus = "; ".join(listed.stdout.strip().splitlines())
    except (OSError, subprocess.TimeoutExpired):
        pass
    return (
        f"{platform.node()}: {os.cpu_count()} CPU cores ({cpu}), {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{gpus}; Python {platform.python_version()}, {platform.system()} {platform.release()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--memory-trials", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "RESULTS.md"))
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of the harness before warm processes (a child "
        "process per trial, started when the previous one ended), run the same way as 'before'",
    )
    args = parser.parse_args()
    weights = source_weights()
    trials = trial_params(args.trials)
    seconds = {}
    modes = [("plain", None, 1), ("fresh", 1, 1), ("warm", 20, 1), ("warm x2", 20, 2)]
    if args.before:
        modes.insert(1, ("before", 1, 1))
    for mode, per_process, workers in modes:
        work = Path(tempfile.mkdtemp(prefix=f"bench-{mode.replace(' ', '')}-"))
        config = work / "bench.yaml"
        config.write_text(WORKLOAD.format(n_trials=args.trials, trials_per_process=per_process or 1, weights=weights))
        if mode == "plain":
            seconds[mode] = run_plain(work, config, trials, weights)
        else:
            seconds[mode] = run_sweep(work, config, trials, workers, args.before if mode == "before" else ROOT)
        print(f"{mode:>8}: {seconds[mode]:.1f} s for {args.trials} trials", flush=True)

    from benchmarks.trial_memory import run_mode

    memory = {mode: run_mode(mode, args.memory_trials) for mode in ("warm", "fresh")}
    n = args.trials
    lines = [
        "# Benchmark results",
        "",
        f"Written by `python benchmarks/engine.py --trials {n} --memory-trials {args.memory_trials}"
        f"{' --before ' + str(args.before) if args.before else ''}` on "
        f"{datetime.date.today().isoformat()}"
        f"{' (the before checkout at commit ' + commit_of(args.before) + ')' if args.before else ''}.",
        "",
        f"Machine: {machine()}.",
        "",
        f"## Trial engine: {n} enqueued trials of 3 + 3 epochs on 900 real digit scans (10 classes, 32 px), "
        "MobileNetV2 alpha 0.35 with the demo's source backbone",
        "",
        "| run | seconds | vs plain loop | fixed cost per trial (s) |",
        "|---|---|---|---|",
    ]
    for mode, *_ in modes:
        fixed = "" if mode in ("plain", "warm x2") else f"{(seconds[mode] - seconds['plain']) / n:.1f}"
        lines.append(f"| {mode} | {seconds[mode]:.1f} | {seconds[mode] / seconds['plain']:.2f} | {fixed} |")
    lines += [
        "",
        "- Harness (warm, --workers 1) vs a plain in-process Keras loop: "
        f"ratio **{seconds['warm'] / seconds['plain']:.2f}** (goal <= 1.10).",
        f"- `--workers 2` vs `--workers 1` throughput: **{seconds['warm'] / seconds['warm x2']:.2f}x** (goal >= 1.5x).",
        "- Fixed cost per trial, (sweep - plain) / trials: "
        + (f"before this engine {(seconds['before'] - seconds['plain']) / n:.1f} s, " if args.before else "")
        + f"a fresh process per trial started ahead {(seconds['fresh'] - seconds['plain']) / n:.1f} s, "
        f"warm processes {(seconds['warm'] - seconds['plain']) / n:.1f} s.",
        "",
        "Modes: `plain` is one Python process running the same trials with the harness's model and phase code and "
        "nothing else; `before` is the harness before warm processes (a fresh child per trial, started when the last "
        "ended); `fresh` is study.trials_per_process: 1 (a fresh process per trial, started while the previous trial "
        "runs); `warm` is the default (warm processes, --workers 1); `warm x2` is --workers 2.",
        "",
        f"## Memory over {args.memory_trials} tiny trials (tests' config): resident memory of the process that ran each trial",
        "",
        "| mode | after trial 3 (MiB) | after the last (MiB) | change | highest, first third (MiB) | "
        "highest, last third (MiB) | change | peak of the process tree (MiB) | s/trial |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in memory.items():
        rss, last = r["rss"], max(r["rss"])
        third = max(1, last // 3)
        first_peak = max(v for k, v in rss.items() if k <= third)
        last_peak = max(v for k, v in rss.items() if k > last - third)
        lines.append(
            f"| {mode} | {rss[3]:.0f} | {rss[last]:.0f} | {100 * (rss[last] / rss[3] - 1):+.1f}% | "
            f"{first_peak:.0f} | {last_peak:.0f} | {100 * (last_peak / first_peak - 1):+.1f}% | "
            f"{r['peak_tree']:.0f} | {r['seconds_per_trial']:.1f} |"
        )
    lines += [
        "",
        "A warm process grows by Keras' per-fit leak until study.recycle_memory_mib (default 1024) and "
        "is then replaced, so its memory is a saw-tooth with a fixed ceiling: compare the highest value of "
        "the first and the last third of the sweep for the trend, not two single trials, which may sit at "
        "different points of the saw-tooth.",
    ]
    lines += ["", "RSS by trial (MiB):", ""]
    for mode, r in memory.items():
        lines.append(f"- {mode}: " + ", ".join(f"{k}:{v:.0f}" for k, v in sorted(r["rss"].items())))
    out = Path(args.out)
    # benchmarks/compute.py's sections (between <!-- compute:NAME --> markers) stay as they are.
    kept = re.findall(r"<!-- compute:(\w+) -->.*?<!-- /compute:\1 -->", out.read_text(), re.S) if out.exists() else []
    blocks = re.findall(r"<!-- compute:\w+ -->.*?<!-- /compute:\w+ -->", out.read_text(), re.S) if kept else []
    out.write_text("\n".join(lines) + "\n" + "".join(f"\n{b}\n" for b in blocks))
    print(textwrap.indent("\n".join(lines), "  "))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()

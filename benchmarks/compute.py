"""What a trial costs, measured: the feature cache, pruning, growth with data, memory on a large folder.

Writes its sections into benchmarks/RESULTS.md (between `<!-- compute:NAME -->` markers, so
benchmarks/engine.py's sections and any section not re-run stay), with the machine it ran on.
Every timing comes from a real `python -m harness.sweep` run, read back from its MLflow runs.

  cache     the demo's sweep (sweeps/demo.yaml, no pruning, no baseline) with train.feature_cache
            off and on: phase 1 seconds per trial from the logged `head/seconds` (plus, cached,
            `head/feature_seconds`: computing or reading the features). Goal: >= 5x.
  pruning   the same sweep (cache on) with the demo's median pruner and with none, same seeds:
            total training seconds (every trial's phase seconds) and the best value of each.
            Goal: >= 40% saved, best value within 1 point.
  growth    identical trials (fixed parameters, 3 + 3 epochs) on 250, 1,000 and 4,000 training
            images: the trial's wall time split into a fixed part (the least-squares intercept:
            model build, tracing, logging) and a part that grows (the slope), with the fit's R^2.
  memory    a generated folder of --images images at 224 px (more than fits data.memory_cache_mib):
            peak resident memory of the trial process over a whole trial that streams it, against
            the decoded dataset's size; and one epoch of the same split through the in-memory pipeline.
  features  one epoch of a head trained on --feature-rows synthetic pooled features (1,280 wide, as
            MobileNetV2's) held in memory and memory-mapped (larger than data.memory_cache_mib):
            the process's peak anonymous memory (what cannot be paged out) and file-backed pages.

    python benchmarks/compute.py [--sections cache,pruning,growth,memory,features] [--images 20000]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine import machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTIONS = ("cache", "pruning", "growth", "memory", "features")


# --- running sweeps and reading them back ---------------------------------------------------------


def demo_config(**changes) -> dict:
    """sweeps/demo.yaml as a dict, with `changes` ({"study.n_trials": 5, ...}) applied."""
    cfg = yaml.safe_load((ROOT / "sweeps" / "demo.yaml").read_text())
    for dotted, value in changes.items():
        node = cfg
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return cfg


class PeakRSS(threading.Thread):
    """Samples the resident memory of a process tree every 0.2 s; keeps each process's peak."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peaks, self.done = pid, {}, threading.Event()

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while not self.done.is_set():
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        rss = proc.memory_info().rss / 2**20
                        name = " ".join(proc.cmdline()[1:4])
                    except (psutil.NoSuchProcess, psutil.AccessDenied):
                        continue
                    key = (proc.pid, name)
                    self.peaks[key] = max(self.peaks.get(key, 0.0), rss)
            except psutil.NoSuchProcess:
                return
            time.sleep(0.2)


def run_sweep(cfg: dict, label: str, extra_env: dict | None = None, enqueue: list[dict] | None = None) -> dict:
    """Run `python -m harness.sweep` on `cfg` in a fresh folder; return its wall time, its trial
    runs' metrics and the peak RSS of each process. `enqueue`: parameter sets queued in the study
    first, so two sweeps run exactly the same trials."""
    from mlflow.tracking import MlflowClient

    work = Path(tempfile.mkdtemp(prefix=f"compute-{label}-"))
    config = work / "sweep.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    if enqueue:
        import optuna

        name = cfg["study"]["name"]
        (work / "results" / name).mkdir(parents=True)
        study = optuna.create_study(study_name=name, storage=f"sqlite:///{work}/results/{name}/optuna.db", direction="maximize")
        for params in enqueue:
            study.enqueue_trial(params)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3", **(extra_env or {})}
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.sweep", str(config)],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    sampler = PeakRSS(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.done.set()
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{label}: sweep failed ({proc.returncode}):\n{err[-4000:]}")
    client = MlflowClient(f"sqlite:///{work}/results/mlflow.db")
    exp = client.get_experiment_by_name(cfg["study"]["name"])
    runs = client.search_runs([exp.experiment_id], "tags.`harness.role` = 'trial'", max_results=1000)
    trials = sorted(
        (
            {"number": int(r.data.tags["optuna.trial_number"]), "state": r.data.tags.get("optuna.state"), **r.data.metrics}
            for r in runs
        ),
        key=lambda t: t["number"],
    )
    print(f"{label}: {wall:.1f} s, {len(trials)} trials", flush=True)
    return {"wall": wall, "trials": trials, "peaks": sampler.peaks, "work": work}


def training_seconds(trial: dict) -> float:
    """Everything a trial spent training: both phases, and getting cached features."""
    return sum(
        trial.get(k, 0.0) for k in ("head/seconds", "finetune/seconds", "head/feature_seconds", "finetune/feature_seconds")
    )


def phase1_seconds(trial: dict) -> float:
    return trial.get("head/seconds", 0.0) + trial.get("head/feature_seconds", 0.0)


# --- sections --------------------------------------------------------------------------------------


def cache_rows(off: dict, on: dict) -> tuple[list[str], float, float, float]:
    rows = [
        "| trial | phase 1 s, images | phase 1 s, cached (of which features) | speed-up | val_accuracy, images | cached |",
        "|---|---|---|---|---|---|",
    ]
    for a, b in zip(off["trials"], on["trials"]):
        rows.append(
            f"| {a['number']} | {phase1_seconds(a):.2f} | {phase1_seconds(b):.2f} ({b.get('head/feature_seconds', 0):.2f}) | "
            f"{phase1_seconds(a) / phase1_seconds(b):.1f}x | {a['objective']:.4f} | {b['objective']:.4f} |"
        )
    total_off = sum(phase1_seconds(t) for t in off["trials"])
    total_on = sum(phase1_seconds(t) for t in on["trials"])
    diff = max(abs(a["objective"] - b["objective"]) for a, b in zip(off["trials"], on["trials"]))
    head_only = sum(t.get("head/seconds", 0.0) for t in on["trials"])
    return rows, total_off, total_on, diff, head_only


def bench_cache(n_trials: int, larger_trials: int = 4) -> str:
    from benchmarks.engine import trial_params

    out = [
        "## Feature cache: phase 1 with train.feature_cache false, then true (the same enqueued trials)",
        "",
        f"`python benchmarks/compute.py --sections cache --trials {n_trials}`: sweeps/demo.yaml (no pruning, no "
        "baseline) with the same enqueued parameter sets in both runs. Phase 1 seconds are the logged `head/seconds` "
        "(cached: plus `head/feature_seconds`, computing the features in the first trial and reading them after). "
        "The objective is the best epoch of both phases (phase 2 also runs on cached boundary activations when "
        "augmentation is off).",
    ]
    workloads = [
        (f"the demo: 120 training and 240 validation images, {n_trials} trials", n_trials, {}),
        (
            f"the demo's data at 200 training images per class: 1,200 training and 480 validation images, {larger_trials} trials",
            larger_trials,
            {"data.builtin_size": 400, "data.train_per_class": 200},
        ),
    ]
    for title, trials, data in workloads:
        base = {"study.n_trials": trials, "study.pruner": "none", "baseline.scratch": False, **data}
        params = trial_params(trials)
        off = run_sweep(demo_config(**base, **{"train.feature_cache": False}), "cache-off", enqueue=params)
        on = run_sweep(demo_config(**base, **{"train.feature_cache": True}), "cache-on", enqueue=params)
        rows, total_off, total_on, diff, head_only = cache_rows(off, on)
        out += [
            "",
            f"### {title[0].upper()}{title[1:]}",
            "",
            *rows,
            "",
            f"- Phase 1, all trials: **{total_off:.1f} s on images, {total_on:.1f} s cached: {total_off / total_on:.1f}x** "
            "(goal >= 5x on the demo).",
            f"- The logged `head/seconds` alone (the issue's measure; without computing or reading the features): "
            f"{total_off:.1f} s against {head_only:.1f} s: **{total_off / head_only:.1f}x**.",
            f"- Sweep wall time: {off['wall']:.0f} s uncached, {on['wall']:.0f} s cached.",
            f"- Objective difference per trial, cached vs images: at most {diff:.4f}.",
        ]
    return "\n".join(out)


def bench_pruning(n_trials: int) -> str:
    base = {"study.n_trials": n_trials, "baseline.scratch": False}
    plain = run_sweep(demo_config(**base, **{"study.pruner": "none"}), "prune-none")
    pruned = run_sweep(demo_config(**base), "prune-median")
    cfg = demo_config()
    total = {k: sum(training_seconds(t) for t in r["trials"]) for k, r in (("none", plain), ("median", pruned))}
    best = {k: max(t["objective"] for t in r["trials"] if "objective" in t) for k, r in (("none", plain), ("median", pruned))}
    n_pruned = sum(t["state"] == "PRUNED" for t in pruned["trials"])
    saved = 1 - total["median"] / total["none"]
    return "\n".join(
        [
            f"## Pruning: the demo's sweep ({n_trials} trials, feature cache on, no baseline) with and without the median pruner",
            "",
            f"`python benchmarks/compute.py --sections pruning --trials {n_trials}`: the same study seed; the median pruner "
            f"as the demo sets it (warm-up {cfg['study']['pruner_warmup_epochs']} steps, {cfg['study']['pruner_startup_trials']} "
            "startup trials). Each phase reports at fixed step offsets (phase 2 from step `train.head.epochs`), so phase 2 "
            "is only ever compared with phase 2. Training seconds are every trial's `head/seconds`, `head/feature_seconds`, "
            "`finetune/seconds` and `finetune/feature_seconds`.",
            "",
            "| pruner | trials pruned | training seconds | sweep wall seconds | best val_accuracy |",
            "|---|---|---|---|---|",
            f"| none | 0 | {total['none']:.1f} | {plain['wall']:.0f} | {best['none']:.4f} |",
            f"| median | {n_pruned} | {total['median']:.1f} | {pruned['wall']:.0f} | {best['median']:.4f} |",
            "",
            f"- Training time saved: **{100 * saved:.0f}%** (goal >= 40%); best value {best['median'] - best['none']:+.4f} "
            "(goal: within 0.01).",
        ]
    )


def growth_config(n_train: int) -> dict:
    per_class = n_train // 6
    fixed = {
        "backbone": "MobileNetV2",
        "unfreeze_fraction": 0.5,
        "head_units": 0,
        "head_lr": 0.003,
        "finetune_lr": 0.0001,
        "dropout": 0.2,
        "pooling": "avg",
        "augment": False,
    }
    cfg = demo_config(
        **{
            "study.n_trials": 3,
            "study.pruner": "none",
            "study.name": f"growth{n_train}",
            "baseline.scratch": False,
            "data.train_per_class": per_class,
            "data.builtin_size": int(per_class / 0.6) + 2,
            "train.head": {"epochs": 3, "batch_size": 32, "patience": None},
            "train.finetune": {"epochs": 3, "batch_size": 32, "patience": None},
        }
    )
    cfg["search"] = fixed
    return cfg


def bench_growth(sizes=(250, 1000, 4000)) -> str:
    rows, xs, ys = [], [], []
    for n in sizes:
        r = run_sweep(growth_config(n), f"growth-{n}")
        per_trial = [t["wall_seconds"] for t in r["trials"]]
        train = [training_seconds(t) for t in r["trials"]]
        later = per_trial[1:] or per_trial  # the first trial of a process also pays its first tracing
        xs += [n] * len(later)
        ys += later
        rows.append((n, r["wall"], per_trial, train))
    slope, intercept = np.polyfit(xs, ys, 1)
    predicted = np.polyval([slope, intercept], xs)
    r2 = 1 - np.sum((np.asarray(ys) - predicted) ** 2) / np.sum((np.asarray(ys) - np.mean(ys)) ** 2)
    table = [
        "| training images | sweep wall s | trial wall s (each) | of which training s (each) | per image, after trial 1 (ms) |",
        "|---|---|---|---|---|",
    ]
    for n, wall, per_trial, train in rows:
        later = per_trial[1:] or per_trial
        table.append(
            f"| {n} | {wall:.0f} | {', '.join(f'{v:.1f}' for v in per_trial)} | "
            f"{', '.join(f'{v:.1f}' for v in train)} | {1000 * (np.mean(later) - intercept) / n:.2f} |"
        )
    mean = {n: np.mean(p[1:] or p) for n, _, p, _ in rows}
    a, b, c = sizes
    ratio = (mean[c] - mean[b]) / (mean[b] - mean[a])
    return "\n".join(
        [
            "## How a trial's cost grows with the data: identical trials (3 + 3 epochs, fixed parameters, feature cache on)",
            "",
            "`python benchmarks/compute.py --sections growth`: the demo's backbone and data generator, 3 identical "
            "trials per size in one sweep (warm trial processes). A trial's wall time is its logged `wall_seconds`.",
            "",
            *table,
            "",
            "- Least squares over trials 2 and 3 of each size: trial seconds = "
            f"**{intercept:.2f} + {1000 * slope:.3f} ms x images** (R^2 = {r2:.4f}). "
            "The intercept is the fixed part (model build, graph tracing, logging); the slope is the part that grows.",
            f"- Linear: the growth from {b} to {c} images is {ratio:.2f}x the growth from {a} to {b} "
            f"(exactly linear: {(c - b) / (b - a):.2f}x).",
            "- The first trial of each sweep is slower: it computes the cached features the later identical trials read, "
            "and its process traces its first graphs: "
            + ", ".join(f"{n} images +{p[0] - np.mean(p[1:]):.1f} s" for n, _, p, _ in rows if len(p) > 1)
            + ".",
        ]
    )


def make_folder(root: Path, n_images: int, size: int = 224, classes: int = 10) -> Path:
    """`n_images` JPEGs of `classes` shape classes at `size` px (coloured shapes on noise)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    done = root / ".complete"
    if done.exists():
        return root
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        c = i % classes
        img = Image.fromarray(rng.integers(0, 80, (size, size, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(img)
        x, y, r = rng.integers(40, size - 40), rng.integers(40, size - 40), rng.integers(15, 40)
        colour = tuple(int(v) for v in rng.integers(100, 256, 3))
        box = [x - r, y - r, x + r, y + r]
        (draw.ellipse if c % 2 else draw.rectangle)(box, fill=colour)
        draw.text((10, 10 + 15 * (c // 2)), str(c), fill=(255, 255, 255))
        img.save(root / f"class{c}" / f"{i}.jpg", quality=85)
    done.touch()
    return root


PIPELINE_PASS = """
import sys, time, resource
sys.path.insert(0, {root!r})
import dataclasses
from harness.config import DataConfig
from harness.data import make_splits
from harness.frameworks.keras.data import tf_dataset
from harness.preflight import checked_dataset
cfg = DataConfig(source="folder", path={folder!r}, image_size=224, memory_cache_mib={cache_mib}, val_fraction=0.1,
                 test_fraction=0.1)
ds = checked_dataset(cfg, "keras", decode=False)
splits = make_splits(ds.labels, cfg)
started = time.perf_counter()
n = sum(int(x.shape[0]) for x, _ in tf_dataset(ds, splits.train, 64, shuffle=True, seed=0))
print(n, time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


FEATURE_PASS = """
import sys, threading, time
sys.path.insert(0, {root!r})
import numpy as np
import keras
from harness.features import feature_pipeline

peaks = {{"RssAnon": 0, "RssFile": 0}}
def sample():
    while True:
        for line in open("/proc/self/status"):
            key = line.split(":")[0]
            if key in peaks:
                peaks[key] = max(peaks[key], int(line.split()[1]) // 1024)
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
x = np.load({path!r}, mmap_mode="r")
if not {mapped}:
    x = np.array(x)
y = np.load({labels!r})
model = keras.Sequential([keras.Input(x.shape[1:]), keras.layers.Dense(10, activation="softmax")])
model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
started = time.perf_counter()
model.fit(feature_pipeline(x, y, 256, shuffle=True, seed=0), epochs=1, verbose=0)
time.sleep(0.2)
print(time.perf_counter() - started, peaks["RssAnon"], peaks["RssFile"])
"""


def bench_features(rows: int) -> str:
    """A head epoch on pooled features in memory and memory-mapped: peak anonymous and file memory."""
    folder = Path(tempfile.mkdtemp(prefix="compute-features-"))
    path, labels = folder / "features.npy", folder / "labels.npy"
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(rows, 1280))
    rng = np.random.default_rng(0)
    for at in range(0, rows, 10_000):
        out[at : at + 10_000] = rng.random((min(10_000, rows - at), 1280), dtype=np.float32)
    out.flush()
    del out
    np.save(labels, rng.integers(0, 10, rows))
    mib = rows * 1280 * 4 / 2**20
    table = ["| features | peak anonymous memory (MiB) | peak file-backed pages (MiB) | epoch seconds |", "|---|---|---|---|"]
    for label, mapped in (("in memory", False), ("memory-mapped", True)):
        script = FEATURE_PASS.format(root=str(ROOT), path=str(path), labels=str(labels), mapped=mapped)
        run = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        )
        if run.returncode != 0:
            raise SystemExit(run.stderr[-3000:])
        seconds, anon, file_backed = run.stdout.split()[-3:]
        table.append(f"| {label} | {int(anon):,} | {int(file_backed):,} | {float(seconds):.1f} |")
        print(f"features {label}: {table[-1]}", flush=True)
    for leftover in folder.iterdir():
        leftover.unlink()
    folder.rmdir()
    return "\n".join(
        [
            f"## Memory: a head epoch on {rows:,} cached pooled features ({mib:,.0f} MiB)",
            "",
            f"`python benchmarks/compute.py --sections features --feature-rows {rows}`: synthetic pooled features, 1,280 wide "
            "(MobileNetV2's), batch 256, through `harness.features.feature_pipeline` (it shuffles row numbers; each batch "
            "reads its rows), in a fresh process: loaded into memory (a set within data.memory_cache_mib) and "
            "memory-mapped (a larger one). "
            "Anonymous memory is what the process holds itself; file-backed pages of the mapping are the kernel's page "
            "cache, dropped under memory pressure and shared by every trial process that maps the same file.",
            "",
            *table,
        ]
    )


def memory_trial(n_images: int, weights: Path) -> dict:
    """One streamed trial on a generated folder of `n_images`; its peak RSS per process."""
    folder = make_folder(Path(tempfile.gettempdir()) / f"compute-folder-{n_images}", n_images)
    cfg = demo_config(
        **{
            "study.name": "memory",
            "study.n_trials": 1,
            "study.pruner": "none",
            "baseline.scratch": False,
            "train.head": {"epochs": 1, "batch_size": 64, "patience": None},
            "train.finetune": {"epochs": 1, "batch_size": 64, "patience": None},
        }
    )
    cfg["data"] = {
        "source": "folder",
        "path": str(folder),
        "image_size": 224,
        "val_fraction": 0.1,
        "test_fraction": 0.1,
        "seed": 0,
    }
    cfg["model"] = {"weights": str(weights), "backbone_options": {"MobileNetV2": {"alpha": 0.35}}}
    cfg.pop("source", None)
    cfg["search"] = {
        "backbone": "MobileNetV2",
        "unfreeze_fraction": 0.1,
        "head_units": 0,
        "head_lr": 0.003,
        "finetune_lr": 0.0001,
        "dropout": 0.2,
        "pooling": "avg",
        "augment": False,
    }
    run = run_sweep(cfg, f"memory-{n_images}")
    run["folder"] = folder
    run["trial_peak"] = max(v for k, v in run["peaks"].items() if "spawn_main" in k[1])
    run["sweep_peak"] = max(v for k, v in run["peaks"].items() if "harness.sweep" in k[1])
    return run


def bench_memory(n_images: int) -> str:
    weights = Path(tempfile.gettempdir()) / "compute-mobilenetv2-224.weights.h5"
    if not weights.exists():  # a stand-in "pretrained" backbone at 224 px (ImageNet weights need internet)
        subprocess.run(
            [
                sys.executable,
                "-c",
                f"import sys; sys.path.insert(0, {str(ROOT)!r}); import keras; "
                "from harness.frameworks.keras.backbones import construct; keras.utils.set_random_seed(0); "
                f"construct('MobileNetV2', 224, None, {{'alpha': 0.35}}).save_weights({str(weights)!r})",
            ],
            check=True,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
        )
    sizes = (max(100, n_images // 10), n_images)
    runs = {n: memory_trial(n, weights) for n in sizes}
    passes = {}
    for label, cache_mib in (("streamed (memory_cache_mib 0)", 0), ("decoded into memory", 1e9)):
        script = PIPELINE_PASS.format(root=str(ROOT), folder=str(runs[n_images]["folder"]), cache_mib=cache_mib)
        out = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
        )
        if out.returncode != 0:
            raise SystemExit(out.stderr[-3000:])
        n, seconds, peak = out.stdout.split()[-3:]
        passes[label] = (int(n), float(seconds), float(peak))
        print(f"pipeline {label}: {passes[label]}", flush=True)
    rows = []
    for n, run in runs.items():
        t = run["trials"][0]
        decoded = n * 224 * 224 * 3 / 2**20
        train_mib = decoded * 0.8  # val_fraction and test_fraction 0.1 each
        rows.append(
            f"| {n:,} | {decoded:,.0f} | {'streams' if train_mib > 2048 else 'in memory'} | {run['trial_peak']:,.0f} | "
            f"{run['sweep_peak']:,.0f} | {t['wall_seconds']:.0f} (features {t.get('head/feature_seconds', 0):.0f}, "
            f"phase 2 {t.get('finetune/seconds', 0):.0f}) |"
        )
    return "\n".join(
        [
            f"## Memory: a trial on folders of {sizes[0]:,} and {n_images:,} images at 224 px",
            "",
            f"`python benchmarks/compute.py --sections memory --images {n_images}`: generated JPEGs (10 classes). A split "
            "that decodes to more than data.memory_cache_mib (default 2048 MiB) streams from disk. One trial each "
            "(MobileNetV2 alpha 0.35 at 224 px, phase 1 on cached features, then one epoch of phase 2 with the top 10% of "
            "blocks unfrozen, batch 64); resident memory of every process sampled every 0.2 s. Beside TensorFlow and the "
            "model at 224 px, a trial process holds the cached pooled features and, when they fit "
            "data.memory_cache_mib, the activations at phase 2's freeze boundary: both grow with the split.",
            "",
            "| images | whole folder decoded (MiB) | train split (80%) | trial process peak (MiB) | sweep process peak (MiB) "
            "| trial seconds |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"- One epoch of the {n_images:,}-image folder's train split through the image pipeline alone (no model), peak "
            "resident memory of the process: "
            + "; ".join(
                f"{label} {peak:,.0f} MiB ({n:,} images, {seconds:.0f} s)" for label, (n, seconds, peak) in passes.items()
            )
            + ".",
        ]
    )


# --- RESULTS.md ------------------------------------------------------------------------------------


def write_section(path: Path, name: str, text: str) -> None:
    """Replace (or append) the `<!-- compute:name -->` block of RESULTS.md."""
    begin, end = f"<!-- compute:{name} -->", f"<!-- /compute:{name} -->"
    block = f"{begin}\n{text}\n{end}"
    current = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    updated = pattern.sub(lambda _: block, current) if pattern.search(current) else current.rstrip() + "\n\n" + block + "\n"
    path.write_text(updated)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--trials", type=int, default=10, help="trials of the cache and pruning sweeps")
    parser.add_argument("--images", type=int, default=20000, help="images of the memory benchmark's folder")
    parser.add_argument("--feature-rows", type=int, default=400_000, help="pooled features of the features benchmark")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    stamp = f"Measured on {datetime.date.today().isoformat()} on {machine()}."
    for name in chosen:
        started = time.perf_counter()
        text = {
            "cache": lambda: bench_cache(args.trials),
            "pruning": lambda: bench_pruning(args.trials),
            "growth": bench_growth,
            "memory": lambda: bench_memory(args.images),
            "features": lambda: bench_features(args.feature_rows),
        }[name]()
        write_section(args.out, name, f"{text}\n\n{stamp} Section time: {time.perf_counter() - started:.0f} s.")
        print(f"wrote section {name} to {args.out}", flush=True)


if __name__ == "__main__":
    main()

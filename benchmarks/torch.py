"""The PyTorch path measured: the harness's torch trials against a plain loop, and Keras against torch per epoch.

Writes its section of benchmarks/RESULTS.md (between `<!-- compute:torch -->` markers, as
benchmarks/compute.py's sections, so benchmarks/engine.py keeps it), with the machine it ran on.
Both parts run on the CPU, on the builtin `shapes` data at 32 px (harness.data.load_dataset and
make_splits: the same images and splits on every side).

  trials   `--trials` trials of torchvision's VGG16 (random init: `model.weights: none`), the model of
           the classic answer: its `features` kept and frozen, a head nn.Sequential(Flatten,
           Linear(512, 256), ReLU, Linear(256, classes)) trained with Adam, then the top
           `unfreeze_blocks` of the five VGG blocks unfrozen and fine-tuned at a lower learning rate
           (`--epochs` epochs each phase, batch 32, no early stopping, no pruning). Two sides, each a
           fresh process timed end to end, one after the other:
             plain    the loop a user writes from the answer, inside Optuna (TPE sampler, seed 0) with
                      MLflow logging (a run per trial with its params and per-epoch metrics, a SQLite
                      store, as the harness's default);
             harness  `python -m harness.sweep bench.yaml` with the same search space, its study given
                      the plain loop's sampled parameters first (enqueued), so both run the same
                      trials; its best value read back through Optuna's API.
           Goal: the harness's seconds at most 1.0x the plain loop's, at an equal or better best value.
  epochs   Keras' MobileNetV2 (keras.applications, alpha 1.0) against torchvision's mobilenet_v2, random
           init, through the harness's own framework implementations (`framework_named(...)`: build,
           set_trainable, run_phase on image_batches of the same Dataset), batch 32: phase 1 (backbone
           frozen), then phase 2 (the top half of the blocks unfrozen), `--epoch-runs` epochs each.
           The first epoch of each phase (tracing, compiling) is reported apart from the steady ones.
           Each framework runs in a process of its own: one that imports TensorFlow before
           torchvision crashes.

`--threads N` gives every process that trains N CPU threads (OMP_NUM_THREADS, which the sweep's trial
process keeps with --workers 1); on a CPU shared with other work, torch's default threads (one per
core) wait on each other and its epochs slow down several times over. Each setting writes a section
of its own (`torch`, `torch_threads1`, ...).

    python benchmarks/torch.py [--trials 4] [--epochs 3] [--epoch-runs 4] [--threads 0] [--sections trials,epochs] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# This file is named torch.py: run as a script, its folder would come first on sys.path and
# `import torch` would import this file. The repository root takes its place.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

SECTIONS = ("trials", "epochs")
CLASSES = 6  # the builtin shapes target's classes
# The data of both parts: 20 training and 20 validation images per class (the trials); the epochs
# part trains on every training image of the split (120 a class) for steadier per-epoch times.
DATA = {
    "source": "builtin",
    "name": "shapes",
    "image_size": 32,
    "builtin_size": 200,
    "train_per_class": 20,
    "val_per_class": 20,
    "val_fraction": 0.2,
    "test_fraction": 0.2,
    "seed": 0,
}
EPOCH_DATA = {**DATA, "train_per_class": None}
BATCH = 32
HEAD_UNITS = 256
SPACE = {  # the search space of both sides, in the order the plain loop suggests them
    "head_lr": {"low": 1e-3, "high": 1e-2, "log": True},
    "finetune_lr": {"low": 1e-5, "high": 1e-3, "log": True},
    "unfreeze_blocks": {"low": 1, "high": 3},
}
# label -> the distributions that provide it (TensorFlow's CPU-only wheel is tensorflow-cpu)
VERSIONS = {
    "torch": ("torch",),
    "torchvision": ("torchvision",),
    "TensorFlow": ("tensorflow", "tensorflow-cpu"),
    "Keras": ("keras",),
    "Optuna": ("optuna",),
    "MLflow": ("mlflow",),
}

# --- the plain loop: what a user writes from the answer ----------------------------------------------

PLAIN_LOOP = """
import json, sys, time
started = time.perf_counter()
sys.path.insert(0, {root!r})
import mlflow, numpy as np, optuna, torch, torchvision
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from harness.config import DataConfig
from harness.data import load_dataset, make_splits

optuna.logging.set_verbosity(optuna.logging.WARNING)
data_cfg = DataConfig(**{data!r})
dataset = load_dataset(data_cfg)
splits = make_splits(dataset.labels, data_cfg)
mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

def tensors(indices):
    x = torch.from_numpy(dataset.images[indices]).permute(0, 3, 1, 2).float() / 255
    return TensorDataset((x - mean) / std, torch.from_numpy(dataset.labels[indices]))

train_set, val_set = tensors(splits.train), tensors(splits.val)
mlflow.set_tracking_uri("sqlite:///mlflow.db")
mlflow.set_experiment("plain")
loss_fn = nn.CrossEntropyLoss()

def run_epoch(model, loader, optimizer=None, frozen=None):
    model.train(optimizer is not None)
    if frozen is not None:
        frozen.eval()  # frozen layers stay in inference mode
    total, correct, loss_sum = 0, 0, 0.0
    with torch.set_grad_enabled(optimizer is not None):
        for x, y in loader:
            out = model(x)
            loss = loss_fn(out, y)
            if optimizer is not None:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            loss_sum += loss.item() * len(y)
            correct += (out.argmax(1) == y).sum().item()
            total += len(y)
    return loss_sum / total, correct / total

def objective(trial):
    head_lr = trial.suggest_float("head_lr", {head_lr[low]}, {head_lr[high]}, log=True)
    finetune_lr = trial.suggest_float("finetune_lr", {finetune_lr[low]}, {finetune_lr[high]}, log=True)
    unfreeze_blocks = trial.suggest_int("unfreeze_blocks", {unfreeze_blocks[low]}, {unfreeze_blocks[high]})
    torch.manual_seed(trial.number)
    features = torchvision.models.vgg16(weights=None).features
    head = nn.Sequential(nn.Flatten(), nn.Linear(512, {units}), nn.ReLU(), nn.Linear({units}, {classes}))
    model = nn.Sequential(features, head)
    generator = torch.Generator().manual_seed(trial.number)
    train = DataLoader(train_set, batch_size={batch}, shuffle=True, generator=generator)
    val = DataLoader(val_set, batch_size={batch})
    best, step = 0.0, 0
    train_started = time.perf_counter()
    with mlflow.start_run(run_name=f"trial-{{trial.number}}"):
        mlflow.log_params(trial.params)

        def fit(optimizer, epochs, frozen):
            nonlocal best, step
            for _ in range(epochs):
                loss, acc = run_epoch(model, train, optimizer, frozen)
                val_loss, val_acc = run_epoch(model, val)
                mlflow.log_metrics(dict(loss=loss, accuracy=acc, val_loss=val_loss, val_accuracy=val_acc), step=step)
                trial.report(val_acc, step)
                best, step = max(best, val_acc), step + 1

        features.requires_grad_(False)  # phase 1: the head alone
        fit(torch.optim.Adam(head.parameters(), lr=head_lr), {epochs}, features)
        # phase 2: the top blocks of features (each VGG block ends at its MaxPool2d) at a lower rate
        pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
        start = pools[-unfreeze_blocks - 1] + 1
        features[start:].requires_grad_(True)
        trainable = [p for p in model.parameters() if p.requires_grad]
        fit(torch.optim.Adam(trainable, lr=finetune_lr), {epochs}, features[:start])
        trial.set_user_attr("train_seconds", time.perf_counter() - train_started)  # the benchmark's own measure
        mlflow.log_metric("best_val_accuracy", best)
    return best

study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=0))
study.optimize(objective, n_trials={n_trials})
print(json.dumps(dict(
    params=[t.params for t in study.trials],
    values=[t.value for t in study.trials],
    seconds=[t.duration.total_seconds() for t in study.trials],
    train_seconds=[t.user_attrs["train_seconds"] for t in study.trials],
    best=study.best_value,
    threads=torch.get_num_threads(),
    in_process=time.perf_counter() - started,
)))
"""


def run_plain(work: Path, n_trials: int, epochs: int) -> dict:
    script = work / "plain.py"
    script.write_text(
        PLAIN_LOOP.format(
            root=str(ROOT), data=DATA, units=HEAD_UNITS, classes=CLASSES, batch=BATCH, epochs=epochs, n_trials=n_trials, **SPACE
        )
    )
    started = time.perf_counter()
    out = subprocess.run([sys.executable, str(script)], cwd=work, capture_output=True, text=True, env=clean_env())
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"plain loop failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall": wall}


# --- the harness's side: the real command ------------------------------------------------------------


def sweep_config(n_trials: int, epochs: int) -> dict:
    phase = {"epochs": epochs, "batch_size": BATCH, "patience": None}
    return {
        "study": {"name": "bench-torch", "n_trials": n_trials, "seed": 0, "pruner": "none"},
        "data": DATA,
        "model": {"weights": "none"},
        "search": {
            "backbone": "torchvision/vgg16",
            **SPACE,
            "head_units": HEAD_UNITS,
            "dropout": 0.0,
            "pooling": "avg",
            "augment": False,
        },
        "train": {"head": phase, "finetune": phase},
        "baseline": {"scratch": False},
    }


def run_harness(work: Path, n_trials: int, epochs: int, trials: list[dict]) -> dict:
    """Enqueue the plain loop's parameter sets in the study's storage first, so the sweep runs exactly them."""
    import optuna
    import yaml

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = work / "bench.yaml"
    config.write_text(yaml.safe_dump(sweep_config(n_trials, epochs), sort_keys=False))
    storage = f"sqlite:///{work}/results/bench-torch/optuna.db"
    (work / "results" / "bench-torch").mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="bench-torch", storage=storage, direction="maximize", load_if_exists=True)
    for params in trials:
        study.enqueue_trial(params)
    command = [sys.executable, "-m", "harness.sweep", config.name]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=work, capture_output=True, text=True, env={**clean_env(), "PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - started
    (work / "sweep.log").write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise SystemExit(f"`{' '.join(command)}` in {work} failed (exit {out.returncode}):\n{out.stderr[-4000:]}")
    done = optuna.load_study(study_name="bench-torch", storage=storage)
    complete = [t for t in done.trials if t.state == optuna.trial.TrialState.COMPLETE]
    ran = [{k: t.params[k] for k in SPACE} for t in complete]
    assert sorted(map(str, ran)) == sorted(map(str, trials)), f"the sweep ran {ran}, not the enqueued {trials}"
    return {
        "params": ran,
        "values": [t.value for t in complete],
        "seconds": [t.duration.total_seconds() for t in complete],
        "train_seconds": [training_seconds(work, t.number) for t in complete],
        "best": done.best_value,
        "wall": wall,
        "log": str(work / "sweep.log"),
    }


def training_seconds(work: Path, number: int) -> float:
    """A harness trial's training seconds, both phases (its run's logged head/ and finetune/seconds)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work}/results/mlflow.db")
    experiment = client.get_experiment_by_name("bench-torch")
    assert experiment is not None, "the sweep wrote no MLflow experiment"
    query = f"tags.`harness.role` = 'trial' and tags.`optuna.trial_number` = '{number}'"
    (run,) = client.search_runs([experiment.experiment_id], query)
    return run.data.metrics["head/seconds"] + run.data.metrics.get("finetune/seconds", 0.0)


def clean_env() -> dict:
    """This environment without a tracking server of its own: each side writes to its temp folder."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "TF_CPP_MIN_LOG_LEVEL": "3"}


def bench_trials(n_trials: int, epochs: int, flag: str = "") -> str:
    work = Path(tempfile.mkdtemp(prefix="bench-torch-"))
    (work / "plain").mkdir()
    (work / "harness").mkdir()
    plain = run_plain(work / "plain", n_trials, epochs)
    print(f"plain loop: {plain['wall']:.1f} s, best {plain['best']:.4f}", flush=True)
    trials = [{k: p[k] for k in SPACE} for p in plain["params"]]
    harness = run_harness(work / "harness", n_trials, epochs, trials)
    print(f"harness: {harness['wall']:.1f} s, best {harness['best']:.4f} (log: {harness['log']})", flush=True)
    keys = ("values", "seconds", "train_seconds")
    by_params = {str(p): found for p, *found in zip(harness["params"], *(harness[k] for k in keys))}
    rows = []
    for n, (p, *found) in enumerate(zip(trials, *(plain[k] for k in keys))):
        (value, seconds, training), (h_value, h_seconds, h_training) = found, by_params[str(p)]
        rows.append(
            f"| {n} | {p['head_lr']:.2e} | {p['finetune_lr']:.2e} | {p['unfreeze_blocks']} | {value:.4f} | {h_value:.4f} "
            f"| {seconds:.1f} | {h_seconds:.1f} | {training:.1f} | {h_training:.1f} |"
        )
    ratio = harness["wall"] / plain["wall"]
    delta = harness["best"] - plain["best"]
    met = ratio <= 1.0 and delta >= 0
    sides = [
        f"| {label} | {r['wall']:.1f} | {sum(r['seconds']):.1f} | {sum(r['train_seconds']):.1f} | {r['best']:.4f} |"
        for label, r in (("plain loop", plain), ("harness", harness))
    ]
    near_chance = (
        f": with random-init weights and {2 * epochs} epochs both best values are below twice chance, so they show that "
        "both routines ran the same trials, not which makes the better model"
        if max(plain["best"], harness["best"]) < 2 / CLASSES
        else ""
    )
    outside = {label: r["wall"] - sum(r["seconds"]) for label, r in (("plain", plain), ("harness", harness))}
    return "\n".join(
        [
            f"### Harness trials against a plain PyTorch loop in Optuna and MLflow: VGG16, {n_trials} trials of "
            f"{epochs} + {epochs} epochs",
            "",
            f"`python benchmarks/torch.py --sections trials --trials {n_trials} --epochs {epochs}{flag}`: torchvision's VGG16 "
            "(random init, `model.weights: none`) with the classic answer's head, Flatten, Linear(512, 256), ReLU, "
            "Linear(256, 6), on the builtin shapes target (6 classes, 20 training and 20 validation images a class, "
            "32 px), batch 32, no early stopping, no pruning. The plain loop is the answer's routine as a user writes "
            "it, inside Optuna (TPE, seed 0) with MLflow logging (a run per trial, its params and per-epoch metrics, a "
            "SQLite store); the harness is `python -m harness.sweep` with the same search space (head_lr, finetune_lr, "
            "unfreeze_blocks of the five VGG blocks) and the plain loop's sampled parameters enqueued, so both ran the "
            "same trials. Wall seconds are each process end to end (imports included), one after the other; a trial's "
            "seconds are Optuna's duration, its training seconds both phases' epochs (training and validation: the "
            "plain loop's own clock, the harness's logged head/ and finetune/seconds).",
            "",
            "| trial | head_lr | finetune_lr | unfreeze_blocks | val_accuracy, plain | harness | trial s, plain | harness "
            "| of which training s, plain | harness |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "| side | wall seconds | in trials | of which training | best val_accuracy |",
            "|---|---|---|---|---|",
            *sides,
            "",
            f"- Harness against the plain loop: **{ratio:.2f}x** the time, best value **{delta:+.4f}** "
            f"(goal: at most 1.0x at an equal or better best value: {'met' if met else 'not met'}). Chance (6 balanced "
            f"classes) is {1 / CLASSES:.4f}. torch's threads in the plain loop: {plain['threads']}.",
            f"- Outside the trials: plain {outside['plain']:.1f} s (imports, data, the study and the MLflow store), harness "
            f"{outside['harness']:.1f} s (the same, and its preflight, a warm trial process started, the winner "
            "registered, reloaded and tested on the held-out split, the study's plots, fANOVA importances and summary).",
            "- What else differs: the harness logs each run's resolved config, datasets, epoch curves, system metrics "
            "(every 10 s) and the model of each trial that leads when it ends (MLflow's PyTorch flavour, VGG16's "
            "features are 59 MB), and keeps the best epoch's weights; its head is initialised as Keras' Dense (Glorot "
            "uniform), the plain one as torch's Linear default, and it normalises uint8 batches inside the model where "
            "the plain loop normalises once up front. Different initialisations and batch orders give the same trial "
            f"different values{near_chance}.",
        ]
    )


# --- Keras against torch per epoch ---------------------------------------------------------------------


def measure_epochs(framework: str, epochs: int, threads: int) -> dict:
    """In this process (one framework only): MobileNetV2's seconds per epoch in both phases."""
    started = time.perf_counter()
    from harness.config import DataConfig, TrainConfig
    from harness.data import load_dataset, make_splits
    from harness.frameworks import framework_named
    from harness.frameworks.base import ModelSpec, PhaseData, PhaseRun
    from harness.phases import Phase, blocks_to_unfreeze

    fw = framework_named(framework)
    fw.start_trial_process(threads, None)  # as a trial process starts: 0 = the framework's default
    fw.prepare_process(TrainConfig())
    imported = time.perf_counter() - started
    data_cfg = DataConfig(**EPOCH_DATA)
    dataset = load_dataset(data_cfg)
    splits = make_splits(dataset.labels, data_cfg)
    backbone, options = ("MobileNetV2", {"alpha": 1.0}) if framework == "keras" else ("torchvision/mobilenet_v2", {})
    fw.seed(0)
    spec = ModelSpec(backbone, 32, dataset.num_classes, None, options)
    model = fw.build(spec, seed=0)
    train = fw.image_batches(dataset, splits.train, BATCH, shuffle=True, seed=0)
    val = fw.image_batches(dataset, splits.val, BATCH, shuffle=False)
    phases = [Phase("head", epochs, 1e-3, 0), Phase("finetune", epochs, 1e-4, blocks_to_unfreeze(model.n_blocks, 0.5))]
    out: dict = {"framework": framework, "imported_s": imported, "blocks": model.n_blocks, "phases": {}}
    for n, phase in enumerate(phases):
        trainable, total = fw.set_trainable(model, phase.unfreeze_blocks)
        marks = [time.perf_counter()]  # the phase's start, then each epoch's end

        def on_epoch(record, marks=marks):
            marks.append(time.perf_counter())

        fw.run_phase(model, phase, PhaseData(train, val), PhaseRun(n * epochs, on_epoch))
        seconds = [b - a for a, b in zip(marks, marks[1:])]
        out["phases"][phase.name] = {"unfreeze": phase.unfreeze_blocks, "trainable": trainable, "total": total, "s": seconds}
    if framework == "keras":
        import keras
        import tensorflow as tf

        out["backend"] = keras.backend.backend()
        out["threads"] = tf.config.threading.get_intra_op_parallelism_threads() or "default"
    else:
        import torch

        out["threads"] = torch.get_num_threads()
    out["images"] = (len(splits.train), len(splits.val))
    return out


def run_measure(framework: str, epochs: int, threads: int) -> dict:
    script = str(Path(__file__).resolve())
    command = [sys.executable, script, "--measure-epochs", framework, "--epoch-runs", str(epochs), "--threads", str(threads)]
    started = time.perf_counter()
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=clean_env())
    if out.returncode != 0:
        raise SystemExit(f"{framework}'s epochs failed:\n{out.stderr[-3000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - started}


def bench_epochs(epochs: int, threads: int, flag: str = "") -> str:
    runs = {name: run_measure(name, epochs, threads) for name in ("keras", "torch")}
    for name, r in runs.items():
        print(f"{name}: " + json.dumps(r["phases"]), flush=True)
    labels = {"keras": "Keras MobileNetV2 (alpha 1.0)", "torch": "torchvision/mobilenet_v2"}
    rows, steady = [], {}
    for name, r in runs.items():
        for phase, p in r["phases"].items():
            rest = p["s"][1:]
            steady[name, phase] = statistics.mean(rest) if rest else float("nan")
            what = "1: frozen" if phase == "head" else f"2: top {p['unfreeze']} of {r['blocks']} blocks"
            rows.append(
                f"| {labels[name]} | {what} | {p['trainable']:,} of {p['total']:,} | {p['s'][0]:.2f} "
                f"| {steady[name, phase]:.2f} | {', '.join(f'{s:.2f}' for s in rest)} |"
            )
    n_train, n_val = runs["torch"]["images"]
    ratios = ", ".join(
        f"phase {1 if phase == 'head' else 2} {steady['torch', phase] / steady['keras', phase]:.2f}x"
        for phase in ("head", "finetune")
    )
    return "\n".join(
        [
            "### Keras against torch, seconds per epoch: MobileNetV2",
            "",
            f"`python benchmarks/torch.py --sections epochs --epoch-runs {epochs}{flag}`: the harness's own framework "
            "implementations (`harness.frameworks.framework_named`: build, set_trainable, run_phase), random init, "
            f"the same {n_train} training and {n_val} validation images of the builtin shapes target (32 px), batch 32; "
            f"{epochs} epochs of phase 1 (backbone frozen, Adam 1e-3), then {epochs} of phase 2 (the top half of the "
            "blocks unfrozen, Adam 1e-4), each framework in a process of its own. An epoch is one pass over the "
            "training images and the validation; the first epoch of each phase holds the tracing (Keras: "
            f"{runs['keras'].get('backend', '?')} backend, graph mode, no XLA on a CPU) and is shown apart.",
            "",
            "| model | phase | trainable of all parameters | first epoch s | steady epoch s (mean) | steady epochs s |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"- Steady epochs, torch against Keras: {ratios} (below 1: torch is faster). Import and set-up before the "
            f"first model: Keras {runs['keras']['imported_s']:.1f} s, torch {runs['torch']['imported_s']:.1f} s; "
            f"each process end to end: Keras {runs['keras']['process_s']:.1f} s, torch {runs['torch']['process_s']:.1f} s. "
            f"CPU threads: TensorFlow intra-op {runs['keras']['threads']}, torch {runs['torch']['threads']}.",
        ]
    )


# --- RESULTS.md ----------------------------------------------------------------------------------------


def versions() -> str:
    found = []
    for label, distributions in VERSIONS.items():
        installed = []
        for distribution in distributions:
            try:
                installed.append(metadata.version(distribution))
            except metadata.PackageNotFoundError:
                pass
        found.append(f"{label} {installed[0] if installed else 'not installed'}")
    return ", ".join(found)


def load_note(before: tuple[float, ...], after: tuple[float, ...], threads: int) -> str:
    """Whether other work shared the machine: the load average before and after (1-minute, 5-minute)."""
    cores = os.cpu_count() or 1
    shared = before[0] > 0.5 or before[1] > 0.5
    return (
        f"{'The machine was shared with other work while it ran' if shared else 'The machine was otherwise idle'}: "
        f"load average {before[0]:.1f} (1 min) / {before[1]:.1f} (5 min) before, {after[0]:.1f} / {after[1]:.1f} after, "
        f"on {cores} cores (this benchmark alone keeps about {min(cores, threads or cores)} busy)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated, of {', '.join(SECTIONS)}")
    parser.add_argument("--trials", type=int, default=4, help="trials of each side (the trials part)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each phase of a trial (the trials part)")
    parser.add_argument("--epoch-runs", type=int, default=4, help="epochs of each phase (the epochs part)")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads of every process that trains (OMP_NUM_THREADS for torch, the harness's thread cap for both "
        "frameworks in the epochs part); 0: each framework's default, one per core",
    )
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--measure-epochs", choices=("keras", "torch"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.measure_epochs:
        print(json.dumps(measure_epochs(args.measure_epochs, args.epoch_runs, args.threads)))
        return
    if args.epoch_runs < 2:
        parser.error("--epoch-runs: at least 2 (the first epoch is reported apart from the steady ones)")
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"--sections: unknown {', '.join(unknown)}; valid: {', '.join(SECTIONS)}")
    from benchmarks.compute import write_section
    from benchmarks.engine import machine

    if args.threads:  # every child inherits it: the plain loop, the sweep and its trial processes, the epochs' processes
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    threads = f" --threads {args.threads}" if args.threads else ""
    load_before, started = os.getloadavg(), time.perf_counter()
    parts = []
    if "trials" in chosen:
        parts.append(bench_trials(args.trials, args.epochs, threads))
    if "epochs" in chosen:
        parts.append(bench_epochs(args.epoch_runs, args.threads, threads))
    head = (
        "## PyTorch: the harness's torch trials against a plain loop, and Keras against torch per epoch (CPU)\n\n"
        f"`python benchmarks/torch.py --sections {','.join(chosen)} --trials {args.trials} --epochs {args.epochs} "
        f"--epoch-runs {args.epoch_runs}{threads}`. "
        + (
            f"Every process that trains uses {args.threads} CPU thread(s) (OMP_NUM_THREADS={args.threads}, inherited by "
            "the sweep's trial process, which keeps torch's default with --workers 1; the harness's thread cap in the "
            "epochs part, for TensorFlow's intra-op threads too)."
            if args.threads
            else "Every process that trains uses each framework's default threads, one per core."
        )
    )
    stamp = (
        f"Measured on {datetime.date.today().isoformat()} on {machine()}; {versions()}. "
        f"{load_note(load_before, os.getloadavg(), args.threads)} Section time: {time.perf_counter() - started:.0f} s."
    )
    text = "\n\n".join([head, *parts, stamp])
    name = "torch" if not args.threads else f"torch_threads{args.threads}"  # one section per thread setting
    write_section(args.out, name, text)
    print(text)
    print(f"wrote section {name} to {args.out}", flush=True)


if __name__ == "__main__":
    main()

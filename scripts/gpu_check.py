"""The GPU check's sweep and its read-back (scripts/gpu_check.sh runs this in the check's venv).

    python scripts/gpu_check.py run sweeps/gpu-check.yaml --workdir DIR --timeout 360 [--smoke] [--set KEY=VALUE ...]
    python scripts/gpu_check.py report --workdir DIR

`run` writes the config (with any --set, or the small CPU copy of --smoke) into DIR, runs
`python -m harness.sweep` there with --workers auto while it samples GPU memory through NVML every
half second, stops the sweep past --timeout seconds (SIGINT as Ctrl-C does, then SIGKILL a minute
later), and reports. `report` prints the same from DIR's stores again.

Where the figures come from:
- trials finished: the Optuna study (complete + pruned, as the harness counts them; failed apart);
- images per second: each trial run's `<phase>/epochs` x its training split's size (its MLflow
  dataset input) / `<phase>/seconds` (the phase's wall time, validation included, set-up and
  cached features not);
- peak GPU memory per worker (trial process): NVML's memory of each process, sampled here (what the
  process holds: CUDA context and torch's cached blocks); where NVML names no processes (some
  containers), the peak of the worker's whole GPU. Beside it, the highest `system/gpu_<i>_memory_usage_megabytes`
  that MLflow's system metrics logged in the worker's trial runs (device-wide, one-second means).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

MIB = 2**20
STOP_GRACE_SECONDS = 60  # after SIGINT, how long the sweep has to end its runs before SIGKILL
SAMPLE_SECONDS = 0.5  # NVML sampling interval
# The small CPU copy (--smoke): the same sweep at a size two CPU cores run in under a minute.
SMOKE = {
    "study.n_trials": 1,
    "study.timeout": None,
    "data.image_size": 64,
    "data.builtin_size": 20,
    "train.head.epochs": 1,
    "train.finetune.epochs": 1,
    "train.head.batch_size": 32,
    "train.finetune.batch_size": 32,
    "train.mixed_precision": "auto",  # `on` is refused where no GPU is visible
    "train.jit_compile": "auto",
}


# --- the config ----------------------------------------------------------------------------------


def with_overrides(config: dict, overrides: dict) -> dict:
    """`config` with dotted keys set (`train.head.epochs`), nested blocks made as needed."""
    for dotted, value in overrides.items():
        *path, last = dotted.split(".")
        block = config
        for key in path:
            if not isinstance(block.get(key), dict):  # absent, or an empty block (`train:`)
                block[key] = {}
            block = block[key]
        block[last] = value
    return config


def parse_sets(sets: list[str]) -> dict:
    """--set KEY=VALUE pairs, each VALUE read as YAML (on, 3, 1e-3, null)."""
    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"gpu_check: --set {item}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def write_config(source: Path, workdir: Path, overrides: dict) -> Path:
    config = with_overrides(yaml.safe_load(source.read_text()) or {}, overrides)
    path = workdir / "gpu-check.yaml"
    path.write_text(f"# {source} with {overrides or 'no changes'}\n" + yaml.safe_dump(config, sort_keys=False))
    return path


# --- GPU memory, sampled through NVML --------------------------------------------------------------


class GpuSampler(threading.Thread):
    """Peak memory of every GPU, and of every process on one, until `stop()`."""

    def __init__(self):
        super().__init__(name="gpu-sampler", daemon=True)
        self.gpus: list[dict] = []  # index, name, total_mib, before_mib, peak_mib
        self.processes: dict[int, dict] = {}  # pid -> {gpu, peak_mib}
        self.samples = 0
        self.error: str | None = None
        self._done = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                name = pynvml.nvmlDeviceGetName(handle)
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                self.gpus.append(
                    {
                        "index": i,
                        "name": name.decode() if isinstance(name, bytes) else name,
                        "total_mib": memory.total / MIB,
                        "before_mib": memory.used / MIB,
                        "peak_mib": memory.used / MIB,
                        "handle": handle,
                    }
                )
        except Exception as exc:  # noqa: BLE001 - no NVML (a CPU box, no nvidia-ml-py): nothing to sample
            self.nvml = None
            self.error = f"{type(exc).__name__}: {exc}"

    def run(self) -> None:
        while self.nvml is not None and not self._done.is_set():
            self.sample()
            self._done.wait(SAMPLE_SECONDS)

    def sample(self) -> None:
        nvml = self.nvml
        for gpu in self.gpus:
            try:
                gpu["peak_mib"] = max(gpu["peak_mib"], nvml.nvmlDeviceGetMemoryInfo(gpu["handle"]).used / MIB)
                for p in nvml.nvmlDeviceGetComputeRunningProcesses(gpu["handle"]):
                    used = p.usedGpuMemory
                    if used is None:  # not reported (some virtualised GPUs)
                        continue
                    seen = self.processes.setdefault(p.pid, {"gpu": gpu["index"], "peak_mib": 0.0})
                    seen["peak_mib"] = max(seen["peak_mib"], used / MIB)
            except nvml.NVMLError as exc:
                self.error = f"NVMLError: {exc}"
        self.samples += 1

    def stop(self) -> dict:
        self._done.set()
        if self.is_alive():
            self.join()
        return {
            "source": "NVML" if self.nvml is not None else None,
            "error": self.error,
            "samples": self.samples,
            "gpus": [{k: v for k, v in g.items() if k != "handle"} for g in self.gpus],
            "processes": {str(pid): p for pid, p in self.processes.items()},
        }


# --- the sweep -----------------------------------------------------------------------------------


def run_sweep(config: Path, workdir: Path, timeout: float) -> dict:
    """Run the sweep in `workdir`, its output shown and kept in sweep.log; what happened."""
    tracking = f"sqlite:///{workdir / 'results' / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "harness.sweep", str(config), "--workers", "auto", "--tracking-uri", tracking]
    print("$ " + " ".join(cmd), flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    sampler = GpuSampler()
    sampler.start()
    started = time.monotonic()
    # A session of its own: the stop signal goes to the sweep and its trial processes, as Ctrl-C does.
    proc = subprocess.Popen(
        cmd, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    copier = threading.Thread(target=_copy_output, args=(proc, workdir / "sweep.log"), daemon=True)
    copier.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        print(f"\ngpu_check: the sweep ran past {timeout:.0f} s: stopping it (SIGINT)", flush=True)
        _signal_group(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            print(f"gpu_check: still running {STOP_GRACE_SECONDS} s later: SIGKILL", flush=True)
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    seconds = time.monotonic() - started
    copier.join(timeout=5)
    run = {"exit": proc.returncode, "timed_out": timed_out, "seconds": seconds, "sweep_pid": proc.pid, "gpu": sampler.stop()}
    (workdir / "gpu-check.json").write_text(json.dumps(run, indent=1))
    return run


def _copy_output(proc: subprocess.Popen, log: Path) -> None:
    assert proc.stdout is not None
    with open(log, "w") as out:
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            out.write(line)


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


# --- reading back --------------------------------------------------------------------------------


def trials_of(workdir: Path, study_name: str) -> list:
    import optuna

    from harness.study import default_storage_path

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    path = default_storage_path(study_name, str(workdir / "results"))
    if not path.exists():
        return []
    return optuna.load_study(study_name=study_name, storage=f"sqlite:///{path}").trials


def trial_runs(workdir: Path, study_name: str) -> dict[int, dict]:
    """Trial number -> what its MLflow run logged that the check reads."""
    from mlflow import MlflowClient

    from harness.tracking import ROLE, TRIAL_TAG

    db = workdir / "results" / "mlflow.db"
    if not db.exists():
        return {}
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name(study_name)
    if experiment is None:
        return {}
    out = {}
    for run in client.search_runs([experiment.experiment_id], filter_string=f"tags.`{ROLE}` = 'trial'", max_results=10_000):
        number = run.data.tags.get(TRIAL_TAG, "")
        if not number.isdigit():
            continue
        gpu_memory = {}
        for key in run.data.metrics:
            if key.startswith("system/gpu_") and key.endswith("_memory_usage_megabytes"):
                index = int(key[len("system/gpu_") : -len("_memory_usage_megabytes")])
                history = client.get_metric_history(run.info.run_id, key)
                gpu_memory[index] = max(m.value for m in history) * 1e6 / MIB
        out[int(number)] = {
            "metrics": run.data.metrics,
            "train_images": _split_size(run, "train"),
            "gpu_memory_mib": gpu_memory,  # GPU index -> highest device-wide use logged
            "status": run.info.status,
        }
    return out


def _split_size(run, context: str) -> int | None:
    for item in run.inputs.dataset_inputs:
        tags = {t.key: t.value for t in item.tags}
        if tags.get("mlflow.data.context") == context and str(tags.get("images", "")).isdigit():
            return int(tags["images"])
    return None


def images_per_second(run: dict, phase: str) -> float | None:
    """Training images per second of one phase of a trial run: its epochs over the training split,
    over its seconds."""
    metrics, train_images = run.get("metrics", {}), run.get("train_images")
    epochs, seconds = metrics.get(f"{phase}/epochs"), metrics.get(f"{phase}/seconds")
    if not train_images or not epochs or not seconds:
        return None
    return epochs * train_images / seconds


# --- the report ----------------------------------------------------------------------------------


def report(workdir: Path, study_name: str, run: dict | None = None) -> int:
    """Print the check's figures, and keep them in DIR/report.txt; 0 when at least one trial
    finished and the sweep ended by itself."""
    trials = trials_of(workdir, study_name)
    runs = trial_runs(workdir, study_name)
    run = run or _saved_run(workdir)
    gpu = (run or {}).get("gpu") or {}
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        print(f"=== GPU check: study {study_name} in {workdir}")
        print_gpus(gpu)
        print_trials(trials, runs)
        workers = worker_rows(trials, runs, gpu, (run or {}).get("sweep_pid"))
        print_workers(workers, gpu)
        code = print_summary(trials, runs, run, workers)
    (workdir / "report.txt").write_text(text.getvalue())
    print("\n" + text.getvalue(), end="")
    return code


def _saved_run(workdir: Path) -> dict | None:
    path = workdir / "gpu-check.json"
    return json.loads(path.read_text()) if path.exists() else None


def print_gpus(gpu: dict) -> None:
    if not gpu.get("gpus"):
        print(f"GPUs: none sampled ({gpu.get('error') or 'no NVML'})")
        return
    print(f"GPUs (NVML, {gpu['samples']} samples every {SAMPLE_SECONDS} s):")
    print(f"  {'gpu':>3}  {'name':<28} {'total MiB':>10} {'before MiB':>11} {'peak MiB':>9}")
    for g in gpu["gpus"]:
        memory = f"{g['total_mib']:>10,.0f} {g['before_mib']:>11,.0f} {g['peak_mib']:>9,.0f}"
        print(f"  {g['index']:>3}  {g['name'][:28]:<28} {memory}")


def _fmt(value, spec: str = ",.0f", width: int = 8) -> str:
    return f"{value:>{width}{spec}}" if value is not None else f"{'-':>{width}}"


def print_trials(trials: list, runs: dict[int, dict]) -> None:
    print("trials (images/s: training images per second of the phase's wall time, validation included):")
    print(
        f"  {'#':>3} {'state':<8} {'worker':<22} {'unfreeze':>8} {'head s':>7} {'head img/s':>10} "
        f"{'ft s':>7} {'ft img/s':>9} {'val_acc':>7} {'MLflow GPU MiB':>14}"
    )
    for t in trials:
        r = runs.get(t.number, {})
        m = r.get("metrics", {})
        gpu_mib = max(r.get("gpu_memory_mib", {}).values(), default=None)
        head = f"{_fmt(m.get('head/seconds'), '.1f', 7)} {_fmt(images_per_second(r, 'head'), ',.0f', 10)}"
        finetune = f"{_fmt(m.get('finetune/seconds'), '.1f', 7)} {_fmt(images_per_second(r, 'finetune'), ',.0f', 9)}"
        print(
            f"  {t.number:>3} {t.state.name:<8} {str(t.user_attrs.get('worker', '-')):<22} "
            f"{_fmt(t.params.get('unfreeze_fraction'), '.2f')} {head} {finetune} {_fmt(t.value, '.3f', 7)} "
            f"{_fmt(gpu_mib, ',.0f', 14)}"
        )


def worker_rows(trials: list, runs: dict[int, dict], gpu: dict, sweep_pid: int | None) -> list[dict]:
    """One row per process that ran trials (and the sweep process where NVML saw it on a GPU)."""
    processes = {int(pid): p for pid, p in (gpu.get("processes") or {}).items()}
    by_worker: dict[str, list] = {}
    for t in trials:
        if "worker" in t.user_attrs:  # a trial waiting to run again has none
            by_worker.setdefault(str(t.user_attrs["worker"]), []).append(t)
    rows = []
    for worker, mine in sorted(by_worker.items()):
        pid = worker.rpartition(":")[2]
        seen = processes.get(int(pid)) if pid.isdigit() else None
        index = seen["gpu"] if seen else (0 if len(gpu.get("gpus") or []) == 1 else None)
        logged = [runs.get(t.number, {}).get("gpu_memory_mib", {}) for t in mine]
        mlflow_peak = max((v for g in logged for i, v in g.items() if index is None or i == index), default=None)
        device_peak = next((g["peak_mib"] for g in gpu.get("gpus") or [] if g["index"] == index), None)
        rows.append(
            {
                "process": worker,
                "gpu": index,
                "trials": len(mine),
                "peak_mib": seen["peak_mib"] if seen else None,
                "device_peak_mib": device_peak,
                "mlflow_peak_mib": mlflow_peak,
            }
        )
    if sweep_pid is not None and sweep_pid in processes:  # the sweep process should hold no GPU memory
        seen = processes[sweep_pid]
        rows.append({"process": f"sweep process {sweep_pid}", "gpu": seen["gpu"], "trials": 0, "peak_mib": seen["peak_mib"]})
    return rows


def print_workers(rows: list[dict], gpu: dict) -> None:
    print("peak GPU memory per worker (trial process):")
    print(f"  {'process':<26} {'gpu':>3} {'trials':>6} {'NVML MiB':>9} {'GPU peak MiB':>12} {'MLflow MiB':>10}")
    for r in rows:
        print(
            f"  {r['process']:<26} {_fmt(r['gpu'], 'd', 3)} {r['trials']:>6} {_fmt(r['peak_mib'], ',.0f', 9)} "
            f"{_fmt(r.get('device_peak_mib'), ',.0f', 12)} {_fmt(r.get('mlflow_peak_mib'), ',.0f', 10)}"
        )
    if gpu.get("gpus") and not gpu.get("processes"):
        print("  (NVML named no processes here: the GPU peak is the whole GPU's, the worker's included)")


def print_summary(trials: list, runs: dict[int, dict], run: dict | None, workers: list[dict]) -> int:
    states = [t.state.name for t in trials]
    complete, pruned, failed = states.count("COMPLETE"), states.count("PRUNED"), states.count("FAIL")
    running = len(trials) - complete - pruned - failed
    print(f"trials finished: {complete + pruned} ({complete} complete, {pruned} pruned); failed {failed}; other {running}")
    for phase, label in (("head", "phase 1, backbone frozen"), ("finetune", "phase 2, top blocks unfrozen")):
        complete_runs = [runs.get(t.number, {}) for t in trials if t.state.name == "COMPLETE"]
        rates = [x for r in complete_runs if (x := images_per_second(r, phase)) is not None]
        if rates:
            print(
                f"images per second, {phase} ({label}): median {statistics.median(rates):,.0f} per worker "
                f"(min {min(rates):,.0f}, max {max(rates):,.0f}, {len(rates)} trials)"
            )
        else:
            print(f"images per second, {phase}: no complete trial logged it")
    peaks = [r["peak_mib"] or r.get("device_peak_mib") for r in workers if r["trials"]]
    if any(p is not None for p in peaks):
        print(f"peak GPU memory per worker: {', '.join('-' if p is None else f'{p:,.0f} MiB' for p in peaks)}")
    if run is not None:
        ending = "stopped at the time limit" if run["timed_out"] else f"exit {run['exit']}"
        print(f"sweep: {run['seconds']:.0f} s, {ending}; {len([w for w in workers if w['trials']])} trial process(es)")
    ok = complete + pruned > 0 and (run is None or (run["exit"] == 0 and not run["timed_out"]))
    print("GPU check: " + ("PASSED" if ok else "FAILED"))
    return 0 if ok else 1


# --- the command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run_p = commands.add_parser("run", help="run the sweep, then report")
    run_p.add_argument("config", type=Path)
    run_p.add_argument("--workdir", type=Path, required=True)
    run_p.add_argument("--timeout", type=float, default=360, help="seconds the sweep may run before it is stopped")
    run_p.add_argument("--smoke", action="store_true", help="the small CPU copy of the config")
    run_p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config key, dotted")
    report_p = commands.add_parser("report", help="report a finished check again")
    report_p.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    if args.command == "report":
        config = yaml.safe_load((workdir / "gpu-check.yaml").read_text())
        return report(workdir, config["study"]["name"])

    from harness.config import ConfigError, load_config

    workdir.mkdir(parents=True, exist_ok=True)
    overrides = {**(SMOKE if args.smoke else {}), **parse_sets(args.set)}
    path = write_config(args.config.resolve(), workdir, overrides)
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    run = run_sweep(path, workdir, args.timeout)
    return report(workdir, cfg.study.name, run)


if __name__ == "__main__":
    sys.exit(main())

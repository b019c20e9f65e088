"""Benchmark: memory and time per trial over a long sweep, two ways of running trials.

Runs the real `python -m harness.sweep` on the tiny offline config the tests use, once per mode:

  warm   the default: warm trial processes that run trial after trial and are replaced after
         study.trials_per_process trials or study.recycle_memory_mib of growth;
  fresh  study.trials_per_process: 1: every trial in a fresh child process.

Prints per mode: the resident memory of the process that ran the trial, measured after trial 3
and after the last trial (each trial logs it to MLflow as `system/rss_mib`, after its clean-up);
the peak resident memory of the whole process tree (sampled twice a second); and the wall time
per trial. Usage:

    python benchmarks/trial_memory.py [--trials 30] [--modes warm fresh]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY, write_config  # noqa: E402  (the tiny offline sweep the tests run)

MODES = {"warm": 20, "fresh": 1}  # study.trials_per_process


def tree_rss_mib(proc) -> float:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def run_mode(mode: str, n_trials: int) -> dict:
    import psutil
    from mlflow.tracking import MlflowClient

    work = Path(tempfile.mkdtemp(prefix=f"bench-{mode}-"))
    text = TINY.replace("n_trials: 2", f"n_trials: {n_trials}\n  trials_per_process: {MODES[mode]}").replace(
        "scratch: true", "scratch: false"
    )
    config = write_config(work, text)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    with open(work / "sweep.log", "w") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "harness.sweep", str(config)], cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=log
        )
        proc, peak = psutil.Process(popen.pid), 0.0
        while popen.poll() is None:
            peak = max(peak, tree_rss_mib(proc))
            time.sleep(0.5)
    wall = time.perf_counter() - started
    if popen.returncode != 0:
        raise SystemExit(f"{mode}: sweep exited {popen.returncode}; see {work / 'sweep.log'}")
    client = MlflowClient(tracking_uri=f"sqlite:///{work}/results/mlflow.db")
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id], "tags.`harness.role` = 'trial'", max_results=1000)
    rss = {
        int(r.data.tags["optuna.trial_number"]) + 1: r.data.metrics["system/rss_mib"]
        for r in runs
        if "system/rss_mib" in r.data.metrics
    }
    return {"rss": rss, "peak_tree": peak, "seconds_per_trial": wall / n_trials}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    args = parser.parse_args()
    for mode in args.modes:
        r = run_mode(mode, args.trials)
        rss, last = r["rss"], max(r["rss"])
        print(
            f"{mode:>10}: RSS of the trial's process after trial 3 = {rss[3]:.0f} MiB, after trial {last} = "
            f"{rss[last]:.0f} MiB ({100 * (rss[last] / rss[3] - 1):+.1f}%); peak of the process tree "
            f"{r['peak_tree']:.0f} MiB; {r['seconds_per_trial']:.1f} s/trial wall (whole sweep / trials)",
            flush=True,
        )
        print(f"{mode:>10}: RSS by trial (MiB): " + ", ".join(f"{k}:{v:.0f}" for k, v in sorted(rss.items())), flush=True)


if __name__ == "__main__":
    main()

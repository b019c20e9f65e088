"""Benchmark: resident memory and per-trial cost over a long sweep, two ways of running trials.

  in-process  (what the harness does): every trial in the sweep process, Keras session cleared
              and garbage collected after each trial;
  subprocess  (the alternative): every trial in a freshly spawned Python process.

Prints RSS after trial 3 and after the last trial for the in-process mode, and the mean wall time
per trial for both, on the tiny offline config the tests use. Usage:

    python benchmarks/trial_memory.py [--trials 30] [--subprocess-trials 6]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import TINY  # noqa: E402  (the tiny offline sweep the tests run)


def _setup(work: Path, n_trials: int):
    import optuna

    from harness.config import parse_config, with_overrides
    from harness.data import load_dataset, make_splits
    from harness.study import make_storage, open_study
    from harness.sweep import _quiet_libraries, resolve_weights
    from harness.tracking import Tracker

    _quiet_libraries()
    cfg = with_overrides(parse_config(TINY.replace("pruner: none", "pruner: none\n  sampler: random"), "tiny.yaml"),
                         n_trials=n_trials, storage=f"sqlite:///{work}/optuna.db")
    dataset = load_dataset(cfg.data)
    splits = make_splits(dataset.labels, cfg.data)
    weights = resolve_weights(cfg, lambda *_: None)
    tracker = Tracker(f"sqlite:///{work}/mlflow.db", "bench", str(work / "artifacts"))
    tracker.start_study_run("bench", cfg.to_dict(), cfg.study.storage)
    study = open_study(cfg, make_storage(cfg.study.storage))
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return cfg, dataset, splits, weights, tracker, study


def in_process(n_trials: int) -> dict:
    import psutil

    from harness.objective import Objective

    work = Path(tempfile.mkdtemp())
    cfg, dataset, splits, weights, tracker, study = _setup(work, n_trials)
    objective = Objective(cfg, dataset, splits, tracker, weights.get)
    rss, times = {}, []
    last = time.perf_counter()

    def record(s, t):
        nonlocal last
        now = time.perf_counter()
        times.append(now - last)
        last = now
        rss[t.number + 1] = psutil.Process().memory_info().rss / 2**20

    study.optimize(objective, n_trials=n_trials, callbacks=[record], gc_after_trial=True)
    return {"rss_mib": rss, "seconds_per_trial": sum(times) / len(times)}


def _one_trial(work: str) -> None:
    from harness.objective import Objective

    cfg, dataset, splits, weights, tracker, study = _setup(Path(work), 10_000)
    study.optimize(Objective(cfg, dataset, splits, tracker, weights.get), n_trials=1)


def subprocesses(n_trials: int) -> dict:
    import resource

    work = tempfile.mkdtemp()
    ctx = mp.get_context("spawn")
    times = []
    for _ in range(n_trials):
        started = time.perf_counter()
        p = ctx.Process(target=_one_trial, args=(work,))
        p.start()
        p.join()
        times.append(time.perf_counter() - started)
    peak_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"seconds_per_trial": sum(times) / len(times), "peak_child_rss_mib": peak_child}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--subprocess-trials", type=int, default=6)
    args = parser.parse_args()
    a = in_process(args.trials)
    r = a["rss_mib"]
    print(f"in-process: RSS after trial 3 = {r[3]:.0f} MiB, after trial {args.trials} = {r[args.trials]:.0f} MiB "
          f"({100 * (r[args.trials] / r[3] - 1):+.1f}%), {a['seconds_per_trial']:.1f} s/trial")
    print("in-process RSS by trial (MiB): " + ", ".join(f"{k}:{v:.0f}" for k, v in sorted(r.items())))
    b = subprocesses(args.subprocess_trials)
    print(f"subprocess: {b['seconds_per_trial']:.1f} s/trial (each pays the TensorFlow import and setup), "
          f"peak child RSS {b['peak_child_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()

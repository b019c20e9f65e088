"""The trial engine: a pool of warm trial processes fed by ask-and-tell.

The sweep process is the only one that talks to Optuna. For every idle trial process it asks
the study for a trial (`study.ask`), creates the trial's MLflow run, and hands the process a task;
the process trains and sends each epoch's value back; the sweep process reports it to Optuna and
answers whether to prune; at the end it tells Optuna the outcome (`study.tell`). So the default
local SQLite storage has a single writer however many processes train, and `--workers N` needs
no server. On a server storage (PostgreSQL) several sweep processes, on several machines, fill
one study the same way; Optuna's heartbeat fails the trials of a machine that died, and their
parameters run again.

Exact budgets: a trial starts only while finished + running trials (of every process) are below
`n_trials`, counted and asked for under one lock (`study.claim_lock`), so finished trials end
exactly at the budget for any number of workers and machines.

A job is one study to fill: a single sweep has one, a quadrant sweep one per cell plus one per
cell's confirmation seeds (harness/quadrants.py adds those as cells finish). The engine knows
nothing of what a task does: a task is an object with `run(runner, channel)`, executed in a trial
process against the runner its context loaded there (once per process).

Trial processes (harness/worker.py) are recycled after `study.trials_per_process` tasks or
`study.recycle_memory_mib` of memory growth; the successor starts while the last task runs. On a
GPU it initializes its devices only after its predecessor has exited (harness/worker.py).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from harness import runtime, space
from harness import study as st
from harness.config import SweepRefused
from harness.frameworks import frameworks_of
from harness.tasks import Context, TrialTask, execute
from harness.tracking import STATE_TAG, TRIAL_TAG
from harness.worker import TrialProcess, describe_exit

POLL_SECONDS = 1.0  # how often the engine looks at the clock and at other machines' trials
QUIET_SECONDS = 60.0  # a task run by `call` that says nothing for this long gets a "still running" line
PRESTART_SHARE = 0.75  # start a successor once a process has grown by this share of its memory limit


# --- what a trial process runs ----------------------------------------------------------------


def show_note(progress, note, log) -> None:
    """A trial process's note: ("epoch", summary as trials report it) or ("message", text)."""
    kind, payload = note
    if kind == "epoch" and progress is not None:
        progress.epoch_done(payload)
    elif kind == "message":
        progress.message(payload) if progress is not None else log(payload)


# --- the pruner's step axis ---------------------------------------------------------------------


def pruning_step(phase: str, epoch_in_phase: int, head_epochs: int) -> int:
    """The Optuna step at which epoch `epoch_in_phase` (0-based, counted from the phase's own
    start) of `phase` is reported.

    Optuna's median pruner compares a trial's value at step s with the other trials' values at
    the same step s, so a step must mean the same thing in every trial. The shared epoch
    timeline does not: phase 1 stops early on its own, so epoch 3 is phase 2 in one trial and
    still phase 1 in another. Fixed offsets make a step mean "epoch j of phase p": phase 1
    ("head") epoch i is step i (0 <= i < train.head.epochs), phase 2 ("finetune") epoch j is step
    `head_epochs + j` however early phase 1 stopped, and a from-scratch trial (one phase,
    "scratch", in a study of its own) is step i. No step repeats within a trial, which matters:
    `Trial.report` silently ignores a step it has already seen. MLflow's metric steps stay on
    the shared epoch timeline; only the pruner's axis has the offsets.

        >>> pruning_step("head", 2, head_epochs=5), pruning_step("finetune", 0, head_epochs=5)
        (2, 5)
    """
    if epoch_in_phase < 0:
        raise ValueError(f"epoch_in_phase must be >= 0, got {epoch_in_phase}")
    if phase in ("head", "scratch"):
        return epoch_in_phase
    if phase == "finetune":
        return head_epochs + epoch_in_phase
    raise ValueError(f"unknown phase {phase!r} (head, finetune or scratch)")


# --- what the sweep process keeps ---------------------------------------------------------------


@dataclass
class Job:
    """One study the engine fills until `budget` trials finished.

    `prepare(trial, worker_id)` turns an asked trial into a task (and creates its MLflow run);
    `before_ask(study)` may enqueue the next trial's parameters (confirmation seeds); `on_done()`
    runs once the study is full and returns the jobs that may start now.
    """

    name: str
    study: optuna.Study
    budget: int
    context: Context
    prepare: Callable[[optuna.Trial, str], Any]
    before_ask: Callable[[optuna.Study], None] | None = None
    on_done: Callable[[], list[Job]] = lambda: []
    progress: Any = None
    parent_run_id: str | None = None  # MLflow parent of its runs (None: the sweep's parent run)

    def finished(self) -> int:
        return st.finished_count(self.study)


def trial_job(
    cfg,
    study,
    context: Context,
    tracker,
    parent_run_id: str | None = None,
    extra_tags: dict | None = None,
    progress=None,
    on_done: Callable[[], list[Job]] = lambda: [],
) -> Job:
    """The job of a search study: sample parameters, open the trial's MLflow run, train."""
    sweep_process = f"{socket.gethostname()}:{os.getpid()}"

    def prepare(trial: optuna.Trial, worker_id: str) -> TrialTask:
        params = space.suggest(trial, cfg.search)
        run_id = tracker.start_child(
            f"trial {trial.number}",
            "trial",
            {
                TRIAL_TAG: trial.number,
                "backbone": params["backbone"],
                "dataset": context.dataset.name,
                STATE_TAG: "RUNNING",
                "optuna.study": cfg.study.name,
                **(extra_tags or {}),
            },
            config=cfg.resolved(params, trial.number),
            parent_id=parent_run_id,
        )
        tracker.log_datasets(run_id, context.inputs)
        trial.set_user_attr("mlflow_run_id", run_id)
        trial.set_user_attr("worker", worker_id)  # the process running it
        trial.set_user_attr("sweep_process", sweep_process)  # the process that asked for it
        tracker.log_params(run_id, params)
        if progress:
            progress.trial_started(trial.number, params)
        leader = st.best_trial(study)
        return TrialTask(context.key, trial.number, params, run_id, leader.value if leader else None)

    return Job(
        cfg.study.name,
        study,
        cfg.study.n_trials,
        context,
        prepare,
        on_done=on_done,
        progress=progress,
        parent_run_id=parent_run_id,
    )


@dataclass
class Slot:
    """One place a trial process runs (a GPU, or a share of the CPU cores)."""

    env: dict
    threads: int
    current: TrialProcess | None = None
    successor: TrialProcess | None = None

    @property
    def gpu(self) -> bool:
        """Whether its processes run on a GPU: then a successor waits for its predecessor's exit
        before it touches the GPU; on CPU it starts at once."""
        return bool(self.env.get("CUDA_VISIBLE_DEVICES", "").strip())


@dataclass
class Running:
    job: Job
    trial: optuna.Trial
    task: Any


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not every core the host has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan_slots(workers: int, gpus: list[str], cpu_count: int) -> list[Slot]:
    """One slot per worker: a GPU each (round-robin over the visible ones), or a share of the cores."""
    if gpus:
        return [Slot({"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}, 0) for i in range(workers)]
    threads = 0 if workers == 1 else max(1, cpu_count // workers)
    # A CPU-only trial process must not grab a GPU another process was given.
    return [Slot({"CUDA_VISIBLE_DEVICES": ""} if workers > 1 else {}, threads) for _ in range(workers)]


@dataclass(frozen=True)
class EngineSettings:
    """How the engine paces its trial processes (the config's study and train sections say)."""

    trials_per_process: int = 20  # study.trials_per_process: tasks before a process is recycled
    recycle_memory_mib: float = 1024  # study.recycle_memory_mib: memory growth that recycles it
    max_consecutive_failures: int = 5  # study.max_consecutive_failures: the sweep stops after so many
    timeout: float | None = None  # study.timeout: seconds after which no new trial starts
    heartbeat_seconds: float = st.HEARTBEAT_SECONDS  # study.heartbeat_seconds
    gpu_memory_limit_mib: float | None = None  # train.gpu_memory_limit_mib (None: memory growth)
    # The frameworks the sweep's backbones train with; a trial process imports one of them, the
    # first when it warms up (harness/frameworks/).
    frameworks: tuple[str, ...] = ("keras",)

    @classmethod
    def from_config(cls, cfg) -> EngineSettings:
        from harness.config import backbone_candidates

        return cls(
            trials_per_process=cfg.study.trials_per_process,
            recycle_memory_mib=cfg.study.recycle_memory_mib,
            max_consecutive_failures=cfg.study.max_consecutive_failures,
            timeout=cfg.study.timeout,
            heartbeat_seconds=cfg.study.heartbeat_seconds,
            gpu_memory_limit_mib=cfg.train.gpu_memory_limit_mib,
            frameworks=tuple(frameworks_of(backbone_candidates(cfg.search))),
        )


class TrialEngine:
    """Runs jobs on a pool of warm trial processes until every job's study is full."""

    @classmethod
    def for_config(cls, cfg, log, workers: int, gpus: list[str]) -> TrialEngine:
        """The engine for a config; `use_stores` must follow before `run` or `call`."""
        return cls(plan_slots(workers, gpus, usable_cores()), None, True, log, EngineSettings.from_config(cfg))

    def __init__(self, slots: list[Slot], tracker, exclusive: bool, log, settings: EngineSettings = EngineSettings()):
        self.slots, self.tracker, self.exclusive, self.log = slots, tracker, exclusive, log
        self.settings = settings
        self.running: dict[TrialProcess, Running] = {}
        self.loaded: dict[TrialProcess, set[str]] = {}
        self.streak = 0
        self.startup_deaths = 0  # processes that died before they were ready, in a row
        self._stopping = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def use_stores(self, tracker, exclusive: bool) -> None:
        """Where runs are logged, and whether this process is the storage's only sweep process."""
        self.tracker, self.exclusive = tracker, exclusive

    def warm_up(self) -> None:
        """Start the trial processes now: their TensorFlow import overlaps the sweep's preflight."""
        self._ensure_pool()

    # -- the loop ----------------------------------------------------------------------------

    def run(self, jobs: list[Job]) -> None:
        """Fill every job's study; raises SweepRefused when trials keep failing, KeyboardInterrupt
        when a stop was asked for (after ending the running trials cleanly)."""

        deadline = None if self.settings.timeout is None else time.monotonic() + self.settings.timeout
        pending = list(jobs)
        try:
            self._ensure_pool()
            timed_out = False
            while True:
                if runtime.stop_requested.is_set():
                    raise KeyboardInterrupt("stop requested")
                if deadline is not None and time.monotonic() >= deadline and not timed_out:
                    timed_out = True
                    self.log(f"timeout of {self.settings.timeout:g} s reached: no new trial starts")
                tripped = self.streak >= self.settings.max_consecutive_failures
                if not timed_out and not tripped:
                    self._dispatch(pending)
                pending = self._close_full_jobs(pending)
                if not self.running and (not pending or timed_out or tripped or self._nothing_to_wait_for(pending)):
                    break
                self._wait_and_handle()
            for job in jobs:  # runs of trials that died on another machine end KILLED too
                self.tracker.end_orphaned_trial_runs(st.trial_states(job.study), parent_id=job.parent_run_id)
            if self.streak >= self.settings.max_consecutive_failures:
                raise SweepRefused(
                    f"{self.settings.max_consecutive_failures} trials failed in a row; see the fail_reason of the last trials "
                    f"(optuna user attrs / MLflow tag harness.fail_reason)"
                )
        except KeyboardInterrupt:
            self._stop_running()
            raise

    def call(self, context: Context, task, progress=None) -> Any:
        """Run one task that is not a trial (the scratch baseline) in a trial process and return its
        result: the training runs where the trials ran (on a GPU box, on a GPU), not in this process.

        The task's progress notes (harness/progress.py `Progress`, when given) are shown as trials'
        are; a task silent for QUIET_SECONDS gets a line saying it still runs."""

        self._ensure_pool()
        proc = self._process_for(self.slots[0], task.framework)
        if context.key not in self.loaded.setdefault(proc, set()):
            task = dataclasses.replace(task, context=context)
            self.loaded[proc].add(context.key)
        proc.start_task(task)
        asked_to_stop = False
        started = heard = time.monotonic()
        while True:
            if runtime.stop_requested.is_set() and not asked_to_stop:
                proc.interrupt()
                asked_to_stop = True
            if not proc.conn.poll(POLL_SECONDS):
                if time.monotonic() - heard >= QUIET_SECONDS:
                    self.log(f"{type(task).__name__} still running in the trial process ({time.monotonic() - started:.0f} s)")
                    heard = time.monotonic()
                continue
            heard = time.monotonic()
            message = proc.receive()
            if message is None:
                reason = describe_exit(proc.exit_code())
                run_id = getattr(task, "run_id", None)
                if run_id:  # no Python code of the task ran to end its run
                    self.tracker.set_tags(run_id, {"harness.fail_reason": reason})
                    self.tracker.end_run(run_id, "FAILED", optuna_state="FAIL")
                self._replace(proc)
                raise SweepRefused(f"{reason} (while it ran {type(task).__name__})")
            kind = message[0]
            if kind == "ask":
                proc.send(("reply", False))  # nothing to prune outside a study
            elif kind == "note":
                show_note(progress, message[1], self.log)
            elif kind == "done":
                self._maybe_recycle(proc)
                return message[1]
            elif kind == "error":
                raise message[1]
            elif kind == "interrupted":
                raise KeyboardInterrupt(message[1])

    def close(self) -> None:
        """End every trial process and the heartbeat."""
        self._stop.set()
        self._shut_down()

    def _ensure_pool(self) -> None:
        for slot in self.slots:
            if slot.current is None:
                slot.current = self._spawn(slot)
        if self.tracker is not None and not self.exclusive and self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, daemon=True)
            self._heartbeat.start()

    def _nothing_to_wait_for(self, pending: list[Job]) -> bool:
        """True when no job can start a trial and no other process runs one of theirs."""
        if self.exclusive:
            return all(st.budget_left(j.study, j.budget) <= 0 for j in pending) and not any(
                self._running_elsewhere(j) for j in pending
            )
        for job in pending:
            st.fail_orphaned_trials(job.study, exclusive=False)  # a machine that died: its trials fail and are queued again
        return False  # on a server storage, wait for the other machines' trials (they end or go stale)

    @staticmethod
    def _running_elsewhere(job: Job) -> bool:
        return bool(job.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

    def _close_full_jobs(self, pending: list[Job]) -> list[Job]:
        still = []
        for job in pending:
            if job.finished() >= job.budget and not any(r.job is job for r in self.running.values()):
                still.extend(job.on_done())
            else:
                still.append(job)
        return still

    def _dispatch(self, pending: list[Job]) -> None:
        for slot in self.slots:
            proc = slot.current
            if proc is None or proc in self.running:
                continue
            claimed = self._claim(pending)
            if claimed is None:
                return
            job, trial = claimed
            try:
                task = job.prepare(trial, proc.worker_id)
            except BaseException:
                job.study.tell(trial, state=TrialState.FAIL)
                raise
            asked_by = proc.worker_id
            slot, proc = self._slot_for(slot, task.framework)
            if proc.worker_id != asked_by:
                trial.set_user_attr("worker", proc.worker_id)  # the process that runs it
            if job.context.key not in self.loaded.setdefault(proc, set()):
                task = dataclasses.replace(task, context=job.context)
                self.loaded[proc].add(job.context.key)
            self.running[proc] = Running(job, trial, task)
            proc.start_task(task)
            if self._last_task_of(proc):
                slot.successor = slot.successor or self._spawn(slot, after=proc)  # warm up while this task runs

    def _claim(self, pending: list[Job]):
        for job in pending:
            if not self.exclusive:
                st.fail_orphaned_trials(job.study, exclusive=False)  # a machine that died: its trials fail and are queued again
            with st.claim_lock(st.storage_of(job.study), job.study.study_name):
                if st.budget_left(job.study, job.budget) <= 0:
                    continue
                if job.before_ask is not None:
                    job.before_ask(job.study)
                trial = job.study.ask()
                if not self.exclusive:  # beat at once: a trial with no beat at all never goes stale
                    st.record_heartbeat(job.study, trial)
                return job, trial
        return None

    def _wait_and_handle(self) -> None:
        from multiprocessing.connection import wait

        procs = {p.conn: p for s in self.slots for p in (s.current, s.successor) if p is not None}
        for conn in wait(list(procs), timeout=POLL_SECONDS):
            proc = procs[conn]  # type: ignore[index]  # wait() returns the connections it was given; typeshed widens them
            message = proc.receive()
            if message is None:
                self._process_died(proc)
                continue
            kind = message[0]
            if kind == "ask":
                proc.send(("reply", self._answer(proc, message[1])))
            elif kind == "note":  # progress of a task that asks nothing (a confirmation seed)
                running = self.running.get(proc)
                show_note(running and running.job.progress, message[1], self.log)
            elif kind in ("done", "error", "interrupted"):
                self._task_ended(proc, message)

    # -- messages ----------------------------------------------------------------------------

    def _answer(self, proc: TrialProcess, question) -> Any:
        kind, payload = question
        if kind != "epoch":
            raise ValueError(f"unknown question from a trial process: {kind!r}")
        running = self.running[proc]
        if running.job.progress:
            running.job.progress.epoch_done(payload)
        value = payload.get("value")
        if value is None:
            return False
        # Offset steps (see pruning_step): the pruner compares phase 2 only with phase 2.
        step = pruning_step(payload["phase"], payload["phase_epoch"], running.job.context.cfg.train.head.epochs)
        try:
            running.trial.report(value, step=step)
        except optuna.exceptions.UpdateFinishedTrialError:
            return True  # another sweep process took this trial for dead and queued it again: stop
        return running.trial.should_prune()

    def _task_ended(self, proc: TrialProcess, message) -> None:
        running = self.running.pop(proc)
        job, trial = running.job, running.trial
        kind = message[0]
        if kind == "error":  # a ConfigError or a bug: the sweep cannot go on
            trial.set_user_attr("fail_reason", f"{type(message[1]).__name__}: {message[1]}"[:1000])
            job.study.tell(trial, state=TrialState.FAIL)
            raise message[1]
        if kind == "interrupted":
            self._record(job, trial, TrialState.FAIL, None, f"interrupted: {message[1]}")
            # it did nothing wrong: its configuration runs again on resume
            job.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            return
        state, value = message[1]
        if state == "complete":
            self._record(job, trial, TrialState.COMPLETE, value)
        elif state == "pruned":
            self._record(job, trial, TrialState.PRUNED, None, value)
        else:
            self._record(job, trial, TrialState.FAIL, None, value)
        self._maybe_recycle(proc)

    def _record(self, job: Job, trial: optuna.Trial, state: TrialState, value, reason: str | None = None) -> None:
        try:
            if state == TrialState.FAIL and reason:
                trial.set_user_attr("fail_reason", reason[:1000])
            job.study.tell(trial, value if state == TrialState.COMPLETE else None, state=state)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Another sweep process took it for dead (its heartbeat came late) and queued its
            # parameters again: the retry counts, this result does not.
            self.log(f"trial {trial.number} was failed as stale by another sweep process; its retry counts instead")
            return
        self.streak = self.streak + 1 if state == TrialState.FAIL else 0
        if job.progress:
            best = st.best_trial(job.study)
            job.progress.trial_finished(
                trial.number,
                state.name,
                value,
                best.value if best else None,
                counted=state in st.FINISHED_STATES,
                reason=reason if state == TrialState.FAIL else None,
            )

    def _process_died(self, proc: TrialProcess) -> None:
        """A trial process vanished (the OS killed it, most likely for memory): its trial fails alone,
        not retried (it would likely kill the next process too); a fresh process takes its place."""
        exit_code = proc.exit_code()
        reason = describe_exit(exit_code)
        running = self.running.pop(proc, None)
        if running is not None:
            run_id = running.trial.user_attrs.get("mlflow_run_id") or getattr(running.task, "run_id", None)
            if run_id:
                self.tracker.set_tags(run_id, {"harness.fail_reason": reason})
                self.tracker.log_text(run_id, f"No Python traceback: {reason} (exit code {exit_code}).\n", "traceback.txt")
                self.tracker.end_run(run_id, "FAILED", optuna_state="FAIL")
            self._record(running.job, running.trial, TrialState.FAIL, None, reason)
        if self._stopping:
            return
        self.startup_deaths = 0 if proc.ready else self.startup_deaths + 1
        if self.startup_deaths >= 3:
            raise SweepRefused(f"trial processes die while starting ({reason}): see the messages above")
        self._replace(proc)

    # -- the pool ----------------------------------------------------------------------------

    def _spawn(self, slot: Slot, after: TrialProcess | None = None, framework: str | None = None) -> TrialProcess:
        """A trial process for `slot` (of `framework`: default the one `after` had, else the sweep's
        first); on a GPU, one that touches it only once `after` has exited."""
        return TrialProcess(
            execute,
            env=slot.env,
            threads=slot.threads,
            gpu_memory_limit_mib=self.settings.gpu_memory_limit_mib,
            after=after if slot.gpu else None,
            framework=framework or (after.framework if after is not None else self.settings.frameworks[0]),
        )

    def _slot_for(self, slot: Slot, framework: str) -> tuple[Slot, TrialProcess]:
        """Where a task of `framework` runs: an idle slot whose process has that framework, else
        `slot`, its process swapped for one that has it."""
        for other in self.slots:
            proc = other.current
            if proc is not None and proc not in self.running and proc.framework == framework:
                return other, proc
        return slot, self._process_for(slot, framework)

    def _process_for(self, slot: Slot, framework: str) -> TrialProcess:
        """`slot`'s process, or, when it has another framework, a new one that has `framework`.

        A process never imports two frameworks (TensorFlow and torch fight over threads, GPU memory
        and, imported in the wrong order, crash), and a slot keeps one process: two warm processes
        per GPU would split its memory. So a task of the other framework retires the process, as
        recycling does, and its successor starts (on a GPU, once the old one has exited)."""
        proc = slot.current
        assert proc is not None  # _ensure_pool gave every slot a process
        if proc.framework == framework:
            return proc
        proc.retire()
        self.loaded.pop(proc, None)
        successor = slot.successor
        if successor is not None and successor.framework != framework:
            successor.retire()
            self.loaded.pop(successor, None)
            successor = None
        slot.current, slot.successor = successor or self._spawn(slot, after=proc, framework=framework), None
        return slot.current

    def _slot_of(self, proc: TrialProcess) -> Slot | None:
        return next((s for s in self.slots if proc in (s.current, s.successor)), None)

    def _last_task_of(self, proc: TrialProcess) -> bool:
        return (
            proc.tasks_started >= self.settings.trials_per_process
            or proc.memory_growth_mib() >= PRESTART_SHARE * self.settings.recycle_memory_mib
        )

    def _maybe_recycle(self, proc: TrialProcess) -> None:
        if proc.tasks_started >= self.settings.trials_per_process or proc.memory_growth_mib() >= self.settings.recycle_memory_mib:
            proc.retire()
            self._replace(proc)

    def _replace(self, proc: TrialProcess) -> None:
        slot = self._slot_of(proc)
        self.loaded.pop(proc, None)
        if slot is None:
            return
        if slot.successor is proc:  # a successor died while warming up: start another
            slot.successor = self._spawn(slot, after=slot.current)
            return
        slot.current, slot.successor = (slot.successor or self._spawn(slot, after=proc)), None

    def _stop_running(self) -> None:
        """Ask every busy process to end its trial cleanly, record what they report, then go."""
        from harness.worker import STOP_GRACE_SECONDS

        self._stopping = True
        for proc in self.running:
            proc.interrupt()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while self.running and time.monotonic() < deadline:
            try:
                self._wait_and_handle()
            except KeyboardInterrupt:  # asked twice: stop waiting; the resume fails the orphans
                break
            except Exception:  # noqa: BLE001 - a child's error while stopping: the resume recovers it
                break

    def _shut_down(self) -> None:
        for slot in self.slots:
            for proc in (slot.current, slot.successor):
                if proc is not None:
                    if proc in self.running or not proc.alive():
                        proc.kill()
                    else:
                        proc.retire()
            slot.current = slot.successor = None

    def _beat(self) -> None:
        """Heartbeats for the trials this process runs (server storages): a machine that dies stops
        beating, and the other sweep processes fail its trials and queue them again."""
        while not self._stop.wait(self.settings.heartbeat_seconds):
            for running in list(self.running.values()):
                try:
                    st.record_heartbeat(running.job.study, running.trial)
                except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                    pass


# --- recovery after a crash ----------------------------------------------------------------------


def recover_after_crash(
    study, tracker, exclusive: bool, log, parent_id: str | None = None, owned_roles: tuple[str, ...] = ()
) -> None:
    """Crash recovery: orphaned trials -> FAIL (and retried), orphaned runs -> KILLED.

    `owned_roles`: the other runs under `parent_id` the sweep owns (baseline, confirmation seeds,
    LogME). With the local storage's lock held, one still RUNNING was left by a dead process and
    ends KILLED; on a server storage another machine may be running it, so it is left alone."""
    st.fail_orphaned_trials(study, exclusive)
    fixed = tracker.end_orphaned_trial_runs(st.trial_states(study), parent_id=parent_id)
    if exclusive:
        fixed += tracker.end_orphaned_runs(owned_roles, parent_id=parent_id)
    if fixed:
        log(f"reconciled {len(fixed)} MLflow run(s) left behind by a dead process -> KILLED")

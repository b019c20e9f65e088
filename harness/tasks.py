"""Every task a trial process runs, with one shape and one tracked-run lifecycle.

The sweep process (harness/trials.py) hands a trial process a task: a frozen dataclass with the
key of its study's `Context`, the MLflow run it trains into, and `run(runner, channel)`. The
process loads each context once (`execute`): the data, the tf.data pipelines, the feature cache
(harness/objective.py `TrialRunner`), then seeds every generator and runs the task.

    task                 what it does                                        returns
    TrialTask            one search trial (harness/objective.py)             ("complete" | "pruned" | "failed", value or reason)
    ConfirmTask          a cell's best configuration, retrained with a seed  ("complete", test accuracy)
    BaselineTask         the sweep's from-scratch baseline (harness/scratch)  scores and training facts
    TestTask             the winner's logged model, loaded and scored        val/test scores
    ScreeningTask        the candidate backbones, scored on frozen features  scores per backbone

Each training task ends its run through `tracked_run` (finished, pruned, failed or killed; its
failure logged; memory released), and the test split is read only through `evaluate_on_test`
and `TestTask`, once per run, after all training.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna

from harness import runtime
from harness.direction import at_least_as_good
from harness.evaluation import class_metric_keys, classification_metrics, confusion_csv, confusion_figure, is_number, scores
from harness.frameworks import FRAMEWORKS, framework_for, framework_named, seed_loaded_frameworks
from harness.objective import TrialFailed, TrialRunner, log_history, plan_for, trial_level_errors
from harness.phases import History
from harness.scratch import ScratchRun, confirmation_plan, images_seen, print_note, train_from_scratch
from harness.training import Configuration, EpochHooks, epoch_note
from harness.transferability import score_backbones
from harness.zoo import framework_of

if TYPE_CHECKING:
    from harness.worker import Channel


@dataclass(frozen=True)
class Context:
    """Everything a trial process needs to run one study's tasks; loaded there once."""

    key: str
    cfg: Any
    dataset: Any
    splits: Any
    tracker: Any
    weights: dict
    inputs: tuple = ()  # the dataset inputs each run records (harness/data.py `dataset_inputs`)

    def load(self) -> TrialRunner:
        return TrialRunner(self.cfg, self.dataset, self.splits, self.tracker, self.weights)


_RUNNERS: dict[str, Any] = {}  # in a trial process: context key -> its loaded runner


def execute(task, channel: Channel):
    """The trial process's handler: load the task's context once, then run the task.

    Every task starts from seeded generators (the study's seed; a task with a seed of its own
    seeds again with it), so no task inherits the random state its process's last task left."""
    loaded_elsewhere = [f for f in FRAMEWORKS if f != task.framework and f"harness.frameworks.{f}.framework" in sys.modules]
    if loaded_elsewhere:  # the engine keeps processes per framework (harness/trials.py `_process_for`)
        raise RuntimeError(f"a {task.framework} task in a process that loaded {', '.join(loaded_elsewhere)}")
    if task.context is not None and task.context_key not in _RUNNERS:
        _RUNNERS[task.context_key] = task.context.load()
    runner = _RUNNERS[task.context_key]
    seed_loaded_frameworks(runner.cfg.study.seed)
    return task.run(runner, channel)


# --- the lifecycle of a tracked run -----------------------------------------------------------


@contextlib.contextmanager
def tracked_run(
    tracker,
    run_id: str,
    release_memory: Callable[[], None],
    optuna_states: bool = False,
    system_metrics_seconds: float | None = None,
):
    """Train inside this block; the run ends to match how the block ended:

    - normally: FINISHED (the Optuna state tag COMPLETE, where the run has one);
    - `optuna.TrialPruned`: FINISHED and PRUNED, with the reason as a tag (a pruned trial did its job);
    - an exception: FAILED; Ctrl-C, SIGTERM or another BaseException: KILLED. Either way the
      failure (reason tag and traceback.txt) is logged first and the exception goes on.

    `optuna_states`: the run mirrors an Optuna trial's state (trials and the baseline do).
    `system_metrics_seconds`: sample the process's CPU, memory and GPU into the run meanwhile.
    The framework's memory (`release_memory`) is handed back before the run ends, whatever happened."""
    system = tracker.system_metrics(run_id, system_metrics_seconds) if system_metrics_seconds is not None else None
    try:
        yield
    except optuna.TrialPruned as exc:
        tracker.set_tags(run_id, {"harness.pruned_reason": str(exc)})
        tracker.end_run(run_id, "FINISHED", optuna_state="PRUNED")
        raise
    except BaseException as exc:
        tracker.log_failure(run_id, exc)
        tracker.end_run(
            run_id, "FAILED" if isinstance(exc, Exception) else "KILLED", optuna_state="FAIL" if optuna_states else None
        )
        raise
    finally:
        if system is not None:
            system.finish()
        release_memory()
    tracker.end_run(run_id, "FINISHED", optuna_state="COMPLETE" if optuna_states else None)


def evaluate_on_test(model, runner) -> dict[str, float]:
    """Loss and accuracy on the test split: read once per run, after all training, for weights
    chosen on validation alone."""
    return runner.trainer(model.spec.backbone).evaluate(model, runner.splits.test)


# --- search trials ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialTask:
    """Train trial `number` of a study with `params` into the MLflow run `run_id`."""

    context_key: str
    number: int
    params: dict
    run_id: str
    leader: float | None = None  # the study's best value when handed out: a trial that beats it logs its model
    context: Context | None = None  # attached the first time a process sees this study

    @property
    def framework(self) -> str:
        """The framework a process must have to run this task (it never loads a second one)."""
        return framework_of(self.params["backbone"])

    def run(self, runner: TrialRunner, channel: Channel) -> tuple[str, Any]:
        try:
            return "complete", run_trial(
                runner, self.number, self.params, self.run_id, lambda e: channel.ask_later(("epoch", e)), self.leader
            )
        except optuna.TrialPruned as exc:
            return "pruned", str(exc)
        except TrialFailed as exc:
            return "failed", str(exc)


def run_trial(
    runner: TrialRunner,
    number: int,
    params: dict,
    run_id: str,
    report: Callable[[dict], bool | Callable[[], bool]],
    leader: float | None = None,
) -> float:
    """Train one trial; returns its objective value. Raises optuna.TrialPruned, TrialFailed,
    ConfigError (stop the sweep) or KeyboardInterrupt (stop asked for), with the MLflow run
    already ended to match.

    `leader` is the study's best value when the trial was handed out (None: no trial has
    finished yet). A trial that matches or beats it logs its trained model to its run, so the
    winner's model exists however the sweep ends, while most trials store none."""
    tracker, cfg = runner.tracker, runner.cfg
    fw = framework_for(params["backbone"])
    if runtime.stop_requested.is_set():
        tracker.end_run(run_id, "KILLED", optuna_state="FAIL")
        raise KeyboardInterrupt("stop requested")
    started = time.perf_counter()
    history = History()
    system_seconds = cfg.tracking.system_metrics_seconds
    try:
        with tracked_run(tracker, run_id, fw.release_memory, optuna_states=True, system_metrics_seconds=system_seconds):
            try:
                model = runner.train(number, params, run_id, report, history)
            except optuna.TrialPruned:
                log_history(tracker, run_id, history)  # a pruned trial keeps its curve
                raise
            runtime.check_stop()  # asked to stop while the trial was finishing: it runs again on resume
            value = history.best(cfg.study.metric, cfg.study.direction)
            tracker.log_metrics(
                run_id,
                {
                    "objective": value,
                    f"best_{cfg.study.metric}": value,
                    "wall_seconds": time.perf_counter() - started,
                    "system/rss_mib": runtime.resident_mib(),
                },
            )
            if at_least_as_good(value, leader, cfg.study.direction):  # it leads: its model may win
                tags = {"harness.study": cfg.study.name, "harness.trial": number}
                fw.log_model(tracker, run_id, model, runner.dataset.class_names, tags)
            model = None
    except trial_level_errors(fw) as exc:
        raise TrialFailed(f"{type(exc).__name__}: {str(exc)[:500]}") from exc
    return value


# --- confirmation seeds of a quadrant cell ------------------------------------------------------


@dataclass(frozen=True)
class ConfirmTask:
    """Retrain a cell's best configuration with one seed in a trial process; test it once."""

    context_key: str
    params: dict
    seed: int
    run_id: str
    leader: float | None = None  # the best validation score of the cell's confirmed seeds so far
    keep_model: bool = True  # log the model when it leads (a backbone check never does)
    number: int = 0  # its trial in the confirmation study (the number its progress lines show)
    context: Context | None = None

    @property
    def framework(self) -> str:
        return framework_of(self.params["backbone"])

    def run(self, runner, channel) -> tuple[str, float]:
        return "complete", confirm_seed(
            runner, self.params, self.seed, self.run_id, self.leader, self.keep_model, channel.note, self.number
        )


def confirm_seed(
    runner,
    params: dict,
    seed: int,
    run_id: str,
    leader: float | None = None,
    keep_model: bool = True,
    note=print_note,
    number: int = 0,
) -> float:
    """Train the configuration with `seed` into the run `run_id`; returns its test accuracy.

    The model keeps the best epoch's weights across both phases (the ones its validation score
    came from), and is logged when it matches or beats the cell's best confirmed seed so far.
    Each epoch goes to `note(("epoch", summary))`, as a trial's does, numbered `number`."""
    cfg, tracker = runner.cfg, runner.tracker
    fw = framework_for(params["backbone"])
    started = time.perf_counter()

    def on_epoch(record):
        tracker.log_metrics(run_id, record.metrics, step=record.epoch)

    with tracked_run(tracker, run_id, fw.release_memory):
        if params.get("strategy") == "scratch":
            # Confirmed as the sweep's baseline is trained: to convergence, not on the search's
            # equal budget (the search's best_val stays the equal-budget figure).
            scratch = ScratchRun(runner, params, seed, run_id, on_epoch, f"seed {seed}", note, number)
            model, history, facts = train_from_scratch(scratch)
            seen = facts["steps_all_attempts"] * cfg.train.head.batch_size  # retries cost too
            seconds = facts["seconds_all_attempts"]
        else:
            model, history, seen = train_transfer_seed(runner, params, seed, run_id, on_epoch, note, number)
            seconds = sum(p.seconds for p in history.phases)
        # What the cell's compute was: the report's cost columns (seconds on this process's device:
        # GPU-seconds on a GPU box, where each trial process has one GPU).
        epochs = seen / len(runner.splits.train)
        tracker.log_metrics(run_id, {"cost/images_seen": seen, "cost/epochs": epochs, "cost/seconds": seconds})
        test = evaluate_on_test(model, runner)
        log_history(tracker, run_id, history)
        best_val = history.best(cfg.study.metric, cfg.study.direction)
        if keep_model and at_least_as_good(best_val, leader, cfg.study.direction):
            tags = {"harness.study": cfg.study.name, "harness.seed": seed}
            fw.log_model(tracker, run_id, model, runner.dataset.class_names, tags)
        model = None
        tracker.log_metrics(
            run_id,
            {
                "test_accuracy": test["accuracy"],
                "test_loss": test["loss"],
                "best_val": best_val,
                f"best_{cfg.study.metric}": best_val,
                "wall_seconds": time.perf_counter() - started,
            },
        )
    return test["accuracy"]


def train_transfer_seed(runner, params: dict, seed: int, run_id: str, on_epoch, note, number: int):
    """A transfer strategy's confirmation seed, trained to convergence under the scratch seeds'
    floor and stopping rule (harness/scratch.py `confirmation_plan`), not on the search's epoch
    budget. Returns (model, history, training images seen)."""
    cfg, splits = runner.cfg, runner.splits
    trainer = runner.trainer(params["backbone"])
    model = trainer.build(Configuration(runner.spec(params), (), seed, seed))
    plan = confirmation_plan(plan_for(cfg, params, model.n_blocks), len(splits.train), cfg.train, cfg.baseline)
    total_epochs = sum(p.epochs for p in plan)

    def on_transfer_epoch(record):
        on_epoch(record)
        note(("epoch", epoch_note(number, record, total_epochs, cfg.study.metric)))

    def on_features(phase: str, seconds: float):
        runner.tracker.log_metrics(run_id, {f"{phase}/feature_seconds": seconds})

    hooks = EpochHooks(on_transfer_epoch, on_features=on_features)
    history = trainer.run_plan(model, Configuration(model.spec, tuple(plan), seed, seed), hooks, History())
    seen = images_seen(plan, [p.epochs_run for p in history.phases], len(splits.train), cfg.train)
    return model, history, seen


# --- the sweep's from-scratch baseline ----------------------------------------------------------


@dataclass(frozen=True)
class BaselineTask:
    """The scratch baseline's training, as a task for a trial process."""

    context_key: str
    params: dict
    run_id: str
    trial: int = 0  # the trial whose architecture it trains (the number its progress lines show)
    context: Context | None = None

    @property
    def framework(self) -> str:
        return framework_of(self.params["backbone"])

    def run(self, runner, channel) -> dict[str, Any]:
        return train_baseline(runner, self.params, self.run_id, channel.note, self.trial)


def train_baseline(runner, params: dict, run_id: str, note=print_note, number: int = 0) -> dict[str, Any]:
    """The sweep's baseline, trained to convergence into `run_id` (harness/scratch.py).

    Returns its best validation value, its training accuracy (and whether that counts as fitted)
    and the test accuracy of the weights that scored it (read once, after training)."""
    cfg, tracker = runner.cfg, runner.tracker
    started = time.perf_counter()

    def on_epoch(r):
        tracker.log_metrics(run_id, r.metrics, step=r.epoch)

    with tracked_run(tracker, run_id, framework_for(params["backbone"]).release_memory, optuna_states=True):
        model, history, facts = train_from_scratch(
            ScratchRun(runner, params, cfg.study.seed, run_id, on_epoch, "baseline", note, number)
        )
        log_history(tracker, run_id, history)
        test = evaluate_on_test(model, runner)
        model = None
        value = history.best(cfg.study.metric, cfg.study.direction)
        tracker.log_metrics(
            run_id,
            {
                "objective": value,
                f"best_{cfg.study.metric}": value,
                "test_accuracy": test["accuracy"],
                "test_loss": test["loss"],
                "wall_seconds": time.perf_counter() - started,
            },
        )
    return {
        "value": value,
        "test_accuracy": test["accuracy"],
        "train_accuracy": facts["train_accuracy"],
        "fitted": facts["fitted"],
        "learning_rate": facts["learning_rate"],
        "steps": facts["steps"],
    }


# --- the winner's test --------------------------------------------------------------------------


@dataclass(frozen=True)
class TestTask:
    """Load a logged model in a trial process and score it on the validation and test splits."""

    context_key: str
    model_uri: str
    run_id: str
    framework: str = "keras"  # the framework the model was trained with
    context: Context | None = None

    def run(self, runner, channel) -> dict[str, float]:
        return test_logged_model(runner, self.model_uri, self.run_id)


def test_logged_model(runner, model_uri: str, run_id: str) -> dict[str, float]:
    """Score the model behind `model_uri`, as loaded back from the store, on the validation and
    test splits; logs the test scores, per-class accuracy and the confusion matrix into `run_id`.
    The reloaded validation accuracy shows that the model tested is the model that scored."""
    from harness.plots import plt

    tracker = runner.tracker
    fw = framework_named(tracker.logged_model_framework(model_uri))  # the process's own (TestTask.framework)
    model = fw.load_model(model_uri, tracker.uri)
    trainer = runner.trainer_of(fw)
    names = runner.dataset.class_names
    out: dict[str, float] = {}
    details: dict[str, dict] = {}
    for split, indices in (("val", runner.splits.val), ("test", runner.splits.test)):
        probabilities, labels = fw.predict(model, trainer.split_batches(indices)), runner.dataset.labels[indices]
        result = scores(probabilities, labels)
        out.update({f"{split}_accuracy": result["accuracy"], f"{split}_loss": result["loss"]})
        details[split] = classification_metrics(probabilities, labels, len(names))
        if is_number(details[split]["auc"]):  # binary targets
            out[f"{split}_auc"] = details[split]["auc"]
    # The test split is read here once, for a model chosen on validation alone.
    test = details["test"]
    metrics: dict[str, float] = {
        "test_accuracy": out["test_accuracy"],
        "test_loss": out["test_loss"],
        "reloaded_val_accuracy": out["val_accuracy"],
        **{k: out[k] for k in ("test_auc", "val_auc") if k in out},
    }
    metrics.update(
        {f"test_accuracy/{key}": acc for key, acc in zip(class_metric_keys(names), test["per_class_accuracy"]) if is_number(acc)}
    )
    tracker.log_metrics(run_id, metrics)
    tracker.log_text(run_id, confusion_csv(test["confusion"], names), "confusion_matrix.csv")
    fig = confusion_figure(test["confusion"], names)
    try:
        tracker.log_figure(run_id, fig, "confusion_matrix.png")
    finally:
        plt.close(fig)
    return out


# --- backbone screening -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScreeningTask:
    """Scoring the candidate backbones from frozen features (harness/transferability.py), in a
    trial process: where the trials' feature cache and the GPU are."""

    context_key: str
    backbones: tuple  # all of one framework
    max_images: int
    context: Context | None = None

    @property
    def framework(self) -> str:
        return framework_of(self.backbones[0])

    def run(self, runner, channel) -> dict[str, dict]:
        return score_backbones(runner, list(self.backbones), self.max_images, channel.note)

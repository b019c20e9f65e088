"""Every MLflow call the harness makes: experiment, parent run per study, child run per trial.

All calls go through `MlflowClient` with explicit run ids (no global "active run"), so a trial's
run can be ended, failed or reconciled from anywhere, including after a crash.

Run tree:  experiment <study name>
             └─ parent run  (tag harness.role=study)   config.yaml, summary, description naming the winner
                  ├─ child run per trial (harness.role=trial, optuna.trial_number)   config.yaml (resolved),
                  │     history.csv, learning_curve.png, system metrics; a logged Keras model when it led
                  └─ child run per baseline (harness.role=baseline)
           registered model <study name>: one version per sweep, the winner's logged model
"""

from __future__ import annotations

import os
import time
import traceback as tb
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.redaction import LOGIN_VARIABLES, login_to_environment, redact, redact_config

ROLE = "harness.role"
STUDY_TAG = "harness.study"
TRIAL_TAG = "optuna.trial_number"
STATE_TAG = "optuna.state"
PARENT_TAG = "mlflow.parentRunId"
FINGERPRINT_TAG = "harness.config_fingerprint"  # MLflow's own nesting tag: the UI draws the tree from it

DEFAULT_TRACKING_DB = "results/mlflow.db"
MODEL_URI_TAG = "harness.model_uri"  # on a run whose trained model was logged: where it is
REGISTERED_TAG = "harness.registered_version"  # on the run a registry version was made for: that version
DESCRIPTION_TAG = "mlflow.note.content"  # the run description the UI shows (markdown)
# The UI opens an experiment in the view its kind names; without it, a new experiment with no runs
# yet is guessed to be GenAI and opens on an empty traces page.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# The parent run's params: what a reader scans the runs table by. The whole config is its config.yaml.
KEY_PARAMS = (
    "study.metric",
    "study.direction",
    "study.n_trials",
    "study.sampler",
    "study.pruner",
    "data.source",
    "data.name",
    "data.path",
    "data.image_size",
    "model.weights",
)


# Orders for `Tracker.find_runs`: newest run first, or oldest first (ties broken by run id).
NEWEST_FIRST = ("attributes.start_time DESC",)
OLDEST_FIRST = ("attributes.start_time ASC", "attributes.run_id ASC")


@dataclass(frozen=True)
class RunRecord:
    """One tracked run as plain values: all that the modules outside this one read of a run."""

    run_id: str
    experiment_id: str
    status: str  # RUNNING, FINISHED, FAILED or KILLED
    start_time: int | None  # milliseconds since the epoch
    end_time: int | None  # None while the run has not ended
    tags: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)  # always strings, as MLflow keeps them
    metrics: dict[str, float] = field(default_factory=dict)  # each metric's latest value

    @property
    def parent_id(self) -> str | None:
        """The run this one is nested under (MLflow's nesting tag), None for a top-level run."""
        return self.tags.get(PARENT_TAG)


def _record(run) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=info.run_id,
        experiment_id=info.experiment_id,
        status=info.status,
        start_time=info.start_time,
        end_time=info.end_time,
        tags=dict(data.tags),
        params=dict(data.params),
        metrics=dict(data.metrics),
    )


def run_filter(
    role: str | None = None, parent: str | None = None, status: str | None = None, tags: dict[str, Any] | None = None
) -> str:
    """The MLflow filter string selecting runs by role, parent run, status and tag values; a
    criterion left None is not a condition. Pure.

    >>> run_filter(role="confirm", parent="abc", status="FINISHED")
    "tags.`harness.role` = 'confirm' and tags.`mlflow.parentRunId` = 'abc' and attributes.status = 'FINISHED'"
    """
    conditions = [f"tags.`{ROLE}` = '{role}'"] if role is not None else []
    conditions += [f"tags.`{PARENT_TAG}` = '{parent}'"] if parent is not None else []
    conditions += [f"tags.`{k}` = '{v}'" for k, v in (tags or {}).items()]
    conditions += [f"attributes.status = '{status}'"] if status is not None else []
    return " and ".join(conditions)


def resolve_tracking_uri(configured: str | None) -> str:
    """Flag/config first, then $MLFLOW_TRACKING_URI, then a local SQLite store under results/.
    A login in an http(s) URI moves to MLflow's environment variables (`login_to_environment`)."""
    if configured:
        return login_to_environment(configured)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return login_to_environment(env)
    path = Path(DEFAULT_TRACKING_DB).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


# MLflow's own switch (mlflow/environment_variables.py): without it, every run that ends on a
# tracking server prints "View run ... at: http://..." and "View experiment at: ..." to stdout
# (TrackingServiceClient.set_terminated), twenty lines in a 24-trial sweep. The links a reader
# needs are in the summary and the run descriptions.
URL_LINES_OFF = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
# Another: MLflow draws a "Downloading artifacts" progress bar whenever it reads a run's artifacts
# back from a tracking server (the winner's model, in a trial process): eight redrawn lines a load.
ARTIFACT_BARS = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def quiet_mlflow() -> None:
    """MLflow's own output down to what concerns the reader, in this process and in the processes it
    starts: its log lines at WARNING and above, no "View run ... at:" lines when a run on a tracking
    server ends and no artifact download bars (unless $MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT or
    $MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR says otherwise). MLflow configures its logger when it is
    first imported, which would undo a level set before: so it is imported here first."""
    import logging

    import mlflow  # noqa: F401

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    os.environ.setdefault(URL_LINES_OFF, "true")
    os.environ.setdefault(ARTIFACT_BARS, "false")


@contextmanager
def global_tracking_uri(uri: str):
    """Point MLflow's global tracking URI at `uri` for a block, then put back what was there.

    Logging a model flavour and the registry's look-up of a logged model go through the global
    URI, and `mlflow.set_tracking_uri` also exports $MLFLOW_TRACKING_URI, which would otherwise
    leak into every later store this process opens and into its children.
    """
    import mlflow

    was_set, before = mlflow.is_tracking_uri_set(), mlflow.get_tracking_uri()
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        # mlflow accepts None (it unsets the URI and $MLFLOW_TRACKING_URI) but types only str | Path.
        mlflow.set_tracking_uri(before if was_set else None)  # type: ignore[arg-type]
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


DEFAULT_UI_URL = "http://127.0.0.1:5000"  # `mlflow ui`'s default address


def run_url(run_id, experiment_id, ui_url: str = DEFAULT_UI_URL) -> str | None:
    """The MLflow UI page of a run, or None without both ids. With `ui_url=""` the link is relative
    (`#/experiments/...`) and works from any page of the UI: the links in a run's description.

    >>> run_url("abc", "4", "")
    '#/experiments/4/runs/abc'
    """
    if not isinstance(run_id, str) or not run_id or experiment_id in (None, ""):
        return None
    base = f"{ui_url.rstrip('/')}/" if ui_url else ""
    return f"{base}#/experiments/{experiment_id}/runs/{run_id}"


def ui_command(uri: str, experiment_id: str | None = None) -> str:
    """How to look at a store in the MLflow UI: the server to start (local stores) and the page to
    open. The UI keeps a GenAI/model-training switch of its own, in the browser; the page's
    `workflowType` parameter opens the experiment on its training runs whatever it was set to."""
    uri = redact(uri)
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning" if experiment_id else ""
    if uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{page} in a browser"
    command = f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"{command}, then open http://127.0.0.1:5000/{page}" if page else command


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


class Tracker:
    """Owns the MLflow client, the sweep's experiment and its parent run."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | None = None, source: str = ""):
        """`source`: the command that made the runs, shown in the UI's Source column."""
        from mlflow.tracking import MlflowClient

        quiet_mlflow()  # before the client: creating a new store logs its migrations
        self.uri = login_to_environment(uri)
        # A trial process may have been started before the login reached the environment: it gets
        # the login with the pickled tracker (through a pipe, never written down).
        self._login = {k: os.environ[k] for k in LOGIN_VARIABLES if k in os.environ}
        self.source = source
        self.client = MlflowClient(tracking_uri=self.uri)
        self.experiment_id = self._get_or_create_experiment(experiment, artifact_root)
        self.parent_run_id: str | None = None

    def _get_or_create_experiment(self, name: str, artifact_root: str | None) -> str:
        """The experiment's id, creating it when it does not exist yet.

        Workers started together all see no experiment and all try to create it; the store
        accepts one and answers the others RESOURCE_ALREADY_EXISTS (or a unique-constraint error
        from a SQL store). A loser reads back what the winner created instead of dying.
        """
        from mlflow.exceptions import MlflowException

        for attempt in range(10):
            exp = self.client.get_experiment_by_name(name)
            if exp is not None:
                if "mlflow.experimentKind" not in exp.tags:  # made before the kind was set, or by hand
                    self.client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
                return exp.experiment_id
            location = None
            if artifact_root and not self.uri.startswith(("http://", "https://")):
                # A local store keeps artifacts beside it, not in the working directory.
                location = Path(artifact_root).resolve().as_uri()
                Path(artifact_root).mkdir(parents=True, exist_ok=True)
            try:
                return self.client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
            except MlflowException as exc:
                if not _lost_creation_race(exc):
                    raise
            time.sleep(0.2 * (attempt + 1))  # the winner's row may not be visible yet
        raise RuntimeError(f"MLflow experiment {name!r} was reported as existing but cannot be read back from {redact(self.uri)}")

    # A trial process receives the tracker pickled and opens its own client to the same store.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "client"}

    def __setstate__(self, state: dict) -> None:
        from mlflow.tracking import MlflowClient

        self.__dict__.update(state)
        quiet_mlflow()
        for name, value in self._login.items():
            os.environ.setdefault(name, value)
        self.client = MlflowClient(tracking_uri=self.uri)

    @staticmethod
    def experiment_exists(uri: str, name: str) -> bool:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=uri).get_experiment_by_name(name) is not None

    def find_runs(
        self,
        role: str | None = None,
        parent: str | None = None,
        status: str | None = None,
        tags: dict[str, Any] | None = None,
        order_by: tuple[str, ...] | None = None,
        max_results: int = 50_000,
        experiment_ids: list[str] | None = None,
    ) -> list[RunRecord]:
        """Runs of this experiment (or of `experiment_ids`) with this role, under this parent run, in
        this status and with these tag values (a criterion left None selects everything), as plain
        records. `order_by`: NEWEST_FIRST or OLDEST_FIRST; None is the store's own order (newest first)."""
        if experiment_ids == []:
            return []
        runs = self.client.search_runs(
            experiment_ids or [self.experiment_id],
            filter_string=run_filter(role, parent, status, tags),
            max_results=max_results,
            order_by=list(order_by) if order_by else None,
        )
        return [_record(run) for run in runs]

    def experiment_names(self, names: list[str] | None = None) -> dict[str, str]:
        """experiment id -> name of the experiments called `names` that exist and are not deleted,
        or of every active experiment in the store (None)."""
        from mlflow.entities import LifecycleStage

        if names is None:
            found, token = [], None
            while True:  # page by page: a store caps one answer
                page = self.client.search_experiments(max_results=1000, page_token=token)
                found += list(page)
                token = page.token
                if not token:
                    break
        else:
            found = [e for e in (self.client.get_experiment_by_name(n) for n in names) if e is not None]
        return {e.experiment_id: e.name for e in found if e.lifecycle_stage == LifecycleStage.ACTIVE}

    def get_run_record(self, run_id: str) -> RunRecord:
        """One run by id, as a plain record (MLflow's error when there is no such run)."""
        return _record(self.client.get_run(run_id))

    def reopen_run(self, run_id: str) -> None:
        """A resumed sweep works in a run again: RUNNING until it ends."""
        self.client.update_run(run_id, status="RUNNING")

    # --- parent run ------------------------------------------------------------------------

    def existing_fingerprint(self, study_name: str) -> str | None:
        runs = self.study_runs(study_name)
        return runs[0].tags.get(FINGERPRINT_TAG) if runs else None

    def start_study_run(self, study_name: str, config: dict, storage_url: str, fingerprint: str = "") -> str:
        """Create the study's parent run, or reopen it when the study is resumed.

        Several workers may start at once: each creates a parent if it sees none, then all agree
        on the oldest one and any duplicate is deleted, so the study keeps exactly one parent.
        """
        existing = self.study_runs(study_name)
        if existing:
            run_id = existing[0].run_id
            self.reopen_run(run_id)
        else:
            run = self.client.create_run(
                self.experiment_id,
                run_name=f"study {study_name}",
                tags=_redacted(
                    {
                        ROLE: "study",
                        STUDY_TAG: study_name,
                        "optuna.storage": storage_url,
                        FINGERPRINT_TAG: fingerprint,
                        **self._source_tags(),
                    }
                ),
            )
            run_id = run.info.run_id
            oldest = self.study_runs(study_name)[0].run_id
            if oldest != run_id:  # another worker won the race
                self.client.delete_run(run_id)
                run_id = oldest
            else:
                self.log_config(run_id, config)
                flat = _flatten({k: v for k, v in config.items() if k != "search"})
                self.log_params(run_id, {k: flat[k] for k in KEY_PARAMS if flat.get(k) is not None})
        self.parent_run_id = run_id
        return run_id

    def study_runs(self, study_name: str) -> list[RunRecord]:
        """The parent runs of the study `study_name`, oldest first (one, unless workers raced)."""
        return self.find_runs(role="study", tags={STUDY_TAG: study_name}, order_by=OLDEST_FIRST, max_results=10)

    def end_study_run(self, status: str = "FINISHED") -> None:
        if self.parent_run_id:
            self.client.set_terminated(self.parent_run_id, status=status)

    # --- child runs ------------------------------------------------------------------------

    def start_child(
        self, name: str, role: str, tags: dict[str, Any], config: dict | None = None, parent_id: str | None = None
    ) -> str:
        """A nested run under `parent_id` (default: the study's parent run)."""
        tags = {
            ROLE: role,
            PARENT_TAG: parent_id or self.parent_run_id,
            **self._source_tags(),
            **{k: str(v) for k, v in tags.items()},
        }
        run = self.client.create_run(self.experiment_id, run_name=name, tags=_redacted(tags))
        if config is not None:
            # The resolved config is every run's first artifact: the run describes itself.
            self.log_config(run.info.run_id, config)
        return run.info.run_id

    def log_config(self, run_id: str, config: dict) -> None:
        """A run's config.yaml, with every URI in it redacted (the storage URL, the tracking URI)."""
        self.client.log_dict(run_id, redact_config(config), "config.yaml")

    def _source_tags(self) -> dict[str, str]:
        return {"mlflow.source.name": self.source, "mlflow.source.type": "LOCAL"} if self.source else {}

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params per call
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        for k, v in _redacted(tags).items():
            self.client.set_tag(run_id, k, v)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, redact(text), artifact_file)

    def log_figure(self, run_id: str, figure, artifact_file: str) -> None:
        self.client.log_figure(run_id, figure, artifact_file)

    def log_file(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_failure(self, run_id: str, exc: BaseException) -> None:
        """Reason as a tag, the whole traceback as an artifact."""
        reason = f"{type(exc).__name__}: {exc}"
        self.set_tags(run_id, {"harness.fail_reason": reason[:5000]})
        self.log_text(run_id, "".join(tb.format_exception(exc)), "traceback.txt")

    def end_run(self, run_id: str, status: str, optuna_state: str | None = None) -> None:
        if optuna_state:
            self.client.set_tag(run_id, STATE_TAG, optuna_state)
        self.client.set_terminated(run_id, status=status)

    def describe(self, run_id: str, markdown: str) -> None:
        """The run's description, shown at the top of its page in the UI."""
        self.client.set_tag(run_id, DESCRIPTION_TAG, redact(markdown))

    def run_tags(self, run_id: str) -> dict[str, str]:
        return self.client.get_run(run_id).data.tags

    # --- models and datasets ---------------------------------------------------------------

    def log_keras_model(
        self, run_id: str, model, class_names: list[str], image_size: int, tags: dict[str, Any] | None = None
    ) -> str:
        """Log a trained Keras model to its run (MLflow's Keras flavour, a `.keras` file inside);
        returns its `models:/` URI (`_log_model`)."""
        from importlib.metadata import version

        import mlflow

        # The signature needs only the output's width. A `model.predict` to get it would trace a
        # predict function just for this (seconds a model).
        card = _model_card(class_names, image_size, "keras")
        requirements = [f"keras=={version('keras')}", "tensorflow"]
        return self._log_model(run_id, mlflow.keras.log_model, model, card, int(model.output_shape[-1]), tags, requirements)

    def log_pytorch_model(
        self,
        run_id: str,
        model,
        class_names: list[str],
        image_size: int,
        tags: dict[str, Any] | None = None,
        requirements: list[str] | None = None,
    ) -> str:
        """Log a trained PyTorch model to its run (MLflow's PyTorch flavour: the module pickled
        whole, so it must be built of torch's and its zoo's classes alone and loads where the
        harness is not installed); returns its `models:/` URI (`_log_model`). `requirements`: the
        pip requirements the module needs (torch, torchvision, timm), pinned by the caller."""
        import logging

        import mlflow

        # Pickled, not MLflow's default "pt2" (torch.export): exporting the zoo's models fixed the
        # batch size at the example's (mobilenet_v3_small: "Guard failed: input.size()[0] == 1"),
        # so the program would serve one image at a time. MLflow warns of pickle on every call; the
        # module is built of torch's and its zoo's classes, so that warning says nothing here.
        pytorch_logger = logging.getLogger("mlflow.pytorch")
        level = pytorch_logger.level
        pytorch_logger.setLevel(logging.ERROR)
        try:
            card = _model_card(class_names, image_size, "torch")
            return self._log_model(
                run_id,
                mlflow.pytorch.log_model,
                model,
                card,
                len(class_names),
                tags,
                requirements or ["torch"],
                serialization_format="pickle",
            )
        finally:
            pytorch_logger.setLevel(level)

    def _log_model(self, run_id, log_flavour, model, card: dict, classes: int, tags, requirements, **extra):
        """Log `model` with an MLflow flavour's `log_model` into the run; returns its `models:/` URI,
        also kept on the run as the tag harness.model_uri.

        The input is raw uint8 pixels of the card's image size (preprocessing is inside the model),
        the output one probability per `classes`; the card (`_model_card`) is the model's
        metadata, so `python -m harness.predict` names its predictions and loads it with its
        framework. The fluent API is the only way to log a flavour; the `with` ends the run as
        FINISHED, so this is called once the trial has succeeded, just before its run ends anyway."""
        import mlflow
        import numpy as np
        from mlflow.models import infer_signature

        size = card["image_size"]
        signature = infer_signature(np.zeros((1, size, size, 3), np.uint8), np.zeros((1, classes), np.float32))
        with global_tracking_uri(self.uri), mlflow.start_run(run_id=run_id):
            info = log_flavour(
                model,
                name="model",
                signature=signature,
                metadata=card,
                pip_requirements=requirements,  # no slow requirement inference
                tags=_redacted(tags or {}),
                **extra,
            )
        self.client.set_tag(run_id, MODEL_URI_TAG, info.model_uri)
        return info.model_uri

    def logged_model_framework(self, model_uri: str) -> str:
        """The framework a logged model was trained with ("keras" for models logged before the
        metadata named it)."""
        with global_tracking_uri(self.uri):
            return str(logged_model_metadata(model_uri).get("framework", "keras"))

    def register_model(self, model_uri: str, name: str, run_id: str, tags: dict[str, Any], description: str = "") -> str:
        """A new version of the registered model `name` pointing at a logged model; returns it."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="Best models of the sweep " + name)
        except MlflowException as exc:
            if not _lost_creation_race(exc):
                raise
        # A tracking server wants the logged model's id beside its URI; a local store looks the
        # model up through the global URI.
        model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
        with global_tracking_uri(self.uri):
            version = self.client.create_model_version(
                name, model_uri, run_id=run_id, model_id=model_id, tags=_redacted(tags), description=redact(description)
            )
        return version.version

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point `models:/<name>@<alias>` at `version` (an alias names one version: it moves)."""
        self.client.set_registered_model_alias(name, alias, str(version))

    def delete_logged_model(self, model_uri: str) -> bool:
        """Delete a logged model (`models:/m-...`) and its files now: MLflow marks it deleted, and
        its artifacts go at once (what `mlflow gc` would do later), so the disk space comes back.
        False when there is no such logged model (a `runs:/` URI, or already deleted), or when the
        artifact store refused to delete the files (then `mlflow gc` can still remove them)."""
        from mlflow.exceptions import MlflowException
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        model_id = model_uri.removeprefix("models:/")
        if not model_id.startswith("m-"):
            return False
        try:
            model = self.client.get_logged_model(model_id)
        except MlflowException:
            return False
        self.client.delete_logged_model(model_id)
        try:
            with global_tracking_uri(self.uri):
                get_artifact_repository(model.artifact_location).delete_artifacts()
        except (MlflowException, OSError):  # e.g. a server that does not serve artifacts
            return False
        return True

    def has_registered_version(self, run_id: str) -> bool:
        """Whether any registered model version (of any name) was made from a model of this run."""
        return bool(self.client.search_model_versions(f"run_id = '{run_id}'", max_results=1))

    def delete_tag(self, run_id: str, key: str) -> None:
        self.client.delete_tag(run_id, key)

    def log_datasets(self, run_id: str, inputs: Sequence[dict]) -> None:
        """Dataset inputs of a run, as MLflow's Dataset column and run page show them.

        Each input: name, source (a path, URL or {tags} for generated data), digest (content
        hash), context (train, validation or test) and images (the split's size)."""
        from mlflow.data.code_dataset_source import CodeDatasetSource
        from mlflow.data.dataset_source import DatasetSource
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.http_dataset_source import HTTPDatasetSource
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        if not inputs:
            return
        entities = []
        for item in inputs:
            raw = redact_config(item["source"])  # a dataset URL may carry a token
            source: DatasetSource
            if isinstance(raw, dict):
                source = CodeDatasetSource(raw)
            elif str(raw).startswith(("http://", "https://")):
                source = HTTPDatasetSource(raw)
            else:
                source = resolve_dataset_source(str(raw))
            # `profile` is abstract only on paper: mlflow's Dataset base is no ABC, and MetaDataset is its metadata-only dataset.
            dataset = MetaDataset(source, name=item["name"], digest=item["digest"])  # type: ignore[abstract]
            entities.append(
                DatasetInput(
                    dataset._to_mlflow_entity(),
                    tags=[InputTag("mlflow.data.context", item["context"]), InputTag("images", str(item["images"]))],
                )
            )
        self.client.log_inputs(run_id, datasets=entities)

    def system_metrics(self, run_id: str, sampling_seconds: float) -> SystemMetrics:
        """MLflow's system metrics (CPU, memory, disk, network; GPU when nvidia-ml-py sees one)
        of a run, sampled until `.finish()`."""
        return SystemMetrics(self.uri, run_id, sampling_seconds)

    # --- crash recovery --------------------------------------------------------------------

    def find_child(self, role: str, tags: dict[str, Any], parent_id: str | None = None) -> RunRecord | None:
        """The newest nested run with this role and these tags, or None (used to resume)."""
        runs = self.find_runs(role=role, parent=parent_id or self.parent_run_id, tags=tags, order_by=NEWEST_FIRST, max_results=1)
        return runs[0] if runs else None

    def end_orphaned_runs(
        self, roles: tuple[str, ...], parent_id: str | None = None, reason: str = "process died before the run ended"
    ) -> list[str]:
        """End KILLED every run of these roles under `parent_id` (default: the sweep's run) still
        RUNNING; returns their ids. For the runs a sweep owns that are not Optuna trials (baseline,
        confirmation seeds, LogME): call it only where no live process can own one, i.e. while
        holding the local storage's lock at the start of a resumed sweep."""
        if not roles:
            return []
        runs = [
            run for role in roles for run in self.find_runs(role=role, parent=parent_id or self.parent_run_id, status="RUNNING")
        ]
        for run in runs:
            self.set_tags(run.run_id, {"harness.fail_reason": run.tags.get("harness.fail_reason") or reason})
            self.end_run(run.run_id, "KILLED", optuna_state="FAIL" if STATE_TAG in run.tags else None)
        return [r.run_id for r in runs]

    def end_orphaned_trial_runs(self, trial_states: dict[int, str], parent_id: str | None = None) -> list[str]:
        """Make trial runs agree with their Optuna trials after a crash; returns the run ids fixed.

        `trial_states` maps trial numbers to Optuna state names. A run left RUNNING (or ended as
        FINISHED a moment before the process died, so Optuna never recorded the result) whose
        trial is not RUNNING any more was orphaned: it ends KILLED with optuna.state=FAIL.
        """
        from mlflow.exceptions import MlflowException

        fixed = []
        for run in self.find_runs(role="trial", parent=parent_id or self.parent_run_id):
            number = run.tags.get(TRIAL_TAG, "")
            state = trial_states.get(int(number)) if number.isdigit() else None
            if state == "RUNNING":
                continue  # a live worker owns it
            if state in ("COMPLETE", "PRUNED") and run.status != "RUNNING":
                continue
            if state == "FAIL" and run.status in ("FAILED", "KILLED") and run.tags.get(STATE_TAG) == "FAIL":
                continue
            try:
                self.end_run(run.run_id, "KILLED", optuna_state=state or "FAIL")
                self.set_tags(
                    run.run_id,
                    {"harness.fail_reason": run.tags.get("harness.fail_reason") or "process died before the trial ended"},
                )
            except MlflowException:
                # Several sweep processes reconcile the same orphan at once, and a store may refuse
                # the second writer of a tag (a unique-constraint error): the other one fixed it.
                continue
            fixed.append(run.run_id)
        return fixed


class SystemMetrics:
    """MLflow's system-metrics monitor for one run, with the last samples kept.

    The monitor publishes once per interval, so a run shorter than one interval would get
    nothing; `finish` publishes what was sampled since the last publication."""

    def __init__(self, uri: str, run_id: str, sampling_seconds: float):
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self.monitor = None
        if sampling_seconds > 0:
            self.monitor = SystemMetricsMonitor(run_id, sampling_interval=sampling_seconds, tracking_uri=uri)
            self.monitor.start()

    def finish(self) -> None:
        if self.monitor is None:
            return
        self.monitor.finish()
        try:
            pending = self.monitor.aggregate_metrics()
            if pending:
                self.monitor.publish_metrics(pending)
                self.monitor.mlflow_logger.flush()
        except Exception:  # noqa: BLE001 - a missed sample must never fail a trial
            pass
        self.monitor = None


# --- store checks: read-only, before a sweep logs anything ------------------------------------------


def schema_problem(uri: str, revision: str) -> str | None:
    """Why this MLflow cannot log to the SQL tracking store at `uri` whose schema is at alembic
    `revision` (another application's database, a newer MLflow's store, or an older schema to
    upgrade first); None when the schema is this MLflow's own. Read from MLflow's migration scripts."""
    import mlflow
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config(db_url=""))
    head = script.get_current_head()
    if revision == head:
        return None
    known = {r.revision for r in script.walk_revisions()}
    if revision not in known:
        return (
            f"its schema (alembic revision {revision}) is not one MLflow {mlflow.__version__} knows: another "
            "application's database (an Optuna storage?), or a store a newer MLflow wrote; point --tracking-uri "
            "at an MLflow store, or upgrade MLflow here"
        )
    return (
        f"its schema (revision {revision}) is older than MLflow {mlflow.__version__}'s ({head}); back the store up, "
        f"then run: mlflow db upgrade {redact(uri)}"
    )


def missing_experiments(uri: str, names: list[str]) -> list[str]:
    """The names among `names` that no active experiment of the tracking store at `uri` has (read only)."""
    from mlflow.entities import LifecycleStage
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    missing = []
    for name in names:
        found = client.get_experiment_by_name(name)
        if found is None or found.lifecycle_stage != LifecycleStage.ACTIVE:
            missing.append(name)
    return missing


def tracking_server_error(uri: str) -> Exception | None:
    """The error of one cheap authenticated read from the tracking server at `uri`, tried once
    (MLflow would otherwise retry for minutes); None when the server answered."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    before = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:  # noqa: BLE001 - unreachable, refused, not an MLflow server: the caller says which
        return exc
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return None


# --- logged models, read back --------------------------------------------------------------------


class TrackingError(Exception):
    """A tracking store's refusal (no such run, no such model, a store that cannot be read) as
    `plain_tracking_errors` passes it on: `message` is the store's own words."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


@contextmanager
def plain_tracking_errors():
    """Within the block, MLflow's own exceptions come out as `TrackingError` with the same message,
    so that a caller can catch a store's refusal without knowing MLflow's exception types."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        raise TrackingError(getattr(exc, "message", None) or str(exc) or type(exc).__name__) from exc


def load_keras_model(model_uri: str, tracking_uri: str | None = None):
    """The Keras model logged at `model_uri` (`models:/...`, `runs:/...`: a logged model or a
    registry version), read through `tracking_uri` (default: the global tracking URI).
    A model saved with a custom layer needs that layer's module imported first.

    Loaded for inference, uncompiled: the optimizer's state is not read back. A model saved during
    phase 2 holds only part of it, and Keras warns of that on every load."""
    import mlflow.keras

    with global_tracking_uri(tracking_uri) if tracking_uri else nullcontext():
        return mlflow.keras.load_model(model_uri, load_model_kwargs={"compile": False})


def load_pytorch_model(model_uri: str, tracking_uri: str | None = None, map_location: str | None = None):
    """The PyTorch module logged at `model_uri` (as `load_keras_model`), its tensors on
    `map_location` (default: where they were saved)."""
    import mlflow.pytorch

    with global_tracking_uri(tracking_uri) if tracking_uri else nullcontext():
        return mlflow.pytorch.load_model(model_uri, map_location=map_location)


def logged_model_metadata(model_uri: str) -> dict:
    """The metadata a logged model was saved with (class names, image size), {} when none; the
    global tracking URI must point at its store."""
    import mlflow.models

    return mlflow.models.get_model_info(model_uri).metadata or {}


def run_model_uri(tracking_uri: str, run_id: str) -> str:
    """The model logged in run `run_id`: logged-model search, then the harness tag, then runs:/<id>/model.
    MLflow's error when there is no such run."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    tag = run.data.tags.get(MODEL_URI_TAG)
    try:
        found = list(
            client.search_logged_models(experiment_ids=[run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        )
    except MlflowException:
        found = []  # a store without logged-model search: use the tag or the run's artifact path
    found = [m for m in found if m.status != LoggedModelStatus.FAILED]
    if len(found) > 1:  # several models from one run: the one the harness tagged, else "model", else newest
        found.sort(key=lambda m: (m.model_uri == tag, m.name == "model", m.creation_timestamp or 0), reverse=True)
    if found:
        return found[0].model_uri
    return tag or f"runs:/{run_id}/model"


def _model_card(class_names: list[str], image_size: int, framework: str) -> dict[str, Any]:
    """A logged model's metadata: its class names, input size and the framework that loads it."""
    return {"class_names": list(class_names), "image_size": int(image_size), "framework": framework}


def _redacted(tags: dict[str, Any]) -> dict[str, str]:
    """Tags as MLflow stores them (strings), redacted."""
    return {k: redact(str(v)) for k, v in tags.items()}


def _lost_creation_race(exc: Exception) -> bool:
    """True for the error a store gives the loser of a race to create the same entity."""
    code = getattr(exc, "error_code", "")
    text = str(exc)
    return (
        code == "RESOURCE_ALREADY_EXISTS" or "already exists" in text or "UNIQUE constraint" in text or "IntegrityError" in text
    )

"""Stage 6, track: one MLflow run per preparation, the artifact as an MLflow logged model, the registry.

``MlflowClient`` with an explicit URI, never the fluent API: its active run is thread-local and
Prefect runs tasks in worker threads. Every call is bounded (tasks/mlflow_store.py).

- ``start_run`` opens (or, on a Prefect flow retry or a ``lora-prep log``, finds again by the
  ``prefect.flow_run_id`` tag) the run before the heavy stages, so failures are recorded too;
  each run carries its host, pid and process start time, so a later run can tell a run whose
  process died (``tasks/reaper.py``) and close it.
- ``log_artifact_run`` logs the directory under the run's ``artifact/`` (what ``runs:/<id>``
  loads) and as a LoggedModel of the run (MLflow 3's "Logged models"), registers it if asked
  (the version linked to that model), and ends the run FINISHED, or FAILED on any error.

Why not ``mlflow.transformers.log_model``: in MLflow 3.17 it records the Hub's *latest* commit
instead of the one loaded (and needs the Hub for it) and saves full base weights when the base
was loaded from a local path. The artifact already holds the adapter, tokenizer and manifest.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from lora_prep.tasks.errors import TrackingUnavailable
from lora_prep.tasks.manifest import Manifest, TrackingRecord, read_manifest
from lora_prep.tasks.mlflow_store import client, is_server, mlflow_errors, resolve_tracking_uri, sqlite_artifact_root
from lora_prep.tasks.registry import register
from lora_prep.tasks.run_records import clip, manifest_metrics, manifest_params, metric, param, tag
from lora_prep.tasks.settings import TrackingSettings

log = logging.getLogger(__name__)

ARTIFACT_PATH = "artifact"
FLOW_RUN_TAG = "prefect.flow_run_id"
MODEL_TYPE = "lora-adapter"
# The logged model's name must differ from the run's artifact directory: MLflow lists (and resolves)
# runs:/<id>/<name> through a logged model of that name, against the process's default store.
MODEL_NAME = "lora-adapter"
# Tags that let a later process tell whether this run's process is still alive (tasks/reaper.py).
HOST_TAG, PID_TAG, STARTED_TAG = "lora_prep.host", "lora_prep.pid", "lora_prep.process_started"
# MLflow 3's UI shows an experiment tagged so in its model-training view (not the GenAI one).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


class TrackingResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    tracking_uri: str
    experiment_id: str
    run_id: str
    run_url: str | None
    logged_model_id: str | None
    model_uri: str | None
    registered_version: str | None


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """A link a person can open: only a tracking server has one (a SQLite store: see ui_command).

    ``workflowType=machine_learning``: MLflow 3.17's UI defaults to its GenAI view, where this run
    would be listed among "evaluation runs"; the parameter opens the model-training view."""
    if not is_server(uri):
        return None
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def ui_command(uri: str) -> str | None:
    """How to open a SQLite store in the MLflow UI."""
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {sqlite_artifact_root(uri)}"
    return None


def where_to_open(uri: str, url: str | None) -> str:
    return url or (f"`{ui_command(uri)}`" if ui_command(uri) else uri)


def process_tags() -> dict[str, str]:
    import getpass

    import psutil

    return {
        HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), STARTED_TAG: f"{psutil.Process().create_time():.3f}",
        # What MLflow's fluent API would add; MlflowClient adds none (the UI's user and source columns).
        "mlflow.user": getpass.getuser(), "mlflow.source.type": "LOCAL", "mlflow.source.name": "lora-prep",
    }


def experiment_id(mlflow, name: str, uri: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.create_experiment(name, artifact_location=sqlite_artifact_root(uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException as exc:  # another process created it meanwhile
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


def find_run(mlflow, experiment: str, flow_run_id: str):
    found = mlflow.search_runs([experiment], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    return found[0] if found else None


def _find_or_create_run(mlflow, experiment: str, tags: dict[str, str], run_name: str) -> str:
    """A Prefect flow retry and `lora-prep log` keep the flow run id: find that run instead of opening a second one."""
    flow_run_id = tags.get(FLOW_RUN_TAG)
    if flow_run_id:
        run = find_run(mlflow, experiment, flow_run_id)
        if run is not None:
            mlflow.update_run(run.info.run_id, status="RUNNING")
            mlflow.log_batch(run.info.run_id, tags=[tag(k, v) for k, v in {**tags, **process_tags()}.items()])
            return run.info.run_id
    return mlflow.create_run(experiment, tags={**tags, **process_tags()}, run_name=run_name).info.run_id


def start_run(settings: TrackingSettings, tags: dict[str, str], params: dict[str, Any]) -> str | None:
    """Open (or find again) the run before the heavy stages. An unreachable MLflow does not stop the
    preparation here (warned, and tried again when the artifact is logged); first, runs of dead
    processes are closed (tasks/reaper.py)."""
    from lora_prep.tasks.reaper import reap_dead_flow_runs, reap_stale_runs

    reap_dead_flow_runs()  # through Prefect: also the runs killed before their MLflow run existed
    uri = resolve_tracking_uri(settings)
    try:
        with mlflow_errors(uri):
            mlflow = client(uri)
            experiment = experiment_id(mlflow, settings.experiment, uri)
            try:
                reap_stale_runs(mlflow, [experiment])
            except Exception as exc:  # closing other runs must never fail this preparation
                log.warning("could not close stale MLflow runs: %s", exc)
            run_id = _find_or_create_run(mlflow, experiment, tags, tags.get("prefect.flow_run_name") or "lora-prep")
            mlflow.log_batch(run_id, params=[param(k, v) for k, v in clip(params).items()])
            return run_id
    except TrackingUnavailable as exc:
        log.warning("%s; continuing, the run will be logged at the end.", str(exc).rstrip("."))
        return None


def fail_run(settings: TrackingSettings, flow_run_id: str, reason: str = "the flow failed") -> None:
    """End the run of a failed flow as FAILED so that no run is left RUNNING (best effort, bounded)."""
    from lora_prep.tasks.mlflow_store import sqlite_path

    uri = resolve_tracking_uri(settings)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return  # the flow failed before any run was opened: do not create a store for nothing
    try:
        with mlflow_errors(uri):
            mlflow = client(uri)
            experiment = mlflow.get_experiment_by_name(settings.experiment)
            if experiment is None:
                return
            run = find_run(mlflow, experiment.experiment_id, flow_run_id)
            if run is not None and run.info.status == "RUNNING":
                mlflow.set_tag(run.info.run_id, "lora_prep.failure", reason[:6000])
                mlflow.set_terminated(run.info.run_id, "FAILED")
    except Exception as exc:  # a failure hook: the flow already failed for its own reason
        log.warning("could not mark the MLflow run of flow run %s as FAILED: %s", flow_run_id, exc)


def close_runs_of_this_process(settings: TrackingSettings | None, reason: str) -> list[str]:
    """Mark the RUNNING runs this process opened FAILED (when the flow's own hooks cannot run)."""
    uri = resolve_tracking_uri(settings)
    closed = []
    try:
        with mlflow_errors(uri):
            mlflow = client(uri)
            experiments = [e.experiment_id for e in mlflow.search_experiments()]
            mine = f"tags.`{PID_TAG}` = '{os.getpid()}' and tags.`{HOST_TAG}` = '{socket.gethostname()}' and attributes.status = 'RUNNING'"
            for run in mlflow.search_runs(experiments, filter_string=mine) if experiments else []:
                mlflow.set_tag(run.info.run_id, "lora_prep.failure", reason)
                mlflow.set_terminated(run.info.run_id, "FAILED")
                closed.append(run.info.run_id)
    except Exception as exc:  # best effort on the way out; the reaper closes them later otherwise
        log.warning("could not close this process's MLflow runs: %s", exc)
    return closed


def log_artifact_run(artifact_dir: Path, settings: TrackingSettings, tags: dict[str, str], run_stats: dict[str, float]) -> TrackingResult:
    """Log the artifact directory as the preparation's run and logged model, register it if asked,
    record the run in the manifest. On any failure the run ends FAILED (never left RUNNING) and the
    artifact stays on disk; the error says how to log it later."""

    started = time.perf_counter()
    artifact_dir = Path(artifact_dir)
    uri = resolve_tracking_uri(settings)
    manifest = read_manifest(artifact_dir)
    flow_run_id = manifest.prefect.flow_run_id
    if flow_run_id and FLOW_RUN_TAG not in tags:
        tags = {**tags, FLOW_RUN_TAG: flow_run_id}  # `lora-prep log` attaches to the preparation's own run
    fix = f"the artifact is kept at {artifact_dir}: log it later with 'lora-prep log {artifact_dir} --tracking-uri {uri}'"
    mlflow = run_id = None
    try:
        with mlflow_errors(uri, fix):
            mlflow = client(uri)
            experiment = experiment_id(mlflow, settings.experiment, uri)
            run_id = _find_or_create_run(mlflow, experiment, tags, tags.get("prefect.flow_run_name") or artifact_dir.name)
            params = manifest_params(manifest)
            mlflow.log_batch(run_id, params=[param(k, v) for k, v in params.items()],
                             tags=[tag(k, v) for k, v in {**tags, "lora_prep.artifact_dir": str(artifact_dir)}.items()])
            mlflow.log_batch(run_id, metrics=[metric(k, v) for k, v in manifest_metrics(manifest, run_stats).items()])
            mlflow.log_artifacts(run_id, str(artifact_dir), artifact_path=ARTIFACT_PATH)
            model = _log_model(mlflow, experiment, run_id, artifact_dir, manifest, params)
            url = run_url(uri, experiment, run_id)
            manifest = _record_in_manifest(artifact_dir, uri, settings, run_id, url, model.model_id)
            model_uri = version = None
            if settings.register_as:
                version = register(mlflow, settings, run_id, model.model_id)
                model_uri = f"models:/{settings.register_as}@{settings.alias}" if settings.alias else f"models:/{settings.register_as}/{version}"
            # This stage's own time: the flow's clock is still running while it logs.
            mlflow.log_batch(run_id, metrics=[metric("seconds.track", round(time.perf_counter() - started, 3))])
            mlflow.set_terminated(run_id, "FINISHED")
    except BaseException:
        if mlflow is not None and run_id is not None:
            try:
                with mlflow_errors(uri):
                    mlflow.set_terminated(run_id, "FAILED")
            except Exception:  # the store is what failed; the reaper closes it later
                pass
        raise
    return TrackingResult(tracking_uri=uri, experiment_id=experiment, run_id=run_id, run_url=url,
                          logged_model_id=model.model_id, model_uri=model_uri, registered_version=version)


def _record_in_manifest(artifact_dir: Path, uri: str, settings: TrackingSettings, run_id: str, url: str | None, model_id: str) -> Manifest:
    from lora_prep.tasks.artifact import update_manifest

    record = TrackingRecord(mlflow_tracking_uri=uri, mlflow_experiment=settings.experiment, mlflow_run_id=run_id,
                            mlflow_run_url=url, logged_model_id=model_id)
    return update_manifest(artifact_dir, tracking=record)


def _log_model(mlflow, experiment: str, run_id: str, artifact_dir: Path, manifest: Manifest, params: dict[str, str]):
    """The artifact as the run's LoggedModel (MLflow 3's "Logged models"), READY. The run lists it as
    its output, so MLflow's UI counts the run as a training run. No MLmodel file: nothing loads it
    with pyfunc; load_adapter_ready and plain PEFT read the directory."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    model = mlflow.create_logged_model(
        experiment, name=MODEL_NAME, source_run_id=run_id, model_type=MODEL_TYPE,
        params={k: v for k, v in params.items() if not k.startswith("plan.used.")},
        tags={"lora_prep.base": manifest.base_model.name_or_path, "lora_prep.artifact_dir": str(artifact_dir)},
    )
    mlflow.log_model_artifacts(model.model_id, str(artifact_dir))
    mlflow.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model


def _track(artifact_dir: str, tracking: TrackingSettings, tags: dict[str, str], run_stats: dict[str, float]) -> TrackingResult:
    return log_artifact_run(Path(artifact_dir), tracking, tags, run_stats)


def _make_track_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE

    from lora_prep.tasks.retry import TRACKING

    return task(name="track-mlflow", cache_policy=NO_CACHE, timeout_seconds=3600, **TRACKING.task_options())(_track)


track_task = _make_track_task()

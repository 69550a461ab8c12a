"""The MLflow run index: every tag lora-prep writes, every query it makes, and the run lifecycle, in one place.

``MlflowClient`` with an explicit URI, never the fluent API: its active run is thread-local and Prefect
runs tasks in worker threads. Every call is bounded (``store.mlflow_errors``).

Queries never splice user input into a filter: a model is found by ``lora_prep.model_key`` (a hex digest
of its id or directory, which may hold any character), and the few other values (flow run ids, commit
shas, pids, host names) go through ``literal``, which quotes them for MLflow's filter grammar or refuses
a value that grammar cannot hold.

A run's lifecycle: ``find_or_create_run`` opens it (or finds it again: a Prefect flow retry and
``lora-prep log`` keep the flow run id) with its owner's host, pid and start time, so a later process
can tell when that owner died (``reaper.py``); it ends FINISHED (``artifacts.py``) or FAILED
(``fail_run``, ``close_runs_of_this_process``, the reaper), never left RUNNING.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import time
from typing import Any

from lora_prep.tasks.common.process import ProcessId
from lora_prep.tasks.errors import InvalidInput
from lora_prep.tasks.records.results import ExistingRun
from lora_prep.tasks.settings import TrackingSettings
from lora_prep.tasks.tracking.store import client, is_server, mlflow_errors, resolve_tracking_uri, sqlite_artifact_root, sqlite_path

log = logging.getLogger(__name__)

# --- tags ----------------------------------------------------------------------------------------

FLOW_RUN_TAG = "prefect.flow_run_id"
FLOW_RUN_NAME_TAG = "prefect.flow_run_name"
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under its parent
ARTIFACT_DIR_TAG = "lora_prep.artifact_dir"
MODEL_KEY_TAG = "lora_prep.model_key"  # model_key(model id or directory): what queries match on
KIND_TAG = "lora_prep.kind"
PREPARATION, TRAINED_ADAPTER = "preparation", "trained-adapter"
# The process that owns a RUNNING run: a later process tells from these whether it died.
HOST_TAG, PID_TAG, STARTED_TAG = "lora_prep.host", "lora_prep.pid", "lora_prep.process_started"
FAILURE_TAG = "lora_prep.failure"  # why the run's own process ended it FAILED
CLOSED_BY_TAG = "lora_prep.closed_by"  # why another process (the reaper) ended it FAILED
LOGGED_BY_TAG = "lora_prep.logged_by"
# MLflow 3's UI shows an experiment tagged so in its model-training view (not the GenAI one).
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
_PARAM_MAX = 6000  # MLflow's cap on a param value, in characters
_REASON_MAX = 5000  # a tag value's cap is 8000; leave room


def model_key(model_id: str) -> str:
    """What a query matches a model on: a digest of its Hub id or directory (any character can be in those)."""
    return hashlib.sha256(model_id.encode()).hexdigest()[:32]


def literal(value: str) -> str:
    """``value`` as a string literal of MLflow's filter grammar, which has no escapes.

    It is wrapped in the quote it does not contain. A value holding both quotes, or ending in a
    backslash (the parser reads a backslash before the closing quote as an escaped quote), cannot be
    written: refused rather than turned into a query that matches something else.
    """
    if not value.endswith("\\"):
        for quote in ("'", '"'):
            if quote not in value:
                return f"{quote}{value}{quote}"
    raise InvalidInput(
        f"{value[:80]!r} cannot be looked up in MLflow (it holds both quote characters or ends in a backslash); use an id without them."
    )


def preparation_tags(model_id: str) -> dict[str, str]:
    return {MODEL_KEY_TAG: model_key(model_id), KIND_TAG: PREPARATION}


def process_tags() -> dict[str, str]:
    me = ProcessId.current()
    return {
        HOST_TAG: me.host,
        PID_TAG: str(me.pid),
        STARTED_TAG: f"{me.started:.3f}" if me.started else "",
        # What MLflow's fluent API would add; MlflowClient adds none (the UI's user and source columns).
        "mlflow.user": getpass.getuser(),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.name": "lora-prep",
    }


def owner(tags: dict[str, str]) -> ProcessId | None:
    """The process a run's tags name, if they name one."""
    pid, started = tags.get(PID_TAG, ""), tags.get(STARTED_TAG)
    if not tags.get(HOST_TAG) or not pid.isdigit():
        return None
    return ProcessId(tags[HOST_TAG], int(pid), float(started) if started else None)


# --- MLflow entities -------------------------------------------------------------------------------


def clip(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = value if isinstance(value, str) else str(value)
        out[key] = text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 20] + "...(see manifest)"
    return out


def param(key: str, value: str) -> Any:
    from mlflow.entities import Param

    return Param(key, value)


def tag(key: str, value: object) -> Any:
    from mlflow.entities import RunTag

    return RunTag(key, str(value))


def metric(key: str, value: float, step: int = 0) -> Any:
    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), step)


# --- where a person opens a run ----------------------------------------------------------------------


# The address `mlflow ui` serves by default (its --host and --port).
LOCAL_UI = "http://127.0.0.1:5000"


def _run_path(experiment_id: str, run_id: str) -> str:
    # workflowType=machine_learning: MLflow 3.17's UI opens its GenAI view otherwise (a per-browser setting,
    # whatever mlflow.experimentKind says), where this run would be listed among "evaluation runs".
    return f"/#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """A link that works now: only a tracking server has one (a SQLite store: see where_to_open)."""
    return f"{uri.rstrip('/')}{_run_path(experiment_id, run_id)}" if is_server(uri) else None


def ui_command(uri: str) -> str | None:
    """How to open a SQLite store in the MLflow UI."""
    if uri.startswith("sqlite:///"):
        return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {sqlite_artifact_root(uri)}"
    return None


def where_to_open(uri: str, experiment_id: str, run_id: str) -> str:
    """A server's run URL; for a SQLite store, the command that serves it and the run's URL there."""
    url = run_url(uri, experiment_id, run_id)
    if url:
        return url
    command = ui_command(uri)
    return f"{command}, then {LOCAL_UI}{_run_path(experiment_id, run_id)}" if command else uri


# --- queries ---------------------------------------------------------------------------------------


def find_by_flow_run(mlflow: Any, experiment_ids: list[str], flow_run_id: str, *, finished: bool = False) -> Any | None:
    """The first run of a Prefect flow run (FINISHED only, if asked)."""
    query = f"tags.`{FLOW_RUN_TAG}` = {literal(flow_run_id)}" + (" and attributes.status = 'FINISHED'" if finished else "")
    found = mlflow.search_runs(experiment_ids, filter_string=query, order_by=["attributes.start_time ASC"], max_results=1)
    return found[0] if found else None


def find_preparation(mlflow: Any, experiment_id: str, model_id: str, commit_sha: str) -> Any | None:
    """The newest FINISHED preparation of this model at this commit (a trained adapter's run is not one)."""
    query = (
        f"tags.`{MODEL_KEY_TAG}` = '{model_key(model_id)}' and tags.`{KIND_TAG}` = '{PREPARATION}' "
        f"and params.commit_sha = {literal(commit_sha)} and attributes.status = 'FINISHED'"
    )
    found = mlflow.search_runs([experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def running_runs(mlflow: Any, experiment_ids: list[str], *, of: ProcessId | None = None) -> list[Any]:
    """RUNNING runs of these experiments (of one process, if given)."""
    query = "attributes.status = 'RUNNING'"
    if of is not None:
        query += f" and tags.`{PID_TAG}` = {literal(str(of.pid))} and tags.`{HOST_TAG}` = {literal(of.host)}"
    return list(mlflow.search_runs(experiment_ids, filter_string=query, max_results=500)) if experiment_ids else []


def _experiment(tracking: TrackingSettings) -> tuple[str, Any, str | None]:
    uri = resolve_tracking_uri(tracking)
    mlflow = client(uri)
    found = mlflow.get_experiment_by_name(tracking.experiment)
    return uri, mlflow, found.experiment_id if found is not None else None


def preparation_of_commit(tracking: TrackingSettings, model_id: str, commit_sha: str) -> ExistingRun | None:
    """The newest FINISHED preparation of ``model_id`` at ``commit_sha`` in the experiment, if any."""
    uri = resolve_tracking_uri(tracking)
    with mlflow_errors(uri):
        uri, mlflow, experiment = _experiment(tracking)
        run = find_preparation(mlflow, experiment, model_id, commit_sha) if experiment else None
    return _existing(run, uri)


def preparation_of_flow_run(tracking: TrackingSettings, flow_run_id: str) -> ExistingRun | None:
    """The FINISHED run of a prepare flow run, if the experiment has it."""
    uri = resolve_tracking_uri(tracking)
    with mlflow_errors(uri):
        uri, mlflow, experiment = _experiment(tracking)
        run = find_by_flow_run(mlflow, [experiment], flow_run_id, finished=True) if experiment else None
    return _existing(run, uri)


def _existing(run: Any | None, uri: str) -> ExistingRun | None:
    if run is None:
        return None
    return ExistingRun(run_id=run.info.run_id, artifact_dir=run.data.tags.get(ARTIFACT_DIR_TAG), tracking_uri=uri)


# --- lifecycle -------------------------------------------------------------------------------------


def experiment_id(mlflow: Any, name: str, uri: str) -> str:
    """The experiment's id, created (with its artifact location beside a SQLite store) on first use."""
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return str(experiment.experiment_id)
    from mlflow.exceptions import MlflowException

    try:
        return str(mlflow.create_experiment(name, artifact_location=sqlite_artifact_root(uri), tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}))
    except MlflowException as exc:  # another process created it meanwhile
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return str(mlflow.get_experiment_by_name(name).experiment_id)


def find_or_create_run(mlflow: Any, experiment: str, tags: dict[str, str], run_name: str) -> str:
    """The flow run's run if it has one (a flow retry, ``lora-prep log``), RUNNING again under this process; else a new run."""
    flow_run_id = tags.get(FLOW_RUN_TAG)
    run = find_by_flow_run(mlflow, [experiment], flow_run_id) if flow_run_id else None
    if run is not None:
        mlflow.update_run(run.info.run_id, status="RUNNING")
        mlflow.log_batch(run.info.run_id, tags=[tag(k, v) for k, v in {**tags, **process_tags()}.items()])
        return str(run.info.run_id)
    return str(mlflow.create_run(experiment, tags={**tags, **process_tags()}, run_name=run_name).info.run_id)


def end_failed(mlflow: Any, run_id: str, reason: str, *, by_another_process: bool = False) -> None:
    mlflow.set_tag(run_id, CLOSED_BY_TAG if by_another_process else FAILURE_TAG, reason[:_REASON_MAX])
    mlflow.set_terminated(run_id, "FAILED")


def fail_run(settings: TrackingSettings, flow_run_id: str, reason: str = "the flow failed") -> None:
    """End the run of a failed flow as FAILED so that no run is left RUNNING (best effort, bounded)."""
    uri = resolve_tracking_uri(settings)
    db = sqlite_path(uri)
    if db is not None and not db.exists():
        return  # the flow failed before any run was opened: do not create a store for nothing
    try:
        with mlflow_errors(uri):
            _, mlflow, experiment = _experiment(settings)
            run = find_by_flow_run(mlflow, [experiment], flow_run_id) if experiment else None
            if run is not None and run.info.status == "RUNNING":
                end_failed(mlflow, run.info.run_id, reason)
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
            for run in running_runs(mlflow, experiments, of=ProcessId.current()):
                end_failed(mlflow, run.info.run_id, reason)
                closed.append(run.info.run_id)
    except Exception as exc:  # best effort on the way out; the reaper closes them later otherwise
        log.warning("could not close this process's MLflow runs: %s", exc)
    return closed

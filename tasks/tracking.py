"""MLflow tracking: one run per Prefect flow run, the artifact directory, the registry.

Uses ``MlflowClient`` with an explicit tracking URI instead of the fluent API:
the fluent active run is thread-local and Prefect runs tasks in worker threads,
and a client never changes process-wide state.

We do not use ``mlflow.transformers.log_model`` for the PEFT model: in MLflow
3.17 it records the Hub's *latest* commit rather than the one loaded, needs
the Hub for that, and saves the full base weights when the base was loaded
from a local path. The artifact directory already holds the adapter, the
tokenizer and a manifest with the pinned commit and file hashes, so it is
logged as plain run artifacts under ``artifact/`` and registered from there.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from lora_prep.tasks.artifact import read_manifest, update_manifest
from lora_prep.tasks.errors import InvalidInput, TrackingUnavailable
from lora_prep.tasks.paths import default_mlflow_artifact_root, default_tracking_uri
from lora_prep.tasks.settings import TrackingSettings

log = logging.getLogger(__name__)

ARTIFACT_PATH = "artifact"
FLOW_RUN_TAG = "prefect.flow_run_id"
# MLflow's param values are capped at 6000 characters.
_PARAM_MAX = 6000


class TrackingResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    tracking_uri: str
    experiment_id: str
    run_id: str
    run_url: str | None
    model_uri: str | None
    registered_version: str | None


def resolve_tracking_uri(settings: TrackingSettings) -> str:
    """The flow parameter, else MLFLOW_TRACKING_URI, else the per-user SQLite file."""
    return settings.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def _sqlite_artifact_root(uri: str) -> str | None:
    """For a sqlite:/// store, artifacts live next to the database (MLflow would use ./mlruns of the cwd)."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(urllib.parse.urlparse(uri).path)
    if uri == default_tracking_uri():
        return default_mlflow_artifact_root().as_uri()
    return (db.parent / "mlartifacts").as_uri()


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:///"):
        return MlflowClient(tracking_uri=uri, registry_uri=uri)
    # MLflow creates and migrates a SQLite store on first use; two processes doing that at
    # once (several `lora-prep prepare` on a new per-user store) collide ("duplicate column
    # name", "table ... already exists") and can leave it half-migrated. A file lock beside
    # the database, taken before any client object exists, makes the first use one process
    # at a time: the first builds and migrates both stores, the others then find them done.
    from filelock import FileLock

    db = Path(urllib.parse.urlparse(uri).path)
    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".init.lock", timeout=300):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_experiments(max_results=1)  # tracking store: tables created or migrated
        client.search_registered_models(max_results=1)  # registry store, likewise
    return client


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """A link a person can open: the server itself, or a local `mlflow ui` for file stores."""
    base = uri if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def ui_command(uri: str) -> str | None:
    if uri.startswith("sqlite:///"):
        root = _sqlite_artifact_root(uri)
        return f"mlflow ui --backend-store-uri {uri} --default-artifact-root {root}"
    return None


def _experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_sqlite_artifact_root(uri))


def _find_or_create_run(client, experiment_id: str, tags: dict[str, str], run_name: str) -> str:
    """A Prefect flow retry keeps its flow run id: find the run by that tag instead of opening a second one."""
    flow_run_id = tags.get(FLOW_RUN_TAG)
    if flow_run_id:
        found = client.search_runs([experiment_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'", max_results=1)
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id
    return client.create_run(experiment_id, tags=tags, run_name=run_name).info.run_id


def start_run(settings: TrackingSettings, tags: dict[str, str], params: dict[str, Any]) -> str | None:
    """Open (or, on a Prefect flow retry, find again) the run before the heavy stages, so failures are recorded too.

    An unreachable MLflow does not stop the preparation here: it is tried
    again, with retries, when the artifact is logged at the end.
    """
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(settings)
    try:
        client = _client(uri)
        experiment_id = _experiment_id(client, settings.experiment, uri)
        run_id = _find_or_create_run(client, experiment_id, tags, tags.get("prefect.flow_run_name") or "lora-prep")
        client.log_batch(run_id, params=[_param(k, v) for k, v in _clip(params).items()])
        return run_id
    except (MlflowException, OSError) as exc:
        if not _is_connection_problem(exc):
            raise
        log.warning("MLflow at %s is unreachable (%s); continuing, the run will be logged at the end.", uri, type(exc).__name__)
        return None


def fail_run(settings: TrackingSettings, flow_run_id: str) -> None:
    """End the run of a failed flow as FAILED so that no run is left RUNNING."""
    uri = resolve_tracking_uri(settings)
    if uri.startswith("sqlite:///") and not Path(urllib.parse.urlparse(uri).path).exists():
        return  # the flow failed before any run was opened: do not create a store for nothing
    try:
        client = _client(uri)
        experiment = client.get_experiment_by_name(settings.experiment)
        if experiment is None:
            return
        for run in client.search_runs([experiment.experiment_id], filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}'"):
            if run.info.status == "RUNNING":
                client.set_terminated(run.info.run_id, "FAILED")
    except Exception as exc:  # best effort in a failure hook: the flow already failed for its own reason
        log.warning("could not mark the MLflow run of flow run %s as FAILED: %s", flow_run_id, exc)


def _clip(params: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in params.items():
        text = value if isinstance(value, str) else str(value)
        out[key] = text if len(text) <= _PARAM_MAX else text[: _PARAM_MAX - 20] + "...(see manifest)"
    return out


def _params(manifest: dict) -> dict[str, str]:
    base, plan, lora = manifest["base_model"], manifest["load_plan"], manifest["lora"]
    params: dict[str, Any] = {
        "model_id": base["repo_id"],
        "revision": base["revision"],
        "commit_sha": base["commit_sha"],
        "offline": base.get("offline", False),
    }
    for key in ("dtype", "attn_implementation", "device_map", "quantization", "max_memory", "gradient_checkpointing", "trust_remote_code"):
        params[f"plan.{key}"] = plan.get(key)
    used = plan.get("used") or {}
    for key, value in used.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            params[f"plan.used.{key}"] = value
    for key, value in lora.items():
        params[f"lora.{key}"] = value
    return _clip(params)


def _metrics(manifest: dict, run_stats: dict[str, float]) -> dict[str, float]:
    metrics = {
        "total_params": float(manifest["parameters"]["total"]),
        "trainable_params": float(manifest["parameters"]["trainable"]),
    }
    metrics.update({k: float(v) for k, v in run_stats.items() if v is not None})
    return metrics


def _is_connection_problem(exc: BaseException) -> bool:
    """MLflow wraps transport failures in MlflowException; the cause chain holds the requests error."""
    import requests

    seen = exc
    while seen is not None:
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def log_artifact_run(
    artifact_dir: Path,
    settings: TrackingSettings,
    tags: dict[str, str],
    run_stats: dict[str, float],
) -> TrackingResult:
    """Log the artifact directory as one MLflow run, register it if asked, record the run in the manifest.

    On any failure the run is ended FAILED (never left RUNNING) and the
    artifact directory stays on disk; the error says how to log it later.
    """
    from mlflow.exceptions import MlflowException

    import time

    started = time.perf_counter()
    artifact_dir = Path(artifact_dir)
    uri = resolve_tracking_uri(settings)
    manifest = read_manifest(artifact_dir)
    client = run_id = None
    try:
        client = _client(uri)
        experiment_id = _experiment_id(client, settings.experiment, uri)
        run_name = tags.get("prefect.flow_run_name") or artifact_dir.name
        run_id = _find_or_create_run(client, experiment_id, tags, run_name)
        url = run_url(uri, experiment_id, run_id)
        manifest = update_manifest(
            artifact_dir,
            tracking={"mlflow_tracking_uri": uri, "mlflow_experiment": settings.experiment, "mlflow_run_id": run_id, "mlflow_run_url": url},
        )
        client.log_batch(run_id, params=[_param(k, v) for k, v in _params(manifest).items()], tags=[_tag(k, v) for k, v in tags.items()])
        client.log_batch(run_id, metrics=[_metric(k, v) for k, v in _metrics(manifest, run_stats).items()])
        client.set_tag(run_id, "lora_prep.artifact_dir", str(artifact_dir))
        client.log_artifacts(run_id, str(artifact_dir), artifact_path=ARTIFACT_PATH)
        model_uri = version = None
        if settings.register_as:
            version = _register(client, settings, run_id)
            model_uri = f"models:/{settings.register_as}@{settings.alias}" if settings.alias else f"models:/{settings.register_as}/{version}"
        # This stage's own time: the flow's clock is still running while it logs.
        client.log_batch(run_id, metrics=[_metric("seconds.track", round(time.perf_counter() - started, 3))])
        client.set_terminated(run_id, "FINISHED")
    except BaseException as exc:
        if client is not None and run_id is not None:
            try:
                client.set_terminated(run_id, "FAILED")
            except Exception:  # the store is what failed; nothing more to do
                pass
        if isinstance(exc, MlflowException) and not _is_connection_problem(exc):
            raise
        if isinstance(exc, (MlflowException, OSError)) or _is_connection_problem(exc):
            raise TrackingUnavailable(
                f"MLflow at {uri} is unreachable ({type(exc).__name__}); the artifact is kept at {artifact_dir}: "
                f"log it later with 'lora-prep log {artifact_dir} --tracking-uri {uri}'.",
                artifact_dir=str(artifact_dir),
            ) from exc
        raise
    return TrackingResult(tracking_uri=uri, experiment_id=experiment_id, run_id=run_id, run_url=url, model_uri=model_uri, registered_version=version)


def _register(client, settings: TrackingSettings, run_id: str) -> str:
    from mlflow.exceptions import MlflowException

    name = settings.register_as
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"runs:/{run_id}/{ARTIFACT_PATH}"
    version = client.create_model_version(name, source, run_id=run_id).version
    if settings.alias:
        client.set_registered_model_alias(name, settings.alias, version)
    return str(version)


def _param(key, value):
    from mlflow.entities import Param

    return Param(key, value)


def _tag(key, value):
    from mlflow.entities import RunTag

    return RunTag(key, str(value))


def _metric(key, value):
    import time

    from mlflow.entities import Metric

    return Metric(key, value, int(time.time() * 1000), 0)


def _model_version_source(client, ref: str) -> str:
    """models:/<name>@<alias> or models:/<name>/<version> -> the version's source (runs:/<id>/artifact).

    Resolved with our client: mlflow.artifacts.download_artifacts resolves
    models:/ against the process's default registry, not the one we pass.
    """
    spec = ref.removeprefix("models:/").strip("/")
    if "@" in spec:
        name, alias = spec.split("@", 1)
        return client.get_model_version_by_alias(name, alias).source
    name, _, version = spec.rpartition("/")
    if not name or not version.isdigit():
        raise InvalidInput(f"{ref!r} is not models:/<name>@<alias> or models:/<name>/<version>; fix the model URI.")
    return client.get_model_version(name, version).source


def download_reference(ref: str, dst: Path, tracking_uri: str | None = None) -> Path:
    """Fetch a runs:/ or models:/ reference into dst and return the artifact directory in it."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    try:
        if ref.startswith("models:/"):
            ref = _model_version_source(_client(uri), ref)
        if ref.startswith("runs:/") and ref.rstrip("/").count("/") == 1:
            ref = f"{ref.rstrip('/')}/{ARTIFACT_PATH}"  # runs:/<id> means the run's artifact directory
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dst), tracking_uri=uri)
    except MlflowException as exc:
        raise InvalidInput(f"cannot fetch {ref} from MLflow at {uri} ({exc.error_code}); check the run id or model name and --tracking-uri.") from exc
    return Path(local)


def retry_if_unreachable(task, task_run, state) -> bool:
    """Prefect retry_condition_fn for MLflow calls (a plain def, see retry_if_transient):
    our transient errors and MLflow's own transport failures."""
    from lora_prep.tasks.errors import is_transient

    try:
        state.result()
    except Exception as exc:  # the task's own exception, re-raised by result()
        return is_transient(exc) or _is_connection_problem(exc)
    return False


def _track(artifact_dir: str, tracking: TrackingSettings, tags: dict[str, str], run_stats: dict[str, float]) -> TrackingResult:
    return log_artifact_run(Path(artifact_dir), tracking, tags, run_stats)


def _make_track_task():
    from prefect import task
    from prefect.cache_policies import NO_CACHE
    from prefect.tasks import exponential_backoff

    from lora_prep.tasks.errors import retry_if_transient

    return task(
        name="track-mlflow",
        retries=2,
        retry_delay_seconds=exponential_backoff(backoff_factor=3),  # 3 s, 6 s
        retry_jitter_factor=0.5,
        retry_condition_fn=retry_if_transient,
        cache_policy=NO_CACHE,
        timeout_seconds=3600,
    )(_track)


track_task = _make_track_task()

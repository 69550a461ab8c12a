"""An artifact's MLflow record: params, metrics and tags from its manifest, the directory under the run's
``artifact/`` (what ``runs:/<id>`` loads) and as the run's logged model, the registry, and the manifest
told where it was logged. The run itself is found or opened through the run index (``runs.py``).

Why not ``mlflow.transformers.log_model``: in MLflow 3.17 it records the Hub's *latest* commit
instead of the one loaded (and needs the Hub for it) and saves full base weights when the base
was loaded from a local path. The artifact already holds the adapter, tokenizer and manifest.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from lora_prep.tasks.errors import TrackingUnavailable
from lora_prep.tasks.records.manifest import Manifest, TrackingRecord
from lora_prep.tasks.records.results import TrackingResult
from lora_prep.tasks.settings import TrackingSettings
from lora_prep.tasks.tracking.registry import register
from lora_prep.tasks.tracking.runs import (
    ARTIFACT_DIR_TAG,
    FLOW_RUN_NAME_TAG,
    FLOW_RUN_TAG,
    KIND_TAG,
    PARENT_RUN_TAG,
    TRAINED_ADAPTER,
    clip,
    experiment_id,
    find_or_create_run,
    metric,
    param,
    preparation_tags,
    run_url,
    tag,
    where_to_open,
)
from lora_prep.tasks.tracking.store import client, mlflow_errors, resolve_tracking_uri

ARTIFACT_PATH = "artifact"  # the run's artifact directory: runs:/<id> loads from here
MODEL_TYPE = "lora-adapter"
# What MLflow refuses in a logged model's name.
_NAME_BAD_CHARS = re.compile(r"[/:.%\"'\s]+")


def manifest_params(manifest: Manifest) -> dict[str, str]:
    base, plan, used, lora = manifest.base_model, manifest.load_plan, manifest.load_used, manifest.lora
    t = lora.targets
    params: dict[str, Any] = {
        "model_id": base.name_or_path,
        "source": base.source,
        "revision": base.revision,
        "commit_sha": base.commit_sha or "",
        "content_digest": base.content_digest,
        "offline": base.offline,
    }
    for key in ("dtype", "attn_implementation", "device_map", "quantization", "max_memory", "gradient_checkpointing", "trust_remote_code"):
        params[f"plan.{key}"] = getattr(plan, key)
    for key, value in used.model_dump(mode="json").items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            params[f"plan.used.{key}"] = value
    params["plan.estimate_bytes"] = plan.estimate_bytes
    if plan.quantization_config:  # transformers' own dict: BitsAndBytesConfig.from_dict(json.loads(this)) rebuilds the load
        params["plan.quantization_config"] = json.dumps(plan.quantization_config, sort_keys=True)
    for part in plan.memory:  # what a k-bit load quantized, and what stayed in the compute dtype
        slug = re.sub(r"[^a-z0-9]+", "_", part.name.lower()).strip("_")
        params[f"memory.{slug}.params"], params[f"memory.{slug}.bytes"] = part.params, part.bytes
    for key, value in lora.settings.model_dump(mode="json").items():
        params[f"lora.{key}"] = value
    params.update(
        {
            "lora.dropout": t.dropout,
            "lora.dropout_reason": t.dropout_reason,
            "lora.target_modules": t.module_leaves,
            "lora.target_modules_count": len(t.target_modules),
            "lora.target_parameters": t.expert_parameter_leaves,
            "lora.target_parameters_count": len(t.target_parameters),
            "lora.excluded_count": len(t.excluded),
        }
    )
    return clip(params)


def manifest_metrics(manifest: Manifest, run_stats: dict[str, float]) -> dict[str, float]:
    metrics = {"total_params": float(manifest.parameters.total), "trainable_params": float(manifest.parameters.trainable)}
    if manifest.check.forward:
        metrics["check.seconds"] = manifest.check.seconds
        if manifest.check.loss is not None:
            metrics["check.loss"] = manifest.check.loss
    metrics.update({k: float(v) for k, v in run_stats.items() if v is not None})
    return metrics


def logged_model_name(manifest: Manifest) -> str:
    """The logged model is named after its base (``Qwen2.5-0.5B-lora``): that is what a person looks for in
    the Models list. It must differ from the run's artifact directory (MLflow resolves runs:/<id>/<name>
    through a logged model of that name), which "-lora" guarantees."""
    base = manifest.base_model.name_or_path.rstrip("/").rsplit("/", 1)[-1]
    return f"{_NAME_BAD_CHARS.sub('-', base).strip('-') or 'model'}-lora"


def log_artifact_run(artifact_dir: Path, settings: TrackingSettings, tags: dict[str, str], run_stats: dict[str, float]) -> TrackingResult:
    """Log the artifact directory as its run and logged model, register it if asked, record the run in the
    manifest. On any failure the run ends FAILED (never left RUNNING) and the artifact stays on disk; the
    error says how to log it later."""
    started = time.perf_counter()
    artifact_dir = Path(artifact_dir)
    uri = resolve_tracking_uri(settings)
    manifest = Manifest.read(artifact_dir)
    if manifest.prefect.flow_run_id and FLOW_RUN_TAG not in tags:
        tags = {**tags, FLOW_RUN_TAG: manifest.prefect.flow_run_id}  # `lora-prep log` attaches to the preparation's own run
    if manifest.parent is None:
        tags = {**tags, **preparation_tags(manifest.base_model.name_or_path)}
    fix = f"the artifact is kept at {artifact_dir}: log it later with 'lora-prep log {artifact_dir} --tracking-uri {uri}'"
    mlflow = run_id = None
    try:
        with mlflow_errors(uri, fix):
            mlflow = client(uri)
            experiment = experiment_id(mlflow, settings.experiment, uri)
            run_id = find_or_create_run(mlflow, experiment, tags, tags.get(FLOW_RUN_NAME_TAG) or artifact_dir.name)
            params = manifest_params(manifest)
            mlflow.log_batch(
                run_id,
                params=[param(k, v) for k, v in params.items()],
                tags=[tag(k, v) for k, v in {**tags, ARTIFACT_DIR_TAG: str(artifact_dir)}.items()],
            )
            mlflow.log_batch(run_id, metrics=[metric(k, v) for k, v in manifest_metrics(manifest, run_stats).items()])
            mlflow.log_artifacts(run_id, str(artifact_dir), artifact_path=ARTIFACT_PATH)
            model = _log_model(mlflow, experiment, run_id, artifact_dir, manifest, params)
            url = run_url(uri, experiment, run_id)
            record = TrackingRecord(
                mlflow_tracking_uri=uri,
                mlflow_experiment=settings.experiment,
                mlflow_run_id=run_id,
                mlflow_run_url=url,
                logged_model_id=model.model_id,
            )
            manifest.model_copy(update={"tracking": record}).write(artifact_dir)
            model_uri = version = None
            if settings.register_as:
                version = register(mlflow, settings, run_id, model.model_id)
                model_uri = (
                    f"models:/{settings.register_as}@{settings.alias}" if settings.alias else f"models:/{settings.register_as}/{version}"
                )
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
    return TrackingResult(
        tracking_uri=uri,
        experiment_id=experiment,
        run_id=run_id,
        run_url=url,
        open_with=where_to_open(uri, experiment, run_id),
        logged_model_id=model.model_id,
        model_uri=model_uri,
        registered_version=version,
    )


def _log_model(mlflow: Any, experiment: str, run_id: str, artifact_dir: Path, manifest: Manifest, params: dict[str, str]) -> Any:
    """The artifact as the run's LoggedModel (MLflow 3's "Logged models"), READY. The run lists it as
    its output, so MLflow's UI counts the run as a training run. No MLmodel file: nothing loads it
    with pyfunc; load_adapter_ready and plain PEFT read the directory."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    model = mlflow.create_logged_model(
        experiment,
        name=logged_model_name(manifest),
        source_run_id=run_id,
        model_type=MODEL_TYPE,
        params={k: v for k, v in params.items() if not k.startswith("plan.used.")},
        tags={"lora_prep.base": manifest.base_model.name_or_path, ARTIFACT_DIR_TAG: str(artifact_dir)},
    )
    mlflow.log_model_artifacts(model.model_id, str(artifact_dir))
    mlflow.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    mlflow.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model


def log_trained_run(
    artifact_dir: Path,
    parent_run_id: str,
    uri: str,
    tracking: TrackingSettings,
    tags: dict[str, str],
    params: dict[str, Any],
    losses: list[float],
    stats: dict[str, float],
) -> str:
    """A trained adapter as a child run of its preparation, in the parent's experiment: one loss point per
    optimizer step (MLflow draws the curve from the step index), then the new artifact as for a preparation."""
    with mlflow_errors(uri):
        mlflow = client(uri)
        experiment_id = mlflow.get_run(parent_run_id).info.experiment_id
        experiment = mlflow.get_experiment(experiment_id).name
    settings = tracking.model_copy(update={"tracking_uri": uri, "experiment": experiment})
    tags = {**tags, PARENT_RUN_TAG: parent_run_id, KIND_TAG: TRAINED_ADAPTER}
    try:
        with mlflow_errors(uri):
            run_id = find_or_create_run(mlflow, experiment_id, tags, tags.get(FLOW_RUN_NAME_TAG) or Path(artifact_dir).name)
            mlflow.log_batch(run_id, params=[param(k, v) for k, v in clip(params).items()])
    except TrackingUnavailable:
        raise TrackingUnavailable(f"MLflow at {uri} is unreachable; the trained artifact is kept at {artifact_dir}.") from None
    try:
        with mlflow_errors(uri):
            mlflow.log_batch(run_id, metrics=[metric("loss", loss, step) for step, loss in enumerate(losses)])
    except BaseException:
        with mlflow_errors(uri):
            mlflow.set_terminated(run_id, "FAILED")  # never left RUNNING; a task retry finds it by its tags again
        raise
    return log_artifact_run(Path(artifact_dir), settings, tags, stats).run_id

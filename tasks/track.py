"""Stage 6, track: the preparation's MLflow run, opened before the heavy stages and finished with the artifact.

``open_run`` opens (or finds again) the run beside the download, so a failure is recorded too, after
closing what dead processes left RUNNING; ``track`` logs the artifact and its logged model, registers
it if asked, and ends the run (``lora_prep.tasks.tracking``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from lora_prep.tasks.common.retry import TRACKING
from lora_prep.tasks.errors import TrackingUnavailable
from lora_prep.tasks.records.hub import RepoFacts
from lora_prep.tasks.records.results import ExistingRun, Prepared, TrackingResult, TrainedAdapter
from lora_prep.tasks.settings import TrackingSettings, TrainSettings
from lora_prep.tasks.tracking.artifacts import log_artifact_run, log_trained_run
from lora_prep.tasks.tracking.reaper import reap_dead_flow_runs, reap_stale_runs
from lora_prep.tasks.tracking.runs import (
    FLOW_RUN_NAME_TAG,
    clip,
    experiment_id,
    find_or_create_run,
    param,
    preparation_of_commit,
    preparation_tags,
)
from lora_prep.tasks.tracking.store import client, mlflow_errors, resolve_tracking_uri

log = logging.getLogger(__name__)


def open_preparation_run(tracking: TrackingSettings, facts: RepoFacts, tags: dict[str, str]) -> str | None:
    """The run of this preparation, open before the weights move. An unreachable MLflow does not stop the
    preparation here (warned, and tried again when the artifact is logged); first, what dead processes
    left RUNNING is closed, in Prefect (also runs killed before their MLflow run existed) and in MLflow."""
    reap_dead_flow_runs()
    uri = resolve_tracking_uri(tracking)
    params = {"model_id": facts.repo_id, "source": facts.source, "revision": facts.revision, "commit_sha": facts.commit_sha or ""}
    try:
        with mlflow_errors(uri):
            mlflow = client(uri)
            experiment = experiment_id(mlflow, tracking.experiment, uri)
            try:
                reap_stale_runs(mlflow, [experiment])
            except Exception as exc:  # closing other runs must never fail this preparation
                log.warning("could not close stale MLflow runs: %s", exc)
            tags = {**tags, **preparation_tags(facts.repo_id)}
            run_id = find_or_create_run(mlflow, experiment, tags, tags.get(FLOW_RUN_NAME_TAG) or "lora-prep")
            mlflow.log_batch(run_id, params=[param(k, v) for k, v in clip(params).items()])
            return run_id
    except TrackingUnavailable as exc:
        log.warning("%s; continuing, the run will be logged at the end.", str(exc).rstrip("."))
        return None


# Runs in a worker thread beside the download (submitted). Its MLflow calls are bounded by the store's own
# budget, so it has no timeout of its own (Prefect warns on every run that one cannot interrupt a thread).
open_run = task(name="open-mlflow-run", cache_policy=NO_CACHE)(open_preparation_run)


def track_artifact(artifact_dir: str, tracking: TrackingSettings, tags: dict[str, str], run_stats: dict[str, float]) -> TrackingResult:
    """Log the artifact as the preparation's run and logged model (``tracking.artifacts.log_artifact_run``)."""
    return log_artifact_run(Path(artifact_dir), tracking, tags, run_stats)


track = task(name="track", cache_policy=NO_CACHE, timeout_seconds=3600, **TRACKING.task_options())(track_artifact)


def find_preparation(tracking: TrackingSettings, model_id: str, commit_sha: str) -> ExistingRun | None:
    """The newest FINISHED preparation of ``model_id`` at ``commit_sha``, if any: FINISHED, because a run that
    failed or is still RUNNING at that commit made no artifact, so it must not stop a refresh."""
    return preparation_of_commit(tracking, model_id, commit_sha)


find_preparation_of_commit = task(
    name="find-preparation-of-commit",
    cache_policy=NO_CACHE,  # the answer changes whenever a prepare run finishes
    timeout_seconds=300,
    **TRACKING.task_options(),
)(find_preparation)


def track_trained_adapter(
    trained: TrainedAdapter, prepared: Prepared, tracking: TrackingSettings, train: TrainSettings, tags: dict[str, str]
) -> str:
    """A child run of the prepare run, in its experiment: the loss per step, the training settings, the new artifact
    (under ``artifact/`` like a preparation's, so ``load_adapter_ready("runs:/<child run id>")`` loads it)."""
    params = {
        **{f"train.{k}": v for k, v in train.model_dump(mode="json").items()},
        "parent_run_id": prepared.mlflow_run_id,
        "parent_artifact": prepared.ref,
    }
    stats = {
        "eval_loss_before": trained.eval_loss_before,
        "eval_loss_after": trained.eval_loss_after,
        "final_loss": trained.losses[-1],
        "seconds.train": trained.seconds,
    }
    return log_trained_run(
        Path(trained.artifact_dir), prepared.mlflow_run_id, prepared.tracking_uri, tracking, tags, params, trained.losses, stats
    )


track_trained = task(
    name="track-trained-adapter",
    cache_policy=NO_CACHE,
    timeout_seconds=3600,
    **TRACKING.task_options(),
)(track_trained_adapter)

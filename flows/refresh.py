"""The nightly refresh: re-prepare a model only when its revision points at a new commit.

A branch such as `main` moves when the repo owner pushes. The refresh flow asks
the Hub which commit the revision names today and looks in MLflow for a
FINISHED prepare run of that model at that commit; only when there is none
(or `force` is set) does it run the prepare flow, as a subflow. The download
stage is cached on the commit sha too, so even a forced refresh of an
unchanged commit fetches nothing.

Deployed on a cron schedule by `deployments/prefect.yaml` (deployment
`refresh-nightly`).
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict

from lora_prep.flows.prepare_model import prepare_model
from lora_prep.tasks.resolve import is_local_source, resolve
from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings, SourceSettings, TrackingSettings
from lora_prep.tasks.errors import InvalidInput
from lora_prep.tasks.mlflow_store import client, mlflow_errors, resolve_tracking_uri
from lora_prep.tasks.retry import TRACKING


class RefreshResult(BaseModel):
    """What the refresh did, and where the current artifact is recorded."""

    model_config = ConfigDict(frozen=True)

    model_id: str
    revision: str
    commit_sha: str
    prepared: bool  # True: this run prepared the model; False: an earlier run at this commit was found
    reason: str
    mlflow_run_id: str | None  # the run of the artifact for this commit (new or found)
    artifact_dir: str | None  # the artifact directory that run recorded


class ExistingRun(BaseModel):
    model_config = ConfigDict(frozen=True)

    run_id: str
    artifact_dir: str | None


def find_prepared_run(tracking: TrackingSettings, model_id: str, commit_sha: str) -> ExistingRun | None:
    """The newest FINISHED run in the experiment with these `params.model_id` and `params.commit_sha`, if any.

    FINISHED matters: a run that failed or is still RUNNING at that commit
    made no artifact, so it must not stop a refresh.
    """
    uri = resolve_tracking_uri(tracking)
    with mlflow_errors(uri):
        return _find(client(uri), tracking, model_id, commit_sha)


def _find(mlflow, tracking: TrackingSettings, model_id: str, commit_sha: str) -> ExistingRun | None:
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        return None
    query = (
        f"params.model_id = '{_quote(model_id)}' and params.commit_sha = '{_quote(commit_sha)}' "
        "and attributes.status = 'FINISHED'"
    )
    runs = mlflow.search_runs([experiment.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=50)
    # Child runs (a trained adapter, flows/train_adapter.py) carry the same params but are not preparations.
    prepared = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not prepared:
        return None
    run = prepared[0]
    return ExistingRun(run_id=run.info.run_id, artifact_dir=run.data.tags.get("lora_prep.artifact_dir"))


def _quote(value: str) -> str:
    # MLflow's filter grammar takes single-quoted strings with no escape. Hub ids and shas
    # never contain a quote, but a model id is user input: refuse rather than build a broken query.
    if "'" in value:
        raise InvalidInput(f"model id or sha {value!r} contains a quote; give a Hub model id such as org/name.")
    return value


find_prepared = task(
    name="find-prepared-run",
    cache_policy=NO_CACHE,  # the answer changes whenever a prepare run finishes
    timeout_seconds=300,
    **TRACKING.task_options(),
)(find_prepared_run)


@flow(name="refresh-model", flow_run_name="refresh-{model_id}@{revision}", timeout_seconds=12 * 3600)
def refresh_model(
    model_id: str,
    revision: str = "main",
    force: bool = False,
    source: SourceSettings = SourceSettings(),
    load: LoadSettings = LoadSettings(),
    lora: LoraSettings = LoraSettings(),
    tracking: TrackingSettings = TrackingSettings(),
    output: OutputSettings = OutputSettings(),
) -> RefreshResult:
    """Prepare `model_id` at `revision` again only if the revision now names a commit with no finished preparation.

    1. resolve  the revision to a commit sha (always asks the Hub: a branch can move)
    2. find     a FINISHED MLflow run with the same params.model_id and params.commit_sha
    3. prepare  only when none was found, or `force`: the prepare flow as a subflow
    """
    if is_local_source(model_id):
        raise InvalidInput(f"model_id {model_id!r} is a local directory: a refresh follows a Hub branch; give a Hub id such as org/name.")
    facts = resolve(model_id, revision, source)
    existing = None if force else find_prepared(tracking, model_id, facts.commit_sha)
    if existing is not None:
        reason = f"commit {facts.commit_sha[:12]} already prepared by MLflow run {existing.run_id}"
        get_run_logger().info("%s@%s unchanged: %s; nothing to do.", model_id, revision, reason)
        return RefreshResult(
            model_id=model_id, revision=revision, commit_sha=facts.commit_sha, prepared=False, reason=reason,
            mlflow_run_id=existing.run_id, artifact_dir=existing.artifact_dir,
        )
    # The subflow gets the revision as asked (its run records "main", not only a sha). Should the branch move again
    # in between, it prepares the newer commit, which is what a refresh is for; the result names that commit.
    prepared = prepare_model(model_id=model_id, revision=revision, source=source, load=load, lora=lora, tracking=tracking, output=output)
    reason = "forced" if force else f"no finished preparation of commit {facts.commit_sha[:12]} in experiment {tracking.experiment!r}"
    return RefreshResult(
        model_id=model_id, revision=revision, commit_sha=prepared.commit_sha, prepared=True, reason=reason,
        mlflow_run_id=prepared.mlflow_run_id, artifact_dir=prepared.artifact_dir,
    )

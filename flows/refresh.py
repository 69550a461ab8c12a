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

from prefect import flow, get_run_logger

from lora_prep.flows.prepare_model import prepare_model
from lora_prep.tasks.errors import InvalidInput
from lora_prep.tasks.hub.facts import is_local_source
from lora_prep.tasks.records.results import RefreshResult
from lora_prep.tasks.resolve import resolve
from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings, SourceSettings, TrackingSettings
from lora_prep.tasks.track import find_preparation_of_commit


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
    commit_sha = facts.commit_sha
    assert commit_sha is not None, "a Hub model resolves to a commit sha"
    existing = None if force else find_preparation_of_commit(tracking, model_id, commit_sha)
    if existing is not None:
        reason = f"commit {commit_sha[:12]} already prepared by MLflow run {existing.run_id}"
        get_run_logger().info("%s@%s unchanged: %s; nothing to do.", model_id, revision, reason)
        return RefreshResult(
            model_id=model_id,
            revision=revision,
            commit_sha=commit_sha,
            prepared=False,
            reason=reason,
            mlflow_run_id=existing.run_id,
            artifact_dir=existing.artifact_dir,
        )
    # The subflow gets the revision as asked (its run records "main", not only a sha). Should the branch move again
    # in between, it prepares the newer commit, which is what a refresh is for; the result names that commit.
    prepared = prepare_model(model_id=model_id, revision=revision, source=source, load=load, lora=lora, tracking=tracking, output=output)
    assert prepared.commit_sha is not None, "a preparation of a Hub model names its commit"
    reason = "forced" if force else f"no finished preparation of commit {commit_sha[:12]} in experiment {tracking.experiment!r}"
    return RefreshResult(
        model_id=model_id,
        revision=revision,
        commit_sha=prepared.commit_sha,
        prepared=True,
        reason=reason,
        mlflow_run_id=prepared.mlflow_run_id,
        artifact_dir=prepared.artifact_dir,
    )

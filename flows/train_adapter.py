"""A downstream training flow: prepare (or take) an adapter-ready artifact, train its LoRA adapter, track it.

It shows how the prepare flow chains into a larger pipeline in the three ways
Prefect offers, chosen by parameters:

    prepare="subflow"          the prepare flow runs inside this flow run (same process, same machine)
    prepare="deployment"       a run of the prepare *deployment* (any work pool, e.g. a GPU fleet), awaited
    prepared_flow_run_id=...   no preparation: the artifact that a finished prepare run made
                               (the event trigger in deployments/prefect.yaml sets it)

The training itself is deliberately small (a plain torch loop over a few
sentences); what it proves is the contract: the artifact loads back trainable,
only the adapter learns, the base weights stay bit-identical, and the result
is a new artifact whose manifest names its parent, tracked as a child MLflow
run of the prepare run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed
from pydantic import BaseModel, ConfigDict

from lora_prep.flows.prepare_model import prepare_model
from lora_prep.run_support import prefect_record, prefect_tags
from lora_prep.tasks.train import TrainedAdapter, TrainSettings, train_task
from lora_prep.tasks.errors import InvalidInput, LoraPrepError, TrackingUnavailable
from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings, SourceSettings, TrackingSettings
from lora_prep.tasks.mlflow_store import client, mlflow_errors, resolve_tracking_uri
from lora_prep.tasks.retry import TRACKING
from lora_prep.tasks.tracking import FLOW_RUN_TAG, log_artifact_run, start_run

PREPARE_DEPLOYMENT = "prepare-model/prepare-on-demand"
PREPARE_TIMEOUT_S = 12 * 3600  # the prepare flow's own timeout
PARENT_RUN_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the run under its parent


class Prepared(BaseModel):
    """Where the artifact to train is: a local directory when this machine has it, else its MLflow run."""

    model_config = ConfigDict(frozen=True)

    ref: str  # what load_adapter_ready gets: a directory or runs:/<id>
    mlflow_run_id: str
    tracking_uri: str
    prefect_flow_run_id: str | None = None
    started_by_pipeline: bool = False  # the prepare run was itself started by a flow (run_deployment)


# --- stage 1: prepare, or find a preparation ---------------------------------------------


def _flow_run_id(value: str) -> str:
    """Accept a bare id or the event resource id `prefect.flow-run.<id>` (what `{{ event.resource.id }}` gives)."""
    return value.rsplit(".", 1)[-1] if value.startswith("prefect.flow-run.") else value


def find_prepared_by_flow_run(flow_run_id: str, tracking: TrackingSettings, *, ask_who_started_it: bool = False) -> Prepared:
    """The artifact a prepare flow run made, found through MLflow (tag prefect.flow_run_id), so it works on any machine.

    Prefect's own result storage would also hold it, but only where the run's
    result storage is shared; the MLflow server is shared by design.
    ask_who_started_it: also ask Prefect whether a flow started that run (the trigger path).
    """
    from prefect import get_client

    flow_run_id = _flow_run_id(flow_run_id)
    uri = resolve_tracking_uri(tracking)
    with mlflow_errors(uri):
        mlflow = client(uri)
        experiment = mlflow.get_experiment_by_name(tracking.experiment)
        runs = [] if experiment is None else mlflow.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{FLOW_RUN_TAG}` = '{flow_run_id}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
    if not runs:
        raise InvalidInput(
            f"no FINISHED MLflow run tagged {FLOW_RUN_TAG}={flow_run_id} in experiment {tracking.experiment!r} at {uri}; "
            "pass the tracking settings the prepare run used (tracking.tracking_uri, tracking.experiment)."
        )
    run = runs[0]
    local = run.data.tags.get("lora_prep.artifact_dir")
    ref = local if local and Path(local, "manifest.json").is_file() else f"runs:/{run.info.run_id}"
    started_by_pipeline = False
    if ask_who_started_it:
        with get_client(sync_client=True) as prefect:
            # run_deployment inside a flow links the new run to a task run of that flow.
            started_by_pipeline = prefect.read_flow_run(flow_run_id).parent_task_run_id is not None
    return Prepared(ref=ref, mlflow_run_id=run.info.run_id, tracking_uri=uri, prefect_flow_run_id=flow_run_id,
                    started_by_pipeline=started_by_pipeline)


find_prepared = task(
    name="find-prepared-artifact", cache_policy=NO_CACHE, timeout_seconds=300, **TRACKING.task_options(),
)(find_prepared_by_flow_run)


def _prepare(model_id, revision, prepare, prepare_deployment, prepared_flow_run_id, settings: dict) -> Prepared:
    """Stage 1 in its three forms; runs in the flow (a subflow call cannot live in a task)."""
    tracking: TrackingSettings = settings["tracking"]
    if prepared_flow_run_id:
        return find_prepared(prepared_flow_run_id, tracking, ask_who_started_it=True)
    if not model_id:
        raise InvalidInput("model_id is required unless prepared_flow_run_id names a finished prepare run; give a Hub id such as org/name.")
    if prepare == "subflow":
        result = prepare_model(model_id=model_id, revision=revision, **settings)
        return Prepared(ref=result.artifact_dir, mlflow_run_id=result.mlflow_run_id, tracking_uri=result.mlflow_tracking_uri)

    from prefect.deployments import run_deployment

    parameters = {"model_id": model_id, "revision": revision, **{k: v.model_dump(mode="json") for k, v in settings.items()}}
    run = run_deployment(prepare_deployment, parameters=parameters, timeout=PREPARE_TIMEOUT_S)
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise LoraPrepError(
            f"prepare deployment {prepare_deployment!r} run {run.id} ended {state}"
            f"{': ' + run.state.message if run.state and run.state.message else ''}; see that flow run's logs.",
        )
    return find_prepared(str(run.id), tracking)


# --- stage 3: track ------------------------------------------------------------------------------


def log_trained(trained: TrainedAdapter, prepared: Prepared, tracking: TrackingSettings, train: TrainSettings) -> str:
    """A child run of the prepare run, in its experiment: loss curve per step, training params, the new artifact.

    The artifact goes under `artifact/` like a prepare run's, so
    `load_adapter_ready("runs:/<child run id>")` loads the trained adapter.
    """
    from mlflow.entities import Metric

    with mlflow_errors(prepared.tracking_uri):
        mlflow = client(prepared.tracking_uri)
        parent = mlflow.get_run(prepared.mlflow_run_id)
        experiment = mlflow.get_experiment(parent.info.experiment_id).name
    settings = tracking.model_copy(update={"tracking_uri": prepared.tracking_uri, "experiment": experiment})
    tags = {**prefect_tags(), PARENT_RUN_TAG: prepared.mlflow_run_id, "lora_prep.kind": "trained-adapter"}
    params = {f"train.{k}": v for k, v in train.model_dump(mode="json").items()}
    run_id = start_run(settings, tags, {**params, "parent_run_id": prepared.mlflow_run_id, "parent_artifact": prepared.ref})
    if run_id is None:
        raise TrackingUnavailable(f"MLflow at {prepared.tracking_uri} is unreachable; the trained artifact is kept at {trained.artifact_dir}.")
    stamp = int(time.time() * 1000)
    try:
        with mlflow_errors(prepared.tracking_uri):
            # One point per optimizer step: MLflow draws the curve from the step index.
            mlflow.log_batch(run_id, metrics=[Metric("loss", loss, stamp, step) for step, loss in enumerate(trained.losses)])
    except BaseException:
        with mlflow_errors(prepared.tracking_uri):
            mlflow.set_terminated(run_id, "FAILED")  # never left RUNNING; a task retry finds it by its tags again
        raise
    stats = {"eval_loss_before": trained.eval_loss_before, "eval_loss_after": trained.eval_loss_after, "final_loss": trained.losses[-1],
             "seconds.train": trained.seconds}
    return log_artifact_run(Path(trained.artifact_dir), settings, tags, stats).run_id


track_trained = task(
    name="track-trained-adapter", cache_policy=NO_CACHE, timeout_seconds=3600, **TRACKING.task_options(),
)(log_trained)



# --- the flow ------------------------------------------------------------------------------------


def _run_name() -> str:
    params = current_flow_run.parameters
    return f"train-{params.get('model_id') or 'after-' + _flow_run_id(str(params.get('prepared_flow_run_id')))[:8]}"


@flow(name="train-adapter", flow_run_name=_run_name, persist_result=True, result_serializer="json", timeout_seconds=24 * 3600)
def train_adapter(
    model_id: str | None = None,
    revision: str = "main",
    prepare: Literal["subflow", "deployment"] = "subflow",
    prepare_deployment: str = PREPARE_DEPLOYMENT,
    prepared_flow_run_id: str | None = None,
    train: TrainSettings = TrainSettings(),
    source: SourceSettings = SourceSettings(),
    load: LoadSettings = LoadSettings(),
    lora: LoraSettings = LoraSettings(),
    tracking: TrackingSettings = TrackingSettings(),
    output: OutputSettings = OutputSettings(),
):
    """Prepare a model (or take a finished preparation), train its LoRA adapter for a few steps, save and track it.

    1. prepare  as a subflow, through the prepare deployment, or take the artifact of `prepared_flow_run_id`
    2. train    load it back trainable, train the adapter only, save a new artifact naming its parent (one task; tag gpu)
    3. track    a child MLflow run of the prepare run: the loss curve and the new artifact (retried)

    Args:
        model_id: Hugging Face Hub model id to prepare; not needed with prepared_flow_run_id.
        revision: Branch, tag or full commit sha to prepare.
        prepare: subflow (the prepare flow runs inside this run) or deployment (a run of prepare_deployment, awaited).
        prepare_deployment: <flow name>/<deployment name> of the prepare deployment, used when prepare=deployment.
        prepared_flow_run_id: Train the artifact this finished prepare flow run made instead of preparing; the event trigger sets it.
        train: The training loop.
        source: Where the base model comes from (also used to load the artifact back).
        load: How to load the base model (for preparation).
        lora: The LoRA adapter (for preparation).
        tracking: MLflow tracking of the preparation; the training run is its child in the same experiment.
        output: Parent directory (output_dir) of the new, trained artifact.
    """
    settings = {"source": source, "load": load, "lora": lora, "tracking": tracking, "output": output}
    prepared = _prepare(model_id, revision, prepare, prepare_deployment, prepared_flow_run_id, settings)
    if prepared.started_by_pipeline:
        # The trigger fires on every completed prepare run; one started by a pipeline (run_deployment)
        # is trained by that pipeline, so training it here too would do the work twice.
        message = f"skipped: prepare run {prepared.prefect_flow_run_id} was started by another flow, which trains it"
        get_run_logger().info(message)
        return Completed(message=message)
    trained = train_task(prepared.ref, prepared.mlflow_run_id, prepared.tracking_uri, train, source, output, prefect_record())
    run_id = track_trained(trained, prepared, tracking, train)
    return trained.model_copy(update={"mlflow_run_id": run_id, "parent_mlflow_run_id": prepared.mlflow_run_id})

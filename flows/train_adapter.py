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

from typing import TYPE_CHECKING, Any, Literal, cast

from prefect import flow, get_run_logger
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed, State

from lora_prep.flows.prepare_model import prepare_model
from lora_prep.run_support import prefect_record, prefect_tags
from lora_prep.tasks import train as training  # `train` is this flow's settings parameter
from lora_prep.tasks.errors import InvalidInput, LoraPrepError
from lora_prep.tasks.records.results import Prepared, TrainedAdapter
from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings, SourceSettings, TrackingSettings, TrainSettings
from lora_prep.tasks.track import track_trained

if TYPE_CHECKING:
    from prefect.client.schemas.objects import FlowRun

PREPARE_DEPLOYMENT = "prepare-model/prepare-on-demand"
PREPARE_TIMEOUT_S = 12 * 3600  # the prepare flow's own timeout


# --- stage 1: prepare, or find a preparation ---------------------------------------------


def _prepare(
    model_id: str | None, revision: str, prepare: str, prepare_deployment: str, prepared_flow_run_id: str | None, settings: dict[str, Any]
) -> Prepared:
    """Stage 1 in its three forms; runs in the flow (a subflow call cannot live in a task)."""
    tracking: TrackingSettings = settings["tracking"]
    if prepared_flow_run_id:
        return training.find_prepared(prepared_flow_run_id, tracking, ask_who_started_it=True)
    if not model_id:
        raise InvalidInput("model_id is required unless prepared_flow_run_id names a finished prepare run; give a Hub id such as org/name.")
    if prepare == "subflow":
        result = prepare_model(model_id=model_id, revision=revision, **settings)
        return Prepared(ref=result.artifact_dir, mlflow_run_id=result.mlflow_run_id, tracking_uri=result.mlflow_tracking_uri)

    from prefect.deployments import run_deployment

    parameters = {"model_id": model_id, "revision": revision, **{k: v.model_dump(mode="json") for k, v in settings.items()}}
    # Called from this sync flow, Prefect's async_dispatch runs the sync implementation: a FlowRun, not a coroutine.
    run = cast("FlowRun", run_deployment(prepare_deployment, parameters=parameters, timeout=PREPARE_TIMEOUT_S))
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        raise LoraPrepError(
            f"prepare deployment {prepare_deployment!r} run {run.id} ended {state}"
            f"{': ' + run.state.message if run.state and run.state.message else ''}; see that flow run's logs.",
        )
    return training.find_prepared(str(run.id), tracking)


# --- the flow ------------------------------------------------------------------------------------


def _run_name() -> str:
    params = current_flow_run.parameters
    return f"train-{params.get('model_id') or 'after-' + training.flow_run_id_of(str(params.get('prepared_flow_run_id')))[:8]}"


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
) -> TrainedAdapter | State:
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
    trained = training.train(prepared.ref, prepared.mlflow_run_id, prepared.tracking_uri, train, source, output, prefect_record())
    run_id = track_trained(trained, prepared, tracking, train, prefect_tags())
    return trained.model_copy(update={"mlflow_run_id": run_id, "parent_mlflow_run_id": prepared.mlflow_run_id})

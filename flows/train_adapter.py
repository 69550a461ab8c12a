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

import hashlib
import time
from pathlib import Path
from typing import Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run as current_flow_run
from prefect.states import Completed
from pydantic import BaseModel, ConfigDict, Field

from lora_prep.flows.prepare_model import _prefect_record, _prefect_tags, prepare_model
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


# --- stage 2: train (one task: the model never leaves it) ------------------------------------

# A tiny corpus made here: enough for a few steps of next-token loss to fall measurably.
SENTENCES = (
    "The adapter learns while the base model stays frozen.",
    "A small matrix next to a large one is cheap to train.",
    "Every training step lowers the loss on these sentences a little.",
    "The tokenizer turns text into ids and the model predicts the next id.",
    "Only the low rank matrices receive gradients; the rest is read only.",
    "A commit sha names the exact weights the adapter was trained on.",
    "The loss curve is logged once per step to the tracking server.",
    "A new artifact records its parent so the lineage can be followed.",
)


class TrainSettings(BaseModel):
    """The training loop: AdamW on the adapter parameters only, causal LM loss on a built-in corpus."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(default=20, gt=0, le=1_000_000, description="Optimizer steps.")
    lr: float = Field(default=5e-3, gt=0, lt=1, description="AdamW learning rate (LoRA takes rates ~10x those of full fine-tuning).")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay (0: an adapter weight changes only by its gradient).")
    batch_size: int = Field(default=4, gt=0, le=4096, description="Sentences per step.")
    max_length: int = Field(default=32, gt=1, le=1_000_000, description="Tokens per sentence; longer ones are cut.")
    seed: int = Field(default=0, ge=0, description="Seed for dropout and batch order.")
    verify_base: bool = Field(
        default=True,
        description="Hash every base weight before and after training to prove it did not change. Reads all weights twice (seconds per GB).",
    )


class TrainedAdapter(BaseModel):
    """What training returns: small JSON, with the evidence that only the adapter learned."""

    model_config = ConfigDict(frozen=True)

    artifact_dir: str  # the new artifact
    parent_ref: str  # the artifact trained (directory or runs:/ URI)
    parent_mlflow_run_id: str
    mlflow_run_id: str | None = None  # the child run, once tracked
    steps: int
    lr: float
    losses: list[float]  # training loss per step
    eval_loss_before: float  # the whole corpus, eval mode (no dropout), before the first step
    eval_loss_after: float
    trainable_params: int
    trainable_outside_adapter: list[str]  # parameters with requires_grad that are not LoRA: must be empty
    adapter_tensors: int
    adapter_tensors_changed: int
    # sha256 of every weight that is not LoRA (None when verify_base is off). With lora.bias other
    # than "none" the biases train too and show in trainable_outside_adapter; the hash then changes.
    base_sha256_before: str | None
    base_sha256_after: str | None
    seconds: float


def is_adapter_param(name: str) -> bool:
    """PEFT names: lora_A/lora_B (and lora_embedding_*, lora_magnitude_vector for DoRA), and modules_to_save copies."""
    return "lora_" in name or ".modules_to_save." in name


def weights_sha256(named_params) -> str:
    """One sha256 over names and raw bytes, a tensor at a time (never a second copy of the model in memory)."""
    import torch

    digest = hashlib.sha256()
    for name, param in named_params:
        digest.update(name.encode())
        data = param.detach()
        if data.device.type != "cpu":
            data = data.cpu()
        digest.update(data.contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _batches(tokenizer, settings: TrainSettings, device):
    """Fixed batches of the corpus; labels are the input ids with padding masked out (-100)."""
    batches = []
    for start in range(0, len(SENTENCES), settings.batch_size):
        enc = tokenizer(list(SENTENCES[start:start + settings.batch_size]), return_tensors="pt", padding=True,
                        truncation=True, max_length=settings.max_length)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        batches.append({"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device), "labels": labels.to(device)})
    return batches


def _eval_loss(model, batches) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        losses = [model(**batch).loss.item() for batch in batches]
    return sum(losses) / len(losses)


def train_and_save(parent_ref: str, parent_run_id: str, tracking_uri: str, settings: TrainSettings,
                   source: SourceSettings, output: OutputSettings) -> TrainedAdapter:
    """Load the artifact trainable, train the adapter, save it as a new artifact whose manifest names its parent."""
    import torch

    from lora_prep.tasks.artifact import artifact_name, artifact_parent, model_card, package_versions, utc_now, write_artifact
    from lora_prep.tasks.artifact_load import load_adapter_ready
    from lora_prep.tasks.build import _files, save_adapter
    from lora_prep.tasks.manifest import Manifest, ParentRecord, TrainingRecord
    from lora_prep.tasks.tokenizer import save_tokenizer

    started = time.perf_counter()
    torch.manual_seed(settings.seed)
    ready = load_adapter_ready(parent_ref, trainable=True, tracking_uri=tracking_uri, source=source)
    model, tokenizer = ready.model, ready.tokenizer
    if tokenizer.pad_token is None:  # prepared artifacts carry one; a hand-made one may not
        tokenizer.pad_token = tokenizer.eos_token

    named = list(model.named_parameters())
    trainable = [(n, p) for n, p in named if p.requires_grad]
    adapter_before = {n: p.detach().clone() for n, p in named if is_adapter_param(n)}  # small: the adapter only
    base = [(n, p) for n, p in named if not is_adapter_param(n)]
    base_before = weights_sha256(base) if settings.verify_base else None

    batches = _batches(tokenizer, settings, model.get_input_embeddings().weight.device)
    eval_before = _eval_loss(model, batches)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    losses = []
    for step in range(settings.steps):
        loss = model(**batches[step % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 6))
    eval_after = _eval_loss(model, batches)

    params_now = dict(model.named_parameters())
    changed = sum(not torch.equal(before, params_now[n].detach()) for n, before in adapter_before.items())
    base_after = weights_sha256(base) if settings.verify_base else None
    training = TrainingRecord(
        steps=settings.steps, lr=settings.lr, settings=settings.model_dump(mode="json"), corpus_sentences=len(SENTENCES),
        losses=losses, final_loss=losses[-1], eval_loss_before=eval_before, eval_loss_after=eval_after,
        base_sha256_before=base_before, base_sha256_after=base_after,
    )
    base_record = ready.manifest.base_model

    def fill(tmp: Path) -> Manifest:
        save_adapter(model, tmp / "adapter", base_record.name_or_path, base_record.commit_sha,
                     save_embedding_layers=ready.manifest.adapter.save_embedding_layers)
        save_tokenizer(tokenizer, tmp / "tokenizer")
        adapter = ready.manifest.adapter.model_copy(update={"trained": True, "files": _files(tmp / "adapter")})
        # The parent's manifest, extended through the model: same base, plan and targets; new adapter, lineage, training.
        return ready.manifest.model_copy(update={
            "created_at": utc_now(), "versions": package_versions(), "adapter": adapter, "tracking": None,
            "parent": ParentRecord(artifact=str(parent_ref), mlflow_run_id=parent_run_id), "training": training,
            "prefect": _prefect_record(),
        })

    parent_dir = artifact_parent(output)
    name = output.name or f"{artifact_name(base_record.name_or_path, base_record.commit_sha or base_record.content_digest)}--trained"
    artifact_dir = write_artifact(parent_dir, name, fill, lambda m: model_card(m) + _training_card(m))
    get_run_logger().info("trained %d steps: loss %.4f -> %.4f; artifact %s", settings.steps, eval_before, eval_after, artifact_dir)
    return TrainedAdapter(
        artifact_dir=str(artifact_dir), parent_ref=str(parent_ref), parent_mlflow_run_id=parent_run_id, steps=settings.steps,
        lr=settings.lr, losses=losses, eval_loss_before=eval_before, eval_loss_after=eval_after,
        trainable_params=sum(p.numel() for _, p in trainable),
        trainable_outside_adapter=[n for n, _ in trainable if not is_adapter_param(n)],
        adapter_tensors=len(adapter_before), adapter_tensors_changed=changed,
        base_sha256_before=base_before, base_sha256_after=base_after, seconds=round(time.perf_counter() - started, 3),
    )


def _training_card(manifest) -> str:
    t, parent = manifest.training, manifest.parent
    return (f"\n## Training\n\nTrained {t.steps} steps at lr {t.lr} from `{parent.artifact}` "
            f"(MLflow run `{parent.mlflow_run_id}`): eval loss {t.eval_loss_before:.4f} -> {t.eval_loss_after:.4f}.\n")


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
    tags = {**_prefect_tags(), PARENT_RUN_TAG: prepared.mlflow_run_id, "lora_prep.kind": "trained-adapter"}
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

# tag "gpu": the same tag concurrency limit as the prepare flow's build task (one model per GPU slot).
train_task = task(name="train-adapter", tags=["gpu"], cache_policy=NO_CACHE, timeout_seconds=12 * 3600)(train_and_save)


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
    trained = train_task(prepared.ref, prepared.mlflow_run_id, prepared.tracking_uri, train, source, output)
    run_id = track_trained(trained, prepared, tracking, train)
    return trained.model_copy(update={"mlflow_run_id": run_id, "parent_mlflow_run_id": prepared.mlflow_run_id})

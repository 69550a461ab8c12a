"""Stage 2 of the training flow (flows/train_adapter.py): train the LoRA adapter of an artifact, in one task.

Deliberately small (a plain torch loop over a few built-in sentences); what it proves is the
contract: the artifact loads back trainable, only the adapter learns, the base weights stay
bit-identical, and the result is a new artifact whose manifest names its parent.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import task
from prefect.cache_policies import NO_CACHE

from lora_prep.tasks.artifact.card import training_card
from lora_prep.tasks.common.logs import run_logger
from lora_prep.tasks.common.retry import TRACKING
from lora_prep.tasks.errors import InvalidInput
from lora_prep.tasks.records.manifest import MANIFEST, PrefectRecord
from lora_prep.tasks.records.results import Prepared, TrainedAdapter
from lora_prep.tasks.settings import OutputSettings, SourceSettings, TrackingSettings, TrainSettings
from lora_prep.tasks.tracking.runs import preparation_of_flow_run
from lora_prep.tasks.tracking.store import resolve_tracking_uri

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


def is_adapter_param(name: str) -> bool:
    """PEFT names: lora_A/lora_B (and lora_embedding_*, lora_magnitude_vector for DoRA), and modules_to_save copies."""
    return "lora_" in name or ".modules_to_save." in name


def weights_sha256(named_params: Iterable[tuple[str, Any]]) -> str:
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


def batches(tokenizer: Any, settings: TrainSettings, device: Any) -> list[dict[str, Any]]:
    """Fixed batches of the corpus; labels are the input ids with padding masked out (-100)."""
    out = []
    for start in range(0, len(SENTENCES), settings.batch_size):
        enc = tokenizer(
            list(SENTENCES[start : start + settings.batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=settings.max_length,
        )
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append(
            {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device), "labels": labels.to(device)}
        )
    return out


def eval_loss(model: Any, batches: list[dict[str, Any]]) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        losses = [model(**batch).loss.item() for batch in batches]
    return sum(losses) / len(losses)


def train_and_save(
    parent_ref: str,
    parent_run_id: str,
    tracking_uri: str,
    settings: TrainSettings,
    source: SourceSettings,
    output: OutputSettings,
    prefect: PrefectRecord = PrefectRecord(),
) -> TrainedAdapter:
    """Load the artifact trainable, train the adapter, save it as a new artifact whose manifest names its parent."""
    import torch

    from lora_prep.tasks.artifact.card import model_card
    from lora_prep.tasks.artifact.load_back import load_adapter_ready
    from lora_prep.tasks.artifact.write import (
        artifact_name,
        artifact_parent,
        package_versions,
        utc_now,
        write_artifact,
    )
    from lora_prep.tasks.artifact.write import file_records as _files
    from lora_prep.tasks.lora.wrap import save_adapter
    from lora_prep.tasks.model.tokenizer import save_tokenizer
    from lora_prep.tasks.records.manifest import Manifest, ParentRecord, TrainingRecord

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

    data = batches(tokenizer, settings, model.get_input_embeddings().weight.device)
    eval_before = eval_loss(model, data)
    optimizer = torch.optim.AdamW([p for _, p in trainable], lr=settings.lr, weight_decay=settings.weight_decay)
    model.train()
    losses = []
    for step in range(settings.steps):
        loss = model(**data[step % len(data)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 6))
    eval_after = eval_loss(model, data)

    params_now = dict(model.named_parameters())
    changed = sum(not torch.equal(before, params_now[n].detach()) for n, before in adapter_before.items())
    base_after = weights_sha256(base) if settings.verify_base else None
    training = TrainingRecord(
        steps=settings.steps,
        lr=settings.lr,
        settings=settings.model_dump(mode="json"),
        corpus_sentences=len(SENTENCES),
        losses=losses,
        final_loss=losses[-1],
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        base_sha256_before=base_before,
        base_sha256_after=base_after,
    )
    base_record = ready.manifest.base_model

    def fill(tmp: Path) -> Manifest:
        save_adapter(
            model,
            tmp / "adapter",
            base_record.name_or_path,
            base_record.commit_sha,
            save_embedding_layers=ready.manifest.adapter.save_embedding_layers,
        )
        save_tokenizer(tokenizer, tmp / "tokenizer")
        adapter = ready.manifest.adapter.model_copy(update={"trained": True, "files": _files(tmp / "adapter")})
        # The parent's manifest, extended through the model: same base, plan and targets; new adapter, lineage, training.
        return ready.manifest.model_copy(
            update={
                "created_at": utc_now(),
                "versions": package_versions(),
                "adapter": adapter,
                "tracking": None,
                "parent": ParentRecord(artifact=str(parent_ref), mlflow_run_id=parent_run_id),
                "training": training,
                "prefect": prefect,
            }
        )

    parent_dir = artifact_parent(output)
    name = output.name or f"{artifact_name(base_record.name_or_path, base_record.commit_sha or base_record.content_digest)}--trained"
    artifact_dir = write_artifact(parent_dir, name, fill, lambda m: model_card(m) + training_card(m))
    run_logger(__name__).info("trained %d steps: loss %.4f -> %.4f; artifact %s", settings.steps, eval_before, eval_after, artifact_dir)
    return TrainedAdapter(
        artifact_dir=str(artifact_dir),
        parent_ref=str(parent_ref),
        parent_mlflow_run_id=parent_run_id,
        steps=settings.steps,
        lr=settings.lr,
        losses=losses,
        eval_loss_before=eval_before,
        eval_loss_after=eval_after,
        trainable_params=sum(p.numel() for _, p in trainable),
        trainable_outside_adapter=[n for n, _ in trainable if not is_adapter_param(n)],
        adapter_tensors=len(adapter_before),
        adapter_tensors_changed=changed,
        base_sha256_before=base_before,
        base_sha256_after=base_after,
        seconds=round(time.perf_counter() - started, 3),
    )


# tag "gpu": the same tag concurrency limit as the prepare flow's build task (one model per GPU slot).
train = task(name="train", tags=["gpu"], cache_policy=NO_CACHE, timeout_seconds=12 * 3600)(train_and_save)


# --- finding what to train --------------------------------------------------------------------------


def flow_run_id_of(value: str) -> str:
    """A bare flow run id, from itself or the event resource id ``prefect.flow-run.<id>`` (``{{ event.resource.id }}``)."""
    return value.rsplit(".", 1)[-1] if value.startswith("prefect.flow-run.") else value


def find_prepared_artifact(flow_run_id: str, tracking: TrackingSettings, *, ask_who_started_it: bool = False) -> Prepared:
    """The artifact a prepare flow run made, found through MLflow (its run is tagged with the flow run id), so it
    works on any machine: Prefect's result storage would hold it too, but only where that storage is shared;
    the MLflow server is shared by design. ask_who_started_it: also ask Prefect whether a flow started that
    run (the trigger path)."""
    flow_run_id = flow_run_id_of(flow_run_id)
    found = preparation_of_flow_run(tracking, flow_run_id)
    if found is None:
        raise InvalidInput(
            f"no FINISHED MLflow run of prepare flow run {flow_run_id} in experiment {tracking.experiment!r} at "
            f"{resolve_tracking_uri(tracking)}; pass the tracking settings the prepare run used (tracking.tracking_uri, tracking.experiment)."
        )
    local = found.artifact_dir
    ref = local if local and Path(local, MANIFEST).is_file() else f"runs:/{found.run_id}"
    started_by_pipeline = False
    if ask_who_started_it:
        from prefect import get_client

        with get_client(sync_client=True) as prefect:
            # run_deployment inside a flow links the new run to a task run of that flow.
            started_by_pipeline = prefect.read_flow_run(UUID(flow_run_id)).parent_task_run_id is not None
    return Prepared(
        ref=ref,
        mlflow_run_id=found.run_id,
        tracking_uri=found.tracking_uri,
        prefect_flow_run_id=flow_run_id,
        started_by_pipeline=started_by_pipeline,
    )


find_prepared = task(
    name="find-preparation-of-flow-run",
    cache_policy=NO_CACHE,
    timeout_seconds=300,
    **TRACKING.task_options(),
)(find_prepared_artifact)

"""The prepare flow: a Hub model id (or a local model directory) in, a tracked, adapter-ready LoRA artifact out.

Run it with `lora-prep prepare <model id>`, from a Prefect deployment
(`deployments/prefect.yaml`), or as a subflow of a training pipeline.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from lora_prep.run_support import (
    StageClock,
    library_logs_to_prefect,
    prefect_record,
    prefect_tags,
    process_tags_on_the_flow_run_only,
    publish_run_artifacts,
)
from lora_prep.tasks.build import build
from lora_prep.tasks.download import download
from lora_prep.tasks.plan import plan
from lora_prep.tasks.probe import probe
from lora_prep.tasks.records.results import PreparedModel
from lora_prep.tasks.resolve import resolve
from lora_prep.tasks.settings import (
    LoadSettings,
    LoraSettings,
    OutputSettings,
    SourceSettings,
    TrackingSettings,
)
from lora_prep.tasks.track import open_run, track
from lora_prep.tasks.tracking.runs import fail_run


def _claim_flow_run(flow: Any, flow_run: Any, state: Any) -> None:
    """on_running hook: the flow run names this process, however it was started (the CLI tags it at creation)."""
    from lora_prep.tasks.tracking.reaper import claim_flow_run

    claim_flow_run(str(flow_run.id), list(flow_run.tags or []))


def _mark_run_failed(flow: Any, flow_run: Any, state: Any) -> None:
    """on_failure / on_crashed / on_cancellation hook: no MLflow run is left RUNNING."""
    tracking = TrackingSettings.model_validate(flow_run.parameters.get("tracking") or {})
    fail_run(tracking, str(flow_run.id))


@flow(
    name="prepare-model",
    flow_run_name="prepare-{model_id}@{revision}",
    persist_result=True,
    result_serializer="json",
    timeout_seconds=12 * 3600,
    on_running=[_claim_flow_run],
    on_failure=[_mark_run_failed],
    on_crashed=[_mark_run_failed],
    on_cancellation=[_mark_run_failed],
)
def prepare_model(
    model_id: str,
    revision: str = "main",
    source: SourceSettings = SourceSettings(),
    load: LoadSettings = LoadSettings(),
    lora: LoraSettings = LoraSettings(),
    tracking: TrackingSettings = TrackingSettings(),
    output: OutputSettings = OutputSettings(),
) -> PreparedModel:
    """Prepare `model_id` at `revision` for LoRA fine-tuning.

    1. resolve   the revision to a commit sha; select the files; read parameter count and dtypes from the headers
    2. probe     the hardware
    3. plan      load plan, LoRA targets on the model's skeleton, output directory; every refusal here, before any weight moves
    4. download  the selected files at the sha into the HF cache, verified (cached task, retried)
    5. build     load the model, wrap it with LoRA, run it once, write the artifact directory (one task; tag gpu)
    6. track     log the artifact to MLflow as a logged model, register it if asked (retried)

    Args:
        model_id: Hugging Face Hub model id (e.g. Qwen/Qwen2.5-0.5B), or a local directory with config, tokenizer and safetensors.
        revision: Branch, tag or full 40-hex commit sha; resolved to a commit sha before anything is fetched. For a local directory: unused, or the digest of its *.py files to allow its remote code.
        source: Where the files come from: cache directory, offline, pickle and token settings.
        load: How the base model is loaded: dtype, attention, placement, quantization, memory budget.
        lora: The LoRA adapter: rank, alpha, dropout, target modules, initialisation, seed.
        tracking: MLflow tracking URI, experiment, and optional Model Registry name and alias.
        output: Where the artifact directory is written.
    """
    clock = StageClock()
    with library_logs_to_prefect(), process_tags_on_the_flow_run_only():
        with clock("resolve"):
            facts = resolve(model_id, revision, source)
        with clock("probe"):
            profile = probe(source.cache_dir, kbit=load.quantization != "none")
        with clock("plan"):
            planned = plan(profile, facts, load, lora, output, revision, source, tracking)
        opened = open_run.submit(tracking, facts, prefect_tags())  # in a worker thread, while the weights download
        try:
            with clock("download"):
                snapshot = download(facts, source)
        finally:  # the run exists before any failure hook looks for it; an unreachable MLflow is tried again by track
            # Waited for before the build, not after: overlapping MLflow's import with the load and the wrapping
            # (both Python-heavy, one GIL) made the build 2-3 s slower on 2 cores and the whole run no faster (make bench).
            opened.wait()
        with clock("build"):
            built = build(snapshot, facts, profile, planned, load, lora, output, prefect_record(), source.allow_pickle)
        with clock("track"):
            tracked = track(built.artifact_dir, tracking, prefect_tags(), clock.metrics(built, snapshot))
        result = PreparedModel.assemble(revision, facts, snapshot, built, tracked, clock.seconds)
        publish_run_artifacts(result, planned)
    return result

"""`lora-prep plan`: what prepare would do, without downloading any weights.

Resolves the sha, lists the files it would fetch with their bytes (and which are already in
the cache), reads parameter count and dtypes from the safetensors headers (ranged reads),
probes the machine, plans the load, resolves the LoRA targets on the model's skeleton (module
names, fused expert parameters, exclusions, exact trainable parameters), checks the output
directory, and says whether it fits. No Prefect server, no MLflow, nothing written.
"""

from __future__ import annotations

from lora_prep.tasks.records.hub import RepoFacts
from lora_prep.tasks.records.plan import PlannedFile, PlanReport
from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings, SourceSettings, TrackingSettings


def _cached(facts: RepoFacts, cache_dir: str | None) -> list[str]:
    if facts.is_local:
        return list(facts.selected)
    from huggingface_hub import try_to_load_from_cache

    return [
        p
        for p in facts.selected
        if isinstance(try_to_load_from_cache(facts.repo_id, p, cache_dir=cache_dir, revision=facts.commit_sha), str)
    ]


def dry_run(
    model_id: str,
    revision: str,
    source: SourceSettings,
    load: LoadSettings,
    lora: LoraSettings,
    output: OutputSettings = OutputSettings(),
    tracking: TrackingSettings = TrackingSettings(),
    *,
    ends_process: bool = False,
) -> PlanReport:
    """The prepare flow's first three stages, called as the flow calls them (their plain functions), and the report.

    ends_process=True (a caller whose process exits after the report, as the `lora-prep` console
    script's does): a plan without quantization keeps bitsandbytes unimported
    (tasks/machine/kbit.py keep_bitsandbytes_out says why, and why only there).
    """
    from lora_prep.tasks.hub.env import cache_dir_for
    from lora_prep.tasks.hub.repo import resolve_model
    from lora_prep.tasks.machine.hardware import probe_hardware
    from lora_prep.tasks.machine.kbit import one_run_process
    from lora_prep.tasks.preflight import plan_prepare

    # The functions the flow's resolve, probe and plan tasks wrap, in the flow's order.
    facts = resolve_model(model_id, revision, source)
    profile = probe_hardware(source.cache_dir, kbit=load.quantization != "none")
    if ends_process:
        one_run_process()
    planned = plan_prepare(profile, facts, load, lora, output, revision, source, tracking, enforce_fit=False, create_output=False)
    sizes = {f.path: f.size for f in facts.files}
    cached = set(_cached(facts, cache_dir_for(source)))
    return PlanReport(
        repo_id=facts.repo_id,
        source=facts.source,
        revision=revision,
        commit_sha=facts.commit_sha,
        files=[PlannedFile(path=p, bytes=sizes.get(p, 0), cached=p in cached) for p in facts.selected],
        bytes_total=facts.selected_bytes,
        bytes_to_download=sum(sizes.get(p, 0) for p in facts.selected if p not in cached),
        files_cached=len(cached),
        param_count=facts.param_count,
        stored_dtypes=facts.stored_dtypes,
        disk_free_bytes=profile.disk_free_bytes,
        lora=lora,
        plan=planned.load,
        targets=planned.targets,
        artifact_parent=planned.artifact_parent,
        fits=planned.load.fits,
        refusal=None if planned.load.fits else planned.load.reasons["fit"].removeprefix("does not fit: "),
        memory_estimate_bytes=planned.load.estimate_bytes + planned.load.overhead_bytes,
        memory_available_bytes=planned.load.available_bytes,
    )

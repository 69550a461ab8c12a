"""`lora-prep plan`: what prepare would do, without downloading any weights.

Resolves the sha, lists the files it would fetch with their bytes (and which are already in
the cache), reads parameter count and dtypes from the safetensors headers (ranged reads),
probes the machine, plans the load, resolves the LoRA targets on the model's skeleton (module
names, fused expert parameters, exclusions, exact trainable parameters), checks the output
directory, and says whether it fits. No Prefect server, no MLflow, nothing written.
"""

from __future__ import annotations

from lora_prep.tasks.common.units import format_bytes
from lora_prep.tasks.records.plan import PlannedFile, PlanReport
from lora_prep.tasks.settings import (
    LoadSettings,
    LoraSettings,
    OutputSettings,
    SourceSettings,
)


def _cached(facts, cache_dir: str | None) -> list[str]:
    if facts.is_local:
        return list(facts.selected)
    from huggingface_hub import try_to_load_from_cache

    return [p for p in facts.selected
            if isinstance(try_to_load_from_cache(facts.repo_id, p, cache_dir=cache_dir, revision=facts.commit_sha), str)]


def dry_run(model_id: str, revision: str, source: SourceSettings, load: LoadSettings, lora: LoraSettings,
            output: OutputSettings = OutputSettings()) -> PlanReport:
    from lora_prep.tasks.hub.env import cache_dir_for, get_token
    from lora_prep.tasks.hub.repo import resolve_repo
    from lora_prep.tasks.machine.hardware import probe_hardware
    from lora_prep.tasks.plan import plan_prepare

    facts = resolve_repo(model_id, revision, source, token=get_token(source))
    profile = probe_hardware(source.cache_dir)
    plan = plan_prepare(profile, facts, load, lora, output, revision, source, enforce_fit=False, create_output=False)
    sizes = {f.path: f.size for f in facts.files}
    cached = set(_cached(facts, cache_dir_for(source)))
    return PlanReport(
        repo_id=facts.repo_id, source=facts.source, revision=revision, commit_sha=facts.commit_sha,
        files=[PlannedFile(path=p, bytes=sizes.get(p, 0), cached=p in cached) for p in facts.selected],
        bytes_total=facts.selected_bytes, bytes_to_download=sum(sizes.get(p, 0) for p in facts.selected if p not in cached),
        files_cached=len(cached), param_count=facts.param_count, stored_dtypes=facts.stored_dtypes,
        disk_free_bytes=profile.disk_free_bytes, lora=lora, plan=plan.load, targets=plan.targets,
        artifact_parent=plan.artifact_parent, fits=plan.load.fits,
        refusal=None if plan.load.fits else plan.load.reasons["fit"].removeprefix("does not fit: "),
        memory_estimate_bytes=plan.load.estimate_bytes + plan.load.overhead_bytes, memory_available_bytes=plan.load.available_bytes,
    )


def format_dry_run(r: PlanReport) -> str:
    t = r.targets
    pin = r.commit_sha or "local directory"
    lines = [
        f"model      {r.repo_id} @ {pin} (requested {r.revision})",
        f"files      {len(r.files)} to use, {r.files_cached} already cached; {r.bytes_to_download:,} of {r.bytes_total:,} bytes to download",
    ]
    lines += [f"  {'cached ' if f.cached else 'fetch  '} {f.bytes:>14,}  {f.path}" for f in r.files]
    lines.append(f"params     {r.param_count:,} ({', '.join(f'{k}: {v:,}' for k, v in r.stored_dtypes.items())})"
                 if r.param_count else "params     unknown (no safetensors headers)")
    lines.append(f"memory     needs {format_bytes(r.memory_estimate_bytes)} of {format_bytes(r.memory_available_bytes)} available")
    lines += [f"plan       {k:<14} {v}" for k, v in r.plan.reasons.items()]
    leaves = sorted({m.rsplit('.', 1)[-1] for m in t.target_modules})
    lines.append(f"lora       r={r.lora.r} alpha={r.lora.alpha} dropout={t.dropout} on {len(t.target_modules)} modules: {', '.join(leaves)}")
    if t.target_parameters:
        lines.append(f"experts    {len(t.target_parameters)} fused expert parameters: {', '.join(t.expert_parameter_leaves)} (dropout {t.dropout_reason})")
    for name, why in list(t.excluded.items())[:6]:
        lines.append(f"left out   {name}: {why}")
    if len(t.excluded) > 6:
        lines.append(f"left out   ... and {len(t.excluded) - 6} more (see --json)")
    if t.trainable_params is not None:
        lines.append(f"trainable  {t.trainable_params:,} of {t.total_params:,} parameters")
    lines.append(f"artifact   under {r.artifact_parent}")
    lines.append("fits       yes" if r.fits else f"fits       NO: {r.refusal}")
    return "\n".join(lines)

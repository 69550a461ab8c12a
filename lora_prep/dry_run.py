"""`lora-prep plan`: what prepare would do, without downloading any weights.

Resolves the sha, lists the files it would fetch with their bytes (and which
are already in the cache), reads parameter count and dtypes from the
safetensors headers (ranged reads), probes the machine, plans the load,
resolves the LoRA targets on an empty (meta-device) model built from the
config, and says whether it fits. No Prefect server, no MLflow.
"""

from __future__ import annotations

from typing import Any

from lora_prep.tasks.errors import DoesNotFit
from lora_prep.tasks.settings import LoadSettings, LoraSettings, SourceSettings


def _cached(facts, cache_dir: str | None) -> list[str]:
    from huggingface_hub import try_to_load_from_cache

    hits = []
    for path in facts.selected:
        found = try_to_load_from_cache(facts.repo_id, path, cache_dir=cache_dir, revision=facts.commit_sha)
        if isinstance(found, str):
            hits.append(path)
    return hits


def _meta_targets(facts, lora: LoraSettings) -> list[str] | str:
    """Target modules resolved on a weightless model: same module names and types as the real one."""
    if facts.config.get("auto_map"):
        return "not resolved: the model needs remote code (resolved at load time)"
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from lora_prep.tasks.lora import resolve_targets

    config = AutoConfig.for_model(**facts.config)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return resolve_targets(model, lora)


def dry_run(model_id: str, revision: str, source: SourceSettings, load: LoadSettings, lora: LoraSettings) -> dict[str, Any]:
    from lora_prep.tasks.hardware import probe_hardware
    from lora_prep.tasks.hub import get_token, resolve_repo
    from lora_prep.tasks.plan import plan_for_repo

    facts = resolve_repo(model_id, revision, source, token=get_token(source))
    profile = probe_hardware(source.cache_dir)
    sizes = {f.path: f.size for f in facts.files}
    cached = _cached(facts, source.cache_dir)
    report: dict[str, Any] = {
        "repo_id": facts.repo_id,
        "revision": revision,
        "commit_sha": facts.commit_sha,
        "files": [{"path": p, "bytes": sizes.get(p, 0), "cached": p in cached} for p in facts.selected],
        "bytes_total": facts.selected_bytes,
        "bytes_to_download": sum(sizes.get(p, 0) for p in facts.selected if p not in cached),
        "files_cached": len(cached),
        "param_count": facts.param_count,
        "stored_dtypes": facts.stored_dtypes,
        "disk_free_bytes": profile.disk_free_bytes,
        "lora": lora.model_dump(mode="json"),
    }
    try:
        plan = plan_for_repo(profile, facts, load, revision)
    except DoesNotFit as exc:
        report.update(fits=False, refusal=str(exc))
        return report
    report.update(
        fits=True,
        plan=plan.model_dump(mode="json"),
        memory_estimate_bytes=plan.estimate_bytes + plan.overhead_bytes,
        memory_available_bytes=plan.available_bytes,
    )
    report["target_modules"] = _meta_targets(facts, lora)
    return report


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def format_dry_run(r: dict[str, Any]) -> str:
    lines = [
        f"model      {r['repo_id']} @ {r['commit_sha']} (requested {r['revision']})",
        f"files      {len(r['files'])} to use, {r['files_cached']} already cached; {r['bytes_to_download']:,} of {r['bytes_total']:,} bytes to download",
    ]
    lines += [f"  {'cached ' if f['cached'] else 'fetch  '} {f['bytes']:>14,}  {f['path']}" for f in r["files"]]
    lines.append(f"params     {r['param_count']:,} ({', '.join(f'{k}: {v:,}' for k, v in r['stored_dtypes'].items())})" if r["param_count"] else "params     unknown (no safetensors headers)")
    if not r["fits"]:
        lines.append(f"fits       NO: {r['refusal']}")
        return "\n".join(lines)
    plan = r["plan"]
    lines.append(f"memory     needs {_gib(r['memory_estimate_bytes'])} of {_gib(r['memory_available_bytes'])} available")
    lines += [f"plan       {k:<14} {v}" for k, v in plan["reasons"].items()]
    targets = r.get("target_modules")
    if isinstance(targets, list):
        names = sorted({t.rsplit('.', 1)[-1] for t in targets})
        lines.append(f"lora       r={r['lora']['r']} alpha={r['lora']['alpha']} on {len(targets)} layers: {', '.join(names)}")
    else:
        lines.append(f"lora       r={r['lora']['r']} alpha={r['lora']['alpha']}; targets {targets}")
    lines.append("fits       yes")
    return "\n".join(lines)

"""Plan how to load a model on this machine, before any weight is downloaded.

``plan_load(profile, facts, settings, requested_revision) -> LoadPlan`` is
pure: it reads a HardwareProfile (tasks/machine/hardware.py) and ModelFacts (config
and safetensors headers) and returns every decision with a one-line reason, or
raises one typed error listing every problem at once. It never imports torch,
so it is tested on any machine with synthetic profiles.

ModelFacts (tasks/model/facts.py) is what it knows about the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from lora_prep.tasks.common.units import format_bytes
from lora_prep.tasks.common.units import parse_size as _parse_size
from lora_prep.tasks.errors import DoesNotFit, InvalidInput
from lora_prep.tasks.model.facts import ModelFacts
from lora_prep.tasks.model.rules import (
    MARGIN_FIXED_BYTES,
    MARGIN_FRACTION,
    _budgets,
    _choose_attn,
    _choose_dtype,
    _choose_quantization,
    _device_key,
    _gpu_name,
    _Problems,
    _remote_code,
    _resolve_target,
    _Target,
    kbit_support,
    memory,
    overhead_bytes,
    weights_bytes,
)
from lora_prep.tasks.records.hub import RepoFacts
from lora_prep.tasks.records.machine import HardwareProfile
from lora_prep.tasks.records.plan import LoadPlan, ParameterCensus
from lora_prep.tasks.settings import LoadSettings


def parse_size(text: str | int) -> int:
    """'20GiB' -> bytes (tasks/common/units.py), as an InvalidInput naming the value."""
    try:
        return _parse_size(text)
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None


# --- the plan ------------------------------------------------------------------


def _fit_failure(
    facts: ModelFacts, dtype: str, quant: str, where: str, need: int, weights: int, overhead: int, available: int, options: list[str]
) -> str:
    return (
        f"{facts.repo_id} needs {format_bytes(need)} ({format_bytes(weights)} of {quant if quant != 'none' else dtype} weights "
        f"+ {format_bytes(overhead)} margin) but {where} {'together have' if ',' in where else 'has'} "
        f"{format_bytes(available)} available: try " + "; ".join(options)
    )


def _fit_options(
    profile: HardwareProfile,
    facts: ModelFacts,
    target: _Target,
    dtype: str,
    quant: str,
    budgets: dict[str, int],
    max_memory: dict[str, int],
    used: list[str],
) -> list[str]:
    """What would make it fit. Cheaper dtypes/quantization on this placement are offered only when they fit."""
    options: list[str] = []
    available = sum(budgets[k] for k in used)

    def need(d: str, q: str = "none") -> int:
        w = weights_bytes(facts, d, q)
        return w + overhead_bytes(w, len(used))

    no_bf16 = any(not d.bf16 for d in profile.cuda_devices if d.index in target.gpus)
    half = "float16" if target.kind == "mps" or no_bf16 else "bfloat16"
    if quant == "none" and dtype == "float32" and need(half) <= available:
        options.append(f"dtype={half} ({format_bytes(need(half))})")
    if quant != "4bit":
        compute = half if dtype == "float32" else dtype
        if need(compute, "4bit") <= available:
            runs, why = kbit_support(profile, "cuda" if target.kind in ("cuda", "map") else target.kind, "4bit")
            extra = "" if runs else f"; bitsandbytes' 4bit does not run here yet: {why}"
            options.append(f"quantization=4bit ({format_bytes(need(compute, '4bit'))}{extra})")
    n = len(profile.cuda_devices)
    if target.kind == "cuda" and target.explicit and n > 1:
        total = sum(budgets[str(d.index)] for d in profile.cuda_devices)
        options.append(f"device_map=auto across all {n} GPUs ({format_bytes(total)} available)")
    capped = [k for k in used if k in max_memory]
    if capped:
        options.append("raise load.max_memory for " + ", ".join(capped))
    options.append("or a machine with more memory")
    return options


@dataclass(frozen=True)
class Placement:
    """Where the model goes: the budget keys it uses, the device_map and target_device of the LoadPlan,
    the max_memory handed to accelerate, and the reason."""

    used: list[str]
    device_map: Union[str, dict[str, Union[int, str]]]
    target_device: str
    max_memory: dict[str, int] | None
    reason: str


def _place(
    profile: HardwareProfile, settings: LoadSettings, target: _Target, weights: int, budgets: dict[str, int], max_memory: dict[str, int]
) -> Placement:
    if target.kind == "map":
        # _resolve_target makes a "map" target from a dict only, and plan_load raised on any value that is not a device.
        assert isinstance(settings.device_map, dict)
        keys = {_device_key(v) for v in settings.device_map.values()}
        used = sorted(k for k in keys if k is not None)
        return Placement(used, settings.device_map, "auto", (max_memory or None), f"module map from load.device_map over {', '.join(used)}")
    if target.kind in ("cpu", "mps"):
        if target.explicit:
            why = "set by load.device_map"
        elif target.kind == "mps":
            why = "Apple GPU, unified memory shared with RAM"
        else:
            why = "no CUDA or MPS device on this machine"
        return Placement([target.kind], target.kind, target.kind, None, f"{target.kind}: {why}")
    if target.explicit:
        i = target.gpus[0]
        return Placement([str(i)], f"cuda:{i}", f"cuda:{i}", None, f"{_gpu_name(profile, i)}: set by load.device_map")

    def need(devices: int) -> int:
        return weights + overhead_bytes(weights, devices)

    for i in target.gpus:
        if need(1) <= budgets[str(i)]:
            why = f"the model fits on one GPU ({_gpu_name(profile, i)}, {format_bytes(budgets[str(i)])} available)"
            return Placement([str(i)], f"cuda:{i}", f"cuda:{i}", None, f"cuda:{i}: {why}")
    for k in range(2, len(target.gpus) + 1):
        used = [str(i) for i in target.gpus[:k]]
        if need(k) <= sum(budgets[key] for key in used):
            # Each GPU's weight budget leaves its share of the margin free, so accelerate cannot pack it full.
            weight_budgets = {key: max(0, int((budgets[key] - MARGIN_FIXED_BYTES) / (1 + MARGIN_FRACTION))) for key in used}
            why = f"no single GPU holds {format_bytes(need(1))}; fewest GPUs in index order, weight budgets in max_memory, no CPU offload"
            return Placement(used, "auto", "auto", weight_budgets, f"auto over {', '.join('cuda:' + key for key in used)}: {why}")
    return Placement([str(i) for i in target.gpus], "auto", "auto", None, "none: too big for the GPUs")


def plan_load(
    profile: HardwareProfile,
    facts: ModelFacts,
    settings: LoadSettings,
    requested_revision: str | None = None,
    *,
    enforce_fit: bool = True,
) -> LoadPlan:
    """Decide dtype, attention, placement and quantization; check the fit. Pure.

    Raises InvalidInput / RemoteCodeRefused listing every settings problem at once, then DoesNotFit
    (unless ``enforce_fit=False``, which returns the plan with ``fits=False`` for a dry run).
    """
    problems = _Problems()
    reasons: dict[str, str] = {}
    max_memory = {k: parse_size(v) for k, v in (settings.max_memory or {}).items()}
    budgets = _budgets(profile, max_memory)

    trust, reasons["trust_remote_code"] = _remote_code(facts, settings, requested_revision, problems)
    target = _resolve_target(profile, settings, problems)
    dtype, reasons["dtype"] = _choose_dtype(profile, facts, settings, target, budgets, problems)
    reasons["quantization"] = _choose_quantization(profile, settings, target, problems)
    attn, fallbacks, reasons["attn"] = _choose_attn(profile, facts, settings, target, dtype, problems)
    reasons["gradient_checkpointing"] = (
        "on: recompute activations in backward (about 30% more compute, far less activation memory)"
        if settings.gradient_checkpointing
        else "off: activations kept for backward (faster; set gradient_checkpointing for long sequences)"
    )
    problems.raise_if_any(repo_id=facts.repo_id, revision=requested_revision)

    quant = settings.quantization
    weights = weights_bytes(facts, dtype, quant)
    placement = _place(profile, settings, target, weights, budgets, max_memory)
    used, reasons["placement"] = placement.used, placement.reason
    available = sum(budgets[k] for k in used)
    overhead = overhead_bytes(weights, len(used))
    fits = weights + overhead <= available
    where = ", ".join(("cuda:" + k if k.isdigit() else k) for k in used)
    if fits:
        reasons["fit"] = (
            f"fits: {format_bytes(weights + overhead)} ({format_bytes(weights)} weights + {format_bytes(overhead)} margin: "
            f"10% + 512 MiB per device) of {format_bytes(available)} available on {where} (min of free memory and load.max_memory)"
        )
    else:
        options = _fit_options(profile, facts, target, dtype, quant, budgets, max_memory, used)
        message = _fit_failure(facts, dtype, quant, where, weights + overhead, weights, overhead, available, options)
        if enforce_fit:
            raise DoesNotFit(
                message, repo_id=facts.repo_id, revision=requested_revision,
                needed_bytes=weights + overhead, available_bytes=available,
            )  # fmt: skip
        reasons["fit"] = "does not fit: " + message

    return LoadPlan(
        dtype=dtype,
        attn_implementation=attn,
        attn_fallbacks=fallbacks,
        device_map=placement.device_map,
        max_memory=placement.max_memory,
        quantization=quant,
        gradient_checkpointing=settings.gradient_checkpointing,
        trust_remote_code=trust,
        target_device=placement.target_device,
        estimate_bytes=weights,
        memory=memory(facts, dtype, quant),
        overhead_bytes=overhead,
        available_bytes=available,
        fits=fits,
        reasons=reasons,
    )


def plan_for_repo(
    profile: HardwareProfile,
    repo_facts: RepoFacts,
    settings: LoadSettings,
    requested_revision: str | None,
    *,
    census: ParameterCensus | None = None,
    enforce_fit: bool = True,
) -> LoadPlan:
    """plan_load from the resolve stage's RepoFacts (and the skeleton's census, when the plan stage built one)."""
    facts = ModelFacts.from_repo_facts(repo_facts).model_copy(update={"census": census})
    return plan_load(profile, facts, settings, requested_revision, enforce_fit=enforce_fit)

"""The rules of load planning, one decision each: sizes and margins, where the model goes, dtype,
quantization, attention kernel, remote code. Pure: HardwareProfile + ModelFacts + LoadSettings in,
a choice and its one-line reason out; problems are collected, never raised one at a time.
tasks/model/load_plan.py puts them together into a LoadPlan and checks the fit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Literal

from lora_prep.tasks.common.units import MiB, format_bytes
from lora_prep.tasks.errors import InvalidInput, LoraPrepError, RemoteCodeRefused
from lora_prep.tasks.model.census import memory_parts
from lora_prep.tasks.model.facts import ModelFacts
from lora_prep.tasks.records.machine import HardwareProfile
from lora_prep.tasks.records.plan import MemoryPart, PlanAttn, PlanDtype
from lora_prep.tasks.settings import LoadSettings, is_full_sha

# --- sizes and margins ---------------------------------------------------------

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Without the skeleton's census (a model whose skeleton could not be built is refused; synthetic facts in
# tests): bitsandbytes bytes per parameter, as if every non-embedding parameter were a quantized linear weight:
#   4bit NF4: 0.5 B + one fp32 absmax per 64-weight block = 0.5625 B; 8bit LLM.int8: 1 B (+ row scales).
# With the census (every real plan), each class is priced as stored: tasks/model/census.py.
QUANT_BYTES_PER_PARAM = {"4bit": 0.5625, "8bit": 1.0}
# Margin on top of the estimate, per placement:
#   10% of the estimate: allocator fragmentation, and the one-shard staging buffer of a load with a dtype
#     change or a quantization (the adapter itself is in the estimate);
#   512 MiB per device: a CUDA context with cuBLAS workspace takes 300-500 MiB in a fresh process; on CPU
#     it stands for the torch/transformers runtime itself, which dominates for small models.
# This is a load-and-wrap budget: training activations and optimizer state come on top, set by the batch.
MARGIN_FRACTION = 0.10
MARGIN_FIXED_BYTES = 512 * MiB
# Fallback when transformers' class flags are unknown (ModelFacts built without the lookup): model types
# whose transformers 5.24 causal-LM class reports _supports_sdpa = False.
NO_SDPA_MODEL_TYPES = frozenset(
    {"bloom", "gpt_neo", "mpt", "xglm", "openai-gpt", "rwkv", "mamba", "mamba2", "falcon_mamba", "reformer",
     "xlnet", "gemma2", "gpt_oss", "big_bird", "bigbird_pegasus", "prophetnet", "git", "trocr", "xlm"}
)  # fmt: skip


def memory(facts: ModelFacts, dtype: str, quantization: str = "none") -> list[MemoryPart]:
    """The estimate by class (the census priced in ``dtype``); empty without a census."""
    return memory_parts(facts.census, dtype, quantization) if facts.census is not None else []


def weights_bytes(facts: ModelFacts, dtype: str, quantization: str = "none") -> int:
    """Bytes the loaded, LoRA-wrapped model holds in ``dtype`` / ``quantization`` (the census's classes, when known)."""
    if facts.census is not None:
        return sum(part.bytes for part in memory(facts, dtype, quantization))
    if quantization == "none":
        return facts.param_count * DTYPE_BYTES[dtype]
    kept = facts.embedding_params
    return math.ceil((facts.param_count - kept) * QUANT_BYTES_PER_PARAM[quantization]) + kept * DTYPE_BYTES[dtype]


def overhead_bytes(weights: int, devices: int = 1) -> int:
    return int(weights * MARGIN_FRACTION) + MARGIN_FIXED_BYTES * devices


@dataclass(frozen=True)
class _Target:
    """Where the user (or auto) wants the model, before the fit check picks the GPUs."""

    kind: Literal["cpu", "cuda", "mps", "map"]
    gpus: tuple[int, ...] = ()  # candidate CUDA indices
    explicit: bool = False  # load.device_map named the device(s)


class _Problems:
    """Every problem found, reported together as one error of the most specific kind."""

    def __init__(self) -> None:
        self.items: list[tuple[type[LoraPrepError], str]] = []

    def add(self, kind: type[LoraPrepError], message: str) -> None:
        self.items.append((kind, message))

    def raise_if_any(self, **context: object) -> None:
        if not self.items:
            return
        kinds = {kind for kind, _ in self.items}
        # Remote-code refusals are the security-relevant kind: callers that catch them must see them.
        kind = RemoteCodeRefused if RemoteCodeRefused in kinds else next(iter(kinds)) if len(kinds) == 1 else InvalidInput
        raise kind("; ".join(message for _, message in self.items), problems=[m for _, m in self.items], **context)


def _gpu_name(profile: HardwareProfile, index: int) -> str:
    return f"cuda:{index} ({profile.cuda_devices[index].name})"


def _device_key(device: int | str) -> str | None:
    """A device_map value as a budget key: 0 / "0" / "cuda:0" -> "0"; "cuda" -> "0"; cpu, mps, disk as is."""
    text = str(device)
    if text.isdigit():
        return text
    if text == "cuda":
        return "0"
    if re.match(r"^cuda:\d+$", text):
        return text[5:]
    return text if text in ("cpu", "mps", "disk") else None


def _resolve_target(profile: HardwareProfile, settings: LoadSettings, problems: _Problems) -> _Target:
    dm = settings.device_map
    n = len(profile.cuda_devices) if profile.cuda_available else 0
    no_cuda = f"this machine has no CUDA device (torch {profile.torch_version} sees none)"
    if isinstance(dm, dict):
        gpus: set[int] = set()
        for module, device in dm.items():
            key = _device_key(device)
            if key is None:
                problems.add(
                    InvalidInput,
                    f"load.device_map[{module!r}]={device!r} is not a device: use a GPU index, cuda:N, cpu, mps or disk",
                )
            elif key.isdigit():
                if int(key) >= n:
                    have = f"this machine has {n} CUDA device(s)" if n else no_cuda
                    fix = f"an index below {n}" if n else "cpu"
                    problems.add(InvalidInput, f"load.device_map[{module!r}]={device!r} but {have}: use {fix}")
                gpus.add(int(key))
            elif key == "mps" and not profile.mps_available:
                problems.add(InvalidInput, f"load.device_map[{module!r}]='mps' but MPS is not available here: use cpu")
        return _Target("map", tuple(sorted(gpus)), explicit=True)
    if dm == "auto":
        if n:
            return _Target("cuda", tuple(range(n)))
        return _Target("mps") if profile.mps_available else _Target("cpu")
    if dm == "cpu":
        return _Target("cpu", explicit=True)
    if dm == "mps":
        if not profile.mps_available:
            problems.add(InvalidInput, "load.device_map='mps' but MPS is not available on this machine: use device_map=auto or cpu")
        return _Target("mps", explicit=True)
    index = 0 if dm == "cuda" else int(dm.split(":")[1])
    if not n:
        problems.add(InvalidInput, f"load.device_map={dm!r} but {no_cuda}: use device_map=auto or cpu")
    elif index >= n:
        problems.add(
            InvalidInput,
            f"load.device_map={dm!r} but this machine has {n} CUDA device(s) (cuda:0..cuda:{n - 1}): use one of those or auto",
        )
    return _Target("cuda", (index,), explicit=True)


def _budgets(profile: HardwareProfile, max_memory: dict[str, int]) -> dict[str, int]:
    """Memory each device may use: min(what is free now, load.max_memory)."""
    unlimited = float("inf")
    budgets = {"cpu": profile.ram_available_bytes, "mps": profile.ram_available_bytes, "disk": profile.disk_free_bytes}
    budgets.update({str(d.index): d.free_memory_bytes for d in profile.cuda_devices})
    return {k: int(min(v, max_memory.get(k, unlimited))) for k, v in budgets.items()}


def _choose_dtype(
    profile: HardwareProfile, facts: ModelFacts, settings: LoadSettings, target: _Target, budgets: dict[str, int], problems: _Problems
) -> tuple[PlanDtype, str]:
    stored = facts.main_stored_dtype or (facts.config_dtype and f"{facts.config_dtype} (config)") or "unknown dtype"
    gpus = [profile.cuda_devices[i] for i in target.gpus if i < len(profile.cuda_devices)]
    no_bf16 = [d for d in gpus if not d.bf16]
    if settings.dtype != "auto":
        dtype = settings.dtype
        if dtype == "bfloat16" and no_bf16:
            d = no_bf16[0]
            problems.add(
                InvalidInput,
                f"load.dtype='bfloat16' but cuda:{d.index} ({d.name}) has compute capability {d.capability} < 8.0 "
                "(no native bf16): use float16 or auto",
            )
        note = {
            ("cpu", "float16"): " (float16 on CPU is slow and some ops lack kernels)",
            ("mps", "bfloat16"): " (bfloat16 on MPS needs macOS 14 or later)",
        }.get((target.kind, dtype), "")
        return dtype, f"{dtype}: set by load.dtype{note}; weights stored as {stored}"
    if gpus:
        if no_bf16:
            d = no_bf16[0]
            why = f"cuda:{d.index} ({d.name}) has compute capability {d.capability} < 8.0, no native bfloat16"
            return "float16", f"float16: {why}; weights stored as {stored}"
        why = "native on every GPU used (compute capability >= 8.0), half the memory of float32"
        return "bfloat16", f"bfloat16: {why}; weights stored as {stored}"
    if target.kind == "mps":
        # bf16 on MPS needs macOS 14+; fp16 works on every Apple GPU torch supports. Kept simple on purpose.
        return "float16", f"float16: Apple MPS (bfloat16 only on recent macOS, not probed); weights stored as {stored}"
    if settings.quantization != "none":
        # A k-bit load is about memory: what bitsandbytes leaves unquantized (embeddings, the head, norms, fused
        # experts) and the dequantized matmuls take half of float32's bytes in bfloat16, as QLoRA computes.
        return (
            "bfloat16",
            f"bfloat16: the compute dtype of a {settings.quantization} load on CPU (half of float32 for what stays unquantized); weights stored as {stored}",
        )
    # CPU: float32, the safe default for correctness: bf16 matmuls are slow on x86 without AMX/AVX512-BF16
    # and fp16 is slower still, and CPU training wants fp32 accumulation anyway. Kept even on CPUs with
    # bf16 instructions, so the same settings give the same artifact on every CPU machine. One exception:
    # when float32 would not fit in RAM but bf16 does, bf16 keeps the model loadable at the cost of speed.
    need32 = weights_bytes(facts, "float32") + overhead_bytes(weights_bytes(facts, "float32"))
    need16 = weights_bytes(facts, "bfloat16") + overhead_bytes(weights_bytes(facts, "bfloat16"))
    if need32 > budgets["cpu"] >= need16:
        return "bfloat16", (
            f"bfloat16: float32 would need {format_bytes(need32)} but the CPU has {format_bytes(budgets['cpu'])}; "
            f"bfloat16 fits ({format_bytes(need16)}) at the cost of slower CPU matmuls; weights stored as {stored}"
        )
    upcast = " (upcast: 2x the stored bytes)" if facts.main_stored_dtype in ("BF16", "F16") else ""
    hint = "; this CPU has bf16 instructions: set dtype=bfloat16 to halve memory" if profile.cpu_bf16_native else ""
    return "float32", (
        f"float32: CPU, the safe choice (bf16 matmuls are slow without AMX/AVX512-BF16, fp16 slower still); "
        f"weights stored as {stored}{upcast}{hint}"
    )


def _device_kinds(settings: LoadSettings, target: _Target) -> list[str]:
    """The device kinds a placement uses ("cpu", "cuda", "mps", "disk"), as bitsandbytes names its backends."""
    if target.kind == "map" and isinstance(settings.device_map, dict):
        keys = {_device_key(v) for v in settings.device_map.values()}
        return sorted({"cuda" if k and k.isdigit() else str(k) for k in keys})
    return [target.kind]


def kbit_support(profile: HardwareProfile, kind: str, quantization: str) -> tuple[bool, str]:
    """(runs, why not) for a 4/8-bit load on a device kind, from what the probe asked bitsandbytes."""
    bnb = profile.bitsandbytes
    if not bnb.installed:
        return False, "bitsandbytes is not installed (pip install bitsandbytes)"
    if profile.kbit is None:  # a profile made without asking bitsandbytes (an old manifest, a hand-made profile)
        return bool(bnb.importable or bnb.installed), f"bitsandbytes {bnb.version} was not asked what it runs"
    backend = next((b for b in profile.kbit if b.device == kind), None)
    if backend is None:
        return False, f"bitsandbytes was not asked about {kind} (the probe saw no such device)"
    runs = backend.four_bit if quantization == "4bit" else backend.eight_bit
    return runs, backend.reason or ""


def _choose_quantization(profile: HardwareProfile, settings: LoadSettings, target: _Target, problems: _Problems) -> str:
    q = settings.quantization
    if q == "none":
        return "none: full-precision weights in the planned dtype"
    kinds = _device_kinds(settings, target)
    if "disk" in kinds or (len(kinds) > 1 and "cpu" in kinds):
        # transformers refuses a bitsandbytes load that offloads part of the model to CPU or disk (unless those
        # modules are kept unquantized in float32, llm_int8_enable_fp32_cpu_offload, which defeats the point).
        problems.add(
            InvalidInput,
            f"load.quantization={q!r} cannot offload to {' or '.join(k for k in kinds if k in ('cpu', 'disk'))} "
            f"(load.device_map={settings.device_map!r}): place the whole model on the GPUs or on cpu, or use quantization=none",
        )
    for kind in [k for k in kinds if k != "disk"]:
        runs, why = kbit_support(profile, kind, q)
        if not runs:
            problems.add(
                InvalidInput,
                f"load.quantization={q!r} needs bitsandbytes' {q} on {kind}, which does not run here ({why}): "
                "use quantization=none, or a device where bitsandbytes runs it",
            )
    how = "NF4, double-quantized absmax" if q == "4bit" else "LLM.int8, a float32 scale per row"
    return (
        f"{q}: bitsandbytes {profile.bitsandbytes.version or ''} on {', '.join(kinds)} ({how}); it quantizes nn.Linear weights only: "
        "embeddings, the head, norms, biases and fused expert parameters stay in the compute dtype"
    )


def _sdpa_status(facts: ModelFacts) -> bool | None:
    """True/False when known (transformers' flag or the explicit table), None for unknown remote code."""
    if facts.supports_sdpa is not None:
        return facts.supports_sdpa
    if facts.remote_code:
        return None
    return facts.model_type not in NO_SDPA_MODEL_TYPES


def _choose_attn(
    profile: HardwareProfile, facts: ModelFacts, settings: LoadSettings, target: _Target, dtype: str, problems: _Problems
) -> tuple[PlanAttn, list[str], str]:
    gpus = [profile.cuda_devices[i] for i in target.gpus if i < len(profile.cuda_devices)]
    flash_blockers = []
    if not gpus:
        flash_blockers.append(
            "this machine has no CUDA GPU" if target.kind == "cuda" else f"it needs a CUDA GPU and the model is placed on {target.kind}"
        )
    if not profile.flash_attn.installed:
        flash_blockers.append("flash-attn is not installed (pip install flash-attn --no-build-isolation)")
    elif not profile.flash_attn.importable:
        flash_blockers.append(f"flash-attn {profile.flash_attn.version} does not import ({profile.flash_attn.error})")
    for d in gpus:
        if d.capability_tuple < (8, 0):
            flash_blockers.append(f"cuda:{d.index} ({d.name}) has compute capability {d.capability} < 8.0")
    if dtype == "float32":
        flash_blockers.append("it needs float16 or bfloat16 and the dtype is float32")
    if facts.supports_flash_attn is False:
        flash_blockers.append(f"{facts.architecture} does not support it in transformers")
    sdpa = _sdpa_status(facts)
    what = facts.architecture or facts.model_type or "this model"

    requested = settings.attn_implementation
    if requested == "flash_attention_2":
        if flash_blockers:
            problems.add(
                InvalidInput,
                f"load.attn_implementation='flash_attention_2' cannot work here: {', '.join(flash_blockers)}: use sdpa, eager or auto",
            )
        return requested, [], "flash_attention_2: set by load.attn_implementation (no fallback: an explicit choice fails loudly)"
    if requested == "sdpa":
        if sdpa is False:
            problems.add(
                InvalidInput,
                f"load.attn_implementation='sdpa' but {what} does not support sdpa in transformers: use eager or auto",
            )
        return requested, [], "sdpa: set by load.attn_implementation (no fallback: an explicit choice fails loudly)"
    if requested == "eager":
        return requested, [], "eager: set by load.attn_implementation"

    if facts.remote_code:
        why = "the repo's own code decides which kernels it supports; eager is the one every model has"
        return "eager", [], f"eager: {why} (set load.attn_implementation to override)"
    if not flash_blockers:
        chain = ["sdpa", "eager"] if sdpa else ["eager"]
        why = f"flash-attn {profile.flash_attn.version} imports, every GPU used has capability >= 8.0, dtype {dtype}"
        return "flash_attention_2", chain, f"flash_attention_2: {why}"
    if sdpa:
        why = f"torch's fused attention, supported by {what}; flash_attention_2 not used: {', '.join(flash_blockers)}"
        return "sdpa", ["eager"], f"sdpa: {why}"
    return "eager", [], f"eager: {what} does not support sdpa in transformers"


def remote_code_trusted(facts: ModelFacts, settings: LoadSettings, requested_revision: str | None) -> bool:
    """The repo's own code may run: it ships some, the settings allow it, and the revision pins it (see _remote_code)."""
    problems = _Problems()
    trusted, _ = _remote_code(facts, settings, requested_revision, problems)
    return trusted and not problems.items


def _remote_code(facts: ModelFacts, settings: LoadSettings, requested_revision: str | None, problems: _Problems) -> tuple[bool, str]:
    """Remote code only when allowed AND pinned, so the code that runs is the code you read:
    a Hub repo at a full commit sha; a local directory at the digest of its *.py files."""
    if not facts.remote_code:
        note = " (load.trust_remote_code is set but not needed: left off)" if settings.trust_remote_code else ""
        return False, "off: the model's classes are in transformers" + note
    local = facts.source == "local"
    pin = facts.code_digest if local else facts.commit_sha
    pin_name = "the digest of its *.py files" if local else "a full commit sha"
    if not settings.trust_remote_code:
        problems.add(
            RemoteCodeRefused,
            f"{facts.repo_id} ships its own Python code (config auto_map) and load.trust_remote_code is off: "
            f"read that code, then allow it with --trust-remote-code (load.trust_remote_code=true) "
            f"and --revision {pin}",
        )
        return False, "refused"
    pinned = requested_revision == pin if local else is_full_sha(requested_revision)
    if not pinned:
        problems.add(
            RemoteCodeRefused,
            f"load.trust_remote_code needs the revision pinned to {pin_name} but --revision is {requested_revision!r}: "
            f"pin the code you read with --revision {pin}",
        )
        return True, "refused"
    return True, f"on: the repo's own code runs, pinned to {requested_revision}"

"""Stage 5a: load the base model and tokenizer from the verified snapshot, as planned.

``load_model(snapshot_dir, plan, settings) -> LoadedModel`` reads exactly the
files the download stage verified (a local directory, ``local_files_only``),
with the plan's dtype, placement, attention kernel and quantization, and
returns the model, the tokenizer and a ``LoadReport`` of what was actually
used. It is called inside the build task only: the model never crosses a
task boundary (Prefect pickles task inputs to hash them for its cache keys).

Memory: one copy of the weights. transformers 5 memory-maps safetensors and
places each tensor where ``device_map`` says while reading it; nothing here
deep-copies, materialises a state dict or calls ``.to()`` on the placed
model. The one extra allocation is a resized embedding matrix, and only when a
pad token has to be added (see ``docs/PADDING.md``).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from lora_prep.tasks.errors import InvalidInput
from lora_prep.tasks.hub.selection import snapshot_weight_format
from lora_prep.tasks.machine.kbit import quiet_bitsandbytes
from lora_prep.tasks.model.quantization import bnb_config, prepare_for_kbit_training, quantization_label
from lora_prep.tasks.model.tokenizer import (
    check_remote_code,
    fit_embeddings_to_tokenizer,
    load_tokenizer,
)
from lora_prep.tasks.records.build import KbitPreparation, LoadReport
from lora_prep.tasks.records.plan import LoadPlan
from lora_prep.tasks.settings import LoadSettings

log = logging.getLogger(__name__)

# transformers' attention checks (modeling_utils.py). A ValueError / ImportError raised inside
# one of these means "this attention kernel cannot be used here"; any other ValueError from
# from_pretrained (a bad config, a missing tensor) is not an attention problem and is not retried.
_ATTENTION_CHECKS = frozenset(
    {
        "_check_and_adjust_attn_implementation",
        "get_correct_attn_implementation",
        "_flash_attn_can_dispatch",
        "_flash_attn_import_error",
        "_sdpa_can_dispatch",
        "_flex_attn_can_dispatch",
        "lazy_import_flash_attention",
    }
)


@dataclass
class LoadedModel:
    """The live objects; never passed between Prefect tasks (not pydantic on purpose: no validation, no copies)."""

    model: Any
    tokenizer: Any
    report: LoadReport


# --- model -----------------------------------------------------------------------------


def _raised_by_attention_check(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _ATTENTION_CHECKS:
            return True
        tb = tb.tb_next
    return False


def _device_map_for_accelerate(value: Union[str, dict[str, Union[int, str]]]) -> Union[str, dict[str, Union[int, str]]]:
    # The plan keeps JSON keys/values as strings ("0"); accelerate wants GPU indices as ints.
    if isinstance(value, dict):
        return {k: int(v) if isinstance(v, str) and v.isdigit() else v for k, v in value.items()}
    return value


def _placement(model: Any) -> Union[str, dict[str, Union[int, str]]]:
    device_map = getattr(model, "hf_device_map", None)
    if device_map:
        return {k: v if isinstance(v, int) else str(v) for k, v in device_map.items()}
    return str(model.device)


def _from_pretrained(snapshot_dir: str, plan: LoadPlan, kwargs: dict) -> tuple[Any, list[str]]:
    """Load with the planned attention kernel, then each of plan.attn_fallbacks while the kernel is the problem.

    transformers checks the kernel in the model's __init__, on the meta device, before reading any
    weight: a failed attempt costs a config parse and an empty model, not a load.
    """
    from transformers import AutoModelForCausalLM

    candidates = [plan.attn_implementation, *plan.attn_fallbacks]
    tried: list[str] = []
    for i, attn in enumerate(candidates):
        try:
            return AutoModelForCausalLM.from_pretrained(snapshot_dir, attn_implementation=attn, **kwargs), tried
        except (ValueError, ImportError) as exc:
            if not _raised_by_attention_check(exc):
                raise
            first_line = (str(exc).strip().splitlines() or [""])[0]
            tried.append(f"{attn}: {type(exc).__name__}")
            if i + 1 < len(candidates):
                log.warning(
                    "attention %s failed at load (%s: %s); trying %s", attn, type(exc).__name__, first_line[:200], candidates[i + 1]
                )
                continue
            raise InvalidInput(
                f"no attention implementation could be used for {snapshot_dir} (tried {', '.join(tried)}; last: {first_line[:200]}): "
                "set load.attn_implementation to one this model and machine support (eager always works for transformers models)",
                snapshot_dir=snapshot_dir,
                tried=tried,
            ) from exc
    raise AssertionError("unreachable: the loop returns or raises")


def _prepare_for_training(model: Any, plan: LoadPlan) -> KbitPreparation | None:
    """Gradient checkpointing and, for a 4/8-bit model, its training preparation (recorded)."""
    kbit = prepare_for_kbit_training(model, input_grads=plan.gradient_checkpointing) if plan.quantization != "none" else None
    if plan.gradient_checkpointing:
        if not model.supports_gradient_checkpointing:
            raise InvalidInput(f"{type(model).__name__} does not support gradient checkpointing: set load.gradient_checkpointing=false")
        # Non-reentrant checkpointing: gradients reach LoRA weights even though the frozen inputs of each
        # block do not require grad; the input-grad hook keeps reentrant-style callers working too.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.config.use_cache = False  # a KV cache is useless in training and conflicts with recomputation
        model.enable_input_require_grads()
    return kbit


def resident_bytes(model: Any) -> int:
    """What a model holds, each tensor once: parameters, buffers, and bitsandbytes' quantization state (absmax,
    codes, row scales: not parameters, so not in get_memory_footprint). On CPU a memory-mapped weight counts as
    resident here: this is the size once every weight has been read."""
    seen: set[int] = set()
    total = 0

    def add(tensor: Any) -> None:
        nonlocal total
        if tensor is None or not hasattr(tensor, "untyped_storage"):
            return
        storage = tensor.untyped_storage()
        if storage.data_ptr() in seen:
            return
        seen.add(storage.data_ptr())
        total += storage.nbytes()

    for tensor in [*model.parameters(), *model.buffers()]:
        add(tensor)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            add(state.absmax)
            add(state.code)
            if state.nested:
                add(state.offset)
                add(state.state2.absmax)
                add(state.state2.code)
        add(getattr(weight, "SCB", None))
    return total


def load_model(snapshot_dir: str, plan: LoadPlan, settings: LoadSettings, *, allow_pickle: bool = False) -> LoadedModel:
    """Load tokenizer and model from a verified local snapshot as ``plan`` says; report what was used.

    allow_pickle: the source settings allowed a pickle-only repo (the download stage refused it otherwise).
    Raises RemoteCodeRefused, PickleRefused, EntryNotFound or InvalidInput (attention, quantization).
    """
    import torch

    started = time.perf_counter()
    snapshot = Path(snapshot_dir)
    # Remote code needs both the plan and the settings it was made from: a plan edited or built by hand
    # cannot switch it on alone.
    trusted = bool(plan.trust_remote_code and settings.trust_remote_code)
    check_remote_code(snapshot, trusted)
    safetensors_only = snapshot_weight_format(snapshot, allow_pickle) == "safetensors"

    quantization_config = bnb_config(plan)
    if quantization_config is not None:
        try:
            with quiet_bitsandbytes():
                import bitsandbytes  # noqa: F401  (imported for quantized loads only: ~3 s)
        except Exception as exc:  # broken native builds raise OSError/RuntimeError as well as ImportError
            raise InvalidInput(
                f"load.quantization={plan.quantization!r} needs bitsandbytes, which does not import here ({type(exc).__name__}): "
                "pip install bitsandbytes, or use quantization=none"
            ) from exc

    tokenizer, strategy = load_tokenizer(str(snapshot), trust_remote_code=trusted)
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, plan.dtype),  # transformers 5: torch_dtype is deprecated
        "device_map": _device_map_for_accelerate(plan.device_map),
        "local_files_only": True,
        "trust_remote_code": trusted,
        "use_safetensors": safetensors_only,
    }
    if plan.max_memory:
        kwargs["max_memory"] = {int(k) if k.isdigit() else k: v for k, v in plan.max_memory.items()}
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model, tried = _from_pretrained(str(snapshot), plan, kwargs)

    resized = fit_embeddings_to_tokenizer(model, tokenizer)
    if resized:
        strategy += f"; embeddings grown to {model.get_input_embeddings().weight.shape[0]} rows (new rows = mean of the old)"
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id

    kbit = _prepare_for_training(model, plan)
    recorded: Any = getattr(model.config, "quantization_config", None)
    attn_used = model.config._attn_implementation
    if tried:
        log.warning("attention: planned %s, using %s (failed: %s)", plan.attn_implementation, attn_used, ", ".join(tried))
    report = LoadReport(
        dtype=str(model.dtype).removeprefix("torch."),
        attn_implementation=str(attn_used),
        attn_fallbacks_tried=tried,
        device_map=_placement(model),
        quantization=quantization_label(plan),
        quantization_config=json.loads(recorded.to_json_string(use_diff=False)) if hasattr(recorded, "to_json_string") else None,
        kbit_preparation=kbit,
        memory_bytes=resident_bytes(model),
        pad_token=tokenizer.pad_token,
        pad_token_id=tokenizer.pad_token_id,
        pad_token_strategy=strategy,
        embeddings_resized=resized,
        gradient_checkpointing=plan.gradient_checkpointing,
        trust_remote_code=trusted,
        kbit_prepared=kbit is not None,
        seconds=round(time.perf_counter() - started, 3),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, report=report)

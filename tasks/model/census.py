"""The model's parameters by how a load stores them, counted on its skeleton, and the bytes that makes.

``parameter_census(skeleton)`` walks the empty-weights model (shapes only) with transformers' own rules
for a bitsandbytes load: which ``nn.Linear``/``Conv1D`` layers it converts (``should_convert_module``
against the modules its quantizer keeps out: the output head, tied weights, the last module,
``_keep_in_fp32_modules`` and ``llm_int8_skip_modules``), and which parameters a 16-bit load keeps in
float32 (``_get_dtype_plan``). ``memory_parts(census, dtype, quantization)`` turns the counts into bytes,
pure, so the planner can price every dtype and quantization it considers.

Bytes per class, as bitsandbytes 0.50 stores them (measured on its CPU backend: the formulas match the
tensors of a loaded model to the byte):

    4-bit NF4/FP4 weight   n/2 (packed uint8) + quantization state per layer: absmax, one per block of 64
                           weights (float32; with double quantization uint8, plus one float32 per 256 blocks,
                           a float32 offset and a 256-entry float32 code), and the 16-entry float32 code
    8-bit LLM.int8 weight  n (int8) + one float32 scale per output row
    everything else        the compute dtype (2 B in bfloat16/float16, 4 B in float32), float32 where transformers
                           keeps it so; fused 3-D expert parameters included: bitsandbytes quantizes nn.Linear only
    buffers                as the skeleton holds them
    the LoRA adapter       4 B per trainable parameter (PEFT keeps adapter weights in float32)
"""

from __future__ import annotations

import math
from typing import Any

from lora_prep.tasks.records.plan import MemoryPart, ParameterCensus

BLOCK = 64  # bitsandbytes' 4-bit blocksize (transformers' BitsAndBytesConfig has no option for another)
NESTED_BLOCK = 256  # double quantization: absmax values quantized again in blocks of 256
CODE_4BIT = 16 * 4  # the NF4/FP4 code: 16 float32 values per layer
CODE_NESTED = 256 * 4 + 4  # the nested absmax code (256 float32) and its offset (one float32)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAPTER_BYTES = 4  # PEFT autocasts adapter weights of 16-bit models to float32


def _quantized_linears(model: Any, skip_modules: list[str] | None) -> list[tuple[str, Any]]:
    """The layers bitsandbytes would convert, chosen by transformers' own rules (integrations.replace_with_bnb_linear)."""
    import torch
    from transformers.pytorch_utils import Conv1D
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    keep = HfQuantizer.get_modules_to_not_convert(model, skip_modules, model._keep_in_fp32_modules)
    return [
        (name, module)
        for name, module in model.named_modules()
        if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, keep)
    ]


def _matching(model: Any, patterns: set[str] | list[str] | None) -> set[str]:
    if not patterns:
        return set()
    from transformers.core_model_loading import build_glob_alternation

    pattern, _, _ = build_glob_alternation(list(patterns))
    return {name for name, _ in model.named_parameters() if pattern.search(name)}


def parameter_census(model: Any, *, skip_modules: list[str] | None = None, adapter_params: int = 0) -> ParameterCensus:
    """Count ``model``'s parameters by class. Call it on the skeleton before PEFT wraps it (LoRA layers are not the model's)."""
    import torch

    quantized = _quantized_linears(model, skip_modules)
    quantized_weights = {id(m.weight) for _, m in quantized}
    linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    linear_weight = rows = blocks = nested = kept = embedding = experts = other = 0
    for _, module in quantized:
        n = module.weight.numel()
        blocks_here = math.ceil(n / BLOCK)
        linear_weight += n
        rows += module.weight.shape[0] if type(module) is torch.nn.Linear else module.weight.shape[1]
        blocks += blocks_here
        nested += math.ceil(blocks_here / NESTED_BLOCK)
    for _, p in model.named_parameters():
        if id(p) in quantized_weights:
            continue
        if id(p) in linear_weights:
            kept += p.numel()
        elif id(p) in embeddings:
            embedding += p.numel()
        elif p.ndim == 3 and not type(_owner(model, p)).__module__.startswith("torch.nn"):
            experts += p.numel()
        else:
            other += p.numel()
    params = dict(model.named_parameters())
    return ParameterCensus(
        linear_weight_params=linear_weight,
        linear_layers=len(quantized),
        linear_rows=rows,
        linear_blocks=blocks,
        linear_nested_blocks=nested,
        kept_linear_params=kept,
        embedding_params=embedding,
        expert_params=experts,
        other_params=other,
        float32_if_half_params=sum(params[n].numel() for n in _matching(model, model._keep_in_fp32_modules)),
        float32_always_params=sum(params[n].numel() for n in _matching(model, model._keep_in_fp32_modules_strict)),
        buffer_bytes=sum(b.numel() * b.element_size() for _, b in model.named_buffers()),
        adapter_params=adapter_params,
    )


def _owner(model: Any, parameter: Any) -> Any:
    for module in model.modules():
        if any(p is parameter for p in module.parameters(recurse=False)):
            return module
    return model


def memory_parts(census: ParameterCensus, dtype: str, quantization: str = "none", *, double_quant: bool = True) -> list[MemoryPart]:
    """What each class of parameters costs loaded in ``dtype`` (the compute dtype of a k-bit load). Pure."""
    d = DTYPE_BYTES[dtype]
    # Kept in float32 by transformers' dtype plan: only for 16-bit loads (strict: float16 and bfloat16; else float16 only).
    fp32 = census.float32_always_params if dtype != "float32" else 0
    if dtype == "float16":
        fp32 = max(fp32, census.float32_if_half_params)
    parts: list[MemoryPart] = []
    if quantization == "4bit":
        state = (
            (census.linear_blocks + census.linear_nested_blocks * 4 + census.linear_layers * CODE_NESTED)
            if double_quant
            else census.linear_blocks * 4
        )
        state += census.linear_layers * CODE_4BIT
        parts.append(
            MemoryPart(
                name="quantized linear weights",
                params=census.linear_weight_params,
                stored_as="4-bit NF4 + absmax" + (" (double-quantized)" if double_quant else ""),
                bytes=math.ceil(census.linear_weight_params / 2) + state,
            )
        )
    elif quantization == "8bit":
        parts.append(
            MemoryPart(
                name="quantized linear weights",
                params=census.linear_weight_params,
                stored_as="int8 + float32 row scales",
                bytes=census.linear_weight_params + census.linear_rows * 4,
            )
        )
    else:
        parts.append(
            MemoryPart(name="linear weights", params=census.linear_weight_params, stored_as=dtype, bytes=census.linear_weight_params * d)
        )
    kept_note = f"{dtype} (not quantized)" if quantization != "none" else dtype
    parts += [
        MemoryPart(
            name="output head and unconverted linears",
            params=census.kept_linear_params,
            stored_as=kept_note,
            bytes=census.kept_linear_params * d,
        ),
        MemoryPart(name="embeddings", params=census.embedding_params, stored_as=kept_note, bytes=census.embedding_params * d),
        MemoryPart(
            name="fused expert parameters",
            params=census.expert_params,
            stored_as=f"{dtype} (bitsandbytes quantizes nn.Linear only)" if quantization != "none" else dtype,
            bytes=census.expert_params * d,
        ),
        MemoryPart(
            name="norms, biases and the rest",
            params=census.other_params,
            stored_as=kept_note,
            bytes=census.other_params * d + fp32 * (4 - d),
        ),
        MemoryPart(name="buffers", params=0, stored_as="as the model holds them", bytes=census.buffer_bytes),
        MemoryPart(name="LoRA adapter", params=census.adapter_params, stored_as="float32", bytes=census.adapter_params * ADAPTER_BYTES),
    ]
    return [p for p in parts if p.params or p.bytes]

"""4/8-bit loads with bitsandbytes: the config every consumer rebuilds, and what training preparation changes.

The plan records transformers' own ``BitsAndBytesConfig.to_dict()`` (``"quant_method": "bitsandbytes"``);
the build, ``load_adapter_ready`` and anyone with plain transformers rebuild the same load with
``BitsAndBytesConfig.from_dict``. The recipe is QLoRA's: NF4 weights with double-quantized absmax
(~0.5 B per weight), or LLM.int8; matmuls in the plan's 16-bit dtype.

Training preparation, chosen here instead of PEFT's ``prepare_model_for_kbit_training``: that one casts every
parameter bitsandbytes left unquantized to float32, which for a mixture-of-experts model is its fused
experts (~29 of Qwen3-30B-A3B's 30.5 B parameters: +58 GB), and mixes dtypes in the forward pass (TRL
dropped the upcast for those reasons). Here the base is frozen and nothing is upcast: the unquantized
parameters stay in the compute dtype, the LoRA weights train in float32 (PEFT's own autocast), and the
check's backward pass proves gradients reach them. What it did is recorded (``KbitPreparation``).
"""

from __future__ import annotations

import json
from typing import Any

from lora_prep.tasks.records.build import KbitPreparation
from lora_prep.tasks.records.plan import LoadPlan


def bnb_config_dict(quantization: str, dtype: str) -> dict[str, Any] | None:
    """transformers' BitsAndBytesConfig for a 4/8-bit load in compute dtype ``dtype``, as its own JSON dict."""
    if quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=getattr(torch, dtype)
        )
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return json.loads(config.to_json_string(use_diff=False))


def bnb_config(plan: LoadPlan) -> Any | None:
    """The BitsAndBytesConfig of a plan: rebuilt from the dict it records (the same one any consumer rebuilds)."""
    if plan.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    recorded = plan.quantization_config or bnb_config_dict(plan.quantization, plan.dtype)
    return BitsAndBytesConfig.from_dict(dict(recorded or {}))


def quantization_label(plan: LoadPlan) -> str:
    return {"none": "none", "4bit": f"4bit nf4 double-quant compute={plan.dtype}", "8bit": "8bit LLM.int8"}[plan.quantization]


def prepare_for_kbit_training(model: Any, *, input_grads: bool) -> KbitPreparation:
    """Freeze the base; upcast nothing (see the module's docstring); input gradients when checkpointing needs them."""
    frozen = 0
    for p in model.parameters():
        if p.requires_grad:
            p.requires_grad_(False)
        frozen += p.numel()
    if input_grads:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    return KbitPreparation(
        frozen_params=frozen,
        upcast_to_float32=[],
        upcast_bytes=0,
        reason="nothing upcast: unquantized parameters (embeddings, head, norms, fused experts) stay in the compute dtype, "
        "LoRA weights train in float32; PEFT's prepare_model_for_kbit_training would upcast them all to float32",
    )

"""The peft.LoraConfig for exactly the targets resolved (tasks/lora/targets.py), and keeping PEFT's
transformers-v4 adapter conversion off them."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lora_prep.tasks.errors import InvalidInput
from lora_prep.tasks.settings import LoraSettings

if TYPE_CHECKING:
    from lora_prep.tasks.records.plan import TargetPlan


def lora_config(
    lora: LoraSettings, modules: list[str], parameters: list[str], *, dropout: float, fan_in_fan_out: bool, tie: bool = False
) -> Any:
    """peft.LoraConfig for exactly these full module and parameter names."""
    from peft import LoraConfig, TaskType

    try:
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=dropout,
            bias=lora.bias,
            target_modules=list(modules),
            target_parameters=list(parameters) or None,
            # Copies: PEFT edits these lists in place (a tied lm_head becomes the embedding's name).
            exclude_modules=list(lora.exclude_modules) if lora.exclude_modules else None,
            modules_to_save=list(lora.modules_to_save) if lora.modules_to_save else None,
            use_rslora=lora.use_rslora,
            use_dora=lora.use_dora,
            init_lora_weights=lora.init_lora_weights,
            rank_pattern=dict(lora.rank_pattern or {}),
            alpha_pattern=dict(lora.alpha_pattern or {}),
            fan_in_fan_out=fan_in_fan_out,
            ensure_weight_tying=tie,
        )
    except (ValueError, TypeError) as exc:  # LoraConfig.__post_init__ rejects combinations
        raise InvalidInput(f"PEFT rejects these LoRA settings: {exc}; change the LoRA settings named there.") from None


def config_for(lora: LoraSettings, targets: TargetPlan) -> Any:
    return lora_config(
        lora,
        targets.target_modules,
        targets.target_parameters,
        dropout=targets.dropout,
        fan_in_fan_out=targets.fan_in_fan_out,
        tie=targets.ensure_weight_tying,
    )


def out_of_peft_conversion(model: Any, lora: LoraSettings, modules: list[str], parameters: list[str]) -> tuple[list[str], list[str]]:
    """Keep PEFT's transformers-v4 adapter conversion off our targets.

    For MoE model types whose experts transformers 5 fused (Qwen2/3-MoE, DeepSeek-V2/V3, GLM-4-MoE,
    OLMoE, Mixtral, MiniMax), PEFT rewrites every target_modules entry named like a v4 expert
    projection (gate_proj, up_proj, down_proj, w1..w3, gate) into the fused expert parameters, at
    wrap time and again whenever the adapter is loaded: dense MLPs and shared experts of those names
    silently lose their LoRA. Those modules go in as parameter targets (their 2-D ``.weight``)
    instead, which PEFT leaves alone, so the adapter loads back with them in plain PEFT too.
    Which names PEFT would move is asked of PEFT itself, on a copy of the config.
    """
    import copy

    from peft.utils.transformers_weight_conversion import (
        convert_peft_config_for_transformers,
    )

    config = lora_config(lora, modules, parameters, dropout=0.0, fan_in_fan_out=False)
    converted = copy.deepcopy(config)
    convert_peft_config_for_transformers(converted, model, None)
    moved = [m for m in modules if m not in set(converted.target_modules or [])]
    if not moved:
        return modules, parameters
    kept = [m for m in modules if m not in moved]
    return kept, parameters + [f"{m}.weight" for m in moved]

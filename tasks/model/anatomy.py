"""What a model has that LoRA targeting cares about: read off its modules, on a skeleton or the real model.

``skeleton(config)`` instantiates the architecture from config.json with empty (meta) weights:
the same module names and types as the real model, in milliseconds, with no bytes downloaded.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

from lora_prep.tasks.errors import BadRepo

_ATTENTION_RE = re.compile(r"attn|attention|mixer", re.IGNORECASE)
_MLP_RE = re.compile(r"mlp|feed_?forward|ffn|moe|experts?\b", re.IGNORECASE)
_ROUTER_RE = re.compile(r"(^|_)(gate|router)$|router", re.IGNORECASE)


def skeleton(config: dict, *, model_dir: str | None = None, trust_remote_code: bool = False) -> Any:
    """The architecture with meta weights, from config.json (remote code only from ``model_dir`` when trusted)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if trust_remote_code and model_dir:
            cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=True, local_files_only=True)
        else:
            from transformers import PretrainedConfig

            # config.json as transformers writes it: Infinity/NaN are {"__float__": "Infinity"} objects.
            cfg = AutoConfig.for_model(**PretrainedConfig._decode_special_floats(config))
        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_config(cfg, trust_remote_code=trust_remote_code)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        kind = config.get("model_type")
        raise BadRepo(
            f"config.json (model_type {kind!r}) does not build a causal LM with this transformers "
            f"({type(exc).__name__}: {' '.join(str(exc).split())[:200]}): check the model id, or upgrade transformers."
        ) from None


def wrappable(model: Any) -> list[str]:
    """Modules PEFT's LoRA dispatchers accept (peft/tuners/lora/model.py); bitsandbytes and HQQ linears are Linear subclasses."""
    import torch
    from transformers.pytorch_utils import Conv1D

    types = (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.MultiheadAttention)
    return [name for name, m in model.named_modules() if name and isinstance(m, types) and not is_lora_internal(name)]


def is_lora_internal(name: str) -> bool:
    return any(part.startswith("lora_") or part == "base_layer" for part in name.split("."))


def expert_parameters(model: Any) -> list[str]:
    """Fused expert weights: 3-D parameters held directly by a module that is not a torch.nn layer
    (transformers 5's ``*Experts`` modules; a Conv1d weight is 3-D too, but belongs to nn.Conv1d)."""
    out = []
    for name, module in model.named_modules():
        if type(module).__module__.startswith("torch.nn") or is_lora_internal(name):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.ndim == 3:
                out.append(f"{name}.{pname}" if name else pname)
    return out


def routers(model: Any) -> list[str]:
    """Direct children of an MoE block (a module with an ``experts`` child) that pick the experts."""
    out = []
    for name, module in model.named_modules():
        children = dict(module.named_children())
        if "experts" not in children:
            continue
        for child_name, child in children.items():
            if child_name.startswith("shared_expert") and not child_name.endswith("gate"):
                continue
            if child_name != "experts" and (_ROUTER_RE.search(child_name) or "router" in type(child).__name__.lower()):
                out.append(f"{name}.{child_name}" if name else child_name)
    return out


def all_linear(model: Any) -> list[str]:
    """PEFT's own all-linear resolution (linear + Conv1D, output head removed), in model order."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

    config = _maybe_include_all_linear_layers(LoraConfig(target_modules=INCLUDE_LINEAR_LAYERS_SHORTHAND), model)
    chosen = set(config.target_modules)
    return [name for name, _ in model.named_modules() if name in chosen and not is_lora_internal(name)]


def block_kind(model: Any, name: str) -> str | None:
    """'attention' or 'mlp' by the nearest enclosing block of ``name``; None if neither.

    Leaf names cannot decide it (GPT-2 has a c_proj in its attention block and another in its
    MLP); attribute names (self_attn, mlp, feed_forward, mixer) and class names do."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:depth])
        label = f"{parts[depth - 1]} {type(model.get_submodule(parent)).__name__}"
        if _ATTENTION_RE.search(label) and "mamba" not in label.lower():
            return "attention"
        if _MLP_RE.search(label):
            return "mlp"
    return None


def peft_refusal(model: Any, leaf: str) -> str | None:
    """PEFT's own per-architecture check for one module name (e.g. Mamba's out_proj), as it runs at injection."""
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    try:
        # The check does not use the tuner instance; calling it on the class runs exactly PEFT's rule.
        LoraModel._check_target_module_compatiblity(LoraModel, LoraConfig(target_modules=[leaf]), model, leaf)
    except ValueError as exc:
        return " ".join(str(exc).split())
    return None


@dataclass(frozen=True)
class Anatomy:
    """What LoRA targeting reads off a model, read in one pass over its modules (names and shapes only).

    Target resolution works on this record alone, so the model is walked here once rather than
    asked again for each rule.
    """

    model_class: str
    modules: list[str]  # every named module but the root, in model order
    wrappable: list[str]  # modules PEFT's LoRA dispatchers accept
    all_linear: list[str]  # PEFT's all-linear resolution
    experts: list[str]  # fused expert parameters
    routers: list[str]  # modules that pick the experts
    matrices: list[str]  # parameters of 2 or more dimensions held directly by a module
    block_kinds: dict[str, str | None]  # each all-linear module: 'attention', 'mlp' or None
    peft_refusals: dict[str, str]  # leaf name -> why PEFT refuses LoRA on it for this architecture
    conv1d: frozenset[str]  # GPT-2 style Conv1D modules (their weights are stored transposed)
    tied: frozenset[str]  # modules whose weight is shared with another module


def read_anatomy(model: Any) -> Anatomy:
    """The model's ``Anatomy``: one pass over its modules, PEFT's own all-linear and per-name rules."""
    from transformers.pytorch_utils import Conv1D

    named = [(name, module) for name, module in model.named_modules() if name]
    candidates = wrappable(model)
    linear = all_linear(model)
    leaves = sorted({name.rsplit(".", 1)[-1] for name in candidates})
    refusals = {leaf: why for leaf in leaves if (why := peft_refusal(model, leaf))}
    return Anatomy(
        model_class=type(model).__name__,
        modules=[name for name, _ in named],
        wrappable=candidates,
        all_linear=linear,
        experts=expert_parameters(model),
        routers=routers(model),
        matrices=[f"{n}.{p}" for n, m in named for p, t in m.named_parameters(recurse=False) if t.ndim >= 2],
        block_kinds={name: block_kind(model, name) for name in linear},
        peft_refusals=refusals,
        conv1d=frozenset(name for name, module in named if isinstance(module, Conv1D)),
        tied=frozenset(tied(model, [name for name, _ in named])),
    )


def tied(model: Any, names: list[str]) -> list[str]:
    """Those of ``names`` (modules) whose weight is shared with another module (tied embeddings)."""
    import torch

    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    shared = {n for group in owners.values() if len(group) > 1 for n in group}
    return [n for n in names if n in shared]

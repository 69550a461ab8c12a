"""Which modules and parameters get LoRA: resolved on the model's skeleton at plan time, before any weight.

``skeleton(facts)`` instantiates the architecture from its config with empty (meta) weights:
the same module names and types as the real model, in milliseconds, no bytes downloaded.
``resolve_targets(model, lora)`` works on that skeleton or on the loaded model alike:

    all-linear   PEFT's own all-linear resolution (nn.Linear / Conv1D, never the output head)
                 plus every fused expert parameter (transformers 5 stores routed experts as 3-D
                 nn.Parameters, reached with PEFT's ``target_parameters``), minus the routers
    attention    the linear layers whose nearest enclosing block is an attention block
    mlp          ... an MLP / MoE block (dense MLPs, shared experts), plus the fused experts
    experts      the experts only: fused expert parameters and linear layers inside experts modules
    [names]      PEFT's list semantics (exact or dotted suffix) over modules AND expert parameters;
                 a router or any module named explicitly is targeted, or refused with PEFT's reason
    "regex"      ``re.fullmatch`` against full module and parameter names

Left out of presets, each with its reason in ``TargetPlan.excluded``: routers (a MoE block's
``gate``/``router``: LoRA on a router changes which experts run, and some routers are Linear
subclasses returning tuples, which LoRA breaks), and whatever PEFT refuses for the architecture
(e.g. ``out_proj`` and ``conv1d`` of Mamba models), with PEFT's own message.

Finally the whole LoraConfig is applied to the skeleton with PEFT (``low_cpu_mem_usage``: the
adapter is meta too), so every refusal PEFT would raise at build time is raised here, and the
trainable-parameter count is exact before the download.
"""

from __future__ import annotations

import difflib
import re
import warnings
from typing import Any

from lora_prep.tasks.errors import InvalidInput, UnknownTargetModule
from lora_prep.tasks.lora.config import config_for, lora_config, out_of_peft_conversion
from lora_prep.tasks.model.anatomy import Anatomy, read_anatomy
from lora_prep.tasks.records.plan import TargetPlan, module_leaves, parameter_leaves
from lora_prep.tasks.settings import DEFAULT_DROPOUT, PRESETS, LoraSettings

_NAMES_SHOWN = 12  # targetable names listed in an error, to keep it one readable line


# --- PEFT's name rules -----------------------------------------------------------------------------


def search(pattern: str, name: str) -> bool:
    try:
        return re.match(pattern, name) is not None
    except re.error:  # PEFT treats these entries as regexes; a broken one matches nothing
        return False


def under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def matching_names(names: list[str], entries: list[str]) -> list[str]:
    """The names that PEFT's modules_to_save entries pick (each entry a regex for the last dotted parts)."""
    return [n for n in names if any(search(rf"(^|.*\.){e}$", n) for e in entries)]


# --- resolution ---------------------------------------------------------------------------------


def _matches_entry(name: str, entry: str) -> bool:
    # PEFT's list semantics (check_target_module_exists): exact or dotted suffix.
    return name == entry or name.endswith("." + entry)


def _suffixes(names: list[str]) -> list[str]:
    out: set[str] = set()
    for name in names:
        parts = name.split(".")
        out.update({parts[-1], ".".join(parts[-2:]), name})
    return sorted(out)


def _unknown(field: str, entry: str, candidates: list[str], kind: str) -> str:
    close = difflib.get_close_matches(entry, candidates, n=3, cutoff=0.5)
    hint = f" (closest: {', '.join(close)})" if close else ""
    return f"{field} {kind} {entry!r} matches no module or expert parameter{hint}"


def _short(names: list[str]) -> str:
    short = module_leaves(names)
    more = f" and {len(short) - _NAMES_SHOWN} more" if len(short) > _NAMES_SHOWN else ""
    return ", ".join(short[:_NAMES_SHOWN]) + more


def _preset(anatomy: Anatomy, spec: str, excluded: dict[str, str]) -> tuple[list[str], list[str]]:
    experts = anatomy.experts
    for name in anatomy.all_linear:
        if under(name, anatomy.routers):
            excluded[name] = "router of a mixture-of-experts block: left out of presets (name it to target it)"
    linear = [n for n in anatomy.all_linear if not under(n, anatomy.routers)]
    if spec == "attention":
        return [n for n in linear if anatomy.block_kinds[n] == "attention"], []
    if spec == "mlp":
        return [n for n in linear if anatomy.block_kinds[n] == "mlp"], experts
    if spec == "experts":
        return [n for n in linear if any("expert" in part for part in n.split(".")[:-1])], experts
    return linear, experts  # all-linear


def _explicit(anatomy: Anatomy, spec: str | list[str], problems: list[str]) -> tuple[list[str], list[str]]:
    wrappable, experts, params = anatomy.wrappable, anatomy.experts, anatomy.matrices
    if isinstance(spec, list):
        hit_modules: set[str] = set()
        hit_parameters: set[str] = set()
        for entry in spec:
            hit_m = {n for n in wrappable if _matches_entry(n, entry)}
            hit_p = {p for p in experts if _matches_entry(p, entry)}
            if not hit_m and not hit_p:
                # A non-Linear module named explicitly (a router holding a 2-D weight): its weight as a parameter target.
                hit_p = {p for p in params if p.endswith(".weight") and _matches_entry(p.rsplit(".", 1)[0], entry)}
            if not (hit_m or hit_p):
                if entry in PRESETS:
                    problems.append(f"target_modules entry {entry!r} is a preset, not a module name (pass it as a plain string)")
                else:
                    problems.append(_unknown("target_modules", entry, [*_suffixes(wrappable), *_suffixes(experts), *PRESETS], "entry"))
            hit_modules |= hit_m
            hit_parameters |= hit_p
        return [n for n in wrappable if n in hit_modules], [p for p in params if p in hit_parameters]
    modules = [n for n in wrappable if re.fullmatch(spec, n)]
    parameters = [p for p in experts if re.fullmatch(spec, p)]
    if not modules and not parameters:
        problems.append(
            _unknown("target_modules", spec, _suffixes(wrappable), "regex")
            + " (a string is a regex matched against full names such as 'model.layers.0.self_attn.q_proj')"
        )
    return modules, parameters


def _check_other_names(anatomy: Anatomy, lora: LoraSettings, targets: list[str], problems: list[str]) -> None:
    """exclude_modules, modules_to_save and the rank/alpha patterns must each match something."""
    wrappable, all_names = anatomy.wrappable, anatomy.modules
    for entry in lora.exclude_modules or []:
        if not any(_matches_entry(n, entry) for n in wrappable):
            problems.append(_unknown("exclude_modules", entry, _suffixes(wrappable), "entry"))
    for entry in lora.modules_to_save or []:
        # PEFT's modules_to_save rule (check_target_module_exists): dotted components anywhere.
        if not any(search(rf"(^|.*\.){entry}($|\..*)", n) for n in all_names):
            problems.append(_unknown("modules_to_save", entry, _suffixes(all_names), "entry"))
    for field, pattern in (("rank_pattern", lora.rank_pattern), ("alpha_pattern", lora.alpha_pattern)):
        for key in pattern or {}:
            # PEFT's get_pattern_key rule: the key is a regex for a dotted suffix of a target name.
            if not any(search(rf"(.*\.)?({key})$", t) for t in targets):
                problems.append(_unknown(field, key, _suffixes(targets), "key") + " among the targets")


def _dropout(lora: LoraSettings, parameters: list[str]) -> tuple[float, str]:
    if not parameters:
        if lora.dropout is None:
            return DEFAULT_DROPOUT, f"{DEFAULT_DROPOUT}: the default"
        return lora.dropout, f"{lora.dropout}: set by lora.dropout"
    leaves = ", ".join(parameter_leaves(parameters))
    if lora.dropout is None:
        return 0.0, (
            f"0: the targets include {len(parameters)} parameters LoRA wraps directly (fused expert parameters and "
            f"the like: {leaves}), and PEFT cannot apply dropout to those (lora.ParamWrapper needs lora_dropout=0); "
            f"the default {DEFAULT_DROPOUT} applies to models without them"
        )
    if lora.dropout:
        raise InvalidInput(
            f"lora.dropout={lora.dropout} cannot be used: the targets include {len(parameters)} fused expert parameters "
            f"or parameters wrapped directly ({leaves}) and PEFT cannot apply dropout to them: "
            "leave lora.dropout unset (0 for this model) or set 0, or leave the experts out (target_modules=attention)."
        )
    return 0.0, "0: set by lora.dropout"


def resolve_targets(model: Any, lora: LoraSettings) -> TargetPlan:
    """The modules and parameters that get LoRA, checked with PEFT on ``model`` (a skeleton or the real one).

    Raises UnknownTargetModule listing every name that matches nothing (with the closest real
    names), InvalidInput for what PEFT refuses, for settings the targets cannot take, or when
    exclusions leave nothing.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    anatomy = read_anatomy(model)
    name, experts = anatomy.model_class, anatomy.experts
    problems: list[str] = []
    excluded: dict[str, str] = {}
    spec = lora.target_modules
    if isinstance(spec, str) and spec in PRESETS:
        modules, parameters = _preset(anatomy, spec, excluded)
        for module in list(modules):
            refusal = anatomy.peft_refusals.get(module.rsplit(".", 1)[-1])
            if refusal:
                excluded[module] = f"PEFT refuses it for this architecture: {refusal}"
                modules.remove(module)
        if not modules and not parameters:
            what = "no experts" if spec == "experts" else f"no {spec} layers LoRA can wrap"
            problems.append(f"target_modules preset {spec!r} matches nothing: {name} has {what}")
    else:
        modules, parameters = _explicit(anatomy, spec, problems)
        for module in modules:
            leaf = module.rsplit(".", 1)[-1]
            if leaf in anatomy.peft_refusals:
                problems.append(f"target_modules names {leaf!r}, which PEFT refuses for {name}: {anatomy.peft_refusals[leaf]}")
    _check_other_names(anatomy, lora, modules, problems)
    if problems:
        raise UnknownTargetModule(
            f"{'; '.join(problems)}; modules LoRA can wrap in {name}: {_short(anatomy.wrappable)}"
            + (f"; expert parameters: {_short(experts)}" if experts else "")
            + "; fix the names, or use a preset (all-linear, attention, mlp"
            + (", experts" if experts else "")
            + ").",
            model=name,
        )
    modules, parameters = out_of_peft_conversion(model, lora, modules, parameters)
    dropout, dropout_reason = _dropout(lora, parameters)
    fan_in_fan_out = any(m in anatomy.conv1d for m in modules)
    # Apply exclude_modules and modules_to_save with PEFT's own check (falsy for excluded names).
    probe = lora_config(lora, modules, [], dropout=dropout, fan_in_fan_out=False)
    modules = [n for n in modules if check_target_module_exists(probe, n)]
    if not modules and not parameters:
        raise InvalidInput(
            f"target_modules {lora.target_modules!r} minus exclude_modules {lora.exclude_modules} and "
            f"modules_to_save {lora.modules_to_save} leaves nothing to train; exclude fewer modules.",
            model=name,
        )
    saved = matching_names(anatomy.modules, lora.modules_to_save or [])
    tie = any(m in anatomy.tied for m in modules + saved)
    return TargetPlan(
        target_modules=modules,
        target_parameters=parameters,
        excluded=excluded,
        dropout=dropout,
        dropout_reason=dropout_reason,
        fan_in_fan_out=fan_in_fan_out,
        ensure_weight_tying=tie,
    )


def plan_targets(model: Any, lora: LoraSettings) -> TargetPlan:
    """resolve_targets, then PEFT applied to the skeleton: its refusals now, and the exact parameter counts."""
    from peft import get_peft_model

    targets = resolve_targets(model, lora)
    config = config_for(lora, targets)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wrapped = get_peft_model(model, config, low_cpu_mem_usage=True)
    except ValueError as exc:  # PEFT checks some settings only against real layers (DoRA support, ParamWrapper limits)
        raise InvalidInput(
            f"PEFT cannot apply these LoRA settings to {type(model).__name__}: {' '.join(str(exc).split())}; change the setting named there."
        ) from None
    trainable, total = wrapped.get_nb_trainable_parameters()
    return targets.model_copy(update={"trainable_params": int(trainable), "total_params": int(total)})

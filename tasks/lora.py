"""LoRA wrapping: LoraSettings -> the model's real target modules -> PeftModel + LoraReport.

Target resolution uses PEFT's own rules so that what we record is what PEFT wraps:

    all-linear   PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND via ``_maybe_include_all_linear_layers``:
                 every nn.Linear / transformers Conv1D except the output head
                 (``get_output_embeddings()``); embeddings are nn.Embedding, never linear.
    attention    the all-linear layers whose nearest enclosing block is an attention block
    mlp          ... an MLP block (see ``_block_kind``)
    [names]      PEFT's list semantics: a module matches when its full name equals the entry
                 or ends with "." + entry; an entry that matches no wrappable module is an error
    "regex"      PEFT's string semantics: ``re.fullmatch`` against full module names, among the
                 modules LoRA can wrap (a regex that also catches containers such as
                 ``layers.0.mlp`` still works; PEFT alone would refuse the container)

The resolved list of full names is what goes into ``LoraConfig.target_modules``,
then PEFT's ``check_target_module_exists`` applies ``exclude_modules`` and
``modules_to_save`` exactly as it will during injection.
"""

from __future__ import annotations

import difflib
import enum
import logging
import os
import re
import warnings
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from typing import Any, Iterator

import torch
from pydantic import BaseModel, ConfigDict, Field

from lora_prep.tasks.errors import InvalidInput, UnknownTargetModule
from lora_prep.tasks.settings import LoraSettings

log = logging.getLogger(__name__)

PRESETS = ("all-linear", "attention", "mlp")
# The nearest enclosing block decides a preset: attribute names (self_attn, attn,
# attention, mlp, feed_forward) and class names (LlamaAttention, GPT2MLP,
# GPTNeoXMLP, ...) both say which block it is. Leaf names cannot: GPT-2 has a
# c_proj in its attention block and another in its MLP.
_ATTENTION_RE = re.compile(r"attn|attention", re.IGNORECASE)
_MLP_RE = re.compile(r"mlp|feed_?forward|ffn|moe|experts?\b", re.IGNORECASE)
_NAMES_SHOWN = 12  # targetable names listed in an error, to keep it one readable line


class LoraReport(BaseModel):
    """What wrap_lora did: JSON-serializable, logged to the manifest and MLflow."""

    model_config = ConfigDict(frozen=True)

    target_modules: list[str] = Field(description="Full names of the modules that received a LoRA layer, in model order.")
    total_params: int = Field(description="All parameters of the wrapped model (base + adapter).")
    trainable_params: int = Field(description="Parameters that train: LoRA matrices, modules_to_save copies, biases if bias != none.")
    adapter_bytes: int = Field(description="Tensor bytes that save_pretrained writes for the adapter (estimate; excludes file headers).")
    warnings: list[str] = Field(default_factory=list, description="One-line notes, also logged at WARNING.")
    peft_config: dict = Field(description="The LoraConfig as a plain dict, as adapter_config.json records it.")


# --- which modules --------------------------------------------------------------------


def _lora_wrappable_types() -> tuple[type, ...]:
    # What PEFT's LoRA dispatchers accept (peft/tuners/lora/model.py); bitsandbytes
    # and HQQ linears are nn.Linear subclasses.
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, Conv1D, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d,
            torch.nn.MultiheadAttention)


def _wrappable(model) -> dict[str, torch.nn.Module]:
    types = _lora_wrappable_types()
    return {name: m for name, m in model.named_modules() if name and isinstance(m, types)}


def _all_linear(model) -> list[str]:
    """PEFT's own all-linear resolution (linear + Conv1D, output head removed), in model order."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers
    from peft.utils.constants import INCLUDE_LINEAR_LAYERS_SHORTHAND

    config = _maybe_include_all_linear_layers(LoraConfig(target_modules=INCLUDE_LINEAR_LAYERS_SHORTHAND), model)
    chosen = set(config.target_modules)
    return [name for name, _ in model.named_modules() if name in chosen]


def _block_kind(model, name: str) -> str | None:
    """'attention' or 'mlp' by the nearest enclosing block of module ``name``; None if neither."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:depth])
        label = f"{parts[depth - 1]} {type(model.get_submodule(parent)).__name__}"
        if _ATTENTION_RE.search(label):
            return "attention"
        if _MLP_RE.search(label):
            return "mlp"
    return None


def _search(pattern: str, name: str) -> bool:
    # PEFT uses modules_to_save entries and pattern keys as regexes; a broken one matches nothing.
    try:
        return re.match(pattern, name) is not None
    except re.error:
        return False


def _matches_entry(name: str, entry: str) -> bool:
    # PEFT's list semantics (check_target_module_exists): exact or dotted suffix.
    return name == entry or name.endswith("." + entry)


def _unknown(field: str, entry: str, candidates: list[str], kind: str) -> str:
    """One clause: the bad entry and its closest names (difflib)."""
    close = difflib.get_close_matches(entry, candidates, n=3, cutoff=0.5)
    hint = f" (closest: {', '.join(close)})" if close else ""
    return f"{field} {kind} {entry!r} matches no module{hint}"


def _suffix_candidates(names: list[str]) -> list[str]:
    """Short names (q_proj), two-part suffixes (self_attn.q_proj) and full names, for suggestions."""
    out: set[str] = set()
    for name in names:
        parts = name.split(".")
        out.update({parts[-1], ".".join(parts[-2:]), name})
    return sorted(out)


def _short_names(names: list[str]) -> str:
    short = sorted({n.rsplit(".", 1)[-1] for n in names})
    more = f" and {len(short) - _NAMES_SHOWN} more" if len(short) > _NAMES_SHOWN else ""
    return ", ".join(short[:_NAMES_SHOWN]) + more


def _requested(model, lora: LoraSettings, wrappable: list[str], problems: list[str]) -> list[str]:
    spec = lora.target_modules
    if spec == "all-linear":
        return _all_linear(model)
    if spec in ("attention", "mlp"):
        return [n for n in _all_linear(model) if _block_kind(model, n) == spec]
    if isinstance(spec, list):
        chosen: set[str] = set()
        for entry in spec:
            hits = {n for n in wrappable if _matches_entry(n, entry)}
            if not hits and entry in PRESETS:
                problems.append(f"target_modules entry {entry!r} is a preset, not a module name (pass it as a plain string)")
            elif not hits:
                problems.append(_unknown("target_modules", entry, [*_suffix_candidates(wrappable), *PRESETS], "entry"))
            chosen |= hits
        return [n for n in wrappable if n in chosen]
    hits = [n for n in wrappable if re.fullmatch(spec, n)]
    if not hits:
        # A bare name given as a string is a regex over FULL names: hint the list form.
        problems.append(_unknown("target_modules", spec, _suffix_candidates(wrappable), "regex") + " (a string is a regex matched against full names such as 'model.layers.0.self_attn.q_proj')")
    return hits


def _check_other_names(model, lora: LoraSettings, targets: list[str], wrappable: list[str], problems: list[str]) -> None:
    """exclude_modules, modules_to_save and the rank/alpha patterns must each match something."""
    all_names = [n for n, _ in model.named_modules() if n]
    for entry in lora.exclude_modules or []:
        if not any(_matches_entry(n, entry) for n in wrappable):
            problems.append(_unknown("exclude_modules", entry, _suffix_candidates(wrappable), "entry"))
    for entry in lora.modules_to_save or []:
        # PEFT's modules_to_save rule (check_target_module_exists): dotted components anywhere.
        if not any(_search(rf"(^|.*\.){entry}($|\..*)", n) for n in all_names):
            problems.append(_unknown("modules_to_save", entry, _suffix_candidates(all_names), "entry"))
    for field, pattern in (("rank_pattern", lora.rank_pattern), ("alpha_pattern", lora.alpha_pattern)):
        for key in pattern or {}:
            # PEFT's get_pattern_key rule: the key is a regex for a dotted suffix of a target name.
            if not any(_search(rf"(.*\.)?({key})$", t) for t in targets):
                problems.append(_unknown(field, key, _suffix_candidates(targets), "key") + " among the targets")


def resolve_targets(model, lora: LoraSettings) -> list[str]:
    """Full names of the modules that will get a LoRA layer, in model order.

    Raises UnknownTargetModule listing every name that matches nothing (with the
    closest real names), or InvalidInput when exclusions leave nothing to target.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    wrappable = list(_wrappable(model))
    problems: list[str] = []
    requested = _requested(model, lora, wrappable, problems)
    if not requested and not problems:  # a preset whose blocks this model does not have
        problems.append(f"target_modules preset {lora.target_modules!r} matches no module")
    _check_other_names(model, lora, requested, wrappable, problems)
    if problems:
        raise UnknownTargetModule(
            f"{'; '.join(problems)}; modules LoRA can wrap in {type(model).__name__}: {_short_names(wrappable)}; "
            "fix the names, or use a preset (all-linear, attention, mlp).",
            model=type(model).__name__,
        )
    # Apply exclude_modules and modules_to_save with PEFT's own check; it returns a
    # falsy _ExcludedModule for those.
    config = _lora_config(lora, requested, fan_in_fan_out=False)
    targets = [n for n in requested if check_target_module_exists(config, n)]
    if not targets:
        raise InvalidInput(
            f"target_modules {lora.target_modules!r} minus exclude_modules {lora.exclude_modules} and "
            f"modules_to_save {lora.modules_to_save} leaves nothing to train; exclude fewer modules.",
            model=type(model).__name__,
        )
    return targets


# --- wrapping -------------------------------------------------------------------------


def _lora_config(lora: LoraSettings, targets: list[str], *, fan_in_fan_out: bool, tie: bool = False):
    from peft import LoraConfig, TaskType

    try:
        return LoraConfig(
            task_type=TaskType.CAUSAL_LM,
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            bias=lora.bias,
            target_modules=list(targets),
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


@contextmanager
def _seeded(seed: int, model) -> Iterator[None]:
    """Seed adapter init without leaking RNG state: fork, seed, restore.

    PEFT builds LoRA matrices on the CPU and moves them to the base layer's
    device, so the CPU generator decides the default init; CUDA generators
    of the model's devices are seeded too (pissa_niter_N draws on the weight's device).
    """
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


def _tied_names(model, names: list[str]) -> list[str]:
    """Those of ``names`` (modules) whose weight is shared with another module (tied embeddings)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.nn.Parameter):
            owners.setdefault(id(weight), []).append(name)
    shared = {n for group in owners.values() if len(group) > 1 for n in group}
    return [n for n in names if n in shared]


def _matching(model, entries: list[str]) -> list[str]:
    return [n for n, _ in model.named_modules() if n and any(_search(rf"(^|.*\.){e}$", n) for e in entries)]


def _adapter_bytes(peft_model) -> tuple[int, int]:
    """(bytes save_pretrained writes, of which full embedding copies it adds by itself).

    PEFT's "auto" also saves the embeddings when the vocabulary was resized (a pad
    token added), comparing with the base config.json; only checked for a local
    base directory, so this function never calls the network.
    """
    from peft import get_peft_model_state_dict

    def size(state: dict) -> int:
        # Tied copies are stored twice in the file (PEFT clones shared tensors), so count every entry.
        return sum(t.numel() * t.element_size() for t in state.values())

    base = peft_model.peft_config["default"].base_model_name_or_path
    without = size(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    if not (base and os.path.isdir(base)):
        return without, 0
    with warnings.catch_warnings():  # PEFT warns when it decides to save embeddings; we report it ourselves
        warnings.simplefilter("ignore")
        auto = size(get_peft_model_state_dict(peft_model, save_embedding_layers="auto"))
    return auto, auto - without


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(_jsonable(v) for v in value)  # sorted: stable manifests
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if is_dataclass(value) and not isinstance(value, type):
        return _jsonable(asdict(value))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def _kib(n: int) -> str:
    return f"{n / 1024:,.1f} KiB" if n < 1024**2 else f"{n / 1024**2:,.1f} MiB"


def wrap_lora(model, lora: LoraSettings) -> tuple[Any, LoraReport]:
    """Wrap ``model`` (modified in place) with a LoRA adapter; returns (PeftModel, LoraReport).

    Same settings, seed and base weights give byte-identical adapter weights.
    """
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers.pytorch_utils import Conv1D

    targets = resolve_targets(model, lora)
    modules = dict(model.named_modules())
    # GPT-2 style Conv1D stores weights as (in, out): PEFT needs fan_in_fan_out=True for it.
    fan_in_fan_out = any(isinstance(modules[t], Conv1D) for t in targets)
    saved = _matching(model, lora.modules_to_save or [])
    tied_saved = _tied_names(model, saved)
    notes: list[str] = []

    # A tied head/embedding in modules_to_save or targets: keep it tied (as in the base)
    # instead of letting PEFT train two diverging copies that break merging. For a LoRA
    # target PEFT then also wraps the tied partner (lm_head -> wte), which the report shows.
    tie = bool(tied_saved or _tied_names(model, targets))
    config = _lora_config(lora, targets, fan_in_fan_out=fan_in_fan_out, tie=tie)
    try:
        with _seeded(lora.seed, model):
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # PEFT checks some settings only against real layers (e.g. DoRA support)
        detail = " ".join(str(exc).split())
        raise InvalidInput(f"PEFT cannot apply these LoRA settings to {type(model).__name__}: {detail}; change the setting named there.") from None

    base = peft_model.get_base_model()
    wrapped = [n for n, m in base.named_modules() if isinstance(m, LoraLayer)]
    trainable, total = peft_model.get_nb_trainable_parameters()
    adapter_bytes, embedding_bytes = _adapter_bytes(peft_model)
    lora_bytes = sum(
        p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" in n
    )

    if saved:
        full = adapter_bytes - lora_bytes - embedding_bytes
        notes.append(
            f"modules_to_save {lora.modules_to_save} puts full copies in the adapter: {_kib(full)} of "
            f"{_kib(adapter_bytes)} (LoRA matrices {_kib(lora_bytes)}); drop modules_to_save unless those modules must train in full."
        )
    if tied_saved:
        notes.append(
            f"{', '.join(tied_saved)} in modules_to_save is tied to the embeddings: the adapter stores the head and the "
            "embedding copy, kept tied (ensure_weight_tying); train the tied head only if new tokens need it."
        )
    if embedding_bytes:
        embedding_targeted = any(isinstance(modules[t], torch.nn.Embedding) for t in targets)
        why, fix = (
            ("embedding layers are LoRA targets", "target linear layers only (a preset)")
            if embedding_targeted
            else ("the vocabulary was resized (a pad token added?)", "reuse an existing token as pad instead of adding one")
        )
        notes.append(
            f"PEFT also saves the full embedding matrices because {why}: {_kib(embedding_bytes)} of the adapter's "
            f"{_kib(adapter_bytes)}; {fix}."
        )
    if isinstance(lora.init_lora_weights, str) and lora.init_lora_weights.startswith(("pissa", "olora")):
        notes.append(
            f"init_lora_weights={lora.init_lora_weights} rewrites the base weights (residual W - BA): PEFT redoes that "
            "(deterministic) step when the adapter is loaded, as load_adapter_ready does; a loader that attaches the "
            "adapter to the untouched base gets another model."
        )
    for note in notes:
        log.warning("%s", note)

    report = LoraReport(
        target_modules=wrapped,
        total_params=total,
        trainable_params=trainable,
        adapter_bytes=adapter_bytes,
        warnings=notes,
        peft_config=_jsonable(peft_model.peft_config["default"].to_dict()),
    )
    log.info(
        "LoRA r=%d on %d modules: %d trainable of %d params, adapter ~%s",
        lora.r, len(wrapped), trainable, total, _kib(adapter_bytes),
    )
    return peft_model, report

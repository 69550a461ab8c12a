"""LoRA wrapping: a TargetPlan (tasks/lora/targets.py) applied with PEFT -> PeftModel + LoraReport.

The build stage wraps exactly what the plan stage resolved on the skeleton; called without a
plan (tests, users' own code), the targets are resolved on the model itself first. Same
settings, seed and base weights give byte-identical adapter weights.
"""

from __future__ import annotations

import enum
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from lora_prep.tasks.common.units import format_bytes
from lora_prep.tasks.errors import InvalidInput
from lora_prep.tasks.lora.config import config_for
from lora_prep.tasks.lora.targets import matching_names, resolve_targets
from lora_prep.tasks.model.anatomy import tied
from lora_prep.tasks.records.plan import TargetPlan
from lora_prep.tasks.settings import LoraSettings

log = logging.getLogger(__name__)


class LoraReport(BaseModel):
    """What wrap_lora did: JSON-serializable, logged to the manifest and MLflow."""

    model_config = ConfigDict(frozen=True)

    target_modules: list[str] = Field(description="Full names of the modules that received a LoRA layer, in model order.")
    target_parameters: list[str] = Field(default_factory=list, description="Full names of the parameters wrapped directly (fused experts).")
    total_params: int = Field(description="All parameters of the wrapped model (base + adapter).")
    trainable_params: int = Field(description="Parameters that train: LoRA matrices, modules_to_save copies, biases if bias != none.")
    adapter_bytes: int = Field(description="Tensor bytes that save_pretrained writes for the adapter (estimate; excludes file headers).")
    save_embedding_layers: bool = Field(
        default=False, description="The adapter must carry full embedding matrices (resized vocabulary or embedding targets)."
    )
    warnings: list[str] = Field(default_factory=list, description="One-line notes, also logged at WARNING.")
    peft_config: dict = Field(description="The LoraConfig as a plain dict, as adapter_config.json records it.")


@contextmanager
def _seeded(seed: int, model: Any) -> Iterator[None]:
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


def _adapter_bytes(peft_model: Any, save_embeddings: bool) -> tuple[int, int]:
    """(bytes save_pretrained writes, of which full embedding copies). Never calls the network:
    whether embeddings are saved is decided here (``save_embedding_layers``), not by PEFT's
    "auto", which would ask the Hub for the base config once the adapter names a repo id."""
    from peft import get_peft_model_state_dict

    def size(state: dict) -> int:
        # Tied copies are stored twice in the file (PEFT clones shared tensors), so count every entry.
        return sum(t.numel() * t.element_size() for t in state.values())

    without = size(get_peft_model_state_dict(peft_model, save_embedding_layers=False))
    if not save_embeddings:
        return without, 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = size(get_peft_model_state_dict(peft_model, save_embedding_layers=True))
    return full, full - without


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


def wrap_lora(
    model: Any, lora: LoraSettings, targets: TargetPlan | None = None, *, embeddings_resized: bool = False
) -> tuple[Any, LoraReport]:
    """Wrap ``model`` (modified in place) with a LoRA adapter; returns (PeftModel, LoraReport).

    targets: what the plan stage resolved (None: resolve on this model now).
    embeddings_resized: the load added a pad token and grew the vocabulary, so the adapter
    must carry the embeddings to load back (PEFT saves them when told to).
    """
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    targets = targets or resolve_targets(model, lora)
    modules = dict(model.named_modules())
    missing = [t for t in targets.target_modules if t not in modules]
    if missing:
        raise InvalidInput(
            f"the planned LoRA targets {missing[:3]} are not modules of the loaded {type(model).__name__}: "
            "the weights do not match the config the plan read; plan again."
        )
    saved = matching_names([n for n, _ in model.named_modules() if n], lora.modules_to_save or [])
    tied_saved = tied(model, saved)
    embedding_targeted = any(isinstance(modules[t], torch.nn.Embedding) for t in targets.target_modules)
    save_embeddings = embeddings_resized or embedding_targeted
    notes: list[str] = []
    if targets.dropout_reason.startswith("0: the targets include"):  # a decision, not a problem: the summary shows it too
        log.info("lora.dropout %s", targets.dropout_reason)

    config = config_for(lora, targets)
    try:
        with _seeded(lora.seed, model), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = get_peft_model(model, config)
    except ValueError as exc:  # PEFT checks some settings only against real layers (e.g. DoRA support)
        detail = " ".join(str(exc).split())
        raise InvalidInput(
            f"PEFT cannot apply these LoRA settings to {type(model).__name__}: {detail}; change the setting named there."
        ) from None

    base = peft_model.get_base_model()
    wrapped = [n for n, m in base.named_modules() if isinstance(m, LoraLayer) and not isinstance(m, ParamWrapper)]
    trainable, total = peft_model.get_nb_trainable_parameters()
    adapter_bytes, embedding_bytes = _adapter_bytes(peft_model, save_embeddings)
    lora_bytes = sum(p.numel() * p.element_size() for n, p in base.named_parameters() if "lora_" in n)

    if saved:
        full = adapter_bytes - lora_bytes - embedding_bytes
        notes.append(
            f"modules_to_save {lora.modules_to_save} puts full copies in the adapter: {format_bytes(full)} of "
            f"{format_bytes(adapter_bytes)} (LoRA matrices {format_bytes(lora_bytes)}); drop modules_to_save unless those modules must train in full."
        )
    if tied_saved:
        notes.append(
            f"{', '.join(tied_saved)} in modules_to_save is tied to the embeddings: the adapter stores the head and the "
            "embedding copy, kept tied (ensure_weight_tying); train the tied head only if new tokens need it."
        )
    if embedding_bytes:
        why, fix = (
            ("embedding layers are LoRA targets", "target linear layers only (a preset)")
            if embedding_targeted
            else ("the vocabulary was resized (a pad token added?)", "reuse an existing token as pad instead of adding one")
        )
        notes.append(
            f"the adapter also saves the full embedding matrices because {why}: {format_bytes(embedding_bytes)} of the adapter's "
            f"{format_bytes(adapter_bytes)}; {fix}."
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
        target_parameters=list(targets.target_parameters),
        total_params=total,
        trainable_params=trainable,
        adapter_bytes=adapter_bytes,
        save_embedding_layers=save_embeddings,
        warnings=notes,
        peft_config=_jsonable(peft_model.peft_config["default"].to_dict()),
    )
    log.info(
        "LoRA r=%d on %d modules and %d expert parameters: %d trainable of %d params, adapter ~%s",
        lora.r,
        len(wrapped),
        len(targets.target_parameters),
        trainable,
        total,
        format_bytes(adapter_bytes),
    )
    return peft_model, report


def save_adapter(peft_model: Any, out_dir: Path, name_or_path: str, revision: str | None, *, save_embedding_layers: bool) -> None:
    """PEFT's save_pretrained with a portable base: the repo id (or the user's directory) and the commit sha.

    PEFT records the path the base was loaded from (a cache snapshot here) and revision None, and
    its model card repeats the model's name_or_path (config._name_or_path, and a base_model:adapter:
    tag); all are set for the save and restored. ``save_embedding_layers`` is decided by the
    caller, so PEFT's "auto" never asks the Hub.
    """
    config = peft_model.peft_config["default"]
    base = peft_model.get_base_model()
    saved = (config.base_model_name_or_path, config.revision, base.config._name_or_path, base.name_or_path)
    config.base_model_name_or_path, config.revision = name_or_path, revision
    base.config._name_or_path = base.name_or_path = name_or_path
    try:
        peft_model.save_pretrained(str(out_dir), safe_serialization=True, save_embedding_layers=save_embedding_layers)
    finally:
        config.base_model_name_or_path, config.revision, base.config._name_or_path, base.name_or_path = saved

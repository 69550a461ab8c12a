"""lora-prep: a Hugging Face model id (or a local model directory) in, a tracked, adapter-ready LoRA artifact out.

The public API::

    from lora_prep import prepare_model, load_adapter_ready, LoraSettings

    prepared = prepare_model("Qwen/Qwen2.5-0.5B", lora=LoraSettings(r=8))      # a Prefect flow
    model, tokenizer, manifest = load_adapter_ready(prepared.artifact_dir, trainable=True)

Names are imported on first use (PEP 562 ``__getattr__``), not here: ``lora-prep --help``
and ``import lora_prep`` must not pay for torch, transformers and Prefect (seconds); a stage
imports them, on the main thread, when it first needs them. The table below is the whole API.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "prepare_model": "lora_prep.flows.prepare_model",
    "PreparedModel": "lora_prep.tasks.records.results",
    "load_adapter_ready": "lora_prep.tasks.artifact.load_back",
    "AdapterReady": "lora_prep.tasks.artifact.load_back",
    "Manifest": "lora_prep.tasks.records.manifest",
    "SourceSettings": "lora_prep.tasks.settings",
    "LoadSettings": "lora_prep.tasks.settings",
    "LoraSettings": "lora_prep.tasks.settings",
    "TrackingSettings": "lora_prep.tasks.settings",
    "OutputSettings": "lora_prep.tasks.settings",
    "LoraPrepError": "lora_prep.tasks.errors",
}

__all__ = [
    "AdapterReady",
    "LoadSettings",
    "LoraPrepError",
    "LoraSettings",
    "Manifest",
    "OutputSettings",
    "PreparedModel",
    "SourceSettings",
    "TrackingSettings",
    "load_adapter_ready",
    "prepare_model",
]
assert set(__all__) == set(_API)

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on demand
    from lora_prep.flows.prepare_model import prepare_model
    from lora_prep.tasks.artifact.load_back import AdapterReady, load_adapter_ready
    from lora_prep.tasks.errors import LoraPrepError
    from lora_prep.tasks.records.manifest import Manifest
    from lora_prep.tasks.records.results import PreparedModel
    from lora_prep.tasks.settings import (
        LoadSettings,
        LoraSettings,
        OutputSettings,
        SourceSettings,
        TrackingSettings,
    )


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'lora_prep' has no attribute {name!r}; the public API is: {', '.join(__all__)}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access is a plain attribute lookup
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

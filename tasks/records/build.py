"""Records of the build stage: what the load used (``LoadReport``), the check (``CheckRecord``), the artifact built."""

from __future__ import annotations

from typing import Any, Union

from pydantic import Field

from lora_prep.tasks.records.base import Record


class KbitPreparation(Record):
    """What preparing a 4/8-bit model for training changed (tasks/model/quantization.py says why)."""

    frozen_params: int = Field(ge=0, description="Base parameters frozen (requires_grad off).")
    upcast_to_float32: list[str] = Field(default_factory=list, description="Parameter classes cast to float32 (none, by choice).")
    upcast_bytes: int = Field(default=0, ge=0, description="Bytes the upcast added to the model (part of the plan's estimate).")
    reason: str


class LoadReport(Record):
    """What the load actually used; recorded in the manifest next to the plan."""

    dtype: str = Field(description="dtype of the loaded weights (compute dtype for 4/8-bit loads), e.g. float32.")
    attn_implementation: str = Field(description="Attention kernel the model runs with, as transformers set it.")
    attn_fallbacks_tried: list[str] = Field(
        default_factory=list, description='Kernels that failed at load, in order, with the error class: "flash_attention_2: ImportError".'
    )
    device_map: Union[str, dict[str, Union[int, str]]] = Field(
        description="model.hf_device_map (module -> device) when accelerate placed the model, else the device."
    )
    quantization: str = Field(description='"none", "4bit nf4 double-quant compute=<dtype>" or "8bit LLM.int8".')
    pad_token: str
    pad_token_id: int
    pad_token_strategy: str = Field(description="Which pad token was chosen and why (docs/PADDING.md).")
    embeddings_resized: bool = Field(
        default=False, description="A new pad token grew the embeddings: the adapter must save them (modules_to_save) to be reloadable."
    )
    gradient_checkpointing: bool
    trust_remote_code: bool
    kbit_prepared: bool = Field(description="The 4/8-bit model was prepared for training (see kbit_preparation).")
    kbit_preparation: KbitPreparation | None = None
    quantization_config: dict[str, Any] | None = Field(
        default=None,
        description="The loaded model's BitsAndBytesConfig.to_dict() ('quant_method': 'bitsandbytes'): "
        "BitsAndBytesConfig.from_dict rebuilds the same k-bit base anywhere.",
    )
    memory_bytes: int | None = Field(
        default=None, description="What the loaded model holds: parameters, buffers and quantization state, each tensor once."
    )
    seconds: float = Field(description="Wall time of tokenizer + model load and training preparation.")


class CheckRecord(Record):
    """The wrapped model was run before the artifact was written."""

    forward: bool
    backward: bool
    tokens: int
    layers: int = Field(default=0, description="Decoder layers the pass ran: one of each kind (or all of them).")
    layers_total: int = Field(default=0, description="Decoder layers the model has.")
    head_rows: int | None = Field(default=None, description="Rows of the output head the pass scored (None: the whole vocabulary).")
    loss: float | None = None
    seconds: float


class BuiltArtifact(Record):
    artifact_dir: str
    total_params: int
    trainable_params: int
    target_modules: list[str]
    target_parameters: list[str]
    adapter_bytes: int
    content_digest: str
    check: CheckRecord
    peak_rss_bytes: int
    seconds: float

"""Records of the plan stage: how the model will load (``LoadPlan``), what gets LoRA (``TargetPlan``), both
together with the artifact's place (``Plan``), and the dry run's report (``PlanReport``)."""

from __future__ import annotations

from typing import Any, Literal, Union

from pydantic import Field

from lora_prep.tasks.records.base import Record
from lora_prep.tasks.settings import LoraSettings

PlanDtype = Literal["bfloat16", "float16", "float32"]
PlanAttn = Literal["flash_attention_2", "sdpa", "eager"]


def module_leaves(names: list[str]) -> list[str]:
    """Module names as every summary shows them: their last part (q_proj, down_proj), once each."""
    return sorted({n.rsplit(".", 1)[-1] for n in names})


def parameter_leaves(names: list[str]) -> list[str]:
    """Parameter targets as every summary shows them: gate_up_proj for a fused expert parameter,
    mlp.gate_proj.weight for a module's weight targeted directly (the part that says which module)."""
    return sorted({".".join(n.split(".")[-3:]) if n.endswith(".weight") else n.rsplit(".", 1)[-1] for n in names})


class ParameterCensus(Record):
    """The model's parameters by how a load stores them, counted on its skeleton (shapes, no bytes).

    bitsandbytes quantizes ``nn.Linear`` (and GPT-2's ``Conv1D``) weights only, minus the modules transformers
    keeps out (the output head, tied weights, the last module, ``_keep_in_fp32_modules``, ``llm_int8_skip_modules``);
    everything else stays in the compute dtype: embeddings, norms, biases, and transformers 5's fused 3-D expert
    parameters (most of a mixture-of-experts model).
    """

    linear_weight_params: int = Field(ge=0, description="Weights of the nn.Linear/Conv1D layers bitsandbytes would quantize.")
    linear_layers: int = Field(ge=0, description="How many such layers (each carries its own quantization state).")
    linear_rows: int = Field(ge=0, description="Their output rows, summed (8-bit keeps one float32 scale per row).")
    linear_blocks: int = Field(ge=0, description="Their 4-bit blocks of 64 weights, summed per layer (one absmax each).")
    linear_nested_blocks: int = Field(ge=0, description="Blocks of 256 absmax values, summed per layer (double quantization).")
    kept_linear_params: int = Field(ge=0, description="Weights of linear layers left unquantized (head, tied, skipped).")
    embedding_params: int = Field(ge=0, description="nn.Embedding weights.")
    expert_params: int = Field(ge=0, description="Fused 3-D expert parameters (transformers 5 MoE): never quantized.")
    other_params: int = Field(ge=0, description="Norms, biases, convolutions and everything else.")
    float32_if_half_params: int = Field(default=0, ge=0, description="Kept in float32 when loading in float16 (_keep_in_fp32_modules).")
    float32_always_params: int = Field(default=0, ge=0, description="Kept in float32 for any 16-bit load (_keep_in_fp32_modules_strict).")
    buffer_bytes: int = Field(default=0, ge=0, description="Buffers (rotary frequencies, ...), in their own dtypes.")
    adapter_params: int = Field(default=0, ge=0, description="Trainable parameters once wrapped with LoRA (PEFT keeps them in float32).")

    @property
    def total_params(self) -> int:
        return self.linear_weight_params + self.kept_linear_params + self.embedding_params + self.expert_params + self.other_params


class MemoryPart(Record):
    """One class of the estimate: what it is, how many parameters, how it is stored, and the bytes."""

    name: str
    params: int = Field(ge=0)
    stored_as: str = Field(description='"4-bit NF4 + absmax", "int8 + row scales", "bfloat16", "float32", ...')
    bytes: int = Field(ge=0)


class LoadPlan(Record):
    """How tasks/model/load.py loads the model, with the reason for each choice. JSON in, JSON out."""

    dtype: PlanDtype
    attn_implementation: PlanAttn
    attn_fallbacks: list[str] = Field(
        default_factory=list, description="Try these in order if the planned attention fails at load; empty when chosen explicitly."
    )
    device_map: Union[str, dict[str, Union[int, str]]] = Field(description='"cpu", "mps", "cuda:N", "auto" or a module map.')
    max_memory: dict[str, int] | None = Field(default=None, description="Bytes per device for accelerate; GPU keys are indices as strings.")
    quantization: Literal["none", "4bit", "8bit"] = "none"
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False
    target_device: str = Field(description='"cpu", "cuda:N", "auto" (several devices) or "mps".')
    estimate_bytes: int = Field(
        description="What the loaded, LoRA-wrapped model holds once every weight is resident: parameters by class (quantized or "
        "in their dtype), quantization state, buffers and the adapter (see memory)."
    )
    memory: list[MemoryPart] = Field(default_factory=list, description="estimate_bytes by class (from the skeleton's census).")
    quantization_config: dict[str, Any] | None = Field(
        default=None,
        description="transformers' BitsAndBytesConfig.to_dict() of a 4/8-bit load: BitsAndBytesConfig.from_dict() rebuilds it anywhere.",
    )
    overhead_bytes: int = Field(description="Margin: 10% of the weights + 512 MiB per device.")
    available_bytes: int = Field(description="Memory the placement may use: min(free, load.max_memory) summed over devices.")
    fits: bool
    reasons: dict[str, str] = Field(description="One line per decision: dtype, attn, placement, quantization, fit, ...")


class TargetPlan(Record):
    """What will get LoRA, decided before the download; the build stage applies exactly this."""

    target_modules: list[str] = Field(description="Full names of the modules that get a LoRA layer, in model order.")
    target_parameters: list[str] = Field(
        default_factory=list, description="Full names of parameters LoRA wraps directly (fused experts), via PEFT target_parameters."
    )
    excluded: dict[str, str] = Field(
        default_factory=dict,
        description="Candidates a preset left out (routers, modules PEFT refuses for this architecture), with the reason.",
    )
    dropout: float = Field(description="The LoRA dropout applied.")
    dropout_reason: str
    fan_in_fan_out: bool = Field(default=False, description="GPT-2 style Conv1D targets (weights stored in x out).")
    ensure_weight_tying: bool = Field(default=False, description="A tied head/embedding is targeted or saved: kept tied.")
    trainable_params: int | None = Field(default=None, description="Counted on the wrapped skeleton (None when it could not be built).")
    total_params: int | None = None

    @property
    def module_leaves(self) -> list[str]:
        return module_leaves(self.target_modules)

    @property
    def expert_parameter_leaves(self) -> list[str]:
        return parameter_leaves(self.target_parameters)


class Plan(Record):
    """The plan stage's result: small JSON, read by build, the manifest and `lora-prep plan`."""

    load: LoadPlan
    targets: TargetPlan
    artifact_parent: str = Field(description="Where the artifact directory will be created (checked writable).")


class PlannedFile(Record):
    path: str
    bytes: int
    cached: bool


class PlanReport(Record):
    """The dry run's record: the plan is there also when the model does not fit (fits=false, with the numbers)."""

    repo_id: str
    source: str
    revision: str
    commit_sha: str | None
    files: list[PlannedFile]
    bytes_total: int
    bytes_to_download: int
    files_cached: int
    param_count: int | None
    stored_dtypes: dict[str, int]
    disk_free_bytes: int
    lora: LoraSettings
    plan: LoadPlan
    targets: TargetPlan
    artifact_parent: str
    fits: bool
    refusal: str | None = Field(default=None, description="Why it does not fit, with the options that would.")
    memory_estimate_bytes: int
    memory_available_bytes: int

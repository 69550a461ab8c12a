"""Settings for each stage, as pydantic models.

The same classes are the Prefect flow's parameters (so the UI shows a
validated form) and the CLI's options. Defaults are plain values: nothing
here reads the environment or touches torch at import time; "auto" and
``None`` are resolved by the stage that owns the decision.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lora_prep.tasks.common.units import is_size

_SHA_RE = re.compile(r"^[0-9a-f]{40}$")
# PEFT initialisations that need no training data (eva, corda, lora_ga need a
# dataloader; loftq needs a LoftQConfig and a full-precision pass).
_DATA_FREE_INITS = ("gaussian", "pissa", "olora", "orthogonal")


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Union members carry titles: the Prefect run form draws a union as tabs labelled by them
# ("Preset / Module names / Regex"), where untitled members read "str / list / str".
Default = Annotated[None, Field(title="Default")]
Text = Annotated[str, Field(title="Value")]
Directory = Annotated[str, Field(title="Directory")]
Names = Annotated[list[str], Field(title="Names")]


def is_full_sha(revision: str | None) -> bool:
    return bool(revision and _SHA_RE.match(revision))


class SourceSettings(_Settings):
    """Where the model comes from and what may be fetched."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Model source")

    cache_dir: Directory | Default = Field(
        title="Hugging Face cache directory",
        default=None,
        description="Hugging Face cache directory. Default: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.",
    )
    offline: bool = Field(
        title="Offline (cache only)",
        default=False,
        description="Use only the local cache (as HF_HUB_OFFLINE=1). Fails if the cache lacks a complete snapshot.",
    )
    allow_pickle: bool = Field(
        title="Allow pickle weights",
        default=False,
        description="Allow repos whose only weights are pickle files (*.bin). Pickle can run code when loaded: only for repos you trust.",
    )
    token_secret: Text | Default = Field(
        title="Token secret block",
        default=None,
        description="Name of a Prefect Secret block holding the Hugging Face token. Default: the HF_TOKEN environment variable.",
    )
    min_free_bytes: int = Field(
        title="Disk space to keep free (bytes)",
        default=0,
        ge=0,
        description="Extra free disk space (bytes) to keep in the cache after the download; the download is refused before it starts otherwise.",
    )


Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Attn = Literal["auto", "flash_attention_2", "sdpa", "eager"]
Quantization = Literal["none", "4bit", "8bit"]


class LoadSettings(_Settings):
    """How to load the base model."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Loading")

    dtype: Dtype = Field(
        title="Weights dtype",
        default="auto",
        description="Weights dtype. auto: bf16 where supported, fp16 on CUDA without bf16, float32 on CPU.",
    )
    attn_implementation: Attn = Field(
        title="Attention kernel",
        default="auto",
        description="Attention kernel. auto: flash_attention_2 when installed on a GPU with capability >= 8.0 and a 16-bit dtype, else sdpa, else eager.",
    )
    device_map: Union[Annotated[str, Field(title="Device")], Annotated[dict[str, Union[int, str]], Field(title="Module map")]] = Field(
        title="Device placement",
        default="auto",
        description="Placement: auto, cpu, cuda, cuda:N, mps, or a module -> device dict (accelerate style).",
    )
    quantization: Quantization = Field(
        title="Quantization",
        default="none",
        description="Load the base in 4 bit (NF4, QLoRA) or 8 bit (LLM.int8) with bitsandbytes, on any device its backends run on "
        "(CUDA, and its CPU backend). It quantizes nn.Linear weights: embeddings, the head, norms and fused MoE experts stay in the compute dtype.",
    )
    max_memory: Annotated[dict[str, str], Field(title="Budgets")] | Default = Field(
        title="Memory budget per device",
        default=None,
        description='Memory budget per device, accelerate style: {"cpu": "20GiB", "0": "70GiB"}. Used by the fit check and by device_map=auto.',
    )
    gradient_checkpointing: bool = Field(
        title="Gradient checkpointing",
        default=False,
        description="Enable gradient checkpointing (sets use_cache=False and input gradients for LoRA).",
    )
    trust_remote_code: bool = Field(
        title="Trust the repo's own code",
        default=False,
        description="Allow a repo's own Python code (config auto_map). Only with a revision pinned to a full 40-hex commit sha.",
    )

    @field_validator("device_map")
    @classmethod
    def _check_device_map(cls, value: str | dict[str, int | str]) -> str | dict[str, int | str]:
        if isinstance(value, str) and not re.match(r"^(auto|cpu|cuda|cuda:\d+|mps)$", value):
            raise ValueError(f"device_map must be auto, cpu, cuda, cuda:N, mps or a dict, got {value!r}.")
        return value

    @field_validator("max_memory", mode="before")
    @classmethod
    def _check_max_memory(cls, value: Any) -> dict[str, str] | None:
        if value is None:
            return value
        bad = []
        for device, amount in value.items():
            if not (str(device) in ("cpu", "mps", "disk") or str(device).isdigit()):
                bad.append(f"device {device!r} (use cpu, mps or a GPU index such as 0)")
            if not is_size(amount):
                bad.append(f"{device}: {amount!r} (use a size such as '20GiB' or '512MB')")
        if bad:
            raise ValueError("max_memory has invalid entries: " + "; ".join(bad) + ".")
        return {str(k): str(v) for k, v in value.items()}


TargetPreset = Literal["all-linear", "attention", "mlp", "experts"]
PRESETS = ("all-linear", "attention", "mlp", "experts")
DEFAULT_DROPOUT = 0.05


class LoraSettings(_Settings):
    """The LoRA adapter. Maps onto peft.LoraConfig; presets are resolved against the real model."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="LoRA adapter")

    r: int = Field(title="Rank (r)", default=16, gt=0, le=4096, description="LoRA rank (adapter width).")
    alpha: float = Field(
        title="Alpha", default=32, gt=0, description="LoRA scaling numerator: the update is scaled by alpha/r (alpha/sqrt(r) with rsLoRA)."
    )
    dropout: Annotated[float, Field(title="Value", ge=0, lt=1)] | Default = Field(
        title="Dropout",
        default=None,
        description="Dropout on the LoRA input, in [0, 1). Default: 0.05, or 0 when the targets include fused MoE expert parameters (PEFT cannot apply dropout to those).",
    )
    bias: Literal["none", "all", "lora_only"] = Field(title="Trained biases", default="none", description="Which biases to train.")
    target_modules: Union[
        Annotated[TargetPreset, Field(title="Preset")], Annotated[list[str], Field(title="Names")], Annotated[str, Field(title="Regex")]
    ] = Field(
        title="Target modules",
        default="all-linear",
        description="all-linear | attention | mlp | experts | a list of module or expert-parameter names | a regex matched against full names. Presets cover fused MoE experts and leave out the output head, embeddings and MoE routers.",
    )
    exclude_modules: Names | Default = Field(
        title="Excluded modules", default=None, description="Module names (suffixes) to leave out of the targets."
    )
    modules_to_save: Names | Default = Field(
        title="Modules trained in full",
        default=None,
        description="Modules trained in full and saved with the adapter (e.g. lm_head); makes the adapter large.",
    )
    use_rslora: bool = Field(title="Rank-stabilised LoRA", default=False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r).")
    use_dora: bool = Field(title="DoRA", default=False, description="Weight-decomposed LoRA (DoRA).")
    init_lora_weights: Union[Annotated[bool, Field(title="Default (Kaiming) / zeros")], Annotated[str, Field(title="Method")]] = Field(
        title="Initialisation",
        default=True,
        description="true (Kaiming A, zero B) | false | gaussian | pissa | olora | orthogonal: the PEFT initialisations that need no training data and load back exactly.",
    )
    rank_pattern: Annotated[dict[str, int], Field(title="Patterns")] | Default = Field(
        title="Rank per module (regex to r)", default=None, description="Per-module rank overrides: {regex: r}."
    )
    alpha_pattern: Annotated[dict[str, float], Field(title="Patterns")] | Default = Field(
        title="Alpha per module (regex to alpha)", default=None, description="Per-module alpha overrides: {regex: alpha}."
    )
    seed: int = Field(
        title="Seed",
        default=0,
        ge=0,
        description="Seed for the adapter initialisation: same seed and base give byte-identical adapter weights.",
    )

    @field_validator("init_lora_weights")
    @classmethod
    def _check_init(cls, value: bool | str) -> bool | str:
        if isinstance(value, bool):
            return value
        if value in _DATA_FREE_INITS:
            return value
        if re.match(r"^pissa_niter_\d+$", value):
            # PEFT redoes the initialisation when an adapter is loaded; the randomized SVD of
            # pissa_niter_N then draws other vectors, so the artifact would not load back to the same model.
            raise ValueError(f"init_lora_weights={value!r} is not reproducible at load time (randomized SVD); use pissa.")
        raise ValueError(f"init_lora_weights must be true, false or one of {', '.join(_DATA_FREE_INITS)}, got {value!r}.")

    @field_validator("target_modules")
    @classmethod
    def _check_targets(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("target_modules is an empty list; give module names or a preset such as all-linear.")
        if isinstance(value, str) and value not in PRESETS:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"target_modules {value!r} is not a valid regex ({exc}).") from None
        return value

    @field_validator("rank_pattern")
    @classmethod
    def _check_rank_pattern(cls, value: dict[str, int] | None) -> dict[str, int] | None:
        bad = {k: v for k, v in (value or {}).items() if v <= 0}
        if bad:
            raise ValueError(f"rank_pattern ranks must be positive, got {bad}.")
        return value

    @field_validator("alpha_pattern")
    @classmethod
    def _check_alpha_pattern(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        bad = {k: v for k, v in (value or {}).items() if v <= 0}
        if bad:
            raise ValueError(f"alpha_pattern alphas must be positive, got {bad}.")
        return value

    @field_validator("target_modules", "exclude_modules", "modules_to_save")
    @classmethod
    def _check_names(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and any(not name.strip() for name in value):
            raise ValueError(f"module names must not be blank, got {value!r}; remove the empty entries.")
        return value

    @model_validator(mode="after")
    def _orthogonal_needs_even_ranks(self) -> LoraSettings:
        # PEFT's orthogonal init splits one orthogonal matrix into A and B halves (lora/layer.py).
        if self.init_lora_weights == "orthogonal":
            odd = [self.r] if self.r % 2 else []
            odd += [v for v in (self.rank_pattern or {}).values() if v % 2]
            if odd:
                raise ValueError(f"init_lora_weights=orthogonal needs even ranks, got {odd}; use an even r (e.g. {self.r + self.r % 2}).")
        return self


# The tracking store schemes MLflow 3 serves (mlflow.tracking._tracking_service.utils), less its file
# store: MLflow 3.17 refuses that one ("in maintenance mode"), so a file: URI or a bare path would pass
# the plan, download the weights, and fail at the tracking stage.
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc", "uc")


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow cannot use this tracking URI, with the fix; None when it can (by its scheme)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower() if ":" in uri else ""
    if scheme in TRACKING_SCHEMES:
        return None
    if scheme in ("", "file"):
        return (
            f'tracking URI {uri!r} names MLflow\'s file store, which MLflow 3 no longer opens ("maintenance mode"): '
            "use a database, e.g. sqlite:///path/to/mlflow.db, or a tracking server, e.g. http://host:5000"
        )
    return f"tracking URI {uri!r} has scheme {scheme!r}, which MLflow cannot use: use one of {', '.join(TRACKING_SCHEMES)} (e.g. sqlite:///path/to/mlflow.db)"


class TrackingSettings(_Settings):
    """Where the run is recorded."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="MLflow tracking")

    tracking_uri: Text | Default = Field(
        title="MLflow tracking URI",
        default=None,
        description="MLflow tracking URI. Default: MLFLOW_TRACKING_URI, else a SQLite file under the lora-prep data directory.",
    )
    experiment: str = Field(title="MLflow experiment", default="lora-prep", min_length=1, description="MLflow experiment name.")
    register_as: Text | Default = Field(
        title="Register as (model name)", default=None, description="Register the artifact in the MLflow Model Registry under this name."
    )
    alias: Text | Default = Field(
        title="Registry alias", default=None, description="Alias for the registered version (e.g. champion); needs register_as."
    )

    @field_validator("tracking_uri")
    @classmethod
    def _check_tracking_uri(cls, value: str | None) -> str | None:
        problem = tracking_uri_problem(value) if value else None
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _alias_needs_name(self) -> TrackingSettings:
        if self.alias and not self.register_as:
            raise ValueError(f"alias {self.alias!r} needs register_as: set the registered model name too.")
        return self


class OutputSettings(_Settings):
    """Where the artifact directory goes."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Artifact output")

    output_dir: Directory | Default = Field(
        title="Artifacts directory",
        default=None,
        description="Parent directory for artifacts. Default: LORA_PREP_HOME/artifacts (~/.local/share/lora-prep/artifacts).",
    )
    name: Annotated[str, Field(title="Value", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")] | Default = Field(
        title="Artifact name",
        default=None,
        description="Artifact directory name. Default: {org}--{name}--{first 12 hex of the commit}--{UTC time}-{4 hex}.",
    )
    check: bool = Field(
        title="Check that the model runs",
        default=True,
        description="Run the LoRA-wrapped model forward and backward on a few tokens before writing the artifact; a wrapping that breaks the model is refused. Reads every weight once.",
    )


class TrainSettings(_Settings):
    """The training loop: AdamW on the adapter parameters only, causal LM loss on a built-in corpus."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Training")

    steps: int = Field(title="Optimizer steps", default=20, gt=0, le=1_000_000, description="Optimizer steps.")
    lr: float = Field(
        title="Learning rate",
        default=5e-3,
        gt=0,
        lt=1,
        description="AdamW learning rate (LoRA takes rates ~10x those of full fine-tuning).",
    )
    weight_decay: float = Field(
        title="Weight decay", default=0.0, ge=0, description="AdamW weight decay (0: an adapter weight changes only by its gradient)."
    )
    batch_size: int = Field(title="Batch size (sentences)", default=4, gt=0, le=4096, description="Sentences per step.")
    max_length: int = Field(
        title="Tokens per sentence", default=32, gt=1, le=1_000_000, description="Tokens per sentence; longer ones are cut."
    )
    seed: int = Field(title="Seed", default=0, ge=0, description="Seed for dropout and batch order.")
    verify_base: bool = Field(
        title="Prove the base is unchanged",
        default=True,
        description="Hash every base weight before and after training to prove it did not change. Reads all weights twice (seconds per GB).",
    )


# --- what the other commands take ------------------------------------------------------------------
# The flows take model_id and revision as plain parameters (deployments name them so); the CLI's
# positional arguments and the options of `load`, `log` and `server` are defined here like every setting.


class ModelReference(_Settings):
    """The model: a Hub repo at a revision, or a local directory."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Model")

    model_id: str = Field(
        title="Model id or directory",
        min_length=1,
        description="Hugging Face Hub model id (e.g. meta-llama/Llama-3.2-1B) or a local model directory.",
    )
    revision: str = Field(
        title="Revision",
        default="main",
        description="Branch, tag or full commit sha; for a local directory, the digest of its *.py files to allow its remote code.",
    )


class LoadBackSettings(_Settings):
    """An artifact to load back, and what it may do."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Artifact")

    ref: str = Field(
        title="Artifact",
        min_length=1,
        description="Artifact directory, runs:/<run id>[/artifact], models:/<name>@<alias> or models:/<logged model id>.",
    )
    trainable: bool = Field(
        title="Trainable adapter", default=False, description="Load the adapter trainable (gradients on its LoRA weights)."
    )
    base: Directory | Default = Field(
        title="Base model directory",
        default=None,
        description="A local directory holding the base model (a copy of the one the artifact was made from); its files must match the manifest.",
    )
    trust_remote_code: bool = Field(
        title="Trust the base's own code",
        default=False,
        description="The base runs its own code and you allow it (an artifact never switches remote code on by itself).",
    )


class ArtifactDirectory(_Settings):
    """An artifact directory on this machine."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Artifact")

    artifact_dir: str = Field(
        title="Artifact directory", min_length=1, description="The artifact directory to log (the one 'lora-prep prepare' printed)."
    )


class ServerAction(_Settings):
    """The local Prefect server that runs share when PREFECT_API_URL is unset."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="Local Prefect server")

    action: Literal["start", "status", "stop"] = Field(
        title="Action", description="start it (or find it running), show its state, or stop it."
    )

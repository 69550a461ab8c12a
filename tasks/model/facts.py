"""What the planner knows about a model, before any weight is downloaded.

``ModelFacts`` comes from config.json and the safetensors headers (tasks/resolve.py's
RepoFacts). Building it is the one impure step of planning: it reads
transformers' class flags (``_supports_sdpa``, ``_supports_flash_attn``)
without instantiating anything, so ``plan_load`` itself needs no transformers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Union, cast

from pydantic import Field, model_validator

from lora_prep.tasks.records.base import Record
from lora_prep.tasks.records.plan import ParameterCensus

# config dtype -> bytes per element, to estimate params of pickle-only repos
CONFIG_DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}


def attention_support(architecture: str | None) -> tuple[bool | None, bool | None]:
    """(sdpa, flash_attention_2) support read from transformers' class flags; None when unknown.

    Imports the model's module (about 2 s the first time) but builds nothing.
    """
    if not architecture:
        return None, None
    try:
        import transformers

        cls = getattr(transformers, architecture)
    except Exception:  # not a transformers class (remote code, newer transformers) or a missing optional dep
        return None, None
    flash = bool(getattr(cls, "_supports_flash_attn", False) or getattr(cls, "_supports_flash_attn_2", False))
    return bool(getattr(cls, "_supports_sdpa", False)), flash


def _text_config(config: dict) -> dict:
    # Multimodal configs keep the language model's sizes under text_config.
    return {**(config.get("text_config") or {}), **config}


class ModelFacts(Record):
    """What the plan needs to know about a model, from config.json and safetensors headers only."""

    repo_id: str = Field(description="Hub id, or the absolute path of a local model directory.")
    commit_sha: str | None = Field(default=None, description="The commit; None for a local directory.")
    source: Literal["hub", "local"] = "hub"
    code_digest: str | None = Field(
        default=None, description="sha256 of the model's own *.py files (local directories pin remote code by it)."
    )
    architecture: str | None = Field(default=None, description="config architectures[0], e.g. LlamaForCausalLM.")
    model_type: str | None = None
    param_count: int = Field(ge=0, description="Parameters: exact from safetensors headers, else estimated from bytes.")
    param_count_estimated: bool = Field(default=False, description="True when param_count came from weight_bytes.")
    stored_dtypes: dict[str, int] = Field(default_factory=dict, description='Parameters per stored dtype: {"BF16": n}.')
    config_dtype: str | None = Field(default=None, description="config dtype / torch_dtype, e.g. bfloat16.")
    tie_word_embeddings: bool = True
    auto_map: Union[dict[str, Any], bool] = Field(default=False, description="config auto_map: the repo ships its own code.")
    weight_bytes: int = Field(ge=0, description="Bytes of the selected weight files.")
    embedding_params: int = Field(
        default=0, ge=0, description="vocab x hidden (x2 when untied): bitsandbytes leaves these in the compute dtype."
    )
    supports_sdpa: bool | None = Field(default=None, description="transformers' _supports_sdpa for the class; None: unknown.")
    supports_flash_attn: bool | None = Field(default=None, description="transformers' _supports_flash_attn; None: unknown.")
    census: ParameterCensus | None = Field(default=None, description="Parameters by how a load stores them, counted on the skeleton.")

    @model_validator(mode="before")
    @classmethod
    def _estimate_params(cls, data: Any) -> Any:
        # Pickle-only repos have no headers: params = bytes / stored element size (config dtype, else
        # float32, which is what old checkpoints without a dtype in config.json hold).
        if isinstance(data, dict) and data.get("param_count") is None:
            size = CONFIG_DTYPE_BYTES.get(str(data.get("config_dtype")), 4)
            data = {**data, "param_count": int((data.get("weight_bytes") or 0) // size), "param_count_estimated": True}
        return data

    @property
    def remote_code(self) -> bool:
        return bool(self.auto_map)

    @property
    def main_stored_dtype(self) -> str | None:
        """The safetensors dtype holding most parameters (F32, BF16, F16...), or None for pickle-only repos."""
        return max(self.stored_dtypes, key=self.stored_dtypes.__getitem__) if self.stored_dtypes else None

    @classmethod
    def from_config(
        cls,
        repo_id: str,
        commit_sha: str | None,
        config: dict,
        param_count: int | None,
        stored_dtypes: dict[str, int] | None,
        weight_bytes: int,
        *,
        look_up_attention: bool = True,
        source: Literal["hub", "local"] = "hub",
        code_digest: str | None = None,
    ) -> ModelFacts:
        text = _text_config(config)
        architectures = config.get("architectures") or []
        architecture = architectures[0] if architectures else None
        auto_map = config.get("auto_map") or False
        tied = bool(text.get("tie_word_embeddings", True))  # PreTrainedConfig's default
        vocab = text.get("vocab_size") or 0
        hidden = text.get("hidden_size") or text.get("n_embd") or text.get("d_model") or 0
        embedding_params = int(vocab) * int(hidden) * (1 if tied else 2)
        # Remote code replaces the class: transformers' flags for a same-named class would be wrong.
        sdpa, flash = attention_support(architecture) if look_up_attention and not auto_map else (None, None)
        facts = cls(
            repo_id=repo_id,
            commit_sha=commit_sha,
            source=source,
            code_digest=code_digest,
            architecture=architecture,
            model_type=config.get("model_type"),
            param_count=cast(int, param_count),  # None: _estimate_params (mode="before") estimates it from weight_bytes
            stored_dtypes=dict(stored_dtypes or {}),
            config_dtype=config.get("dtype") or config.get("torch_dtype"),
            tie_word_embeddings=tied,
            auto_map=auto_map,
            weight_bytes=weight_bytes,
            embedding_params=embedding_params,
            supports_sdpa=sdpa,
            supports_flash_attn=flash,
        )
        return facts.model_copy(update={"embedding_params": min(embedding_params, facts.param_count)})

    @classmethod
    def from_repo_facts(cls, facts: Any, **kwargs: Any) -> ModelFacts:
        """From tasks/resolve.py's RepoFacts (repo_id, commit_sha, config, param_count, stored_dtypes, weight_bytes)."""
        return cls.from_config(
            facts.repo_id, facts.commit_sha, facts.config or {}, facts.param_count, facts.stored_dtypes,
            facts.weight_bytes, source=facts.source, code_digest=facts.code_digest, **kwargs,
        )  # fmt: skip

    @classmethod
    def from_local_dir(cls, model_dir: Path, repo_id: str, commit_sha: str) -> ModelFacts:
        """From a model directory on disk (benchmarks, tests): config.json plus the safetensors headers,
        read with huggingface_hub's own parser as tasks/resolve.py does for cached files. A pickle-only
        directory has no headers: the parameter count is then estimated from the weight bytes."""
        import json

        from huggingface_hub.hf_api import parse_local_safetensors_file_metadata

        model_dir = Path(model_dir)
        files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("pytorch_model*.bin"))
        per_dtype: dict[str, int] = {}
        for f in model_dir.glob("*.safetensors"):
            for dtype, n in parse_local_safetensors_file_metadata(f).parameter_count.items():
                per_dtype[dtype] = per_dtype.get(dtype, 0) + n
        config = json.loads((model_dir / "config.json").read_text())
        weight_bytes = sum(f.stat().st_size for f in files)
        return cls.from_config(repo_id, commit_sha, config, sum(per_dtype.values()) or None, per_dtype, weight_bytes)

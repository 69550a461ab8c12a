"""A small valid Manifest for tests that need an artifact directory but no model (tracking, CLI)."""

from __future__ import annotations

from pathlib import Path

from lora_prep.tasks.artifact.write import write_artifact
from lora_prep.tasks.records.build import CheckRecord, LoadReport
from lora_prep.tasks.records.machine import HardwareProfile
from lora_prep.tasks.records.manifest import (
    AdapterRecord,
    BaseModelRecord,
    LoraRecord,
    Manifest,
    Parameters,
    PrefectRecord,
)
from lora_prep.tasks.records.plan import LoadPlan, TargetPlan
from lora_prep.tasks.settings import LoadSettings, LoraSettings

SHA = "a" * 40


def sample_manifest(flow_run_id: str | None = None, repo_id: str = "tiny/llama") -> Manifest:
    return Manifest(
        created_at="2026-11-28T00:00:00+00:00",
        base_model=BaseModelRecord(source="hub", name_or_path=repo_id, revision="main", commit_sha=SHA, content_digest="b" * 64,
                                   files=[], offline=False, architecture="LlamaForCausalLM", model_type="llama"),
        hardware=HardwareProfile(cpu_count=2, ram_total_bytes=2**34, ram_available_bytes=2**33, disk_free_bytes=2**35, cache_dir="/tmp/hf"),
        load_settings=LoadSettings(),
        load_plan=LoadPlan(dtype="float32", attn_implementation="sdpa", device_map="cpu", target_device="cpu", estimate_bytes=1,
                           overhead_bytes=1, available_bytes=10, fits=True, reasons={}),
        load_used=LoadReport(dtype="float32", attn_implementation="sdpa", device_map="cpu", quantization="none", pad_token="<unk>",
                             pad_token_id=0, pad_token_strategy="unk", gradient_checkpointing=False, trust_remote_code=False,
                             kbit_prepared=False, seconds=0.1),
        lora=LoraRecord(settings=LoraSettings(r=4), targets=TargetPlan(target_modules=["model.layers.0.self_attn.q_proj"], dropout=0.05,
                                                                      dropout_reason="0.05: the default")),
        parameters=Parameters(total=100, trainable=10),
        adapter=AdapterRecord(estimated_bytes=64),
        check=CheckRecord(forward=True, backward=True, tokens=4, loss=5.0, seconds=0.01),
        versions={"python": "3.11"},
        prefect=PrefectRecord(flow_run_id=flow_run_id),
    )


def sample_artifact(parent: Path, name: str = "art", flow_run_id: str | None = None) -> Path:
    def fill(tmp: Path) -> Manifest:
        (tmp / "adapter").mkdir()
        (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"\0" * 64)
        return sample_manifest(flow_run_id)

    return write_artifact(parent, name, fill, lambda m: "card\n")

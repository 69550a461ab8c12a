"""The adapter-ready artifact: written atomically, loaded back to the same model,
refused when the base it was made on has changed. Stages run as plain functions
(no Prefect here: tests/test_flow.py covers the flow) against the local hub."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lora_prep.tasks.errors import IntegrityError, InvalidInput
from lora_prep.tasks.records.manifest import read_manifest
from lora_prep.tasks.settings import (
    LoadSettings,
    LoraSettings,
    OutputSettings,
    SourceSettings,
)

INPUT = torch.tensor([[1, 7, 42, 99, 3, 250]])


def _build(repo_id: str, cache: Path, out: Path, lora: LoraSettings):
    from lora_prep.tasks.build import build_adapter_ready
    from lora_prep.tasks.hub.repo import resolve_repo
    from lora_prep.tasks.hub.snapshot import download_snapshot
    from lora_prep.tasks.machine.hardware import probe_hardware
    from lora_prep.tasks.plan import plan_prepare

    source, load, output = SourceSettings(cache_dir=str(cache)), LoadSettings(), OutputSettings(output_dir=str(out))
    facts = resolve_repo(repo_id, "main", source)
    profile = probe_hardware(str(cache))
    plan = plan_prepare(profile, facts, load, lora, output, "main", source)
    snapshot = download_snapshot(facts, source)
    built = build_adapter_ready(snapshot, facts, profile, plan, load, lora, output)
    return built, snapshot, plan.load


def _in_memory_logits(snapshot, plan, lora: LoraSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """The model the build stage made, rebuilt in memory: base logits and adapted logits."""
    from lora_prep.tasks.lora.wrap import wrap_lora
    from lora_prep.tasks.model.load import load_model

    loaded = load_model(snapshot.snapshot_dir, plan, LoadSettings())
    with torch.no_grad():
        base = loaded.model(INPUT).logits.clone()
    model, _ = wrap_lora(loaded.model, lora)
    model.eval()  # no LoRA dropout: compare the function the weights define
    with torch.no_grad():
        return base, model(INPUT).logits


# init_lora_weights=False draws both LoRA matrices at random (B is not zero), so the adapter
# changes the logits and a round trip that lost it would show.
NOT_IDENTITY = LoraSettings(r=4, init_lora_weights=False, seed=7)


@pytest.mark.parametrize(
    ("repo_id", "lora"),
    [("tiny/llama", NOT_IDENTITY), ("tiny/gpt2", NOT_IDENTITY), ("tiny/phi3", NOT_IDENTITY), ("tiny/gpt-neox", NOT_IDENTITY),
     # PiSSA rewrites the base weights (W - BA): load-back must redo that on the fresh base.
     ("tiny/llama", LoraSettings(r=4, init_lora_weights="pissa", seed=7))],
    ids=["llama", "gpt2", "phi3", "gpt-neox", "llama-pissa"],
)
def test_artifact_round_trip_gives_the_logits_of_the_in_memory_model(hub, hf_cache, tmp_path, repo_id, lora):
    from lora_prep.tasks.artifact.load_back import load_adapter_ready

    built, snapshot, plan = _build(repo_id, hf_cache, tmp_path / "out", lora)
    base, expected = _in_memory_logits(snapshot, plan, lora)

    model, tokenizer, manifest = load_adapter_ready(built.artifact_dir, source=SourceSettings(cache_dir=str(hf_cache)))
    with torch.no_grad():
        got = model(INPUT).logits
    assert not torch.allclose(base, expected), "the adapter must change the output for this test to mean anything"
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert tokenizer.pad_token is not None
    assert manifest.lora.targets.target_modules == built.target_modules


def test_manifest_records_the_pinned_base_files_plan_lora_versions_and_a_model_card(hub, hf_cache, tmp_path):
    built, snapshot, _ = _build("tiny/llama-sharded", hf_cache, tmp_path / "out", LoraSettings(r=2))
    art = Path(built.artifact_dir)
    raw = json.loads((art / "manifest.json").read_text())
    manifest = read_manifest(art)

    assert raw["schema"] == "lora-prep/manifest@2"
    base = manifest.base_model
    assert base.name_or_path == "tiny/llama-sharded" and base.source == "hub" and base.revision == "main"
    assert base.commit_sha == hub.repos["tiny/llama-sharded"].sha and base.offline is False
    shards = [f for f in base.files if f.path.endswith(".safetensors")]
    assert len(shards) == 3 and all(len(f.sha256) == 64 and f.size > 0 for f in shards)
    assert manifest.load_plan.dtype == "float32" and manifest.load_plan.reasons["dtype"]
    assert manifest.load_used.attn_implementation in ("sdpa", "eager")
    assert manifest.lora.settings.r == 2 and manifest.parameters.trainable == built.trainable_params
    assert manifest.check.forward and manifest.check.backward and manifest.check.tokens >= 2
    assert {"python", "torch", "transformers", "peft", "accelerate", "huggingface_hub", "prefect", "mlflow"} <= set(manifest.versions)
    assert manifest.hardware.cpu_count >= 1 and manifest.created_at
    card = (art / "README.md").read_text()
    assert base.commit_sha in card and "from lora_prep import load_adapter_ready" in card and "AutoPeftModelForCausalLM" in card
    adapter_files = sorted(p.name for p in (art / "adapter").iterdir())
    assert "adapter_model.safetensors" in adapter_files and not [n for n in adapter_files if n.startswith("model")]


def test_load_back_refuses_a_base_whose_files_differ_from_the_manifest(hub, hf_cache, tmp_path):
    from lora_prep.tasks.artifact.load_back import load_adapter_ready

    built, _, _ = _build("tiny/llama", hf_cache, tmp_path / "out", LoraSettings(r=2))
    path = Path(built.artifact_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    weights = next(f for f in manifest["base_model"]["files"] if f["path"] == "model.safetensors")
    weights["sha256"] = "0" * 64  # the adapter claims to be made on other weights (an edited manifest.json)
    path.write_text(json.dumps(manifest))

    with pytest.raises(IntegrityError) as err:
        load_adapter_ready(built.artifact_dir, source=SourceSettings(cache_dir=str(hf_cache)))
    assert "model.safetensors" in str(err.value) and "prepare the artifact again" in str(err.value)


def test_load_back_repairs_a_tampered_cached_base_file_before_loading(hub, hf_cache, tmp_path):
    from lora_prep.tasks.artifact.load_back import load_adapter_ready

    built, snapshot, _ = _build("tiny/llama", hf_cache, tmp_path / "out", LoraSettings(r=2))
    blob = (Path(snapshot.snapshot_dir) / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor
    blob.write_bytes(bytes(data))

    ready = load_adapter_ready(built.artifact_dir, source=SourceSettings(cache_dir=str(hf_cache)))
    import hashlib

    expected = next(f.sha256 for f in ready.manifest.base_model.files if f.path == "model.safetensors")
    assert hashlib.sha256(blob.read_bytes()).hexdigest() == expected


def test_a_crash_while_writing_leaves_no_complete_looking_artifact(tmp_path):
    parent = tmp_path / "artifacts"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from lora_prep.tasks.artifact.write import write_artifact

        def fill(tmp: Path):
            (tmp / "adapter").mkdir()
            (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 4096)
            os.kill(os.getpid(), signal.SIGKILL)  # the process dies mid-write: no cleanup runs

        write_artifact(Path({str(parent)!r}), "tiny--llama--abc", fill, lambda m: "")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[1], timeout=60)
    assert done.returncode == -signal.SIGKILL

    left = list(parent.iterdir())
    assert len(left) == 1 and left[0].name.startswith(".tiny--llama--abc.partial-")
    assert not (parent / "tiny--llama--abc").exists()
    with pytest.raises(InvalidInput):
        read_manifest(left[0])


def test_an_existing_artifact_directory_is_never_overwritten(tmp_path):
    from lora_prep.tasks.artifact.write import write_artifact

    (tmp_path / "taken").mkdir()
    with pytest.raises(InvalidInput):
        write_artifact(tmp_path, "taken", lambda tmp: {}, lambda m: "")
    assert not [p for p in tmp_path.iterdir() if p.name != "taken"]


def test_load_back_on_different_hardware_replans_and_says_so(hub, hf_cache, tmp_path):
    from lora_prep.tasks.artifact.load_back import load_adapter_ready

    built, _, _ = _build("tiny/llama", hf_cache, tmp_path / "out", LoraSettings(r=2))
    path = Path(built.artifact_dir) / "manifest.json"
    manifest = json.loads(path.read_text())
    # As if prepared on a one-GPU machine in bfloat16 (a test double for hardware this machine lacks).
    manifest["hardware"]["cuda_available"] = True
    manifest["hardware"]["cuda_devices"] = [{"index": 0, "name": "NVIDIA A100-SXM4-80GB", "capability": "8.0", "bf16": True,
                                             "total_memory_bytes": 80 * 2**30, "free_memory_bytes": 79 * 2**30}]
    manifest["load_plan"].update(dtype="bfloat16", device_map="cuda:0", target_device="cuda:0")
    path.write_text(json.dumps(manifest))

    ready = load_adapter_ready(built.artifact_dir, source=SourceSettings(cache_dir=str(hf_cache)))

    assert ready.replanned
    assert "re-planned" in ready.notes[0] and "bfloat16/cuda:0 -> float32/cpu" in ready.notes[0]
    assert next(ready.model.parameters()).device.type == "cpu"
    assert ready.summary()["dtype"] == "float32"

"""LoRA where it matters on the architectures people fine-tune in 2026: mixture-of-experts with fused
experts, MLA with shared experts, state-space and hybrid models. Each is prepared with the default
settings through the real stages (resolve, plan on the skeleton, download, build) against the local
hub; the assertions read the saved adapter's tensors, not only what the manifest says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lora_prep.tasks.errors import InvalidInput, UnknownTargetModule
from lora_prep.tasks.records.manifest import read_manifest
from lora_prep.tasks.settings import (
    LoadSettings,
    LoraSettings,
    OutputSettings,
    SourceSettings,
)
from tests.model_factory import EXTRA_REPOS, MOE_ARCHS, expert_params, routers

IDS = torch.tensor([[1, 7, 42, 99, 3]])


def _stages(repo_id: str, cache: Path, out: Path, lora: LoraSettings = LoraSettings()):
    from lora_prep.tasks.build import build_adapter_ready
    from lora_prep.tasks.hub.repo import resolve_repo
    from lora_prep.tasks.hub.snapshot import download_snapshot
    from lora_prep.tasks.machine.hardware import probe_hardware
    from lora_prep.tasks.plan import plan_prepare

    source, load, output = SourceSettings(cache_dir=str(cache)), LoadSettings(), OutputSettings(output_dir=str(out))
    facts = resolve_repo(repo_id, "main", source)
    profile = probe_hardware(str(cache))
    plan = plan_prepare(profile, facts, load, lora, output, "main", source)
    return facts, plan, lambda: build_adapter_ready(download_snapshot(facts, source), facts, profile, plan, load, lora, output)


def _adapter_tensors(artifact: str) -> dict[str, tuple[int, ...]]:
    with safe_open(str(Path(artifact) / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return {k.removeprefix("base_model.model."): tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def _owners(tensors: dict) -> set[str]:
    """Module paths that carry LoRA (lora_A/lora_B), nested ParamWrappers folded into their module."""
    return {k.split(".lora_")[0].replace(".base_layer", "") for k in tensors if ".lora_A." in k or ".lora_B." in k}


@pytest.mark.parametrize("arch", list(EXTRA_REPOS), ids=list(EXTRA_REPOS))
def test_every_architecture_prepares_with_the_defaults_and_its_adapter_holds_lora_where_it_matters(arch, hub, hf_cache, tmp_path):
    from lora_prep.tasks.artifact.load_back import load_adapter_ready

    repo_id = EXTRA_REPOS[arch]
    facts, plan, build = _stages(repo_id, hf_cache, tmp_path / "out")
    planned = plan.targets
    assert planned.trainable_params and planned.trainable_params > 0  # counted on the skeleton, before the download
    built = build()
    tensors = _adapter_tensors(built.artifact_dir)
    owners = _owners(tensors)

    for param in expert_params(arch):  # every routed expert block: LoRA on both fused parameters
        module = param.rsplit(".", 1)[0]
        assert module in owners, f"{param} has no LoRA tensors"
        pairs = [k for k in tensors if k.startswith(module + ".") and k.endswith("lora_A.weight")]
        assert len(pairs) == len([p for p in expert_params(arch) if p.startswith(module + ".")])
    for router in routers(arch):  # routers are left out of the presets
        assert not [o for o in owners if o == router or o.startswith(router + ".")], f"router {router} got LoRA"
        assert any(name == router or name.startswith(router + ".") for name in planned.excluded) or "Linear" not in str(planned.excluded)
    linear = set(planned.target_modules) | {p.removesuffix(".weight") for p in planned.target_parameters if p.endswith(".weight")}
    assert linear and linear <= owners  # attention, dense MLP, shared experts, MLA and SSM projections keep theirs
    if arch in ("mamba", "mamba2"):
        assert not [o for o in owners if o.endswith(("out_proj", "conv1d"))]
        assert any("incompatible with Mamba" in why for why in planned.excluded.values())
    if arch == "deepseek_v3":
        assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj"} <= {o.rsplit(".", 1)[-1] for o in owners}
        # Dense MLP and shared experts keep LoRA (PEFT's v4 conversion would have moved them onto the experts).
        dense = {"model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj",
                 "model.layers.1.mlp.shared_experts.gate_proj", "model.layers.1.mlp.shared_experts.down_proj"}
        assert dense <= owners

    manifest = read_manifest(built.artifact_dir)
    assert set(expert_params(arch)) <= set(manifest.lora.targets.target_parameters) == set(built.target_parameters)
    if expert_params(arch):
        assert manifest.lora.targets.dropout == 0.0 and "fused expert parameters" in manifest.lora.targets.dropout_reason
    else:
        assert manifest.lora.targets.dropout == 0.05
    assert manifest.check.forward and manifest.check.backward

    ready = load_adapter_ready(built.artifact_dir, source=SourceSettings(cache_dir=str(hf_cache)))
    with torch.no_grad():
        assert torch.isfinite(ready.model(IDS).logits).all()


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_an_explicit_dropout_on_an_moe_model_is_refused_at_plan_time_with_the_reason(arch, hub, hf_cache, tmp_path):
    with pytest.raises(InvalidInput) as err:
        _stages(EXTRA_REPOS[arch], hf_cache, tmp_path / "out", LoraSettings(dropout=0.1))
    assert "fused expert parameters" in str(err.value) and "leave lora.dropout unset" in str(err.value)
    assert hub.body_bytes("*/model*.safetensors") < 4 * 100_001  # header reads only: nothing downloaded


def test_the_experts_preset_targets_the_experts_only_and_names_them_in_the_plan(hub, hf_cache, tmp_path):
    _, plan, _ = _stages("tiny/deepseek-v3", hf_cache, tmp_path / "out", LoraSettings(target_modules="experts"))
    targeted = plan.targets.target_modules + plan.targets.target_parameters
    assert set(expert_params("deepseek_v3")) <= set(plan.targets.target_parameters)
    assert any(".shared_experts." in t for t in targeted) and all(".experts." in t or ".shared_experts." in t for t in targeted)


def test_a_router_named_explicitly_gets_lora(hub, hf_cache, tmp_path):
    _, plan, build = _stages("tiny/qwen3-moe", hf_cache, tmp_path / "out", LoraSettings(target_modules=["gate", "q_proj"]))
    # Qwen3-MoE's router holds a plain 2-D weight: it is reached as a parameter target.
    assert plan.targets.target_parameters == [f"{r}.weight" for r in routers("qwen3_moe")]
    assert {r for r in routers("qwen3_moe")} <= _owners(_adapter_tensors(build().artifact_dir))


def test_a_wrapping_that_breaks_the_forward_pass_is_refused_with_the_module_named(hub, hf_cache, tmp_path):
    # Phi-MoE's router is an nn.Linear subclass whose forward returns a tuple: LoRA on it breaks the model.
    _, _, build = _stages("tiny/phimoe", hf_cache, tmp_path / "out", LoraSettings(target_modules=["router", "q_proj"]))
    with pytest.raises(InvalidInput) as err:
        build()
    message = str(err.value)
    assert "LoRA on model.layers.0.mlp.router breaks the model" in message and "exclude_modules=['router']" in message
    assert not list((tmp_path / "out").iterdir())  # no artifact, not even a partial one


def test_naming_a_module_peft_refuses_for_mamba_is_refused_before_the_download(hub, hf_cache, tmp_path):
    with pytest.raises(UnknownTargetModule) as err:
        _stages("tiny/mamba", hf_cache, tmp_path / "out", LoraSettings(target_modules=["out_proj", "in_proj"]))
    assert "out_proj" in str(err.value) and "incompatible with Mamba" in str(err.value)
    assert hub.body_bytes("*/model.safetensors") < 100_001 + 1


def test_an_unknown_target_is_refused_before_the_download(hub, hf_cache, tmp_path):
    with pytest.raises(UnknownTargetModule) as err:
        _stages("tiny/mixtral", hf_cache, tmp_path / "out", LoraSettings(target_modules=["gate_up_prj"]))
    assert "closest" in str(err.value) and "gate_up_proj" in str(err.value)
    assert hub.body_bytes("*/model.safetensors") < 100_001 + 1


@pytest.mark.parametrize("arch", MOE_ARCHS[:2])
def test_dora_on_fused_experts_is_refused_at_plan_time_with_peft_s_reason(arch, hub, hf_cache, tmp_path):
    with pytest.raises(InvalidInput) as err:
        _stages(EXTRA_REPOS[arch], hf_cache, tmp_path / "out", LoraSettings(use_dora=True))
    assert "DoRA" in str(err.value) or "dora" in str(err.value)

"""The factory's transformers-5 architectures (MoE, MLA, state-space), specified through the real loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.hubserver import HubServer
from tests.model_factory import (
    ARCHS,
    EXPERTS,
    EXTRA_ARCHS,
    EXTRA_REPOS,
    HIDDEN,
    INTERMEDIATE,
    MOE_ARCHS,
    MOE_INTERMEDIATE,
    SSM_ARCHS,
    VOCAB_SIZE,
    build_model_dir,
    expert_params,
    routers,
)

TEXT = "The quick brown fox jumps over the lazy dog."

# The layers that carry a mixture of experts (the rest have a dense MLP).
MOE_LAYERS = {"qwen3_moe": (0, 1), "mixtral": (0, 1), "granitemoe": (0, 1), "gpt_oss": (0, 1),
              "phimoe": (0, 1), "deepseek_v3": (1,), "jamba": (1,)}
# (gate_up_proj, down_proj) shapes: (experts, out, in) as nn.Linear keeps them; gpt_oss (experts, in, out).
EXPERT_WIDTH = {"qwen3_moe": MOE_INTERMEDIATE, "deepseek_v3": MOE_INTERMEDIATE}
# The layers whose mixer is a mamba block, and that block's name inside the layer.
MAMBA_LAYERS = {"mamba": ((0, 1), "mixer"), "mamba2": ((0, 1), "mixer"), "jamba": ((0,), "mamba")}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("factory-arch")
    return {arch: build_model_dir(arch, root / arch) for arch in EXTRA_ARCHS}


@pytest.fixture(scope="module")
def models(model_dirs) -> dict:
    return {arch: AutoModelForCausalLM.from_pretrained(d) for arch, d in model_dirs.items()}


def _fused_3d(model) -> list[str]:
    """3-D parameters of transformers' own modules, found on the loaded model independently of the factory."""
    return [n for n, p in model.named_parameters() if p.ndim == 3 and not n.endswith("conv1d.weight")]


# --- local directories ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", EXTRA_ARCHS)
def test_same_seed_gives_identical_bytes_with_finite_tensors_and_another_seed_different_weights(tmp_path, arch):
    a = build_model_dir(arch, tmp_path / "a", seed=7)
    b = build_model_dir(arch, tmp_path / "b", seed=7)
    c = build_model_dir(arch, tmp_path / "c", seed=8)

    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    with safe_open(a / "model.safetensors", "pt") as f:
        nonfinite = [k for k in f.keys() if not torch.isfinite(f.get_tensor(k)).all()]
    assert nonfinite == []


@pytest.mark.parametrize("arch", EXTRA_ARCHS)
def test_each_arch_reloads_with_auto_classes_without_key_mismatches_and_gives_finite_logits(model_dirs, arch):
    model, info = AutoModelForCausalLM.from_pretrained(model_dirs[arch], output_loading_info=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])
    batch = tokenizer(TEXT, return_tensors="pt")

    with torch.no_grad():
        logits = model(**batch).logits

    assert model.config.model_type == arch
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    assert logits.shape == (1, batch["input_ids"].shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_archs_have_fused_3d_experts_and_one_router_on_every_moe_layer(models, arch):
    model = models[arch]
    moe = MOE_LAYERS[arch]
    fused = _fused_3d(model)
    modules = dict(model.named_modules())

    assert fused == expert_params(arch)
    assert {int(n.split(".")[2]) for n in fused} == set(moe)
    assert [n.rsplit(".", 1)[1] for n in fused] == ["gate_up_proj", "down_proj"] * len(moe)
    assert [int(n.split(".")[2]) for n in routers(arch)] == list(moe)
    for name in routers(arch):
        assert f"{name.rsplit('.', 1)[0]}.experts" in modules


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_expert_parameter_shapes_follow_nn_linear_except_gpt_oss_transposed(models, arch):
    params = dict(models[arch].named_parameters())
    gate_up, down = (params[n].shape for n in expert_params(arch)[:2])
    width = EXPERT_WIDTH.get(arch, INTERMEDIATE)

    if arch == "gpt_oss":  # x @ W: (experts, in, out), gate and up interleaved along the last dim
        assert (tuple(gate_up), tuple(down)) == ((EXPERTS, HIDDEN, 2 * width), (EXPERTS, width, HIDDEN))
        assert params["model.layers.0.mlp.experts.gate_up_proj_bias"].shape == (EXPERTS, 2 * width)
        assert params["model.layers.0.mlp.experts.down_proj_bias"].shape == (EXPERTS, HIDDEN)
        assert "model.layers.0.self_attn.sinks" in params
    else:
        assert (tuple(gate_up), tuple(down)) == ((EXPERTS, 2 * width, HIDDEN), (EXPERTS, HIDDEN, width))


@pytest.mark.parametrize("arch", [*ARCHS, "mamba", "mamba2"])
def test_dense_and_pure_state_space_archs_have_no_experts_or_routers(arch):
    assert (expert_params(arch), routers(arch)) == ([], [])


def test_phimoe_router_is_a_linear_subclass_whose_forward_returns_a_tuple(models):
    router = models["phimoe"].get_submodule(routers("phimoe")[0])

    assert isinstance(router, torch.nn.Linear) and type(router) is not torch.nn.Linear
    assert isinstance(router(torch.zeros(3, HIDDEN)), tuple)


def test_deepseek_v3_has_mla_attention_a_dense_first_layer_and_shared_experts(models):
    modules = dict(models["deepseek_v3"].named_modules())

    for layer in (0, 1):
        for proj in ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"):
            assert isinstance(modules[f"model.layers.{layer}.self_attn.{proj}"], torch.nn.Linear)
    assert isinstance(modules["model.layers.0.mlp.gate_proj"], torch.nn.Linear)
    assert isinstance(modules["model.layers.1.mlp.shared_experts.down_proj"], torch.nn.Linear)


@pytest.mark.parametrize("arch", SSM_ARCHS)
def test_mamba_family_has_out_proj_and_conv1d_on_its_mamba_layers(models, arch):
    modules = dict(models[arch].named_modules())
    layers, block = MAMBA_LAYERS[arch]
    stem = "model" if arch == "jamba" else "backbone"

    for i in layers:
        assert isinstance(modules[f"{stem}.layers.{i}.{block}.out_proj"], torch.nn.Linear)
        assert isinstance(modules[f"{stem}.layers.{i}.{block}.conv1d"], torch.nn.Conv1d)
    if arch == "jamba":  # the other layer is attention
        assert isinstance(modules["model.layers.1.self_attn.q_proj"], torch.nn.Linear)


@pytest.mark.parametrize("arch", SSM_ARCHS)
def test_peft_refuses_lora_on_out_proj_for_mamba_and_mamba2_but_not_jamba(model_dirs, arch):
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])  # fresh: get_peft_model changes it in place
    config = LoraConfig(r=2, target_modules=["out_proj"])
    if arch == "jamba":
        get_peft_model(model, config)
    else:
        with pytest.raises(ValueError, match="out_proj"):
            get_peft_model(model, config)


# --- through the test hub ---------------------------------------------------------------------


def test_build_test_repos_publishes_one_repo_per_extra_arch(hub: HubServer):
    published = {a: hub.repos[r] for a, r in EXTRA_REPOS.items()}

    assert set(published) == set(EXTRA_ARCHS)
    for arch, repo in published.items():
        assert repo.arch == arch and repo.notes and len(repo.sha) == 40
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(repo.files)
    assert len({r.sha for r in published.values()}) == len(published)


def test_an_extra_arch_repo_downloads_through_the_hub_and_loads(hub: HubServer, hf_cache: Path):
    from huggingface_hub import snapshot_download

    repo = hub.repos[EXTRA_REPOS["jamba"]]
    path = Path(snapshot_download(repo.repo_id, cache_dir=hf_cache))
    model = AutoModelForCausalLM.from_pretrained(path)

    assert path.name == repo.sha
    assert sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()) == repo.files
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 40, 41, 42]])).logits).all()

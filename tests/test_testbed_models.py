"""The model factory, specified through the real transformers loaders (locally and through the test hub)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.hubserver import HubServer
from tests.model_factory import (
    ARCHS,
    BOS_ID,
    EOS_ID,
    EXTRA_REPOS,
    REMOTE_CODE_MARKER_ENV,
    VOCAB_SIZE,
    TestRepo,
    build_model_dir,
)

# The linear layers each architecture must expose (what LoRA target resolution sees), for layer 0.
LINEAR_LAYERS = {
    "llama": {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"},
    "gpt2": {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"},
    "phi3": {"self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"},
    "gpt_neox": {"attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"},
}
STORED_DTYPE = {"llama": "float32", "gpt2": "float32", "phi3": "bfloat16", "gpt_neox": "float32"}
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("factory")
    dirs = {arch: build_model_dir(arch, root / arch, dtype=STORED_DTYPE[arch]) for arch in ARCHS}
    dirs["sharded"] = build_model_dir("llama", root / "sharded", shards=3)
    dirs["extras"] = build_model_dir("llama", root / "extras", extras=True)
    dirs["pickle"] = build_model_dir("llama", root / "pickle", pickle_only=True)
    dirs["remote"] = build_model_dir("llama", root / "remote", remote_code=True)
    return dirs


def _finite_logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits).all()
    return logits


def _linear_suffixes(model) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    names = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D)) and ".0." in n}
    return {n.split(".0.", 1)[1] for n in names}


# --- local directories ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_loads_locally_with_auto_classes_and_gives_finite_logits(model_dirs, arch):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])
    tokenizer = AutoTokenizer.from_pretrained(model_dirs[arch])

    assert model.config.model_type == arch
    assert str(model.dtype).removeprefix("torch.") == STORED_DTYPE[arch]
    _finite_logits(model, tokenizer)


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_exposes_its_own_kind_of_linear_layers(model_dirs, arch):
    model = AutoModelForCausalLM.from_pretrained(model_dirs[arch])

    assert _linear_suffixes(model) == LINEAR_LAYERS[arch]


def test_gpt2_ties_its_output_head_to_the_input_embeddings(model_dirs):
    model = AutoModelForCausalLM.from_pretrained(model_dirs["gpt2"])

    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def test_tokenizer_has_bos_eos_and_unk_but_no_pad_token(model_dirs):
    tokenizer = AutoTokenizer.from_pretrained(model_dirs["llama"])

    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (BOS_ID, EOS_ID, 0)
    assert tokenizer.pad_token is None and tokenizer.pad_token_id is None
    assert 256 <= len(tokenizer) <= 512
    ids = tokenizer(TEXT)["input_ids"]
    assert ids[0] == BOS_ID
    assert tokenizer.decode(ids, skip_special_tokens=True) == TEXT


def test_config_and_generation_config_carry_the_tokenizer_special_ids(model_dirs):
    config = json.loads((model_dirs["llama"] / "config.json").read_text())
    generation = json.loads((model_dirs["llama"] / "generation_config.json").read_text())

    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (BOS_ID, EOS_ID, None)
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (BOS_ID, EOS_ID)


def test_config_declares_the_stored_dtype_phi3_bfloat16_and_gpt_neox_under_the_legacy_key(model_dirs):
    phi3 = json.loads((model_dirs["phi3"] / "config.json").read_text())
    neox = json.loads((model_dirs["gpt_neox"] / "config.json").read_text())
    with safe_open(model_dirs["phi3"] / "model.safetensors", "pt") as f:
        phi3_dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}

    assert phi3["dtype"] == "bfloat16" and phi3_dtypes == {"BF16"}
    assert neox["torch_dtype"] == "float32" and "dtype" not in neox


def test_same_seed_gives_identical_bytes_and_another_seed_different_weights(tmp_path):
    a = build_model_dir("llama", tmp_path / "a", seed=7)
    b = build_model_dir("llama", tmp_path / "b", seed=7)
    c = build_model_dir("llama", tmp_path / "c", seed=8)

    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_sharded_dir_has_an_index_over_three_shards_and_loads(model_dirs):
    d = model_dirs["sharded"]
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in d.glob("model-*.safetensors"))

    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert set(index["weight_map"].values()) == set(shards)
    assert not (d / "model.safetensors").exists()
    _finite_logits(AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d))


def test_extras_dir_holds_duplicate_pickle_and_original_weights_next_to_safetensors(model_dirs):
    d = model_dirs["extras"]

    for name in ("model.safetensors", "pytorch_model.bin", "original/consolidated.00.pth", "original/params.json"):
        assert (d / name).is_file(), name
    assert json.loads((d / "original/params.json").read_text())["n_layers"] == 2


def test_pickle_only_dir_has_no_safetensors_and_loads_from_pytorch_model_bin(model_dirs):
    d = model_dirs["pickle"]

    assert not list(d.glob("*.safetensors")) and (d / "pytorch_model.bin").is_file()
    _finite_logits(AutoModelForCausalLM.from_pretrained(d), AutoTokenizer.from_pretrained(d))


def test_remote_code_dir_refuses_to_load_without_trust_remote_code(model_dirs, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv(REMOTE_CODE_MARKER_ENV, str(marker))

    # trust_remote_code=False, not None: None makes transformers prompt on stdin.
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(model_dirs["remote"], trust_remote_code=False)
    assert not marker.exists()


def test_remote_code_dir_runs_the_repo_code_when_trusted(model_dirs, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv(REMOTE_CODE_MARKER_ENV, str(marker))

    model = AutoModelForCausalLM.from_pretrained(model_dirs["remote"], trust_remote_code=True)

    assert type(model).__name__ == "TinyRemoteForCausalLM"
    assert model.loaded_by_remote_code is True
    assert marker.read_text().startswith("modeling_tiny.TinyRemoteForCausalLM ran")
    _finite_logits(model, AutoTokenizer.from_pretrained(model_dirs["remote"], trust_remote_code=False))


# --- through the test hub ---------------------------------------------------------------------

HUB_LOADABLE = ("tiny/llama", "tiny/gpt2", "tiny/phi3", "tiny/gpt-neox", "tiny/llama-sharded",
                "tiny/llama-extras", "tiny/llama-pickle")


def _snapshot_sha(cache: Path, repo_id: str, ref: str = "main") -> str:
    return (cache / f"models--{repo_id.replace('/', '--')}" / "refs" / ref).read_text()


def test_build_test_repos_publishes_the_standard_repos(hub: HubServer):
    repos: dict[str, TestRepo] = hub.repos

    assert set(repos) == {*HUB_LOADABLE, "tiny/remote-code", "tiny/gated", *EXTRA_REPOS.values()}
    assert all(len(r.sha) == 40 and r.shas["main"] == r.sha for r in repos.values())
    assert len({r.sha for r in repos.values()}) == len(repos)
    assert repos["tiny/llama"].shas["v1"] != repos["tiny/llama"].sha
    assert [r.repo_id for r in repos.values() if r.gated] == ["tiny/gated"]
    assert "pytorch_model.bin" in repos["tiny/llama-pickle"].files
    assert "original/consolidated.00.pth" in repos["tiny/llama-extras"].files


@pytest.mark.parametrize("repo_id", HUB_LOADABLE)
def test_each_standard_repo_loads_through_the_hub_at_its_main_commit(hub: HubServer, hf_cache: Path, repo_id):
    model = AutoModelForCausalLM.from_pretrained(repo_id, cache_dir=hf_cache)
    tokenizer = AutoTokenizer.from_pretrained(repo_id, cache_dir=hf_cache)

    _finite_logits(model, tokenizer)
    assert _snapshot_sha(hf_cache, repo_id) == hub.repos[repo_id].sha


def test_llama_tag_v1_and_main_are_different_commits_with_different_weights(hub: HubServer, hf_cache: Path):
    llama = hub.repos["tiny/llama"]
    at_v1 = AutoModelForCausalLM.from_pretrained("tiny/llama", revision="v1", cache_dir=hf_cache)
    at_sha = AutoModelForCausalLM.from_pretrained("tiny/llama", revision=llama.shas["v1"], cache_dir=hf_cache)
    at_main = AutoModelForCausalLM.from_pretrained("tiny/llama", revision="main", cache_dir=hf_cache)

    weight = "model.layers.0.self_attn.q_proj.weight"
    assert _snapshot_sha(hf_cache, "tiny/llama", "v1") == llama.shas["v1"]
    assert _snapshot_sha(hf_cache, "tiny/llama", "main") == llama.sha
    assert torch.equal(at_v1.state_dict()[weight], at_sha.state_dict()[weight])
    assert not torch.equal(at_v1.state_dict()[weight], at_main.state_dict()[weight])


def test_transformers_loads_the_extras_repo_without_fetching_its_duplicate_weights(hub: HubServer, hf_cache: Path):
    AutoModelForCausalLM.from_pretrained("tiny/llama-extras", cache_dir=hf_cache)

    assert hub.requests("*/model.safetensors", "GET") == 1
    assert hub.requests("*/pytorch_model.bin", "GET") == 0
    assert hub.requests("*/original/*", "GET") == 0


def test_gated_repo_loads_only_with_the_token(hub: HubServer, hf_cache: Path, hub_token: str):
    # transformers turns huggingface_hub's GatedRepoError into an OSError.
    with pytest.raises(OSError):
        AutoModelForCausalLM.from_pretrained("tiny/gated", cache_dir=hf_cache)

    model = AutoModelForCausalLM.from_pretrained("tiny/gated", cache_dir=hf_cache, token=hub_token)
    assert model.config.model_type == "llama"


def test_remote_code_repo_runs_its_code_from_the_hub_only_when_trusted(hub, hf_cache, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv(REMOTE_CODE_MARKER_ENV, str(marker))
    sha = hub.repos["tiny/remote-code"].sha

    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained("tiny/remote-code", revision=sha, cache_dir=hf_cache, trust_remote_code=False)
    assert not marker.exists()

    model = AutoModelForCausalLM.from_pretrained("tiny/remote-code", revision=sha, cache_dir=hf_cache, trust_remote_code=True)
    assert model.loaded_by_remote_code is True and marker.exists()

"""LoRA settings, target resolution and wrapping, on real tiny models of four architectures."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from transformers import AutoModelForCausalLM

from lora_prep.tasks.errors import InvalidInput, UnknownTargetModule
from lora_prep.tasks.lora.targets import resolve_targets as resolve_target_plan
from lora_prep.tasks.lora.wrap import LoraReport, wrap_lora
from lora_prep.tasks.settings import LoraSettings
from tests.model_factory import ARCHS, HIDDEN, VOCAB_SIZE, build_model_dir

LAYERS_AT = {"llama": "model.layers", "gpt2": "transformer.h", "phi3": "model.layers", "gpt_neox": "gpt_neox.layers"}
# Per decoder layer, in module order: what each preset must pick.
BLOCKS = {
    "llama": {
        "attention": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
        "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    },
    "gpt2": {"attention": ["attn.c_attn", "attn.c_proj"], "mlp": ["mlp.c_fc", "mlp.c_proj"]},
    "phi3": {"attention": ["self_attn.o_proj", "self_attn.qkv_proj"], "mlp": ["mlp.gate_up_proj", "mlp.down_proj"]},
    "gpt_neox": {
        "attention": ["attention.query_key_value", "attention.dense"],
        "mlp": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    },
}
DTYPE = {"llama": "float32", "gpt2": "float32", "phi3": "bfloat16", "gpt_neox": "float32"}


def expected(arch: str, preset: str) -> list[str]:
    blocks = ["attention", "mlp"] if preset == "all-linear" else [preset]
    return [f"{LAYERS_AT[arch]}.{i}.{s}" for i in range(2) for b in blocks for s in BLOCKS[arch][b]]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora-bases")
    return {arch: build_model_dir(arch, root / arch, dtype=DTYPE[arch]) for arch in ARCHS}


@pytest.fixture
def load(model_dirs):
    """A fresh base model per call (wrap_lora modifies the model in place)."""
    return lambda arch: AutoModelForCausalLM.from_pretrained(model_dirs[arch])


def resolve_targets(model, settings: LoraSettings) -> list[str]:
    """The module names a settings resolve to (the TargetPlan's target_modules)."""
    return resolve_target_plan(model, settings).target_modules


def in_out(module) -> tuple[int, int]:
    # nn.Linear weight is (out, in); GPT-2's Conv1D stores (in, out).
    out_dim, in_dim = module.weight.shape
    return (out_dim, in_dim) if type(module).__name__ == "Conv1D" else (in_dim, out_dim)


# --- settings ---------------------------------------------------------------------------------


def test_invalid_lora_settings_are_rejected_with_one_message_per_field():
    with pytest.raises(ValidationError) as info:
        LoraSettings(
            r=0, alpha=0, dropout=1.0, bias="some", init_lora_weights="eva", target_modules="q_proj(",
            rank_pattern={"q_proj": 0}, alpha_pattern={"q_proj": -1}, seed=-1,
        )

    fields = {e["loc"][0] for e in info.value.errors()}
    assert fields == {"r", "alpha", "dropout", "bias", "init_lora_weights", "target_modules",
                      "rank_pattern", "alpha_pattern", "seed"}
    assert "not a valid regex" in str(info.value)
    assert "eva" in str(info.value)  # the message shows the bad value


@pytest.mark.parametrize("targets", [[], ["q_proj", " "]])
def test_empty_or_blank_target_names_are_rejected(targets):
    with pytest.raises(ValidationError, match="target_modules"):
        LoraSettings(target_modules=targets)


def test_orthogonal_init_needs_even_ranks():
    with pytest.raises(ValidationError, match="even"):
        LoraSettings(r=5, init_lora_weights="orthogonal")
    with pytest.raises(ValidationError, match="even"):
        LoraSettings(r=4, init_lora_weights="orthogonal", rank_pattern={"q_proj": 3})
    assert LoraSettings(r=4, init_lora_weights="orthogonal").r == 4


@pytest.mark.parametrize("init", [True, False, "gaussian", "pissa", "olora", "orthogonal"])
def test_data_free_initialisations_are_accepted(init):
    assert LoraSettings(init_lora_weights=init).init_lora_weights == init


def test_pissa_with_a_randomized_svd_is_refused_because_it_would_not_load_back_the_same():
    with pytest.raises(ValidationError, match="not reproducible"):
        LoraSettings(init_lora_weights="pissa_niter_4")


# --- target resolution ------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["all-linear", "attention", "mlp"])
@pytest.mark.parametrize("arch", ARCHS)
def test_presets_resolve_to_the_architectures_own_modules(load, arch, preset):
    assert resolve_targets(load(arch), LoraSettings(target_modules=preset)) == expected(arch, preset)


@pytest.mark.parametrize("arch", ARCHS)
def test_presets_never_target_the_output_head_or_embeddings(load, arch):
    model = load(arch)
    modules = dict(model.named_modules())
    head = next(n for n, m in modules.items() if m is model.get_output_embeddings())

    for preset in ("all-linear", "attention", "mlp"):
        targets = resolve_targets(model, LoraSettings(target_modules=preset))
        assert head not in targets
        assert not any(isinstance(modules[t], torch.nn.Embedding) for t in targets)


def test_explicit_names_match_every_module_with_that_suffix(load):
    assert resolve_targets(load("llama"), LoraSettings(target_modules=["q_proj", "v_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
    ]
    # GPT-2 has c_proj in attention and in the MLP: a dotted suffix picks one of them.
    assert resolve_targets(load("gpt2"), LoraSettings(target_modules=["attn.c_proj"])) == [
        "transformer.h.0.attn.c_proj", "transformer.h.1.attn.c_proj",
    ]


def test_output_head_is_targeted_only_when_named_explicitly(load):
    assert resolve_targets(load("llama"), LoraSettings(target_modules=["lm_head"])) == ["lm_head"]


def test_unknown_explicit_name_is_an_error_listing_closest_and_targetable_names(load):
    with pytest.raises(UnknownTargetModule) as info:
        resolve_targets(load("llama"), LoraSettings(target_modules=["q_prj", "v_proj"]))

    message = str(info.value)
    assert "'q_prj'" in message and "closest: q_proj" in message
    assert "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in message
    assert "\n" not in message and message.endswith("(all-linear, attention, mlp).")
    assert info.value.exit_code == 2


def test_every_unknown_name_is_reported_at_once(load):
    settings = LoraSettings(
        target_modules=["qkv_prj"], exclude_modules=["dense_4h_to_hh"], modules_to_save=["lm_haed"],
        rank_pattern={"nothing_here": 2},
    )
    with pytest.raises(UnknownTargetModule) as info:
        resolve_targets(load("phi3"), settings)

    message = str(info.value)
    for part in ("target_modules entry 'qkv_prj'", "closest: qkv_proj", "exclude_modules entry 'dense_4h_to_hh'",
                 "modules_to_save entry 'lm_haed'", "closest: lm_head", "rank_pattern key 'nothing_here'"):
        assert part in message


def test_a_preset_inside_a_list_is_explained(load):
    with pytest.raises(UnknownTargetModule, match="'mlp' is a preset, not a module name"):
        resolve_targets(load("llama"), LoraSettings(target_modules=["mlp"]))


def test_regex_is_matched_against_full_module_names(load):
    assert resolve_targets(load("llama"), LoraSettings(target_modules=r".*\.1\.mlp\..*")) == [
        "model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
    ]
    assert resolve_targets(load("gpt_neox"), LoraSettings(target_modules=r".*query_key_value")) == [
        "gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.1.attention.query_key_value",
    ]


def test_a_bare_name_string_is_a_regex_over_full_names_and_the_error_says_so(load):
    with pytest.raises(UnknownTargetModule, match="a string is a regex matched against full names"):
        resolve_targets(load("llama"), LoraSettings(target_modules="q_proj"))


@pytest.mark.parametrize("arch", ARCHS)
def test_exclude_modules_leaves_those_modules_out(load, arch):
    last = BLOCKS[arch]["mlp"][-1].rsplit(".", 1)[-1]
    settings = LoraSettings(target_modules="all-linear", exclude_modules=[last])

    peft_model, report = wrap_lora(load(arch), settings)

    assert report.target_modules == [n for n in expected(arch, "all-linear") if not n.endswith("." + last)]
    assert report.target_modules == resolve_targets(load(arch), settings)


def test_excluding_every_target_is_invalid_input(load):
    with pytest.raises(InvalidInput, match="leaves nothing to train"):
        resolve_targets(load("llama"), LoraSettings(target_modules=["q_proj"], exclude_modules=["q_proj"]))


# --- wrapping ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_trainable_parameters_are_r_times_in_plus_out_for_each_target(load, arch):
    model = load(arch)
    base_total = sum(p.numel() for p in model.parameters())
    modules = dict(model.named_modules())
    shapes = {t: in_out(modules[t]) for t in expected(arch, "all-linear")}

    peft_model, report = wrap_lora(model, LoraSettings(r=4))

    assert report.trainable_params == sum(4 * (i + o) for i, o in shapes.values())
    assert report.total_params == base_total + report.trainable_params
    assert report.trainable_params == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_llama_all_linear_rank_4_trains_4096_parameters(load):
    # per layer, in+out: q 32+32, k 32+16, v 32+16, o 32+32, gate 32+64, up 32+64, down 64+32 = 512; x r=4 x 2 layers
    assert wrap_lora(load("llama"), LoraSettings(r=4))[1].trainable_params == 4096


def test_rank_and_alpha_patterns_apply_to_the_matching_modules(load):
    settings = LoraSettings(r=4, alpha=8, rank_pattern={"q_proj": 2}, alpha_pattern={"q_proj": 16})
    peft_model, report = wrap_lora(load("llama"), settings)
    attn = peft_model.get_base_model().model.layers[0].self_attn

    assert attn.q_proj.lora_A["default"].weight.shape == (2, HIDDEN)
    assert attn.k_proj.lora_A["default"].weight.shape == (4, HIDDEN)
    assert attn.q_proj.scaling["default"] == 16 / 2 and attn.k_proj.scaling["default"] == 8 / 4


def test_dora_adds_one_magnitude_per_output_feature(load):
    model = load("llama")
    modules = dict(model.named_modules())
    shapes = [in_out(modules[t]) for t in expected("llama", "attention")]

    _, report = wrap_lora(model, LoraSettings(r=4, target_modules="attention", use_dora=True))

    assert report.trainable_params == sum(4 * (i + o) + o for i, o in shapes)


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_pass_gives_gradients_only_to_lora_parameters(load, arch):
    peft_model, _ = wrap_lora(load(arch), LoraSettings(r=4, dropout=0.0))
    ids = torch.arange(3, 19).unsqueeze(0)

    peft_model(input_ids=ids, labels=ids).loss.backward()

    with_grad = {n for n, p in peft_model.named_parameters() if p.grad is not None}
    lora = {n for n, p in peft_model.named_parameters() if "lora_" in n}
    assert with_grad == lora
    # B starts at zero, so A's gradient is zero; B's is not.
    assert any(p.grad.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("arch", ARCHS)
def test_saved_adapter_reloads_onto_a_fresh_base_with_identical_outputs(load, arch, tmp_path):
    from peft import PeftModel

    # init False: A and B both random, so the adapter changes the output and a wrong reload would show.
    peft_model, _ = wrap_lora(load(arch), LoraSettings(r=4, dropout=0.0, init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load(arch), tmp_path / "adapter")
    base = load(arch)
    ids = torch.arange(3, 19).unsqueeze(0)

    with torch.no_grad():
        out = peft_model.eval()(input_ids=ids).logits
        again = reloaded.eval()(input_ids=ids).logits
        plain = base.eval()(input_ids=ids).logits
    assert torch.equal(out, again)
    assert not torch.equal(out, plain)


def test_same_settings_and_seed_give_byte_identical_adapter_files(load, tmp_path):
    def save(seed: int, name: str) -> bytes:
        peft_model, _ = wrap_lora(load("llama"), LoraSettings(r=4, seed=seed, init_lora_weights="gaussian"))
        peft_model.save_pretrained(tmp_path / name)
        return (tmp_path / name / "adapter_model.safetensors").read_bytes()

    assert save(3, "a") == save(3, "b")
    assert save(3, "a2") != save(4, "c")


def test_seeding_the_adapter_leaves_the_global_random_state_alone(load):
    model = load("llama")
    before = torch.get_rng_state()

    wrap_lora(model, LoraSettings(seed=123))

    assert torch.equal(torch.get_rng_state(), before)


def test_adapter_bytes_match_the_tensors_in_the_saved_file(load, tmp_path):
    from safetensors import safe_open

    peft_model, report = wrap_lora(load("phi3"), LoraSettings(r=8))
    peft_model.save_pretrained(tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        saved = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())

    assert report.adapter_bytes == saved
    assert report.warnings == []


def test_modules_to_save_warns_and_counts_the_full_copy_in_the_adapter_size(load, caplog):
    lora_only = wrap_lora(load("llama"), LoraSettings(r=4))[1].adapter_bytes

    with caplog.at_level(logging.WARNING, logger="lora_prep.tasks.lora.wrap"):
        _, report = wrap_lora(load("llama"), LoraSettings(r=4, modules_to_save=["lm_head"]))

    head_bytes = VOCAB_SIZE * HIDDEN * 4  # float32
    assert report.adapter_bytes == lora_only + head_bytes
    assert any("modules_to_save" in w and "full copies" in w for w in report.warnings)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == report.warnings


def test_tied_gpt2_head_in_modules_to_save_stays_tied_and_warns(load):
    peft_model, report = wrap_lora(load("gpt2"), LoraSettings(r=4, modules_to_save=["lm_head"]))
    base = peft_model.get_base_model()
    head = base.lm_head.modules_to_save["default"].weight
    embedding = base.transformer.wte.modules_to_save["default"].weight

    assert head.data_ptr() == embedding.data_ptr() and head.requires_grad
    assert any("tied" in w for w in report.warnings)
    # PEFT stores both tied copies: head and embedding, float32 each.
    assert report.adapter_bytes >= 2 * VOCAB_SIZE * HIDDEN * 4


def test_targeting_the_tied_gpt2_head_also_wraps_the_tied_embedding_and_stays_small(load):
    _, report = wrap_lora(load("gpt2"), LoraSettings(r=4, target_modules=["lm_head"]))

    assert report.target_modules == ["transformer.wte", "lm_head"]
    assert report.peft_config["ensure_weight_tying"] is True
    assert report.adapter_bytes < VOCAB_SIZE * HIDDEN * 4 and report.warnings == []


def test_a_resized_vocabulary_is_saved_with_the_adapter_and_the_report_says_so(load, tmp_path):
    from safetensors import safe_open

    model = load("llama")
    model.resize_token_embeddings(VOCAB_SIZE + 64, mean_resizing=False)  # as adding a pad token does

    peft_model, report = wrap_lora(model, LoraSettings(r=4), embeddings_resized=True)
    peft_model.save_pretrained(tmp_path / "adapter", save_embedding_layers=report.save_embedding_layers)
    with safe_open(tmp_path / "adapter" / "adapter_model.safetensors", "pt") as f:
        saved = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())

    assert report.adapter_bytes == saved >= 2 * (VOCAB_SIZE + 64) * HIDDEN * 4  # embed_tokens + lm_head, float32
    assert any("vocabulary was resized" in w for w in report.warnings)


def test_gpt2_conv1d_targets_are_recorded_as_fan_in_fan_out(load):
    _, report = wrap_lora(load("gpt2"), LoraSettings(r=4))

    assert report.peft_config["fan_in_fan_out"] is True


def test_pissa_init_warns_that_it_rewrites_the_base_weights(load):
    model = load("llama")
    before = model.model.layers[0].self_attn.q_proj.weight.detach().clone()

    peft_model, report = wrap_lora(model, LoraSettings(r=4, target_modules=["q_proj"], init_lora_weights="pissa"))

    after = peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert not torch.equal(before, after)
    assert any("rewrites the base weights" in w for w in report.warnings)


def test_settings_are_not_modified_by_wrapping(load):
    # PEFT rewrites modules_to_save in place for a tied head (lm_head -> transformer.wte).
    settings = LoraSettings(r=4, modules_to_save=["lm_head"], exclude_modules=["c_fc"])
    snapshot = settings.model_dump()

    wrap_lora(load("gpt2"), settings)

    assert settings.model_dump() == snapshot


def test_report_is_json_and_records_the_peft_config_that_was_applied(load):
    _, report = wrap_lora(load("gpt_neox"), LoraSettings(r=4, alpha=8, target_modules="attention"))
    data = json.loads(report.model_dump_json())

    assert LoraReport.model_validate(data) == report
    assert data["peft_config"]["r"] == 4 and data["peft_config"]["lora_alpha"] == 8
    assert data["peft_config"]["target_modules"] == sorted(report.target_modules)
    assert data["peft_config"]["task_type"] == "CAUSAL_LM"

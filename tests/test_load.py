"""The load stage: real tiny models from tests.model_factory, loaded on this CPU machine through probe -> plan -> load.

Nothing is mocked: every test runs transformers' real from_pretrained on files built
locally once per session. CUDA-only paths (4/8-bit bitsandbytes loads, a flash-attn
kernel that works) cannot run here; what can be checked of them without CUDA is
checked (the typed refusal, the quantization config handed to transformers).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import pytest
import torch

from lora_prep.tasks.errors import InvalidInput, PickleRefused, RemoteCodeRefused
from lora_prep.tasks.machine.hardware import probe_hardware
from lora_prep.tasks.model.facts import ModelFacts
from lora_prep.tasks.model.load import load_model
from lora_prep.tasks.model.load_plan import plan_load
from lora_prep.tasks.model.quantization import bnb_config
from lora_prep.tasks.model.tokenizer import (
    NEW_PAD_TOKEN,
    choose_pad_token,
    load_tokenizer,
)
from lora_prep.tasks.records.build import LoadReport
from lora_prep.tasks.settings import LoadSettings, LoraSettings
from tests.model_factory import ARCHS, EOS_ID, REMOTE_CODE_MARKER_ENV, build_model_dir

SHA = "0123456789abcdef0123456789abcdef01234567"  # stands for the commit the download stage verified
TEXT = "The model is a tiny language model made for tests."
BATCH = ["Adapters are small.", "The rank of an adapter is its width, and alpha scales its update."]


# --- fixtures: the models are built once per session ----------------------------------


@pytest.fixture(scope="session")
def dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("load-models")
    built = {arch: build_model_dir(arch, root / arch, dtype="bfloat16" if arch == "phi3" else "float32") for arch in ARCHS}
    built["remote"] = build_model_dir("llama", root / "remote", remote_code=True, seed=6)
    built["pickle"] = build_model_dir("llama", root / "pickle", pickle_only=True, seed=5)
    built["extras"] = build_model_dir("llama", root / "extras", extras=True, seed=4)
    # Safetensors next to a pickle copy that would fail to load: proves the pickle is never read.
    (built["extras"] / "pytorch_model.bin").write_bytes(b"not a pickle: loading this file fails")
    # GPT-2's real tokenizer has unk == eos (<|endoftext|>) and no pad: nothing to reuse.
    built["unk_is_eos"] = _copy_with_tokenizer_config(built["gpt2"], root / "unk_is_eos", unk_token="</s>")
    # Many fine-tuned repos set pad = eos.
    built["pad_is_eos"] = _copy_with_tokenizer_config(built["llama"], root / "pad_is_eos", pad_token="</s>")
    return built


def _copy_with_tokenizer_config(src: Path, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    path = dst / "tokenizer_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return dst


@pytest.fixture(scope="session")
def profile(tmp_path_factory):
    return probe_hardware(cache_dir=str(tmp_path_factory.mktemp("hub-cache")))


def model_facts(model_dir: Path) -> ModelFacts:
    """ModelFacts as the resolve stage builds them: config.json plus parameter counts from safetensors headers."""
    return ModelFacts.from_local_dir(model_dir, f"tiny/{model_dir.name}", SHA)


def plan_for(profile, model_dir: Path, settings: LoadSettings = LoadSettings(), revision: str = "main"):
    return plan_load(profile, model_facts(model_dir), settings, revision)


def logits_of(loaded, text: str = TEXT) -> torch.Tensor:
    batch = loaded.tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return loaded.model(**batch).logits


# --- every architecture, as planned ------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_loads_on_cpu_in_the_planned_dtype_and_attention_with_finite_logits(profile, dirs, arch):
    plan = plan_for(profile, dirs[arch])
    loaded = load_model(str(dirs[arch]), plan, LoadSettings())
    report = loaded.report

    # This machine has no CUDA: the planner chose float32 + sdpa on CPU, and that is what runs.
    assert (plan.dtype, plan.attn_implementation, plan.device_map) == ("float32", "sdpa", "cpu")
    assert report.dtype == "float32" and {p.dtype for p in loaded.model.parameters()} == {torch.float32}
    assert report.attn_implementation == "sdpa" == loaded.model.config._attn_implementation
    assert report.attn_fallbacks_tried == []
    assert report.device_map == "cpu" and {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    assert (report.quantization, report.trust_remote_code, report.kbit_prepared) == ("none", False, False)
    logits = logits_of(loaded)
    assert logits.shape[-1] == loaded.model.config.vocab_size and torch.isfinite(logits).all()
    assert LoadReport.model_validate_json(report.model_dump_json()) == report  # goes into the manifest as JSON


def test_bfloat16_weights_are_upcast_to_float32_on_cpu_as_the_plan_says(profile, dirs):
    plan = plan_for(profile, dirs["phi3"])  # phi3's weights are stored in bfloat16
    assert "upcast" in plan.reasons["dtype"]
    assert load_model(str(dirs["phi3"]), plan, LoadSettings()).report.dtype == "float32"


def test_an_explicit_bfloat16_load_keeps_bfloat16_weights(profile, dirs):
    plan = plan_for(profile, dirs["llama"], LoadSettings(dtype="bfloat16"))
    loaded = load_model(str(dirs["llama"]), plan, LoadSettings(dtype="bfloat16"))
    assert loaded.report.dtype == "bfloat16" and {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
    assert torch.isfinite(logits_of(loaded)).all()


# --- attention fallback -----------------------------------------------------------------


def test_planned_flash_attention_falls_back_to_sdpa_on_this_cpu_machine_and_the_report_says_so(profile, dirs, caplog):
    # The planner refuses flash_attention_2 here; a plan recorded on a GPU machine and replayed on
    # this one asks for it anyway, so build that plan by hand.
    plan = plan_for(profile, dirs["llama"]).model_copy(
        update={"attn_implementation": "flash_attention_2", "attn_fallbacks": ["sdpa", "eager"]}
    )
    with caplog.at_level(logging.WARNING, logger="lora_prep.tasks.model.load"):
        loaded = load_model(str(dirs["llama"]), plan, LoadSettings())

    assert loaded.report.attn_implementation == "sdpa" == loaded.model.config._attn_implementation
    assert loaded.report.attn_fallbacks_tried == ["flash_attention_2: ImportError"]  # flash-attn is not installed
    assert any("flash_attention_2" in r.getMessage() and "sdpa" in r.getMessage() for r in caplog.records)
    assert torch.isfinite(logits_of(loaded)).all()


def test_flash_attention_without_fallbacks_fails_with_a_typed_error_naming_what_was_tried_and_the_fix(profile, dirs):
    plan = plan_for(profile, dirs["llama"]).model_copy(update={"attn_implementation": "flash_attention_2", "attn_fallbacks": []})
    with pytest.raises(InvalidInput) as err:
        load_model(str(dirs["llama"]), plan, LoadSettings())
    message = str(err.value)
    assert "flash_attention_2: ImportError" in message and message.endswith("eager always works for transformers models)")
    assert "\n" not in message


def test_an_import_error_that_is_not_about_attention_is_not_retried_with_another_kernel(profile, dirs, tmp_path, caplog):
    # A repo whose own (trusted) code needs a package this machine lacks: transformers raises ImportError,
    # the same type as a missing flash-attn, but trying sdpa or eager cannot help.
    needy = shutil.copytree(dirs["remote"], tmp_path / "needs-a-package")
    code = next(needy.glob("modeling_*.py"))
    code.write_text("import lora_prep_test_no_such_package  # noqa\n" + code.read_text())
    settings = LoadSettings(trust_remote_code=True)
    plan = plan_for(profile, needy, settings, revision=SHA).model_copy(update={"attn_fallbacks": ["sdpa", "eager"]})
    with caplog.at_level(logging.WARNING, logger="lora_prep.tasks.model.load"), pytest.raises(ImportError, match="lora_prep_test_no_such_package") as err:
        load_model(str(needy), plan, settings)
    assert not isinstance(err.value, InvalidInput)  # transformers' own error, not "no attention could be used"
    assert not any("trying eager" in r.getMessage() for r in caplog.records)


# --- remote code --------------------------------------------------------------------------


def test_remote_code_repo_is_refused_without_trust_and_its_code_never_runs(profile, dirs, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv(REMOTE_CODE_MARKER_ENV, str(marker))
    with pytest.raises(RemoteCodeRefused, match="--trust-remote-code"):
        plan_for(profile, dirs["remote"])  # the planner refuses first
    # Defence in depth: a plan that does not trust the code (or settings that do not) is refused by the loader too.
    untrusting = plan_for(profile, dirs["llama"])  # trust_remote_code=False
    trusting = untrusting.model_copy(update={"trust_remote_code": True})
    for plan, settings in ((untrusting, LoadSettings(trust_remote_code=True)), (trusting, LoadSettings())):
        with pytest.raises(RemoteCodeRefused, match=r"auto_map.*--trust-remote-code"):
            load_model(str(dirs["remote"]), plan, settings)
    with pytest.raises(RemoteCodeRefused):
        load_tokenizer(str(dirs["remote"]))
    assert not marker.exists()


def test_trusted_remote_code_pinned_to_a_sha_really_runs_the_repos_code(profile, dirs, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    monkeypatch.setenv(REMOTE_CODE_MARKER_ENV, str(marker))
    settings = LoadSettings(trust_remote_code=True)
    plan = plan_for(profile, dirs["remote"], settings, revision=SHA)
    loaded = load_model(str(dirs["remote"]), plan, settings)

    assert loaded.report.trust_remote_code is True
    assert type(loaded.model).__name__ == "TinyRemoteForCausalLM" and loaded.model.loaded_by_remote_code is True
    assert marker.read_text().startswith("modeling_tiny.TinyRemoteForCausalLM ran")
    assert loaded.report.attn_implementation == "eager"  # planned for remote code: its own kernels are unknown
    assert torch.isfinite(logits_of(loaded)).all()


# --- weights format -------------------------------------------------------------------------


def test_pickle_only_snapshot_is_refused_unless_pickle_is_allowed_and_then_loads(profile, dirs):
    plan = plan_for(profile, dirs["pickle"])
    with pytest.raises(PickleRefused, match=r"--allow-pickle"):
        load_model(str(dirs["pickle"]), plan, LoadSettings())
    loaded = load_model(str(dirs["pickle"]), plan, LoadSettings(), allow_pickle=True)
    assert torch.isfinite(logits_of(loaded)).all()


def test_a_snapshot_with_safetensors_never_reads_its_pickle_copy(profile, dirs):
    # The pytorch_model.bin there is garbage: any attempt to unpickle it would fail the load.
    loaded = load_model(str(dirs["extras"]), plan_for(profile, dirs["extras"]), LoadSettings(), allow_pickle=True)
    assert torch.isfinite(logits_of(loaded)).all()


# --- pad token ------------------------------------------------------------------------------


def _assert_pad_wired(loaded) -> None:
    tok, model = loaded.tokenizer, loaded.model
    assert tok.pad_token == loaded.report.pad_token and tok.pad_token_id == loaded.report.pad_token_id
    assert tok.pad_token_id != tok.eos_token_id == EOS_ID
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id


def _assert_padding_changes_nothing(loaded) -> None:
    """A right-padded batch gives the short text the same logits as running it alone."""
    batch = loaded.tokenizer(BATCH, return_tensors="pt", padding=True)
    assert (batch["input_ids"] == loaded.tokenizer.pad_token_id).any()
    with torch.no_grad():
        padded = loaded.model(**batch).logits
    alone = logits_of(loaded, BATCH[0])
    n = alone.shape[1]
    assert torch.isfinite(padded).all()
    torch.testing.assert_close(padded[0, :n], alone[0], atol=1e-4, rtol=1e-4)


def test_a_tokenizer_without_pad_reuses_its_unk_token_so_pad_differs_from_eos_and_embeddings_stay(profile, dirs):
    loaded = load_model(str(dirs["llama"]), plan_for(profile, dirs["llama"]), LoadSettings())
    assert loaded.report.pad_token == "<unk>" and loaded.report.pad_token_strategy.startswith("unk:")
    assert not loaded.report.embeddings_resized and len(loaded.tokenizer) == loaded.model.config.vocab_size
    _assert_pad_wired(loaded)
    _assert_padding_changes_nothing(loaded)


def test_a_tokenizer_whose_unk_is_eos_gets_a_new_pad_token_and_embeddings_grown_with_mean_rows(profile, dirs):
    loaded = load_model(str(dirs["unk_is_eos"]), plan_for(profile, dirs["unk_is_eos"]), LoadSettings())
    report, model = loaded.report, loaded.model
    assert report.pad_token == NEW_PAD_TOKEN and report.pad_token_strategy.startswith("added:")
    assert report.embeddings_resized and "448 rows" in report.pad_token_strategy
    weight = model.get_input_embeddings().weight
    assert weight.shape[0] == 448 == model.config.vocab_size  # 385 tokens, rounded up to a multiple of 64
    torch.testing.assert_close(weight[report.pad_token_id], weight[:384].mean(dim=0))  # the 384 original rows
    _assert_pad_wired(loaded)
    _assert_padding_changes_nothing(loaded)


def test_a_pad_token_equal_to_eos_is_replaced_so_eos_is_never_masked_as_padding(profile, dirs):
    loaded = load_model(str(dirs["pad_is_eos"]), plan_for(profile, dirs["pad_is_eos"]), LoadSettings())
    assert loaded.report.pad_token == "<unk>" and "replaced the tokenizer's pad '</s>'" in loaded.report.pad_token_strategy
    _assert_pad_wired(loaded)


def test_a_token_the_vocabulary_reserves_for_padding_is_preferred_over_unk(dirs):
    tokenizer, _ = load_tokenizer(str(dirs["llama"]))
    tokenizer.pad_token = None
    tokenizer.add_tokens(["<pad>"], special_tokens=True)
    pad, why = choose_pad_token(tokenizer)
    assert pad == "<pad>" and why.startswith("reserved:")


# --- training readiness -----------------------------------------------------------------------


def test_gradient_checkpointing_with_lora_gives_gradients_to_lora_weights_only_and_recomputes_layers(profile, dirs):
    from lora_prep.tasks.lora import wrap as lora
    settings = LoadSettings(gradient_checkpointing=True)
    loaded = load_model(str(dirs["llama"]), plan_for(profile, dirs["llama"], settings), settings)
    assert loaded.report.gradient_checkpointing and loaded.model.is_activation_checkpointing
    assert loaded.model.config.use_cache is False

    # init_lora_weights=False: B starts non-zero too, so A gets a non-zero gradient on the first step
    # (with the default B = 0, dL/dA is exactly 0 until B moves).
    peft_model, _ = lora.wrap_lora(loaded.model, LoraSettings(r=4, init_lora_weights=False, dropout=0.0))
    peft_model.train()
    calls = []
    # transformers checkpoints a layer's forward (hooks on the layer itself stay outside the
    # checkpoint), so count calls of a module inside it: the recompute in backward enters it again.
    # A pre-hook, because torch stops the recompute early once the saved tensors are rebuilt.
    attention = next(m for name, m in peft_model.named_modules() if name.endswith("layers.0.self_attn"))
    attention.register_forward_pre_hook(lambda *_: calls.append(1))
    batch = loaded.tokenizer(BATCH, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    peft_model(**batch, labels=labels).loss.backward()

    assert len(calls) == 2  # forward, then recomputed in backward: checkpointing is on
    named = dict(peft_model.named_parameters())
    lora_params = {n: p for n, p in named.items() if "lora_" in n}
    assert lora_params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_params.values())
    assert all(p.grad is None for n, p in named.items() if n not in lora_params)


# --- quantization (loads on this CPU: tests/test_qlora.py) ----------------------------------------


def test_a_4bit_plan_on_a_machine_where_bitsandbytes_does_not_import_is_refused_naming_the_fix(profile, dirs, monkeypatch):
    # A plan made on another machine, loaded where bitsandbytes is broken (None in sys.modules: its import raises).
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    plan = plan_for(profile, dirs["llama"]).model_copy(update={"quantization": "4bit", "dtype": "bfloat16"})
    with pytest.raises(InvalidInput, match=r"needs bitsandbytes.*pip install bitsandbytes, or use quantization=none$"):
        load_model(str(dirs["llama"]), plan, LoadSettings())


def test_4bit_asks_transformers_for_nf4_with_double_quantization_computing_in_the_plan_dtype(profile, dirs):
    plan = plan_for(profile, dirs["llama"]).model_copy(update={"quantization": "4bit", "dtype": "bfloat16"})
    config = bnb_config(plan)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert bnb_config(plan.model_copy(update={"quantization": "8bit"})).load_in_8bit
    assert bnb_config(plan.model_copy(update={"quantization": "none"})) is None

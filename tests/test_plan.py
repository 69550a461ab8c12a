"""plan_load: every decision over synthetic machines, and every refusal with its message."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from lora_prep.tasks.errors import DoesNotFit, InvalidInput, RemoteCodeRefused
from lora_prep.tasks.model.facts import ModelFacts
from lora_prep.tasks.model.load_plan import parse_size, plan_load
from lora_prep.tasks.model.rules import weights_bytes
from lora_prep.tasks.records.machine import CudaDevice, HardwareProfile, KbitBackend, PackageCheck
from lora_prep.tasks.records.plan import LoadPlan
from lora_prep.tasks.settings import LoadSettings

GiB = 2**30
SHA = "0123456789abcdef0123456789abcdef01234567"
IMPORTABLE = PackageCheck(installed=True, importable=True, version="2.7.4")


def gpu(index, name, capability, total_gib, free_gib):
    major = int(capability.split(".")[0])
    return CudaDevice(
        index=index, name=name, capability=capability, total_memory_bytes=total_gib * GiB,
        free_memory_bytes=int(free_gib * GiB), bf16=major >= 8,
    )  # fmt: skip


def machine(gpus=(), mps=False, ram_gib=32, flash=PackageCheck(), bnb=PackageCheck()):
    return HardwareProfile(
        cpu_count=8, ram_total_bytes=64 * GiB, ram_available_bytes=ram_gib * GiB, disk_free_bytes=500 * GiB,
        cache_dir="/cache", torch_version="2.13.0", cuda_available=bool(gpus), cuda_devices=list(gpus),
        mps_available=mps, flash_attn=flash, bitsandbytes=bnb,
    )  # fmt: skip


CPU = machine()
A100 = machine([gpu(0, "NVIDIA A100-SXM4-80GB", "8.0", 80, 79)], flash=IMPORTABLE, bnb=IMPORTABLE)
T4 = machine([gpu(0, "Tesla T4", "7.5", 16, 15)], bnb=IMPORTABLE)
TWO_24GB = machine([gpu(0, "NVIDIA RTX A5000", "8.6", 24, 23), gpu(1, "NVIDIA RTX A5000", "8.6", 24, 23)])
MAC = machine(mps=True, ram_gib=12)


def model(params=500_000_000, stored="BF16", model_type="llama", sdpa=True, flash=True, auto_map=False, **kw):
    return ModelFacts(
        repo_id="org/model", commit_sha=SHA, architecture="LlamaForCausalLM", model_type=model_type,
        param_count=params, stored_dtypes={stored: params}, config_dtype="bfloat16", tie_word_embeddings=False,
        auto_map=auto_map, weight_bytes=params * 2, embedding_params=params // 10,
        supports_sdpa=sdpa, supports_flash_attn=flash, **kw,
    )  # fmt: skip


def plan(profile, facts=None, revision="main", **settings) -> LoadPlan:
    return plan_load(profile, facts or model(), LoadSettings(**settings), revision)


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# --- auto decisions per machine -------------------------------------------------


def test_cpu_only_machine_loads_in_float32_on_cpu_with_sdpa_and_says_why():
    p = plan(CPU)
    assert (p.dtype, p.device_map, p.target_device, p.attn_implementation) == ("float32", "cpu", "cpu", "sdpa")
    assert p.attn_fallbacks == ["eager"]
    assert p.fits and p.quantization == "none" and p.max_memory is None
    assert "BF16" in p.reasons["dtype"] and "upcast" in p.reasons["dtype"]
    assert "no CUDA or MPS" in p.reasons["placement"]
    assert {"dtype", "attn", "placement", "quantization", "fit", "trust_remote_code", "gradient_checkpointing"} <= set(p.reasons)


def test_cpu_estimate_is_params_times_four_bytes_plus_the_stated_margin():
    p = plan(CPU, model(params=1_000_000_000))
    assert p.estimate_bytes == 4_000_000_000
    assert p.overhead_bytes == 400_000_000 + 512 * 2**20  # 10% + 512 MiB
    assert p.available_bytes == 32 * GiB
    assert "10% + 512 MiB" in p.reasons["fit"]


def test_cpu_falls_back_to_bfloat16_when_float32_would_not_fit_in_ram():
    p = plan(machine(ram_gib=24), model(params=7_000_000_000))  # fp32 ~29 GiB with margin, bf16 ~15 GiB
    assert p.dtype == "bfloat16" and p.fits
    assert "float32 would need" in p.reasons["dtype"] and "24.00 GiB" in p.reasons["dtype"]


def test_a100_plans_bfloat16_flash_attention_on_cuda_0_with_sdpa_then_eager_as_fallbacks():
    p = plan(A100)
    assert (p.dtype, p.attn_implementation, p.device_map, p.target_device) == ("bfloat16", "flash_attention_2", "cuda:0", "cuda:0")
    assert p.attn_fallbacks == ["sdpa", "eager"]
    assert p.estimate_bytes == 1_000_000_000 and p.available_bytes == 79 * GiB
    assert "A100" in p.reasons["placement"]


def test_t4_plans_float16_and_sdpa_because_its_capability_is_below_8():
    p = plan(T4)
    assert (p.dtype, p.attn_implementation, p.target_device) == ("float16", "sdpa", "cuda:0")
    assert "7.5" in p.reasons["dtype"] and "7.5 < 8.0" in p.reasons["attn"]


def test_model_too_big_for_one_24gb_gpu_is_spread_over_both_with_per_gpu_budgets():
    p = plan(TWO_24GB, model(params=13_000_000_000))  # 26 GB of bf16 weights
    assert (p.device_map, p.target_device, p.dtype) == ("auto", "auto", "bfloat16")
    assert set(p.max_memory) == {"0", "1"}
    assert all(budget < 23 * GiB for budget in p.max_memory.values())  # margin left free on each GPU
    assert sum(p.max_memory.values()) >= p.estimate_bytes
    assert p.available_bytes == 46 * GiB
    assert "cuda:0, cuda:1" in p.reasons["placement"]


def test_model_that_fits_one_of_two_gpus_uses_cuda_0_only():
    p = plan(TWO_24GB, model(params=3_000_000_000))
    assert (p.device_map, p.target_device, p.max_memory) == ("cuda:0", "cuda:0", None)


def test_mac_plans_float16_on_mps():
    p = plan(MAC)
    assert (p.dtype, p.device_map, p.target_device, p.attn_implementation) == ("float16", "mps", "mps", "sdpa")
    assert p.available_bytes == 12 * GiB


def test_model_without_sdpa_support_gets_eager_with_no_fallback():
    p = plan(CPU, model(model_type="gpt_neo", sdpa=False))
    assert p.attn_implementation == "eager" and p.attn_fallbacks == []


def test_unknown_sdpa_support_falls_back_to_the_table_of_model_types_without_sdpa():
    assert plan(CPU, model(model_type="bloom", sdpa=None)).attn_implementation == "eager"
    assert plan(CPU, model(model_type="qwen2", sdpa=None)).attn_implementation == "sdpa"


def test_explicit_choices_are_kept_and_get_no_fallbacks():
    p = plan(A100, dtype="float16", attn_implementation="sdpa", device_map="cuda:0")
    assert (p.dtype, p.attn_implementation, p.attn_fallbacks) == ("float16", "sdpa", [])
    assert "set by load.dtype" in p.reasons["dtype"] and "set by load.device_map" in p.reasons["placement"]


def test_gradient_checkpointing_is_recorded_with_a_reason():
    p = plan(CPU, gradient_checkpointing=True)
    assert p.gradient_checkpointing and "recompute activations" in p.reasons["gradient_checkpointing"]


def test_plan_round_trips_through_json():
    p = plan(TWO_24GB, model(params=13_000_000_000))
    assert LoadPlan.model_validate_json(p.model_dump_json()) == p


# --- quantization ---------------------------------------------------------------


def test_4bit_on_cuda_costs_about_0_56_bytes_per_weight_with_embeddings_kept_in_bf16():
    facts = model(params=1_000_000_000)
    p = plan(A100, facts, quantization="4bit")
    assert p.quantization == "4bit"
    assert p.estimate_bytes == 900_000_000 * 0.5625 + 100_000_000 * 2
    assert weights_bytes(facts, "bfloat16", "8bit") == 900_000_000 + 100_000_000 * 2


def _kbit(machine_profile, *backends):
    return machine_profile.model_copy(update={"bitsandbytes": IMPORTABLE, "kbit": list(backends)})


def test_4bit_on_a_cpu_where_bitsandbytes_runs_it_is_planned_on_the_cpu_in_bfloat16():
    p = plan(_kbit(CPU, KbitBackend(device="cpu", four_bit=True, eight_bit=True)), quantization="4bit")
    assert (p.quantization, p.device_map, p.dtype) == ("4bit", "cpu", "bfloat16")
    assert "on cpu" in p.reasons["quantization"] and "fused expert parameters stay in the compute dtype" in p.reasons["quantization"]


def test_kbit_where_bitsandbytes_cannot_run_it_is_refused_with_bitsandbytes_own_reason():
    no_8bit = _kbit(CPU, KbitBackend(device="cpu", four_bit=True, eight_bit=False, reason="8bit: NotImplementedError: no int8 kernel"))
    with pytest.raises(InvalidInput) as err:
        plan(no_8bit, quantization="8bit")
    msg = str(err.value)
    assert "load.quantization='8bit'" in msg and "on cpu" in msg and "no int8 kernel" in msg and err.value.exit_code == 2
    with pytest.raises(InvalidInput, match="pip install bitsandbytes"):
        plan(CPU, quantization="4bit")  # not installed at all


def test_quantization_with_a_broken_bitsandbytes_names_its_import_error():
    broken = PackageCheck(installed=True, importable=False, version="0.45.0", error="OSError: libcudart.so.12: cannot open")
    why = "bitsandbytes does not import (OSError: libcudart.so.12: cannot open)"
    profile = machine([gpu(0, "NVIDIA L4", "8.9", 24, 22)], bnb=broken).model_copy(update={"kbit": [
        KbitBackend(device=d, four_bit=False, eight_bit=False, reason=why) for d in ("cpu", "cuda")]})
    with pytest.raises(InvalidInput, match="libcudart.so.12"):
        plan(profile, quantization="8bit")


def test_kbit_offloading_to_cpu_beside_a_gpu_is_refused_as_transformers_would():
    profile = _kbit(machine([gpu(0, "NVIDIA L4", "8.9", 24, 22)]), KbitBackend(device="cpu", four_bit=True, eight_bit=True),
                    KbitBackend(device="cuda", four_bit=True, eight_bit=True))
    with pytest.raises(InvalidInput, match="cannot offload to cpu"):
        plan(profile, quantization="4bit", device_map={"model.embed_tokens": 0, "lm_head": "cpu"})


# --- explicit settings that cannot work ----------------------------------------


def test_flash_attention_on_cpu_is_refused_with_every_reason():
    with pytest.raises(InvalidInput) as err:
        plan(CPU, attn_implementation="flash_attention_2")
    msg = str(err.value)
    assert "load.attn_implementation='flash_attention_2'" in msg
    assert "needs a CUDA GPU and the model is placed on cpu" in msg and "not installed" in msg and "float32" in msg


def test_flash_attention_on_a_t4_names_the_capability():
    with pytest.raises(InvalidInput, match=r"cuda:0 \(Tesla T4\) has compute capability 7.5 < 8.0"):
        plan(T4, attn_implementation="flash_attention_2")


def test_flash_attention_with_float32_is_refused_even_on_an_a100():
    with pytest.raises(InvalidInput, match="needs float16 or bfloat16 and the dtype is float32"):
        plan(A100, attn_implementation="flash_attention_2", dtype="float32")


def test_sdpa_for_a_model_without_sdpa_support_is_refused():
    with pytest.raises(InvalidInput, match="does not support sdpa"):
        plan(CPU, model(model_type="gpt_neo", sdpa=False), attn_implementation="sdpa")


def test_bfloat16_on_a_t4_is_refused():
    with pytest.raises(InvalidInput, match=r"load.dtype='bfloat16' but cuda:0 \(Tesla T4\) has compute capability 7.5"):
        plan(T4, dtype="bfloat16")


@pytest.mark.parametrize(
    "profile, device_map, expected",
    [
        (CPU, "cuda", "load.device_map='cuda' but this machine has no CUDA device"),
        (TWO_24GB, "cuda:2", "load.device_map='cuda:2' but this machine has 2 CUDA device(s) (cuda:0..cuda:1)"),
        (CPU, "mps", "load.device_map='mps' but MPS is not available"),
        (TWO_24GB, {"model": 3}, "load.device_map['model']=3 but this machine has 2 CUDA device(s)"),
        (CPU, {"model": "cuda:0"}, "load.device_map['model']='cuda:0' but this machine has no CUDA device"),
    ],
)
def test_device_map_naming_a_missing_device_is_refused(profile, device_map, expected):
    with pytest.raises(InvalidInput) as err:
        plan(profile, device_map=device_map)
    assert expected in str(err.value)


def test_a_valid_module_map_is_passed_through_with_the_user_max_memory():
    p = plan(TWO_24GB, device_map={"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}, max_memory={"0": "10GiB"})
    assert p.device_map == {"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cpu"}
    assert p.target_device == "auto" and p.max_memory == {"0": 10 * GiB}
    assert p.available_bytes == 10 * GiB + 23 * GiB + 32 * GiB


def test_several_invalid_settings_are_reported_together_one_line_each():
    with pytest.raises(InvalidInput) as err:
        plan(CPU, device_map="cuda", quantization="4bit", attn_implementation="flash_attention_2")
    problems = err.value.context["problems"]
    assert len(problems) == 3
    assert str(err.value) == "; ".join(problems)
    assert "\n" not in str(err.value)


# --- remote code ------------------------------------------------------------------


REMOTE = {"AutoConfig": "modeling.MyConfig", "AutoModelForCausalLM": "modeling.MyModel"}


def test_remote_code_without_trust_is_refused_naming_the_option():
    with pytest.raises(RemoteCodeRefused) as err:
        plan(CPU, model(auto_map=REMOTE, sdpa=None, flash=None))
    msg = str(err.value)
    assert "--trust-remote-code" in msg and "load.trust_remote_code" in msg and f"--revision {SHA}" in msg
    assert err.value.exit_code == 2


def test_trusted_remote_code_with_a_branch_revision_is_refused_until_pinned_to_a_sha():
    with pytest.raises(RemoteCodeRefused, match=f"--revision is 'main': pin the code you read with --revision {SHA}"):
        plan(CPU, model(auto_map=REMOTE, sdpa=None, flash=None), revision="main", trust_remote_code=True)


def test_trusted_pinned_remote_code_is_planned_with_eager_attention():
    p = plan(A100, model(auto_map=REMOTE, sdpa=None, flash=None), revision=SHA, trust_remote_code=True)
    assert p.trust_remote_code and p.attn_implementation == "eager"
    assert SHA in p.reasons["trust_remote_code"]


def test_trust_remote_code_for_a_model_without_code_is_left_off():
    p = plan(CPU, trust_remote_code=True)
    assert not p.trust_remote_code and "not needed" in p.reasons["trust_remote_code"]


def test_remote_code_refusal_and_invalid_settings_are_reported_together_as_a_refusal():
    with pytest.raises(RemoteCodeRefused) as err:
        plan(CPU, model(auto_map=REMOTE, sdpa=None, flash=None), device_map="cuda")
    assert len(err.value.context["problems"]) == 2 and "device_map='cuda'" in str(err.value)


# --- the fit check ------------------------------------------------------------------


def test_model_too_big_for_the_gpu_is_refused_with_needed_and_available_and_options():
    facts = model(params=70_000_000_000)
    with pytest.raises(DoesNotFit) as err:
        plan(A100, facts)
    msg = str(err.value)
    weights = 140_000_000_000
    assert f"needs {gib(weights * 1.1 + 512 * 2**20)}" in msg and gib(weights) in msg
    assert "cuda:0 has 79.00 GiB available" in msg
    assert "quantization=4bit (" in msg and "machine with more memory" in msg
    assert err.value.context["needed_bytes"] > err.value.context["available_bytes"]


def test_too_big_even_for_both_gpus_reports_their_sum():
    with pytest.raises(DoesNotFit, match=r"but cuda:0, cuda:1 together have 46.00 GiB available"):
        plan(TWO_24GB, model(params=30_000_000_000))


def test_too_big_for_an_explicit_gpu_suggests_device_map_auto_over_all_gpus():
    with pytest.raises(DoesNotFit, match=r"device_map=auto across all 2 GPUs \(46.00 GiB available\)"):
        plan(TWO_24GB, model(params=13_000_000_000), device_map="cuda:0")


def test_user_max_memory_caps_the_cpu_budget_and_is_named_in_the_refusal():
    with pytest.raises(DoesNotFit) as err:
        plan(CPU, model(params=1_000_000), max_memory={"cpu": "1MB"})
    msg = str(err.value)
    assert "cpu has 0.95 MiB available" in msg and "raise load.max_memory for cpu" in msg
    assert "dtype=bfloat16" not in msg  # not offered: it would not fit either


def test_model_too_big_for_a_cpu_machine_suggests_bfloat16_and_a_cuda_machine_with_4bit():
    with pytest.raises(DoesNotFit) as err:
        plan(machine(ram_gib=16), model(params=7_000_000_000), dtype="float32")
    msg = str(err.value)
    assert "cpu has 16.00 GiB available" in msg
    assert "dtype=bfloat16 (" in msg and "quantization=4bit (" in msg and "bitsandbytes is not installed" in msg


def test_user_max_memory_below_free_gpu_memory_limits_the_fit():
    p = plan(A100, max_memory={"0": "10GiB"})
    assert p.available_bytes == 10 * GiB
    with pytest.raises(DoesNotFit, match="cuda:0 has 10.00 GiB available"):
        plan(A100, model(params=7_000_000_000), max_memory={"0": "10GiB"})


def test_dry_run_returns_a_plan_marked_not_fitting_instead_of_raising():
    facts = model(params=70_000_000_000)
    p = plan_load(A100, facts, LoadSettings(), "main", enforce_fit=False)
    assert not p.fits and p.reasons["fit"].startswith("does not fit: org/model needs")


# --- model facts -------------------------------------------------------------------


def test_pickle_only_model_params_are_estimated_from_bytes_and_the_config_dtype():
    fp32 = ModelFacts(repo_id="o/m", commit_sha=SHA, param_count=None, weight_bytes=4_000_000_000)
    fp16 = ModelFacts(repo_id="o/m", commit_sha=SHA, param_count=None, weight_bytes=4_000_000_000, config_dtype="float16")
    assert (fp32.param_count, fp32.param_count_estimated) == (1_000_000_000, True)
    assert fp16.param_count == 2_000_000_000


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16",
    "vocab_size": 32000, "hidden_size": 2048, "tie_word_embeddings": False,
}  # fmt: skip


def test_from_config_reads_architecture_dtype_embeddings_and_transformers_attention_flags():
    facts = ModelFacts.from_config("o/llama", SHA, LLAMA_CONFIG, 1_100_000_000, {"BF16": 1_100_000_000}, 2_200_000_000)
    assert (facts.architecture, facts.model_type, facts.config_dtype) == ("LlamaForCausalLM", "llama", "bfloat16")
    assert facts.embedding_params == 32000 * 2048 * 2  # untied: input embeddings and lm_head
    assert (facts.supports_sdpa, facts.supports_flash_attn) == (True, True)
    assert not facts.remote_code and facts.main_stored_dtype == "BF16"

    gpt_neo = {"architectures": ["GPTNeoForCausalLM"], "model_type": "gpt_neo", "torch_dtype": "float32"}
    neo = ModelFacts.from_config("o/neo", SHA, gpt_neo, 1000, {"F32": 1000}, 4000)
    assert neo.supports_sdpa is False and neo.config_dtype == "float32"


def test_from_config_does_not_trust_transformers_flags_for_remote_code():
    config = {**LLAMA_CONFIG, "auto_map": REMOTE}
    facts = ModelFacts.from_config("o/remote", SHA, config, 1000, {"BF16": 1000}, 2000)
    assert facts.remote_code and (facts.supports_sdpa, facts.supports_flash_attn) == (None, None)


def test_from_repo_facts_takes_what_the_resolve_stage_read():
    repo = SimpleNamespace(
        repo_id="o/llama", commit_sha=SHA, config=LLAMA_CONFIG, param_count=None, stored_dtypes={}, weight_bytes=8000,
        source="hub", code_digest=None,
    )  # fmt: skip
    facts = ModelFacts.from_repo_facts(repo, look_up_attention=False)
    assert (facts.repo_id, facts.weight_bytes, facts.param_count, facts.param_count_estimated) == ("o/llama", 8000, 4000, True)


def test_sizes_parse_decimal_and_binary_units_like_accelerate():
    assert parse_size("1MB") == 1_000_000 and parse_size("1MiB") == 2**20
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("512 B") == 512


def test_plan_task_is_a_prefect_task_that_plans_from_repo_facts():
    pytest.importorskip("prefect")
    from prefect.cache_policies import NO_CACHE

    from lora_prep.tasks.model.load_plan import plan_for_repo
    from lora_prep.tasks.plan import plan, plan_prepare

    assert plan.name == "plan" and plan.cache_policy == NO_CACHE and plan.retries == 0
    assert plan.fn is plan_prepare
    repo = SimpleNamespace(
        repo_id="o/llama", commit_sha=SHA, config=LLAMA_CONFIG, param_count=1000, stored_dtypes={"BF16": 1000},
        weight_bytes=2000, source="hub", code_digest=None,
    )  # fmt: skip
    assert plan_for_repo(A100, repo, LoadSettings(), "main").target_device == "cuda:0"

"""On a real CUDA machine: the probe sees the GPUs as torch does, and the plan it feeds works.

Run by bench/gpu_check.sh on a GPU machine (which may lack prefect and mlflow);
skipped everywhere else.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lora_prep.tasks.machine.hardware import probe_hardware  # noqa: E402
from lora_prep.tasks.model.facts import ModelFacts  # noqa: E402
from lora_prep.tasks.model.load_plan import plan_load  # noqa: E402
from lora_prep.tasks.settings import LoadSettings  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
SHA = "0123456789abcdef0123456789abcdef01234567"
# A tiny llama: 2 layers, hidden 64, so building it on the GPU takes milliseconds.
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "dtype": "bfloat16", "vocab_size": 256,
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False,
}  # fmt: skip


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    return probe_hardware(cache_dir=str(tmp_path_factory.mktemp("hub")))


def test_probe_sees_every_cuda_device_with_capability_bf16_and_memory(profile):
    assert profile.cuda_available
    assert [d.index for d in profile.cuda_devices] == list(range(torch.cuda.device_count()))
    for d in profile.cuda_devices:
        major, minor = torch.cuda.get_device_capability(d.index)
        assert d.capability == f"{major}.{minor}"
        assert d.name == torch.cuda.get_device_name(d.index)
        assert d.bf16 == (major >= 8)
        assert 0 < d.free_memory_bytes <= d.total_memory_bytes
    assert set(profile.accelerate_max_memory) >= {str(d.index) for d in profile.cuda_devices}


def test_probe_measures_free_memory_now_not_once(profile):
    before = probe_hardware(cache_dir=profile.cache_dir).cuda_devices[0].free_memory_bytes
    block = torch.empty(2**30, dtype=torch.uint8, device="cuda:0")  # 1 GiB
    after = probe_hardware(cache_dir=profile.cache_dir).cuda_devices[0].free_memory_bytes
    del block
    torch.cuda.empty_cache()
    assert before - after >= 0.9 * 2**30


def test_plan_for_a_small_model_picks_a_16_bit_dtype_on_cuda_0_and_it_runs(profile):
    from transformers import AutoModelForCausalLM, LlamaConfig

    facts = ModelFacts.from_config("tiny/llama", SHA, TINY_LLAMA, 100_000, {"BF16": 100_000}, 200_000)
    plan = plan_load(profile, facts, LoadSettings(), "main")
    expected = "bfloat16" if profile.cuda_devices[0].bf16 else "float16"
    assert (plan.dtype, plan.device_map, plan.target_device, plan.fits) == (expected, "cuda:0", "cuda:0", True)
    assert plan.attn_implementation == ("flash_attention_2" if profile.flash_attn.importable else "sdpa")

    # The planned dtype and attention work with transformers on this GPU (random weights: no download).
    config = LlamaConfig(**{k: v for k, v in TINY_LLAMA.items() if k not in ("architectures", "model_type")})
    model = AutoModelForCausalLM.from_config(
        config, dtype=getattr(torch, plan.dtype), attn_implementation=plan.attn_implementation
    ).to(plan.target_device)
    logits = model(torch.arange(16, device=plan.target_device)[None]).logits
    assert logits.dtype == getattr(torch, plan.dtype) and logits.device.type == "cuda"
    assert torch.isfinite(logits).all()

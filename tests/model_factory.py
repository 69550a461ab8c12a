"""Tiny random causal LMs for the test bed, built locally in seconds.

Nothing is downloaded: configs are written here, weights are drawn from a
fixed seed, and the tokenizer is a byte-level BPE trained on the built-in
text below. The same arguments give the same bytes in every session, so
published commits (and their shas) are stable.

Architectures differ where LoRA target resolution differs:

    llama     q/k/v/o_proj + gate/up/down_proj (nn.Linear), GQA so k/v are narrower than q
    gpt2      Conv1D c_attn/c_proj/c_fc, lm_head tied to wte
    phi3      fused qkv_proj and gate_up_proj; weights stored in bfloat16
    gpt_neox  fused query_key_value, dense_h_to_4h/dense_4h_to_h; config uses the legacy
              "torch_dtype" key (older Hub repos) instead of transformers 5's "dtype"

EXTRA_ARCHS, transformers 5's mixture-of-experts and state-space models. Fused experts are 3-D
nn.Parameters, not nn.Linear: target_modules never wraps them, only target_parameters reaches
them (see expert_params). In the checkpoint save_pretrained writes them back per expert, as Hub
repos hold them (except gpt_oss); loading fuses them again.

    qwen3_moe    mlp.experts.gate_up_proj (E, 2*I, H) / down_proj (E, H, I); router mlp.gate, a plain Module
    mixtral      the same fused layout; on disk block_sparse_moe.experts.N.w1/w2/w3 and block_sparse_moe.gate
    granitemoe   fused block_sparse_moe.experts; router block_sparse_moe.router
    gpt_oss      fused experts transposed, x @ W: gate_up_proj (E, H, 2*I) gate/up interleaved, down_proj
                 (E, I, H), plus *_bias; biased q/k/v/o_proj; attention sinks; router mlp.router
    phimoe       router mlp.router subclasses nn.Linear but returns a tuple: "all-linear" wraps it and the
                 forward pass breaks
    deepseek_v3  MLA attention q_a_proj/q_b_proj/kv_a_proj_with_mqa/kv_b_proj; layer 0 dense MLP
                 (gate/up/down_proj), layer 1 MoE: fused experts, router mlp.gate, shared_experts MLP
    mamba        no attention: mixer.in_proj/x_proj/dt_proj/out_proj + conv1d; PEFT refuses LoRA on
                 out_proj and conv1d for this model_type, so "all-linear" fails
    mamba2       mixer.in_proj/out_proj + conv1d; the same PEFT refusal
    jamba        layer 0 mamba mixer + dense MLP, layer 1 attention + MoE (router feed_forward.router);
                 PEFT does not refuse jamba's mamba.out_proj

``build_test_repos(store)`` publishes the standard repos (names below are
fixed; other tests refer to them) with ``tests.hubserver.publish``.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

ARCHS = ("llama", "gpt2", "phi3", "gpt_neox")
# Kept out of ARCHS: tests parametrize over ARCHS with per-arch tables (dtype, linear layers)
# that these would not be in.
MOE_ARCHS = ("qwen3_moe", "mixtral", "granitemoe", "gpt_oss", "phimoe", "deepseek_v3", "jamba")
SSM_ARCHS = ("mamba", "mamba2", "jamba")  # jamba is both: a hybrid
EXTRA_ARCHS = ("qwen3_moe", "mixtral", "granitemoe", "gpt_oss", "phimoe", "deepseek_v3", "mamba", "mamba2", "jamba")
ALL_ARCHS = ARCHS + EXTRA_ARCHS

# Token ids fixed by the order of special tokens given to the BPE trainer.
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
# 256 byte-level symbols + 3 specials + ~125 merges: small enough that the
# embedding stays a few KB, large enough that common words are one token.
VOCAB_SIZE = 384

# Tiny shapes: 2 layers, hidden 32 -> about 43k parameters, ~170 KB in float32.
HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, MAX_POSITIONS = 32, 64, 2, 4, 2, 128
# MoE: 4 experts, 2 per token; experts of qwen3_moe/deepseek_v3 are 16 wide (their own
# moe_intermediate_size). The biggest, gpt_oss, has ~82k parameters (~330 KB in float32).
EXPERTS, TOP_K, MOE_INTERMEDIATE = 4, 2, 16
# Mamba: SSM state 4 per channel, inner width 2 * HIDDEN, causal conv over 2 tokens.
SSM_STATE, SSM_EXPAND, SSM_CONV = 4, 2, 2

REMOTE_CODE_MARKER_ENV = "LORA_PREP_TEST_REMOTE_CODE_MARKER"

_TEXT = """
The model is a tiny language model made for tests. It knows a few hundred words
and nothing else. A test asks the hub for a model, the hub answers with files,
and the files become weights, a config and a tokenizer. Every number here is
drawn from a fixed seed so that the same bytes come back in every session.
Adapters are small matrices added next to the large ones; only the small ones
learn. The rank of an adapter is its width, and alpha scales its update.
Attention mixes tokens with queries, keys and values; the feed forward block
widens each token, applies a gate and narrows it again. Embeddings turn token
ids into vectors and the output head turns vectors back into scores over the
vocabulary. A branch moves when a new commit lands; a tag stays where it was put;
a commit sha never changes. Caches keep files so that the second download costs
nothing. When the network fails, a retry waits and tries again; when a repo is
gated, waiting does not help and the user must ask for access. Pickle files can
run code when they are loaded, so safetensors are preferred. Remote code runs
only when the user trusts it and pins the revision to a full commit sha.
One two three four five six seven eight nine ten eleven twelve thirteen twenty.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday. January February March
April May June July August September October November December. Red green blue
yellow black white orange purple brown grey. North south east west up down left
right inside outside before after above below between under over through across.
The quick brown fox jumps over the lazy dog while the cat sleeps in the sun.
Water runs down the hill to the river and the river runs to the sea. Trees grow
slowly; grass grows fast; stones do not grow at all. People read books, write
letters, cook dinner, walk home, sing songs, and sleep at night. Numbers such as
0 1 2 3 4 5 6 7 8 9 10 100 1000 appear in logs, in sizes and in counts of bytes.
"""


# --- tokenizer ---------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """Train the byte-level BPE once per process; the JSON is reused for every repo."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Line order fixed: BPE merges (and so the vocab) depend only on this text.
    tok.train_from_iterator([line for line in _TEXT.splitlines() if line.strip()], trainer=trainer)
    # Llama-style: a BOS in front of every sequence, no EOS (training code appends it).
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)])
    assert tok.token_to_id(UNK) == UNK_ID and tok.token_to_id(BOS) == BOS_ID and tok.token_to_id(EOS) == EOS_ID
    return tok.to_str()


def save_tokenizer(out: Path) -> None:
    """Write tokenizer files loadable by AutoTokenizer: eos, bos and unk set, deliberately NO pad token."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=MAX_POSITIONS,
    )
    fast.save_pretrained(str(out))


# --- configs -------------------------------------------------------------------


def _config(arch: str, dtype: torch.dtype):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, Phi3Config

    ids = dict(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None, vocab_size=VOCAB_SIZE)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            **ids,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=HIDDEN, n_inner=INTERMEDIATE, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POSITIONS, **ids)
    elif arch == "phi3":
        cfg = Phi3Config(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            num_key_value_heads=KV_HEADS,
            max_position_embeddings=MAX_POSITIONS,
            original_max_position_embeddings=MAX_POSITIONS,
            **ids,
        )
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            hidden_size=HIDDEN,
            intermediate_size=INTERMEDIATE,
            num_hidden_layers=LAYERS,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            **ids,
        )
    elif arch in _EXTRA_CONFIGS:
        from transformers import AutoConfig

        cfg = AutoConfig.for_model(arch, **_EXTRA_CONFIGS[arch], **ids)
    else:
        raise ValueError(f"unknown arch {arch!r}; use one of {', '.join(ALL_ARCHS)}.")
    cfg.dtype = dtype
    return cfg


_ATTENTION = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    num_key_value_heads=KV_HEADS,
    max_position_embeddings=MAX_POSITIONS,
)
_MOE = dict(num_local_experts=EXPERTS, num_experts_per_tok=TOP_K)
_MAMBA = dict(
    hidden_size=HIDDEN,
    num_hidden_layers=LAYERS,
    state_size=SSM_STATE,
    expand=SSM_EXPAND,
    conv_kernel=SSM_CONV,
)
_HEAD_DIM = HIDDEN // HEADS

_EXTRA_CONFIGS: dict[str, dict] = {
    "qwen3_moe": dict(
        _ATTENTION,
        head_dim=_HEAD_DIM,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        moe_intermediate_size=MOE_INTERMEDIATE,
        decoder_sparse_step=1,  # every layer MoE
    ),
    "mixtral": dict(_ATTENTION, **_MOE),
    "granitemoe": dict(_ATTENTION, **_MOE),
    "gpt_oss": dict(
        _ATTENTION,
        **_MOE,
        head_dim=_HEAD_DIM,
        layer_types=["sliding_attention", "full_attention"],
        # The default YaRN (factor 32 over 4096 original positions) contradicts 128 positions and
        # warns at every load; factor 2 over 64 is consistent and keeps the YaRN code path.
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 150000.0,
            "factor": MAX_POSITIONS / 64,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "truncate": False,
        },
    ),
    "phimoe": dict(_ATTENTION, **_MOE),
    "deepseek_v3": dict(
        _ATTENTION,
        moe_intermediate_size=MOE_INTERMEDIATE,
        n_routed_experts=EXPERTS,
        n_shared_experts=1,
        num_experts_per_tok=TOP_K,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,  # layer 0 dense MLP, layer 1 MoE
        # MLA: q and kv pass 16-wide low-rank bottlenecks; q/k heads = 4 rotary + 4 plain dims.
        q_lora_rank=16,
        kv_lora_rank=16,
        qk_rope_head_dim=4,
        qk_nope_head_dim=4,
        v_head_dim=_HEAD_DIM,
    ),
    "mamba": dict(_MAMBA),
    "mamba2": dict(_MAMBA, num_heads=8, head_dim=8, n_groups=1),  # 8 heads * 8 = SSM_EXPAND * HIDDEN
    "jamba": dict(
        _ATTENTION,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        attn_layer_period=2,
        attn_layer_offset=1,  # layer 0 mamba, layer 1 attention
        expert_layer_period=2,
        expert_layer_offset=1,  # layer 0 dense MLP, layer 1 MoE
        mamba_d_state=SSM_STATE,
        mamba_d_conv=SSM_CONV,
        mamba_expand=SSM_EXPAND,
        mamba_dt_rank=4,
    ),
}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in table:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(table)}.")
    return table[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- LoRA-relevant structure ------------------------------------------------------------


@functools.cache
def _moe_structure(arch: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(fused expert parameters, routers) read off ``arch``'s module tree, built on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_config(arch, torch.float32))
    modules = dict(model.named_modules())
    # 3-D parameters of transformers' own modules; torch.nn's (mamba's Conv1d weight) are ordinary layers.
    fused = tuple(
        f"{name}.{param_name}"
        for name, module in modules.items()
        if not type(module).__module__.startswith("torch.")
        for param_name, param in module.named_parameters(recurse=False)
        if param.ndim == 3
    )
    gates = tuple(
        name for name in modules if name.rpartition(".")[2] in ("gate", "router") and f"{name.rpartition('.')[0]}.experts" in modules
    )
    return fused, gates


def expert_params(arch: str) -> list[str]:
    """Full names of ``arch``'s fused 3-D expert parameters ([] if none),
    e.g. "model.layers.0.mlp.experts.gate_up_proj"."""
    return list(_moe_structure(arch)[0])


def routers(arch: str) -> list[str]:
    """Full module names of ``arch``'s MoE routers (the gate/router next to an experts module); [] if none."""
    return list(_moe_structure(arch)[1])


# --- remote code -------------------------------------------------------------------

_CONFIGURATION_TINY = """\
from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tiny-remote"
"""

# Proof that the repo's code ran: an attribute on the model, and a marker file
# when the test sets LORA_PREP_TEST_REMOTE_CODE_MARKER to a path.
_MODELING_TINY = f'''\
import os
from pathlib import Path

from transformers import LlamaForCausalLM

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig

    def __init__(self, config):
        super().__init__(config)
        self.loaded_by_remote_code = True
        marker = os.environ.get("{REMOTE_CODE_MARKER_ENV}")
        if marker:
            Path(marker).write_text("modeling_tiny.TinyRemoteForCausalLM ran\\n")
'''


def _add_remote_code(out: Path) -> None:
    (out / "configuration_tiny.py").write_text(_CONFIGURATION_TINY)
    (out / "modeling_tiny.py").write_text(_MODELING_TINY)
    cfg = json.loads((out / "config.json").read_text())
    # An unknown model_type: transformers cannot fall back to its own Llama
    # class, so loading without trust_remote_code must refuse.
    cfg["model_type"] = "tiny-remote"
    cfg["architectures"] = ["TinyRemoteForCausalLM"]
    cfg["auto_map"] = {
        "AutoConfig": "configuration_tiny.TinyRemoteConfig",
        "AutoModelForCausalLM": "modeling_tiny.TinyRemoteForCausalLM",
    }
    _write_json(out / "config.json", cfg)


# --- extras (files a downloader must skip) ---------------------------------------


def _add_extras(model, out: Path) -> None:
    """Duplicate weights as real repos ship them: a pickle copy and Meta's original checkpoint."""
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, out / "pytorch_model.bin")
    original = out / "original"
    original.mkdir(exist_ok=True)
    torch.save(state, original / "consolidated.00.pth")
    cfg = model.config
    params = {
        "dim": cfg.hidden_size,
        "n_layers": cfg.num_hidden_layers,
        "n_heads": cfg.num_attention_heads,
        "n_kv_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "vocab_size": cfg.vocab_size,
        "norm_eps": getattr(cfg, "rms_norm_eps", 1e-5),
    }
    _write_json(original / "params.json", params)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _shard(model, out: Path, shards: int) -> None:
    """save_pretrained into exactly ``shards`` safetensors files (with model.safetensors.index.json)."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # Greedy packing can need a slightly larger limit than total/shards; widen 5% at a time.
    for step in range(20):
        limit = math.ceil(total / shards * (1 + 0.05 * step))
        for f in out.glob("model*.safetensors*"):
            f.unlink()
        model.save_pretrained(str(out), max_shard_size=limit)
        if len(list(out.glob("model-*-of-*.safetensors"))) == shards:
            return
    raise ValueError(f"could not split {total} bytes into {shards} shards; use fewer shards.")


# --- public builders -----------------------------------------------------------------


def build_model_dir(
    arch: str,
    out: Path,
    *,
    seed: int = 0,
    shards: int = 1,
    extras: bool = False,
    pickle_only: bool = False,
    remote_code: bool = False,
    dtype: str | torch.dtype = "float32",
) -> Path:
    """Write a tiny random ``arch`` causal LM with tokenizer and generation config into ``out``.

    seed: weights seed (same seed -> same bytes). shards > 1: sharded safetensors
    with an index. extras: also pytorch_model.bin and original/ (duplicates).
    pickle_only: weights only as pytorch_model.bin. remote_code (llama only):
    config auto_map -> modeling_tiny.py in the repo. dtype: stored weights dtype.
    """
    from transformers import AutoModelForCausalLM, GenerationConfig

    if remote_code and arch != "llama":
        raise ValueError(f"remote_code builds on llama only, got arch {arch!r}; use arch='llama'.")
    if pickle_only and (shards > 1 or extras):
        raise ValueError("pickle_only writes one pytorch_model.bin; drop shards/extras.")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch_dtype = _torch_dtype(dtype)

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, torch_dtype)).to(torch_dtype)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID)

    if pickle_only:
        model.config.save_pretrained(str(out))
        model.generation_config.save_pretrained(str(out))
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out / "pytorch_model.bin")
    elif shards > 1:
        _shard(model, out, shards)
    else:
        model.save_pretrained(str(out))
    save_tokenizer(out)
    if extras:
        _add_extras(model, out)
    if remote_code:
        _add_remote_code(out)
    if arch == "gpt_neox":
        cfg = json.loads((out / "config.json").read_text())
        cfg["torch_dtype"] = cfg.pop("dtype", _dtype_name(torch_dtype))
        _write_json(out / "config.json", cfg)
    return out


# For k-bit loads: bitsandbytes' CPU kernels want layers at least one 64-weight block wide.
_WIDE = {
    "llama": dict(num_hidden_layers=2),
    "qwen3_moe": dict(num_hidden_layers=2, num_experts=EXPERTS, num_experts_per_tok=TOP_K, decoder_sparse_step=1),
    "jamba": dict(
        num_hidden_layers=2,
        num_experts=EXPERTS,
        num_experts_per_tok=TOP_K,
        attn_layer_period=2,
        attn_layer_offset=1,
        # dt_rank 64 and state 16: x_proj's 64 + 2 * 16 = 96 rows and dt_proj's 64 columns suit bitsandbytes' CPU
        # inference packing (rows in 32s, columns in 64s), as real Jamba sizes do.
        expert_layer_period=2,
        expert_layer_offset=1,
        mamba_d_state=16,
        mamba_d_conv=SSM_CONV,
        mamba_expand=SSM_EXPAND,
        mamba_dt_rank=64,
    ),
}


def build_wide_model_dir(arch: str, out: Path, *, width: int = 128, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """A tiny ``arch`` (llama, qwen3_moe, jamba) ``width`` wide, with the test tokenizer: for 4/8-bit loads,
    whose kernels want layers at least one 64-weight block wide (the standard repos are 32 wide)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    if arch not in _WIDE:
        raise ValueError(f"no wide variant of {arch!r}; use one of {', '.join(_WIDE)}.")
    heads = 4
    sizes = dict(
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        vocab_size=VOCAB_SIZE,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    if arch == "qwen3_moe":
        sizes.update(head_dim=width // heads, moe_intermediate_size=width // 2)
    torch_dtype = _torch_dtype(dtype)
    cfg = AutoConfig.for_model(arch, **sizes, **_WIDE[arch])
    cfg.dtype = torch_dtype
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).to(torch_dtype)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    out = Path(out)
    model.save_pretrained(str(out))
    save_tokenizer(out)
    return out


def build_big_model_dir(
    out: Path,
    hidden: int = 1024,
    layers: int = 8,
    *,
    seed: int = 0,
    vocab: int = 8192,
    intermediate: int | None = None,
    max_shard_size: str = "100MB",
    kv_heads: int | None = None,
) -> Path:
    """A llama for benchmarks: defaults give ~115 M params, ~230 MB in bfloat16 (not used by tests).

    Weights are filled with a cheap normal draw instead of transformers' per-module
    init so a few hundred MB build in seconds.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    heads = max(1, hidden // 64)  # head_dim 64, as in real llamas
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or max(1, heads // 4),
        max_position_embeddings=2048,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
    )
    cfg.dtype = torch.bfloat16
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
        # Buffers (rotary inv_freq) are left uninitialised: they are not persistent,
        # so save_pretrained skips them and from_pretrained recomputes them.
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID)
    model.save_pretrained(str(out), max_shard_size=max_shard_size)
    save_tokenizer(out)
    return out


# --- the standard repos ------------------------------------------------------------------


@dataclass(frozen=True)
class TestRepo:
    """One published repo: ``sha`` is main's commit; ``shas`` maps each ref (branch, tag) to its commit."""

    __test__ = False  # not a pytest test class despite the name

    repo_id: str
    arch: str
    sha: str
    shas: dict[str, str] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    gated: bool = False
    notes: str = ""


# One repo per EXTRA_ARCHS entry, published by build_test_repos.
EXTRA_REPOS = {
    "qwen3_moe": "tiny/qwen3-moe",
    "mixtral": "tiny/mixtral",
    "granitemoe": "tiny/granite-moe",
    "gpt_oss": "tiny/gpt-oss",
    "phimoe": "tiny/phimoe",
    "deepseek_v3": "tiny/deepseek-v3",
    "mamba": "tiny/mamba",
    "mamba2": "tiny/mamba2",
    "jamba": "tiny/jamba",
}
_EXTRA_NOTES = {
    "qwen3_moe": "fused experts (3-D mlp.experts.gate_up_proj/down_proj) in both layers; router mlp.gate",
    "mixtral": "fused experts in both layers, per-expert w1/w2/w3 in the checkpoint; router mlp.gate",
    "granitemoe": "fused block_sparse_moe.experts in both layers; router block_sparse_moe.router",
    "gpt_oss": "fused experts stored transposed (E, in, out) with biases; attention sinks; router mlp.router",
    "phimoe": "router mlp.router is an nn.Linear subclass returning a tuple: all-linear wraps it and breaks forward",
    "deepseek_v3": "MLA attention (q_a/q_b_proj, kv_a_proj_with_mqa, kv_b_proj); layer 0 dense, layer 1 MoE + shared_experts",
    "mamba": "state-space, no attention; PEFT refuses LoRA on out_proj and conv1d",
    "mamba2": "state-space (SSD), no attention; PEFT refuses LoRA on out_proj and conv1d",
    "jamba": "hybrid: layer 0 mamba + dense MLP, layer 1 attention + MoE; PEFT allows its mamba.out_proj",
}


def _files(src: Path) -> list[str]:
    return sorted(p.relative_to(src).as_posix() for p in src.rglob("*") if p.is_file())


def build_test_repos(store: Path) -> dict[str, TestRepo]:
    """Build and publish the standard repos into ``store``; returns them by repo id.

    Each repo gets its own weights seed, so no two repos share a weights blob by accident.
    """
    from tests.hubserver import publish

    store = Path(store)
    repos: dict[str, TestRepo] = {}
    with tempfile.TemporaryDirectory(prefix="lora-prep-factory-") as tmp:
        work = Path(tmp)

        def one(repo_id: str, arch: str, notes: str, *, gated: bool | None = None, **build) -> None:
            src = build_model_dir(arch, work / repo_id, **build)
            sha = publish(store, repo_id, src, gated=gated)
            repos[repo_id] = TestRepo(repo_id, arch, sha, {"main": sha}, _files(src), bool(gated), notes)

        # tiny/llama: v1 -> first commit (seed 0); main -> second commit (seed 1), different weights.
        first = build_model_dir("llama", work / "llama-v1", seed=0)
        sha_v1 = publish(store, "tiny/llama", first, tags=("v1",))
        second = build_model_dir("llama", work / "llama-main", seed=1)
        sha_main = publish(store, "tiny/llama", second)
        repos["tiny/llama"] = TestRepo(
            "tiny/llama",
            "llama",
            sha_main,
            {"main": sha_main, "v1": sha_v1},
            _files(second),
            False,
            "two commits on main: v1 tags the first (seed 0), main is the second (seed 1); weights differ",
        )
        one("tiny/gpt2", "gpt2", "Conv1D layers, lm_head tied to wte")
        one("tiny/phi3", "phi3", "fused qkv_proj/gate_up_proj, bfloat16 weights", dtype="bfloat16")
        one("tiny/gpt-neox", "gpt_neox", "fused query_key_value; config has legacy torch_dtype key")
        one("tiny/llama-sharded", "llama", "3 safetensors shards + model.safetensors.index.json", shards=3, seed=3)
        one(
            "tiny/llama-extras",
            "llama",
            "model.safetensors plus duplicates never to download: pytorch_model.bin, original/*",
            extras=True,
            seed=4,
        )
        one("tiny/llama-pickle", "llama", "weights only as pytorch_model.bin (pickle)", pickle_only=True, seed=5)
        one(
            "tiny/remote-code",
            "llama",
            f"auto_map -> modeling_tiny.py; sets model.loaded_by_remote_code and writes ${REMOTE_CODE_MARKER_ENV}",
            remote_code=True,
            seed=6,
        )
        one("tiny/gated", "llama", "gated: needs a token with access", gated=True, seed=2)
        # One repo per transformers-5 architecture, seeds 10.. in EXTRA_ARCHS order (~0.04 s each).
        for seed, arch in enumerate(EXTRA_ARCHS, start=10):
            one(EXTRA_REPOS[arch], arch, _EXTRA_NOTES[arch], seed=seed)
    return repos

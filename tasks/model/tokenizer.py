"""The tokenizer as prepared: safety checks on the snapshot, a pad token distinct from eos, and a portable save.

Why this pad-token order: docs/PADDING.md. A saved tokenizer carries no load-time arguments
(``local_files_only``, ``is_local``, the path it was read from): another machine loads it as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_prep.tasks.errors import RemoteCodeRefused
from lora_prep.tasks.hub.selection import ships_code

# A pad token added to the vocabulary (only when no usable one exists; see choose_pad_token).
NEW_PAD_TOKEN = "<|pad|>"
# Tokens that real vocabularies reserve for padding but whose tokenizer config often leaves
# pad_token unset: Llama 3.1 <|finetune_right_pad_id|>, GPT-NeoX/Pythia <|padding|>,
# SentencePiece and T5 <pad>, BERT-style [PAD]. Never produced from text, so safe to pad with.
KNOWN_PAD_TOKENS = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "<|padding|>", "[PAD]")
# Grow the embedding matrix to a multiple of 64 rows when a pad token is added: a vocab such as
# 32001 rows makes the output-head matmul miss tensor-core tile sizes on GPUs (multiples of 8-64).
EMBEDDING_ROWS_MULTIPLE = 64
# Arguments of the load, not properties of the tokenizer: never written into an artifact.
LOAD_TIME_KWARGS = ("local_files_only", "is_local", "name_or_path", "cache_dir", "revision", "token", "trust_remote_code", "_commit_hash")


# --- safety checks on the snapshot ----------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_remote_code(snapshot: Path, trusted: bool) -> None:
    """Refuse a snapshot that ships its own code unless the plan trusts it (the planner already refused; this is defence in depth)."""
    shipping = [name for name in ("config.json", "tokenizer_config.json") if ships_code(_read_json(snapshot / name))]
    if shipping and not trusted:
        raise RemoteCodeRefused(
            f"{snapshot} ships its own Python code ({', '.join(shipping)} has auto_map) and the load plan does not trust it: "
            "read that code, then plan again with --trust-remote-code and --revision <full commit sha>",
            snapshot_dir=str(snapshot),
        )


# --- tokenizer and pad token --------------------------------------------------------


def choose_pad_token(tokenizer: Any) -> tuple[str, str]:
    """(pad token, why). Why this order: docs/PADDING.md.

    1. the tokenizer's own pad token, unless it is eos (a collator that masks pad ids in the
       labels would then mask every eos too, and the model never learns to stop);
    2. a token the vocabulary reserves for padding (KNOWN_PAD_TOKENS);
    3. unk, when it is a token of its own (not eos/bos): byte-level and byte-fallback tokenizers
       never emit it, so masking it costs nothing and the embeddings stay as trained;
    4. a new NEW_PAD_TOKEN, which grows the embeddings when the matrix has no spare row.
    """
    eos, bos = tokenizer.eos_token_id, tokenizer.bos_token_id
    reserved = {i for i in (eos, bos) if i is not None}
    note = ""
    if tokenizer.pad_token is not None:
        if tokenizer.pad_token_id not in reserved:
            return tokenizer.pad_token, f"existing: the tokenizer's own pad token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id})"
        note = f"; replaced the tokenizer's pad {tokenizer.pad_token!r}, which is also eos/bos (masking pad labels would mask eos, so the model would not learn to stop)"
    vocab = tokenizer.get_vocab()
    for token in KNOWN_PAD_TOKENS:
        if token in vocab and vocab[token] not in reserved:
            return (
                token,
                f"reserved: {token!r} (id {vocab[token]}) is in the vocabulary for padding; no new token, embeddings unchanged{note}",
            )
    unk = tokenizer.unk_token
    if unk is not None and tokenizer.unk_token_id not in reserved:
        return unk, (
            f"unk: reused {unk!r} (id {tokenizer.unk_token_id}), distinct from eos; no new token, embeddings unchanged; "
            f"pad positions are masked by attention_mask and in labels{note}"
        )
    return NEW_PAD_TOKEN, (
        f"added: {NEW_PAD_TOKEN!r}, because the tokenizer has no pad, no reserved pad and no unk distinct from eos "
        f"(padding with eos would stop the model learning to end){note}"
    )


def load_tokenizer(path: str, trust_remote_code: bool = False) -> tuple[Any, str]:
    """Load the tokenizer from a local snapshot and make sure it has a pad token distinct from eos.

    Returns (tokenizer, pad_token_strategy). When the strategy starts with "added", the model's
    embeddings must grow to ``len(tokenizer)`` (load_model does that).
    """
    from transformers import AutoTokenizer

    check_remote_code(Path(path), trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    pad, strategy = choose_pad_token(tokenizer)
    if pad == NEW_PAD_TOKEN:
        tokenizer.add_special_tokens({"pad_token": pad})
    else:
        tokenizer.pad_token = pad
    return tokenizer, strategy


def fit_embeddings_to_tokenizer(model: Any, tokenizer: Any) -> bool:
    """Grow the embeddings when the tokenizer has more ids than rows; new rows = mean of the old ones.

    Mean rows (Hewitt, "Initializing new word embeddings", 2021) keep the new token's logit at the
    average, so it cannot dominate generation. transformers' mean_resizing also samples from the
    rows' covariance, which costs vocab x hidden^2 flops (5e11 for a 32k x 4096 matrix, tens of
    seconds on CPU) for no benefit to a single pad token, so it is off and the mean is set here.
    """
    import torch

    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= rows:
        return False  # the matrix already has a spare row for the new id (vocabularies padded to x64, e.g. Qwen)
    model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=EMBEDDING_ROWS_MULTIPLE, mean_resizing=False)
    with torch.no_grad():
        for embedding in {id(m): m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}.values():
            weight = embedding.weight
            weight[rows:] = weight[:rows].mean(dim=0, keepdim=True)
    return True


def save_tokenizer(tokenizer: Any, out_dir: str | Path) -> None:
    """save_pretrained without the load-time arguments transformers keeps in init_kwargs."""
    saved = dict(tokenizer.init_kwargs)
    for key in LOAD_TIME_KWARGS:
        tokenizer.init_kwargs.pop(key, None)
    try:
        tokenizer.save_pretrained(str(out_dir))
    finally:
        tokenizer.init_kwargs.clear()
        tokenizer.init_kwargs.update(saved)

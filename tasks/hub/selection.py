"""Which files of a repo loading needs: pure functions over the tree listing.

Only root-level files (so never ``original/``): config, generation config, tokenizer files,
chat templates and one weight format (safetensors whenever present; pickle only when allowed
and nothing else is there); the repo's own ``*.py`` when its config has ``auto_map``. A shard
index names its shards exactly; those names are checked like every other repo path.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_prep.tasks.errors import BadRepo, EntryNotFound, PickleRefused
from lora_prep.tasks.hub.cache import check_repo_path
from lora_prep.tasks.records.hub import WeightFormat

_CONFIG_FILES = frozenset({"config.json", "generation_config.json"})
_TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
    }
)
# Root-level name patterns: sentencepiece (tokenizer.model, spiece.model), tiktoken, chat templates.
_TOKENIZER_PATTERNS = ("*.model", "*.tiktoken", "chat_template*")
_EXTRA_TEMPLATES = re.compile(r"^additional_chat_templates/[^/]+\.jinja$")
ST_SINGLE, ST_INDEX = "model.safetensors", "model.safetensors.index.json"
PT_SINGLE, PT_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_ST_SHARD = re.compile(r"^model-\d+-of-\d+\.safetensors$")
_PT_SHARD = re.compile(r"^pytorch_model-\d+-of-\d+\.bin$")
WEIGHT_INDEXES = (ST_INDEX, PT_INDEX)


def select_files(paths: list[str], allow_pickle: bool, *, include_code: bool = False) -> tuple[list[str], WeightFormat]:
    """What loading needs from a repo tree, and the weight format: (sorted paths, format).

    Only root-level files (so never ``original/``); config, generation config, tokenizer files;
    one weight format: safetensors (``model.safetensors``, or the index and its
    ``model-*-of-*.safetensors`` shards) whenever present, never *.bin/*.pth/*.gguf/*.onnx/...
    beside it. Pickle (``pytorch_model.bin`` or its index and shards) only when there is no
    safetensors and ``allow_pickle``. ``include_code``: root ``*.py`` (config has auto_map).
    """
    root = [p for p in paths if "/" not in p]
    present = set(root)
    selected = {p for p in root if p in _CONFIG_FILES or p in _TOKENIZER_FILES}
    selected |= {p for p in root if any(fnmatch.fnmatchcase(p, pat) for pat in _TOKENIZER_PATTERNS)}
    selected |= {p for p in paths if _EXTRA_TEMPLATES.match(p)}
    if include_code:
        selected |= {p for p in root if p.endswith(".py")}

    fmt: WeightFormat
    if ST_INDEX in present:
        fmt, weights = "safetensors", {ST_INDEX} | {p for p in root if _ST_SHARD.match(p)}
    elif ST_SINGLE in present:
        fmt, weights = "safetensors", {ST_SINGLE}
    elif PT_INDEX in present or PT_SINGLE in present:
        if not allow_pickle:
            raise PickleRefused(
                "the only weights are pickle files (pytorch_model*.bin), which can run code when loaded: "
                "pass allow_pickle=True (--allow-pickle) only for a repo you trust, or pick a revision with safetensors."
            )
        fmt = "pickle"
        weights = {PT_INDEX} | {p for p in root if _PT_SHARD.match(p)} if PT_INDEX in present else {PT_SINGLE}
    else:
        raise EntryNotFound(
            "no model.safetensors, model.safetensors.index.json or pytorch_model.bin at the repo root: "
            "check the repo id and revision (GGUF/ONNX-only and adapter repos are not supported)."
        )
    return sorted(selected | weights), fmt


def ships_code(config: dict[str, Any]) -> bool:
    """A repo ships its own Python code when its config (or tokenizer config) maps classes to it (``auto_map``)."""
    return bool(config.get("auto_map"))


def snapshot_weight_format(snapshot_dir: Path, allow_pickle: bool) -> WeightFormat:
    """The weight format a downloaded snapshot (or local directory) holds, by the same rules as the selection."""
    where = str(snapshot_dir)
    try:
        _, fmt = select_files(sorted(p.name for p in Path(snapshot_dir).iterdir()), allow_pickle)
    except (PickleRefused, EntryNotFound) as exc:
        raise type(exc)(f"{where}: {exc}", snapshot_dir=where) from None
    return fmt


def is_weight_file(path: str) -> bool:
    return path.endswith((".safetensors", ".bin")) and "/" not in path


def select_with_shards(
    where: str, paths: list[str], allow_pickle: bool, config: dict, read_json: Callable[[str], dict]
) -> tuple[list[str], WeightFormat]:
    """select_files, then the exact shard list from the index (it names the shards, not a pattern)."""
    try:
        selected, fmt = select_files(paths, allow_pickle, include_code=ships_code(config))
    except (PickleRefused, EntryNotFound) as exc:
        raise type(exc)(f"{where}: {exc}") from None
    index = next((p for p in selected if p in WEIGHT_INDEXES), None)
    if index is None:
        return selected, fmt
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise BadRepo(f"{where}: {index} has no weight_map of file names: the repo is broken at this revision; pick another revision.")
    shards = {check_repo_path(v, f"{where} {index}") for v in weight_map.values()}
    absent = sorted(shards - set(paths))
    if absent:
        raise EntryNotFound(
            f"{where}: {index} names shards the repo lacks ({', '.join(absent[:3])}): "
            "the repo is broken at this revision; pick another revision."
        )
    return sorted({p for p in selected if not is_weight_file(p)} | shards), fmt

"""What resolve knows about a repo, before any weight moves: the records, and how they are built.

``RepoFacts`` is the resolve stage's result (tasks/resolve.py): the commit, the tree, the selected
files, the config and what the safetensors headers say. Built the same way from the Hub, the HF
cache and a local directory; every header is checked before its numbers are believed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

from lora_prep.tasks.errors import BadRepo, EntryNotFound
from lora_prep.tasks.hub.selection import is_weight_file
from lora_prep.tasks.records.hub import HubFile, RepoFacts, WeightFormat

# Parallel header reads: each is one ~100 KB ranged GET; 8 as snapshot_download's workers.
HEADER_WORKERS = 8


def is_local_source(model_id: str) -> bool:
    """A model id that names an existing directory is a local model, as for transformers' from_pretrained."""
    return os.path.isdir(os.path.expanduser(model_id))


def require_config(where: str, files: list[HubFile]) -> None:
    if "config.json" not in {f.path for f in files}:
        raise EntryNotFound(f"{where} has no config.json at its root: not a transformers model; check the id, revision or directory.")


def _check_header(where: str, path: str, meta: Any) -> None:
    """Refuse a header that parses but cannot be a checkpoint (negative or non-integer dimensions)."""
    for name, info in meta.tensors.items():
        if not all(isinstance(d, int) and d >= 0 for d in info.shape):
            raise BadRepo(
                f"{where}: {path} declares tensor {name!r} with shape {info.shape}: the file is corrupt; "
                "pick another revision or tell the repo owner."
            )


def build_facts(
    repo_id: str,
    revision: str,
    sha: str | None,
    files: list[HubFile],
    selected: list[str],
    fmt: WeightFormat,
    config: dict[str, Any],
    header: Callable[[str], Any],
    *,
    offline: bool,
    source: Literal["hub", "local"] = "hub",
    code_digest: str | None = None,
) -> RepoFacts:
    from huggingface_hub.errors import SafetensorsParsingError

    where = repo_id if source == "local" else f"{repo_id}@{(sha or '')[:12]}"
    by_path = {f.path: f for f in files}
    weights = [p for p in selected if is_weight_file(p)]
    param_count: int | None = None
    dtypes: dict[str, int] = {}
    if fmt == "safetensors":

        def checked(path: str) -> Any:
            try:
                meta = header(path)
            except SafetensorsParsingError as exc:
                raise BadRepo(
                    f"{where}: the safetensors header of {path} does not parse: the file is corrupt; "
                    "pick another revision or tell the repo owner."
                ) from exc
            _check_header(where, path, meta)
            return meta

        with ThreadPoolExecutor(max_workers=HEADER_WORKERS) as pool:
            headers = list(pool.map(checked, weights))
        for meta in headers:
            for dtype, n in meta.parameter_count.items():
                dtypes[dtype] = dtypes.get(dtype, 0) + n
        param_count = sum(dtypes.values())
    return RepoFacts(
        repo_id=repo_id,
        source=source,
        revision=revision,
        commit_sha=sha,
        files=files,
        selected=selected,
        weight_format=fmt,
        selected_bytes=sum(by_path[p].size for p in selected),
        weight_bytes=sum(by_path[p].size for p in weights),
        param_count=param_count,
        stored_dtypes=dict(sorted(dtypes.items())),
        config=config,
        offline=offline,
        code_digest=code_digest,
    )


def read_json_file(path: str | Path, where: str, name: str) -> dict:
    """A repo's JSON file as a dict; anything else (bad JSON, absurd nesting, not an object) is a BadRepo naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting deeper than the parser's stack
        reason = "nested too deeply to parse" if isinstance(exc, RecursionError) else f"not valid JSON ({exc})"
        raise BadRepo(f"{where}: {name} is {reason}: the repo is broken at this revision; pick another revision.") from None
    if not isinstance(data, dict):
        raise BadRepo(f"{where}: {name} is not a JSON object: the repo is broken at this revision; pick another revision.")
    return data


def content_digest(entries: list[tuple[str, str]]) -> str:
    """One sha256 over (path, sha256) pairs, sorted: names the exact files of a local model (or its code)."""
    digest = hashlib.sha256()
    for path, sha256 in sorted(entries):
        digest.update(f"{path}\0{sha256}\n".encode())
    return digest.hexdigest()

"""What resolve knows about a repo, before any weight moves: the records, and how they are built.

``RepoFacts`` is the resolve stage's result (tasks/resolve.py): the commit, the tree, the selected
files, the config and what the safetensors headers say. Built the same way from the Hub, the HF
cache and a local directory; every header is checked before its numbers are believed.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

from lora_prep.tasks.errors import BadRepo, EntryNotFound
from lora_prep.tasks.selection import WeightFormat, is_weight_file

# Parallel header reads: each is one ~100 KB ranged GET; 8 as snapshot_download's workers.
HEADER_WORKERS = 8
LOCAL_REVISION = "local"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HubFile(_Record):
    path: str = Field(description="Path in the repo, '/'-separated.")
    size: int = Field(ge=0, description="Bytes.")
    sha256: str | None = Field(default=None, description="LFS sha256 (the HF cache's blob name); None for small git files and local files.")
    blob_id: str = Field(default="", description="Git blob oid: the HF cache's blob name for small files; empty for local files.")

    @property
    def blob_name(self) -> str:
        """Name of this file's blob in the HF cache: the sha256 for LFS files, the git oid otherwise."""
        return self.sha256 or self.blob_id


class RepoFacts(_Record):
    repo_id: str = Field(description="Hub id (org/name), or the absolute path of a local model directory.")
    source: Literal["hub", "local"] = "hub"
    revision: str = Field(description="The revision as requested (branch, tag or sha); 'local' or a code digest for a directory.")
    commit_sha: str | None = Field(description="The 40-hex commit every later step uses; None for a local directory.")
    files: list[HubFile] = Field(description="The whole tree at commit_sha (or the directory's files).")
    selected: list[str] = Field(description="Paths to fetch: config, tokenizer, one weight format, code if auto_map.")
    weight_format: WeightFormat
    selected_bytes: int = Field(ge=0, description="Sum of the selected files' sizes.")
    weight_bytes: int = Field(ge=0, description="Sum of the selected weight files' sizes (no index).")
    param_count: int | None = Field(description="From safetensors headers; None for pickle weights.")
    stored_dtypes: dict[str, int] = Field(description='Parameters per stored dtype, e.g. {"BF16": n}.')
    config: dict = Field(description="config.json at commit_sha.")
    offline: bool = Field(description="True when read from the HF cache without the Hub.")
    code_digest: str | None = Field(default=None, description="sha256 over the selected *.py files (name and content) when the model ships code.")

    @property
    def is_local(self) -> bool:
        return self.source == "local"

    @property
    def pin(self) -> str:
        """What names these exact files: the commit sha, or 'local' for a directory (its digest comes with the download stage)."""
        return self.commit_sha or LOCAL_REVISION

    @property
    def where(self) -> str:
        return self.repo_id if self.is_local else f"{self.repo_id}@{self.revision}"

    def file(self, path: str) -> HubFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


def is_local_source(model_id: str) -> bool:
    """A model id that names an existing directory is a local model, as for transformers' from_pretrained."""
    return os.path.isdir(os.path.expanduser(model_id))


def require_config(where: str, files: list[HubFile]) -> None:
    if "config.json" not in {f.path for f in files}:
        raise EntryNotFound(f"{where} has no config.json at its root: not a transformers model; check the id, revision or directory.")


def _check_header(where: str, path: str, meta) -> None:
    """Refuse a header that parses but cannot be a checkpoint (negative or non-integer dimensions)."""
    for name, info in meta.tensors.items():
        if not all(isinstance(d, int) and d >= 0 for d in info.shape):
            raise BadRepo(f"{where}: {path} declares tensor {name!r} with shape {info.shape}: the file is corrupt; "
                          "pick another revision or tell the repo owner.")


def build_facts(repo_id, revision, sha, files, selected, fmt, config, header: Callable, *, offline: bool,
           source: str = "hub", code_digest: str | None = None) -> RepoFacts:
    from huggingface_hub.errors import SafetensorsParsingError

    where = repo_id if source == "local" else f"{repo_id}@{(sha or '')[:12]}"
    by_path = {f.path: f for f in files}
    weights = [p for p in selected if is_weight_file(p)]
    param_count, dtypes = None, {}
    if fmt == "safetensors":
        def checked(path: str):
            try:
                meta = header(path)
            except SafetensorsParsingError as exc:
                raise BadRepo(f"{where}: the safetensors header of {path} does not parse: the file is corrupt; "
                              "pick another revision or tell the repo owner.") from exc
            _check_header(where, path, meta)
            return meta

        with ThreadPoolExecutor(max_workers=HEADER_WORKERS) as pool:
            headers = list(pool.map(checked, weights))
        for meta in headers:
            for dtype, n in meta.parameter_count.items():
                dtypes[dtype] = dtypes.get(dtype, 0) + n
        param_count = sum(dtypes.values())
    return RepoFacts(
        repo_id=repo_id, source=source, revision=revision, commit_sha=sha, files=files, selected=selected,
        weight_format=fmt, selected_bytes=sum(by_path[p].size for p in selected),
        weight_bytes=sum(by_path[p].size for p in weights), param_count=param_count,
        stored_dtypes=dict(sorted(dtypes.items())), config=config, offline=offline, code_digest=code_digest,
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def content_digest(entries: list[tuple[str, str]]) -> str:
    """One sha256 over (path, sha256) pairs, sorted: names the exact files of a local model (or its code)."""
    digest = hashlib.sha256()
    for path, sha256 in sorted(entries):
        digest.update(f"{path}\0{sha256}\n".encode())
    return digest.hexdigest()

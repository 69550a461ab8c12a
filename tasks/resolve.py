"""Stage 1, resolve: a model (Hub id + revision, or a local directory) -> RepoFacts, before any weight moves.

Hub, online:
1. revision (branch, tag or sha) -> 40-hex commit sha (``model_info``); every later call uses the sha.
2. the whole tree at that sha (``list_repo_tree``): sizes, LFS sha256s, git blob ids; every name checked.
3. ``config.json`` (and a shard index) via ``hf_hub_download`` at the sha: tiny, and cached.
4. ``select_files``: what loading needs, one weight format (tasks/selection.py).
5. parameter count and stored dtypes from the safetensors headers: a ranged read of the first
   100 KB of each weight file, or the local file when the cache already holds it.
Hub, offline (``source.offline``, HF_HUB_OFFLINE=1, or the Hub unreachable on the last attempt):
the same facts from the HF cache (``refs/<revision>``, the cached listing, the snapshot's files).
Local directory (a path that is a directory, as transformers decides): its files, config and
headers; there is no commit, so the download stage records a content digest instead.

What huggingface_hub 2.4 retries by itself (utils/_http.py): ``model_info`` and header reads not
at all; ``list_repo_tree`` up to 5 times (23 s at most). What is left becomes ``HubUnavailable``
and the Prefect task retries it (tasks/retry.py); permanent errors fail at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Literal

from huggingface_hub import constants
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field

from lora_prep.tasks.errors import BadRepo, EntryNotFound, HubUnavailable, OfflineCacheMiss, RevisionNotFound
from lora_prep.tasks.hf_cache import SHA256_RE, check_blob_names, check_commit, check_repo_path, check_revision, guarded_hub
from lora_prep.tasks.hf_env import cache_dir_for, get_token, is_offline, repo_cache_dir
from lora_prep.tasks.library_errors import hub_errors
from lora_prep.tasks.logs import run_logger
from lora_prep.tasks.retry import NETWORK
from lora_prep.tasks.selection import WeightFormat, is_weight_file, select_with_shards
from lora_prep.tasks.settings import SourceSettings, is_full_sha

# Seconds to wait for the Hub's first byte on metadata calls: huggingface_hub's own default
# for HEAD calls (HF_HUB_ETAG_TIMEOUT, 10 s). Its shared client has no timeout of its own.
METADATA_TIMEOUT_S = constants.HF_HUB_ETAG_TIMEOUT
# Parallel header reads: each is one ~100 KB ranged GET; 8 as snapshot_download's workers.
HEADER_WORKERS = 8
# Directories of a local model folder that are never model files (VCS, caches, our own).
_LOCAL_SKIP = {".git", ".cache", ".huggingface", "__pycache__"}
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


# --- resolve -------------------------------------------------------------------------------


def resolve_repo(
    repo_id: str,
    revision: str = "main",
    source: SourceSettings = SourceSettings(),
    token: str | None = None,
    *,
    cache_fallback: bool = True,
) -> RepoFacts:
    """Facts about ``repo_id`` at ``revision`` from the Hub, the HF cache when offline, or a local directory.

    cache_fallback: when the Hub is unreachable (a transient error), use a complete cached
    snapshot of the revision instead, with a warning and ``offline=True``. The Prefect task
    allows it on its last attempt only, so that retries come first.
    """
    if is_local_source(repo_id):
        return resolve_local_dir(repo_id, revision, source)
    check_revision(revision)
    cache_dir = cache_dir_for(source)
    if is_offline(source):
        return _resolve_from_cache(repo_id, revision, source, cache_dir)
    try:
        with guarded_hub():
            return _resolve_online(repo_id, revision, source, token, cache_dir)
    except HubUnavailable as exc:
        if not cache_fallback:
            raise
        try:
            facts = _resolve_from_cache(repo_id, revision, source, cache_dir)
        except OfflineCacheMiss:
            raise exc from None
        run_logger(__name__).warning(
            "Hub unreachable (%s); using the cached snapshot of %s@%s (commit %s) offline.",
            type(exc.__cause__).__name__ if exc.__cause__ else "HubUnavailable", repo_id, revision, facts.pin[:12],
        )
        return facts


def _resolve_online(repo_id: str, revision: str, source: SourceSettings, token: str | None, cache_dir: str) -> RepoFacts:
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import SafetensorsParsingError
    from huggingface_hub.hf_api import RepoFile, parse_local_safetensors_file_metadata

    where = f"{repo_id}@{revision}"
    api = HfApi(token=token)
    with hub_errors(repo_id, revision):
        # model_info also for a full sha: one request that validates it and, having no
        # internal backoff, notices an unreachable Hub at once (list_repo_tree would
        # spend up to 23 s in huggingface_hub's own retries first).
        sha = check_commit(api.model_info(repo_id, revision=revision, timeout=METADATA_TIMEOUT_S).sha, where)
        if is_full_sha(revision) and sha != revision:
            raise RevisionNotFound(f"revision {revision!r} not found in {repo_id}: use an existing full commit sha.")
        tree = [f for f in api.list_repo_tree(repo_id, recursive=True, revision=sha) if isinstance(f, RepoFile)]
    files = []
    for f in sorted(tree, key=lambda f: f.path):
        sha256 = f.lfs.sha256 if f.lfs else None
        check_repo_path(f.path, where)
        check_blob_names(f.path, sha256, f.blob_id, where)
        files.append(HubFile(path=f.path, size=f.size, sha256=sha256, blob_id=f.blob_id or ""))
    _require_config(where, files)

    def fetch(path: str) -> str:
        with hub_errors(repo_id, revision, path):
            return hf_hub_download(repo_id, path, revision=sha, cache_dir=cache_dir, token=token)

    config = read_json_file(fetch("config.json"), where, "config.json")
    selected, fmt = select_with_shards(where, [f.path for f in files], source.allow_pickle, config,
                                       lambda p: read_json_file(fetch(p), where, p))
    sizes = {f.path: f.size for f in files}

    def header(path: str):
        # The cache may hold the file already (a warm run): read the header there, no request.
        local = try_to_load_from_cache(repo_id, path, cache_dir=cache_dir, revision=sha)
        if isinstance(local, str) and os.path.getsize(local) == sizes[path]:
            try:
                return parse_local_safetensors_file_metadata(local)
            except SafetensorsParsingError:
                pass  # a corrupt cached copy: the download stage repairs it; ask the Hub
        with hub_errors(repo_id, revision, path):
            return api.parse_safetensors_file_metadata(repo_id, path, revision=sha, timeout=METADATA_TIMEOUT_S)

    return _facts(repo_id, revision, sha, files, selected, fmt, config, header, offline=False)


def _resolve_from_cache(repo_id: str, revision: str, source: SourceSettings, cache_dir: str) -> RepoFacts:
    from huggingface_hub import get_cached_repo_tree
    from huggingface_hub.errors import CachedRepoTreeNotFoundError
    from huggingface_hub.hf_api import parse_local_safetensors_file_metadata

    storage = repo_cache_dir(cache_dir, repo_id)
    where = f"{repo_id}@{revision}"
    miss = f"{where} is not in the HF cache at {cache_dir}: run once with network access to fill it."
    if is_full_sha(revision):
        sha = revision
    else:
        ref = storage / "refs" / revision
        if not ref.is_file():
            raise OfflineCacheMiss(miss, repo_id=repo_id, revision=revision)
        sha = check_commit(ref.read_text().strip(), f"{where} (cached ref)")
    snapshot = storage / "snapshots" / sha
    if not snapshot.is_dir():
        raise OfflineCacheMiss(miss, repo_id=repo_id, revision=revision)

    try:
        # The listing huggingface_hub cached beside the snapshot (trees/<sha>.json); it
        # has no LFS sha256, but an LFS file's blob in the cache is named by it.
        entries = [(f.path, f.size, f.blob_id) for f in get_cached_repo_tree(repo_id, revision=sha, cache_dir=cache_dir)]
    except CachedRepoTreeNotFoundError:  # filled by an older huggingface_hub: what the snapshot holds
        entries = [(p.relative_to(snapshot).as_posix(), p.stat().st_size, "") for p in sorted(snapshot.rglob("*")) if p.is_file()]
    files = []
    for path, size, blob_id in sorted(entries):
        check_repo_path(path, where)
        blob = os.path.basename(os.path.realpath(snapshot / path)) if (snapshot / path).is_symlink() else ""
        sha256 = blob if SHA256_RE.match(blob) else None
        files.append(HubFile(path=path, size=size, sha256=sha256, blob_id=blob_id or ("" if sha256 else blob)))

    def local(path: str) -> Path:
        p = snapshot / path
        if not p.is_file():
            raise OfflineCacheMiss(f"{repo_id}@{sha[:12]}: {path} is missing from the HF cache: run once with network access to complete it.")
        return p

    config = read_json_file(local("config.json"), where, "config.json")
    selected, fmt = select_with_shards(where, [f.path for f in files], source.allow_pickle, config,
                                       lambda p: read_json_file(local(p), where, p))
    missing = [p for p in selected if not (snapshot / p).is_file()]
    if missing:
        raise OfflineCacheMiss(
            f"{repo_id}@{sha[:12]}: {len(missing)} selected file(s) missing from the HF cache ({', '.join(missing[:3])}): "
            "run once with network access to complete it."
        )
    return _facts(repo_id, revision, sha, files, selected, fmt, config,
                  lambda p: parse_local_safetensors_file_metadata(local(p)), offline=True)


def resolve_local_dir(model_dir: str, revision: str = LOCAL_REVISION, source: SourceSettings = SourceSettings()) -> RepoFacts:
    """Facts about a model directory on disk: its files, config and safetensors headers. Reads no weights."""
    from huggingface_hub.hf_api import parse_local_safetensors_file_metadata

    root = Path(model_dir).expanduser().resolve()
    where = str(root)
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if rel.parts[0] in _LOCAL_SKIP or not p.is_file():
            continue
        files.append(HubFile(path=check_repo_path(rel.as_posix(), where), size=p.stat().st_size))
    _require_config(where, files)
    config = read_json_file(root / "config.json", where, "config.json")
    selected, fmt = select_with_shards(where, [f.path for f in files], source.allow_pickle, config,
                                       lambda p: read_json_file(root / p, where, p))
    code = [p for p in selected if p.endswith(".py")]
    digest = content_digest([(p, _sha256_file(root / p)) for p in code]) if code else None
    pinned = revision if revision != "main" else LOCAL_REVISION  # "main" is the flow's default: not a pin here
    return _facts(str(root), pinned, None, files, selected, fmt, config,
                  lambda p: parse_local_safetensors_file_metadata(root / p), offline=False, source="local", code_digest=digest)


def _require_config(where: str, files: list[HubFile]) -> None:
    if "config.json" not in {f.path for f in files}:
        raise EntryNotFound(f"{where} has no config.json at its root: not a transformers model; check the id, revision or directory.")


def _check_header(where: str, path: str, meta) -> None:
    """Refuse a header that parses but cannot be a checkpoint (negative or non-integer dimensions)."""
    for name, info in meta.tensors.items():
        if not all(isinstance(d, int) and d >= 0 for d in info.shape):
            raise BadRepo(f"{where}: {path} declares tensor {name!r} with shape {info.shape}: the file is corrupt; "
                          "pick another revision or tell the repo owner.")


def _facts(repo_id, revision, sha, files, selected, fmt, config, header: Callable, *, offline: bool,
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


def _sha256_file(path: Path) -> str:
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


# --- the Prefect task ----------------------------------------------------------------------


def _last_attempt() -> bool:
    """True on the task run's last attempt (or outside Prefect): only then may resolve go offline."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None or ctx.task_run is None:
        return True
    return ctx.task_run.run_count > (ctx.task.retries or 0)


@task(
    name="resolve",
    cache_policy=NO_CACHE,  # a branch can move: always ask the Hub
    timeout_seconds=600,  # metadata and ~100 KB header reads per weight file
    **NETWORK.task_options(),
)
def resolve(repo_id: str, revision: str = "main", source: SourceSettings = SourceSettings()) -> RepoFacts:
    """resolve_repo with the token looked up here, so it is never a recorded task parameter."""
    if is_local_source(repo_id):
        return resolve_local_dir(repo_id, revision, source)
    return resolve_repo(repo_id, revision, source, get_token(source), cache_fallback=_last_attempt())


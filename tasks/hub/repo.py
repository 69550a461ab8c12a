"""Resolving a model (Hub id + revision, or a local directory) -> RepoFacts, before any weight moves.

Hub, online:
1. revision (branch, tag or sha) -> 40-hex commit sha (``model_info``); every later call uses the sha.
2. the whole tree at that sha (``list_repo_tree``): sizes, LFS sha256s, git blob ids; every name checked.
3. ``config.json`` (and a shard index) via ``hf_hub_download`` at the sha: tiny, and cached.
4. ``select_files``: what loading needs, one weight format (tasks/hub/selection.py).
5. parameter count and stored dtypes from the safetensors headers: a ranged read of the first
   100 KB of each weight file, or the local file when the cache already holds it.
Hub, offline (``source.offline``, HF_HUB_OFFLINE=1, or the Hub unreachable on the last attempt):
the same facts from the HF cache (``refs/<revision>``, the cached listing, the snapshot's files).
Local directory (a path that is a directory, as transformers decides): its files, config and
headers; there is no commit, so the download stage records a content digest instead.

What huggingface_hub 2.4 retries by itself (utils/_http.py): ``model_info`` and header reads not
at all; ``list_repo_tree`` up to 5 times (23 s at most). What is left becomes ``HubUnavailable``
and the Prefect task retries it (tasks/common/retry.py); permanent errors fail at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from huggingface_hub import constants

from lora_prep.tasks.common.files import sha256_file
from lora_prep.tasks.common.logs import run_logger
from lora_prep.tasks.errors import (
    HubUnavailable,
    InvalidInput,
    OfflineCacheMiss,
    RevisionNotFound,
)
from lora_prep.tasks.hub.cache import (
    SHA256_RE,
    check_blob_names,
    check_commit,
    check_repo_path,
    check_revision,
    guarded_hub,
)
from lora_prep.tasks.hub.env import cache_dir_for, get_token, is_offline, repo_cache_dir
from lora_prep.tasks.hub.errors import hub_errors
from lora_prep.tasks.hub.facts import (
    build_facts,
    content_digest,
    is_local_source,
    read_json_file,
    require_config,
)
from lora_prep.tasks.hub.selection import select_with_shards
from lora_prep.tasks.records.hub import LOCAL_REVISION, HubFile, RepoFacts
from lora_prep.tasks.settings import SourceSettings, is_full_sha

# Seconds to wait for the Hub's first byte on metadata calls: huggingface_hub's own default
# for HEAD calls (HF_HUB_ETAG_TIMEOUT, 10 s). Its shared client has no timeout of its own.
METADATA_TIMEOUT_S = constants.HF_HUB_ETAG_TIMEOUT


# Directories of a local model folder that are never model files (VCS, caches, our own).
_LOCAL_SKIP = {".git", ".cache", ".huggingface", "__pycache__"}


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
    check_model_id(repo_id)
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
            type(exc.__cause__).__name__ if exc.__cause__ else "HubUnavailable",
            repo_id,
            revision,
            facts.pin[:12],
        )
        return facts


def check_model_id(model_id: str) -> str:
    """A Hub repo id (org/name), or else a clear word about the path it was probably meant to be."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if model_id.startswith(("/", "./", "../", "~")) or os.sep * 2 in model_id:
        raise InvalidInput(
            f"model_id {model_id!r} looks like a path but is not a directory here: give a model directory "
            "(config.json, tokenizer, safetensors) or a Hub id such as org/name."
        )
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise InvalidInput(
            f"model_id {model_id!r} is neither a Hub repo id (org/name) nor a directory: check the id or the path."
        ) from None
    return model_id


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
    require_config(where, files)

    def fetch(path: str) -> str:
        with hub_errors(repo_id, revision, path):
            return hf_hub_download(repo_id, path, revision=sha, cache_dir=cache_dir, token=token)

    config = read_json_file(fetch("config.json"), where, "config.json")
    selected, fmt = select_with_shards(
        where, [f.path for f in files], source.allow_pickle, config, lambda p: read_json_file(fetch(p), where, p)
    )
    sizes = {f.path: f.size for f in files}

    def header(path: str) -> Any:
        # The cache may hold the file already (a warm run): read the header there, no request.
        local = try_to_load_from_cache(repo_id, path, cache_dir=cache_dir, revision=sha)
        if isinstance(local, str) and os.path.getsize(local) == sizes[path]:
            try:
                return parse_local_safetensors_file_metadata(local)
            except SafetensorsParsingError:
                pass  # a corrupt cached copy: the download stage repairs it; ask the Hub
        with hub_errors(repo_id, revision, path):
            return api.parse_safetensors_file_metadata(repo_id, path, revision=sha, timeout=METADATA_TIMEOUT_S)

    return build_facts(repo_id, revision, sha, files, selected, fmt, config, header, offline=False)


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
            raise OfflineCacheMiss(
                f"{repo_id}@{sha[:12]}: {path} is missing from the HF cache: run once with network access to complete it."
            )
        return p

    config = read_json_file(local("config.json"), where, "config.json")
    selected, fmt = select_with_shards(
        where, [f.path for f in files], source.allow_pickle, config, lambda p: read_json_file(local(p), where, p)
    )
    missing = [p for p in selected if not (snapshot / p).is_file()]
    if missing:
        raise OfflineCacheMiss(
            f"{repo_id}@{sha[:12]}: {len(missing)} selected file(s) missing from the HF cache ({', '.join(missing[:3])}): "
            "run once with network access to complete it."
        )
    return build_facts(
        repo_id, revision, sha, files, selected, fmt, config, lambda p: parse_local_safetensors_file_metadata(local(p)), offline=True
    )


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
    require_config(where, files)
    config = read_json_file(root / "config.json", where, "config.json")
    selected, fmt = select_with_shards(
        where, [f.path for f in files], source.allow_pickle, config, lambda p: read_json_file(root / p, where, p)
    )
    code = [p for p in selected if p.endswith(".py")]
    digest = content_digest([(p, sha256_file(root / p)) for p in code]) if code else None
    pinned = revision if revision != "main" else LOCAL_REVISION  # "main" is the flow's default: not a pin here
    return build_facts(
        str(root),
        pinned,
        None,
        files,
        selected,
        fmt,
        config,
        lambda p: parse_local_safetensors_file_metadata(root / p),
        offline=False,
        source="local",
        code_digest=digest,
    )


def _last_attempt() -> bool:
    """True on the task run's last attempt (or outside Prefect): only then may resolve go offline."""
    if "prefect" not in sys.modules:  # no task run without Prefect imported; a dry run never imports it
        return True
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None or ctx.task_run is None:
        return True
    return ctx.task_run.run_count > (ctx.task.retries or 0)


def resolve_model(model_id: str, revision: str = "main", source: SourceSettings = SourceSettings()) -> RepoFacts:
    """resolve_repo with the token looked up here; the Hub may be replaced by the cache on the last attempt only."""
    if is_local_source(model_id):
        return resolve_local_dir(model_id, revision, source)
    return resolve_repo(model_id, revision, source, get_token(source), cache_fallback=_last_attempt())

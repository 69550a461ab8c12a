"""Stage 1, resolve: a Hub model id + revision -> RepoFacts, before any weight is downloaded.

1. revision (branch, tag or sha) -> 40-hex commit sha (``model_info``); every later call uses the sha.
2. the whole tree at that sha (``list_repo_tree``): sizes, LFS sha256s, git blob ids.
3. ``config.json`` (and a shard index) via ``hf_hub_download`` at the sha: tiny, and cached.
4. ``select_files``: what loading needs, one weight format, never duplicates.
5. parameter count and stored dtypes from the safetensors headers: a ranged read of the first
   100 KB of each weight file, or the local file when the cache already holds it.

Offline (``source.offline`` or HF_HUB_OFFLINE=1), or when the Hub is unreachable and the
caller allows falling back, the same facts are read from the HF cache: the commit from
``refs/<revision>``, the tree from huggingface_hub's cached listing, config and headers
from the snapshot's files; the result says ``offline=True``.

Retries, and what huggingface_hub 2.4 already retries by itself (utils/_http.py):
- ``model_info`` and the safetensors header reads: no retry (a bare ``get_session().get``).
- ``list_repo_tree`` (paginate -> ``http_backoff``): up to 5 retries on 408/429/5xx,
  timeouts and network errors, sleeping 1, 2, 4, 8, 8 s (or Retry-After + 1 s): 23 s at most.
- file HEAD in ``hf_hub_download``: one try without retry (to fall back to a cached file
  fast); with no cached file and a retryable error, once more through ``http_backoff``.
- file GET (``http_get``): retries 408/429 only; a dropped connection, timeout or cut-off
  stream resumes from the bytes received with a Range request, up to 5 times.
What is left (a 5xx/429 on model_info, a header read or a file GET; a refused connection)
becomes ``HubUnavailable`` and the Prefect task retries it; permanent errors (not found,
gated, bad revision) fail at once.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import httpx2
from huggingface_hub import HfApi, constants, get_cached_repo_tree, hf_hub_download, try_to_load_from_cache
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    SafetensorsParsingError,
)
from huggingface_hub.file_download import repo_folder_name
from huggingface_hub.hf_api import RepoFile, parse_local_safetensors_file_metadata
from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict, Field

from lora_prep.tasks.errors import (
    EntryNotFound,
    GatedRepo,
    HubUnavailable,
    IntegrityError,
    InvalidInput,
    LoraPrepError,
    OfflineCacheMiss,
    PickleRefused,
    RepoNotFound,
    RevisionNotFound,
    retry_if_transient,
)
from lora_prep.tasks.settings import SourceSettings, is_full_sha

WeightFormat = Literal["safetensors", "pickle"]

# HTTP statuses that can pass by waiting: request timeout, rate limit, server errors.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Seconds to wait for the Hub's first byte on metadata calls; huggingface_hub's own default
# for HEAD calls (HF_HUB_ETAG_TIMEOUT). Its shared client has no timeout of its own.
METADATA_TIMEOUT_S = constants.HF_HUB_ETAG_TIMEOUT
# Parallel header reads: each is one ~100 KB ranged GET; 8 as snapshot_download's workers.
HEADER_WORKERS = 8
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_GIT_OID_RE = re.compile(r"^[0-9a-f]{40}$")


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HubFile(_Record):
    path: str = Field(description="Path in the repo, '/'-separated.")
    size: int = Field(ge=0, description="Bytes.")
    sha256: str | None = Field(default=None, description="LFS sha256 (the HF cache's blob name); None for small git files.")
    blob_id: str = Field(description="Git blob oid: the HF cache's blob name for small files.")

    @property
    def blob_name(self) -> str:
        """Name of this file's blob in the HF cache: the sha256 for LFS files, the git oid otherwise."""
        return self.sha256 or self.blob_id


class RepoFacts(_Record):
    repo_id: str
    revision: str = Field(description="The revision as requested (branch, tag or sha).")
    commit_sha: str = Field(description="The 40-hex commit every later step uses.")
    files: list[HubFile] = Field(description="The whole tree at commit_sha.")
    selected: list[str] = Field(description="Paths to fetch: config, tokenizer, one weight format, code if auto_map.")
    weight_format: WeightFormat
    selected_bytes: int = Field(ge=0, description="Sum of the selected files' sizes.")
    weight_bytes: int = Field(ge=0, description="Sum of the selected weight files' sizes (no index).")
    param_count: int | None = Field(description="From safetensors headers; None for pickle weights.")
    stored_dtypes: dict[str, int] = Field(description='Parameters per stored dtype, e.g. {"BF16": n}.')
    config: dict = Field(description="config.json at commit_sha.")
    offline: bool = Field(description="True when read from the HF cache without the Hub.")

    @property
    def dtypes(self) -> dict[str, int]:
        """Alias of stored_dtypes (tasks/plan.py reads ``facts.dtypes``)."""
        return self.stored_dtypes

    def file(self, path: str) -> HubFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


# --- settings read at call time (never at import) ------------------------------------------


def cache_dir_for(source: SourceSettings) -> str:
    """source.cache_dir, else HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default; absolute."""
    if source.cache_dir:
        path = source.cache_dir
    elif os.environ.get("HF_HUB_CACHE"):
        path = os.environ["HF_HUB_CACHE"]
    elif os.environ.get("HF_HOME"):
        path = os.path.join(os.environ["HF_HOME"], "hub")
    else:
        path = constants.HF_HUB_CACHE
    return str(Path(path).expanduser().resolve())


def is_offline(source: SourceSettings) -> bool:
    """source.offline, or HF_HUB_OFFLINE as huggingface_hub read it at import or as set now."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    return source.offline or constants.is_offline_mode() or env


def repo_cache_dir(cache_dir: str, repo_id: str) -> Path:
    """The repo's folder in the HF cache (models--org--name)."""
    return Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")


def get_token(source: SourceSettings) -> str | None:
    """The Hub token: the Prefect Secret block ``source.token_secret`` when set, else HF_TOKEN.

    None lets huggingface_hub use the token saved by ``hf auth login``. The value is never
    logged, never a task parameter and never part of a result.
    """
    if source.token_secret:
        from prefect.blocks.system import Secret

        try:
            secret = Secret.load(source.token_secret, _sync=True)
        except ValueError:  # Prefect: "Unable to find block document named ..."
            raise InvalidInput(
                f"token_secret {source.token_secret!r}: no Prefect Secret block with that name; "
                f"create it with Secret(value=<token>).save({source.token_secret!r}) or unset token_secret to use HF_TOKEN."
            ) from None
        value = secret.get()
        return str(value) if value else None
    return os.environ.get("HF_TOKEN") or None


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task run (the UI shows it), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(__name__)


# --- huggingface_hub errors -> lora-prep errors (by type, never by message text) -----------


def _status(exc: HfHubHTTPError) -> int | None:
    response = getattr(exc, "response", None)
    return response.status_code if response is not None else None


def is_transient_hub_error(exc: BaseException) -> bool:
    """Connection trouble or a 408/429/5xx, here or anywhere in the cause chain."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, httpx2.TransportError) and not isinstance(exc, httpx2.ProxyError):
            return True
        if isinstance(exc, HfHubHTTPError) and _status(exc) in TRANSIENT_STATUS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def hub_errors(repo_id: str, revision: str, path: str | None = None) -> Iterator[None]:
    """Translate huggingface_hub/httpx2 errors into lora-prep's, each one line ending with the fix."""
    endpoint = constants.ENDPOINT
    where = f"{repo_id}@{revision}" + (f" {path}" if path else "")
    try:
        yield
    except LoraPrepError:
        raise
    except GatedRepoError as exc:  # a RepositoryNotFoundError: must come first
        raise GatedRepo(
            f"{repo_id} is gated: accept the terms on {endpoint}/{repo_id} and set HF_TOKEN "
            "(or source.token_secret) to a token with access.",
            repo_id=repo_id,
        ) from exc
    except RepositoryNotFoundError as exc:
        raise RepoNotFound(
            f"repo {repo_id!r} not found on {endpoint}: check the id, or it may be private: set HF_TOKEN.",
            repo_id=repo_id,
        ) from exc
    except RevisionNotFoundError as exc:
        raise RevisionNotFound(
            f"revision {revision!r} not found in {repo_id}: use an existing branch, tag or full 40-hex commit sha.",
            repo_id=repo_id,
            revision=revision,
        ) from exc
    except RemoteEntryNotFoundError as exc:
        raise EntryNotFound(
            f"{where}: file not found on the Hub: check the revision, or the repo lacks a file it lists.",
            repo_id=repo_id,
            revision=revision,
        ) from exc
    except LocalEntryNotFoundError as exc:  # an EntryNotFoundError too: before the generic case
        if is_transient_hub_error(exc):
            raise HubUnavailable(
                f"cannot reach the Hub at {endpoint} for {where} and the HF cache lacks it: "
                "check the network or HF_ENDPOINT; it is retried.",
                repo_id=repo_id,
            ) from exc
        raise OfflineCacheMiss(
            f"{where} is not complete in the HF cache and the Hub may not be used: "
            "run once with network access (without --offline / HF_HUB_OFFLINE).",
            repo_id=repo_id,
        ) from exc
    except OfflineModeIsEnabled as exc:
        raise OfflineCacheMiss(
            f"{where}: offline mode is on and the HF cache lacks it: unset HF_HUB_OFFLINE / --offline to download it.",
            repo_id=repo_id,
        ) from exc
    except EntryNotFoundError as exc:
        raise EntryNotFound(f"{where}: file not found: check the revision.", repo_id=repo_id) from exc
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status in TRANSIENT_STATUS:
            raise HubUnavailable(
                f"the Hub at {endpoint} answered HTTP {status} for {where}: it is retried; "
                "if it persists, try later or use the cache with --offline.",
                repo_id=repo_id,
            ) from exc
        if status in (401, 403):
            raise GatedRepo(
                f"access to {repo_id} refused (HTTP {status}): set HF_TOKEN to a valid token "
                f"with access to {endpoint}/{repo_id}.",
                repo_id=repo_id,
            ) from exc
        raise LoraPrepError(f"the Hub answered HTTP {status} for {where}: check the repo id and revision.") from exc
    except httpx2.TransportError as exc:
        raise HubUnavailable(
            f"cannot reach the Hub at {endpoint} ({type(exc).__name__}) for {where}: "
            "check the network or HF_ENDPOINT; it is retried.",
            repo_id=repo_id,
        ) from exc
    except HFValidationError as exc:
        raise InvalidInput(f"repo_id {repo_id!r} or revision {revision!r} is not valid on the Hub: use 'org/name'.") from exc


# --- file selection (pure) ----------------------------------------------------------------

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


def is_weight_file(path: str) -> bool:
    return path.endswith((".safetensors", ".bin")) and "/" not in path


# --- resolve -------------------------------------------------------------------------------


def resolve_repo(
    repo_id: str,
    revision: str = "main",
    source: SourceSettings = SourceSettings(),
    token: str | None = None,
    *,
    cache_fallback: bool = True,
) -> RepoFacts:
    """Facts about ``repo_id`` at ``revision`` from the Hub (or from the HF cache when offline).

    cache_fallback: when the Hub is unreachable (a transient error), use a complete cached
    snapshot of the revision instead, with a warning and ``offline=True``. The Prefect task
    allows it on its last attempt only, so that retries come first.
    """
    cache_dir = cache_dir_for(source)
    if is_offline(source):
        return _resolve_from_cache(repo_id, revision, source, cache_dir)
    try:
        return _resolve_online(repo_id, revision, source, token, cache_dir)
    except HubUnavailable as exc:
        if not cache_fallback:
            raise
        try:
            facts = _resolve_from_cache(repo_id, revision, source, cache_dir)
        except OfflineCacheMiss:
            raise exc from None
        run_logger().warning(
            "Hub unreachable (%s); using the cached snapshot of %s@%s (commit %s) offline.",
            type(exc.__cause__).__name__ if exc.__cause__ else "HubUnavailable",
            repo_id,
            revision,
            facts.commit_sha[:12],
        )
        return facts


def _resolve_online(repo_id: str, revision: str, source: SourceSettings, token: str | None, cache_dir: str) -> RepoFacts:
    api = HfApi(token=token)
    with hub_errors(repo_id, revision):
        # model_info also for a full sha: one request that validates it and, having no
        # internal backoff, notices an unreachable Hub at once (list_repo_tree would
        # spend up to 23 s in huggingface_hub's own retries first).
        sha = api.model_info(repo_id, revision=revision, timeout=METADATA_TIMEOUT_S).sha
        if is_full_sha(revision) and sha != revision:
            raise RevisionNotFound(f"revision {revision!r} not found in {repo_id}: use an existing full commit sha.")
        tree = [f for f in api.list_repo_tree(repo_id, recursive=True, revision=sha) if isinstance(f, RepoFile)]
    files = [
        HubFile(path=f.path, size=f.size, sha256=f.lfs.sha256 if f.lfs else None, blob_id=f.blob_id)
        for f in sorted(tree, key=lambda f: f.path)
    ]
    paths = {f.path for f in files}
    if "config.json" not in paths:
        raise EntryNotFound(
            f"{repo_id}@{revision} has no config.json at its root: not a transformers model; check the id and revision.",
            repo_id=repo_id,
        )

    def fetch(path: str) -> str:
        with hub_errors(repo_id, revision, path):
            return hf_hub_download(repo_id, path, revision=sha, cache_dir=cache_dir, token=token)

    config = _read_json(fetch("config.json"), repo_id, "config.json")
    selected, fmt = _select(repo_id, revision, files, source, config, lambda p: _read_json(fetch(p), repo_id, p))

    by_path = {f.path: f for f in files}

    def header(path: str):
        # The cache may hold the file already (a warm run): read the header there, no request.
        local = try_to_load_from_cache(repo_id, path, cache_dir=cache_dir, revision=sha)
        if isinstance(local, str) and os.path.getsize(local) == by_path[path].size:
            try:
                return parse_local_safetensors_file_metadata(local)
            except SafetensorsParsingError:
                pass  # a corrupt cached copy: the download stage repairs it; ask the Hub
        with hub_errors(repo_id, revision, path):
            return api.parse_safetensors_file_metadata(repo_id, path, revision=sha, timeout=METADATA_TIMEOUT_S)

    return _facts(repo_id, revision, sha, files, selected, fmt, config, header, offline=False)


def _resolve_from_cache(repo_id: str, revision: str, source: SourceSettings, cache_dir: str) -> RepoFacts:
    storage = repo_cache_dir(cache_dir, repo_id)
    miss = f"{repo_id}@{revision} is not in the HF cache at {cache_dir}: run once with network access to fill it."
    if is_full_sha(revision):
        sha = revision
    else:
        ref = storage / "refs" / revision
        if not ref.is_file():
            raise OfflineCacheMiss(miss, repo_id=repo_id, revision=revision)
        sha = ref.read_text().strip()
    snapshot = storage / "snapshots" / sha
    if not snapshot.is_dir():
        raise OfflineCacheMiss(miss, repo_id=repo_id, revision=revision)

    try:
        # The listing huggingface_hub cached beside the snapshot (trees/<sha>.json); it
        # has no LFS sha256, but an LFS file's blob in the cache is named by it.
        cached = get_cached_repo_tree(repo_id, revision=sha, cache_dir=cache_dir)
        entries = [(f.path, f.size, f.blob_id) for f in cached]
    except CachedRepoTreeNotFoundError:  # filled by an older huggingface_hub: what the snapshot holds
        entries = [
            (p.relative_to(snapshot).as_posix(), p.stat().st_size, "")
            for p in sorted(snapshot.rglob("*"))
            if p.is_file()
        ]
    files = []
    for path, size, blob_id in sorted(entries):
        blob = os.path.basename(os.path.realpath(snapshot / path)) if (snapshot / path).is_symlink() else ""
        files.append(
            HubFile(
                path=path,
                size=size,
                sha256=blob if _SHA256_RE.match(blob) else None,
                blob_id=blob_id or (blob if _GIT_OID_RE.match(blob) else ""),
            )
        )

    def local(path: str) -> Path:
        p = snapshot / path
        if not p.is_file():
            raise OfflineCacheMiss(
                f"{repo_id}@{sha[:12]}: {path} is missing from the HF cache: run once with network access to complete it.",
                repo_id=repo_id,
            )
        return p

    config = _read_json(local("config.json"), repo_id, "config.json")
    selected, fmt = _select(repo_id, revision, files, source, config, lambda p: _read_json(local(p), repo_id, p))
    missing = [p for p in selected if not (snapshot / p).is_file()]
    if missing:
        raise OfflineCacheMiss(
            f"{repo_id}@{sha[:12]}: {len(missing)} selected file(s) missing from the HF cache ({', '.join(missing[:3])}): "
            "run once with network access to complete it.",
            repo_id=repo_id,
        )
    return _facts(
        repo_id, revision, sha, files, selected, fmt, config,
        lambda p: parse_local_safetensors_file_metadata(local(p)), offline=True,
    )


def _select(repo_id, revision, files: list[HubFile], source: SourceSettings, config: dict, read_json) -> tuple[list[str], WeightFormat]:
    """select_files, then the exact shard list from the index (it names the shards, not a pattern)."""
    try:
        selected, fmt = select_files([f.path for f in files], source.allow_pickle, include_code="auto_map" in config)
    except (PickleRefused, EntryNotFound) as exc:
        raise type(exc)(f"{repo_id}@{revision}: {exc}", repo_id=repo_id, revision=revision) from None
    index = next((p for p in selected if p in WEIGHT_INDEXES), None)
    if index is not None:
        shards = set(read_json(index).get("weight_map", {}).values())
        absent = sorted(shards - {f.path for f in files})
        if absent:
            raise EntryNotFound(
                f"{repo_id}@{revision}: {index} names shards the repo lacks ({', '.join(absent[:3])}): "
                "the repo is broken at this revision; pick another revision.",
                repo_id=repo_id,
            )
        selected = sorted({p for p in selected if not is_weight_file(p)} | shards)
    return selected, fmt


def _facts(repo_id, revision, sha, files, selected, fmt, config, header, *, offline: bool) -> RepoFacts:
    by_path = {f.path: f for f in files}
    weights = [p for p in selected if is_weight_file(p)]
    param_count, dtypes = None, {}
    if fmt == "safetensors":
        with ThreadPoolExecutor(max_workers=HEADER_WORKERS) as pool:
            try:
                headers = list(pool.map(header, weights))
            except SafetensorsParsingError as exc:
                raise IntegrityError(
                    f"{repo_id}@{sha[:12]}: a safetensors header does not parse ({exc.__class__.__name__}): "
                    "the file is corrupt; pick another revision or tell the repo owner.",
                    repo_id=repo_id,
                ) from exc
        for meta in headers:
            for dtype, n in meta.parameter_count.items():
                dtypes[dtype] = dtypes.get(dtype, 0) + n
        param_count = sum(dtypes.values())
    return RepoFacts(
        repo_id=repo_id,
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
    )


def _read_json(path: str | Path, repo_id: str, name: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except ValueError as exc:
        raise IntegrityError(f"{repo_id}: {name} is not valid JSON ({exc}): pick another revision.", repo_id=repo_id) from exc
    if not isinstance(data, dict):
        raise IntegrityError(f"{repo_id}: {name} is not a JSON object: pick another revision.", repo_id=repo_id)
    return data


def record_ref(cache_dir: str, repo_id: str, revision: str, sha: str) -> None:
    """Point the cache's refs/<revision> at sha (as huggingface_hub does), atomically.

    Called once the snapshot is complete and verified, so an offline run on a branch or tag
    always finds a whole snapshot behind the ref. A full sha needs no ref.
    """
    if is_full_sha(revision) or revision == sha:
        return
    ref = repo_cache_dir(cache_dir, repo_id) / "refs" / revision
    if ref.is_file() and ref.read_text().strip() == sha:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f".{ref.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(sha)
    os.replace(tmp, ref)


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
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),  # 2, 4, 8 s
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=NO_CACHE,  # a branch can move: always ask the Hub
    timeout_seconds=600,  # metadata and ~100 KB header reads per weight file
)
def resolve(repo_id: str, revision: str = "main", source: SourceSettings = SourceSettings()) -> RepoFacts:
    """resolve_repo with the token looked up here, so it is never a recorded task parameter."""
    return resolve_repo(repo_id, revision, source, get_token(source), cache_fallback=_last_attempt())

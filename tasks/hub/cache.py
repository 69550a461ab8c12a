"""The HF cache is a jail: every value from a server that becomes a path is checked first.

huggingface_hub 2.4 builds cache paths from what the server says, unchecked: the
blob name from the ``ETag`` / ``X-Linked-Etag`` of a ``resolve`` response, the snapshot and
``.no_exist/<commit>/`` folders from ``X-Repo-Commit``, a ref file from the revision. A mirror
(HF_ENDPOINT) answering ``ETag: "../../../x"`` would write outside the cache. So:

- ``guarded_hub()``: while lora-prep calls huggingface_hub, a response hook on its HTTP client
  checks those headers of every ``/resolve/`` response (a hex digest; a 40-hex commit) and
  fails the request with ``BadRepo`` before huggingface_hub sees them (and, for as long, the
  download reads the body in small chunks: ``DOWNLOAD_READ_BYTES``);
- commit shas (``model_info``), revisions (git ref-name rules), LFS sha256s, blob ids and file
  names from the tree listing or a shard index are checked by the ``check_*`` functions here
  before any file operation;
- ``record_ref`` writes ``refs/<revision>`` only for a checked revision and sha.

Also here, because it is cache housekeeping: ``clean_orphaned_downloads`` removes the
``<etag>.<hex>.incomplete`` files that a killed download leaves in ``blobs/`` (huggingface_hub
2.4 downloads to a process-unique temporary file and cannot resume it).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from lora_prep.tasks.common.files import write_atomic
from lora_prep.tasks.errors import BadRepo, InvalidInput
from lora_prep.tasks.hub.env import locks_dir, repo_cache_dir

log = logging.getLogger(__name__)

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
# An ETag that huggingface_hub turns into a blob name: a git blob oid (40 hex) or an LFS sha256 (64 hex).
_ETAG_RE = re.compile(r"^([0-9a-f]{40}|[0-9a-f]{64})$")
# git check-ref-format, the parts that matter for a path: no control characters, space, ~ ^ : ? * [ \
_REF_BAD_CHARS = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")


# --- checks ------------------------------------------------------------------------------------


def check_revision(revision: str) -> str:
    """A revision the user gave: a full sha, or a branch/tag name valid for git (so never a path trick)."""
    problem = _ref_problem(revision)
    if problem:
        raise InvalidInput(
            f"revision {revision!r} is not a valid branch, tag or commit sha ({problem}); "
            "use a branch or tag name such as main or v1.0, or a full 40-hex commit sha."
        )
    return revision


def _ref_problem(ref: str) -> str | None:
    if not ref or len(ref) > 255:
        return "empty or longer than 255 characters"
    if _REF_BAD_CHARS.search(ref):
        return "spaces, control characters and ~^:?*[\\ are not allowed"
    if ref.startswith(("/", "-")) or ref.endswith(("/", ".")) or "//" in ref or ".." in ref or "@{" in ref or ref == "@":
        return "no leading / or -, no trailing / or ., no // , .. or @{"
    if any(part.startswith(".") or part.endswith(".lock") for part in ref.split("/")):
        return "no component may start with . or end with .lock"
    return None


def check_commit(value: object, where: str) -> str:
    """A commit sha from the server (model_info, X-Repo-Commit): exactly 40 lowercase hex."""
    if not isinstance(value, str) or not COMMIT_RE.match(value):
        raise BadRepo(
            f"{where}: the Hub (or the mirror at HF_ENDPOINT) gave {str(value)[:80]!r} as a commit sha, "
            "which is not 40 hex characters: refusing to use it as a cache path; check HF_ENDPOINT."
        )
    return value


def check_repo_path(path: str, where: str) -> str:
    """A file name from the tree listing or a shard index: a relative path inside the repo."""
    p = PurePosixPath(path)
    if not path or "\\" in path or "\x00" in path or p.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise BadRepo(
            f"{where}: the repo lists a file named {path[:120]!r}, which is not a plain relative path: "
            "refusing it (it would point outside the model folder); pick another revision or tell the repo owner."
        )
    return path


def check_blob_names(path: str, sha256: str | None, blob_id: str | None, where: str) -> None:
    """The tree's LFS sha256 and git oid become blob names in the cache: hex digests only."""
    if sha256 is not None and not SHA256_RE.match(sha256):
        raise BadRepo(f"{where}: {path} has LFS sha256 {sha256[:80]!r}, not 64 hex characters; check HF_ENDPOINT.")
    if blob_id and not COMMIT_RE.match(blob_id):
        raise BadRepo(f"{where}: {path} has git blob id {blob_id[:80]!r}, not 40 hex characters; check HF_ENDPOINT.")


def _normalized_etag(value: str) -> str:
    # As huggingface_hub's _normalize_etag: drop a weak-validator prefix and the quotes.
    return value.removeprefix("W/").strip('"')


def check_resolve_headers(url: str, headers: Mapping[str, str]) -> None:
    """The headers of one ``/resolve/`` response that huggingface_hub turns into cache paths."""
    for name in ("X-Repo-Commit",):
        value = headers.get(name)
        if value is not None and not COMMIT_RE.match(value):
            raise BadRepo(
                f"the server at {url.split('/resolve/')[0]} answered {name}: {value[:80]!r} (not a 40-hex commit) for {url}: "
                "refusing to write it into the HF cache; check HF_ENDPOINT."
            )
    for name in ("X-Linked-Etag", "ETag"):
        value = headers.get(name)
        if value is not None and not _ETAG_RE.match(_normalized_etag(value)):
            raise BadRepo(
                f"the server at {url.split('/resolve/')[0]} answered {name}: {value[:80]!r} (not a hex digest) for {url}: "
                "refusing to write it into the HF cache; check HF_ENDPOINT."
            )


# --- the guard on huggingface_hub's HTTP client --------------------------------------------------

_guard_lock = threading.Lock()
_guard_users = 0

# How much of a response body huggingface_hub reads at a time while lora-prep downloads (its own default,
# constants.DOWNLOAD_CHUNK_SIZE, is 10 MiB). httpx collects each chunk in a buffer and copies it twice before
# huggingface_hub writes it, so each of snapshot_download's 8 worker threads holds ~30 MiB at a time: +280 MiB of
# anonymous memory at a cold download's peak (a 0.85 B model in 19 shards), on top of what runs beside the download
# (the MLflow run). With 2 MiB reads that peak is ~170 MiB lower and the download no slower (measured: the same
# download with the MLflow run opening beside it, 4 alternating runs each: peak RssAnon 515-517 MiB against
# 682-706 MiB; 10.5 s against 10.6 s, medians; 1 MiB reads were slower, 11.6 s, and no smaller, 535 MiB).
DOWNLOAD_READ_BYTES = 2 << 20
_chunk_set: int | None = None  # the read size guarded_hub set, while it holds
_chunk_saved = 0  # huggingface_hub's read size before that


def _guard_hook(response: Any) -> None:
    if "/resolve/" in response.request.url.path:
        check_resolve_headers(str(response.request.url), response.headers)


@contextlib.contextmanager
def guarded_hub() -> Iterator[None]:
    """Check resolve-response headers, and read bodies ``DOWNLOAD_READ_BYTES`` at a time, for as long as
    lora-prep calls huggingface_hub.

    Both are process-wide (the hook goes on huggingface_hub's shared client, ``get_session()``; the read
    size is its module constant), set when the first concurrent user enters (parallel tasks may nest) and
    undone when the last one leaves. If something replaces that client meanwhile (``set_client_factory``),
    the next ``guarded_hub`` installs the hook again; a read size someone else set meanwhile is left as it is.
    """
    global _guard_users, _chunk_set, _chunk_saved
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    session = get_session()
    with _guard_lock:
        hooks = session.event_hooks
        if _guard_hook not in hooks["response"]:
            session.event_hooks = {**hooks, "response": [*hooks["response"], _guard_hook]}
        if _guard_users == 0:
            _chunk_saved = constants.DOWNLOAD_CHUNK_SIZE
            # Only ever smaller: a size someone set lower, or None (httpx's "as it arrives"), stays as it is.
            if isinstance(_chunk_saved, int) and _chunk_saved > DOWNLOAD_READ_BYTES:
                _chunk_set = constants.DOWNLOAD_CHUNK_SIZE = DOWNLOAD_READ_BYTES
        _guard_users += 1
    try:
        yield
    finally:
        with _guard_lock:
            _guard_users -= 1
            if _guard_users == 0:
                hooks = session.event_hooks
                session.event_hooks = {**hooks, "response": [h for h in hooks["response"] if h is not _guard_hook]}
                if _chunk_set is not None and constants.DOWNLOAD_CHUNK_SIZE == _chunk_set:
                    constants.DOWNLOAD_CHUNK_SIZE = _chunk_saved
                _chunk_set = None


# --- refs and housekeeping ---------------------------------------------------------------------


def record_ref(cache_dir: str, repo_id: str, revision: str, sha: str) -> None:
    """Point the cache's refs/<revision> at sha (as huggingface_hub does), atomically.

    Called once the snapshot is complete and verified, so an offline run on a branch or tag
    always finds a whole snapshot behind the ref. A full sha needs no ref.
    """
    check_commit(sha, f"{repo_id}@{revision}")
    if COMMIT_RE.match(revision) or revision == sha:
        return
    check_revision(revision)
    refs = repo_cache_dir(cache_dir, repo_id) / "refs"
    ref = refs / revision
    if not ref.resolve().is_relative_to(refs.resolve()):  # belt and braces after check_revision
        raise InvalidInput(f"revision {revision!r} would be written outside {refs}; use a branch, tag or sha.")
    if ref.is_file() and ref.read_text().strip() == sha:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(ref, sha)


def clean_orphaned_downloads(cache_dir: str, repo_id: str) -> list[str]:
    """Remove ``blobs/<etag>.<hex>.incomplete`` files that no live download owns; returns their names.

    huggingface_hub holds ``.locks/<repo>/<etag>.lock`` while it downloads a blob; a blob's
    temporary files whose lock we can take at once belong to a process that died (SIGKILL,
    OOM-kill). A download in progress keeps its lock, so its file is left alone.
    """
    from filelock import FileLock, Timeout

    blobs = repo_cache_dir(cache_dir, repo_id) / "blobs"
    removed: list[str] = []
    if not blobs.is_dir():
        return removed
    by_etag: dict[str, list[Path]] = {}
    for f in blobs.glob("*.incomplete"):
        by_etag.setdefault(f.name.split(".", 1)[0], []).append(f)
    for etag, files in by_etag.items():
        lock_path = locks_dir(cache_dir, repo_id) / f"{etag}.lock"
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(lock_path), timeout=0):
                for f in files:
                    f.unlink(missing_ok=True)
                    removed.append(f.name)
        except Timeout:
            continue  # a live download holds it
    if removed:
        log.info("removed %d orphaned partial download(s) from %s: %s", len(removed), blobs, ", ".join(removed[:3]))
    return removed

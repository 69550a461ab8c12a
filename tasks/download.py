"""Stage 4, download: the selected files at the commit sha into the HF cache, verified once per blob.

The HF cache is the store: ``snapshot_download`` (its file locks make two runs on one
machine fetch each blob once; a cut-off stream resumes with a Range request) fills
``snapshots/<sha>/`` with links to ``blobs/``. Then every selected file is verified:

- LFS file: its blob is named by its sha256 (the Hub's ETag); hash the content and compare
  with that name and with the tree's ``lfs.oid``.
- small git file: size against the listing, and the git blob oid (sha1 of "blob <size>\\0" +
  content) against the tree's oid, which is also the blob's name.

A mismatch deletes the blob and its snapshot link and downloads the file once more; a
second mismatch is an ``IntegrityError``. A verified blob gets a marker
(``models--org--name/.lora-prep/verified/<blob>.json``: size, mtime, inode, sha256) so a
warm run does not hash again; the marker lives inside the repo's cache folder, so
``hf cache delete`` removes it with the blobs and ``hf cache scan`` ignores it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.utils import tqdm as hf_tqdm
from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff
from prefect.utilities.hashing import hash_objects
from pydantic import BaseModel, ConfigDict, Field

from lora_prep.tasks.errors import IntegrityError, NotEnoughDisk
from lora_prep.tasks.hub import (
    HubFile,
    RepoFacts,
    cache_dir_for,
    get_token,
    hub_errors,
    is_offline,
    record_ref,
    repo_cache_dir,
    retry_if_transient,
    run_logger,
)
from lora_prep.tasks.settings import SourceSettings

# Files downloaded in parallel; huggingface_hub's default for snapshot_download.
DOWNLOAD_WORKERS = 8
# Read size when hashing: 8 MiB keeps hashlib busy without holding much memory.
HASH_CHUNK = 8 << 20
MARKER_DIR = (".lora-prep", "verified")
# Bumped when the cache key's meaning changes, so old Prefect cache records stop matching.
CACHE_KEY_VERSION = "download@1"


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SnapshotFile(_Record):
    path: str
    size: int = Field(ge=0, description="Bytes.")
    sha256: str = Field(description="sha256 of the content (verified against the Hub for LFS files).")


class Snapshot(_Record):
    repo_id: str
    revision: str
    commit_sha: str
    snapshot_dir: str = Field(description="snapshots/<sha> in the HF cache: load from here.")
    files: list[SnapshotFile]
    bytes_transferred: int = Field(ge=0, description="File body bytes this call received from the Hub.")
    from_cache: bool = Field(description="True when this call received no file bodies.")
    offline: bool
    seconds: float


# --- disk space ------------------------------------------------------------------------------


def check_disk_space(
    cache_dir: str | Path,
    needed_bytes: int,
    min_free_bytes: int,
    free_bytes_fn: Callable[[str], Any] = shutil.disk_usage,
) -> None:
    """Refuse before downloading when the cache's disk cannot hold needed_bytes and keep min_free_bytes."""
    probe = Path(cache_dir)
    while not probe.exists() and probe != probe.parent:  # the cache may not exist yet
        probe = probe.parent
    free = free_bytes_fn(str(probe)).free
    if free - needed_bytes < min_free_bytes:
        keep = f" and keep {min_free_bytes:,} free (min_free_bytes)" if min_free_bytes else ""
        raise NotEnoughDisk(
            f"the download needs {needed_bytes:,} bytes{keep} in {cache_dir} but only {free:,} bytes are free: "
            "free some space (hf cache delete), or set cache_dir / HF_HUB_CACHE to a larger disk.",
            needed_bytes=needed_bytes,
            free_bytes=free,
        )


# --- counting bytes received -------------------------------------------------------------------

# huggingface_hub's progress bars that advance by the bytes received from the network:
# snapshot_download's aggregated transfer bar, and hf_hub_download's per-file bar.
_TRANSFER_BARS = frozenset({"huggingface_hub.snapshot_download.transfer", "huggingface_hub.http_get"})


def _byte_counter() -> tuple[type, Callable[[], int]]:
    """A tqdm class for huggingface_hub that also counts bytes received, bars shown or not.

    bytes_transferred is what this call received, not what appeared in the cache: when two
    runs fetch the same model at once, the one that waited on huggingface_hub's file lock
    counts 0 (the cache grew for both). A resumed stream counts each byte once.
    """
    received = [0]
    lock = threading.Lock()

    class CountingTqdm(hf_tqdm):
        def __init__(self, *args, **kwargs):
            self._lora_prep_counts = kwargs.get("name") in _TRANSFER_BARS
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            if self._lora_prep_counts and n:
                with lock:
                    received[0] += int(n)
            return super().update(n)

    return CountingTqdm, lambda: received[0]


# --- verification ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Blob:
    pointer: Path  # snapshots/<sha>/<path>
    blob: Path  # blobs/<name> (the pointer itself where symlinks are unsupported)


def _locate(snapshot_dir: Path, path: str) -> _Blob | None:
    pointer = snapshot_dir / path
    if not pointer.is_file():  # missing, or a link to a deleted blob
        return None
    return _Blob(pointer, Path(os.path.realpath(pointer)))


def _hash_file(path: Path, size: int, git: bool) -> tuple[str, str | None]:
    """sha256 and (for small git files) the git blob oid, in one pass."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % size) if git else None
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 else None


def _marker_path(storage: Path, blob_name: str) -> Path:
    return storage.joinpath(*MARKER_DIR, f"{blob_name}.json")


def _stamp(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _read_marker(marker: Path, st: os.stat_result) -> str | None:
    """The recorded sha256 when the blob is unchanged since it was verified, else None."""
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    if {k: data.get(k) for k in ("size", "mtime_ns", "ino")} != _stamp(st):
        return None
    return data.get("sha256")


def _write_marker(marker: Path, st: os.stat_result, sha256: str) -> None:
    """Temp sibling + os.replace: a concurrent reader sees the old marker or the new one."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(f".{marker.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps({**_stamp(st), "sha256": sha256}))
    os.replace(tmp, marker)


@dataclass
class VerifyStats:
    """What verification cost one download_snapshot call (for benchmarks and logs)."""

    files: int = 0  # files checked
    hashed: int = 0  # of which hashed (no valid marker)
    hashed_bytes: int = 0
    hash_seconds: float = 0.0
    seconds: float = 0.0  # the whole verification: stats, markers, hashing


def verify_file(storage: Path, snapshot_dir: Path, hub_file: HubFile, stats: VerifyStats | None = None) -> SnapshotFile | None:
    """SnapshotFile when the cached file matches the Hub's record, None when missing or wrong."""
    located = _locate(snapshot_dir, hub_file.path)
    if located is None:
        return None
    st = located.blob.stat()
    if st.st_size != hub_file.size:
        return None
    linked = located.pointer.is_symlink()
    if linked and hub_file.blob_name and located.blob.name != hub_file.blob_name:
        return None  # the link points at another blob than the listing names
    marker = _marker_path(storage, located.blob.name)
    known = _read_marker(marker, st)
    if known is not None:
        return SnapshotFile(path=hub_file.path, size=st.st_size, sha256=known)
    t0 = time.perf_counter()
    is_lfs = hub_file.sha256 is not None
    sha256, git_oid = _hash_file(located.blob, st.st_size, git=not is_lfs and bool(hub_file.blob_id))
    if stats is not None:
        stats.hashed += 1
        stats.hashed_bytes += st.st_size
        stats.hash_seconds += time.perf_counter() - t0
    if is_lfs and sha256 != hub_file.sha256:
        return None
    if git_oid is not None and git_oid != hub_file.blob_id:
        return None
    if linked:  # markers are keyed by blob name; a copied file (no symlinks) is simply re-hashed
        _write_marker(marker, st, sha256)
    return SnapshotFile(path=hub_file.path, size=st.st_size, sha256=sha256)


def _discard(storage: Path, snapshot_dir: Path, path: str) -> None:
    """Delete a bad file's blob, its marker and its snapshot link, so huggingface_hub fetches it again."""
    pointer = snapshot_dir / path
    if pointer.is_symlink():
        blob = Path(os.path.realpath(pointer))
        _marker_path(storage, blob.name).unlink(missing_ok=True)
        if blob.is_relative_to(storage / "blobs"):
            blob.unlink(missing_ok=True)
    pointer.unlink(missing_ok=True)


# --- download ----------------------------------------------------------------------------------


def missing_bytes(facts: RepoFacts, cache_dir: str) -> int:
    """Bytes of the selected files whose blob is not in the cache yet (what a download must fetch)."""
    blobs = repo_cache_dir(cache_dir, facts.repo_id) / "blobs"
    return sum(f.size for f in (facts.file(p) for p in facts.selected) if not (blobs / f.blob_name).is_file())


def download_snapshot(
    facts: RepoFacts,
    source: SourceSettings = SourceSettings(),
    token: str | None = None,
    *,
    stats: VerifyStats | None = None,
) -> Snapshot:
    """The selected files of facts.repo_id at facts.commit_sha in the HF cache, verified.

    Offline (facts.offline, source.offline or HF_HUB_OFFLINE) uses the cache only.
    stats: filled with what verification hashed (for benchmarks).
    """
    t0 = time.monotonic()
    cache_dir = cache_dir_for(source)
    storage = repo_cache_dir(cache_dir, facts.repo_id)
    offline = facts.offline or is_offline(source)
    repo_id, sha = facts.repo_id, facts.commit_sha
    tqdm_class, received = _byte_counter()
    stats = stats if stats is not None else VerifyStats()

    if not offline:
        check_disk_space(cache_dir, missing_bytes(facts, cache_dir), source.min_free_bytes)
    with hub_errors(repo_id, facts.revision):
        snapshot_dir = Path(
            snapshot_download(
                repo_id,
                revision=sha,
                cache_dir=cache_dir,
                allow_patterns=facts.selected,
                local_files_only=offline,
                token=token,
                max_workers=DOWNLOAD_WORKERS,
                tqdm_class=tqdm_class,
            )
        )

    verified: dict[str, SnapshotFile] = {}
    for attempt in (1, 2):
        bad = []
        t_verify = time.perf_counter()
        for path in facts.selected:
            if path in verified:
                continue
            stats.files += 1
            result = verify_file(storage, snapshot_dir, facts.file(path), stats)
            if result is None:
                bad.append(path)
            else:
                verified[path] = result
        stats.seconds += time.perf_counter() - t_verify
        if not bad:
            break
        for path in bad:
            _discard(storage, snapshot_dir, path)
        if attempt == 2 or offline:
            state = "does not match the Hub's sha256/size after a fresh download" if attempt == 2 else "is corrupt or missing in the HF cache"
            fix = (
                "it was removed from the cache; run again with network access to fetch it again."
                if offline
                else "the Hub or a proxy serves other bytes than it lists; try later, or check HF_ENDPOINT."
            )
            raise IntegrityError(
                f"{repo_id}@{sha[:12]}: {', '.join(bad[:3])} {state}: {fix}",
                repo_id=repo_id,
                revision=facts.revision,
            )
        for path in bad:  # once more, from the Hub; huggingface_hub takes its file lock again
            with hub_errors(repo_id, facts.revision, path):
                hf_hub_download(repo_id, path, revision=sha, cache_dir=cache_dir, token=token, tqdm_class=tqdm_class)

    if not offline:
        record_ref(cache_dir, repo_id, facts.revision, sha)
    transferred = received()
    run_logger().info(
        "%s@%s: %d files in %s, %d bytes received, verified in %.3f s (%d hashed, %d bytes).",
        repo_id, sha[:12], len(verified), snapshot_dir, transferred, stats.seconds, stats.hashed, stats.hashed_bytes,
    )
    return Snapshot(
        repo_id=repo_id,
        revision=facts.revision,
        commit_sha=sha,
        snapshot_dir=str(snapshot_dir),
        files=[verified[p] for p in facts.selected],
        bytes_transferred=transferred,
        from_cache=transferred == 0,
        offline=offline,
        seconds=round(time.monotonic() - t0, 3),
    )


# --- the Prefect task ----------------------------------------------------------------------


def snapshot_state(facts: RepoFacts, cache_dir: str) -> list[tuple[str, int, int, int]] | None:
    """(path, size, mtime_ns, inode) of each selected file's blob, or None when any is missing."""
    snapshot_dir = repo_cache_dir(cache_dir, facts.repo_id) / "snapshots" / facts.commit_sha
    state = []
    for path in facts.selected:
        located = _locate(snapshot_dir, path)
        if located is None:
            return None
        st = located.blob.stat()
        state.append((path, st.st_size, st.st_mtime_ns, st.st_ino))
    return state


@dataclass
class SnapshotOnDisk(CachePolicy):
    """Cache key for ``download``: repo, commit sha, file selection, cache dir, offline, and the
    identity (size, mtime, inode) of every selected file's blob on disk.

    None (no lookup, no record) while any selected file is missing: a deleted file means the
    task runs and downloads what is missing, never a replay of a dead path. Prefect computes
    the key before the task runs, so a cold run stores no record (a record under an
    "incomplete" key would later replay a dead path); the next run, on the complete snapshot,
    stores it and later runs are cache hits. A blob rewritten in place changes its identity,
    so the key changes and the task verifies it again.
    """

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        facts = RepoFacts.model_validate(inputs["facts"])
        source = SourceSettings.model_validate(inputs.get("source") or {})
        cache_dir = cache_dir_for(source)
        state = snapshot_state(facts, cache_dir)
        if state is None:
            return None
        offline = facts.offline or is_offline(source)
        return hash_objects(CACHE_KEY_VERSION, facts.repo_id, facts.commit_sha, sorted(facts.selected), cache_dir, offline, state)


@task(
    name="download",
    retries=3,
    retry_delay_seconds=exponential_backoff(backoff_factor=2),  # 2, 4, 8 s
    retry_jitter_factor=0.5,
    retry_condition_fn=retry_if_transient,
    cache_policy=SnapshotOnDisk(),
    persist_result=True,  # the small Snapshot record only, never file contents
    timeout_seconds=12 * 3600,  # a 140 GB model at 30 MB/s takes 1.3 h; a stuck transfer still ends
)
def download(facts: RepoFacts, source: SourceSettings = SourceSettings()) -> Snapshot:
    """download_snapshot with the token looked up here, so it is never a recorded task parameter."""
    return download_snapshot(facts, source, get_token(source))

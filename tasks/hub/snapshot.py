"""Downloading the selected files at the commit sha into the HF cache, verified once per blob.

The HF cache is the store: ``snapshot_download`` (its file locks make two runs on one machine
fetch each blob once) fills ``snapshots/<sha>/`` with links to ``blobs/``. Selected files are
asked for by exact name (glob-escaped: ``allow_patterns`` are fnmatch patterns, and a file
literally named ``*.model`` must not pull in ``original/huge.model``), inside ``guarded_hub()``
so no server header becomes a path unchecked (tasks/hub/cache.py). Then every file is verified
(tasks/hub/verify.py); a mismatch deletes the blob and fetches it once more, a second mismatch is an
``IntegrityError``. Orphaned partial downloads of killed runs are removed first.

A local model directory is "downloaded" by hashing its selected files (markers under the
lora-prep data directory make a warm run free); the Snapshot then carries a content digest
in place of a commit sha.
"""

from __future__ import annotations

import glob
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_prep.tasks.common.logs import run_logger
from lora_prep.tasks.common.paths import data_home
from lora_prep.tasks.errors import IntegrityError, NotEnoughDisk
from lora_prep.tasks.hub.cache import clean_orphaned_downloads, guarded_hub, record_ref
from lora_prep.tasks.hub.env import cache_dir_for, is_offline, repo_cache_dir
from lora_prep.tasks.hub.errors import hub_errors
from lora_prep.tasks.hub.facts import content_digest
from lora_prep.tasks.hub.stream import StreamHasher
from lora_prep.tasks.hub.verify import (
    VerifyStats,
    discard,
    hash_local_file,
    locate,
    verify_file,
)
from lora_prep.tasks.records.hub import RepoFacts, Snapshot, SnapshotFile
from lora_prep.tasks.settings import SourceSettings

# Files downloaded in parallel; huggingface_hub's default for snapshot_download.
DOWNLOAD_WORKERS = 8


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


def missing_bytes(facts: RepoFacts, cache_dir: str) -> int:
    """Bytes of the selected files whose blob is not in the cache yet (what a download must fetch)."""
    blobs = repo_cache_dir(cache_dir, facts.repo_id) / "blobs"
    return sum(f.size for f in (facts.file(p) for p in facts.selected) if not (blobs / f.blob_name).is_file())


# huggingface_hub's progress bars that advance by the bytes received from the network:
# snapshot_download's aggregated transfer bar, and hf_hub_download's per-file bar.
_TRANSFER_BARS = frozenset({"huggingface_hub.snapshot_download.transfer", "huggingface_hub.http_get"})


def _byte_counter(on_rollback: Callable[[], None] = lambda: None) -> tuple[type, Callable[[], int]]:
    """A tqdm class for huggingface_hub that also counts bytes received, bars shown or not.

    bytes_transferred is what this call received, not what appeared in the cache: when two
    runs fetch the same model at once, the one that waited on huggingface_hub's file lock
    counts 0 (the cache grew for both). A resumed stream counts each byte once.
    on_rollback: called when huggingface_hub winds a bar back (a server ignored its Range request:
    it truncates the partial file and starts that transfer over).
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    received = [0]
    lock = threading.Lock()

    class CountingTqdm(hf_tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self._lora_prep_counts = kwargs.get("name") in _TRANSFER_BARS
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if self._lora_prep_counts and n:
                with lock:
                    received[0] += int(n)
                if n < 0:
                    on_rollback()
            return super().update(n)

    return CountingTqdm, lambda: received[0]


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
    stats = stats if stats is not None else VerifyStats()
    if facts.is_local:
        return local_snapshot(facts, stats=stats)
    from huggingface_hub import hf_hub_download, snapshot_download

    t0 = time.monotonic()
    cache_dir = cache_dir_for(source)
    storage = repo_cache_dir(cache_dir, facts.repo_id)
    offline = facts.offline or is_offline(source)
    repo_id, sha = facts.repo_id, facts.commit_sha
    assert sha is not None, "a Hub RepoFacts always carries its commit sha"

    missing = 0
    if not offline:
        clean_orphaned_downloads(cache_dir, repo_id)
        missing = missing_bytes(facts, cache_dir)
        check_disk_space(cache_dir, missing, source.min_free_bytes)
    streamed = StreamHasher(storage, [] if offline else [facts.file(p) for p in facts.selected])
    tqdm_class, received = _byte_counter(on_rollback=streamed.distrust)
    with guarded_hub(), hub_errors(repo_id, facts.revision), streamed:  # each blob hashed as it lands (hub/stream.py)
        snapshot_dir = Path(
            snapshot_download(
                repo_id,
                revision=sha,
                cache_dir=cache_dir,
                allow_patterns=[glob.escape(p) for p in facts.selected],  # exact names, not patterns
                local_files_only=offline,
                token=token,
                max_workers=DOWNLOAD_WORKERS,
                tqdm_class=tqdm_class,
            )
        )
    streamed.confirm(received(), missing)

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
            discard(storage, snapshot_dir, path)
        if attempt == 2 or offline:
            state = (
                "does not match the Hub's sha256/size after a fresh download" if attempt == 2 else "is corrupt or missing in the HF cache"
            )
            fix = (
                "it was removed from the cache; run again with network access to fetch it again."
                if offline
                else "the Hub or a proxy serves other bytes than it lists; try later, or check HF_ENDPOINT."
            )
            raise IntegrityError(f"{repo_id}@{sha[:12]}: {', '.join(bad[:3])} {state}: {fix}", repo_id=repo_id, revision=facts.revision)
        for path in bad:  # once more, from the Hub; huggingface_hub takes its file lock again
            with guarded_hub(), hub_errors(repo_id, facts.revision, path):
                hf_hub_download(repo_id, path, revision=sha, cache_dir=cache_dir, token=token, tqdm_class=tqdm_class)

    if not offline:
        record_ref(cache_dir, repo_id, facts.revision, sha)
    stats.streamed, stats.streamed_bytes = streamed.stats.verified, streamed.stats.verified_bytes
    transferred = received()
    files = [verified[p] for p in facts.selected]
    run_logger(__name__).info(
        "%s@%s: %d files in %s, %d bytes received (%d verified while they downloaded), verified in %.3f s (%d hashed after, %d bytes).",
        repo_id,
        sha[:12],
        len(verified),
        snapshot_dir,
        transferred,
        stats.streamed,
        stats.seconds,
        stats.hashed,
        stats.hashed_bytes,
    )
    return Snapshot(
        repo_id=repo_id,
        revision=facts.revision,
        commit_sha=sha,
        snapshot_dir=str(snapshot_dir),
        files=files,
        content_digest=content_digest([(f.path, f.sha256) for f in files]),
        bytes_transferred=transferred,
        from_cache=transferred == 0,
        offline=offline,
        seconds=round(time.monotonic() - t0, 3),
    )


def local_marker_dir() -> Path:
    """Where the sha256 of local model files is remembered (never inside the user's directory)."""
    return data_home() / "local-digests"


def local_snapshot(facts: RepoFacts, *, stats: VerifyStats | None = None) -> Snapshot:
    """A local model directory as a Snapshot: each selected file hashed (or its marker read), and their digest."""
    t0 = time.monotonic()
    stats = stats if stats is not None else VerifyStats()
    root = Path(facts.repo_id)
    files = []
    for path in facts.selected:
        p = root / path
        if not p.is_file() or p.stat().st_size != facts.file(path).size:
            raise IntegrityError(f"{root}: {path} changed or disappeared since it was listed: run again once the directory is stable.")
        stats.files += 1
        files.append(SnapshotFile(path=path, size=p.stat().st_size, sha256=hash_local_file(local_marker_dir(), p, stats)))
    digest = content_digest([(f.path, f.sha256) for f in files])
    run_logger(__name__).info("%s: %d local files, content digest %s (%d hashed).", root, len(files), digest[:12], stats.hashed)
    return Snapshot(
        repo_id=facts.repo_id,
        source="local",
        revision=facts.revision,
        commit_sha=None,
        snapshot_dir=str(root),
        files=files,
        content_digest=digest,
        bytes_transferred=0,
        from_cache=True,
        offline=False,
        seconds=round(time.monotonic() - t0, 3),
    )


def snapshot_state(facts: RepoFacts, cache_dir: str) -> list[tuple[str, int, int, int]] | None:
    """(path, size, mtime_ns, inode) of each selected file's blob, or None when any is missing."""
    assert facts.commit_sha is not None, "only a Hub RepoFacts has a snapshot in the HF cache"
    snapshot_dir = repo_cache_dir(cache_dir, facts.repo_id) / "snapshots" / facts.commit_sha
    state = []
    for path in facts.selected:
        located = locate(snapshot_dir, path)
        if located is None:
            return None
        st = located.blob.stat()
        state.append((path, st.st_size, st.st_mtime_ns, st.st_ino))
    return state

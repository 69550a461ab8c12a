"""Verification of cached files against what the Hub lists: once per blob, then a marker.

- LFS file: its blob is named by its sha256 (the Hub's ETag); hash the content and compare
  with that name and with the tree's ``lfs.oid``.
- small git file: size against the listing, and the git blob oid (sha1 of "blob <size>\\0" +
  content) against the tree's oid, which is also the blob's name.

A verified blob gets a marker (``models--org--name/.lora-prep/verified/<blob>.json``: size,
mtime, inode, sha256) so a warm run does not hash again; the marker lives inside the repo's
cache folder, so ``hf cache delete`` removes it with the blobs and ``hf cache scan`` ignores it.
Local model directories are never written to: their markers live under the lora-prep data
directory (``local_marker_dir``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from lora_prep.tasks.common.files import hash_file, sha256_file, write_atomic
from lora_prep.tasks.records.hub import HubFile, SnapshotFile

MARKER_DIR = (".lora-prep", "verified")


@dataclass(frozen=True)
class _Blob:
    pointer: Path  # snapshots/<sha>/<path>
    blob: Path  # blobs/<name> (the pointer itself where symlinks are unsupported)


def locate(snapshot_dir: Path, path: str) -> _Blob | None:
    pointer = snapshot_dir / path
    if not pointer.is_file():  # missing, or a link to a deleted blob
        return None
    return _Blob(pointer, Path(os.path.realpath(pointer)))


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
    """Atomic: a concurrent reader sees the old marker or the new one."""
    marker.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(marker, json.dumps({**_stamp(st), "sha256": sha256}))


def write_marker(storage: Path, blob_name: str, st: os.stat_result, sha256: str) -> None:
    """Record that the blob ``blob_name`` (as ``st`` describes it) has content ``sha256``, checked: a later run trusts it."""
    _write_marker(_marker_path(storage, blob_name), st, sha256)


def remove_marker(storage: Path, blob_name: str) -> None:
    _marker_path(storage, blob_name).unlink(missing_ok=True)


@dataclass
class VerifyStats:
    """What verification cost one download_snapshot call (for benchmarks and logs)."""

    files: int = 0  # files checked
    hashed: int = 0  # of which hashed (no valid marker)
    hashed_bytes: int = 0
    hash_seconds: float = 0.0
    seconds: float = 0.0  # the whole verification after the download: stats, markers, hashing
    streamed: int = 0  # blobs verified from the stream while they downloaded (hub/stream.py)
    streamed_bytes: int = 0


def verify_file(storage: Path, snapshot_dir: Path, hub_file: HubFile, stats: VerifyStats | None = None) -> SnapshotFile | None:
    """SnapshotFile when the cached file matches the Hub's record, None when missing or wrong."""
    located = locate(snapshot_dir, hub_file.path)
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
    sha256, git_oid = hash_file(located.blob, git_blob_size=st.st_size if not is_lfs and hub_file.blob_id else None)
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


def discard(storage: Path, snapshot_dir: Path, path: str) -> None:
    """Delete a bad file's blob, its marker and its snapshot link, so huggingface_hub fetches it again."""
    pointer = snapshot_dir / path
    if pointer.is_symlink():
        blob = Path(os.path.realpath(pointer))
        _marker_path(storage, blob.name).unlink(missing_ok=True)
        if blob.is_relative_to(storage / "blobs"):
            blob.unlink(missing_ok=True)
    pointer.unlink(missing_ok=True)


def hash_local_file(marker_dir: Path, path: Path, stats: VerifyStats | None = None) -> str:
    """sha256 of a file in a local model directory, remembered in ``marker_dir`` by (path, size, mtime, inode).

    The directory is the user's: nothing is written there. A changed file (size, mtime or inode)
    is hashed again, so a digest is never replayed for other bytes.
    """
    st = path.stat()
    marker = marker_dir / f"{hashlib.sha256(str(path).encode()).hexdigest()[:32]}.json"
    known = _read_marker(marker, st)
    if known is not None:
        return known
    t0 = time.perf_counter()
    sha256 = sha256_file(path)
    if stats is not None:
        stats.hashed += 1
        stats.hashed_bytes += st.st_size
        stats.hash_seconds += time.perf_counter() - t0
    _write_marker(marker, st, sha256)
    return sha256

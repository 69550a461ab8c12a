"""Files: writes another process may read at any moment, and the one way a file's bytes are hashed.

A write goes to a temporary sibling, then ``os.replace``: a reader sees the old file or the new one,
never half of one, and a crash leaves at most a hidden ``.<name>.<hex>.tmp`` sibling (never the real name).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` atomically (same directory, so the rename is atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    return write_atomic(path, json.dumps(data, indent=2) + "\n")


# Read size when hashing. Every reader reads into one buffer of its own, reused: a new multi-MiB bytes object
# per read, on several threads at once (one per blob a download is writing), leaves glibc's per-thread malloc
# arenas holding that memory for the rest of the process (measured: 19 threads reading 8 MiB at a time,
# +305 MiB of anonymous memory that stays; one reused 1 MiB buffer each, +20 MiB). 1 MiB hashes as fast as
# 8 MiB, and hashlib releases the GIL on buffers this size.
HASH_CHUNK = 1 << 20


def hash_file(path: str | Path, *, git_blob_size: int | None = None) -> tuple[str, str | None]:
    """The sha256 of a file's content and, given ``git_blob_size``, its git blob oid (sha1 of
    ``blob <size>\\0`` + content: a small file's name in the HF cache), in one read."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % git_blob_size) if git_blob_size is not None else None
    buffer = memoryview(bytearray(HASH_CHUNK))
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            chunk = buffer[:n]
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else None


def sha256_file(path: str | Path) -> str:
    return hash_file(path)[0]

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


# Read size when hashing: 8 MiB keeps hashlib busy (it releases the GIL on large buffers) without holding much memory.
HASH_CHUNK = 8 << 20


def hash_file(path: str | Path, *, git_blob_size: int | None = None) -> tuple[str, str | None]:
    """The sha256 of a file's content and, given ``git_blob_size``, its git blob oid (sha1 of
    ``blob <size>\\0`` + content: a small file's name in the HF cache), in one read."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(b"blob %d\0" % git_blob_size) if git_blob_size is not None else None
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            sha256.update(chunk)
            if sha1 is not None:
                sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest() if sha1 is not None else None


def sha256_file(path: str | Path) -> str:
    return hash_file(path)[0]

"""Writes another process may read at any moment: a temporary sibling, then ``os.replace``.

A reader sees the old file or the new one, never half of one, and a crash leaves at most a
hidden ``.<name>.<hex>.tmp`` sibling (never the real name).
"""

from __future__ import annotations

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

"""Byte sizes: parsing "20GiB" and printing 1.50 GiB, in one place.

KB/MB/GB/TB are decimal and KiB/MiB/GiB/TiB binary, as accelerate reads ``max_memory``.
"""

from __future__ import annotations

import re

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
MiB, GiB = 2**20, 2**30


def is_size(text: object) -> bool:
    return bool(SIZE_RE.match(str(text)))


def parse_size(text: str | int) -> int:
    """'20GiB' -> 21474836480. Raises ValueError naming the value and the expected form."""
    if isinstance(text, int):
        return text
    match = SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"memory size {text!r} is not a size: use e.g. '20GiB' or '512MB'.")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: int | float | None) -> str:
    """GiB with 2 decimals from 1 GiB up, MiB below (so a 1 MB budget does not print as 0.00 GiB)."""
    if n is None:
        return "?"
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    return f"{n / MiB:.2f} MiB"

"""A reader-writer lock across pytest-xdist workers, on flock(2): the `alone` marker's machinery.

Every test holds the shared side; an `alone` test holds the exclusive side. flock alone does not
prefer a waiting writer: the other worker's next test takes the shared lock again in the instant
between two tests, so a waiting `alone` test could wait out the whole module. A gate taken first
closes that: a test takes the gate, then its side of the main lock; a shared holder lets the gate
go at once, the exclusive one keeps it until it is done, so nothing new starts while it waits or runs.
Each wait is bounded (polling, not a blocking flock), longer than the longest test's own timeout.

A `heavy` test (one that runs many processes at once) also holds a third lock, exclusively, inside
its shared hold: two of them at once oversubscribe two cores several times over (the fleet test
beside an eight-runs-at-once test ran past its timeout), but either is fine beside an ordinary test.
The locks are always taken in one order (gate, main, heavy), so no two waiters can wait on each other.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

WAIT_S = 1200.0  # the fleet test's timeout is 420 s; a wait past this is a stuck worker


def _take(fd: int, mode: int, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout:.0f} s for the {what} lock of the other pytest worker") from None
            time.sleep(0.05)


@contextlib.contextmanager
def exclusive_or_shared(directory: Path, *, exclusive: bool, heavy: bool = False, timeout: float = WAIT_S) -> Iterator[None]:
    gate = os.open(directory / "gate", os.O_RDWR | os.O_CREAT, 0o600)
    main = os.open(directory / "main", os.O_RDWR | os.O_CREAT, 0o600)
    one_heavy = os.open(directory / "heavy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _take(gate, fcntl.LOCK_EX, "gate", timeout)
        try:
            _take(main, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, "exclusive" if exclusive else "shared", timeout)
        finally:
            if not exclusive:
                fcntl.flock(gate, fcntl.LOCK_UN)
        if heavy:
            _take(one_heavy, fcntl.LOCK_EX, "heavy", timeout)
        yield
    finally:
        os.close(one_heavy)  # closing the descriptions releases their locks
        os.close(main)
        os.close(gate)

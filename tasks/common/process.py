"""Processes: who this one is, whether the one that owned something is still alive, and its peak memory.

A process is named by (host, pid, start time): a pid alone is reused by the kernel, so an owner whose
pid now belongs to a process started later is gone. The same rule serves the MLflow runs' and the
Prefect flow runs' process tags and the owner file of a half-written artifact directory.
"""

from __future__ import annotations

import os
import resource
import socket
import sys
from dataclasses import dataclass

# Start times of one process read twice differ by rounding only; a reused pid started later differs by more.
_SAME_START_S = 1.0


@dataclass(frozen=True)
class ProcessId:
    host: str
    pid: int
    started: float | None  # seconds since the epoch, as psutil reports the process's creation (None: unknown)

    @classmethod
    def current(cls) -> ProcessId:
        import psutil

        return cls(socket.gethostname(), os.getpid(), round(psutil.Process().create_time(), 3))

    def is_gone(self) -> bool:
        """True when this process no longer runs (only decidable on its own host: False elsewhere)."""
        return self.host == socket.gethostname() and process_gone(self.pid, self.started)


def process_gone(pid: int, started: float | None = None) -> bool:
    """No process with this pid, a zombie, or (with ``started``) a later process that reuses the pid."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return True
        return started is not None and abs(process.create_time() - started) > _SAME_START_S
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # another user's live process
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

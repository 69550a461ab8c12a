"""Hash each LFS blob from the file huggingface_hub is writing, while it downloads: verification costs no wall
time on a cold run (the hash keeps pace with the transfer, on threads that release the GIL).

huggingface_hub 2.4 writes a blob sequentially into ``blobs/<sha256>.<8 hex>.incomplete`` and renames it to
``blobs/<sha256>`` when complete (the same inode). One follower thread per missing blob opens that file as
soon as it appears, reads what has been written (page cache, ``os.pread``) and feeds sha256, then, once the
file is whole and renamed, writes the blob's verified marker (``verify.write_marker``), so the verification
after the download finds it and hashes nothing again.

Only a digest that equals the listing's LFS sha256, over exactly the blob's size, on the renamed file's own
inode, becomes a marker. Anything else leaves the blob to the full verification that follows: a restarted
transfer (huggingface_hub truncates the file when a server ignores its Range request), two candidate files,
a file that never appears (a blob fetched another way, Xet), or a follower still behind when the download
is over and ``FOLLOW_GRACE_S`` has passed. When huggingface_hub starts a transfer over in the same file (it
truncates it and winds its progress bar back), a follower could miss the truncation between two reads and
hash the old bytes of the start with the new ones of the end: ``distrust()`` (called on that wind-back) makes
every follower still running give up. And the digests stand only when this process received exactly the
bytes of the blobs it was missing (``confirm``): a transfer started over, in place or in a new file, received
more; a blob another process downloaded meanwhile, less. Otherwise their markers are removed and the full
verification hashes those blobs: only files that finished in one pass, by this process, are trusted.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from lora_prep.tasks.common.files import HASH_CHUNK
from lora_prep.tasks.hub.verify import remove_marker, write_marker
from lora_prep.tasks.records.hub import HubFile

POLL_S = 0.02  # a follower waiting for bytes, or for its file to appear
# After the download returns, a follower gets this long to hash the tail it has not read yet (it keeps pace
# with loopback transfers of ~200 MB/s here, so the tail is small); then the full verification takes over.
FOLLOW_GRACE_S = 60.0


@dataclass
class StreamStats:
    followed: int = 0  # blobs followed while downloading
    verified: int = 0  # of which verified from the stream (marker written)
    verified_bytes: int = 0
    abandoned: list[str] = field(default_factory=list)  # blob: why the full verification takes it


class StreamHasher:
    """Follow the missing LFS blobs of ``files`` into ``storage`` while a download runs (a context manager)."""

    def __init__(self, storage: Path, files: list[HubFile]) -> None:
        blobs = storage / "blobs"
        self._storage, self._blobs = storage, blobs
        self._files = [f for f in files if f.sha256 and not (blobs / f.sha256).exists()]
        self._done = threading.Event()  # the download returned: no new file will appear
        self._distrusted = threading.Event()  # a transfer started over in place: nothing still followed is trusted
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._written: list[str] = []  # blobs whose marker a follower wrote
        self.stats = StreamStats()

    def __enter__(self) -> StreamHasher:
        self._blobs.mkdir(parents=True, exist_ok=True)
        for f in self._files:
            thread = threading.Thread(target=self._follow, args=(f,), name=f"lora-prep-hash-{(f.sha256 or '')[:8]}", daemon=True)
            thread.start()
            self._threads.append(thread)
        with self._lock:
            self.stats.followed = len(self._threads)
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        deadline = time.monotonic() + FOLLOW_GRACE_S
        for thread in self._threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def confirm(self, received_bytes: int, missing_bytes: int) -> None:
        """Keep the digests of this download only if it received each missing byte exactly once (see above)."""
        if received_bytes == missing_bytes and not self._distrusted.is_set():
            return
        with self._lock:
            written, self._written = self._written, []
            self.stats.verified, self.stats.verified_bytes = 0, 0
            self.stats.abandoned.append(f"all: {received_bytes} bytes received for {missing_bytes} missing (a transfer started over)")
        for blob in written:
            remove_marker(self._storage, blob)

    def distrust(self) -> None:
        """A transfer started over inside its file (see the module's docstring): followers still running give up."""
        self._distrusted.set()

    def _abandon(self, f: HubFile, why: str) -> None:
        with self._lock:
            self.stats.abandoned.append(f"{f.path}: {why}")

    def _follow(self, f: HubFile) -> None:
        assert f.sha256 is not None
        final = self._blobs / f.sha256
        fd = None
        try:
            while fd is None:  # wait for the file huggingface_hub writes
                candidates = list(self._blobs.glob(f"{f.sha256}.*.incomplete"))
                if len(candidates) > 1:
                    return self._abandon(f, "two partial files")
                if candidates:
                    try:
                        fd = os.open(candidates[0], os.O_RDONLY)
                    except FileNotFoundError:  # renamed between the listing and the open: too fast to follow
                        continue
                elif final.exists() or self._done.is_set():
                    return self._abandon(f, "not seen while downloading")
                else:
                    time.sleep(POLL_S)
            self._hash(f, fd, final)
        finally:
            if fd is not None:
                os.close(fd)

    def _hash(self, f: HubFile, fd: int, final: Path) -> None:
        digest, offset, inode = hashlib.sha256(), 0, os.fstat(fd).st_ino
        buffer = memoryview(bytearray(HASH_CHUNK))  # reused: see HASH_CHUNK
        finished_at = None
        while True:
            if self._distrusted.is_set():
                return self._abandon(f, "a transfer started over while it was followed")
            size = os.fstat(fd).st_size
            if size < offset:
                return self._abandon(f, "the transfer restarted (the file was truncated)")
            if size > offset:
                n = os.preadv(fd, [buffer[: min(size - offset, HASH_CHUNK)]], offset)
                digest.update(buffer[:n])
                offset += n
                continue
            if offset == f.size and final.exists():
                st = os.stat(final)
                if st.st_ino != inode or st.st_size != f.size:
                    return self._abandon(f, "the blob is another file than the one followed")
                if digest.hexdigest() != f.sha256:
                    return self._abandon(f, "its bytes do not match the listed sha256")
                if self._distrusted.is_set():
                    return self._abandon(f, "a transfer started over while it was followed")
                with self._lock:
                    write_marker(self._storage, final.name, st, f.sha256)
                    self._written.append(final.name)
                    self.stats.verified += 1
                    self.stats.verified_bytes += f.size
                return None
            if self._done.is_set():
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at > 1.0:  # the download is over and this file will not grow or move
                    return self._abandon(f, "incomplete when the download ended")
            time.sleep(POLL_S)

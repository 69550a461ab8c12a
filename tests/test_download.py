"""Spec of stage 4, download (tasks/download.py): only the selected bytes move, a warm cache
moves none, corrupt blobs are repaired, transient faults end in success, the Hub being down
is survived from a warm cache, concurrent runs share one transfer, and tokens leak nowhere.

Real HTTP against tests/hubserver.py, real huggingface_hub, a fresh HF cache per test.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import uuid
from collections import namedtuple
from pathlib import Path

import pytest

from lora_prep.tasks.errors import (
    GatedRepo,
    IntegrityError,
    NotEnoughDisk,
    OfflineCacheMiss,
)
from lora_prep.tasks.hub.repo import resolve_repo
from lora_prep.tasks.hub.snapshot import check_disk_space, download_snapshot
from lora_prep.tasks.hub.verify import VerifyStats
from lora_prep.tasks.settings import SourceSettings
from tests.model_factory import build_model_dir

THREAD_TIMEOUT_S = 60


def _source(cache: Path, **kw) -> SourceSettings:
    return SourceSettings(cache_dir=str(cache), **kw)


def _whole_file_bytes(hub, repo_id: str) -> int:
    """GET body bytes for repo_id's files, ranged header reads (get_safetensors_metadata) excluded."""
    return sum(r.body_bytes for r in hub.records(f"/{repo_id}/resolve/*", "GET") if r.range is None)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _blob(snapshot_dir: str, path: str) -> Path:
    return Path(os.path.realpath(Path(snapshot_dir) / path))


# --- bytes on the wire ---------------------------------------------------------------------------


def test_cold_run_transfers_exactly_the_selected_files(hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/llama-extras", "main", src)
    snap = download_snapshot(facts, src)

    # whole-file bodies = the selected files, byte for byte (config.json came during resolve)
    assert _whole_file_bytes(hub, "tiny/llama-extras") == facts.selected_bytes
    ranged = [r for r in hub.records("/tiny/llama-extras/resolve/*", "GET") if r.range is not None]
    assert [(r.path.rsplit("/", 1)[1], r.body_bytes) for r in ranged] == [
        ("model.safetensors", min(100_001, facts.file("model.safetensors").size))
    ]
    assert hub.requests("*/pytorch_model.bin") == hub.requests("*/original/*") == 0
    # on disk: the selected files, each verified against the Hub's sha256
    files = {p.relative_to(snap.snapshot_dir).as_posix() for p in Path(snap.snapshot_dir).rglob("*") if p.is_file()}
    assert files == set(facts.selected)
    for f in snap.files:
        assert _sha256(Path(snap.snapshot_dir) / f.path) == f.sha256
        assert f.size == facts.file(f.path).size
    assert facts.file("model.safetensors").sha256 == {f.path: f for f in snap.files}["model.safetensors"].sha256
    # the run's own count: what download_snapshot received (config.json came during resolve)
    assert snap.bytes_transferred == facts.selected_bytes - facts.file("config.json").size
    assert (snap.from_cache, snap.offline, snap.commit_sha) == (False, False, hub.repos["tiny/llama-extras"].sha)


def test_warm_run_transfers_no_file_bodies_and_hashes_nothing(hub, hf_cache):
    src = _source(hf_cache)
    cold_stats, warm_stats = VerifyStats(), VerifyStats()
    first = download_snapshot(resolve_repo("tiny/llama", "main", src), src, stats=cold_stats)
    hub.reset_counters()
    facts = resolve_repo("tiny/llama", "main", src)
    snap = download_snapshot(facts, src, stats=warm_stats)
    assert cold_stats.hashed + cold_stats.streamed == warm_stats.files == len(facts.selected)
    assert cold_stats.streamed >= 1  # the weights were verified while they downloaded
    assert warm_stats.hashed == 0  # the verified markers still match the blobs: no re-hashing
    assert hub.body_bytes("*/resolve/*") == 0  # no body, not even a header range: read from the cache
    assert hub.requests("*/resolve/*", "GET") == 0
    assert hub.requests("/api/models/*") == 2  # revision lookup + tree listing, nothing else
    assert (snap.bytes_transferred, snap.from_cache) == (0, True)
    assert snap.files == first.files and snap.snapshot_dir == first.snapshot_dir


def test_sharded_repo_downloads_index_and_all_shards(hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/llama-sharded", "main", src)
    snap = download_snapshot(facts, src)
    index = json.loads((Path(snap.snapshot_dir) / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) == 3
    assert shards <= {f.path for f in snap.files}
    assert _whole_file_bytes(hub, "tiny/llama-sharded") == facts.selected_bytes


def test_pickle_weights_download_when_allowed(hub, hf_cache):
    src = _source(hf_cache, allow_pickle=True)
    snap = download_snapshot(resolve_repo("tiny/llama-pickle", "main", src), src)
    assert (Path(snap.snapshot_dir) / "pytorch_model.bin").is_file()


def test_deleted_file_is_fetched_again_alone(hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/gpt2", "main", src)
    snap = download_snapshot(facts, src)
    _blob(snap.snapshot_dir, "tokenizer.json").unlink()  # the snapshot link now dangles
    hub.reset_counters()
    again = download_snapshot(facts, src)
    assert _whole_file_bytes(hub, "tiny/gpt2") == facts.file("tokenizer.json").size
    assert again.bytes_transferred == facts.file("tokenizer.json").size
    assert _sha256(Path(again.snapshot_dir) / "tokenizer.json") == facts.file("tokenizer.json").sha256


# --- integrity -------------------------------------------------------------------------------------


def test_corrupted_blob_in_cache_is_detected_and_repaired(hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/llama", "v1", src)
    snap = download_snapshot(facts, src)
    blob = _blob(snap.snapshot_dir, "model.safetensors")
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # same size, one bit pattern off: only the hash can tell
    blob.write_bytes(bytes(data))
    hub.reset_counters()

    repaired = download_snapshot(facts, src)
    size = facts.file("model.safetensors").size
    assert _whole_file_bytes(hub, "tiny/llama") == size  # that one file, once
    assert _sha256(_blob(repaired.snapshot_dir, "model.safetensors")) == facts.file("model.safetensors").sha256
    assert repaired.bytes_transferred == size


def test_a_corrupt_small_file_is_caught_by_its_git_oid(hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/gpt2", "main", src)
    snap = download_snapshot(facts, src)
    blob = _blob(snap.snapshot_dir, "generation_config.json")
    blob.write_text(blob.read_text().replace("1", "7"))  # same size
    repaired = download_snapshot(facts, src)
    assert _blob(repaired.snapshot_dir, "generation_config.json").name == facts.file("generation_config.json").blob_id
    assert "7" not in _blob(repaired.snapshot_dir, "generation_config.json").read_text().split('"bos_token_id"')[0]


def test_hub_serving_other_bytes_than_it_lists_is_an_integrity_error(hub, hf_cache, tmp_path):
    repo_id = f"testbed/drift-{uuid.uuid4().hex[:8]}"
    sha = hub.publish(repo_id, build_model_dir("gpt2", tmp_path / "m"))
    src = _source(hf_cache)
    facts = resolve_repo(repo_id, "main", src)
    # The served file changes after the listing was taken: same size, other bytes.
    served = hub.store / repo_id / "commits" / sha / "model.safetensors"
    data = bytearray(served.read_bytes())
    data[-1] ^= 0xFF
    served.write_bytes(bytes(data))
    hub.reset_counters()
    with pytest.raises(IntegrityError, match=r"model\.safetensors does not match the Hub's sha256.*after a fresh download"):
        download_snapshot(facts, src)
    assert len(hub.records(f"/{repo_id}/resolve/*/model.safetensors", "GET")) == 2  # first try + one repair


# --- transient faults end in success ----------------------------------------------------------------


def test_two_503s_on_file_metadata_are_retried_by_huggingface_hub(hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/gpt2", "main", src)
    hub.reset_counters()
    hub.fail_next(2, status=503, path_glob="/tiny/gpt2/resolve/*/model.safetensors", methods=["HEAD"])
    snap = download_snapshot(facts, src)
    assert [r.status for r in hub.records("*/model.safetensors", "HEAD")] == [503, 503, 200]
    assert _sha256(Path(snap.snapshot_dir) / "model.safetensors") == facts.file("model.safetensors").sha256


def test_a_cut_off_small_file_is_fetched_again_and_the_run_succeeds(hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/llama-sharded", "main", src)
    shard = next(p for p in facts.selected if p.endswith(".safetensors"))
    size = facts.file(shard).size
    hub.reset_counters()
    hub.cut_after(f"/tiny/llama-sharded/resolve/*/{shard}", nbytes=size // 3)
    snap = download_snapshot(facts, src)
    # huggingface_hub keeps bytes in 10 MiB chunks: below one chunk, nothing was kept to resume from
    assert [r.body_bytes for r in hub.records(f"*/{shard}", "GET")] == [size // 3, size]
    assert _sha256(Path(snap.snapshot_dir) / shard) == facts.file(shard).sha256


def test_a_cut_off_large_download_resumes_with_a_range_request(hub, hf_cache, tmp_path):
    import torch
    from safetensors.torch import save_file

    repo_id = f"testbed/large-{uuid.uuid4().hex[:8]}"
    model = build_model_dir("gpt2", tmp_path / "m")
    save_file({"w": torch.arange(3_000_000, dtype=torch.float32)}, str(model / "model.safetensors"))  # 12 MB
    hub.publish(repo_id, model)
    src = _source(hf_cache)
    facts = resolve_repo(repo_id, "main", src)
    size = facts.file("model.safetensors").size
    chunk = 10 * 1024 * 1024  # huggingface_hub's DOWNLOAD_CHUNK_SIZE: the unit it keeps and resumes from
    hub.reset_counters()
    hub.cut_after(f"/{repo_id}/resolve/*/model.safetensors", nbytes=chunk + 1000)
    snap = download_snapshot(facts, src)
    gets = hub.records(f"/{repo_id}/resolve/*/model.safetensors", "GET")
    assert [(r.range, r.body_bytes) for r in gets] == [(None, chunk + 1000), (f"bytes={chunk}-", size - chunk)]
    assert _sha256(Path(snap.snapshot_dir) / "model.safetensors") == facts.file("model.safetensors").sha256
    assert snap.bytes_transferred == facts.selected_bytes - facts.file("config.json").size  # the resumed bytes once


# --- offline ---------------------------------------------------------------------------------------


def test_hub_down_with_warm_cache_works_offline(hub, hf_cache, caplog):
    src = _source(hf_cache)
    online = download_snapshot(resolve_repo("tiny/llama-sharded", "main", src), src)
    hub.refuse()
    facts = resolve_repo("tiny/llama-sharded", "main", src)
    snap = download_snapshot(facts, src)
    assert facts.offline and snap.offline
    assert snap.files == online.files and snap.snapshot_dir == online.snapshot_dir
    assert "Hub unreachable" in caplog.text


def test_offline_download_of_a_corrupt_cache_refuses_and_says_to_reconnect(hub, hf_cache):
    src = _source(hf_cache)
    snap = download_snapshot(resolve_repo("tiny/gpt2", "main", src), src)
    blob = _blob(snap.snapshot_dir, "model.safetensors")
    data = bytearray(blob.read_bytes())
    data[100] ^= 0xFF
    blob.write_bytes(bytes(data))
    offline = _source(hf_cache, offline=True)
    with pytest.raises(IntegrityError, match="run again with network access"):
        download_snapshot(resolve_repo("tiny/gpt2", "main", offline), offline)
    assert not blob.exists()  # removed, so the next online run fetches it
    with pytest.raises(OfflineCacheMiss):
        resolve_repo("tiny/gpt2", "main", offline)


# --- concurrency -------------------------------------------------------------------------------------


def test_two_concurrent_runs_transfer_the_bodies_once(hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/llama-sharded", "main", src)
    hub.reset_counters()
    # Each body GET waits 0.3 s, so the second run arrives while the first holds the file locks.
    hub.delay(0.3, path_glob="/tiny/llama-sharded/resolve/*", methods=["GET"])
    results: dict[int, object] = {}
    start = threading.Barrier(2)

    def run(i: int) -> None:
        start.wait(THREAD_TIMEOUT_S)
        try:
            results[i] = download_snapshot(facts, src)
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), name=f"download-{i}") for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(THREAD_TIMEOUT_S)
    assert not any(t.is_alive() for t in threads)
    a, b = results[0], results[1]
    assert not isinstance(a, Exception) and not isinstance(b, Exception), results
    assert a.files == b.files
    fetched = facts.selected_bytes - facts.file("config.json").size - facts.file("model.safetensors.index.json").size
    assert _whole_file_bytes(hub, "tiny/llama-sharded") == fetched  # one copy over the wire
    assert a.bytes_transferred + b.bytes_transferred == fetched  # and each run counts what it received


# --- disk space ----------------------------------------------------------------------------------------

_Usage = namedtuple("_Usage", "total used free")


def test_disk_check_refuses_naming_needed_and_free_bytes(tmp_path):
    with pytest.raises(NotEnoughDisk, match=r"needs 5,000 bytes in .* but only 4,096 bytes are free: free some space") as err:
        check_disk_space(tmp_path / "not-yet", 5_000, 0, free_bytes_fn=lambda p: _Usage(0, 0, 4_096))
    assert err.value.context == {"needed_bytes": 5_000, "free_bytes": 4_096}
    check_disk_space(tmp_path, 4_000, 96, free_bytes_fn=lambda p: _Usage(0, 0, 4_096))  # exactly fits


def test_download_refuses_before_any_body_when_min_free_cannot_be_kept(hub, hf_cache):
    src = _source(hf_cache, min_free_bytes=2**62)  # more than any disk: the check must refuse
    facts = resolve_repo("tiny/gpt2", "main", src)
    hub.reset_counters()
    with pytest.raises(NotEnoughDisk, match=r"keep 4,611,686,018,427,387,904 free \(min_free_bytes\)"):
        download_snapshot(facts, src)
    assert hub.requests("*/resolve/*") == 0


# --- tokens ----------------------------------------------------------------------------------------


def test_gated_download_with_token_works_and_the_token_shows_nowhere(hub, hf_cache, hub_token, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    src = _source(hf_cache)
    with pytest.raises(GatedRepo):
        resolve_repo("tiny/gated", "main", src)
    facts = resolve_repo("tiny/gated", "main", src, token=hub_token)
    snap = download_snapshot(facts, src, token=hub_token)
    assert (Path(snap.snapshot_dir) / "model.safetensors").is_file()
    out, err = capfd.readouterr()
    for text in (caplog.text, out, err, facts.model_dump_json(), snap.model_dump_json(), repr(facts), repr(snap)):
        assert hub_token not in text


# --- verification from the download stream (tasks/hub/stream.py) -------------------------------------


def _lfs_blobs(facts, snap) -> dict[str, str]:
    return {p: facts.file(p).sha256 for p in facts.selected if facts.file(p).sha256}


def test_a_cold_download_verifies_every_lfs_blob_while_it_downloads_and_hashes_only_small_files_after(hub, hf_cache):
    import hashlib

    src = _source(hf_cache)
    facts = resolve_repo("tiny/llama-sharded", "main", src)
    lfs = _lfs_blobs(facts, None)
    # Tiny files land within the followers' 20 ms poll: hold each LFS transfer a moment, as a real one takes seconds.
    for path in lfs:
        hub.stall_after(f"*/tiny/llama-sharded/resolve/*/{path}", 1_000, seconds=0.3)
    stats = VerifyStats()
    snap = download_snapshot(facts, src, stats=stats)
    assert len(lfs) >= 3 and stats.streamed == len(lfs)  # every shard (and the LFS tokenizer) from the stream
    assert stats.hashed == len(facts.selected) - len(lfs)  # only the small git files after the download
    for f in snap.files:  # the recorded digests are the bytes' own
        assert f.sha256 == hashlib.sha256((Path(snap.snapshot_dir) / f.path).read_bytes()).hexdigest()


def test_a_transfer_that_stalls_mid_body_is_still_verified_from_its_stream(hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/phi3", "main", src)
    hub.stall_after("*/tiny/phi3/resolve/*/model.safetensors", 20_000, seconds=1.5)  # the follower catches up, then waits
    stats = VerifyStats()
    snap = download_snapshot(facts, src, stats=stats)
    weights = next(f for f in snap.files if f.path == "model.safetensors")
    # The stalled weights file came from its stream. The other LFS blob (the tokenizer) is not held, so it may land
    # inside the follower's poll and be hashed after instead: either way each file is verified exactly once.
    assert stats.streamed >= 1 and stats.streamed_bytes >= weights.size
    assert stats.streamed + stats.hashed == len(facts.selected) == stats.files


def test_a_transfer_restarted_from_zero_is_not_trusted_from_the_stream_and_is_verified_whole_after(hub, hf_cache, monkeypatch):
    import huggingface_hub.constants

    # huggingface_hub writes what it received in 10 MB chunks; these files are ~100 KB: write 8 KB at a time
    # (this test only), so the cut below leaves a partial file for huggingface_hub to start over in.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 8192)
    src = _source(hf_cache)
    facts = resolve_repo("tiny/gpt2", "main", src)
    hub.reset_counters()  # the header read above was a Range request too
    weights = "*/tiny/gpt2/resolve/*/model.safetensors"
    # Cut mid-body: huggingface_hub resumes with a Range request; the server ignores it and sends the whole file
    # again, so huggingface_hub truncates its partial file and starts over under the follower.
    hub.stall_after(weights, 30_000, seconds=1.0)  # the client has written 30 KB and the follower has read them ...
    hub.cut_after(weights, 60_000)  # ... then the stream is cut ...
    hub.ignore_range(weights)  # ... and the resume is answered with the whole file
    stats = VerifyStats()
    snap = download_snapshot(facts, src, stats=stats)
    first, again = hub.records(weights, "GET")
    assert first.body_bytes == 60_000 and again.range and again.status == 200 and again.body_bytes == facts.file("model.safetensors").size
    # The weights (and any file still followed when the transfer started over) were left to the full verification ...
    assert stats.streamed <= len(_lfs_blobs(facts, None)) - 1 and stats.hashed == len(facts.selected) - stats.streamed
    weights_file = next(f for f in snap.files if f.path == "model.safetensors")
    assert weights_file.sha256 == facts.file("model.safetensors").sha256  # ... which hashed and accepted them


def _follow_a_writer(tmp_path, write) -> tuple:
    """A StreamHasher following one blob that `write(incomplete_path, final_path, good_bytes)` produces, as huggingface_hub would."""
    import hashlib

    from lora_prep.tasks.hub.stream import StreamHasher
    from lora_prep.tasks.records.hub import HubFile

    storage = tmp_path / "models--t--x"
    good = bytes(range(256)) * 4096  # 1 MiB
    sha = hashlib.sha256(good).hexdigest()
    blob = HubFile(path="model.safetensors", size=len(good), sha256=sha)
    hasher = StreamHasher(storage, [blob])
    with hasher:
        write(storage / "blobs" / f"{sha}.abcd1234.incomplete", storage / "blobs" / sha, good, hasher)
    marker = storage / ".lora-prep" / "verified" / f"{sha}.json"
    return hasher, marker


def test_the_stream_hasher_trusts_a_file_written_in_one_pass(tmp_path):
    def write(incomplete, final, good, hasher):
        with open(incomplete, "wb") as f:
            for i in range(0, len(good), 65536):
                f.write(good[i:i + 65536])
                f.flush()
                time.sleep(0.005)
        os.rename(incomplete, final)

    hasher, marker = _follow_a_writer(tmp_path, write)
    assert hasher.stats.verified == 1 and marker.is_file()


def test_the_stream_hasher_gives_up_on_a_file_truncated_and_rewritten_under_it(tmp_path):
    def write(incomplete, final, good, hasher):
        with open(incomplete, "wb") as f:
            f.write(good[: len(good) // 2])  # the follower reads the correct first half ...
            f.flush()
            time.sleep(0.3)
            f.seek(0)
            f.truncate()  # ... the transfer starts over (as after a server ignored the Range request) ...
            f.flush()
            time.sleep(0.3)
            f.write(b"\xff" * 1024 + good[1024:])  # ... and the new bytes differ where the follower had read
        os.rename(incomplete, final)

    hasher, marker = _follow_a_writer(tmp_path, write)
    assert hasher.stats.verified == 0 and not marker.exists()  # the full verification decides (and would refuse it)


def test_the_stream_hasher_gives_up_when_told_a_transfer_started_over_even_if_it_saw_no_truncation(tmp_path):
    def write(incomplete, final, good, hasher):
        with open(incomplete, "wb") as f:
            f.write(good[: len(good) // 2])
            f.flush()
            time.sleep(0.2)
            hasher.distrust()  # huggingface_hub wound its progress bar back: restarted in place
            f.write(good[len(good) // 2:])
        os.rename(incomplete, final)

    hasher, marker = _follow_a_writer(tmp_path, write)
    assert hasher.stats.verified == 0 and not marker.exists()


# Measuring in a fresh interpreter: ``anon()`` is RssAnon now; ``with PeakAnon() as rss:`` samples it every 10 ms
# while the block runs, and ``rss.growth`` is how far it rose above where it started, at its peak.
_PEAK_ANON = r"""
import threading

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) * 1024

class PeakAnon:
    def __enter__(self):
        self.before, self.peak, self.done = anon(), 0, threading.Event()
        self.thread = threading.Thread(target=self.sample)
        self.thread.start()
        return self
    def sample(self):
        while not self.done.wait(0.01):
            self.peak = max(self.peak, anon())
    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        self.growth = max(self.peak, anon()) - self.before
"""


# Run in a fresh interpreter: 16 blobs written at once, as huggingface_hub's download workers write them, each
# followed by its own hashing thread; prints the followers' verified count and the growth of RssAnon.
_MANY_FOLLOWERS = _PEAK_ANON + r"""
import hashlib, os, sys, threading
from pathlib import Path
from lora_prep.tasks.hub.stream import StreamHasher
from lora_prep.tasks.records.hub import HubFile

storage, n, size = Path(sys.argv[1]), 16, 32 << 20
base = memoryview(bytes(range(256)) * (16 << 12))  # 16 MiB, shared by every writer: writing allocates nothing
def content(i):  # blob i: 8 bytes of its own, then the shared pattern
    return [i.to_bytes(8, "big"), base[: size // 2 - 8], base[: size // 2]]
blobs = []
for i in range(n):
    h = hashlib.sha256()
    for part in content(i):
        h.update(part)
    blobs.append(HubFile(path=f"model-{i:05d}.safetensors", size=size, sha256=h.hexdigest()))
(storage / "blobs").mkdir(parents=True)

def opened_twice(path):  # this writer's descriptor and the follower's: the follower has the file
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return links.count(str(path)) >= 2

def write(i, blob):
    incomplete = storage / "blobs" / f"{blob.sha256}.abcd1234.incomplete"
    fd = os.open(incomplete, os.O_WRONLY | os.O_CREAT)
    for n, part in enumerate(content(i)):
        for at in range(0, len(part), 4 << 20):
            os.write(fd, part[at:at + (4 << 20)])
        if n == 1:  # half written: wait (bounded) for the follower to open it, or it would see only the renamed blob
            for _ in range(1000):
                if opened_twice(incomplete):
                    break
                threading.Event().wait(0.01)
    os.close(fd)
    os.rename(incomplete, storage / "blobs" / blob.sha256)

hasher = StreamHasher(storage, blobs)
with PeakAnon() as rss, hasher:
    writers = [threading.Thread(target=write, args=(i, b)) for i, b in enumerate(blobs)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
print(hasher.stats.verified, rss.growth, anon() - rss.before)
"""


def test_blobs_hashed_while_they_download_cost_a_small_buffer_each_and_leave_no_memory_behind(tmp_path):
    """A cold download of a sharded model follows every shard being written with a thread that hashes it. Each
    reads into one small buffer it reuses: a new 8 MiB read each time, on 16 threads at once, left glibc's
    per-thread arenas holding ~250 MiB for the rest of the process (the load that follows included)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _MANY_FOLLOWERS, str(tmp_path / "models--t--x")],
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    verified, peak_growth, kept = (int(v) for v in out)
    assert verified == 16  # every shard verified from the stream ...
    assert peak_growth < 64 << 20, f"RssAnon grew {peak_growth >> 20} MiB while hashing 16 shards"  # ... with ~1 MiB each
    assert kept < 32 << 20, f"{kept >> 20} MiB of RssAnon stayed after the hashing"


def test_the_stream_hasher_withdraws_its_markers_when_the_bytes_received_do_not_add_up(tmp_path):
    def write(incomplete, final, good, hasher):
        incomplete.write_bytes(good)
        time.sleep(0.2)
        os.rename(incomplete, final)

    hasher, marker = _follow_a_writer(tmp_path, write)
    assert marker.is_file()
    hasher.confirm(received_bytes=2 * 1024 * 1024, missing_bytes=1024 * 1024)  # received twice what was missing
    assert hasher.stats.verified == 0 and not marker.exists()


# Run in a fresh interpreter: a cold download_snapshot of argv[1] into the cache argv[2]; prints the files, the
# growth of RssAnon at its peak and whether huggingface_hub's read size is its own again.
_COLD_SHARDS = _PEAK_ANON + r"""
import sys
from huggingface_hub import constants
from lora_prep.tasks.hub.repo import resolve_repo
from lora_prep.tasks.hub.snapshot import DOWNLOAD_WORKERS, download_snapshot
from lora_prep.tasks.settings import SourceSettings

source = SourceSettings(cache_dir=sys.argv[2])
facts = resolve_repo(sys.argv[1], "main", source)
default = constants.DOWNLOAD_CHUNK_SIZE
with PeakAnon() as rss:
    snapshot = download_snapshot(facts, source)
shards = sum(f.path.endswith(".safetensors") for f in snapshot.files)
print(shards, DOWNLOAD_WORKERS, rss.growth, int(constants.DOWNLOAD_CHUNK_SIZE == default))
"""


@pytest.mark.slow
def test_a_cold_download_of_many_shards_holds_little_memory_while_eight_transfers_run(hub, hf_cache, tmp_path):
    """huggingface_hub reads a body 10 MiB at a time and httpx copies each chunk twice before it is written: ~30 MiB
    per download thread, +280 MiB at the peak of a cold 0.85 B download in 19 shards, while lora-prep opens its
    MLflow run beside it. lora-prep's downloads read 2 MiB at a time, and leave huggingface_hub's setting as it was."""
    import subprocess
    import sys

    from tests.model_factory import build_big_model_dir

    model = build_big_model_dir(tmp_path / "many-shards", hidden=1024, layers=8, max_shard_size="24MB")
    hub.publish("testbed/many-shards", model)
    out = subprocess.run([sys.executable, "-c", _COLD_SHARDS, "testbed/many-shards", str(hf_cache)],
                         capture_output=True, text=True, timeout=300, check=True).stdout.split()
    shards, workers, peak_growth, restored = (int(v) for v in out)
    assert shards >= workers == 8  # every download thread busy with a shard of more than 10 MiB at once
    assert peak_growth < 128 << 20, f"RssAnon grew {peak_growth >> 20} MiB while {workers} threads downloaded {shards} shards"
    assert restored == 1


def test_the_small_reads_last_until_the_last_concurrent_hub_call_ends_and_leave_a_setting_made_meanwhile():
    """Two preparations in one process (Prefect runs tasks in threads) call the hub at once: the first to finish
    must not give huggingface_hub its 10 MiB reads back while the other still downloads, and the last restores
    what was there before, not what the other one saw when it entered."""
    from huggingface_hub import constants

    from lora_prep.tasks.hub.cache import DOWNLOAD_READ_BYTES, guarded_hub

    default = constants.DOWNLOAD_CHUNK_SIZE
    assert default > DOWNLOAD_READ_BYTES
    entered = [threading.Event(), threading.Event()]
    leave = [threading.Event(), threading.Event()]

    def preparation(i: int) -> None:
        with guarded_hub():
            entered[i].set()
            assert leave[i].wait(THREAD_TIMEOUT_S)

    threads = [threading.Thread(target=preparation, args=(i,)) for i in (0, 1)]
    try:
        threads[0].start()
        assert entered[0].wait(THREAD_TIMEOUT_S)
        threads[1].start()  # enters while the first one holds the small reads
        assert entered[1].wait(THREAD_TIMEOUT_S)
        assert constants.DOWNLOAD_CHUNK_SIZE == DOWNLOAD_READ_BYTES
        leave[0].set()
        threads[0].join(THREAD_TIMEOUT_S)
        assert not threads[0].is_alive()
        assert constants.DOWNLOAD_CHUNK_SIZE == DOWNLOAD_READ_BYTES  # the second one still downloads
        leave[1].set()
        threads[1].join(THREAD_TIMEOUT_S)
        assert not threads[1].is_alive()
        assert constants.DOWNLOAD_CHUNK_SIZE == default
    finally:  # a failed assertion leaves no thread waiting
        for event in leave:
            event.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(THREAD_TIMEOUT_S)

    try:
        with guarded_hub():
            constants.DOWNLOAD_CHUNK_SIZE = 5 << 20  # the user's own code changes it meanwhile
        assert constants.DOWNLOAD_CHUNK_SIZE == 5 << 20
        for theirs in (1 << 20, None):  # set before, smaller, or None (httpx: as it arrives): used as it is, and kept
            constants.DOWNLOAD_CHUNK_SIZE = theirs  # type: ignore[assignment]
            with guarded_hub():
                assert constants.DOWNLOAD_CHUNK_SIZE == theirs
            assert constants.DOWNLOAD_CHUNK_SIZE == theirs
    finally:
        constants.DOWNLOAD_CHUNK_SIZE = default

"""The test bed's Hub server, specified through the real huggingface_hub and transformers clients.

Repos here are hand-made (tiny real safetensors files, a sharded pair with its index, a
gated repo) and published under the "testbed/" org of the session hub.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import (
    HfApi,
    get_safetensors_metadata,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from safetensors.torch import save_file

from tests.hubserver import HubServer, publish

TINY, SHARDED, GATED, BIG = "testbed/tiny", "testbed/sharded", "testbed/gated", "testbed/big"
MIB = 1024 * 1024
TINY_PARAMS = 256 * 200 + 10  # "w" float32 256x200 + "b" bfloat16 10
SHARDED_PARAMS = 100 * 10 + 50 * 4 + 3  # shard 1: "a"; shard 2: "b" and "c"
WEIGHTS_SIZE_FLOOR = 200_000  # bytes; model.safetensors is larger, so a cut at 50 kB lands mid-file


@dataclass(frozen=True)
class Published:
    v1: str  # tag v1: the first commit of testbed/tiny
    main: str  # main: a second commit (README changed)
    branch: str  # branch "dev/slash" (a slash in a branch name)
    pr: str  # ref "refs/pr/1"
    files: dict[str, bytes]  # testbed/tiny's files at main
    big: bytes  # testbed/big's weights.bin: 12 MiB, more than huggingface_hub's 10 MiB download chunk


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _safetensors_bytes(tmp: Path, tensors: dict[str, torch.Tensor]) -> bytes:
    save_file(tensors, str(tmp))
    return tmp.read_bytes()


@pytest.fixture(scope="module")
def testbed(hub: HubServer, tmp_path_factory: pytest.TempPathFactory) -> Published:
    tmp = tmp_path_factory.mktemp("testbed")
    gen = torch.Generator().manual_seed(0)
    config = {"model_type": "gpt2", "n_layer": 1, "n_head": 2, "n_embd": 8, "vocab_size": 16, "n_positions": 32}
    config.update(bos_token_id=0, eos_token_id=0)  # inside the 16-token vocabulary: no warning
    files = {
        "config.json": json.dumps(config).encode(),
        "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}).encode(),
        "README.md": b"# tiny v1\n",
        "model.safetensors": _safetensors_bytes(
            tmp / "w.safetensors",
            {"w": torch.randn(256, 200, generator=gen), "b": torch.zeros(10, dtype=torch.bfloat16)},
        ),
        "original/consolidated.00.pth": b"\x80\x02pickle-ish" * 10,  # LFS by suffix
        "vocab.txt": b"token\n" * 2100,  # 12.6 KiB: LFS by size
    }
    _write(tmp / "v1", files)
    v1 = publish(hub.store, TINY, tmp / "v1", tags=["v1"])
    files["README.md"] = b"# tiny main\n"
    _write(tmp / "main", files)
    main = publish(hub.store, TINY, tmp / "main")
    _write(tmp / "branch", {**files, "README.md": b"# tiny on dev/slash\n"})
    branch = publish(hub.store, TINY, tmp / "branch", branch="dev/slash")
    _write(tmp / "pr", {**files, "README.md": b"# tiny in a PR\n"})
    pr = publish(hub.store, TINY, tmp / "pr", branch="refs/pr/1")

    shard1 = _safetensors_bytes(tmp / "s1.safetensors", {"a": torch.ones(100, 10)})
    shard2 = _safetensors_bytes(
        tmp / "s2.safetensors", {"b": torch.ones(50, 4, dtype=torch.float16), "c": torch.ones(3)}
    )
    index = {
        "metadata": {"total_size": 100 * 10 * 4 + 50 * 4 * 2 + 3 * 4},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
            "c": "model-00002-of-00002.safetensors",
        },
    }
    _write(
        tmp / "sharded",
        {
            "config.json": json.dumps(config).encode(),
            "model.safetensors.index.json": json.dumps(index).encode(),
            "model-00001-of-00002.safetensors": shard1,
            "model-00002-of-00002.safetensors": shard2,
        },
    )
    publish(hub.store, SHARDED, tmp / "sharded")
    _write(tmp / "gated", {"config.json": json.dumps(config).encode(), "model.safetensors": files["model.safetensors"]})
    publish(hub.store, GATED, tmp / "gated", gated=True)
    big = bytes(range(256)) * (12 * MIB // 256)
    _write(tmp / "big", {"weights.bin": big})
    publish(hub.store, BIG, tmp / "big")
    assert len(files["model.safetensors"]) > WEIGHTS_SIZE_FLOOR
    return Published(v1=v1, main=main, branch=branch, pr=pr, files=files, big=big)


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


# --- downloads ---------------------------------------------------------------------------


def test_snapshot_download_fetches_only_allowed_files_with_the_published_bytes(hf_cache, hub, testbed):
    folder = Path(snapshot_download(TINY, allow_patterns=["*.json", "original/*"], cache_dir=hf_cache))

    got = {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert folder.name == testbed.main
    assert got == {k: testbed.files[k] for k in ("config.json", "tokenizer.json", "original/consolidated.00.pth")}
    assert hub.requests("*/model.safetensors", "GET") == 0


def test_hf_hub_download_caches_lfs_blobs_by_sha256_and_git_files_by_blob_sha1(hf_cache, hub, testbed):
    weights = Path(hf_hub_download(TINY, "model.safetensors", cache_dir=hf_cache))
    tokenizer = Path(hf_hub_download(TINY, "tokenizer.json", cache_dir=hf_cache))

    assert weights.read_bytes() == testbed.files["model.safetensors"]
    assert weights.resolve().name == hashlib.sha256(testbed.files["model.safetensors"]).hexdigest()
    assert tokenizer.resolve().name == _git_blob_sha1(testbed.files["tokenizer.json"])
    expected = len(testbed.files["model.safetensors"]) + len(testbed.files["tokenizer.json"])
    assert hub.body_bytes("*/resolve/*") == expected  # each file sent once, whole


def test_cut_off_download_of_a_small_file_restarts_from_zero(hf_cache, hub, testbed):
    # Measured on huggingface_hub 2.4: http_get catches httpx2.RemoteProtocolError, sleeps 1 s and
    # resumes from the bytes it wrote; but httpx2's iter_bytes(10 MiB) buffers whole chunks, so
    # under 10 MiB nothing was written and the retry is a full GET.
    size = len(testbed.files["model.safetensors"])
    hub.cut_after("*/model.safetensors", 50_000)

    path = hf_hub_download(TINY, "model.safetensors", cache_dir=hf_cache)

    assert Path(path).read_bytes() == testbed.files["model.safetensors"]
    gets = hub.records("*/model.safetensors", "GET")
    assert [(r.status, r.range, r.body_bytes) for r in gets] == [(200, None, 50_000), (200, None, size)]
    assert hub.body_bytes("*/model.safetensors") == 50_000 + size


def test_cut_off_download_past_10_mib_resumes_with_a_range_request(hf_cache, hub, testbed):
    size, cut, resumed_at = len(testbed.big), 11 * MIB, 10 * MIB  # resumes from the last whole 10 MiB chunk
    hub.cut_after("*/weights.bin", cut)

    path = hf_hub_download(BIG, "weights.bin", cache_dir=hf_cache)

    assert Path(path).read_bytes() == testbed.big
    gets = hub.records("*/weights.bin", "GET")
    assert [(r.status, r.range, r.body_bytes) for r in gets] == [
        (200, None, cut),
        (206, f"bytes={resumed_at}-", size - resumed_at),
    ]


def test_range_requests_answer_206_clamped_to_the_file_and_416_past_its_end(hf_cache, hub, testbed):
    data = testbed.files["model.safetensors"]
    size = len(data)
    url = f"{hub.url}/{TINY}/resolve/main/model.safetensors"
    with httpx2.Client(timeout=10) as client:
        middle = client.get(url, headers={"Range": "bytes=10-19"})
        tail = client.get(url, headers={"Range": f"bytes={size - 5}-{size + 100}"})
        suffix = client.get(url, headers={"Range": "bytes=-7"})
        past = client.get(url, headers={"Range": f"bytes={size}-"})

    assert (middle.status_code, middle.content) == (206, data[10:20])
    assert middle.headers["Content-Range"] == f"bytes 10-19/{size}"
    assert (tail.status_code, tail.content) == (206, data[-5:])
    assert tail.headers["Content-Range"] == f"bytes {size - 5}-{size - 1}/{size}"
    assert (suffix.status_code, suffix.content) == (206, data[-7:])
    assert (past.status_code, past.headers["Content-Range"]) == (416, f"bytes */{size}")
    assert [r.body_bytes for r in hub.records("*/model.safetensors") if r.status == 206] == [10, 5, 7]


# --- metadata ----------------------------------------------------------------------------


def test_model_info_reports_sha_siblings_gating_and_parameter_count(hf_cache, hub, testbed):
    api = HfApi()
    info = api.model_info(TINY, files_metadata=True)
    gated = api.model_info(GATED)  # like the Hub: metadata of a gated repo is public
    only_sha = api.model_info(TINY, expand=["sha"])

    siblings = {s.rfilename: s for s in info.siblings}
    assert info.sha == testbed.main and info.private is False and info.gated is False
    assert set(siblings) == set(testbed.files)
    assert siblings["model.safetensors"].lfs.sha256 == hashlib.sha256(testbed.files["model.safetensors"]).hexdigest()
    assert siblings["config.json"].lfs is None
    assert info.safetensors.total == TINY_PARAMS and info.safetensors.parameters == {"F32": 256 * 200, "BF16": 10}
    assert gated.gated == "auto"
    assert (only_sha.sha, only_sha.siblings) == (testbed.main, None)


def test_list_repo_tree_marks_lfs_files_and_honours_recursive_and_path(hf_cache, hub, testbed):
    api = HfApi()
    top = {e.path: e for e in api.list_repo_tree(TINY)}
    everything = {e.path: e for e in api.list_repo_tree(TINY, recursive=True)}
    under = [e.path for e in api.list_repo_tree(TINY, "original")]

    assert set(top) == {*(p for p in testbed.files if "/" not in p), "original"}
    assert set(everything) == {*testbed.files, "original"}
    assert under == ["original/consolidated.00.pth"]
    lfs = {p for p, e in everything.items() if getattr(e, "lfs", None)}
    assert lfs == {"model.safetensors", "vocab.txt", "original/consolidated.00.pth"}
    assert everything["vocab.txt"].lfs.sha256 == hashlib.sha256(testbed.files["vocab.txt"]).hexdigest()
    assert everything["config.json"].blob_id == _git_blob_sha1(testbed.files["config.json"])


def test_get_safetensors_metadata_counts_parameters_of_a_single_file(hf_cache, hub, testbed):
    meta = get_safetensors_metadata(TINY)

    assert not meta.sharded
    assert meta.parameter_count == {"F32": 256 * 200, "BF16": 10}


def test_get_safetensors_metadata_counts_parameters_across_shards(hf_cache, hub, testbed):
    meta = get_safetensors_metadata(SHARDED)

    assert meta.sharded
    assert sum(meta.parameter_count.values()) == SHARDED_PARAMS
    assert meta.weight_map["c"] == "model-00002-of-00002.safetensors"


def test_autoconfig_from_pretrained_reads_the_config_through_the_hub(hf_cache, hub, testbed):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(TINY, cache_dir=hf_cache)
    pinned = AutoConfig.from_pretrained(TINY, revision="v1", cache_dir=hf_cache)

    assert (config.model_type, config.n_layer, config.n_embd) == ("gpt2", 1, 8)
    assert pinned.n_embd == 8
    assert (hf_cache / "models--testbed--tiny" / "snapshots" / testbed.v1 / "config.json").exists()


# --- revisions ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("revision", "expected"),
    [
        ("main", "main"),
        ("v1", "v1"),
        ("refs/tags/v1", "v1"),
        ("refs/heads/main", "main"),
        ("dev/slash", "branch"),
        ("refs/pr/1", "pr"),
    ],
)
def test_branches_tags_and_refs_resolve_to_their_commit_and_a_full_sha_to_itself(hf_cache, testbed, revision, expected):
    sha = getattr(testbed, expected)
    api = HfApi()

    assert api.model_info(TINY, revision=revision).sha == sha
    assert api.model_info(TINY, revision=sha).sha == sha


def test_a_branch_with_a_slash_serves_that_branch_s_files(hf_cache, testbed):
    readme = hf_hub_download(TINY, "README.md", revision="dev/slash", cache_dir=hf_cache)

    assert Path(readme).read_bytes() == b"# tiny on dev/slash\n"
    assert Path(readme).parent.name == testbed.branch


def test_publish_is_deterministic_and_chains_commits_on_a_branch(tmp_path):
    src = tmp_path / "src"
    _write(src, {"config.json": b"{}", "sub/weights.bin": b"\0" * 32})

    first = publish(tmp_path / "a", "org/x", src)
    again = publish(tmp_path / "b", "org/x", src)
    second = publish(tmp_path / "a", "org/x", src, tags=["v2"])

    meta = json.loads((tmp_path / "a" / "org" / "x" / "repo.json").read_text())
    assert first == again and second != first
    assert meta["refs"] == {"main": second, "v2": second} and meta["tags"] == ["v2"]
    assert meta["commits"] == [first, second] and meta["parents"][second] == first
    assert (tmp_path / "a" / "org" / "x" / "commits" / first / "sub" / "weights.bin").read_bytes() == b"\0" * 32


def test_publish_with_link_serves_the_source_files_without_copying_them(hf_cache, hub, tmp_path):
    """`make bench` publishes its generated models so (22 GB with 7b would otherwise be on disk twice)."""
    src = tmp_path / "src"
    weights = bytes(range(256)) * (3 * MIB // 256)
    _write(src, {"config.json": b"{}", "weights.bin": weights})

    sha = publish(hub.store, "testbed/linked", src, link=True)

    served = hub.store / "testbed" / "linked" / "commits" / sha / "weights.bin"
    assert served.stat().st_ino == (src / "weights.bin").stat().st_ino  # the same file, not a copy
    got = Path(hf_hub_download("testbed/linked", "weights.bin", revision=sha, cache_dir=hf_cache))
    assert got.read_bytes() == weights


# --- errors as the Hub signals them --------------------------------------------------------


def test_unknown_repo_raises_repository_not_found(hf_cache, testbed):
    with pytest.raises(RepositoryNotFoundError) as info_err:
        HfApi().model_info("testbed/no-such-repo")
    with pytest.raises(RepositoryNotFoundError) as download_err:
        hf_hub_download("testbed/no-such-repo", "config.json", cache_dir=hf_cache)

    assert not isinstance(info_err.value, GatedRepoError) and not isinstance(download_err.value, GatedRepoError)
    assert info_err.value.response.status_code == 404


@pytest.mark.parametrize("revision", ["no-such-branch", "0" * 40])
def test_unknown_revision_raises_revision_not_found(hf_cache, testbed, revision):
    with pytest.raises(RevisionNotFoundError):
        HfApi().model_info(TINY, revision=revision)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(TINY, "config.json", revision=revision, cache_dir=hf_cache)


def test_missing_file_raises_entry_not_found_and_is_remembered_at_its_commit(hf_cache, testbed):
    with pytest.raises(RemoteEntryNotFoundError):
        hf_hub_download(TINY, "no-such-file.json", cache_dir=hf_cache)

    # huggingface_hub caches the absence under the commit named by X-Repo-Commit
    assert (hf_cache / "models--testbed--tiny" / ".no_exist" / testbed.main / "no-such-file.json").exists()


def test_gated_repo_refuses_without_token_or_with_a_wrong_one_and_serves_the_accepted_one(hf_cache, hub_token, testbed):
    with pytest.raises(GatedRepoError) as anonymous:
        hf_hub_download(GATED, "config.json", cache_dir=hf_cache)
    with pytest.raises(GatedRepoError) as wrong:
        hf_hub_download(GATED, "config.json", cache_dir=hf_cache, token="hf_not_the_token")
    with pytest.raises(GatedRepoError):
        get_safetensors_metadata(GATED)
    path = hf_hub_download(GATED, "config.json", cache_dir=hf_cache, token=hub_token)

    assert (anonymous.value.response.status_code, wrong.value.response.status_code) == (401, 403)
    assert Path(path).read_bytes() == testbed.files["config.json"]


# --- fault injection -----------------------------------------------------------------------


def test_injected_503_reaches_the_client_as_hf_hub_http_error(hf_cache, hub, testbed):
    hub.fail_next(1, status=503, path_glob=f"/api/models/{TINY}*")

    with pytest.raises(HfHubHTTPError) as err:
        HfApi().model_info(TINY)  # model_info does not retry
    after = HfApi().model_info(TINY)  # only the next request failed

    assert err.value.response.status_code == 503
    assert err.value.response.headers["Retry-After"] == "0"
    assert after.sha == testbed.main


def test_injected_429_on_a_download_is_retried_by_huggingface_hub(hf_cache, hub, testbed):
    hub.fail_next(1, status=429, path_glob="*/resolve/*/tokenizer.json", methods=("GET",))

    path = hf_hub_download(TINY, "tokenizer.json", cache_dir=hf_cache)

    assert Path(path).read_bytes() == testbed.files["tokenizer.json"]
    assert [r.status for r in hub.records("*/tokenizer.json", "GET")] == [429, 200]


@pytest.mark.alone  # a time bound
def test_a_delayed_answer_makes_the_client_time_out(hf_cache, hub, testbed):
    hub.delay(1.0, path_glob=f"/api/models/{TINY}", times=1)
    started = time.monotonic()

    with pytest.raises(httpx2.TimeoutException):
        HfApi().model_info(TINY, timeout=0.2)

    assert time.monotonic() - started < 1.0
    deadline = time.monotonic() + 3.0  # the server still answers once the delay is over
    while hub.requests(f"/api/models/{TINY}") == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hub.requests(f"/api/models/{TINY}") == 1, hub.records()


def test_a_refusing_hub_is_a_connection_error_and_a_warm_cache_still_serves(hf_cache, hub, testbed):
    warm = snapshot_download(TINY, allow_patterns=["config.json"], cache_dir=hf_cache)
    hub.refuse(True)
    try:
        with pytest.raises(httpx2.ConnectError):
            HfApi().model_info(TINY)
        # the trap in PITFALLS.md: no error, the cached snapshot comes back
        offline = snapshot_download(TINY, allow_patterns=["config.json"], cache_dir=hf_cache)
    finally:
        hub.refuse(False)

    assert offline == warm
    assert HfApi().model_info(TINY).sha == testbed.main


# --- lifecycle ----------------------------------------------------------------------------


def test_stop_closes_keep_alive_connections_ends_threads_and_frees_the_port(tmp_path):
    _write(tmp_path / "src", {"config.json": b"{}"})
    with HubServer(tmp_path / "store") as server:
        server.publish("org/x", tmp_path / "src")
        with httpx2.Client(timeout=5) as client:  # keeps its connection open after the response
            assert client.get(f"{server.url}/api/models/org/x").json()["id"] == "org/x"
            server.stop()
            with pytest.raises(httpx2.ConnectError):
                client.get(f"{server.url}/api/models/org/x")

    port_threads = [t for t in threading.enumerate() if t.name.startswith(f"hubserver-{server.port}")]
    assert port_threads == []
    assert server.errors == []

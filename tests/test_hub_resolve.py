"""Spec of stage 1, resolve (tasks/resolve.py): revision -> commit sha, file selection, metadata
without weights, typed fail-fast errors, and facts read from the cache when offline.

Everything talks over real HTTP to tests/hubserver.py with the real huggingface_hub client.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from lora_prep.tasks.errors import (
    EntryNotFound,
    GatedRepo,
    HubUnavailable,
    OfflineCacheMiss,
    PickleRefused,
    RepoNotFound,
    RevisionNotFound,
)
from lora_prep.tasks.hub.env import get_token
from lora_prep.tasks.hub.repo import resolve_repo
from lora_prep.tasks.hub.selection import select_files
from lora_prep.tasks.hub.snapshot import download_snapshot
from lora_prep.tasks.settings import SourceSettings
from tests.model_factory import build_model_dir


def _source(cache: Path, **kw) -> SourceSettings:
    return SourceSettings(cache_dir=str(cache), **kw)


# --- select_files: pure ------------------------------------------------------------------------

EXTRAS_TREE = [
    ".gitattributes", "README.md", "config.json", "generation_config.json", "model.safetensors",
    "pytorch_model.bin", "original/consolidated.00.pth", "original/params.json", "original/tokenizer.model",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "chat_template.jinja", "model.gguf", "model.onnx", "flax_model.msgpack", "tf_model.h5", "rust_model.ot",
    "modeling_x.py", "onnx/model.onnx",
]


def test_select_files_takes_config_tokenizer_and_safetensors_only():
    selected, fmt = select_files(EXTRAS_TREE, allow_pickle=True)
    assert fmt == "safetensors"
    assert selected == sorted([
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "chat_template.jinja",
    ])


def test_select_files_takes_index_and_shards_never_consolidated_duplicates():
    tree = ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "consolidated.safetensors", "pytorch_model.bin"]
    selected, fmt = select_files(tree, allow_pickle=False)
    assert (fmt, selected) == ("safetensors", sorted(tree[:4]))


def test_select_files_adds_python_files_only_for_remote_code():
    tree = ["config.json", "model.safetensors", "modeling_tiny.py", "configuration_tiny.py", "scripts/convert.py"]
    assert "modeling_tiny.py" not in select_files(tree, allow_pickle=False)[0]
    with_code, _ = select_files(tree, allow_pickle=False, include_code=True)
    assert {"modeling_tiny.py", "configuration_tiny.py"} <= set(with_code)
    assert "scripts/convert.py" not in with_code


def test_select_files_refuses_pickle_only_unless_allowed():
    tree = ["config.json", "pytorch_model.bin", "tokenizer.json"]
    with pytest.raises(PickleRefused, match=r"allow_pickle.*--allow-pickle"):
        select_files(tree, allow_pickle=False)
    assert select_files(tree, allow_pickle=True) == (sorted(tree), "pickle")


def test_select_files_without_loadable_weights_names_what_it_looked_for():
    with pytest.raises(EntryNotFound, match=r"model\.safetensors.*pytorch_model\.bin"):
        select_files(["config.json", "model.gguf", "original/consolidated.00.pth"], allow_pickle=True)


# --- resolve against the hub ---------------------------------------------------------------------


def test_branch_tag_and_full_sha_resolve_to_the_commit(hub, hf_cache):
    llama = hub.repos["tiny/llama"]
    src = _source(hf_cache)
    assert resolve_repo("tiny/llama", "main", src).commit_sha == llama.shas["main"]
    tagged = resolve_repo("tiny/llama", "v1", src)
    assert (tagged.revision, tagged.commit_sha) == ("v1", llama.shas["v1"])
    pinned = resolve_repo("tiny/llama", llama.shas["v1"], src)
    assert pinned.commit_sha == llama.shas["v1"]
    # every request after the revision lookup names the sha, never the branch or tag
    assert hub.requests("*/tree/main*") == hub.requests("*/tree/v1*") == 0
    assert hub.requests("*/resolve/main/*") == hub.requests("*/resolve/v1/*") == 0


def test_facts_give_params_dtypes_and_sizes_from_headers_without_downloading_weights(hub, hf_cache):
    facts = resolve_repo("tiny/llama-extras", "main", _source(hf_cache))
    repo = hub.repos["tiny/llama-extras"]
    assert facts.weight_format == "safetensors"
    assert set(facts.selected) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}
    assert {f.path for f in facts.files} == set(repo.files)  # the whole tree, original/ included
    sizes = {f.path: f.size for f in facts.files}
    assert facts.selected_bytes == sum(sizes[p] for p in facts.selected)
    assert facts.weight_bytes == sizes["model.safetensors"]
    assert facts.stored_dtypes == {"F32": facts.param_count} and 40_000 < facts.param_count < 50_000
    assert facts.file("model.safetensors").sha256 and facts.file("config.json").sha256 is None
    assert facts.config["model_type"] == "llama" and facts.offline is False
    # weights: one ranged read of the header, never a whole body
    weight_gets = hub.records("*/resolve/*/model.safetensors", "GET")
    assert [r.range for r in weight_gets] == ["bytes=0-100000"]
    assert hub.body_bytes("*/resolve/*/model.safetensors") == min(100_001, sizes["model.safetensors"])
    assert hub.requests("*pytorch_model.bin") == hub.requests("*/original/*") == 0


def test_sharded_repo_selects_the_index_and_the_shards_it_names(hub, hf_cache):
    facts = resolve_repo("tiny/llama-sharded", "main", _source(hf_cache))
    shards = [p for p in facts.selected if p.endswith(".safetensors")]
    assert len(shards) == 3 and "model.safetensors.index.json" in facts.selected
    assert facts.param_count == resolve_repo("tiny/llama", "main", _source(hf_cache)).param_count
    assert len(hub.records("*/resolve/*/model-*.safetensors", "GET")) == 3  # one header read per shard


def test_bf16_repo_reports_stored_dtype(hub, hf_cache):
    facts = resolve_repo("tiny/phi3", "main", _source(hf_cache))
    assert list(facts.stored_dtypes) == ["BF16"]


def test_remote_code_repo_selects_its_python_files(hub, hf_cache):
    facts = resolve_repo("tiny/remote-code", "main", _source(hf_cache))
    assert {"modeling_tiny.py", "configuration_tiny.py"} <= set(facts.selected)
    assert "auto_map" in facts.config


def test_pickle_only_repo_is_refused_naming_allow_pickle_and_allowed_on_request(hub, hf_cache):
    with pytest.raises(PickleRefused, match=r"tiny/llama-pickle.*allow_pickle=True \(--allow-pickle\)"):
        resolve_repo("tiny/llama-pickle", "main", _source(hf_cache))
    facts = resolve_repo("tiny/llama-pickle", "main", _source(hf_cache, allow_pickle=True))
    assert facts.weight_format == "pickle" and "pytorch_model.bin" in facts.selected
    assert facts.param_count is None and facts.stored_dtypes == {}


def test_a_branch_that_moves_is_picked_up(hub, hf_cache, tmp_path):
    repo_id = f"testbed/moving-{uuid.uuid4().hex[:8]}"
    first = build_model_dir("llama", tmp_path / "first", seed=0)
    sha1 = hub.publish(repo_id, first)
    src = _source(hf_cache)
    facts1 = resolve_repo(repo_id, "main", src)
    download_snapshot(facts1, src)

    second = Path(shutil.copytree(first, tmp_path / "second"))
    (second / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2, "max_new_tokens": 7}\n')
    sha2 = hub.publish(repo_id, second)
    assert sha2 != sha1
    facts2 = resolve_repo(repo_id, "main", src)
    assert facts2.commit_sha == sha2
    snap2 = download_snapshot(facts2, src)
    assert snap2.snapshot_dir.endswith(sha2)
    assert "max_new_tokens" in (Path(snap2.snapshot_dir) / "generation_config.json").read_text()
    # only the changed file's body moved: the other blobs are shared between the commits
    assert snap2.bytes_transferred == facts2.file("generation_config.json").size
    assert (hf_cache / f"models--testbed--{repo_id.split('/')[1]}" / "refs" / "main").read_text() == sha2


# --- fail fast on permanent errors, with one request each ---------------------------------------


def test_unknown_repo_fails_fast_with_a_fix(hub, hf_cache):
    with pytest.raises(RepoNotFound, match=r"'tiny/nope' not found.*check the id, or it may be private: set HF_TOKEN") as err:
        resolve_repo("tiny/nope", "main", _source(hf_cache))
    assert hub.requests("/api/models/tiny/nope*") == 1
    assert "\n" not in str(err.value)


def test_unknown_revision_fails_fast(hub, hf_cache):
    with pytest.raises(RevisionNotFound, match=r"revision 'no-such-branch' not found in tiny/llama"):
        resolve_repo("tiny/llama", "no-such-branch", _source(hf_cache))
    assert hub.requests("/api/models/tiny/llama/*") == 1


def test_gated_repo_without_token_fails_fast_with_the_terms_url(hub, hf_cache):
    with pytest.raises(GatedRepo, match=r"accept the terms on http\S+/tiny/gated and set HF_TOKEN"):
        resolve_repo("tiny/gated", "main", _source(hf_cache))
    assert hub.requests("/tiny/gated/resolve/*") == 1  # the config HEAD, answered 401, not retried


def test_wrong_token_for_gated_repo_is_refused(hub, hf_cache):
    with pytest.raises(GatedRepo):
        resolve_repo("tiny/gated", "main", _source(hf_cache), token="hf_wrong_token_0000000000")


def test_hub_down_with_empty_cache_is_a_transient_error(hub, hf_cache):
    hub.refuse()
    with pytest.raises(HubUnavailable, match="cannot reach the Hub"):
        resolve_repo("tiny/llama", "main", _source(hf_cache))


# --- offline: facts from the cache ----------------------------------------------------------------


def test_offline_facts_match_online_facts_without_any_request(hub, hf_cache):
    src = _source(hf_cache)
    online = resolve_repo("tiny/llama-sharded", "main", src)
    download_snapshot(online, src)
    hub.reset_counters()
    offline = resolve_repo("tiny/llama-sharded", "main", _source(hf_cache, offline=True))
    assert hub.requests() == 0
    assert offline.offline is True
    assert offline.model_dump(exclude={"offline", "files"}) == online.model_dump(exclude={"offline", "files"})
    online_files = {f.path: f for f in online.files}
    for f in offline.files:  # sha256 known offline for the cached LFS files: the blob's name
        if f.path in online.selected:
            assert f == online_files[f.path]


def test_offline_without_cache_says_how_to_fill_it(hub, hf_cache):
    with pytest.raises(OfflineCacheMiss, match="run once with network access"):
        resolve_repo("tiny/llama", "main", _source(hf_cache, offline=True))
    assert hub.requests() == 0


def test_offline_by_environment_variable(hub, hf_cache, monkeypatch):
    src = _source(hf_cache)
    download_snapshot(resolve_repo("tiny/gpt2", "main", src), src)
    hub.reset_counters()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    facts = resolve_repo("tiny/gpt2", "main", src)
    assert facts.offline and hub.requests() == 0


def test_unreachable_hub_falls_back_to_a_complete_cached_snapshot(hub, hf_cache, caplog):
    src = _source(hf_cache)
    online = resolve_repo("tiny/llama", "v1", src)
    download_snapshot(online, src)
    hub.refuse()
    facts = resolve_repo("tiny/llama", "v1", src)
    assert facts.offline and facts.commit_sha == online.commit_sha
    assert "Hub unreachable" in caplog.text and "offline" in caplog.text
    with pytest.raises(HubUnavailable):  # the Prefect task forbids the fallback until its last attempt
        resolve_repo("tiny/llama", "v1", src, cache_fallback=False)


# --- tokens ----------------------------------------------------------------------------------------


def test_token_comes_from_hf_token_or_nowhere(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert get_token(SourceSettings()) is None
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    assert get_token(SourceSettings()) == "hf_from_env"

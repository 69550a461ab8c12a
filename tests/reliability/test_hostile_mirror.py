"""The HF cache is a jail: a mirror (HF_ENDPOINT) answering with path-like headers writes nothing outside it,
and selected files are fetched by exact name, never as glob patterns."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lora_prep.tasks.errors import BadRepo
from lora_prep.tasks.settings import SourceSettings


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def jail(tmp_path, hf_cache):
    """The cache, and the directories around it that a '../../../x' would reach."""
    around = tmp_path
    before = _tree(around) - {p for p in _tree(around) if p.startswith("hf-cache")}
    yield hf_cache
    after = _tree(around) - {p for p in _tree(around) if p.startswith("hf-cache")}
    assert after == before, f"written outside the cache: {sorted(after - before)}"
    assert not [p for p in _tree(hf_cache) if p.endswith("/x") or p == "x"]


def _download(repo_id: str, cache: Path):
    from lora_prep.tasks.hub.repo import resolve_repo
    from lora_prep.tasks.hub.snapshot import download_snapshot

    source = SourceSettings(cache_dir=str(cache))
    return download_snapshot(resolve_repo(repo_id, "main", source), source)


@pytest.mark.parametrize("header", ["ETag", "X-Linked-Etag"])
def test_a_path_as_etag_is_refused_before_huggingface_hub_writes_a_blob(hub, jail, header):
    hub.override_headers("*/tiny/gpt2/resolve/*", {header: '"../../../x"'})
    with pytest.raises(BadRepo) as err:
        _download("tiny/gpt2", jail)
    assert header in str(err.value) and "HF_ENDPOINT" in str(err.value)


def test_a_path_as_the_commit_of_a_404_is_refused_before_huggingface_hub_writes_no_exist_markers(hub, jail):
    from huggingface_hub import hf_hub_download

    from lora_prep.tasks.hub.cache import guarded_hub
    from lora_prep.tasks.hub.errors import hub_errors

    hub.override_headers("*/tiny/gpt2/resolve/*/no-such-file.txt", {"X-Repo-Commit": "../../../x"})
    with pytest.raises(BadRepo), guarded_hub(), hub_errors("tiny/gpt2", "main"):
        hf_hub_download("tiny/gpt2", "no-such-file.txt", cache_dir=str(jail))


def test_a_commit_sha_from_the_server_must_be_40_hex_before_it_names_a_snapshot_folder():
    from lora_prep.tasks.hub.cache import check_commit

    for bad in ("../../../x", "A" * 40, "a" * 39, "a" * 40 + "/", ""):
        with pytest.raises(BadRepo):
            check_commit(bad, "tiny/llama@main")
    assert check_commit("a" * 40, "x") == "a" * 40


def test_a_revision_that_is_a_path_never_becomes_a_ref_file(hub, jail):
    from lora_prep.tasks.errors import InvalidInput
    from lora_prep.tasks.hub.cache import record_ref

    with pytest.raises(InvalidInput):
        record_ref(str(jail), "tiny/llama", "../../../x", "a" * 40)
    with pytest.raises(InvalidInput):
        record_ref(str(jail), "tiny/llama", "refs/../../x", "a" * 40)


def test_a_file_literally_named_star_dot_model_is_fetched_alone_not_as_a_pattern(hub, jail, bad_repos):
    snapshot = _download(bad_repos["star"], jail)
    fetched = {p.relative_to(snapshot.snapshot_dir).as_posix() for p in Path(snapshot.snapshot_dir).rglob("*") if p.is_file()}
    assert "*.model" in fetched and "original/huge.model" not in fetched
    assert hub.body_bytes(f"*/{bad_repos['star']}/resolve/*/original/*") == 0


def test_the_guard_is_only_on_while_lora_prep_calls_the_hub(hub, hf_cache):
    from huggingface_hub.utils import get_session

    from lora_prep.tasks.hub.cache import _guard_hook

    _download("tiny/gpt2", hf_cache)
    assert _guard_hook not in get_session().event_hooks["response"]
    assert os.environ.get("HF_ENDPOINT") == hub.url

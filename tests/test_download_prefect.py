"""Spec of the Prefect layer of resolve and download: the download task's cache (hit on a
complete snapshot, miss when a file is gone), retries only on transient errors, the
offline fallback on the last attempt only, and a token from a Secret block that appears
in no log, parameter or stored result.

Tasks run inside small flows under Prefect's test harness (a real API server on SQLite).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest
from prefect import flow

from lora_prep.tasks.download import download
from lora_prep.tasks.errors import (
    GatedRepo,
    InvalidInput,
    RepoNotFound,
    RevisionNotFound,
)
from lora_prep.tasks.hub.env import get_token
from lora_prep.tasks.hub.repo import resolve_repo
from lora_prep.tasks.records.hub import RepoFacts, Snapshot
from lora_prep.tasks.resolve import resolve
from lora_prep.tasks.settings import SourceSettings

# Retries as declared on the tasks, without the waiting.
resolve_now = resolve.with_options(retry_delay_seconds=0, retry_jitter_factor=None)
download_now = download.with_options(retry_delay_seconds=0, retry_jitter_factor=None)


@flow(name="test-resolve")
def resolve_flow(repo_id: str, revision: str, source: SourceSettings) -> RepoFacts:
    return resolve_now(repo_id, revision, source)


@flow(name="test-download")
def download_flow(facts: RepoFacts, source: SourceSettings) -> tuple[str, Snapshot]:
    state = download_now(facts, source, return_state=True)
    return state.name, state.result()


@flow(name="test-prepare")
def prepare_flow(repo_id: str, source: SourceSettings) -> tuple[RepoFacts, Snapshot]:
    facts = resolve_now(repo_id, "main", source)
    return facts, download_now(facts, source)


def _source(cache: Path, **kw) -> SourceSettings:
    return SourceSettings(cache_dir=str(cache), **kw)


def test_download_task_is_a_cache_hit_on_a_complete_snapshot_and_a_miss_when_a_file_is_gone(prefect_harness, hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/llama", "main", src)
    hub.reset_counters()

    name, cold = download_flow(facts, src)
    assert name == "Completed" and cold.bytes_transferred > 0

    # Files were missing when the cold run's key was computed, so it stored no record; the
    # first run on the complete snapshot stores it (and transfers nothing).
    hub.reset_counters()
    name, warm = download_flow(facts, src)
    assert name == "Completed" and warm.bytes_transferred == 0 and hub.body_bytes() == 0
    name, cached = download_flow(facts, src)
    assert name == "Cached" and cached == warm
    assert all((Path(cached.snapshot_dir) / f.path).is_file() for f in cached.files)

    blob = Path(os.path.realpath(Path(cold.snapshot_dir) / "tokenizer.json"))
    blob.unlink()
    hub.reset_counters()
    name, again = download_flow(facts, src)
    assert name == "Completed"  # a miss: the task ran and fetched only what was missing
    assert hub.body_bytes("*/resolve/*") == facts.file("tokenizer.json").size
    assert again.bytes_transferred == facts.file("tokenizer.json").size
    assert (Path(again.snapshot_dir) / "tokenizer.json").is_file()


def test_resolve_task_retries_503_on_the_revision_lookup(prefect_harness, hub, hf_cache):
    hub.fail_next(2, status=503, path_glob="/api/models/tiny/gpt2/revision/*")
    facts = resolve_flow("tiny/gpt2", "main", _source(hf_cache))
    assert facts.commit_sha == hub.repos["tiny/gpt2"].sha and not facts.offline
    assert [r.status for r in hub.records("/api/models/tiny/gpt2/revision/*")] == [503, 503, 200]


def test_download_task_retries_503_on_a_file_body(prefect_harness, hub, hf_cache):
    src = _source(hf_cache)
    facts = resolve_repo("tiny/gpt2", "main", src)
    hub.reset_counters()
    # huggingface_hub retries a body GET on 408/429 only: 503s surface as HubUnavailable -> Prefect retries.
    hub.fail_next(2, status=503, path_glob="/tiny/gpt2/resolve/*/model.safetensors", methods=["GET"])
    name, snap = download_flow(facts, src)
    assert name == "Completed"
    assert [r.status for r in hub.records("*/model.safetensors", "GET")] == [503, 503, 200]
    ok_bodies = sum(r.body_bytes for r in hub.records("*/model.safetensors", "GET") if r.status == 200)
    assert ok_bodies == facts.file("model.safetensors").size


def test_permanent_errors_are_not_retried(prefect_harness, hub, hf_cache):
    with pytest.raises(RepoNotFound, match="check the id"):
        resolve_flow("tiny/nope", "main", _source(hf_cache))
    assert hub.requests("/api/models/tiny/nope*") == 1
    with pytest.raises(GatedRepo, match="accept the terms"):
        resolve_flow("tiny/gated", "main", _source(hf_cache))
    assert hub.requests("/tiny/gated/resolve/*") == 1
    with pytest.raises(RevisionNotFound):
        resolve_flow("tiny/llama", "no-such-branch", _source(hf_cache))
    assert hub.requests("/api/models/tiny/llama/revision/no-such-branch*") == 1


def test_resolve_falls_back_to_the_cache_only_after_its_retries(prefect_harness, hub, hf_cache):
    src = _source(hf_cache)
    download_flow(resolve_repo("tiny/llama", "v1", src), src)
    hub.reset_counters()
    hub.fail_next(100, status=503, path_glob="/api/models/tiny/llama/revision/*")
    facts = resolve_flow("tiny/llama", "v1", src)
    assert facts.offline and facts.commit_sha == hub.repos["tiny/llama"].shas["v1"]
    assert hub.requests("/api/models/tiny/llama/revision/*") == 1 + resolve_now.retries
    name, snap = download_flow(facts, src)
    assert snap.offline and hub.requests("*/resolve/*") == 0


def test_token_from_a_secret_block_opens_a_gated_repo_and_is_recorded_nowhere(prefect_harness, hub, hf_cache, hub_token, capfd, caplog):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )

    block = f"hf-token-{uuid.uuid4().hex[:8]}"
    Secret(value=hub_token).save(block)
    src = _source(hf_cache, token_secret=block)
    caplog.set_level("DEBUG")
    prepare_flow("tiny/gated", src)  # cold; the second run, on a complete snapshot, stores the task's result
    state = prepare_flow("tiny/gated", src, return_state=True)
    facts, snap = state.result()
    assert (Path(snap.snapshot_dir) / "model.safetensors").is_file()

    # Task runs and logs reach the API in the background: wait for them, bounded.
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
        deadline = time.monotonic() + 20
        while True:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id])))
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            if len(tasks) == 2 and logs:
                break
            assert time.monotonic() < deadline, f"the API holds {len(tasks)} task runs and {len(logs)} logs of the flow run"
            time.sleep(0.2)
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    stored = [p.read_bytes() for p in Path(PREFECT_LOCAL_STORAGE_PATH.value()).rglob("*") if p.is_file()]
    out, err = capfd.readouterr()
    recorded = [
        json.dumps(run.parameters),
        *(t.model_dump_json() for t in tasks),
        *(log.message for log in logs),
        caplog.text, out, err,
        facts.model_dump_json(), snap.model_dump_json(),
    ]
    assert all(hub_token not in text for text in recorded)
    assert stored and all(hub_token.encode() not in data for data in stored)


def test_a_missing_secret_block_is_named_with_the_fix(prefect_harness):
    with pytest.raises(InvalidInput, match=r"token_secret 'no-such-block': no Prefect Secret block.*Secret\(value=<token>\)\.save"):
        get_token(SourceSettings(token_secret="no-such-block"))

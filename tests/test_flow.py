"""The prepare flow end to end: real Prefect API (test harness), the local hub over HTTP,
real MLflow SQLite stores, real tiny models. No stage is mocked."""

from __future__ import annotations

import json
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lora_prep.tasks.common.paths import fetched_references_dir
from lora_prep.tasks.records.manifest import read_manifest
from lora_prep.tasks.settings import (
    LoadSettings,
    LoraSettings,
    OutputSettings,
    SourceSettings,
    TrackingSettings,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")


def _prepare(model_id: str, cache: Path, mlflow_uri: str, out: Path, flow=None, **kwargs):
    from lora_prep.flows.prepare_model import prepare_model

    flow = flow or prepare_model
    return flow(
        model_id=model_id,
        source=kwargs.pop("source", SourceSettings(cache_dir=str(cache))),
        tracking=kwargs.pop("tracking", TrackingSettings(tracking_uri=mlflow_uri)),
        output=OutputSettings(output_dir=str(out)),
        **kwargs,
    )


def _artifact_files(client, run_id: str, path: str = "") -> dict[str, int]:
    files = {}
    for info in client.list_artifacts(run_id, path or None):
        if info.is_dir:
            files.update(_artifact_files(client, run_id, info.path))
        else:
            files[info.path] = info.file_size
    return files


def test_prepare_records_one_finished_mlflow_run_with_params_metrics_tags_and_adapter_only_artifacts(hub, hf_cache, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    result = _prepare("tiny/llama", hf_cache, mlflow_uri, tmp_path / "out", lora=LoraSettings(r=4))

    assert result.commit_sha == hub.repos["tiny/llama"].sha
    assert result.bytes_downloaded > 0 and not result.from_cache
    assert set(result.seconds) == {"resolve", "probe", "plan", "download", "build", "track"}
    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model_id"] == "tiny/llama" and params["revision"] == "main"
    assert params["commit_sha"] == result.commit_sha
    assert params["plan.dtype"] == "float32" and params["plan.device_map"] == "cpu"
    assert params["lora.r"] == "4" and "q_proj" in params["lora.target_modules"]
    metrics = run.data.metrics
    assert metrics["trainable_params"] == result.trainable_params > 0
    assert metrics["total_params"] == result.total_params
    assert metrics["bytes_downloaded"] == result.bytes_downloaded
    assert {"seconds.resolve", "seconds.download", "seconds.build", "seconds.track", "peak_rss_bytes"} <= set(metrics)
    manifest = read_manifest(result.artifact_dir)
    assert run.data.tags["prefect.flow_run_id"] == manifest.prefect.flow_run_id
    assert run.data.tags["prefect.flow_run_name"] == "prepare-tiny/llama@main"
    assert run.data.tags["prefect.flow_name"] == "prepare-model"
    assert manifest.tracking.mlflow_run_id == result.mlflow_run_id
    # MLflow 3: the artifact is the run's logged model (the UI's "Logged models"), and the run's output.
    (model,) = client.search_logged_models([run.info.experiment_id])
    assert model.model_id == manifest.tracking.logged_model_id and model.source_run_id == run.info.run_id
    assert str(model.status) in ("READY", "LoggedModelStatus.READY") and [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"

    logged = _artifact_files(client, result.mlflow_run_id)
    assert {"artifact/manifest.json", "artifact/README.md", "artifact/adapter/adapter_model.safetensors", "artifact/adapter/adapter_config.json"} <= set(logged)
    assert any(p.startswith("artifact/tokenizer/") for p in logged)
    assert not [p for p in logged if p.endswith(("model.safetensors", ".bin", ".pth")) and "adapter" not in p.rsplit("/", 1)[-1]]
    # The adapter holds only the LoRA matrices: far smaller than the base weights.
    base_bytes = sum(f.size for f in manifest.base_model.files if f.path.endswith(".safetensors"))
    assert logged["artifact/adapter/adapter_model.safetensors"] < base_bytes / 2


def test_prepare_publishes_a_summary_that_says_how_to_open_the_sqlite_store_and_no_dead_link(hub, hf_cache, mlflow_uri, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    result = _prepare("tiny/gpt2", hf_cache, mlflow_uri, tmp_path / "out")

    async def read(key):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    summary = asyncio.run(read("prepare-summary"))
    link = asyncio.run(read("mlflow-run"))
    assert any(result.commit_sha in a.data and "c_attn" in a.data and f"mlflow ui --backend-store-uri {mlflow_uri}" in a.data for a in summary)
    assert result.mlflow_run_url is None and not link  # a SQLite store has no server to link to


def test_prefect_result_storage_holds_nothing_over_one_megabyte_after_a_run(hub, hf_cache, mlflow_uri, tmp_path):
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    _prepare("tiny/phi3", hf_cache, mlflow_uri, tmp_path / "out")

    storage = Path(PREFECT_LOCAL_STORAGE_PATH.value())
    sizes = {p.name: p.stat().st_size for p in storage.rglob("*") if p.is_file()}
    assert sizes, "the flow and the download task persist their small results"
    assert max(sizes.values()) < 1_000_000, sizes


def test_a_prefect_retried_flow_reuses_its_mlflow_run(hub, hf_cache, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    from lora_prep.flows.prepare_model import prepare_model

    # A 403 on the weights' metadata request is permanent: the download task fails at
    # once (no task retry), the flow fails its first attempt after the MLflow run was opened.
    hub.fail_next(1, status=403, path_glob="*/resolve/*/model.safetensors", methods=("HEAD",))
    retrying = prepare_model.with_options(retries=1, retry_delay_seconds=0)

    result = _prepare("tiny/gpt-neox", hf_cache, mlflow_uri, tmp_path / "out", flow=retrying)

    client = MlflowClient(mlflow_uri)
    experiment = client.get_experiment_by_name("lora-prep")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    assert runs[0].info.status == "FINISHED"


def test_registered_artifact_loads_back_through_a_models_uri(hub, hf_cache, mlflow_uri, tmp_path):
    import torch

    from lora_prep.tasks.artifact.load_back import load_adapter_ready

    result = _prepare(
        "tiny/llama", hf_cache, mlflow_uri, tmp_path / "out",
        tracking=TrackingSettings(tracking_uri=mlflow_uri, register_as="tiny-llama-lora", alias="candidate"),
    )
    assert result.model_uri == "models:/tiny-llama-lora@candidate"

    temp_before = set(Path(tempfile.gettempdir()).iterdir())
    ready = load_adapter_ready(result.model_uri, tracking_uri=mlflow_uri, source=SourceSettings(cache_dir=str(hf_cache)))
    local = load_adapter_ready(result.artifact_dir, source=SourceSettings(cache_dir=str(hf_cache)))
    assert ready.manifest.base_model.commit_sha == result.commit_sha
    ids = torch.tensor([[1, 5, 9, 13]])
    with torch.no_grad():
        assert torch.equal(ready.model(ids).logits, local.model(ids).logits)

    # The fetched copy lives under lora-prep's home, not the system's temporary directory, and a
    # second load of the same reference reads it instead of downloading another.
    assert ready.artifact_dir.parent == fetched_references_dir()
    assert not [p.name for p in set(Path(tempfile.gettempdir()).iterdir()) - temp_before if "lora-prep" in p.name]
    (ready.artifact_dir / "fetched-once").write_text("")
    again = load_adapter_ready(result.model_uri, tracking_uri=mlflow_uri, source=SourceSettings(cache_dir=str(hf_cache)))
    assert again.artifact_dir == ready.artifact_dir and (again.artifact_dir / "fetched-once").is_file()


def test_two_loads_of_one_reference_at_once_keep_one_complete_copy_and_a_reference_without_a_manifest_is_refused(
    hub, hf_cache, mlflow_uri, tmp_path, monkeypatch,
):
    from mlflow.tracking import MlflowClient

    from lora_prep.tasks.errors import InvalidInput
    from lora_prep.tasks.tracking import registry

    result = _prepare("tiny/llama", hf_cache, mlflow_uri, tmp_path / "out")
    ref = f"runs:/{result.mlflow_run_id}"
    root = tmp_path / "references"

    # Both loads finish their download before either moves it into place: the second must keep the
    # first one's copy, return the same directory and leave no partial download behind.
    both_downloaded = threading.Barrier(2, timeout=120)
    monkeypatch.setattr(registry, "_before_publish", lambda copy: both_downloaded.wait())
    with ThreadPoolExecutor(2) as pool:
        fetched = list(pool.map(lambda _: registry.fetch_reference(ref, root, mlflow_uri), range(2)))
    assert fetched[0] == fetched[1]
    assert [p.name for p in root.iterdir()] == [fetched[0].name]
    assert read_manifest(fetched[0]).base_model.commit_sha == result.commit_sha
    adapter = {f.path: f.size for f in read_manifest(fetched[0]).adapter.files}
    assert adapter and all((fetched[0] / "adapter" / Path(path).name).stat().st_size == size for path, size in adapter.items())

    monkeypatch.setattr(registry, "_before_publish", lambda copy: None)
    client = MlflowClient(mlflow_uri)
    other = client.create_run(client.get_experiment_by_name("lora-prep").experiment_id)
    (tmp_path / "notes.txt").write_text("not an artifact")
    client.log_artifact(other.info.run_id, str(tmp_path / "notes.txt"), "artifact")
    client.set_terminated(other.info.run_id)
    with pytest.raises(InvalidInput, match="no manifest.json"):
        registry.fetch_reference(f"runs:/{other.info.run_id}", root, mlflow_uri)
    assert [p.name for p in root.iterdir()] == [fetched[0].name]


def test_mlflow_unreachable_keeps_the_artifact_and_says_how_to_log_it_later(hub, hf_cache, tmp_path):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from lora_prep.tasks.errors import TrackingUnavailable

    dead = "http://127.0.0.1:9"  # discard port: nothing listens
    state = _prepare("tiny/llama", hf_cache, dead, tmp_path / "out", return_state=True)

    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, TrackingUnavailable)
    message = str(error)
    kept = [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]
    assert len(kept) == 1 and (kept[0] / "manifest.json").is_file() and (kept[0] / "adapter").is_dir()
    assert str(kept[0]) in message and f"lora-prep log {kept[0]}" in message

    async def task_runs():
        async with get_client() as client:
            flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            return await client.read_task_runs(flow_run_filter=flow_filter)

    track = [t for t in asyncio.run(task_runs()) if t.name.startswith("track-")]
    assert [t.run_count for t in track] == [3]  # the first try and its 2 retries, then the error


def test_a_model_too_big_for_max_memory_is_refused_before_any_weights_are_downloaded(hub, hf_cache, mlflow_uri, tmp_path):
    from lora_prep.tasks.errors import DoesNotFit

    with pytest.raises(DoesNotFit) as err:
        _prepare("tiny/llama", hf_cache, mlflow_uri, tmp_path / "out", load=LoadSettings(max_memory={"cpu": "100KB"}))

    assert "max_memory" in str(err.value)
    # Only the safetensors header was read (ranged reads), never the whole weights body.
    weights = hub.store / "tiny" / "llama" / "commits" / hub.repos["tiny/llama"].sha / "model.safetensors"
    reads = hub.records("*/model.safetensors", "GET")
    assert reads and all(r.range for r in reads)
    assert hub.body_bytes("*/model.safetensors") < weights.stat().st_size
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_process_tags_stay_on_the_flow_run_and_off_its_task_runs(hub, hf_cache, mlflow_uri, tmp_path):
    # As the CLI runs it: the flow run is created under this process's tags (the reaper finds it by them after a
    # kill). Its task runs must not inherit them: each tag of a task run costs a concurrency-slot call before and
    # after it. A caller's own tag and build's own tag ("gpu", for tag concurrency limits on a fleet) stay.
    import asyncio

    from prefect import get_client, tags
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from lora_prep.tasks.tracking.reaper import is_process_tag, process_flow_run_tags

    mine = process_flow_run_tags()
    with tags("team-a", *mine):
        state = _prepare("tiny/llama", hf_cache, mlflow_uri, tmp_path / "out", return_state=True)
    assert state.is_completed()

    async def runs():
        async with get_client() as client:
            flow_run = await client.read_flow_run(state.state_details.flow_run_id)
            flow_filter = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
            return flow_run, await client.read_task_runs(flow_run_filter=flow_filter)

    flow_run, task_runs = asyncio.run(runs())
    assert set(mine) | {"team-a"} <= set(flow_run.tags)
    stages = ("resolve", "probe", "plan", "download", "build", "track", "open-mlflow-run")
    by_stage = {s: set(t.tags) for s in stages for t in task_runs if t.name.startswith(f"{s}-")}
    assert set(by_stage) == set(stages), [t.name for t in task_runs]
    assert [(s, sorted(t)) for s, t in by_stage.items() if any(is_process_tag(x) for x in t)] == []
    assert all("team-a" in t for t in by_stage.values())
    assert "gpu" in by_stage["build"]


def test_library_and_stage_logs_reach_the_prefect_run_logs(hub, hf_cache, mlflow_uri, tmp_path):
    import asyncio
    import logging

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from lora_prep.flows.prepare_model import prepare_model

    # transformers at INFO for this test (as a user would set it) so that its records exist.
    hf_logger = logging.getLogger("transformers")
    old = hf_logger.level
    hf_logger.setLevel(logging.INFO)
    try:
        state = _prepare("tiny/llama", hf_cache, mlflow_uri, tmp_path / "out", flow=prepare_model.with_options(), return_state=True)
    finally:
        hf_logger.setLevel(old)
    flow_run_id = state.state_details.flow_run_id

    async def read():
        async with get_client() as client:
            return await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))

    # Run logs are shipped in batches by a background worker: wait for them, bounded.
    import time

    deadline = time.monotonic() + 30
    while True:
        names = {log.name for log in asyncio.run(read())}
        if "lora_prep.tasks.build" in names and any(n.startswith("transformers.") for n in names) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert "lora_prep.tasks.build" in names  # our stage logs ("artifact written to ...")
    assert any(name.startswith("transformers.") for name in names), names


def test_one_commit_prepared_under_several_revision_names_records_each_name_as_requested(hub, hf_cache, mlflow_uri, tmp_path):
    from mlflow.tracking import MlflowClient

    sha = hub.repos["tiny/gpt2"].sha
    # Twice by branch (the second run stores the download task's cache record), then by sha:
    # the third run is a cache hit on a record made under the name "main".
    for revision in ("main", "main", sha):
        result = _prepare("tiny/gpt2", hf_cache, mlflow_uri, tmp_path / "out", revision=revision)
        manifest = read_manifest(result.artifact_dir)
        assert manifest.base_model.revision == revision and manifest.base_model.commit_sha == sha
        assert MlflowClient(mlflow_uri).get_run(result.mlflow_run_id).data.params["revision"] == revision
    assert result.from_cache and result.bytes_downloaded == 0


def test_a_gated_model_prepared_with_a_token_records_the_token_nowhere(hub, hf_cache, hub_token, mlflow_uri, tmp_path, monkeypatch):
    import asyncio

    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from lora_prep.flows.prepare_model import prepare_model

    monkeypatch.setenv("HF_TOKEN", hub_token)
    state = _prepare("tiny/gated", hf_cache, mlflow_uri, tmp_path / "out", flow=prepare_model, return_state=True)
    result = state.result()

    async def read_run_and_logs():
        async with get_client() as client:
            run = await client.read_flow_run(state.state_details.flow_run_id)
            logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
            return run, logs

    run, logs = asyncio.run(read_run_and_logs())
    mlflow_run = MlflowClient(mlflow_uri).get_run(result.mlflow_run_id)
    art = Path(result.artifact_dir)
    recorded = [
        result.model_dump_json(), json.dumps(run.parameters), *(log.message for log in logs),
        json.dumps(mlflow_run.data.params), json.dumps(mlflow_run.data.tags),
        *(p.read_text(errors="replace") for p in art.rglob("*") if p.is_file() and p.suffix in (".json", ".md", ".txt", "")),
    ]
    assert result.commit_sha == hub.repos["tiny/gated"].sha
    assert not [text for text in recorded if hub_token in text]

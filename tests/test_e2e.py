"""End to end with real servers: `prefect server start`, `mlflow server`, `prefect deploy` of
deployments/prefect.yaml, a `prefect worker` on a process pool, the local hub. Runs are started
through the Prefect API as the UI would; outcomes are read back through the Prefect API and
MLflow's REST API. Every process is started and stopped by this module; every wait has a deadline.

One server set for the module (startup costs ~25 s on 2 cores; each flow-run subprocess
imports torch and transformers, ~10 s).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.servers import BIN, ServerHandle, run_cli, start_servers, start_worker

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]
POOL = "lora-prep-process"  # deployments/prefect.yaml
EXPERIMENT = "e2e"
RUN_TIMEOUT_S = 240  # one flow run, worker pickup to final state, on a loaded 2-core machine


@dataclass
class Stack:
    prefect: ServerHandle
    mlflow: ServerHandle
    worker: ServerHandle
    tmp: Path
    seconds: dict
    machine_env: dict  # what the worker (and so every flow run) has in its environment

    @property
    def tracking(self) -> dict:
        return {"tracking_uri": self.mlflow.url, "experiment": EXPERIMENT}


@contextlib.contextmanager
def prefect_api(url: str):
    """A sync Prefect client for this test's server (overrides any test harness of the session)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="module")
def stack(tmp_path_factory, hub) -> Stack:
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    tmp = tmp_path_factory.mktemp("e2e")
    seconds, started = {}, time.monotonic()
    prefect, mlflow = start_servers(tmp)
    seconds["servers"] = time.monotonic() - started
    worker = None
    try:
        with prefect_api(prefect.url) as client:
            client.create_work_pool(WorkPoolCreate(name=POOL, type="process", base_job_template=ProcessWorker.get_default_base_job_template()))
            client.create_concurrency_limit(tag="gpu", concurrency_limit=1)  # the tag limit of the build and train tasks
        mark = time.monotonic()
        run_cli([str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"],
                prefect.env, cwd=ROOT, timeout=180)
        seconds["deploy"] = time.monotonic() - mark
        mark = time.monotonic()
        # The worker's environment is every flow run's: the machine's Hub mirror (HF_ENDPOINT, inherited
        # from this session), cache, artifact home, MLflow server.
        machine_env = {
            "HF_HUB_CACHE": str(tmp / "hf-cache"),
            "HF_HUB_DISABLE_XET": "1",
            "LORA_PREP_HOME": str(tmp / "lora-prep-home"),
            "MLFLOW_TRACKING_URI": mlflow.url,
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",  # a SQLite-backed server may answer "database is locked" under load
        }
        worker = start_worker(prefect, POOL, tmp, cwd=ROOT, env=machine_env)
        seconds["worker"] = time.monotonic() - mark
        yield Stack(prefect, mlflow, worker, tmp, seconds, machine_env)
    finally:
        for handle in (worker, mlflow, prefect):
            if handle is not None:
                handle.stop()
        print(f"\ne2e stack timings (s): {seconds}, total module {time.monotonic() - started:.1f}")


# --- helpers: start a run, wait for it, read MLflow over REST -------------------------------


def start_run(stack: Stack, deployment: str, parameters: dict, job_variables: dict | None = None):
    from prefect.deployments import run_deployment

    with prefect_api(stack.prefect.url):
        return run_deployment(deployment, parameters=parameters, job_variables=job_variables, timeout=0, as_subflow=False)


def wait_final(stack: Stack, flow_run_id, timeout: float = RUN_TIMEOUT_S):
    """Poll the flow run every second until it is final; on timeout or failure, show its logs and the worker's."""
    deadline = time.monotonic() + timeout
    with prefect_api(stack.prefect.url) as client:
        while True:
            run = client.read_flow_run(flow_run_id)
            if run.state and run.state.is_final():
                if not run.state.is_completed():
                    pytest.fail(f"flow run {run.name} ended {run.state.name}: {run.state.message}\n{_logs(client, run.id)}\n{stack.worker.log_tail()}")
                return run
            if time.monotonic() > deadline:
                pytest.fail(f"flow run {run.name} still {run.state.name if run.state else None} after {timeout:.0f} s\n{_logs(client, run.id)}\n{stack.worker.log_tail()}")
            time.sleep(1)


def _logs(client, flow_run_id) -> str:
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return "\n".join(f"{log.level} {log.message}" for log in logs)[-6000:]


def wait_triggered_run(stack: Stack, deployment: str, prepare_run_id, timeout: float = 90):
    """The run an automation created for `prepare_run_id` (its prepared_flow_run_id parameter names it)."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    deadline = time.monotonic() + timeout
    with prefect_api(stack.prefect.url) as client:
        deployment_id = client.read_deployment_by_name(deployment).id
        while time.monotonic() < deadline:
            for run in client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))):
                if str(run.parameters.get("prepared_flow_run_id", "")).endswith(str(prepare_run_id)):
                    return run
            time.sleep(1)
    pytest.fail(f"no {deployment} run was triggered by prepare run {prepare_run_id} within {timeout:.0f} s\n{stack.prefect.log_tail()}")


def mlflow_get(stack: Stack, endpoint: str, **query) -> dict:
    response = httpx.get(f"{stack.mlflow.url}/api/2.0/mlflow/{endpoint}", params=query, timeout=30)
    response.raise_for_status()
    return response.json()


def mlflow_runs(stack: Stack, filter_string: str) -> list[dict]:
    experiment = mlflow_get(stack, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    response = httpx.post(f"{stack.mlflow.url}/api/2.0/mlflow/runs/search", timeout=30,
                          json={"experiment_ids": [experiment["experiment_id"]], "filter": filter_string, "max_results": 100})
    response.raise_for_status()
    return response.json().get("runs", [])


def mlflow_run_of(stack: Stack, flow_run_id) -> dict:
    (run,) = mlflow_runs(stack, f"tags.`prefect.flow_run_id` = '{flow_run_id}'")
    return run


def tags(run: dict) -> dict:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def params(run: dict) -> dict:
    return {p["key"]: p["value"] for p in run["data"].get("params", [])}


def artifact_paths(stack: Stack, run_id: str, path: str) -> set[str]:
    return {f["path"] for f in mlflow_get(stack, "artifacts/list", run_id=run_id, path=path).get("files", [])}


# --- runs shared by the tests ------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(stack):
    """A UI-style run of prepare-on-demand: parameters for the MLflow server, job variables for the artifact home."""
    home = stack.tmp / "job-variables-home"
    flow_run = start_run(
        stack, "prepare-model/prepare-on-demand",
        parameters={"model_id": "tiny/llama", "lora": {"r": 4}, "tracking": stack.tracking},
        job_variables={"env": {"LORA_PREP_HOME": str(home), "TOKENIZERS_PARALLELISM": "false"}},
    )
    started = time.monotonic()
    run = wait_final(stack, flow_run.id)
    stack.seconds["prepare_run"] = time.monotonic() - started
    return {"flow_run": run, "home": home}


@pytest.fixture(scope="module")
def triggered(stack, prepared):
    started = time.monotonic()
    run = wait_triggered_run(stack, "train-adapter/train-after-prepare", prepared["flow_run"].id)
    run = wait_final(stack, run.id)
    stack.seconds["triggered_train_run"] = time.monotonic() - started
    return run


# --- the tests -----------------------------------------------------------------------------------


def test_prefect_deploy_creates_the_yaml_deployments_on_the_process_pool(stack):
    with prefect_api(stack.prefect.url) as client:
        on_demand = client.read_deployment_by_name("prepare-model/prepare-on-demand")
        nightly = client.read_deployment_by_name("refresh-model/refresh-nightly")
        after = client.read_deployment_by_name("train-adapter/train-after-prepare")
        pipeline = client.read_deployment_by_name("train-adapter/train-on-demand")
        automations = client.read_automations_by_name("train-after-prepare__automation_1")

    assert {d.work_pool_name for d in (on_demand, nightly, after, pipeline)} == {POOL}
    assert (on_demand.work_queue_name, nightly.work_queue_name, after.work_queue_name) == ("prepare", "nightly", "train")
    assert on_demand.enforce_parameter_schema and not on_demand.schedules
    assert on_demand.global_concurrency_limit.limit == 1
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"] and nightly.schedules[0].schedule.timezone == "UTC"
    assert nightly.parameters["model_id"]
    assert len(automations) == 1 and automations[0].enabled


def test_a_schema_violating_run_is_refused_by_the_server_before_any_worker_starts(stack):
    from prefect.exceptions import PrefectHTTPStatusError

    with pytest.raises(PrefectHTTPStatusError) as refused:
        start_run(stack, "prepare-model/prepare-on-demand", parameters={"model_id": "tiny/llama", "lora": {"r": -1}})
    assert refused.value.response.status_code in (409, 422)


def test_a_prepare_run_completes_and_mlflow_shows_its_run_tags_and_artifacts(stack, prepared):
    flow_run = prepared["flow_run"]
    run = mlflow_run_of(stack, flow_run.id)

    assert run["info"]["status"] == "FINISHED"
    assert params(run)["model_id"] == "tiny/llama" and params(run)["lora.r"] == "4"
    assert tags(run)["prefect.flow_run_id"] == str(flow_run.id)
    assert tags(run)["prefect.deployment_name"] == "prepare-on-demand"
    # The run-level job variable reached the flow run's environment: the artifact is under that home.
    assert tags(run)["lora_prep.artifact_dir"].startswith(str(prepared["home"]))
    files = artifact_paths(stack, run["info"]["run_id"], "artifact")
    assert {"artifact/manifest.json", "artifact/adapter", "artifact/tokenizer"} <= files
    assert "artifact/adapter/adapter_model.safetensors" in artifact_paths(stack, run["info"]["run_id"], "artifact/adapter")


def test_a_completed_prepare_run_triggers_training_logged_as_its_child_run(stack, prepared, triggered):
    parent = mlflow_run_of(stack, prepared["flow_run"].id)
    child = mlflow_run_of(stack, triggered.id)

    assert child["info"]["status"] == "FINISHED"
    assert tags(child)["mlflow.parentRunId"] == parent["info"]["run_id"]
    assert child["info"]["experiment_id"] == parent["info"]["experiment_id"]
    history = mlflow_get(stack, "metrics/get-history", run_id=child["info"]["run_id"], metric_key="loss")["metrics"]
    losses = [m["value"] for m in sorted(history, key=lambda m: m["step"])]
    assert len(losses) == int(params(child)["train.steps"]) and losses[-1] < losses[0]
    assert "artifact/adapter/adapter_model.safetensors" in artifact_paths(stack, child["info"]["run_id"], "artifact/adapter")


def test_the_nightly_refresh_of_an_unchanged_commit_prepares_nothing(stack, prepared, triggered):
    def preparations() -> list[dict]:
        runs = mlflow_runs(stack, "params.model_id = 'tiny/llama' and attributes.status = 'FINISHED'")
        return [r for r in runs if "mlflow.parentRunId" not in tags(r)]

    before = preparations()
    flow_run = start_run(stack, "refresh-model/refresh-nightly", parameters={"model_id": "tiny/llama", "tracking": stack.tracking})
    wait_final(stack, flow_run.id)

    assert len(before) == 1
    assert [r["info"]["run_id"] for r in preparations()] == [r["info"]["run_id"] for r in before]


def test_a_pipeline_run_prepares_through_the_deployment_then_trains_and_the_trigger_leaves_it_alone(stack, triggered):
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterParentTaskRunId,
    )

    started = time.monotonic()
    flow_run = start_run(stack, "train-adapter/train-on-demand", parameters={
        "model_id": "tiny/gpt2", "lora": {"r": 4}, "tracking": stack.tracking, "train": {"steps": 6},
    })
    pipeline = wait_final(stack, flow_run.id, timeout=2 * RUN_TIMEOUT_S)
    assert not (pipeline.state.message or "").startswith("skipped")
    with prefect_api(stack.prefect.url) as client:
        (prepare_run,) = [r for r in client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["prepare-on-demand"])),
            flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(is_null_=False)),
        )]
    stack.seconds["pipeline_run"] = time.monotonic() - started

    parent = mlflow_run_of(stack, prepare_run.id)
    child = mlflow_run_of(stack, flow_run.id)
    assert params(parent)["model_id"] == "tiny/gpt2"
    assert tags(child)["mlflow.parentRunId"] == parent["info"]["run_id"]
    # The prepare run also fired the trigger; that training run skips, since the pipeline trains it.
    skipped = wait_final(stack, wait_triggered_run(stack, "train-adapter/train-after-prepare", prepare_run.id).id)
    assert skipped.state.message.startswith("skipped: prepare run")
    assert not mlflow_runs(stack, f"tags.`prefect.flow_run_id` = '{skipped.id}'")


def test_no_gpu_slot_is_left_held_after_the_runs(stack, triggered):
    with prefect_api(stack.prefect.url) as client:
        assert client.read_concurrency_limit_by_tag("gpu").active_slots == []


def test_serve_runs_the_same_deployments_from_one_process_without_a_work_pool(stack, triggered):
    """`lora-prep serve` (deployments.serve.serve_all): runs last here, as it re-registers the deployments without a pool."""
    import sys

    from prefect.exceptions import ObjectNotFound

    from tests.servers import child_env, launch

    serve_env = child_env({**stack.prefect.env, **stack.machine_env})
    # Serving re-registers deployments of the same names but does not clear a work pool already
    # recorded on them: start from none, as a machine that uses serve instead of a pool would.
    with prefect_api(stack.prefect.url) as client:
        for name in ("prepare-model/prepare-on-demand", "refresh-model/refresh-nightly",
                     "train-adapter/train-after-prepare", "train-adapter/train-on-demand"):
            client.delete_deployment(client.read_deployment_by_name(name).id)
    serve = launch("lora-prep serve", [sys.executable, "-c", "from lora_prep.deployments.serve import serve_all; serve_all()"],
                   stack.tmp / "logs" / "serve.log", serve_env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 120
        with prefect_api(stack.prefect.url) as client:
            while True:
                assert serve.alive(), serve.log_tail()
                assert time.monotonic() < deadline, f"serve did not register its deployments:\n{serve.log_tail()}"
                with contextlib.suppress(ObjectNotFound):
                    served = client.read_deployment_by_name("refresh-model/refresh-nightly")
                    assert served.work_pool_name is None and [s.schedule.cron for s in served.schedules] == ["0 2 * * *"]
                    break
                time.sleep(1)
        flow_run = start_run(stack, "refresh-model/refresh-nightly", parameters={"model_id": "tiny/llama", "tracking": stack.tracking})
        done = wait_final(stack, flow_run.id)
        assert done.work_pool_name is None  # run by the serving process, not the worker
    finally:
        serve.stop()


def test_stopping_a_server_ends_every_process_it_spawned(stack):
    """The harness itself, last in the module: the MLflow server runs uvicorn workers as children;
    stop() must leave none of them behind."""
    from tests.servers import group_alive

    stack.mlflow.stop()
    assert stack.mlflow.process.returncode is not None
    assert not group_alive(stack.mlflow.process)

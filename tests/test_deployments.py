"""deployments/: every YAML is what `prefect deploy` accepts, every entrypoint imports, every
parameter exists in its flow and validates against the flow's schema, every job variable is a
variable of its work pool type. No server: the GPU-fleet examples cannot run here, so this is
what keeps them correct.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENTS = ROOT / "deployments"
EXAMPLES = DEPLOYMENTS / "examples"
PREFECT_FILES = [DEPLOYMENTS / "prefect.yaml", EXAMPLES / "docker-gpu.prefect.yaml", EXAMPLES / "kubernetes-gpu.prefect.yaml"]
# Flow parameters a deployment may leave out because the UI form (or the run) must supply them.
ASKED_AT_RUN_TIME = {"prepare-model": {"model_id"}}
# prefect-docker's DockerWorkerJobConfiguration fields (prefect_docker/worker.py, read 2026-11; the
# package is not installed here) plus the base job configuration's.
DOCKER_JOB_VARIABLES = {
    "image", "registry_credentials", "image_pull_policy", "networks", "network_mode", "auto_remove", "volumes",
    "stream_output", "mem_limit", "memswap_limit", "privileged", "container_create_kwargs", "command", "env", "labels", "name",
}


def _deployments(path: Path) -> list[dict]:
    return yaml.safe_load(path.read_text())["deployments"]


def _all_deployments() -> list[tuple[str, dict]]:
    return [(f"{path.name}:{d['name']}", d) for path in PREFECT_FILES for d in _deployments(path)]


@pytest.fixture(scope="module")
def flows() -> dict:
    """Each entrypoint loaded the way `prefect deploy` and a worker load it: a module path of the installed package."""
    from prefect.flows import load_flow_from_entrypoint

    loaded = {}
    for _, deployment in _all_deployments():
        entrypoint = deployment["entrypoint"]
        assert not entrypoint.split(":")[0].endswith(".py"), f"{entrypoint}: use a module path, so an installed wheel is enough"
        if entrypoint not in loaded:
            loaded[entrypoint] = load_flow_from_entrypoint(entrypoint, use_placeholder_flow=False)
    return loaded


@pytest.mark.parametrize("path", PREFECT_FILES, ids=lambda p: p.name)
def test_each_prefect_file_validates_as_prefect_deploy_reads_it(path):
    from prefect.cli.deploy._models import PrefectYamlModel

    # `prefect deploy` prints validation errors and skips the file; here they fail the test.
    model = PrefectYamlModel.model_validate(yaml.safe_load(path.read_text()))
    assert model.deployments, f"{path.name} declares no deployments"
    names = [d.name for d in model.deployments]
    assert len(names) == len(set(names)), f"duplicate deployment names in {path.name}: {names}"
    for d in model.deployments:
        assert d.work_pool and d.work_pool.name and d.work_pool.work_queue_name, f"{d.name}: name the work pool and queue"
        assert d.enforce_parameter_schema is True, f"{d.name}: enforce_parameter_schema must be true"
        limit = d.concurrency_limit if isinstance(d.concurrency_limit, int) else d.concurrency_limit.limit
        assert limit and limit >= 1, f"{d.name}: give a deployment concurrency limit"


@pytest.mark.parametrize("name,deployment", _all_deployments(), ids=lambda v: v if isinstance(v, str) else "")
def test_each_entrypoint_is_a_flow_and_its_parameters_validate_against_the_signature(name, deployment, flows):
    import inspect

    from prefect.utilities.schema_tools import validate

    flow = flows[deployment["entrypoint"]]
    signature = inspect.signature(flow.fn)
    params = deployment.get("parameters") or {}
    for schedule in deployment.get("schedules") or []:
        params = {**params, **(schedule.get("parameters") or {})}
    unknown = set(params) - set(signature.parameters)
    assert not unknown, f"{name}: {sorted(unknown)} are not parameters of {flow.name}"

    required = {p for p, v in signature.parameters.items() if v.default is inspect.Parameter.empty}
    missing = required - set(params)
    assert missing <= ASKED_AT_RUN_TIME.get(flow.name, set()), f"{name}: required {sorted(missing)} have no value"
    filled = {**{p: "org/model" for p in missing}, **params}
    flow.validate_parameters(filled)  # pydantic, as the flow run itself will
    # And as the server does on run creation with enforce_parameter_schema: JSON schema of the signature.
    from prefect.utilities.callables import parameter_schema

    errors = validate(filled, parameter_schema(flow).model_dump_for_openapi(), raise_on_error=False)
    assert not errors, f"{name}: {[e.message for e in errors]}"


def test_settings_parameters_reach_the_ui_form_with_their_descriptions(flows):
    from prefect.utilities.callables import parameter_schema

    schema = parameter_schema(flows["lora_prep.flows.prepare_model:prepare_model"]).model_dump_for_openapi()
    assert {"model_id", "revision", "source", "load", "lora", "tracking", "output"} <= set(schema["properties"])
    lora = schema["definitions"]["LoraSettings"]["properties"]
    assert "rank" in lora["r"]["description"].lower()
    train = parameter_schema(flows["lora_prep.flows.train_adapter:train_adapter"]).model_dump_for_openapi()
    assert train["properties"]["prepare"]["enum"] == ["subflow", "deployment"]
    assert "event trigger" in train["properties"]["prepared_flow_run_id"]["description"]


def test_the_process_pool_job_variables_are_variables_of_a_process_work_pool():
    from prefect.utilities.schema_tools import validate
    from prefect.workers.process import ProcessWorker

    variables = ProcessWorker.get_default_base_job_template()["variables"]
    for deployment in _deployments(DEPLOYMENTS / "prefect.yaml"):
        assert deployment["work_pool"]["name"] == "lora-prep-process"
        job_variables = deployment["work_pool"].get("job_variables") or {}
        assert set(job_variables) <= set(variables["properties"]), deployment["name"]
        assert not validate(job_variables, variables, raise_on_error=False, ignore_required=True)


def test_the_nightly_refresh_is_scheduled_in_utc_and_skips_a_night_rather_than_queueing():
    from prefect.client.schemas.schedules import CronSchedule

    nightly = next(d for d in _deployments(DEPLOYMENTS / "prefect.yaml") if d["name"] == "refresh-nightly")
    assert nightly["entrypoint"] == "lora_prep.flows.refresh:refresh_model"
    (schedule,) = nightly["schedules"]
    cron = CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])
    assert cron.timezone == "UTC" and schedule.get("active", True)
    assert nightly["concurrency_limit"]["collision_strategy"] == "CANCEL_NEW"
    assert nightly["parameters"]["model_id"]


def test_the_ui_deployment_has_no_schedule_and_asks_for_the_model_id():
    on_demand = next(d for d in _deployments(DEPLOYMENTS / "prefect.yaml") if d["name"] == "prepare-on-demand")
    assert not on_demand.get("schedules") and "model_id" not in on_demand["parameters"]
    assert on_demand["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}


def test_the_training_trigger_fires_on_completed_runs_of_the_prepare_deployment_and_fills_train_parameters(flows):
    import uuid

    from prefect.cli.deploy._triggers import DeploymentTriggerAdapter

    spec = {d["name"]: d for d in _deployments(DEPLOYMENTS / "prefect.yaml")}
    (raw,) = spec["train-after-prepare"]["triggers"]
    trigger = DeploymentTriggerAdapter.validate_python(dict(raw))  # what `prefect deploy` builds
    trigger.set_deployment_id(uuid.uuid4())
    automation = trigger.as_automation()

    assert automation.trigger.expect == {"prefect.flow-run.Completed"}
    related = {r.get("prefect.resource.role"): r.get("prefect.resource.name") for r in raw["match_related"]}
    prepare_flow = flows[spec["prepare-on-demand"]["entrypoint"]]
    assert related == {"flow": prepare_flow.name, "deployment": "prepare-on-demand"}
    # Not the train deployments' own runs (that would loop), and not refresh-nightly's.
    assert related["deployment"] not in {"train-after-prepare", "train-on-demand", "refresh-nightly"}
    train_flow = flows[spec["train-after-prepare"]["entrypoint"]]
    assert set(raw["parameters"]) <= set(train_flow.parameters.properties)
    assert "prepared_flow_run_id" in raw["parameters"]


def test_the_pipeline_deployment_prepares_through_a_deployment_declared_in_the_same_file(flows):
    spec = {d["name"]: d for d in _deployments(DEPLOYMENTS / "prefect.yaml")}
    flow_name, deployment_name = spec["train-on-demand"]["parameters"]["prepare_deployment"].split("/")
    assert flow_name == flows[spec[deployment_name]["entrypoint"]].name
    k8s = {d["name"]: d for d in _deployments(EXAMPLES / "kubernetes-gpu.prefect.yaml")}
    flow_name, deployment_name = k8s["train-k8s"]["parameters"]["prepare_deployment"].split("/")
    assert deployment_name in k8s and flow_name == flows[k8s[deployment_name]["entrypoint"]].name


def test_serve_builds_the_same_deployments_as_prefect_yaml_without_a_work_pool():
    from lora_prep.deployments.serve import runner_deployments

    spec = _deployments(DEPLOYMENTS / "prefect.yaml")
    served = {d.name: d for d in runner_deployments()}
    assert set(served) == {d["name"] for d in spec}
    for entry in spec:
        d = served[entry["name"]]
        assert d.work_pool_name is None
        assert d.parameters == (entry.get("parameters") or {})
        assert d.entrypoint.replace(":", ".") == entry["entrypoint"].replace(":", ".")  # module path, either spelling
        assert d.concurrency_limit == entry["concurrency_limit"]["limit"]
        assert d.concurrency_options.collision_strategy.value == entry["concurrency_limit"]["collision_strategy"]
        assert [s.schedule.cron for s in d.schedules] == [s["cron"] for s in entry.get("schedules") or []]
        assert len(d.triggers) == len(entry.get("triggers") or [])
        assert d.enforce_parameter_schema


def test_docker_example_requests_gpus_through_fields_of_the_docker_worker():
    for deployment in _deployments(EXAMPLES / "docker-gpu.prefect.yaml"):
        job_variables = deployment["work_pool"]["job_variables"]
        assert set(job_variables) <= DOCKER_JOB_VARIABLES, deployment["name"]
        (gpus,) = job_variables["container_create_kwargs"]["device_requests"]
        # docker-py turns each dict into docker.types.DeviceRequest(**dict): only its keyword names are valid.
        assert set(gpus) <= {"driver", "count", "device_ids", "capabilities", "options"}
        assert gpus["capabilities"] == [["gpu"]] and gpus["count"] == -1
        assert "lora-prep-hf-cache:/cache/huggingface" in job_variables["volumes"]
        assert job_variables["env"]["HF_HOME"] == "/cache/huggingface"


def _render_k8s(job_variables: dict) -> dict:
    """What the Kubernetes worker does with a run: variable defaults, then job variables, into job_configuration."""
    from prefect.utilities.templating import apply_values

    template = json.loads((EXAMPLES / "kubernetes-gpu-job-template.json").read_text())
    defaults = {k: v["default"] for k, v in template["variables"]["properties"].items() if "default" in v}
    return apply_values(template["job_configuration"], {**defaults, **job_variables})


def test_kubernetes_job_template_declares_every_placeholder_it_uses():
    from prefect.utilities.templating import find_placeholders

    template = json.loads((EXAMPLES / "kubernetes-gpu-job-template.json").read_text())
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used == set(template["variables"]["properties"])
    manifest = template["job_configuration"]["job_manifest"]
    # What prefect-kubernetes requires of a job manifest (its _get_base_job_manifest).
    spec = manifest["spec"]["template"]["spec"]
    assert manifest["kind"] == "Job" and manifest["apiVersion"] == "batch/v1"
    assert (spec["parallelism"], spec["completions"], spec["restartPolicy"]) == (1, 1, "Never")
    assert spec["containers"][0]["name"] == "prefect-job"


@pytest.mark.parametrize("name,deployment", [(d["name"], d) for d in _deployments(EXAMPLES / "kubernetes-gpu.prefect.yaml")], ids=lambda v: v if isinstance(v, str) else "")
def test_kubernetes_example_renders_a_job_requesting_gpus_with_the_shared_cache(name, deployment):
    from prefect.utilities.schema_tools import validate

    template = json.loads((EXAMPLES / "kubernetes-gpu-job-template.json").read_text())
    job_variables = deployment["work_pool"]["job_variables"]
    assert not validate(job_variables, template["variables"], raise_on_error=False, ignore_required=True)

    rendered = _render_k8s(job_variables)
    pod = rendered["job_manifest"]["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == job_variables["gpu_count"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": job_variables["gpu_product"]}
    (cache,) = [v for v in pod["volumes"] if v["name"] == "hf-cache"]
    assert cache["persistentVolumeClaim"]["claimName"] == "lora-prep-hf-cache"
    assert rendered["env"]["HF_HOME"].startswith("/cache/")
    pvc = yaml.safe_load((EXAMPLES / "kubernetes-hf-cache.yaml").read_text())
    assert pvc["metadata"]["name"] == cache["persistentVolumeClaim"]["claimName"]
    assert pvc["metadata"]["namespace"] == job_variables["namespace"] and "ReadWriteMany" in pvc["spec"]["accessModes"]


def test_multi_gpu_deployment_budgets_memory_for_each_gpu_it_requests():
    spec = {d["name"]: d for d in _deployments(EXAMPLES / "kubernetes-gpu.prefect.yaml")}
    multi = spec["prepare-k8s-multi-gpu"]
    gpus = multi["work_pool"]["job_variables"]["gpu_count"]
    assert {k for k in multi["parameters"]["load"]["max_memory"] if k.isdigit()} == {str(i) for i in range(gpus)}


def test_compose_example_agrees_with_the_docker_example():
    compose = yaml.safe_load((EXAMPLES / "compose.yaml").read_text())
    services = compose["services"]
    assert services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"].startswith("postgresql+asyncpg://")
    # SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the image installs psycopg2: the URI names the driver.
    assert "--backend-store-uri postgresql+psycopg2://" in services["mlflow"]["command"]
    assert "--artifacts-destination" in services["mlflow"]["command"]
    assert "--pool lora-prep-docker" in services["docker-worker"]["command"]
    docker = yaml.safe_load((EXAMPLES / "docker-gpu.prefect.yaml").read_text())
    pool_names = {d["work_pool"]["name"] for d in docker["deployments"]}
    assert pool_names == {"lora-prep-docker"}
    assert compose["volumes"]["lora-prep-hf-cache"]["name"] == "lora-prep-hf-cache"
    assert "CREATE DATABASE mlflow" in (EXAMPLES / "postgres-init.sql").read_text()


def _dockerfile_stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuation lines joined, comments dropped), one list per FROM."""
    text = re.sub(r"\\\n", " ", (EXAMPLES / "Dockerfile").read_text())
    stages: list[list[str]] = []
    for line in (line.strip() for line in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        stages[-1].append(line)
    return stages


@pytest.mark.parametrize("path", [EXAMPLES / "docker-gpu.prefect.yaml", EXAMPLES / "kubernetes-gpu.prefect.yaml"], ids=lambda p: p.name)
def test_the_image_examples_pull_nothing_because_the_image_holds_the_installed_wheel(path):
    # Module entrypoints (checked by the flows fixture) import from site-packages: no checkout, no working directory.
    assert yaml.safe_load(path.read_text())["pull"] == [], f"{path.name}: an image with the wheel installed needs no pull step"
    # Their image is the one examples/Dockerfile builds (the tag of its `docker build -t` line).
    (tag,) = re.findall(r"docker build -t (\S+) -f deployments/examples/Dockerfile", (EXAMPLES / "Dockerfile").read_text())
    assert {d["work_pool"]["job_variables"]["image"] for d in _deployments(path)} == {tag}, path.name

    *builders, final = _dockerfile_stages()
    assert final[0].startswith("FROM pytorch/pytorch:") and "cuda" in final[0]  # the CUDA torch that satisfies torch>=2.4
    # The image's own stage copies no sources: it installs the wheel (with [gpu]) that an earlier stage built.
    assert not [i for i in final if re.match(r"(COPY|ADD)\s+(?!--from=)", i)], final
    (install,) = [i for i in final if i.startswith("RUN ") and "pip install" in i]
    assert re.search(r"lora_prep-\*\.whl\)\[gpu\]", install) and " -e " not in install, install
    assert any("pip wheel" in i and "--no-deps" in i for stage in builders for i in stage), builders
    # The wheel stage copies every folder pyproject.toml packages (the old image lacked lora_prep/).
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    copied_sources = {src for stage in builders for i in stage if i.startswith("COPY ") for src in i.split()[1:-1]}
    assert folders <= copied_sources and {"pyproject.toml", "README.md"} <= copied_sources, copied_sources
    (copied,) = [i.split()[-1] for i in final if i.startswith("COPY --from=")]
    assert copied in install
    assert "WORKDIR /opt/lora-prep" not in final


@pytest.mark.parametrize("path", PREFECT_FILES, ids=lambda p: p.name)
def test_every_pool_sends_flow_run_heartbeats_for_the_zombie_automation(path):
    # Without heartbeats, "crash zombie flow runs" (lora_prep.deployments.automations) never fires and a run
    # whose node died stays Running; tests/test_fleet.py relies on prefect.yaml's value, not on its own.
    for deployment in _deployments(path):
        env = deployment["work_pool"]["job_variables"]["env"]
        assert env.get("PREFECT_FLOWS_HEARTBEAT_FREQUENCY") == "30", f"{path.name}:{deployment['name']}"


def test_compose_keeps_concurrency_leases_on_a_volume_so_a_restart_keeps_them():
    server = yaml.safe_load((EXAMPLES / "compose.yaml").read_text())["services"]["prefect-server"]
    env = server["environment"]
    assert env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == "prefect.server.concurrency.lease_storage.filesystem"
    assert any(v.endswith(":" + env["PREFECT_HOME"]) for v in server["volumes"]), server["volumes"]

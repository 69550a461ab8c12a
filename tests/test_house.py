"""The shape of the code a maintainer relies on: imports go one way, records read without the heavy stack,
and every MLflow query holds whatever characters a model id or a flow run id carries."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# The design card's folders and the import names they ship under (pyproject's package-dir).
FOLDERS = {"lora_prep": "lora_prep", "flows": "lora_prep.flows", "tasks": "lora_prep.tasks", "deployments": "lora_prep.deployments"}
STAGES = {f"lora_prep.tasks.{name}" for name in ("resolve", "probe", "plan", "download", "build", "track", "train")}
# The floors of tasks/, lowest first: a family imports only from floors below its own (docs/ARCHITECTURE.md).
FLOORS = [
    {"errors"},
    {"common"},
    {"settings"},
    {"records"},
    {"hub", "tracking"},
    {"machine"},
    {"model"},
    {"lora"},
    {"artifact"},
    {"preflight"},
    {name.rsplit(".", 1)[1] for name in STAGES},
]


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _import_graph() -> dict[str, set[str]]:
    """Module -> the product modules it imports: every import statement, at any depth (in functions,
    under TYPE_CHECKING), so that a type-only or deferred import still counts."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                graph[name] |= {alias.name for alias in node.names if alias.name in modules}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    if target in modules:
                        graph[name].add(target)
                    elif base in modules:
                        graph[name].add(base)
        graph[name].discard(name)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_product_code_has_no_import_circle():
    graph = _import_graph()
    assert len(graph) > 60 and sum(map(len, graph.values())) > 200  # the walk saw the whole house
    assert _cycles(graph) == []


def test_a_stage_module_imports_no_other_stage_and_no_family_imports_a_stage_or_the_layers_above():
    above = {name for name in _modules() if not name.startswith("lora_prep.tasks")}
    offending = []
    for name, imports in _import_graph().items():
        if name.startswith("lora_prep.tasks"):
            offending += [(name, target) for target in sorted(imports & (STAGES | above))]
    assert offending == []


def test_the_families_of_tasks_import_only_downwards():
    floor_of = {family: level for level, families in enumerate(FLOORS) for family in families}
    upward = []
    for name, imports in _import_graph().items():
        if not name.startswith("lora_prep.tasks."):
            continue
        family = name.split(".")[2]
        for target in imports:
            other = target.split(".")[2] if target.startswith("lora_prep.tasks.") else None
            if other is not None and other != family and floor_of[other] >= floor_of[family]:
                upward.append((name, target))
    assert sorted(upward) == []


_READ_MANIFEST = textwrap.dedent("""
    import json, sys
    from lora_prep import Manifest
    manifest = Manifest.read(sys.argv[1])
    heavy = sorted(m for m in ("prefect", "torch", "transformers", "peft", "mlflow", "huggingface_hub") if m in sys.modules)
    print(json.dumps({"commit": manifest.base_model.commit_sha, "targets": manifest.lora.targets.target_modules, "heavy": heavy}))
""")


def test_a_manifest_reads_through_the_public_api_without_prefect_torch_or_transformers(tmp_path):
    from tests.manifests import SHA, sample_manifest

    sample_manifest().write(tmp_path)
    out = subprocess.run([sys.executable, "-c", _READ_MANIFEST, str(tmp_path)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    read = json.loads(out.stdout)
    assert read == {"commit": SHA, "targets": ["model.layers.0.self_attn.q_proj"], "heavy": []}


# --- the MLflow run index --------------------------------------------------------------------------

# A local directory may be named anything; a Hub id cannot hold these, a path can.
ODD_MODEL = "/data/o'neil\\models/llama"
LOOKALIKE = "/data/o'neil/models/llama"  # the same without the backslash: must never match
ODD_FLOW_RUN = "run-o'neil\\1"


@pytest.fixture
def index(tmp_path):
    from lora_prep.tasks.settings import TrackingSettings
    from lora_prep.tasks.tracking import runs
    from lora_prep.tasks.tracking.store import client

    tracking = TrackingSettings(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}", experiment="odd ids")
    mlflow = client(tracking.tracking_uri)
    experiment = runs.experiment_id(mlflow, tracking.experiment, tracking.tracking_uri)
    return tracking, mlflow, experiment


def _prepared(mlflow, experiment, model_id, flow_run_id, commit, status="FINISHED"):
    from lora_prep.tasks.tracking import runs

    tags = {**runs.preparation_tags(model_id), runs.FLOW_RUN_TAG: flow_run_id, runs.ARTIFACT_DIR_TAG: f"/artifacts/{flow_run_id}"}
    run_id = runs.find_or_create_run(mlflow, experiment, tags, run_name="odd")
    mlflow.log_param(run_id, "commit_sha", commit)
    if status != "RUNNING":
        mlflow.set_terminated(run_id, status)
    return run_id


def test_every_run_query_finds_exactly_the_run_of_a_model_id_holding_a_quote_and_a_backslash(index):
    from lora_prep.tasks.common.process import ProcessId
    from lora_prep.tasks.tracking import runs

    tracking, mlflow, experiment = index
    commit = "c" * 40
    mine = _prepared(mlflow, experiment, ODD_MODEL, ODD_FLOW_RUN, commit)
    lookalike = _prepared(mlflow, experiment, LOOKALIKE, "run-o'neil1", commit)

    found = runs.preparation_of_commit(tracking, ODD_MODEL, commit)
    assert found is not None and found.run_id == mine and found.artifact_dir == f"/artifacts/{ODD_FLOW_RUN}"
    assert runs.preparation_of_commit(tracking, LOOKALIKE, commit).run_id == lookalike
    assert runs.preparation_of_commit(tracking, ODD_MODEL, "d" * 40) is None

    assert runs.preparation_of_flow_run(tracking, ODD_FLOW_RUN).run_id == mine
    assert runs.preparation_of_flow_run(tracking, "run-o'neil") is None  # a prefix is not a match

    # A flow retry finds its own run again, not the lookalike's.
    assert runs.find_or_create_run(mlflow, experiment, {runs.FLOW_RUN_TAG: ODD_FLOW_RUN}, run_name="odd") == mine
    assert mlflow.get_run(mine).info.status == "RUNNING"
    assert [r.info.run_id for r in runs.running_runs(mlflow, [experiment], of=ProcessId.current())] == [mine]

    runs.fail_run(tracking, ODD_FLOW_RUN, reason="the flow failed")
    assert mlflow.get_run(mine).info.status == "FAILED"
    assert mlflow.get_run(lookalike).info.status == "FINISHED"


def test_running_runs_of_a_host_with_odd_characters_match_that_host_only(index):
    from lora_prep.tasks.common.process import ProcessId
    from lora_prep.tasks.tracking import runs

    _, mlflow, experiment = index
    odd, plain = ProcessId("build\\box'7", 4242, None), ProcessId("build\\box7", 4242, None)
    for owner in (odd, plain):
        mlflow.create_run(experiment, tags={runs.HOST_TAG: owner.host, runs.PID_TAG: str(owner.pid)})
    (found,) = runs.running_runs(mlflow, [experiment], of=odd)
    assert runs.owner(found.data.tags) == odd


@pytest.mark.parametrize("value", ["both ' and \" quotes", "ends in a backslash\\"])
def test_a_value_the_filter_grammar_cannot_hold_is_refused_in_one_line(value):
    from lora_prep.tasks.errors import InvalidInput
    from lora_prep.tasks.tracking.runs import literal

    with pytest.raises(InvalidInput) as refused:
        literal(value)
    assert "\n" not in str(refused.value) and "cannot be looked up in MLflow" in str(refused.value)

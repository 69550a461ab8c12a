"""QLoRA for real: 4-bit and 8-bit bitsandbytes loads on this CPU, through the whole flow.

bitsandbytes 0.50's CPU backend runs NF4 and LLM.int8 here, so nothing below is a stand-in: a dense
model (Llama), a mixture-of-experts model (Qwen3-MoE) and a hybrid (Jamba: Mamba + attention + MoE),
each 128 wide (bitsandbytes' CPU kernels want layers at least one 64-weight block wide), are prepared
at 4 and 8 bit by the prepare flow. Each artifact must hold LoRA A/B tensors on every planned module and
every routed expert, record transformers' own BitsAndBytesConfig, and load back with plain transformers
+ that config + PEFT on an empty cache to the logits ``load_adapter_ready`` gives. The plan's estimate
must match what the loaded, wrapped model holds (parameters, buffers, quantization state, adapter).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings, SourceSettings, TrackingSettings
from tests.model_factory import build_wide_model_dir, expert_params

ARCHS = {"llama": "kbit/llama", "qwen3_moe": "kbit/qwen3-moe", "jamba": "kbit/jamba"}
MODES = ("4bit", "8bit")
IDS = [[1, 7, 42, 99, 3, 250, 17, 5]]
# init_lora_weights=False: both LoRA matrices random, so a lost adapter would show in the logits.
LORA = LoraSettings(r=4, init_lora_weights=False, seed=7)
pytestmark = pytest.mark.slow

_PLAIN = """
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for case in json.loads(sys.argv[2]):
    manifest = json.load(open(case["artifact"] + "/manifest.json"))
    config = BitsAndBytesConfig.from_dict(manifest["load_used"]["quantization_config"])
    base = AutoModelForCausalLM.from_pretrained(case["repo"], revision=case["sha"], quantization_config=config,
                                                device_map="cpu", dtype=getattr(torch, manifest["load_plan"]["dtype"]))
    kinds = sorted({type(m).__name__ for m in base.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")})
    model = PeftModel.from_pretrained(base, case["artifact"] + "/adapter").eval()
    with torch.no_grad():
        out[case["artifact"]] = {"logits": model(ids).logits.float().tolist(), "kinds": kinds}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def kbit_repos(hub, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("kbit-models")
    for seed, (arch, repo) in enumerate(ARCHS.items(), start=40):
        hub.publish(repo, build_wide_model_dir(arch, root / arch, seed=seed))
    return ARCHS


def _lora_tensors(artifact: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(artifact / "adapter" / "adapter_model.safetensors"), "pt") as f:
        return {k.removeprefix("base_model.model.") for k in f.keys()}


def _has_lora(tensors: set[str], module: str, matrix: str) -> int:
    """How many `matrix` tensors sit on `module` (a fused experts block holds one per wrapped parameter: nested wrappers)."""
    return sum(1 for t in tensors if t.startswith(module + ".") and t.endswith(f"{matrix}.weight")
               and t.removeprefix(module + ".").replace("base_layer.", "").startswith("lora_"))


def test_the_plan_estimate_of_a_kbit_load_is_what_the_loaded_wrapped_model_holds(kbit_repos, hf_cache, tmp_path):
    from lora_prep.tasks.hub.repo import resolve_repo
    from lora_prep.tasks.hub.snapshot import download_snapshot
    from lora_prep.tasks.lora.wrap import wrap_lora
    from lora_prep.tasks.machine.hardware import probe_hardware
    from lora_prep.tasks.model.load import load_model, resident_bytes
    from lora_prep.tasks.plan import plan_prepare

    source, output = SourceSettings(cache_dir=str(hf_cache)), OutputSettings(output_dir=str(tmp_path / "out"))
    profile = probe_hardware(str(hf_cache), kbit=True)
    ratios = {}
    for arch, repo in kbit_repos.items():
        facts = resolve_repo(repo, "main", source)
        snapshot = download_snapshot(facts, source)
        for mode in MODES:
            load = LoadSettings(quantization=mode)
            plan = plan_prepare(profile, facts, load, LORA, output, "main", source)
            loaded = load_model(snapshot.snapshot_dir, plan.load, load)
            before_wrap = loaded.report.memory_bytes
            peft_model, _ = wrap_lora(loaded.model, LORA, plan.targets)
            measured = resident_bytes(peft_model)
            ratios[f"{arch} {mode}"] = plan.load.estimate_bytes / measured
            adapter = next(p.bytes for p in plan.load.memory if p.name == "LoRA adapter")
            assert before_wrap == measured - adapter  # the adapter is the only thing wrapping adds
            # Preparation for training upcast nothing: the load's own bytes are what the plan priced.
            assert loaded.report.kbit_preparation is not None and loaded.report.kbit_preparation.upcast_bytes == 0
    print("plan estimate / measured bytes:", {k: round(v, 4) for k, v in ratios.items()})
    assert all(0.9 <= r <= 1.1 for r in ratios.values()), ratios


def test_an_moe_plan_says_its_experts_stay_in_the_compute_dtype_under_bitsandbytes(kbit_repos, hf_cache, tmp_path, capsys):
    from lora_prep.cli import main

    code = main(["plan", kbit_repos["qwen3_moe"], "--quantization", "4bit", "--cache-dir", str(hf_cache),
                 "--output-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0, out
    (experts,) = [line for line in out.splitlines() if "fused expert parameters:" in line and "parameters as" in line]
    assert "bfloat16 (bitsandbytes quantizes nn.Linear only)" in experts
    (quantized,) = [line for line in out.splitlines() if "quantized linear weights:" in line]
    assert "4-bit NF4" in quantized


@pytest.mark.parametrize("mode", MODES)
def test_kbit_prepares_of_a_dense_an_moe_and_a_hybrid_model_reload_with_plain_transformers_and_peft(
    prefect_harness, kbit_repos, hub, hf_cache, tmp_path, mode
):
    from mlflow.tracking import MlflowClient

    from lora_prep.flows.prepare_model import prepare_model
    from lora_prep.tasks.artifact.load_back import load_adapter_ready
    from lora_prep.tasks.records.manifest import Manifest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cases, expected = [], {}
    for arch, repo in kbit_repos.items():
        result = prepare_model(repo, source=SourceSettings(cache_dir=str(hf_cache)), load=LoadSettings(quantization=mode), lora=LORA,
                               tracking=TrackingSettings(tracking_uri=uri), output=OutputSettings(output_dir=str(tmp_path / "out")))
        artifact = Path(result.artifact_dir)
        manifest = Manifest.read(artifact)
        recorded = manifest.load_used.quantization_config
        assert recorded["quant_method"] == "bitsandbytes" and recorded[f"load_in_{mode}"] is True
        assert manifest.load_plan.quantization == mode and manifest.load_used.quantization.startswith(mode)
        # Every planned module and every routed expert of every MoE layer carries LoRA A and B.
        tensors = _lora_tensors(artifact)
        for module in manifest.lora.targets.target_modules:
            assert _has_lora(tensors, module, "lora_A") == _has_lora(tensors, module, "lora_B") == 1, f"{arch} {mode}: {module}"
        experts = expert_params(arch)  # every fused expert parameter of every MoE layer: its own A and B
        for block in {p.rsplit(".", 1)[0] for p in experts}:
            wrapped = len([p for p in experts if p.startswith(block + ".")])
            assert _has_lora(tensors, block, "lora_A") == _has_lora(tensors, block, "lora_B") == wrapped, f"{arch} {mode}: {block}"
        run = MlflowClient(uri).get_run(result.mlflow_run_id)
        assert run.data.params["plan.quantization"] == mode and json.loads(run.data.params["plan.quantization_config"]) == recorded
        expert_part = [p for p in manifest.load_plan.memory if p.name == "fused expert parameters"]
        assert [int(run.data.params.get("memory.fused_expert_parameters.params", 0))] == [p.params for p in expert_part] or not experts
        assert bool(expert_part) == bool(experts)
        ready = load_adapter_ready(artifact, source=SourceSettings(cache_dir=str(hf_cache)))
        with torch.no_grad():
            expected[str(artifact)] = ready.model(torch.tensor(IDS)).logits.float()
        cases.append({"artifact": str(artifact), "repo": repo, "sha": manifest.base_model.commit_sha})

    # Plain transformers + the recorded BitsAndBytesConfig + PEFT, in a fresh process with an empty cache.
    fresh = tmp_path / "fresh-cache"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PREFECT_")}
    env.update(HF_HUB_CACHE=str(fresh), HF_HOME=str(tmp_path / "fresh-home"))
    done = subprocess.run([sys.executable, "-c", _PLAIN, json.dumps(IDS), json.dumps(cases)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    plain = json.loads(done.stdout.strip().splitlines()[-1])
    for artifact, logits in expected.items():
        assert plain[artifact]["kinds"] == ["Linear4bit" if mode == "4bit" else "Linear8bitLt"]
        assert torch.equal(torch.tensor(plain[artifact]["logits"]), logits), artifact

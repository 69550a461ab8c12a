"""The artifact loads anywhere with plain PEFT, and a local directory is a model source.

Plain PEFT runs in a fresh process with an empty Hugging Face cache (another machine, as far as
the files can tell), against the test hub: ``AutoPeftModelForCausalLM`` reads the base repo id and
commit from ``adapter_config.json``; ``PeftModel.from_pretrained`` attaches the adapter to the base
at that commit. Both must give the logits ``load_adapter_ready`` gives, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_prep.tasks.errors import IntegrityError
from lora_prep.tasks.records.manifest import read_manifest
from lora_prep.tasks.settings import (
    LoadSettings,
    LoraSettings,
    OutputSettings,
    SourceSettings,
)

IDS = [[1, 7, 42, 99, 3, 250]]
# init_lora_weights=False: both LoRA matrices random, so a lost adapter would show in the logits.
LORA = LoraSettings(r=4, init_lora_weights=False, seed=3)

_PLAIN_PEFT = """
import json, sys, torch
from peft import AutoPeftModelForCausalLM, PeftModel
from transformers import AutoModelForCausalLM

ids = torch.tensor(json.loads(sys.argv[1]))
out = {}
for case in json.loads(sys.argv[2]):
    auto = AutoPeftModelForCausalLM.from_pretrained(case["adapter"]).eval()
    base = AutoModelForCausalLM.from_pretrained(case["repo"], revision=case["sha"])
    attached = PeftModel.from_pretrained(base, case["adapter"]).eval()
    with torch.no_grad():
        out[case["adapter"]] = [auto(ids).logits.tolist(), attached(ids).logits.tolist()]
print(json.dumps(out))
"""


def _prepare(repo_id: str, revision: str, cache: Path, out: Path) -> str:
    from lora_prep.tasks.build import build_adapter_ready
    from lora_prep.tasks.hub.repo import resolve_repo
    from lora_prep.tasks.hub.snapshot import download_snapshot
    from lora_prep.tasks.machine.hardware import probe_hardware
    from lora_prep.tasks.plan import plan_prepare

    source, load, output = SourceSettings(cache_dir=str(cache)), LoadSettings(), OutputSettings(output_dir=str(out))
    facts = resolve_repo(repo_id, revision, source)
    profile = probe_hardware(str(cache))
    plan = plan_prepare(profile, facts, load, LORA, output, revision, source)
    return build_adapter_ready(download_snapshot(facts, source), facts, profile, plan, load, LORA, output).artifact_dir


def _texts(artifact: str) -> dict[str, str]:
    return {str(p): p.read_bytes().decode("utf-8", errors="replace") for p in Path(artifact).rglob("*") if p.is_file()}


@pytest.mark.slow
def test_plain_peft_on_a_fresh_cache_gives_the_logits_of_load_adapter_ready(hub, hf_cache, tmp_path):
    from lora_prep.tasks.artifact.load_back import load_adapter_ready

    cases, expected = [], {}
    for repo_id, revision in (("tiny/llama", "main"), ("tiny/qwen3-moe", "main"), ("tiny/llama", "v1")):
        artifact = _prepare(repo_id, revision, hf_cache, tmp_path / "out")
        ready = load_adapter_ready(artifact, source=SourceSettings(cache_dir=str(hf_cache)))
        with torch.no_grad():
            expected[str(Path(artifact) / "adapter")] = ready.model(torch.tensor(IDS)).logits
        config = json.loads((Path(artifact) / "adapter" / "adapter_config.json").read_text())
        sha = hub.repos[repo_id].shas[revision]
        assert config["base_model_name_or_path"] == repo_id and config["revision"] == sha
        # No path of the preparing machine and no load-time argument in any artifact file.
        for path, text in _texts(artifact).items():
            assert str(hf_cache) not in text and "/snapshots/" not in text, path
            assert "local_files_only" not in text and '"is_local"' not in text, path
        cases.append({"adapter": str(Path(artifact) / "adapter"), "repo": repo_id, "sha": sha})

    fresh = tmp_path / "another-machine"
    env = {**os.environ, "HF_HOME": str(fresh), "HF_HUB_CACHE": str(fresh / "hub")}
    done = subprocess.run([sys.executable, "-c", _PLAIN_PEFT, json.dumps(IDS), json.dumps(cases)],
                          capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    for adapter, logits in expected.items():
        auto, attached = (torch.tensor(x) for x in got[adapter])
        assert torch.equal(auto, logits) and torch.equal(attached, logits), adapter
    assert (fresh / "hub").is_dir()  # the base came from the hub into the fresh cache


def test_a_local_directory_prepares_end_to_end_and_a_changed_file_is_refused_at_load_back(prefect_harness, hub, tmp_path):
    from lora_prep.tasks.artifact.load_back import load_adapter_ready
    from tests.model_factory import build_model_dir

    model_dir = build_model_dir("llama", tmp_path / "shared-volume" / "tiny-llama", seed=11)
    env = {**os.environ, "PREFECT_API_URL": prefect_harness}
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [str(Path(sys.executable).with_name("lora-prep")), "prepare", str(model_dir), "--r", "4", "--output-dir",
         str(tmp_path / "out"), "--tracking-uri", mlflow_uri, "--json"],
        capture_output=True, text=True, env=env, timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["source"] == "local" and result["commit_sha"] is None and len(result["content_digest"]) == 64
    manifest = read_manifest(result["artifact_dir"])
    assert manifest.base_model.name_or_path == str(model_dir) and manifest.base_model.content_digest == result["content_digest"]
    config = json.loads((Path(result["artifact_dir"]) / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model_dir) and config["revision"] is None
    from mlflow.tracking import MlflowClient

    params = MlflowClient(mlflow_uri).get_run(result["mlflow_run_id"]).data.params
    assert params["source"] == "local" and params["content_digest"] == result["content_digest"]

    ready = load_adapter_ready(result["artifact_dir"])
    assert ready.manifest.base_model.source == "local"
    copy = shutil.copytree(model_dir, tmp_path / "copy-on-another-machine")
    assert load_adapter_ready(result["artifact_dir"], base=copy).summary()["content_digest"] == result["content_digest"]

    tokenizer = model_dir / "tokenizer_config.json"
    tokenizer.write_text(tokenizer.read_text().replace("}", ', "edited": true}', 1))
    with pytest.raises(IntegrityError) as err:
        load_adapter_ready(result["artifact_dir"])
    assert "tokenizer_config.json" in str(err.value)

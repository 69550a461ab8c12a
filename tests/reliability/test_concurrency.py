"""Several `lora-prep prepare` at once on one machine, on new stores: all succeed, the weights move once,
every run is FINISHED, and no "database is locked" anywhere.

Two topologies: the embedded default (no PREFECT_API_URL: the runs share lora-prep's local Prefect
server, started by the first of them; a new per-user MLflow SQLite store), and one running Prefect
server with a new SQLite MLflow store. Eight processes on two cores are their own CPU load.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import child_env

LORA_PREP = str(Path(sys.executable).with_name("lora-prep"))
RUNS = 8
pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # eight CLI processes at once


def _burst(env: dict[str, str], out: Path, extra: list[str]) -> list[tuple[int, str, str]]:
    started = time.monotonic()
    procs = [
        subprocess.Popen([LORA_PREP, "prepare", "tiny/llama-sharded", "--output-dir", str(out / f"run{i}"), "--json", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for i in range(RUNS)
    ]
    try:
        results = [(p.returncode, *p.communicate(timeout=600)) if p.wait(timeout=600) is not None else (None, "", "") for p in procs]
        print(f"time to outcome: {RUNS} runs, exit codes {[code for code, _, _ in results]}, all ended after {time.monotonic() - started:.1f} s")
        return results
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def _check(results, hub, uri: str, out: Path) -> None:
    from mlflow.tracking import MlflowClient

    codes = [code for code, _, _ in results]
    assert codes == [0] * RUNS, [err[-1500:] for code, _, err in results if code]
    assert not [err for _, out_, err in results if "database is locked" in out_ + err]
    prepared = [json.loads(stdout) for _, stdout, _ in results]
    assert len({p["artifact_dir"] for p in prepared}) == RUNS
    assert all(Path(p["artifact_dir"], "manifest.json").is_file() for p in prepared)
    sha = hub.repos["tiny/llama-sharded"].sha
    shards = sorted((hub.store / "tiny" / "llama-sharded" / "commits" / sha).glob("model-*.safetensors"))
    whole = [r for r in hub.records("*/tiny/llama-sharded/resolve/*/model-*.safetensors", "GET") if not r.range]
    assert sum(r.body_bytes for r in whole) == sum(s.stat().st_size for s in shards)  # the weights, once
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("lora-prep").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * RUNS


def test_eight_runs_at_once_on_the_embedded_default_with_new_stores(hub, hf_cache, tmp_path, monkeypatch):
    import urllib.request

    from lora_prep import local_server

    home, prefect_home = tmp_path / "lora-prep-home", tmp_path / "prefect-home"
    env = child_env({"HF_HUB_CACHE": str(hf_cache), "LORA_PREP_HOME": str(home), "PREFECT_HOME": str(prefect_home)})
    env.pop("MLFLOW_TRACKING_URI", None)
    monkeypatch.setenv("PREFECT_HOME", str(prefect_home))
    try:
        results = _burst(env, tmp_path / "out", [])
        state = local_server.status()
        request = urllib.request.Request(f"{state['url']}/flow_runs/count", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            flow_runs = int(response.read())
    finally:
        _stop_local_server(prefect_home)
    _check(results, hub, f"sqlite:///{home / 'mlflow.db'}", tmp_path / "out")
    assert state["running"] and flow_runs == RUNS  # one local server, started once, holds all eight runs
    assert not local_server.status()["running"]


def test_eight_runs_at_once_against_one_prefect_server_with_a_new_mlflow_store(prefect_harness, hub, hf_cache, tmp_path):
    uri = f"sqlite:///{tmp_path / 'new-store' / 'mlflow.db'}"
    env = child_env({"PREFECT_API_URL": prefect_harness, "HF_HUB_CACHE": str(hf_cache)})
    results = _burst(env, tmp_path / "out", ["--tracking-uri", uri])
    _check(results, hub, uri, tmp_path / "out")


def _stop_local_server(prefect_home: Path) -> None:
    """The shared local server the first run started: stopped by this test, through lora-prep's own command."""
    subprocess.run([LORA_PREP, "server", "stop"], env=child_env({"PREFECT_HOME": str(prefect_home)}), timeout=60, capture_output=True)

"""Dead servers fail fast and say which, with the client libraries' default settings (nothing in the
environment bounds MLflow or Prefect here: the console script bounds its own calls).

- MLflow unreachable: the run ends within 60 s with one line naming MLflow, its URI, the kept artifact
  and the `lora-prep log` command; no urllib3 retry spam.
- The Prefect API killed mid-run: the CLI ends within 60 s with one line naming the API URL and what
  to do, and the run's MLflow run is FAILED, not RUNNING.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers import child_env, free_port, start_prefect_server

LORA_PREP = str(Path(sys.executable).with_name("lora-prep"))
pytestmark = [pytest.mark.slow, pytest.mark.alone]  # each asserts a time to outcome


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = child_env(extra)
    assert not [k for k in env if k.startswith(("MLFLOW_HTTP_REQUEST_", "PREFECT_CLIENT_"))], "the user's defaults, not ours"
    return env


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("lora-prep: error:")]


def test_an_unreachable_mlflow_ends_the_run_within_a_minute_with_one_line(prefect_harness, hub, hf_cache, tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    done = subprocess.run(
        [LORA_PREP, "prepare", "tiny/gpt2", "--tracking-uri", uri, "--output-dir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=240,
        env=_env({"PREFECT_API_URL": prefect_harness, "HF_HUB_CACHE": str(hf_cache), "PREFECT_HOME": str(tmp_path / "ph")}),
    )
    seconds = time.monotonic() - started
    print(f"time to outcome: exit {done.returncode} after {seconds:.1f} s")
    assert done.returncode == 1, done.stderr[-2000:]
    (line,) = _error_lines(done.stderr)
    (artifact,) = [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]
    assert "MLflow" in line and uri in line and f"lora-prep log {artifact}" in line
    assert "Retrying (" not in done.stderr and "Traceback" not in done.stderr
    assert seconds < 60, seconds


def test_a_prefect_api_killed_mid_run_ends_the_cli_within_a_minute_naming_it(hub, hf_cache, tmp_path):
    from mlflow.tracking import MlflowClient

    prefect = start_prefect_server(tmp_path / "prefect")
    mlflow_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hub.delay(20.0, "*/tiny/llama/resolve/*/model.safetensors", methods=("GET",), times=1)  # holds the download open
    env = _env({**prefect.env, "HF_HUB_CACHE": str(hf_cache)})
    cli = subprocess.Popen([LORA_PREP, "prepare", "tiny/llama", "--tracking-uri", mlflow_uri, "--output-dir", str(tmp_path / "out")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not [r for r in hub.records("*/tiny/llama/resolve/*/model.safetensors", "GET") if not r.range]:
            assert time.monotonic() < deadline and cli.poll() is None, "the download never started"
            time.sleep(0.2)
        prefect.stop(timeout=5)  # the API dies while the flow runs
        killed = time.monotonic()
        _, stderr = cli.communicate(timeout=120)
        seconds = time.monotonic() - killed
    finally:
        if cli.poll() is None:
            os.killpg(cli.pid, 9)
            cli.wait(timeout=10)
        prefect.stop()
    print(f"time to outcome: exit {cli.returncode} {seconds:.1f} s after the API died")
    assert cli.returncode == 1, stderr[-2000:]
    lines = _error_lines(stderr)
    assert len(lines) == 1, stderr[-3000:]
    assert prefect.url in lines[0] and "Prefect API" in lines[0] and "prefect server start" in lines[0]
    assert seconds < 60, seconds
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs and all(r.info.status == "FAILED" for r in runs), [r.info.status for r in runs]
    assert "Prefect API" in runs[0].data.tags.get("lora_prep.failure", "")


def test_a_prefect_api_that_is_not_there_at_all_is_one_line_naming_it(hub, hf_cache, tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    started = time.monotonic()
    done = subprocess.run([LORA_PREP, "prepare", "tiny/gpt2", "--output-dir", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=240, env=_env({"PREFECT_API_URL": url, "HF_HUB_CACHE": str(hf_cache), "LORA_PREP_HOME": str(tmp_path)}))
    seconds = time.monotonic() - started
    print(f"time to outcome: exit {done.returncode} after {seconds:.1f} s")
    assert done.returncode == 1
    (line,) = _error_lines(done.stderr)
    assert url in line and "Prefect API" in line
    assert seconds < 60
    assert json.dumps(done.stdout) == '""'

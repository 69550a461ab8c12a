"""Nothing is left RUNNING, nothing half-done stays: a preparation SIGKILLed at a stage, then run again.

After the rerun: no MLflow run RUNNING (the killed one is FAILED, saying why), its Prefect flow run is
not left Running, no `.partial` artifact directory and no `*.incomplete` download remain. After an
MLflow outage and `lora-prep log`, exactly one run holds the preparation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.servers import child_env, launch_mlflow_server, wait_mlflow_server

LORA_PREP = str(Path(sys.executable).with_name("lora-prep"))
pytestmark = pytest.mark.slow


def _cli(argv, env, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([LORA_PREP, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kwargs)


def _wait(predicate, what: str, timeout: float = 120, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the process ended before {what}: {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _runs(uri: str):
    """The store's runs, read through lora-prep's client: a new SQLite store is being created by the CLI
    meanwhile, and only lora-prep's init lock keeps a second process out of its migration."""
    from lora_prep.tasks.tracking.store import client as mlflow_client

    client = mlflow_client(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments) if experiments else []


def _kill(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def _flow_run_state(api: str, flow_run_id: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{api}/flow_runs/{flow_run_id}", timeout=10) as response:
        return json.loads(response.read())["state"]["type"]


def test_a_preparation_killed_mid_download_is_closed_and_cleaned_by_the_next_run(prefect_harness, hub, hf_cache, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = child_env({"PREFECT_API_URL": prefect_harness, "HF_HUB_CACHE": str(hf_cache)})
    argv = ["prepare", "tiny/phi3", "--tracking-uri", uri, "--output-dir", str(tmp_path / "out"), "--json"]
    weights = "*/tiny/phi3/resolve/*/model.safetensors"
    hub.stall_after(weights, 50_000, seconds=60)  # the weights transfer starts, then hangs: the process is mid-download
    first = _cli(argv, env)
    try:
        _wait(lambda: [r for r in _runs(uri) if r.info.status == "RUNNING"] if Path(uri[10:]).exists() else [], "the MLflow run", process=first)
        _wait(lambda: list(Path(hf_cache).rglob("*.incomplete")), "a partial download", process=first)
    finally:
        _kill(first)
    (killed,) = _runs(uri)
    assert killed.info.status == "RUNNING"  # what a SIGKILL leaves: no hook ran
    flow_run_id = killed.data.tags["prefect.flow_run_id"]
    assert _flow_run_state(prefect_harness, flow_run_id) == "RUNNING"

    hub.reset_faults()
    started = time.monotonic()
    second = _cli(argv, env)
    out, err = second.communicate(timeout=240)
    print(f"time to outcome: the next run closed and cleaned up, exit {second.returncode} after {time.monotonic() - started:.1f} s")
    assert second.returncode == 0, err[-3000:]
    runs = {r.info.run_id: r for r in _runs(uri)}
    assert runs[killed.info.run_id].info.status == "FAILED" and "is gone" in runs[killed.info.run_id].data.tags["lora_prep.closed_by"]
    assert [r.info.status for r in runs.values() if r.info.run_id != killed.info.run_id] == ["FINISHED"]
    assert _flow_run_state(prefect_harness, flow_run_id) == "CRASHED"
    assert not list(Path(hf_cache).rglob("*.incomplete"))
    assert json.loads(out)["bytes_downloaded"] > 0


def test_a_preparation_killed_mid_artifact_write_leaves_only_a_partial_dir_that_the_next_run_removes(prefect_harness, hub, hf_cache, tmp_path):
    out = tmp_path / "out"
    # A real process killed by SIGKILL inside write_artifact, after the adapter files and before the rename.
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from lora_prep.tasks.artifact.write import write_artifact

        def fill(tmp):
            (tmp / "adapter").mkdir()
            (tmp / "adapter" / "adapter_model.safetensors").write_bytes(b"x" * 4096)
            os.kill(os.getpid(), signal.SIGKILL)

        write_artifact(Path({str(out)!r}), "tiny--gpt2--killed", fill, lambda m: "")
    """)
    assert subprocess.run([sys.executable, "-c", script], timeout=120).returncode == -signal.SIGKILL
    assert [p.name.startswith(".tiny--gpt2--killed.partial-") for p in out.iterdir()] == [True]

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = child_env({"PREFECT_API_URL": prefect_harness, "HF_HUB_CACHE": str(hf_cache)})
    done = subprocess.run([LORA_PREP, "prepare", "tiny/gpt2", "--tracking-uri", uri, "--output-dir", str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    left = sorted(p.name for p in out.iterdir())
    assert len(left) == 1 and left[0].startswith("tiny--gpt2--") and not left[0].startswith(".")


def test_after_an_mlflow_outage_lora_prep_log_attaches_to_the_preparation_s_own_run(prefect_harness, hub, hf_cache, tmp_path):
    mlflow = wait_mlflow_server(launch_mlflow_server(tmp_path))
    env = child_env({"PREFECT_API_URL": prefect_harness, "HF_HUB_CACHE": str(hf_cache)})
    weights = "*/tiny/gpt-neox/resolve/*/model.safetensors"
    hub.delay(8.0, weights, methods=("GET",), times=1)
    cli = _cli(["prepare", "tiny/gpt-neox", "--tracking-uri", mlflow.url, "--output-dir", str(tmp_path / "out")], env)
    try:
        _wait(lambda: [r for r in hub.records(weights, "GET") if not r.range], "the download", process=cli)
        _wait(lambda: [r.info.status for r in _runs(mlflow.url)] == ["RUNNING"], "the run opened beside the download", process=cli)
        port = mlflow.url.rsplit(":", 1)[1]
        mlflow.stop(timeout=5)  # MLflow dies mid-run
        killed = time.monotonic()
        _, err = cli.communicate(timeout=240)
        print(f"time to outcome: exit {cli.returncode} {time.monotonic() - killed:.1f} s after MLflow died")
    finally:
        if cli.poll() is None:
            _kill(cli)
        mlflow.stop()
    assert cli.returncode == 1 and "lora-prep log" in err, err[-2000:]
    (artifact,) = [p for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")]

    mlflow = _relaunch_on(port, tmp_path)  # the same store, on the same port the error names
    try:
        done = subprocess.run([LORA_PREP, "log", str(artifact), "--tracking-uri", f"http://127.0.0.1:{port}"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        runs = _runs(f"http://127.0.0.1:{port}")
        assert [r.info.status for r in runs] == ["FINISHED"]  # one run per preparation, finished, none RUNNING
    finally:
        mlflow.stop()


def _relaunch_on(port: str, tmp: Path):
    """`mlflow server` again on the same store and port (a restart, as an operator would do)."""
    from tests.servers import BIN, launch

    root = tmp / "mlflow"
    argv = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", port, "--backend-store-uri",
            f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"), "--workers", "1"]
    handle = launch("mlflow server", argv, tmp / "logs" / "mlflow-server-2.log",
                    child_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}), cwd=root)
    handle.url = f"http://127.0.0.1:{port}"
    return wait_mlflow_server(handle)


def _flow_runs_tagged(api: str, tag: str) -> list[dict]:
    import urllib.request

    body = json.dumps({"flow_runs": {"tags": {"all_": [tag]}}}).encode()
    request = urllib.request.Request(f"{api}/flow_runs/filter", data=body, method="POST", headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_a_preparation_killed_before_its_mlflow_run_exists_leaves_no_flow_run_running(prefect_harness, hub, hf_cache, tmp_path):
    from filelock import FileLock

    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    env = child_env({"PREFECT_API_URL": prefect_harness, "HF_HUB_CACHE": str(hf_cache)})
    argv = ["prepare", "tiny/qwen3-moe", "--tracking-uri", uri, "--output-dir", str(tmp_path / "out"), "--json"]
    weights = "*/tiny/qwen3-moe/resolve/*/model.safetensors"
    hub.stall_after(weights, 50_000, seconds=60)
    # The store's first use waits on this lock: the MLflow run (opened beside the download) cannot exist yet.
    store_lock = FileLock(str(db) + ".init.lock")
    store_lock.acquire(timeout=10)
    try:
        first = _cli(argv, env)
        try:
            _wait(lambda: list(Path(hf_cache).rglob("*.incomplete")), "a partial download", process=first)
        finally:
            _kill(first)
        assert not db.exists()  # no MLflow run, no store: only Prefect knows this preparation
        (killed,) = _flow_runs_tagged(prefect_harness, f"lora-prep.pid:{first.pid}")
        assert killed["state"]["type"] == "RUNNING"
    finally:
        store_lock.release()

    hub.reset_faults()
    second = _cli(argv, env)
    out, err = second.communicate(timeout=240)
    assert second.returncode == 0, err[-3000:]
    (after,) = _flow_runs_tagged(prefect_harness, f"lora-prep.pid:{first.pid}")
    assert after["state"]["type"] == "CRASHED" and "is gone" in after["state"]["message"]
    (this,) = _flow_runs_tagged(prefect_harness, f"lora-prep.pid:{second.pid}")
    assert this["state"]["type"] == "COMPLETED"


# --- the embedded default's shared local server -------------------------------------------------------------------


def _local_server_children(process: subprocess.Popen) -> list:
    import psutil

    try:
        return [p for p in psutil.Process(process.pid).children() if "lora_prep.local_server" in " ".join(p.cmdline())]
    except psutil.Error:
        return []


def _gone(proc) -> bool:
    import psutil

    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_cli_killed_while_it_starts_the_local_server_leaves_a_server_the_next_run_finds(tmp_path, monkeypatch):
    # The CLI starts the shared server and waits seconds for it to answer; killed in that window, it used to leave a
    # server that no state file named: never reused, never stopped by `lora-prep server stop`, never idle-stopped.
    from lora_prep import local_server

    home = tmp_path / "prefect-home"
    monkeypatch.setenv("PREFECT_HOME", str(home))
    cli = subprocess.Popen([sys.executable, "-c", "from lora_prep import local_server; print(local_server.ensure())"],
                           env=child_env({"PREFECT_HOME": str(home)}), start_new_session=True,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    servers: list = []
    try:
        _wait(lambda: bool(servers.extend(_local_server_children(cli)) or servers), "the CLI to start the server", 60, cli)
        os.killpg(cli.pid, signal.SIGKILL)  # the server imports Prefect for seconds before it answers: killed before
        cli.wait(timeout=30)
        recorded = local_server.status()
        assert recorded.get("pid") == servers[0].pid and not recorded["running"]
        _wait(lambda: local_server.status()["running"], "the orphaned server to answer", 180)
        assert local_server.ensure() == recorded["url"]  # the next run reuses it: no second server
        assert local_server.stop()
        _wait(lambda: _gone(servers[0]), "the server to stop", 30)
    finally:
        if cli.poll() is None:
            _kill(cli)
        for server in servers:
            if not _gone(server):
                server.kill()


def test_a_local_server_no_state_file_names_stops_itself(tmp_path):
    # Another server took over the record (this one stopped answering for a while), or the record was removed: no run
    # finds this one again, so it stops once nothing runs on it, instead of idling for the hour a recorded one waits.
    from lora_prep.local_server import _free_port

    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "lora-prep-server.json").write_text(json.dumps({"url": "http://127.0.0.1:9/api", "pid": 1, "last_used": time.time()}))
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "lora_prep.local_server", "--port", str(port), "--check-every", "1"],
                              env=child_env({"PREFECT_HOME": str(home)}), start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        from lora_prep.local_server import _healthy

        _wait(lambda: server.poll() is not None or _healthy(f"http://127.0.0.1:{port}/api"), "the server to answer", 180)
        assert server.wait(timeout=60) == 0  # stopped by itself, cleanly (a crash at start would not be 0)
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)

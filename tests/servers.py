"""Real servers for end-to-end tests: `prefect server start`, `mlflow server`, `prefect worker start`.

Each helper launches one process with `subprocess.Popen` in its own session
(so `stop()` can end the process *and* the children it spawned, such as the
MLflow server's uvicorn workers, by signalling that one process group), polls
a health URL until a deadline, and returns a handle. Every wait is bounded;
on a timeout the error includes the tail of the process log.

    prefect = start_prefect_server(tmp)      # prefect.url -> http://127.0.0.1:PORT/api
    mlflow = start_mlflow_server(tmp)        # mlflow.url  -> http://127.0.0.1:PORT
    worker = start_worker(prefect, "pool", env={...})
    ...
    worker.stop(); mlflow.stop(); prefect.stop()

Measured on the 2-core test machines (2026-11): Prefect and MLflow servers
launched side by side are both healthy after ~8 s on an idle machine, up to
~20 s under load (Prefect migrates a fresh SQLite database, MLflow creates its
tables); stopping either takes 1-2 s; a worker registers in ~2 s.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's prefect and mlflow CLIs live next to its python


def free_port() -> int:
    """A port the OS just handed out; closed again at once, so a race is possible but rare on a test box."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerHandle:
    """One launched process: its URL (if it serves one), its log file, and how to stop it."""

    name: str
    process: subprocess.Popen
    log_path: Path
    url: str = ""
    env: dict[str, str] = field(default_factory=dict)  # what a client of this server needs in its environment

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the process group, wait up to `timeout` s, then SIGKILL it. Returns the exit code."""
        if self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self.process, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Children that outlived their parent (same group): end them too, and wait (bounded) until
        # the group is gone, so the next test does not share the CPU with a dying server.
        _signal_group(self.process, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while group_alive(self.process) and time.monotonic() < deadline:
            time.sleep(0.1)
        return self.process.returncode


def group_alive(process: subprocess.Popen) -> bool:
    """True while any process of the group this handle started still exists (zombies included)."""
    try:
        os.killpg(process.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    # start_new_session=True made the child the leader of a group whose id is its pid:
    # this signals only what this handle launched.
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def launch(name: str, argv: list[str], log_path: Path, env: dict[str, str], cwd: Path | None = None) -> ServerHandle:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    try:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=str(cwd) if cwd else None, start_new_session=True,
        )
    finally:
        log.close()  # the child holds its own descriptor
    return ServerHandle(name=name, process=process, log_path=log_path)


def wait_until_healthy(handle: ServerHandle, health_url: str, timeout: float, expect: str | None = None) -> None:
    """Poll `health_url` every 0.25 s until it answers 200 (and contains `expect`), the process dies, or the deadline."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        if not handle.alive():
            raise RuntimeError(f"{handle.name} exited with code {handle.process.returncode} before it was healthy:\n{handle.log_tail()}")
        try:
            with urllib.request.urlopen(health_url, timeout=2) as response:
                body = response.read().decode(errors="replace")
                if response.status == 200 and (expect is None or expect in body):
                    return
                last = f"HTTP {response.status}: {body[:200]}"
        except (urllib.error.URLError, OSError) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.25)
    handle.stop()
    raise TimeoutError(f"{handle.name} not healthy at {health_url} after {timeout:.0f} s ({last}):\n{handle.log_tail()}")


def prefect_client_env(api_url: str, prefect_home: Path) -> dict[str, str]:
    """What a Prefect CLI or worker needs to talk to this server and nothing else (no user profile)."""
    return {
        "PREFECT_API_URL": api_url,
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_PROFILES_PATH": str(prefect_home / "profiles.toml"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_CLI_COLORS": "false",
        "PREFECT_CLI_WRAP_LINES": "false",
        "PREFECT_LOGGING_LEVEL": "INFO",
    }


def child_env(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without its Prefect settings, plus `extra`: what a launched process gets."""
    env = dict(os.environ)
    # The test process may run under prefect_test_harness; its ephemeral API must not leak into the children.
    for key in list(env):
        if key.startswith("PREFECT_"):
            env.pop(key)
    env.update(extra)
    return env


# How long the test bed waits for a server it started to answer its health check. A bound on the test bed, not on
# lora-prep: make test runs two workers, and an `mlflow server` launched while the fleet test starts its own dozen
# processes on 2 cores was still importing after 60 s (its database initialised 27 s in). Bounded all the same.
START_TIMEOUT_S = 180.0


def start_prefect_server(tmp: Path, *, timeout: float = START_TIMEOUT_S, scheduler: bool = False) -> ServerHandle:
    """`prefect server start` on 127.0.0.1:<free port> with PREFECT_HOME and its SQLite database under `tmp`."""
    return wait_prefect_server(launch_prefect_server(tmp, scheduler=scheduler), timeout)


def start_mlflow_server(tmp: Path, *, timeout: float = START_TIMEOUT_S) -> ServerHandle:
    """`mlflow server` on 127.0.0.1:<free port>, SQLite store and proxied artifacts under `tmp`."""
    return wait_mlflow_server(launch_mlflow_server(tmp), timeout)


def start_servers(tmp: Path, *, timeout: float = START_TIMEOUT_S, scheduler: bool = False) -> tuple[ServerHandle, ServerHandle]:
    """Both servers, launched side by side, then both waited for."""
    prefect = launch_prefect_server(tmp, scheduler=scheduler)
    mlflow = launch_mlflow_server(tmp)
    try:
        return wait_prefect_server(prefect, timeout), wait_mlflow_server(mlflow, timeout)
    except BaseException:
        mlflow.stop()
        prefect.stop()
        raise


def wait_prefect_server(handle: ServerHandle, timeout: float = START_TIMEOUT_S) -> ServerHandle:
    wait_until_healthy(handle, f"{handle.url}/health", timeout, expect="true")
    return handle


def wait_mlflow_server(handle: ServerHandle, timeout: float = START_TIMEOUT_S) -> ServerHandle:
    wait_until_healthy(handle, f"{handle.url}/health", timeout)
    return handle


def launch_prefect_server(tmp: Path, *, scheduler: bool = False) -> ServerHandle:
    """Launch, without waiting. Services stay on (the event triggers of prefect.yaml need them) except
    the scheduler, unless asked: tests start runs themselves, and a cron schedule that comes due
    during a test would start a run nobody waits for. The UI is off (nothing a test reads)."""
    tmp = Path(tmp)
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    client_env = prefect_client_env(api, home)
    server_env = child_env({
        **{k: v for k, v in client_env.items() if k != "PREFECT_API_URL"},  # the server is no client of an API
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    })
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off",
            "--scheduler" if scheduler else "--no-scheduler"]
    handle = launch("prefect server", argv, tmp / "logs" / "prefect-server.log", server_env)
    handle.url, handle.env = api, client_env
    return handle


def launch_mlflow_server(tmp: Path) -> ServerHandle:
    """Launch, without waiting: SQLite backend store, proxied artifacts under `tmp/mlflow/artifacts`.

    `--serve-artifacts` is the default in MLflow 3, so clients log artifacts
    through the server (mlflow-artifacts:/ URIs) and need no access to the
    directory: the same shape as an S3 bucket behind a team server.
    One worker: 2 cores, and SQLite serialises writes anyway.
    """
    return launch_mlflow_server_on(tmp, f"sqlite:///{Path(tmp) / 'mlflow' / 'mlflow.db'}")


def start_worker(
    prefect: ServerHandle, pool: str, tmp: Path, *, env: dict[str, str] | None = None,
    cwd: Path | None = None, poll_seconds: float = 1.0, timeout: float = 60.0,
) -> ServerHandle:
    """`prefect worker start --pool <pool>`; returns once the server lists the worker as online.

    The worker's environment (and `env`) is inherited by every flow-run
    subprocess it starts: HF_ENDPOINT, HF_HUB_CACHE, MLFLOW_TRACKING_URI go here
    or in the deployment's job variables.
    """
    return start_worker_as(prefect, pool, tmp, name=f"{pool}-worker-{free_port()}", env=env, cwd=cwd,
                           poll_seconds=poll_seconds, timeout=timeout)


def run_cli(argv: list[str], env: dict[str, str], *, cwd: Path | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Run a CLI (prefect, mlflow, lora-prep) to completion with a deadline; raise with its output on failure."""
    result = subprocess.run(
        argv, env=child_env(env), cwd=str(cwd) if cwd else None, capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


# --- Servers on an external database, a restartable Prefect server, workers on "other hosts" ---
#
# For tests/test_fleet.py: the same processes as above, on PostgreSQL (tests/postgres.py).


def launch_prefect_server_on(
    tmp: Path, database_url: str, *, port: int | None = None, scheduler: bool = False, env: dict[str, str] | None = None,
) -> ServerHandle:
    """`prefect server start` on `database_url` (e.g. postgresql+asyncpg://...), without waiting.

    PREFECT_HOME is `tmp/prefect-home` as in launch_prefect_server; pass the `port` of a
    stopped server (and the same `tmp`) to start it again on the same database and address.
    `env` adds server settings (e.g. PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE)."""
    tmp = Path(tmp)
    home = tmp / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    api = f"http://127.0.0.1:{port}/api"
    client_env = prefect_client_env(api, home)
    server_env = child_env({
        **{k: v for k, v in client_env.items() if k != "PREFECT_API_URL"},
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_SERVER_UI_ENABLED": "false",
        "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        **(env or {}),
    })
    argv = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui", "--analytics-off",
            "--scheduler" if scheduler else "--no-scheduler"]
    handle = launch("prefect server", argv, tmp / "logs" / "prefect-server.log", server_env)
    handle.url, handle.env = api, client_env
    return handle


def launch_mlflow_server_on(tmp: Path, backend_store_uri: str, *, workers: int = 1) -> ServerHandle:
    """`mlflow server` on `backend_store_uri` (e.g. postgresql://...), proxied artifacts under
    `tmp/mlflow/artifacts`, without waiting (see launch_mlflow_server)."""
    tmp = Path(tmp)
    root = tmp / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    argv = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(root / "artifacts"),
        "--workers", str(workers),
    ]
    # MLflow 3 servers also start a job runner and seven huey consumers (GenAI evaluation jobs), each
    # importing mlflow: seconds of CPU on 2 cores for nothing a test uses.
    env = child_env({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    env.pop("MLFLOW_TRACKING_URI", None)
    handle = launch("mlflow server", argv, tmp / "logs" / "mlflow-server.log", env, cwd=root)
    handle.url = f"http://127.0.0.1:{port}"
    handle.env = {"MLFLOW_TRACKING_URI": handle.url}
    return handle


def start_worker_as(
    prefect: ServerHandle, pool: str, tmp: Path, *, name: str, env: dict[str, str] | None = None,
    cwd: Path | None = None, wrap: list[str] | None = None, args: list[str] | None = None,
    poll_seconds: float = 1.0, timeout: float = 60.0,
) -> ServerHandle:
    """start_worker with a chosen name, extra `prefect worker start` arguments (`args`, e.g.
    ["--type", "process"]) and a command prefix (`wrap`, e.g. a new UTS namespace with its own
    hostname: ["unshare", "--uts", "sh", "-c", 'hostname node-b && exec "$@"', "sh"]); the
    prefix must exec the worker, so that the handle's pid is the worker's."""
    import json

    # The worker's temporary directories (a process worker's working directory per flow run, its
    # supervisor's files) go under the test's directory: a test that kills a worker leaves them there,
    # not in the system's /tmp.
    worker_tmp = Path(tmp) / "worker-tmp" / name
    worker_tmp.mkdir(parents=True, exist_ok=True)
    worker_env = child_env({
        **prefect.env,
        # Poll every second instead of every 10 s: a test waits on each pickup.
        "PREFECT_WORKER_QUERY_SECONDS": str(poll_seconds),
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        "TMPDIR": str(worker_tmp),
        **(env or {}),
    })
    argv = [*(wrap or []), str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", name, *(args or [])]
    handle = launch(f"prefect worker {name}", argv, Path(tmp) / "logs" / f"{name}.log", worker_env, cwd=cwd)
    handle.url, handle.env = prefect.url, prefect.env
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not handle.alive():
            raise RuntimeError(f"worker {name} exited with code {handle.process.returncode}:\n{handle.log_tail()}")
        request = urllib.request.Request(
            f"{prefect.url}/work_pools/{pool}/workers/filter", data=b"{}", method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if any(w.get("name") == name for w in json.loads(response.read())):
                    return handle
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    handle.stop()
    raise TimeoutError(f"worker {name} did not register with pool {pool} within {timeout:.0f} s:\n{handle.log_tail()}")

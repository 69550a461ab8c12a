"""The embedded default's Prefect API: one local server, started on first use, shared by later runs.

Without PREFECT_API_URL, Prefect 3.9 starts an ephemeral server in every process (7-13 s each,
measured here) and several at once contend for one SQLite database. Instead the CLI asks ``ensure()``:

- under an exclusive file lock (``$PREFECT_HOME/lora-prep-server.lock``: concurrent first uses
  start one server), reuse the server recorded in ``$PREFECT_HOME/lora-prep-server.json`` when its
  ``/health`` answers, else start ``python -m lora_prep.local_server`` detached (its own session,
  output in ``lora-prep-server.log``) on a free 127.0.0.1 port and wait for it;
- the server is Prefect's own app (``prefect.server.api.server.create_app``, the database under
  PREFECT_HOME as the ephemeral server would use, so the UI keeps the run history) in uvicorn,
  plus a watchdog that stops it once no lora-prep run has used it for ``IDLE_TIMEOUT_S`` and no
  flow run is Running or Pending, or as soon as nothing runs on it once the state file no longer names it.
  The state file names a server from the moment it is started, so a CLI killed during the start leaks none.

See and stop it: ``lora-prep server status`` / ``lora-prep server stop``. Measured here
(2026-12): a warm start takes ~4 s, a cold one (migrations) ~13 s; a run against a running
server pays neither. ``prefect server start --background`` is not used: in 3.9.1 it dies on its
second request (its output pipes are never read).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

IDLE_TIMEOUT_S = 3600
START_TIMEOUT_S = 180  # a first start migrates a new database: ~13 s idle, more under load
_CHECK_EVERY_S = 30


def prefect_home() -> Path:
    return Path(os.environ.get("PREFECT_HOME") or Path.home() / ".prefect").expanduser()


def _paths() -> tuple[Path, Path, Path]:
    home = prefect_home()
    return home / "lora-prep-server.json", home / "lora-prep-server.lock", home / "lora-prep-server.log"


def _healthy(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as response:
            return response.status == 200
    except OSError:
        return False


def _read_state() -> dict | None:
    state_file, _, _ = _paths()
    try:
        return json.loads(state_file.read_text())
    except (OSError, ValueError):
        return None


def _touch(state: dict) -> None:
    from lora_prep.tasks.common.files import write_json_atomic

    state_file, _, _ = _paths()
    write_json_atomic(state_file, {**state, "last_used": time.time()})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ensure() -> str:
    """The API URL of the shared local server, started if none answers."""
    from filelock import FileLock

    state_file, lock_file, log_file = _paths()
    state_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock_file), timeout=START_TIMEOUT_S + 30):
        state = _read_state()
        if state and _healthy(state["url"]):
            _touch({k: v for k, v in state.items() if k != "starting"})
            return state["url"]
        port = _free_port()
        url = f"http://127.0.0.1:{port}/api"
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "lora_prep.local_server", "--port", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Our server: no telemetry banner on the user's console, nothing sent home from it.
                env={**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
            )
        # Recorded before the wait: a CLI killed while the server starts (seconds) leaves a server that the next
        # run reuses and `lora-prep server stop` finds, not one nobody knows of.
        started = {"url": url, "pid": process.pid, "started": time.time(), "prefect_home": str(prefect_home())}
        _touch({**started, "starting": True})
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                state_file.unlink(missing_ok=True)
                tail = log_file.read_text(errors="replace")[-600:].strip().splitlines()[-1:] or ["no output"]
                from lora_prep.tasks.errors import OrchestratorUnavailable

                raise OrchestratorUnavailable(
                    f"the local Prefect server did not start ({tail[0]}); see {log_file}, "
                    "or run against a server of your own with PREFECT_API_URL."
                )
            time.sleep(0.25)
        _touch(started)
        return url


def status() -> dict:
    state = _read_state()
    if not state:
        return {"running": False}
    return {**state, "running": _healthy(state["url"])}


def stop(timeout: float = 20.0) -> bool:
    """Stop the shared server (its whole process group); True when one was running."""
    state_file, _, _ = _paths()
    state = _read_state()
    if not state:
        return False
    try:
        os.killpg(state["pid"], signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        state_file.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(state["pid"], 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(state["pid"], signal.SIGKILL)
    state_file.unlink(missing_ok=True)
    return True


# --- the server process -------------------------------------------------------------------------


def _busy(url: str) -> bool:
    """Any flow run Running or Pending on this server (then it must not stop)."""
    body = json.dumps({"flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}}}).encode()
    request = urllib.request.Request(f"{url}/flow_runs/count", data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.read()) > 0
    except (OSError, ValueError):
        return True  # cannot tell: keep running


def _watchdog(server: Any, url: str, idle_timeout: float, check_every: float) -> None:
    while not server.should_exit:
        time.sleep(check_every)
        state = _read_state() or {}
        if state.get("url") != url:
            # No longer the recorded server (another took over after this one stopped answering, or the record is
            # gone): no run will find it again, so it stops once nothing runs on it instead of living on unseen.
            if not _busy(url):
                server.should_exit = True
            continue
        if time.time() - state.get("last_used", time.time()) > idle_timeout and not _busy(url):
            server.should_exit = True


def serve(port: int, idle_timeout: float = IDLE_TIMEOUT_S, check_every: float = _CHECK_EVERY_S) -> None:
    import uvicorn
    from prefect.server.api.server import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(final=True), host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    url = f"http://127.0.0.1:{port}/api"
    threading.Thread(target=_watchdog, args=(server, url, idle_timeout, check_every), daemon=True).start()
    server.run()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="lora-prep's shared local Prefect server (started by the CLI)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT_S)
    parser.add_argument("--check-every", type=float, default=_CHECK_EVERY_S, help="seconds between the watchdog's checks")
    args = parser.parse_args()
    serve(args.port, args.idle_timeout, args.check_every)

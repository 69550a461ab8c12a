"""Which Prefect API a CLI run uses, and what the user is told when it stops answering.

- PREFECT_API_URL set: that server (a team's, or `prefect server start`).
- otherwise the shared local server (lora_prep/local_server.py), started on first use; with
  ``LORA_PREP_PREFECT=ephemeral``, Prefect's own per-process ephemeral server instead.

A Prefect API that dies mid-run surfaces as an ``httpx`` transport error from deep inside the
flow engine (Prefect's client is the only httpx user here: huggingface_hub uses httpx2, MLflow
requests), but only at the engine's next API call, which a long download or load can put off for
hours. So ``run()`` also watches the API: a watchdog thread asks ``/health`` every 5 s, and once
it has not answered for ``DEAD_AFTER_S`` the CLI ends the run itself. Either way the user gets one
line naming the API URL and what to do, and this process's MLflow runs are closed FAILED (the
flow's own failure hooks need the dead API). Partial files are what the next run cleans up.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from lora_prep.tasks.common.causes import causes
from lora_prep.tasks.errors import OrchestratorUnavailable

if TYPE_CHECKING:
    from lora_prep.tasks.settings import TrackingSettings

# The watchdog: /health every WATCH_EVERY_S (each probe waits up to WATCH_TIMEOUT_S); the API counts as
# dead once it has failed every probe for DEAD_AFTER_S. A server busy enough to miss one probe is not dead.
WATCH_EVERY_S, WATCH_TIMEOUT_S, DEAD_AFTER_S = 5.0, 5.0, 20.0


class PrefectApi:
    def __init__(self, url: str | None, kind: str) -> None:
        self.url, self.kind = url, kind

    def _gone(self, what: str, tracking: TrackingSettings | None) -> OrchestratorUnavailable:
        from lora_prep.tasks.tracking.runs import close_runs_of_this_process

        # An HTTP error status means the server answered but kept failing (overloaded, or its database is).
        how = "kept failing" if what.startswith("HTTP ") else "stopped answering"
        close_runs_of_this_process(tracking, f"the Prefect API at {self.url} {how}")
        fix = (
            "start it again (prefect server start), or unset PREFECT_API_URL to use lora-prep's local server"
            if self.kind == "external"
            else "run again: lora-prep starts its local server anew"
        )
        if how == "kept failing":
            fix = "look at the Prefect server's log; a SQLite-backed server under many runs at once wants PostgreSQL; " + fix
        return OrchestratorUnavailable(
            f"the Prefect API at {self.url} {how} during the run ({what}): {fix}; "
            "a partial artifact is cleaned up by the next run, and the MLflow run is marked FAILED.",
            prefect_api_url=self.url,
        )

    def run(self, flow: Any, **parameters: Any) -> Any:
        """Call the flow; a Prefect API that stops answering becomes OrchestratorUnavailable."""
        done = threading.Event()
        if self.url and self.url.startswith("http"):
            threading.Thread(
                target=self._watch, args=(done, parameters.get("tracking")), name="lora-prep-prefect-watchdog", daemon=True
            ).start()
        from prefect import tags

        from lora_prep.tasks.tracking.reaper import process_flow_run_tags

        try:
            # The flow run carries this process from its creation: a kill at any moment later leaves
            # a run the next one on this machine can tell is dead (tasks/tracking/reaper.py reap_dead_flow_runs).
            with tags(*process_flow_run_tags()):
                return flow(**parameters)
        except BaseException as exc:
            what = _prefect_transport_error(exc)
            if what is None:
                raise
            raise self._gone(f"{what}, after Prefect's client retries", parameters.get("tracking")) from exc
        finally:
            done.set()

    def _watch(self, done: threading.Event, tracking: TrackingSettings | None) -> None:
        """Ends the process when the API has been dead for DEAD_AFTER_S while the flow waits on something else."""
        failing_since = None
        while not done.wait(WATCH_EVERY_S):
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=WATCH_TIMEOUT_S) as response:
                    response.read(16)
                failing_since = None
                continue
            except OSError:
                failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since < DEAD_AFTER_S or done.is_set():
                continue
            # The main thread may be deep in a download or a load: end the process from here, with the one line.
            error = self._gone(f"no answer to /health for {DEAD_AFTER_S:.0f} s", tracking)
            sys.stdout.flush()
            print(f"lora-prep: error: {' '.join(str(error).split())}", file=sys.stderr, flush=True)
            os._exit(error.exit_code)


def _prefect_transport_error(exc: BaseException) -> str | None:
    """What failed, when a Prefect API call is what broke the run: 'ConnectError', 'HTTP 503 on POST /api/...'."""
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError

    for e in causes(exc):
        if isinstance(e, httpx.TransportError):
            return type(e).__name__
        if isinstance(e, PrefectHTTPStatusError) and e.response.status_code >= 500:
            return f"HTTP {e.response.status_code} on {e.request.method} {e.request.url.path}"
    return None


@contextlib.contextmanager
def prefect_api() -> Iterator[PrefectApi]:
    """The Prefect API of this run: the one Prefect's settings name (PREFECT_API_URL from the environment, the
    active profile or an enclosing settings context), else the shared local server, set for the run with
    Prefect's own scoped settings (so an embedding process's other Prefect use is left as it was)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url = PREFECT_API_URL.value()
    if url:
        yield PrefectApi(url, "external")
    elif os.environ.get("LORA_PREP_PREFECT") == "ephemeral":
        yield PrefectApi("(ephemeral)", "ephemeral")
    else:
        from lora_prep import local_server

        url = local_server.ensure()
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield PrefectApi(url, "local")

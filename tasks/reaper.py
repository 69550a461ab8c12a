"""Nothing is left RUNNING: close the MLflow runs (and Prefect flow runs) of preparations whose process died.

A run's process can die without a failure hook running (SIGKILL, the OOM killer, a lost
machine). Every run carries the host, pid and process start time of the process that owns it
(tasks/tracking.py ``process_tags``); a RUNNING run is stale when

- it belongs to this host and that process no longer exists (or the pid now belongs to a
  process started later: pid reuse), or
- its Prefect flow run is already in a final state (Crashed, Failed, Cancelled, Completed):
  Prefect knows the run is over, so the MLflow run is too.

Stale runs are marked FAILED with a tag saying why; a Prefect flow run still shown Running
whose process is gone from this host is set Crashed. The next preparation does this on start,
and so do ``lora-prep log`` and ``lora-prep doctor``.

Prefect flow runs are also found through Prefect itself: a run carries its process as tags
(``lora-prep.host:<host>``, ``lora-prep.pid:<pid>``, ``lora-prep.started:<start time>``, set when the
CLI creates it and again when the flow starts running), so a process killed before its MLflow run
exists (early in the download, while that run is being opened beside it) leaves nothing Running either.
"""

from __future__ import annotations

import logging
import os
import socket

from lora_prep.tasks.tracking import FLOW_RUN_TAG, HOST_TAG, PID_TAG, STARTED_TAG

log = logging.getLogger(__name__)

REASON_TAG = "lora_prep.closed_by"
_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def process_gone(pid: int, started: float | None) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return True
    if process.status() == psutil.STATUS_ZOMBIE:
        return True
    # Another process reusing the pid started later than the run's own process.
    return started is not None and abs(process.create_time() - started) > 1.0


# Prefect tag prefixes naming the process that runs a flow run (tags are the only flow-run field a
# filter can match on a value, and they are set at creation, before anything else can go wrong).
HOST_PREFIX, PID_PREFIX, STARTED_PREFIX = "lora-prep.host:", "lora-prep.pid:", "lora-prep.started:"
_ACTIVE = ("RUNNING", "PENDING")


def process_flow_run_tags() -> list[str]:
    """This process, as Prefect flow-run tags."""
    import psutil

    return [f"{HOST_PREFIX}{socket.gethostname()}", f"{PID_PREFIX}{os.getpid()}", f"{STARTED_PREFIX}{psutil.Process().create_time():.3f}"]


def _tag_value(tags: list[str], prefix: str) -> str | None:
    return next((t.removeprefix(prefix) for t in tags if t.startswith(prefix)), None)


def claim_flow_run(flow_run_id: str, tags: list[str]) -> None:
    """Add this process's tags to a flow run that lacks them (one started from Python, not by the CLI)."""
    mine = process_flow_run_tags()
    if set(mine) <= set(tags):
        return
    try:
        from prefect import get_client

        with get_client(sync_client=True) as prefect:
            prefect.update_flow_run(flow_run_id, tags=[t for t in tags if not t.startswith((HOST_PREFIX, PID_PREFIX, STARTED_PREFIX))] + mine)
    except Exception as exc:  # best effort: the MLflow run's own process tags still find it
        log.warning("could not tag Prefect flow run %s with its process: %s", flow_run_id, exc)


def reap_dead_flow_runs() -> list[str]:
    """Set Crashed the Running/Pending flow runs of this host whose process is gone; returns their ids."""
    try:
        from prefect import get_client
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
        from prefect.client.schemas.objects import StateType
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            return []
        host = socket.gethostname()
        flt = FlowRunFilter(tags=FlowRunFilterTags(all_=[f"{HOST_PREFIX}{host}"]),
                            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in _ACTIVE])))
        with get_client(sync_client=True) as prefect:
            runs = prefect.read_flow_runs(flow_run_filter=flt, limit=200)
    except Exception as exc:  # no API, unreachable: nothing to do from here
        log.info("could not look for flow runs of dead processes: %s", exc)
        return []
    crashed = []
    for run in runs:
        pid, started = _tag_value(run.tags, PID_PREFIX), _tag_value(run.tags, STARTED_PREFIX)
        if not (pid and pid.isdigit()) or not process_gone(int(pid), float(started) if started else None):
            continue
        why = f"its process {pid} on {host} is gone (killed or crashed)"
        _crash_flow_run(str(run.id), f"lora-prep: {why}")
        crashed.append(str(run.id))
        log.warning("Prefect flow run %s was left %s and is now Crashed: %s", run.id, run.state.type.value if run.state else "?", why)
    return crashed


def _flow_run_state(flow_run_id: str) -> str | None:
    """The Prefect flow run's state type, or None when there is no reachable Prefect API (or no such run)."""
    try:
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL

        if not PREFECT_API_URL.value():
            return None
        with get_client(sync_client=True) as prefect:
            run = prefect.read_flow_run(flow_run_id)
        return run.state.type.value if run.state else None
    except Exception:  # no API, not found, unreachable: Prefect cannot tell; the process check still applies
        return None


def _crash_flow_run(flow_run_id: str, why: str) -> None:
    try:
        from prefect import get_client
        from prefect.settings import PREFECT_API_URL
        from prefect.states import Crashed

        if not PREFECT_API_URL.value():
            return
        with get_client(sync_client=True) as prefect:
            prefect.set_flow_run_state(flow_run_id, Crashed(message=why), force=True)
    except Exception as exc:  # best effort: the MLflow side is what this module guarantees
        log.warning("could not mark Prefect flow run %s Crashed: %s", flow_run_id, exc)


def reap_stale_runs(mlflow, experiment_ids: list[str], *, ask_prefect: bool = True) -> list[str]:
    """Mark stale RUNNING runs of these experiments FAILED; returns their run ids."""
    from mlflow.exceptions import MlflowException

    host = socket.gethostname()
    closed = []
    runs = mlflow.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=500)
    for run in runs:
        tags = run.data.tags
        flow_run_id = tags.get(FLOW_RUN_TAG)
        why = None
        if tags.get(HOST_TAG) == host and tags.get(PID_TAG, "").isdigit():
            started = float(tags[STARTED_TAG]) if tags.get(STARTED_TAG) else None
            if process_gone(int(tags[PID_TAG]), started):
                why = f"its process {tags[PID_TAG]} on {host} is gone (killed or crashed)"
                if flow_run_id and ask_prefect and _flow_run_state(flow_run_id) in ("RUNNING", "PENDING"):
                    _crash_flow_run(flow_run_id, f"lora-prep: {why}")
        if why is None and flow_run_id and ask_prefect:
            state = _flow_run_state(flow_run_id)
            if state in _FINAL:
                why = f"its Prefect flow run {flow_run_id} ended {state}"
        if why is None:
            continue
        try:
            # The search is seconds old: the run may have ended since (FINISHED by its own flow, then
            # COMPLETED in Prefect), or another process's reaper may be closing it right now.
            if mlflow.get_run(run.info.run_id).info.status != "RUNNING":
                continue
            mlflow.set_tag(run.info.run_id, REASON_TAG, why)
            mlflow.set_terminated(run.info.run_id, "FAILED")
        except MlflowException as exc:  # PostgreSQL: a concurrent reaper wrote the same new tag first
            log.info("MLflow run %s not closed here: %s", run.info.run_id, exc)
            continue
        closed.append(run.info.run_id)
        log.warning("MLflow run %s was left RUNNING and is now FAILED: %s", run.info.run_id, why)
    return closed

"""Nothing is left RUNNING: close the MLflow runs and Prefect flow runs of preparations whose process died.

A run's process can die without a failure hook running (SIGKILL, the OOM killer, a lost machine).
Every MLflow run and every Prefect flow run names the process that owns it (host, pid, start time:
``runs.process_tags``, ``process_flow_run_tags``). A RUNNING MLflow run is stale when

- its process, on this host, no longer exists (or the pid now belongs to a process started later), or
- its Prefect flow run is already in a final state (Prefect knows the run is over, so it is).

Stale runs are marked FAILED with a tag saying why. A Prefect flow run of this host still Running or
Pending whose process is gone is set Crashed: found through Prefect itself (its tags), so a process
killed before its MLflow run existed (early in the download, while that run is being opened beside
it) leaves nothing Running either. The next preparation does this on start, and so does
``lora-prep doctor``.
"""

from __future__ import annotations

import logging
from typing import Any

from lora_prep.tasks.common.process import ProcessId
from lora_prep.tasks.tracking.runs import FLOW_RUN_TAG, end_failed, owner, running_runs

log = logging.getLogger(__name__)

_FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
_ACTIVE = ("RUNNING", "PENDING")
# Prefect flow-run tags naming the process that runs it: tags are set at creation, before anything can
# go wrong, and are the one flow-run field a filter matches on a value.
HOST_PREFIX, PID_PREFIX, STARTED_PREFIX = "lora-prep.host:", "lora-prep.pid:", "lora-prep.started:"
_PREFIXES = (HOST_PREFIX, PID_PREFIX, STARTED_PREFIX)


# --- Prefect flow runs -------------------------------------------------------------------------------


def process_flow_run_tags(process: ProcessId | None = None) -> list[str]:
    """This process (or ``process``), as Prefect flow-run tags."""
    me = process or ProcessId.current()
    return [f"{HOST_PREFIX}{me.host}", f"{PID_PREFIX}{me.pid}", f"{STARTED_PREFIX}{me.started or 0:.3f}"]


def is_process_tag(tag: str) -> bool:
    return tag.startswith(_PREFIXES)


def flow_run_owner(tags: list[str]) -> ProcessId | None:
    found = {prefix: next((t.removeprefix(prefix) for t in tags if t.startswith(prefix)), None) for prefix in _PREFIXES}
    host, pid = found[HOST_PREFIX], found[PID_PREFIX]
    if not host or not (pid and pid.isdigit()):
        return None
    started = found[STARTED_PREFIX]
    return ProcessId(host, int(pid), float(started) if started else None)


def _prefect_client() -> Any | None:
    """A sync Prefect client when a Prefect API is configured (None otherwise: nothing to ask)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL

    return get_client(sync_client=True) if PREFECT_API_URL.value() else None


def claim_flow_run(flow_run_id: str, tags: list[str]) -> None:
    """Tag a flow run with this process (one started from Python has no tags from the CLI)."""
    mine = process_flow_run_tags()
    if set(mine) <= set(tags):
        return
    try:
        prefect = _prefect_client()
        if prefect is not None:
            with prefect:
                prefect.update_flow_run(flow_run_id, tags=[t for t in tags if not is_process_tag(t)] + mine)
    except Exception as exc:  # best effort: the MLflow run's own process tags still find it
        log.warning("could not tag Prefect flow run %s with its process: %s", flow_run_id, exc)


def reap_dead_flow_runs() -> list[str]:
    """Set Crashed the Running/Pending flow runs of this host whose process is gone; returns their ids."""
    try:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType, FlowRunFilterTags
        from prefect.client.schemas.objects import StateType

        prefect = _prefect_client()
        if prefect is None:
            return []
        mine = ProcessId.current()
        only = FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"{HOST_PREFIX}{mine.host}"]),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType(s) for s in _ACTIVE])),
        )
        with prefect:
            runs = prefect.read_flow_runs(flow_run_filter=only, limit=200)
    except Exception as exc:  # no API, unreachable: nothing to do from here
        log.info("could not look for flow runs of dead processes: %s", exc)
        return []
    crashed = []
    for run in runs:
        process = flow_run_owner(list(run.tags or []))
        if process is None or not process.is_gone():
            continue
        why = f"its process {process.pid} on {process.host} is gone (killed or crashed)"
        _crash_flow_run(str(run.id), f"lora-prep: {why}")
        crashed.append(str(run.id))
        log.warning("Prefect flow run %s was left %s and is now Crashed: %s", run.id, run.state.type.value if run.state else "?", why)
    return crashed


def _flow_run_state(flow_run_id: str) -> str | None:
    """The Prefect flow run's state type, or None when there is no reachable Prefect API (or no such run)."""
    try:
        prefect = _prefect_client()
        if prefect is None:
            return None
        with prefect:
            run = prefect.read_flow_run(flow_run_id)
        return run.state.type.value if run.state else None
    except Exception:  # no API, not found, unreachable: Prefect cannot tell; the process check still applies
        return None


def _crash_flow_run(flow_run_id: str, why: str) -> None:
    try:
        from prefect.states import Crashed

        prefect = _prefect_client()
        if prefect is not None:
            with prefect:
                prefect.set_flow_run_state(flow_run_id, Crashed(message=why), force=True)
    except Exception as exc:  # best effort: the MLflow side is what this module guarantees
        log.warning("could not mark Prefect flow run %s Crashed: %s", flow_run_id, exc)


# --- MLflow runs ---------------------------------------------------------------------------------------


def reap_stale_runs(mlflow: Any, experiment_ids: list[str], *, ask_prefect: bool = True) -> list[str]:
    """Mark stale RUNNING runs of these experiments FAILED; returns their run ids."""
    from mlflow.exceptions import MlflowException

    closed = []
    for run in running_runs(mlflow, experiment_ids):
        tags = run.data.tags
        flow_run_id = tags.get(FLOW_RUN_TAG)
        process = owner(tags)
        why = None
        if process is not None and process.is_gone():
            why = f"its process {process.pid} on {process.host} is gone (killed or crashed)"
            if flow_run_id and ask_prefect and _flow_run_state(flow_run_id) in _ACTIVE:
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
            end_failed(mlflow, run.info.run_id, why, by_another_process=True)
        except MlflowException as exc:  # PostgreSQL: a concurrent reaper wrote the same new tag first
            log.info("MLflow run %s not closed here: %s", run.info.run_id, exc)
            continue
        closed.append(run.info.run_id)
        log.warning("MLflow run %s was left RUNNING and is now FAILED: %s", run.info.run_id, why)
    return closed

"""Fleet automations that prefect.yaml cannot hold: detect flow runs whose process died.

A worker's flow run can die with its node (OOM killer, a lost VM, SIGKILL of the whole process tree);
nothing then reports it, and Prefect 3.9 leaves it Running. Every flow run emits a
``prefect.flow-run.heartbeat`` event every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (default 180,
at least 30; set it in the workers' environment); this proactive automation marks a run Crashed when
its heartbeats stop for ``within`` seconds without a final state. Then its tag-concurrency slot
(``gpu``) is freed when its lease expires (60 s, repossessed every 15 s), and lora-prep's reaper marks
its MLflow run FAILED at the next preparation.

Measured on the fleet test (tests/test_fleet.py, 2 cores, heartbeat 30 s, within 60 s): Crashed about
62 s after the last heartbeat, slot released about 60 s after the kill. ``within`` must exceed the
longest heartbeat gap under load (34 s seen with 8 runs on 2 cores) and any Prefect server outage
with runs in flight, or healthy runs are crashed.

    python -m lora_prep.deployments.automations --within 90     # against PREFECT_API_URL
"""

from __future__ import annotations

import argparse
from datetime import timedelta
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from prefect.automations import Automation

NAME = "crash-zombie-flow-runs"


def crash_zombie_flow_runs(within_seconds: int = 90) -> Automation:
    """Create the automation (or return the one of that name already there)."""
    from prefect import get_client
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture

    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(name=NAME)
    if found:
        return Automation(**found[0].model_dump())
    automation = Automation(
        name=NAME,
        description="Mark a flow run Crashed when its heartbeats stop (its process died with its node).",
        trigger=EventTrigger(
            match={"prefect.resource.id": "prefect.flow-run.*"},
            after={"prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=within_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                name=None,
                state=StateType.CRASHED,
                message=f"No heartbeat for {within_seconds} s: flow run process presumed dead.",
                force=False,
            )
        ],
    )
    # Called outside an event loop, Prefect's async_dispatch runs the sync create: an Automation, not a coroutine.
    return cast("Automation", automation.create())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--within", type=int, default=90, help="seconds without a heartbeat before a run is Crashed (default 90)")
    automation = crash_zombie_flow_runs(parser.parse_args().within)
    print(f"automation {automation.name} ({automation.id})")

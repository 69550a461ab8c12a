"""Serve the deployments of `deployments/prefect.yaml` from one process, without a work pool.

`lora-prep serve` calls `serve_all()`: the same deployments (names, parameters,
schedules, triggers, concurrency limits) as `prefect deploy` creates, read from
the same file, so the two ways cannot drift apart. Work pool settings are
ignored: the serving process runs each flow run itself, as a subprocess, with
its own environment. It needs a Prefect API that outlives it (PREFECT_API_URL,
e.g. `prefect server start`): schedules and triggers are evaluated there.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

PREFECT_YAML = Path(__file__).with_name("prefect.yaml")


def load_spec(path: Path = PREFECT_YAML) -> dict[str, Any]:
    """prefect.yaml as `prefect deploy` reads it: plain YAML (anchors and merge keys resolved)."""
    with open(path) as f:
        return yaml.safe_load(f)


def load_flow(entrypoint: str) -> Any:
    """`lora_prep.flows.prepare_model:prepare_model` -> the flow object (a module path of the installed package)."""
    module, _, name = entrypoint.partition(":")
    return getattr(importlib.import_module(module), name)


def _schedules(entries: list[dict] | None) -> list:
    from prefect.schedules import Cron, Interval, RRule

    out = []
    for entry in entries or []:
        common = {"timezone": entry.get("timezone"), "active": entry.get("active", True), "parameters": entry.get("parameters") or {}}
        if "cron" in entry:
            out.append(Cron(entry["cron"], day_or=entry.get("day_or", True), **common))
        elif "interval" in entry:
            out.append(Interval(entry["interval"], anchor_date=entry.get("anchor_date"), **common))
        else:
            out.append(RRule(entry["rrule"], **common))
    return out


def _concurrency(value: int | dict[str, Any] | None) -> int | ConcurrencyLimitConfig | None:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    if value is None or isinstance(value, int):
        return value
    return ConcurrencyLimitConfig(**value)


def _triggers(entries: list[dict] | None) -> list:
    # The same validation `prefect deploy` applies to a `triggers:` entry.
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    adapter = TypeAdapter(DeploymentTriggerTypes)
    return [adapter.validate_python(dict(entry)) for entry in entries or []]


def runner_deployments(spec: dict[str, Any] | None = None) -> list:
    """One RunnerDeployment per entry of prefect.yaml, without work pool (served by this process)."""
    from prefect.deployments.runner import EntrypointType

    spec = spec or load_spec()
    out = []
    for entry in spec.get("deployments") or []:
        flow = load_flow(entry["entrypoint"])
        out.append(
            flow.to_deployment(
                name=entry["name"],
                description=entry.get("description"),
                tags=entry.get("tags"),
                parameters=entry.get("parameters") or {},
                schedules=_schedules(entry.get("schedules")),
                triggers=_triggers(entry.get("triggers")),
                concurrency_limit=_concurrency(entry.get("concurrency_limit")),
                enforce_parameter_schema=entry.get("enforce_parameter_schema", True),
                entrypoint_type=EntrypointType.MODULE_PATH,  # as prefect.yaml: an installed wheel is enough
            )
        )
    return out


def serve_all(limit: int | None = None) -> None:
    """Serve every deployment until interrupted. `limit`: at most this many flow runs at once (None: no limit)."""
    from prefect import serve

    serve(*runner_deployments(), limit=limit)


if __name__ == "__main__":
    serve_all()

"""What the flows need around their stages: timings, library logs, the flow run as tags and record, Prefect artifacts."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Iterator

# Loggers whose records belong in the Prefect run logs: the libraries at their own level
# (warnings by default: transformers' INFO dumps whole configs) and ours at INFO.
LIBRARY_LOGGERS = ("transformers", "peft", "huggingface_hub", "mlflow", "accelerate")
OUR_LOGGERS = ("lora_prep",)


class StageClock:
    """Wall seconds per stage, in the order the stages ran."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(time.perf_counter() - started, 3)

    def metrics(self, built, snapshot) -> dict[str, float]:
        metrics = {f"seconds.{stage}": value for stage, value in self.seconds.items()}
        metrics["bytes_downloaded"] = float(snapshot.bytes_transferred)
        metrics["peak_rss_bytes"] = float(built.peak_rss_bytes)
        metrics["adapter_bytes_estimated"] = float(built.adapter_bytes)
        return metrics


@contextlib.contextmanager
def library_logs_to_prefect(level: int = logging.INFO) -> Iterator[None]:
    """Send library logs to the Prefect run logs for the flow's duration (the handler is removed after)."""
    from prefect.logging.handlers import APILogHandler

    handler = APILogHandler()
    changed = []
    for name in LIBRARY_LOGGERS + OUR_LOGGERS:
        logger = logging.getLogger(name)
        changed.append((logger, logger.level))
        if name in OUR_LOGGERS and logger.getEffectiveLevel() > level:
            logger.setLevel(level)
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger, old_level in changed:
            logger.removeHandler(handler)
            logger.setLevel(old_level)


def _summary_markdown(result, plan) -> str:
    from lora_prep.tasks.tracking.runs import where_to_open

    reasons = "\n".join(f"| {k} | {v} |" for k, v in plan.load.reasons.items())
    seconds = ", ".join(f"{k} {v:.2f} s" for k, v in result.seconds.items())
    targets = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in result.target_modules}))
    experts = ", ".join(sorted({p.rsplit(".", 1)[-1] for p in result.target_parameters}))
    excluded = "\n".join(f"| `{k}` | {v} |" for k, v in plan.targets.excluded.items()) or "| (none) | |"
    pinned = f"`{result.commit_sha}`" if result.commit_sha else f"content digest `{result.content_digest}`"
    return f"""# Prepared {result.repo_id}

| | |
|---|---|
| revision | `{result.revision}` |
| pinned to | {pinned} |
| artifact | `{result.artifact_dir}` |
| parameters | {result.total_params:,} total, {result.trainable_params:,} trainable |
| LoRA modules | {targets} ({len(result.target_modules)} modules) |
| LoRA expert parameters | {experts or "none"} ({len(result.target_parameters)}) |
| LoRA dropout | {plan.targets.dropout_reason} |
| downloaded | {result.bytes_downloaded:,} bytes (from cache: {result.from_cache}, offline: {result.offline}) |
| MLflow run | `{result.mlflow_run_id}`: {where_to_open(result.mlflow_tracking_uri, result.mlflow_run_url)} |
| model URI | {result.model_uri or "not registered"} |
| timings | {seconds} |

## Load plan

| decision | reason |
|---|---|
{reasons}

## Left out of the LoRA presets

| module | why |
|---|---|
{excluded}
"""


def publish_run_artifacts(result, plan) -> None:
    """A markdown summary and, for a tracking server, a link to the MLflow run, on the flow run's Artifacts tab."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    # Artifact keys: lowercase letters, digits and dashes only.
    create_markdown_artifact(key="prepare-summary", markdown=_summary_markdown(result, plan),
                             description=f"{result.repo_id}@{(result.commit_sha or result.content_digest)[:12]}")
    if result.mlflow_run_url:  # only where a server answers at that URL (tasks/tracking/runs.py run_url)
        create_link_artifact(key="mlflow-run", link=result.mlflow_run_url, link_text=f"MLflow run {result.mlflow_run_id}")


def prefect_tags() -> dict[str, str]:
    """The current flow run, as MLflow tags (the run is found again by prefect.flow_run_id)."""
    from prefect.runtime import deployment, flow_run

    tags = {
        "prefect.flow_run_id": str(flow_run.id),
        "prefect.flow_run_name": str(flow_run.name),
        "prefect.flow_name": str(flow_run.flow_name),
    }
    if flow_run.ui_url:
        tags["prefect.flow_run_url"] = flow_run.ui_url
    if deployment.id:
        tags["prefect.deployment_id"] = str(deployment.id)
        tags["prefect.deployment_name"] = str(deployment.name)
    return tags


def prefect_record():
    """The current flow run, for the manifest."""
    from prefect.runtime import deployment, flow_run

    from lora_prep.tasks.records.manifest import PrefectRecord

    return PrefectRecord(flow_run_id=str(flow_run.id), flow_run_name=str(flow_run.name),
                         deployment_name=str(deployment.name) if deployment.id else None)

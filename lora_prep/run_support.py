"""What the flows need around their stages: timings, library logs, the flow run as tags and record, Prefect artifacts."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from lora_prep.tasks.records.manifest import PrefectRecord
from lora_prep.tasks.records.plan import Plan
from lora_prep.tasks.records.results import PreparedModel

if TYPE_CHECKING:
    from lora_prep.tasks.records.build import BuiltArtifact
    from lora_prep.tasks.records.hub import Snapshot

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

    def metrics(self, built: BuiltArtifact, snapshot: Snapshot) -> dict[str, float]:
        metrics = {f"seconds.{stage}": value for stage, value in self.seconds.items()}
        metrics["bytes_downloaded"] = float(snapshot.bytes_transferred)
        metrics["peak_rss_bytes"] = float(built.peak_rss_bytes)
        metrics["adapter_bytes_estimated"] = float(built.adapter_bytes)
        return metrics


@contextlib.contextmanager
def process_tags_on_the_flow_run_only() -> Iterator[None]:
    """The flow body's task runs leave out the tags that name this process (host, pid, start time).

    The CLI creates the flow run under them so that a kill at any moment leaves a run the next one
    can tell is dead; task runs would inherit them from Prefect's tag context. A task run with tags
    asks the API for a concurrency slot per tag before it starts and gives it back after (two calls
    each, ~50 ms per task on an idle server here, seconds in all on a busy 2-core machine), and no
    limit can exist on a tag unique to one process. Every other tag (a caller's own, a task's own,
    such as build's ``gpu``) stays, so tag concurrency limits still apply.
    """
    from prefect.context import TagsContext

    from lora_prep.tasks.tracking.reaper import is_process_tag

    current = TagsContext.get().current_tags
    with TagsContext(current_tags={t for t in current if not is_process_tag(t)}):
        yield


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


def _summary_markdown(result: PreparedModel, plan: Plan) -> str:
    from lora_prep.tasks.artifact.summary import as_markdown, preparation_rows, reason_rows
    from lora_prep.tasks.records.manifest import Manifest

    rows = preparation_rows(result, Manifest.read(result.artifact_dir), result.mlflow_open)
    return f"# Prepared {result.repo_id}\n\n{as_markdown(rows)}\n## Load plan\n\n{as_markdown(reason_rows(plan.load))}"


def publish_run_artifacts(result: PreparedModel, plan: Plan) -> None:
    """A markdown summary and, for a tracking server, a link to the MLflow run, on the flow run's Artifacts tab."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact

    # Artifact keys: lowercase letters, digits and dashes only.
    create_markdown_artifact(
        key="prepare-summary",
        markdown=_summary_markdown(result, plan),
        description=f"{result.repo_id}@{(result.commit_sha or result.content_digest)[:12]}",
    )
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


def prefect_record() -> PrefectRecord:
    """The current flow run, for the manifest."""
    from prefect.runtime import deployment, flow_run

    return PrefectRecord(
        flow_run_id=str(flow_run.id), flow_run_name=str(flow_run.name), deployment_name=str(deployment.name) if deployment.id else None
    )

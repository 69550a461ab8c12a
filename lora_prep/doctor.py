"""`lora-prep doctor`: close what crashed runs left behind on this machine.

- MLflow runs left RUNNING by a process that died, or whose Prefect flow run already ended: FAILED;
- Prefect flow runs of this host left Running or Pending by a process that died: Crashed;
- ``.<name>.partial-*`` artifact directories of dead processes: removed;
- ``*.incomplete`` files that killed downloads left in the HF cache: removed.
Each preparation does the same for its own store, output directory and repo when it starts.
"""

from __future__ import annotations

from pathlib import Path

from lora_prep.tasks.settings import OutputSettings, TrackingSettings


def doctor(tracking: TrackingSettings, output: OutputSettings) -> dict[str, object]:
    from lora_prep.tasks.artifact.write import artifact_parent, clean_stale_partials
    from lora_prep.tasks.hub.cache import clean_orphaned_downloads
    from lora_prep.tasks.hub.env import cache_dir_for
    from lora_prep.tasks.tracking.reaper import reap_dead_flow_runs, reap_stale_runs
    from lora_prep.tasks.tracking.store import (
        client,
        mlflow_errors,
        resolve_tracking_uri,
    )

    uri = resolve_tracking_uri(tracking)
    closed: list[str] = []
    crashed = reap_dead_flow_runs()
    with mlflow_errors(uri):
        mlflow = client(uri)
        found = mlflow.get_experiment_by_name(tracking.experiment)
        if found is not None:
            closed = reap_stale_runs(mlflow, [found.experiment_id])
    parent = artifact_parent(output)
    partials = clean_stale_partials(parent)
    cache = Path(cache_dir_for())
    incomplete = []
    for repo in sorted(cache.glob("models--*")):
        repo_id = repo.name.removeprefix("models--").replace("--", "/", 1)
        incomplete += clean_orphaned_downloads(str(cache), repo_id)
    return {
        "tracking_uri": uri,
        "runs_closed": closed,
        "flow_runs_crashed": crashed,
        "partial_artifacts_removed": partials,
        "incomplete_downloads_removed": incomplete,
    }

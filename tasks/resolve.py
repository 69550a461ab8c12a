"""Stage 1, resolve: a model (Hub id + revision, or a local directory) -> RepoFacts, before any weight moves.

The work is ``lora_prep.tasks.hub.repo.resolve_repo``; this stage looks up the token (never a recorded
task parameter), retries transient Hub errors, and lets the last attempt fall back to a complete cached
snapshot when the Hub stays unreachable.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from lora_prep.tasks.common.retry import NETWORK
from lora_prep.tasks.hub.env import get_token
from lora_prep.tasks.hub.facts import is_local_source
from lora_prep.tasks.hub.repo import resolve_local_dir, resolve_repo
from lora_prep.tasks.records.hub import RepoFacts
from lora_prep.tasks.settings import SourceSettings


def _last_attempt() -> bool:
    """True on the task run's last attempt (or outside Prefect): only then may resolve go offline."""
    from prefect.context import TaskRunContext

    ctx = TaskRunContext.get()
    if ctx is None or ctx.task_run is None:
        return True
    return ctx.task_run.run_count > (ctx.task.retries or 0)


def resolve_model(model_id: str, revision: str = "main", source: SourceSettings = SourceSettings()) -> RepoFacts:
    """resolve_repo with the token looked up here; the Hub may be replaced by the cache on the last attempt only."""
    if is_local_source(model_id):
        return resolve_local_dir(model_id, revision, source)
    return resolve_repo(model_id, revision, source, get_token(source), cache_fallback=_last_attempt())


resolve = task(
    name="resolve",
    cache_policy=NO_CACHE,  # a branch can move: always ask the Hub
    timeout_seconds=600,  # metadata and ~100 KB header reads per weight file
    **NETWORK.task_options(),
)(resolve_model)

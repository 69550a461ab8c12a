"""Stage 1, resolve: a model (Hub id + revision, or a local directory) -> RepoFacts, before any weight moves.

The work is ``lora_prep.tasks.hub.repo.resolve_model`` (Prefect-free, for the dry run too); it looks up the token (never a recorded
task parameter), retries transient Hub errors, and lets the last attempt fall back to a complete cached
snapshot when the Hub stays unreachable. This module makes it a task with retries.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from lora_prep.tasks.common.retry import NETWORK
from lora_prep.tasks.hub.repo import resolve_model

__all__ = ["resolve", "resolve_model"]


resolve = task(
    name="resolve",
    cache_policy=NO_CACHE,  # a branch can move: always ask the Hub
    timeout_seconds=600,  # metadata and ~100 KB header reads per weight file
    **NETWORK.task_options(),
)(resolve_model)

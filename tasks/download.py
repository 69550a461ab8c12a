"""Stage 4, download: the selected files at the commit sha into the HF cache, verified once per blob.

The work is ``lora_prep.tasks.hub.snapshot.download_snapshot``; this stage looks up the token, retries
transient Hub errors, and caches its small ``Snapshot`` record on what is on disk (``SnapshotOnDisk``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.utilities.hashing import hash_objects

from lora_prep.tasks.common.retry import NETWORK
from lora_prep.tasks.hub.env import cache_dir_for, get_token, is_offline
from lora_prep.tasks.hub.snapshot import download_snapshot, snapshot_state
from lora_prep.tasks.records.hub import RepoFacts, Snapshot
from lora_prep.tasks.settings import SourceSettings

# Bumped when the cache key's meaning changes, so old Prefect cache records stop matching.
CACHE_KEY_VERSION = "download@2"


@dataclass
class SnapshotOnDisk(CachePolicy):
    """Cache key for ``download``: repo, commit sha, file selection, cache dir, offline, and the
    identity (size, mtime, inode) of every selected file's blob on disk.

    None (no lookup, no record) while any selected file is missing: a deleted file means the
    task runs and downloads what is missing, never a replay of a dead path. Prefect computes
    the key before the task runs, so a cold run stores no record (a record under an
    "incomplete" key would later replay a dead path); the next run, on the complete snapshot,
    stores it and later runs are cache hits. A blob rewritten in place changes its identity,
    so the key changes and the task verifies it again. Local directories are never cached
    here (their markers already make a warm run cheap).
    """

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs: Any) -> str | None:
        facts = RepoFacts.model_validate(inputs["facts"])
        if facts.is_local:
            return None
        source = SourceSettings.model_validate(inputs.get("source") or {})
        cache_dir = cache_dir_for(source)
        state = snapshot_state(facts, cache_dir)
        if state is None:
            return None
        offline = facts.offline or is_offline(source)
        return hash_objects(CACHE_KEY_VERSION, facts.repo_id, facts.commit_sha, sorted(facts.selected), cache_dir, offline, state)


@task(
    name="download",
    cache_policy=SnapshotOnDisk(),
    persist_result=True,  # the small Snapshot record only, never file contents
    timeout_seconds=12 * 3600,  # a 140 GB model at 30 MB/s takes 1.3 h; a stuck transfer still ends
    **NETWORK.task_options(),
)
def download(facts: RepoFacts, source: SourceSettings = SourceSettings()) -> Snapshot:
    """download_snapshot with the token looked up here, so it is never a recorded task parameter."""
    return download_snapshot(facts, source, get_token(source))

"""Stage 5: load the base model, wrap it with LoRA, save the artifact, in one task.

The model and tokenizer live only inside this task: nothing Prefect hashes,
caches or persists ever holds them (PITFALLS: a model passed between tasks is
pickled to compute cache keys). The task returns a small record.
"""

from __future__ import annotations

import logging
import resource
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict
from prefect import task
from prefect.cache_policies import NO_CACHE

from lora_prep.tasks.artifact import artifact_name, package_versions, model_card, utc_now, write_artifact
from lora_prep.tasks.download import Snapshot
from lora_prep.tasks.hardware import HardwareProfile
from lora_prep.tasks.hub import RepoFacts
from lora_prep.tasks.paths import default_artifacts_dir
from lora_prep.tasks.plan import LoadPlan
from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings

log = logging.getLogger(__name__)


class BuiltArtifact(BaseModel):
    model_config = ConfigDict(frozen=True)

    artifact_dir: str
    total_params: int
    trainable_params: int
    target_modules: list[str]
    adapter_bytes: int
    load_report: dict
    peak_rss_bytes: int
    seconds: float


def peak_rss_bytes() -> int:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def build_adapter_ready(
    snapshot: Snapshot,
    facts: RepoFacts,
    profile: HardwareProfile,
    plan: LoadPlan,
    load: LoadSettings,
    lora: LoraSettings,
    output: OutputSettings,
    tracking_info: dict,
    allow_pickle: bool = False,
) -> BuiltArtifact:
    from lora_prep.tasks.load import load_model
    from lora_prep.tasks.lora import wrap_lora

    started = time.perf_counter()
    loaded = load_model(snapshot.snapshot_dir, plan, load, allow_pickle=allow_pickle)
    peft_model, report = wrap_lora(loaded.model, lora)

    def fill(tmp: Path) -> dict:
        peft_model.save_pretrained(str(tmp / "adapter"), safe_serialization=True)
        loaded.tokenizer.save_pretrained(str(tmp / "tokenizer"))
        return {
            "created_at": utc_now(),
            "base_model": {
                "repo_id": snapshot.repo_id,
                # facts, not snapshot: a download-cache hit replays the record of another
                # revision name (branch, tag, sha) of the same commit.
                "revision": facts.revision,
                "commit_sha": snapshot.commit_sha,
                "files": [f.model_dump() for f in snapshot.files],
                "offline": snapshot.offline,
                "architecture": (facts.config.get("architectures") or [None])[0],
                "model_type": facts.config.get("model_type"),
            },
            "hardware": profile.model_dump(mode="json"),
            "load_settings": load.model_dump(mode="json"),
            "load_plan": {**plan.model_dump(mode="json"), "used": loaded.report.model_dump(mode="json")},
            "lora": {**lora.model_dump(mode="json"), "target_modules_requested": lora.target_modules, "target_modules": report.target_modules},
            "parameters": {"total": report.total_params, "trainable": report.trainable_params},
            "adapter": {"estimated_bytes": report.adapter_bytes, "warnings": report.warnings},
            "versions": package_versions(),
            "tracking": tracking_info,
        }

    parent = Path(output.output_dir).expanduser() if output.output_dir else default_artifacts_dir()
    name = output.name or artifact_name(snapshot.repo_id, snapshot.commit_sha)
    artifact_dir = write_artifact(parent, name, fill, model_card)
    log.info("artifact written to %s", artifact_dir)
    return BuiltArtifact(
        artifact_dir=str(artifact_dir),
        total_params=report.total_params,
        trainable_params=report.trainable_params,
        target_modules=report.target_modules,
        adapter_bytes=report.adapter_bytes,
        load_report=loaded.report.model_dump(mode="json"),
        peak_rss_bytes=peak_rss_bytes(),
        seconds=time.perf_counter() - started,
    )


# tag "gpu": a Prefect tag concurrency limit (`prefect concurrency-limit create gpu 1`)
# caps how many loads share a machine. No retries: a load that failed once
# (out of memory, bad weights) fails the same way again.
build = task(
    name="build-artifact",
    tags=["gpu"],
    cache_policy=NO_CACHE,
    timeout_seconds=6 * 3600,
)(build_adapter_ready)

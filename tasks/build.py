"""Stage 5, build: load the base model, wrap it with LoRA, check it runs, save the artifact, in one task.

The model and tokenizer live only inside this task: nothing Prefect hashes, caches or
persists ever holds them (a model passed between tasks is pickled to compute cache
keys). The task returns a small record.

The adapter is portable: ``adapter_config.json`` names the Hub repo id and the commit sha (or
the local directory the user named), never the cache snapshot it was loaded from, so plain
``AutoPeftModelForCausalLM.from_pretrained(<artifact>/adapter)`` works on any machine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from lora_prep.tasks.artifact.card import model_card
from lora_prep.tasks.artifact.write import (
    artifact_name,
    file_records,
    package_versions,
    utc_now,
    write_artifact,
)
from lora_prep.tasks.common.process import peak_rss_bytes
from lora_prep.tasks.lora.wrap import save_adapter
from lora_prep.tasks.records.build import BuiltArtifact
from lora_prep.tasks.records.hub import RepoFacts, Snapshot
from lora_prep.tasks.records.machine import HardwareProfile
from lora_prep.tasks.records.manifest import (
    AdapterRecord,
    BaseModelRecord,
    LoraRecord,
    Manifest,
    Parameters,
    PrefectRecord,
)
from lora_prep.tasks.records.plan import Plan
from lora_prep.tasks.settings import LoadSettings, LoraSettings, OutputSettings

log = logging.getLogger(__name__)


def build_adapter_ready(
    snapshot: Snapshot,
    facts: RepoFacts,
    profile: HardwareProfile,
    plan: Plan,
    load: LoadSettings,
    lora: LoraSettings,
    output: OutputSettings,
    prefect: PrefectRecord = PrefectRecord(),
    allow_pickle: bool = False,
) -> BuiltArtifact:
    from lora_prep.tasks.lora.wrap import wrap_lora
    from lora_prep.tasks.machine.kbit import quiet_bitsandbytes
    from lora_prep.tasks.model.check import run_check, skipped
    from lora_prep.tasks.model.load import load_model
    from lora_prep.tasks.model.tokenizer import save_tokenizer

    started = time.perf_counter()
    with quiet_bitsandbytes():  # its speed notices (a missing optional kernel, int8 input casts) are not the user's problem
        loaded = load_model(snapshot.snapshot_dir, plan.load, load, allow_pickle=allow_pickle)
        peft_model, report = wrap_lora(loaded.model, lora, plan.targets, embeddings_resized=loaded.report.embeddings_resized)
        check = run_check(peft_model, loaded.tokenizer) if output.check else skipped()
    # What PEFT actually wrapped (a tied head also wraps its embedding), counted on the real model.
    targets = plan.targets.model_copy(
        update={
            "target_modules": report.target_modules,
            "trainable_params": report.trainable_params,
            "total_params": report.total_params,
        }
    )

    def fill(tmp: Path) -> Manifest:
        save_adapter(peft_model, tmp / "adapter", facts.repo_id, snapshot.commit_sha, save_embedding_layers=report.save_embedding_layers)
        save_tokenizer(loaded.tokenizer, tmp / "tokenizer")
        return Manifest(
            created_at=utc_now(),
            base_model=BaseModelRecord(
                source=facts.source,
                name_or_path=facts.repo_id,
                # facts, not snapshot: a download-cache hit replays the record of another
                # revision name (branch, tag, sha) of the same commit.
                revision=facts.revision,
                commit_sha=snapshot.commit_sha,
                content_digest=snapshot.content_digest,
                files=snapshot.files,
                offline=snapshot.offline,
                architecture=(facts.config.get("architectures") or [None])[0],
                model_type=facts.config.get("model_type"),
            ),
            hardware=profile.model_copy(update={"cache_dir": ""}),  # no path of this machine in the artifact
            load_settings=load,
            load_plan=plan.load,
            load_used=loaded.report,
            lora=LoraRecord(settings=lora, targets=targets),
            parameters=Parameters(total=report.total_params, trainable=report.trainable_params),
            adapter=AdapterRecord(
                estimated_bytes=report.adapter_bytes,
                save_embedding_layers=report.save_embedding_layers,
                warnings=report.warnings,
                files=file_records(tmp / "adapter"),
            ),
            check=check,
            versions=package_versions(),
            prefect=prefect,
        )

    name = output.name or artifact_name(facts.repo_id, snapshot.commit_sha or snapshot.content_digest)
    artifact_dir = write_artifact(Path(plan.artifact_parent), name, fill, model_card)
    log.info("artifact written to %s", artifact_dir)
    return BuiltArtifact(
        artifact_dir=str(artifact_dir),
        total_params=report.total_params,
        trainable_params=report.trainable_params,
        target_modules=report.target_modules,
        target_parameters=report.target_parameters,
        adapter_bytes=report.adapter_bytes,
        content_digest=snapshot.content_digest,
        check=check,
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

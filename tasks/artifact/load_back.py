"""Load an adapter-ready artifact back: the API a training pipeline calls.

    from lora_prep import load_adapter_ready
    ready = load_adapter_ready("~/.local/share/lora-prep/artifacts/<name>", trainable=True)
    model, tokenizer, manifest = ready          # unpacks like a tuple

The reference is an artifact directory, ``runs:/<run id>[/artifact]`` or
``models:/<name>@<alias>`` (or ``models:/<name>/<version>``). The base model
is fetched at the manifest's commit through the download stage (a cache hit
when present), or read from the local directory it was made from (``base=`` names
a copy elsewhere); its files must match the manifest's sha256 list, the recorded
load plan is re-applied (re-planned, and said so, when the hardware differs),
and the adapter is attached.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_prep.tasks.errors import BadRepo, IntegrityError, InvalidInput, RemoteCodeRefused
from lora_prep.tasks.records.hub import RepoFacts, Snapshot
from lora_prep.tasks.records.manifest import Manifest, read_manifest
from lora_prep.tasks.settings import SourceSettings

log = logging.getLogger(__name__)


@dataclass
class AdapterReady:
    model: Any
    tokenizer: Any
    manifest: Manifest
    artifact_dir: Path
    replanned: bool = False
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.tokenizer, self.manifest))

    def summary(self) -> dict:
        base = self.manifest.base_model
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return {
            "artifact_dir": str(self.artifact_dir),
            "base": base.name_or_path,
            "source": base.source,
            "commit_sha": base.commit_sha,
            "content_digest": base.content_digest,
            "target_modules": self.manifest.lora.targets.target_modules,
            "target_parameters": self.manifest.lora.targets.target_parameters,
            "total_params": total,
            "trainable_params": trainable,
            "dtype": str(next(self.model.parameters()).dtype).removeprefix("torch."),
            "replanned": self.replanned,
            "notes": self.notes,
        }


def _local_dir(ref: str, tracking_uri: str | None) -> Path:
    if ref.startswith(("runs:/", "models:/")):
        from lora_prep.tasks.common.paths import fetched_references_dir
        from lora_prep.tasks.tracking.registry import fetch_reference

        return fetch_reference(ref, fetched_references_dir(), tracking_uri)
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise InvalidInput(
            f"artifact {ref!r} is neither a directory nor a runs:/ or models:/ URI; pass the directory printed by 'lora-prep prepare'."
        )
    return path


def _hardware_key(profile: dict) -> tuple:
    """What decides a load plan: the accelerators, not free memory of the moment."""
    gpus = tuple((d.get("name"), str(d.get("capability")), d.get("bf16")) for d in profile.get("cuda_devices") or [])
    return (profile.get("cuda_available"), profile.get("mps_available"), gpus)


def check_base_files(manifest: Manifest, snapshot: Snapshot) -> None:
    """Refuse a base whose files differ from the ones the adapter was made on."""
    expected = {f.path: f for f in manifest.base_model.files}
    actual = {f.path: f for f in snapshot.files}
    problems = []
    for path, want in expected.items():
        got = actual.get(path)
        if got is None:
            problems.append(f"{path} missing")
        elif got.sha256 != want.sha256:
            problems.append(f"{path} sha256 {got.sha256[:12]}... != manifest {want.sha256[:12]}...")
        elif got.size != want.size:
            problems.append(f"{path} size {got.size} != manifest {want.size}")
    if problems:
        base = manifest.base_model
        pin = (base.commit_sha or base.content_digest)[:12]
        raise IntegrityError(
            f"base model {base.name_or_path}@{pin} does not match the artifact's manifest: {'; '.join(problems)}; "
            "the adapter was made on other weights: restore those files, or prepare the artifact again.",
            base=base.name_or_path,
        )


def _base_snapshot(manifest: Manifest, source: SourceSettings, base: str | Path | None) -> tuple[RepoFacts, Snapshot]:
    """(RepoFacts, Snapshot) of the base: the Hub repo at its commit, or a local directory (the one recorded, or ``base``)."""
    from lora_prep.tasks.hub.env import get_token
    from lora_prep.tasks.hub.repo import resolve_local_dir, resolve_repo
    from lora_prep.tasks.hub.snapshot import download_snapshot, local_snapshot

    record = manifest.base_model
    if base is not None or record.source == "local":
        directory = str(Path(base or record.name_or_path).expanduser())
        if not Path(directory).is_dir():
            raise InvalidInput(
                f"the base model directory {directory} does not exist here: pass base= (lora-prep load --base DIR) "
                "pointing at a copy of it."
            )
        facts = resolve_local_dir(directory, record.revision if record.source == "local" else "local", source)
        return facts, local_snapshot(facts)
    if record.commit_sha is None:  # the build stage records the commit of every Hub base
        raise BadRepo(
            f"the manifest records the Hub base {record.name_or_path} without its commit sha: the artifact is damaged; prepare it again.",
            base=record.name_or_path,
        )
    token = get_token(source)
    facts = resolve_repo(record.name_or_path, record.commit_sha, source, token=token)
    return facts, download_snapshot(facts, source, token=token)


def load_adapter_ready(
    ref: str | Path,
    *,
    trainable: bool = False,
    tracking_uri: str | None = None,
    source: SourceSettings | None = None,
    trust_remote_code: bool = False,
    base: str | Path | None = None,
) -> AdapterReady:
    """Load an artifact (directory, runs:/, models:/) as (model, tokenizer, manifest), adapter attached.

    base: a local directory holding the base model (a copy of the one the artifact was made
    from); its files must match the manifest.
    """
    from peft import PeftModel

    from lora_prep.tasks.machine.hardware import probe_hardware
    from lora_prep.tasks.model.load import load_model
    from lora_prep.tasks.model.load_plan import plan_for_repo
    from lora_prep.tasks.model.tokenizer import load_tokenizer

    artifact_dir = _local_dir(str(ref), tracking_uri)
    manifest = read_manifest(artifact_dir)
    record = manifest.base_model
    source = source or SourceSettings()
    settings = manifest.load_settings
    if settings.trust_remote_code and not trust_remote_code:
        # An artifact (possibly fetched from a shared MLflow) must not switch remote code on by itself.
        raise RemoteCodeRefused(
            f"{record.name_or_path} runs its own code: read it, then pass trust_remote_code=True (lora-prep load --trust-remote-code).",
            base=record.name_or_path,
        )
    facts, snapshot = _base_snapshot(manifest, source, base)
    check_base_files(manifest, snapshot)

    notes: list[str] = []
    profile = probe_hardware(source.cache_dir, kbit=settings.quantization != "none")
    if _hardware_key(profile.model_dump(mode="json")) == _hardware_key(manifest.hardware.model_dump(mode="json")):
        plan, replanned = manifest.load_plan, False
    else:
        plan = plan_for_repo(profile, facts, settings, record.revision if record.source == "local" else record.commit_sha)
        replanned = True
        notes.append(
            f"hardware differs from the machine that prepared the artifact: re-planned "
            f"({manifest.load_plan.dtype}/{manifest.load_plan.device_map} -> {plan.dtype}/{plan.device_map})"
        )
        log.warning(notes[-1])

    loaded = load_model(snapshot.snapshot_dir, plan, settings, allow_pickle=source.allow_pickle)
    # The tokenizer as prepared (pad token included) comes from the artifact, not the base repo.
    tokenizer, _ = load_tokenizer(str(artifact_dir / "tokenizer"), trust_remote_code=plan.trust_remote_code)
    if len(tokenizer) > loaded.model.get_input_embeddings().weight.shape[0]:
        loaded.model.resize_token_embeddings(len(tokenizer))
    model = PeftModel.from_pretrained(loaded.model, str(artifact_dir / "adapter"), is_trainable=trainable)
    if not trainable:
        model.eval()
    return AdapterReady(model=model, tokenizer=tokenizer, manifest=manifest, artifact_dir=artifact_dir, replanned=replanned, notes=notes)

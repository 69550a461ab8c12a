"""The artifact's contract with every consumer: one frozen, versioned ``Manifest`` (``manifest.json``).

Written by the build stage, extended by the training flow (``model_copy(update=...)``: a new
Manifest, never dict surgery), read by tracking, the model card and load-back. Its JSON Schema
is generated into ``docs/manifest.schema.json`` (``python -m lora_prep.tasks.records.manifest
docs/manifest.schema.json`` from the repository root) and a test keeps it current. Nothing has been
released, so there is no compatibility shim: a manifest of another schema is refused with one line
naming both. Reading one needs pydantic only (no Prefect, torch or transformers): ``Manifest.read(dir)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import ConfigDict, Field, ValidationError

from lora_prep.tasks.errors import BadRepo, InvalidInput
from lora_prep.tasks.records.base import Record
from lora_prep.tasks.records.build import CheckRecord, LoadReport
from lora_prep.tasks.records.hub import SnapshotFile
from lora_prep.tasks.records.machine import HardwareProfile
from lora_prep.tasks.records.plan import LoadPlan, TargetPlan
from lora_prep.tasks.settings import LoadSettings, LoraSettings

SCHEMA: Final = "lora-prep/manifest@2"
MANIFEST = "manifest.json"


class BaseModelRecord(Record):
    """The exact base the adapter was made on."""

    source: Literal["hub", "local"] = Field(description="hub: a Hugging Face Hub repo; local: a directory the user named.")
    name_or_path: str = Field(description="What from_pretrained is given: the Hub repo id, or the local directory.")
    revision: str = Field(description="The revision as requested (branch, tag, sha; 'local' or a code digest for a directory).")
    commit_sha: str | None = Field(description="The 40-hex commit loaded; None for a local directory.")
    content_digest: str = Field(description="sha256 over the (path, sha256) of every base file: names these exact bytes.")
    files: list[SnapshotFile] = Field(description="Every base file loaded, with its size and sha256.")
    offline: bool = Field(description="Prepared from the HF cache without the Hub.")
    architecture: str | None = None
    model_type: str | None = None

    @property
    def repo_id(self) -> str | None:
        return self.name_or_path if self.source == "hub" else None


class LoraRecord(Record):
    settings: LoraSettings = Field(description="The LoRA settings as given (dropout None: decided per model).")
    targets: TargetPlan = Field(description="What got LoRA: module names, expert parameters, exclusions and why, dropout and why.")


class Parameters(Record):
    total: int
    trainable: int


class AdapterRecord(Record):
    estimated_bytes: int
    save_embedding_layers: bool = False
    warnings: list[str] = Field(default_factory=list)
    trained: bool = False
    files: list[SnapshotFile] = Field(default_factory=list, description="adapter/ files with size and sha256.")


class PrefectRecord(Record):
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    deployment_name: str | None = None


class TrackingRecord(Record):
    mlflow_tracking_uri: str
    mlflow_experiment: str
    mlflow_run_id: str
    mlflow_run_url: str | None = None
    logged_model_id: str | None = None


class ParentRecord(Record):
    artifact: str = Field(description="The artifact trained from (directory or runs:/ URI).")
    mlflow_run_id: str


class TrainingRecord(Record):
    steps: int
    lr: float
    settings: dict[str, Any]
    corpus_sentences: int
    losses: list[float]
    final_loss: float
    eval_loss_before: float
    eval_loss_after: float
    base_sha256_before: str | None
    base_sha256_after: str | None


class Manifest(Record):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_id: Literal["lora-prep/manifest@2"] = Field(default=SCHEMA, alias="schema")
    created_at: str
    base_model: BaseModelRecord
    hardware: HardwareProfile
    load_settings: LoadSettings
    load_plan: LoadPlan
    load_used: LoadReport
    lora: LoraRecord
    parameters: Parameters
    adapter: AdapterRecord
    check: CheckRecord
    versions: dict[str, str | None]
    prefect: PrefectRecord = Field(default_factory=PrefectRecord)
    tracking: TrackingRecord | None = None
    parent: ParentRecord | None = None
    training: TrainingRecord | None = None

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2) + "\n"

    @classmethod
    def read(cls, artifact_dir: str | Path) -> Manifest:
        """The manifest of an artifact directory (see ``read_manifest``)."""
        return read_manifest(artifact_dir)

    def write(self, artifact_dir: str | Path) -> Path:
        """Write (or replace) ``manifest.json`` atomically: a reader sees the old manifest or this one."""
        from lora_prep.tasks.common.files import write_atomic

        return write_atomic(Path(artifact_dir) / MANIFEST, self.to_json())


def read_manifest(artifact_dir: str | Path) -> Manifest:
    """The artifact's manifest; another schema, or a file that is not one, is refused in one line."""
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise InvalidInput(
            f"{artifact_dir} is not a lora-prep artifact (no {MANIFEST}); pass the directory printed by 'lora-prep prepare'."
        )
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise BadRepo(f"{path} is not valid JSON ({exc}): the artifact is damaged; prepare it again.") from None
    found = data.get("schema") if isinstance(data, dict) else None
    if found != SCHEMA:
        raise InvalidInput(
            f"{path} has schema {found!r} and this lora-prep reads {SCHEMA!r}: prepare the artifact again "
            "with this version, or load it with the lora-prep version that wrote it."
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRepo(f"{path} does not match {SCHEMA} ({where}: {first['msg']}): the artifact is damaged; prepare it again.") from None


def json_schema() -> dict:
    return Manifest.model_json_schema(by_alias=True)


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"


def write_json_schema(path: Path) -> Path:
    from lora_prep.tasks.common.files import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, schema_text())


if __name__ == "__main__":
    import sys

    print(write_json_schema(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/manifest.schema.json")))

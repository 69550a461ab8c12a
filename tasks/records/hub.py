"""Records of the Hub side: the repo as resolved (``RepoFacts``) and the snapshot as downloaded (``Snapshot``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lora_prep.tasks.records.base import Record

# What a local model directory is pinned by before the download stage computes its content digest.
LOCAL_REVISION = "local"
WeightFormat = Literal["safetensors", "pickle"]


class HubFile(Record):
    path: str = Field(description="Path in the repo, '/'-separated.")
    size: int = Field(ge=0, description="Bytes.")
    sha256: str | None = Field(default=None, description="LFS sha256 (the HF cache's blob name); None for small git files and local files.")
    blob_id: str = Field(default="", description="Git blob oid: the HF cache's blob name for small files; empty for local files.")

    @property
    def blob_name(self) -> str:
        """Name of this file's blob in the HF cache: the sha256 for LFS files, the git oid otherwise."""
        return self.sha256 or self.blob_id


class RepoFacts(Record):
    repo_id: str = Field(description="Hub id (org/name), or the absolute path of a local model directory.")
    source: Literal["hub", "local"] = "hub"
    revision: str = Field(description="The revision as requested (branch, tag or sha); 'local' or a code digest for a directory.")
    commit_sha: str | None = Field(description="The 40-hex commit every later step uses; None for a local directory.")
    files: list[HubFile] = Field(description="The whole tree at commit_sha (or the directory's files).")
    selected: list[str] = Field(description="Paths to fetch: config, tokenizer, one weight format, code if auto_map.")
    weight_format: WeightFormat
    selected_bytes: int = Field(ge=0, description="Sum of the selected files' sizes.")
    weight_bytes: int = Field(ge=0, description="Sum of the selected weight files' sizes (no index).")
    param_count: int | None = Field(description="From safetensors headers; None for pickle weights.")
    stored_dtypes: dict[str, int] = Field(description='Parameters per stored dtype, e.g. {"BF16": n}.')
    config: dict = Field(description="config.json at commit_sha.")
    offline: bool = Field(description="True when read from the HF cache without the Hub.")
    code_digest: str | None = Field(
        default=None, description="sha256 over the selected *.py files (name and content) when the model ships code."
    )

    @property
    def is_local(self) -> bool:
        return self.source == "local"

    @property
    def pin(self) -> str:
        """What names these exact files: the commit sha, or 'local' for a directory (its digest comes with the download stage)."""
        return self.commit_sha or LOCAL_REVISION

    @property
    def where(self) -> str:
        return self.repo_id if self.is_local else f"{self.repo_id}@{self.revision}"

    def file(self, path: str) -> HubFile:
        for f in self.files:
            if f.path == path:
                return f
        raise KeyError(path)


class SnapshotFile(Record):
    path: str
    size: int = Field(ge=0, description="Bytes.")
    sha256: str = Field(description="sha256 of the content (verified against the Hub for LFS files).")


class Snapshot(Record):
    repo_id: str
    source: Literal["hub", "local"] = "hub"
    revision: str
    commit_sha: str | None = Field(description="The commit; None for a local directory.")
    snapshot_dir: str = Field(description="snapshots/<sha> in the HF cache, or the local directory: load from here.")
    files: list[SnapshotFile]
    content_digest: str = Field(description="sha256 over the selected files' (path, sha256): names these exact bytes.")
    bytes_transferred: int = Field(ge=0, description="File body bytes this call received from the Hub.")
    from_cache: bool = Field(description="True when this call received no file bodies.")
    offline: bool
    seconds: float

"""What the stages and flows hand back to their callers: small JSON a pipeline's next step can use."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from lora_prep.tasks.records.base import Record
from lora_prep.tasks.records.build import BuiltArtifact
from lora_prep.tasks.records.hub import RepoFacts, Snapshot


class TrackingResult(Record):
    tracking_uri: str
    experiment_id: str
    run_id: str
    run_url: str | None
    open_with: str = Field(
        description="How a person opens the run: its URL, or for a SQLite store the `mlflow ui` command and the URL it serves."
    )
    logged_model_id: str | None
    model_uri: str | None
    registered_version: str | None


class PreparedModel(Record):
    """What the flow returns: small, JSON, enough for a pipeline's next step."""

    artifact_dir: str
    repo_id: str = Field(description="The Hub repo id, or the local model directory.")
    source: Literal["hub", "local"] = "hub"
    revision: str
    commit_sha: str | None = Field(description="The commit loaded; None for a local directory (see content_digest).")
    content_digest: str = Field(description="sha256 over the base files' (path, sha256).")
    mlflow_run_id: str
    mlflow_tracking_uri: str
    mlflow_run_url: str | None
    mlflow_open: str = Field(default="", description="How a person opens the MLflow run (a URL, or the `mlflow ui` command and its URL).")
    model_uri: str | None
    total_params: int
    trainable_params: int
    target_modules: list[str]
    target_parameters: list[str] = Field(default_factory=list, description="Fused expert parameters with LoRA.")
    bytes_downloaded: int
    from_cache: bool
    offline: bool
    peak_rss_bytes: int
    seconds: dict[str, float]

    @classmethod
    def assemble(
        cls, revision: str, facts: RepoFacts, snapshot: Snapshot, built: BuiltArtifact, tracked: TrackingResult, seconds: dict[str, float]
    ) -> PreparedModel:
        """The flow's result from its stages' records."""
        return cls(
            artifact_dir=built.artifact_dir,
            repo_id=facts.repo_id,
            source=facts.source,
            revision=revision,
            commit_sha=snapshot.commit_sha,
            content_digest=snapshot.content_digest,
            mlflow_run_id=tracked.run_id,
            mlflow_tracking_uri=tracked.tracking_uri,
            mlflow_run_url=tracked.run_url,
            mlflow_open=tracked.open_with,
            model_uri=tracked.model_uri,
            total_params=built.total_params,
            trainable_params=built.trainable_params,
            target_modules=built.target_modules,
            target_parameters=built.target_parameters,
            bytes_downloaded=snapshot.bytes_transferred,
            from_cache=snapshot.from_cache,
            offline=snapshot.offline,
            peak_rss_bytes=built.peak_rss_bytes,
            seconds=seconds,
        )


class TrainedAdapter(Record):
    """What training returns: small JSON, with the evidence that only the adapter learned."""

    artifact_dir: str  # the new artifact
    parent_ref: str  # the artifact trained (directory or runs:/ URI)
    parent_mlflow_run_id: str
    mlflow_run_id: str | None = None  # the child run, once tracked
    steps: int
    lr: float
    losses: list[float]  # training loss per step
    eval_loss_before: float  # the whole corpus, eval mode (no dropout), before the first step
    eval_loss_after: float
    trainable_params: int
    trainable_outside_adapter: list[str]  # parameters with requires_grad that are not LoRA: must be empty
    adapter_tensors: int
    adapter_tensors_changed: int
    # sha256 of every weight that is not LoRA (None when verify_base is off). With lora.bias other
    # than "none" the biases train too and show in trainable_outside_adapter; the hash then changes.
    base_sha256_before: str | None
    base_sha256_after: str | None
    seconds: float


class RefreshResult(Record):
    """What the refresh did, and where the current artifact is recorded."""

    model_id: str
    revision: str
    commit_sha: str
    prepared: bool  # True: this run prepared the model; False: an earlier run at this commit was found
    reason: str
    mlflow_run_id: str | None  # the run of the artifact for this commit (new or found)
    artifact_dir: str | None  # the artifact directory that run recorded


class ExistingRun(Record):
    """A run the index found: enough to load its artifact and to log a child run beside it."""

    run_id: str
    artifact_dir: str | None = Field(description="The artifact directory the run recorded (on the machine that made it).")
    tracking_uri: str


class Prepared(Record):
    """Where the artifact to train is: a local directory when this machine has it, else its MLflow run."""

    ref: str  # what load_adapter_ready gets: a directory or runs:/<id>
    mlflow_run_id: str
    tracking_uri: str
    prefect_flow_run_id: str | None = None
    started_by_pipeline: bool = False  # the prepare run was itself started by a flow (run_deployment)

"""The chained training flow (flows/train_adapter.py) on the test bed: the local hub, the Prefect
test harness, a real MLflow SQLite store, tiny real models. Nothing is mocked.

One training run (prepare as a subflow, then train) is shared by the tests that read its
outcome; the trigger path (train the artifact of a finished prepare run) runs once more.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_prep.tasks.records.manifest import read_manifest
from lora_prep.tasks.settings import (
    LoraSettings,
    OutputSettings,
    SourceSettings,
    TrackingSettings,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")

STEPS = 12


@pytest.fixture(scope="module")
def bed(tmp_path_factory, hub, prefect_harness):
    """Settings shared by this module: its own HF cache, MLflow store and artifact directory."""
    root = tmp_path_factory.mktemp("train")
    return {
        "source": SourceSettings(cache_dir=str(root / "hf-cache")),
        "tracking": TrackingSettings(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="train-tests"),
        "output": OutputSettings(output_dir=str(root / "artifacts")),
        "lora": LoraSettings(r=4, dropout=0.0),
    }


@pytest.fixture(scope="module")
def trained(bed):
    """train_adapter with prepare=subflow on tiny/llama; returns the flow's result."""
    from lora_prep.flows.train_adapter import train_adapter
    from lora_prep.tasks.settings import TrainSettings

    return train_adapter(model_id="tiny/llama", prepare="subflow", train=TrainSettings(steps=STEPS, lr=1e-2), **bed)


def _client(bed):
    from mlflow.tracking import MlflowClient

    return MlflowClient(bed["tracking"].tracking_uri)


def test_training_lowers_the_loss_on_the_built_in_corpus(trained):
    assert len(trained.losses) == trained.steps == STEPS
    assert trained.losses[-1] < trained.losses[0]
    assert trained.eval_loss_after < trained.eval_loss_before - 0.05  # nats per token, whole corpus, no dropout


def test_only_the_lora_parameters_are_trainable_and_every_one_of_them_changed(trained):
    assert trained.trainable_outside_adapter == []
    assert trained.trainable_params > 0
    assert trained.adapter_tensors > 0
    assert trained.adapter_tensors_changed == trained.adapter_tensors


def test_base_weights_are_bit_identical_after_training(trained):
    assert trained.base_sha256_before is not None
    assert trained.base_sha256_after == trained.base_sha256_before


def test_the_new_artifact_records_its_parent_and_the_training(trained, bed):
    client = _client(bed)
    parent_run = client.get_run(trained.parent_mlflow_run_id)
    manifest = read_manifest(trained.artifact_dir)

    assert manifest.parent.artifact == parent_run.data.tags["lora_prep.artifact_dir"]
    assert manifest.parent.mlflow_run_id == parent_run.info.run_id
    assert Path(trained.artifact_dir) != Path(manifest.parent.artifact)
    training = manifest.training
    assert training.steps == STEPS and training.lr == 1e-2
    assert training.losses == trained.losses and training.final_loss == trained.losses[-1]
    # The base is the parent's: same commit and file hashes; extended through the model, not rewritten.
    parent_manifest = read_manifest(manifest.parent.artifact)
    assert manifest.base_model == parent_manifest.base_model and manifest.lora == parent_manifest.lora
    assert manifest.adapter.trained and "adapter/adapter_model.safetensors" in {f.path for f in manifest.adapter.files}
    assert manifest.tracking.mlflow_run_id == trained.mlflow_run_id
    assert (Path(trained.artifact_dir) / "README.md").read_text().count("## Training") == 1


def test_the_trained_artifact_loads_back_with_the_trained_adapter_and_the_same_base(trained, bed):
    from lora_prep.tasks.artifact.load_back import load_adapter_ready
    from lora_prep.tasks.settings import TrainSettings
    from lora_prep.tasks.train import (
        batches,
        eval_loss,
        is_adapter_param,
        weights_sha256,
    )

    ready = load_adapter_ready(trained.artifact_dir, source=bed["source"])
    named = list(ready.model.named_parameters())
    assert weights_sha256([(n, p) for n, p in named if not is_adapter_param(n)]) == trained.base_sha256_before
    data = batches(ready.tokenizer, TrainSettings(), ready.model.get_input_embeddings().weight.device)
    assert eval_loss(ready.model, data) == pytest.approx(trained.eval_loss_after, abs=1e-4)


def test_the_training_is_a_child_mlflow_run_of_the_prepare_run_with_the_loss_history(trained, bed):
    client = _client(bed)
    child = client.get_run(trained.mlflow_run_id)
    parent = client.get_run(trained.parent_mlflow_run_id)

    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.info.experiment_id == parent.info.experiment_id
    assert child.data.tags["prefect.flow_run_id"] != parent.data.tags["prefect.flow_run_id"]
    history = client.get_metric_history(child.info.run_id, "loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(STEPS))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(trained.losses)
    assert child.data.params["train.steps"] == str(STEPS)
    logged = {f.path for f in client.list_artifacts(child.info.run_id, "artifact/adapter")}
    assert "artifact/adapter/adapter_model.safetensors" in logged


def test_the_trigger_path_trains_the_artifact_of_a_finished_prepare_run_found_through_mlflow(bed):
    """What the event trigger does: only the prepare flow run id (as `{{ event.resource.id }}` renders it) is passed."""
    from lora_prep.flows.prepare_model import prepare_model
    from lora_prep.flows.train_adapter import train_adapter
    from lora_prep.tasks.settings import TrainSettings

    prepare_state = prepare_model(model_id="tiny/gpt2", return_state=True, **bed)
    prepared = prepare_state.result()
    flow_run_id = str(prepare_state.state_details.flow_run_id)

    result = train_adapter(prepared_flow_run_id=f"prefect.flow-run.{flow_run_id}", train=TrainSettings(steps=4, lr=1e-2),
                           source=bed["source"], tracking=bed["tracking"], output=bed["output"])

    assert result.parent_mlflow_run_id == prepared.mlflow_run_id
    assert result.parent_ref == prepared.artifact_dir  # found on this machine: no download from MLflow
    assert result.base_sha256_after == result.base_sha256_before
    assert _client(bed).get_run(result.mlflow_run_id).data.tags["mlflow.parentRunId"] == prepared.mlflow_run_id


def test_a_prepare_run_started_by_another_flow_is_left_to_that_flow(trained, bed):
    """The trigger also fires for prepare runs a pipeline started; those are trained by the pipeline, so this run skips."""
    from lora_prep.flows.train_adapter import train_adapter

    parent = _client(bed).get_run(trained.parent_mlflow_run_id)
    subflow_run_id = parent.data.tags["prefect.flow_run_id"]  # the prepare subflow of the `trained` run

    state = train_adapter(prepared_flow_run_id=subflow_run_id, tracking=bed["tracking"], return_state=True)

    assert state.is_completed()
    assert state.message.startswith("skipped: prepare run")


def test_without_a_model_id_or_a_prepare_run_the_flow_fails_with_the_fix(bed):
    from lora_prep.flows.train_adapter import train_adapter
    from lora_prep.tasks.errors import InvalidInput

    with pytest.raises(InvalidInput, match="model_id is required"):
        train_adapter(tracking=bed["tracking"])

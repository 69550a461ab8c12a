"""Where MLflow runs go, and how a run is found again. Real SQLite stores; no Prefect here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_prep.tasks.settings import TrackingSettings
from lora_prep.tasks.tracking.artifacts import log_artifact_run
from lora_prep.tasks.tracking.store import resolve_tracking_uri
from tests.manifests import sample_artifact


def _artifact(parent: Path) -> Path:
    return sample_artifact(parent)


def test_tracking_uri_comes_from_the_parameter_then_the_environment_then_the_per_user_store(lora_home, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingSettings()) == f"sqlite:///{lora_home / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert resolve_tracking_uri(TrackingSettings()) == "http://mlflow.internal:5000"
    assert resolve_tracking_uri(TrackingSettings(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"


def test_the_default_store_keeps_database_and_artifacts_in_the_per_user_directory_not_the_cwd(lora_home, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cwd = tmp_path / "somewhere-else"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    result = log_artifact_run(_artifact(tmp_path / "artifacts"), TrackingSettings(), {"prefect.flow_run_id": "f-1"}, {})

    assert list(cwd.iterdir()) == []  # no ./mlruns, no ./mlflow.db
    assert (lora_home / "mlflow.db").is_file()
    logged = list((lora_home / "mlartifacts").rglob("adapter_model.safetensors"))
    assert len(logged) == 2  # the run's artifact/ directory and its logged model
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.params["commit_sha"] == "a" * 40


@pytest.mark.parametrize("form", ["absolute", "relative"])
def test_a_sqlite_store_keeps_its_artifacts_next_to_its_database(tmp_path, monkeypatch, form):
    # sqlite:////srv/db/m.db (absolute) and sqlite:///db/m.db (relative to the working directory) are how SQLAlchemy
    # and MLflow name a database file; the run's artifacts belong beside it, in db/mlartifacts, and nowhere else.
    from mlflow.tracking import MlflowClient

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    store = cwd / "db"
    uri = f"sqlite:///{store / 'mlflow.db'}" if form == "absolute" else "sqlite:///db/mlflow.db"

    result = log_artifact_run(_artifact(tmp_path / "artifacts"), TrackingSettings(tracking_uri=uri), {"prefect.flow_run_id": "f-2"}, {})

    assert (store / "mlflow.db").is_file()
    assert len(list((store / "mlartifacts").rglob("adapter_model.safetensors"))) == 2  # the run's and its logged model's
    assert MlflowClient(uri).get_run(result.run_id).info.artifact_uri.startswith((store / "mlartifacts").as_uri() + "/")
    # where a URL parser would have put them: the first directory of the path taken for a host name, or the root
    assert not Path("/", *store.parts[2:]).exists() and not Path("/db").exists()


def test_logging_the_same_flow_run_twice_reuses_its_run_and_records_it_in_the_manifest(tmp_path, mlflow_uri):
    art = _artifact(tmp_path / "artifacts")
    tags = {"prefect.flow_run_id": "flow-run-42"}

    first = log_artifact_run(art, TrackingSettings(tracking_uri=mlflow_uri), tags, {})
    second = log_artifact_run(art, TrackingSettings(tracking_uri=mlflow_uri), tags, {})

    assert first.run_id == second.run_id
    assert json.loads((art / "manifest.json").read_text())["tracking"]["mlflow_run_id"] == first.run_id


def test_flow_parameters_are_validated_as_the_prefect_ui_form_would(prefect_harness):
    from prefect.exceptions import ParameterTypeError

    from lora_prep.flows.prepare_model import prepare_model

    with pytest.raises(ParameterTypeError) as err:
        prepare_model.validate_parameters({"model_id": "tiny/llama", "lora": {"r": 0, "dropout": 2}, "load": {"dtype": "int3"}})
    text = str(err.value)
    assert "r" in text and "dropout" in text and "dtype" in text
    schema = prepare_model.parameters.model_dump()
    lora = schema["definitions"]["LoraSettings"]["properties"]
    assert lora["r"]["title"] == "Rank (r)"
    assert lora["r"]["exclusiveMinimum"] == 0 and lora["r"]["description"]

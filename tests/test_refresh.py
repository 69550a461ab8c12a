"""The nightly refresh flow (flows/refresh.py): prepare again only when the revision names a new commit.

A repo of its own on the local hub (testbed-refresh/llama), so moving its branch disturbs no other test;
the Prefect test harness; a real MLflow SQLite store.
"""

from __future__ import annotations

import pytest

from lora_prep.tasks.settings import (
    LoraSettings,
    OutputSettings,
    SourceSettings,
    TrackingSettings,
)

pytestmark = pytest.mark.usefixtures("prefect_harness")

REPO = "testbed-refresh/llama"


@pytest.fixture(scope="module")
def bed(tmp_path_factory, hub, prefect_harness):
    from tests.model_factory import build_model_dir

    root = tmp_path_factory.mktemp("refresh")
    first = build_model_dir("llama", root / "src-1", seed=11)
    hub.publish(REPO, first)
    return {
        "root": root,
        "settings": {
            "source": SourceSettings(cache_dir=str(root / "hf-cache")),
            "tracking": TrackingSettings(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", experiment="refresh-tests"),
            "output": OutputSettings(output_dir=str(root / "artifacts")),
            "lora": LoraSettings(r=2),
        },
    }


def _finished_runs(bed) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(bed["settings"]["tracking"].tracking_uri)
    experiment = client.get_experiment_by_name("refresh-tests")
    return client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'")


def test_refresh_prepares_a_commit_once_and_again_only_after_the_branch_moves(hub, bed):
    from lora_prep.flows.refresh import refresh_model
    from tests.model_factory import build_model_dir

    first = refresh_model(model_id=REPO, **bed["settings"])
    assert first.prepared and "no finished preparation" in first.reason
    assert len(_finished_runs(bed)) == 1

    again = refresh_model(model_id=REPO, **bed["settings"])
    assert not again.prepared
    assert again.commit_sha == first.commit_sha
    assert again.mlflow_run_id == first.mlflow_run_id and again.artifact_dir == first.artifact_dir
    assert "already prepared" in again.reason
    assert len(_finished_runs(bed)) == 1  # nothing new logged

    # The owner pushes new weights to main: the next refresh prepares the new commit.
    moved_sha = hub.publish(REPO, build_model_dir("llama", bed["root"] / "src-2", seed=12))
    moved = refresh_model(model_id=REPO, **bed["settings"])
    assert moved.prepared and moved.commit_sha == moved_sha != first.commit_sha
    runs = _finished_runs(bed)
    assert sorted(r.data.params["commit_sha"] for r in runs) == sorted([first.commit_sha, moved_sha])


def test_force_prepares_an_unchanged_commit_again(bed):
    from lora_prep.flows.refresh import refresh_model

    before = len(_finished_runs(bed))
    forced = refresh_model(model_id=REPO, force=True, **bed["settings"])
    assert forced.prepared and forced.reason == "forced"
    assert len(_finished_runs(bed)) == before + 1


def test_a_failed_run_at_the_same_commit_does_not_count_as_prepared(bed):
    from mlflow.tracking import MlflowClient

    from lora_prep.tasks.hub.repo import resolve_repo
    from lora_prep.tasks.tracking.runs import preparation_of_commit, preparation_tags

    tracking = TrackingSettings(tracking_uri=bed["settings"]["tracking"].tracking_uri, experiment="refresh-failed")
    sha = resolve_repo(REPO, "main", bed["settings"]["source"]).commit_sha
    client = MlflowClient(tracking.tracking_uri)
    experiment_id = client.create_experiment("refresh-failed", artifact_location=(bed["root"] / "failed-artifacts").as_uri())
    run = client.create_run(experiment_id, tags=preparation_tags(REPO))  # a preparation of this model in all but its status
    client.log_param(run.info.run_id, "model_id", REPO)
    client.log_param(run.info.run_id, "commit_sha", sha)
    client.set_terminated(run.info.run_id, "FAILED")

    assert preparation_of_commit(tracking, REPO, sha) is None

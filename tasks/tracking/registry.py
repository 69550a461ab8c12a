"""The MLflow Model Registry and references: register an artifact's logged model, fetch any reference back.

``register`` makes a version whose source is ``models:/<logged model id>`` (what the UI links to
the logged model). ``fetch_reference`` resolves ``runs:/<id>[/path]``, ``models:/<name>@<alias>``,
``models:/<name>/<version>`` and ``models:/<model id>`` with our own client and downloads the
artifact directory once, under lora-prep's own home.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lora_prep.tasks.errors import InvalidInput
from lora_prep.tasks.settings import TrackingSettings
from lora_prep.tasks.tracking.store import (
    client,
    default_uris,
    is_server,
    mlflow_errors,
    resolve_tracking_uri,
)

ARTIFACT_PATH = "artifact"  # the run's artifact directory (tasks/tracking/runs.py logs it there)


def register(mlflow: Any, settings: TrackingSettings, run_id: str, model_id: str) -> str:
    """A registry version whose source is ``models:/<model id>``: the UI links it to the logged model."""
    from mlflow.exceptions import MlflowException

    name = settings.register_as
    try:
        mlflow.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    # A SQLite registry resolves models:/<id> through MLflow's default store, whatever client asks.
    with default_uris(mlflow.tracking_uri) if not is_server(mlflow.tracking_uri) else contextlib.nullcontext():
        version = str(mlflow.create_model_version(name, f"models:/{model_id}", run_id=run_id, model_id=model_id).version)
    if not is_server(mlflow.tracking_uri):  # a server records the link itself; an in-process store does not
        tag = "mlflow.modelVersions"
        listed = json.loads(mlflow.get_logged_model(model_id).tags.get(tag) or "[]")
        if not any(str(v.get("version")) == version and v.get("name") == name for v in listed):
            mlflow.set_logged_model_tags(model_id, {tag: json.dumps([*listed, {"name": name, "version": version}])})
    if settings.alias:
        mlflow.set_registered_model_alias(name, settings.alias, version)
    return version


def _reference_location(mlflow: Any, ref: str) -> str:
    """runs:/ or models:/ (name@alias, name/version, logged model id) -> an artifact location, resolved
    with our client: mlflow.artifacts.download_artifacts resolves models:/ against the process's default
    store, not the one we pass (and would create ./mlflow.db there)."""
    from mlflow.store.artifact.utils.models import _parse_model_uri

    if ref.startswith("runs:/"):
        run_id, _, path = ref.removeprefix("runs:/").strip("/").partition("/")
        return f"{mlflow.get_run(run_id).info.artifact_uri.rstrip('/')}/{path or ARTIFACT_PATH}"
    try:
        parsed = _parse_model_uri(ref)
    except Exception:
        raise InvalidInput(
            f"{ref!r} is not models:/<name>@<alias>, models:/<name>/<version> or models:/<model id>; fix the model URI."
        ) from None
    if parsed.model_id:
        return mlflow.get_logged_model(parsed.model_id).artifact_location
    version = parsed.version or mlflow.get_model_version_by_alias(parsed.name, parsed.alias).version
    source = mlflow.get_model_version(parsed.name, version).source
    return _reference_location(mlflow, source) if source.startswith(("models:/", "runs:/")) else source


def _before_publish(copy: Path) -> None:
    """Called with a finished download before it is moved into place (a hook for tests: two loads at once)."""


def fetch_reference(ref: str, root: Path, tracking_uri: str | None = None) -> Path:
    """Fetch a runs:/ or models:/ reference under ``root`` and return its artifact directory.

    One copy per artifact location (a run's artifact directory, a registry version's source: what an
    alias points to is resolved first, so a moved alias fetches the new version): a later load of the
    same location reads the copy instead of downloading it again, and nothing is left in the system's
    temporary directory. The download goes to a hidden sibling and is renamed into place only when it
    holds a manifest, so a copy that exists is complete; two loads at once both download and the
    second keeps the first one's copy.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.artifact_repository_registry import (
        get_artifact_repository,
    )

    uri = tracking_uri or resolve_tracking_uri()
    try:
        with mlflow_errors(uri):
            mlflow = client(uri)
            location = _reference_location(mlflow, ref)
            final = root / hashlib.sha256(f"{uri}\n{location}".encode()).hexdigest()[:16]
            if (final / "manifest.json").is_file():
                return final
            root.mkdir(parents=True, exist_ok=True)
            partial = Path(tempfile.mkdtemp(prefix=f".{final.name}-", suffix=".partial", dir=root))
            try:
                local = Path(get_artifact_repository(location, tracking_uri=uri).download_artifacts("", dst_path=str(partial)))
                if not (local / "manifest.json").is_file():
                    raise InvalidInput(
                        f"{ref} holds no lora-prep artifact (no manifest.json at {location}); "
                        "pass the run or model that 'lora-prep prepare' logged, or log it with 'lora-prep log'."
                    )
                _before_publish(local)
                try:
                    os.rename(local, final)
                except OSError:
                    if not (final / "manifest.json").is_file():  # not a concurrent load's finished copy
                        raise
            finally:
                shutil.rmtree(partial, ignore_errors=True)
    except MlflowException as exc:
        raise InvalidInput(
            f"cannot fetch {ref} from MLflow at {uri} ({exc.error_code}); check the run id or model name and --tracking-uri."
        ) from exc
    return final

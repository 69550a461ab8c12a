"""Per-user default locations (never the current directory).

LORA_PREP_HOME, else $XDG_DATA_HOME/lora-prep, else ~/.local/share/lora-prep:
  mlflow.db       MLflow tracking store (SQLite)
  mlartifacts/    MLflow run artifacts (next to the database, not ./mlruns)
  artifacts/      adapter-ready model artifacts, one directory each
  references/     artifacts fetched from MLflow (runs:/, models:/) to load back, one per location
Read at call time, not import time, so tests and users can redirect them.
"""

from __future__ import annotations

import os
from pathlib import Path


def data_home() -> Path:
    if os.environ.get("LORA_PREP_HOME"):
        return Path(os.environ["LORA_PREP_HOME"]).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg).expanduser() / "lora-prep"


def default_artifacts_dir() -> Path:
    return data_home() / "artifacts"


def default_tracking_uri() -> str:
    return f"sqlite:///{data_home() / 'mlflow.db'}"


def default_mlflow_artifact_root() -> Path:
    return data_home() / "mlartifacts"


def fetched_references_dir() -> Path:
    return data_home() / "references"

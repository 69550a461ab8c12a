"""The adapter-ready artifact: one directory another machine can load back.

    <name>/
      adapter/        PEFT save_pretrained output (safetensors), adapter only
      tokenizer/      the tokenizer as prepared (pad token included)
      manifest.json   schema lora-prep/manifest@1: base commit and file hashes, plan, LoRA, versions, tracking
      README.md       a short model card

Written atomically: everything goes into a hidden temporary sibling
(".<name>.partial-<uuid>") and the directory is renamed into place last, so a
crashed run leaves only a dot-directory that no reader takes for an artifact.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import uuid
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from lora_prep.tasks.errors import InvalidInput

SCHEMA = "lora-prep/manifest@1"
MANIFEST = "manifest.json"
_VERSIONED = ("torch", "transformers", "peft", "accelerate", "huggingface_hub", "prefect", "mlflow", "safetensors")


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def artifact_name(repo_id: str, commit_sha: str) -> str:
    """Readable and unique: <org>--<name>--<sha12>--<UTC time>-<4 hex>."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", repo_id.replace("/", "--"))
    return f"{safe}--{commit_sha[:12]}--{stamp}-{uuid.uuid4().hex[:4]}"


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_artifact(parent: Path, name: str, fill: Callable[[Path], dict], card: Callable[[dict], str]) -> Path:
    """Create ``parent/name`` atomically.

    ``fill(tmp_dir)`` writes adapter/ and tokenizer/ into the temporary
    directory and returns the manifest; the manifest and the model card are
    written last, then the directory is renamed into place.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    final = parent / name
    if final.exists():
        raise InvalidInput(f"artifact directory {final} already exists; choose another --output-dir or name.")
    tmp = parent / f".{name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        manifest = fill(tmp)
        manifest = {"schema": SCHEMA, **manifest}
        (tmp / "README.md").write_text(card(manifest))
        write_json_atomic(tmp / MANIFEST, manifest)
        os.rename(tmp, final)  # atomic on one filesystem; fails if final appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_manifest(artifact_dir: Path) -> dict:
    path = Path(artifact_dir) / MANIFEST
    if not path.is_file():
        raise InvalidInput(f"{artifact_dir} is not a lora-prep artifact (no {MANIFEST}); pass the directory printed by 'lora-prep prepare'.")
    manifest = json.loads(path.read_text())
    if manifest.get("schema") != SCHEMA:
        raise InvalidInput(f"{path} has schema {manifest.get('schema')!r}, expected {SCHEMA!r}; load it with the lora-prep version that wrote it.")
    return manifest


def update_manifest(artifact_dir: Path, **sections: Any) -> dict:
    """Merge top-level sections into manifest.json (atomic replace); used to record the MLflow run id after logging."""
    manifest = read_manifest(artifact_dir)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(manifest.get(key), dict):
            manifest[key] = {**manifest[key], **value}
        else:
            manifest[key] = value
    write_json_atomic(Path(artifact_dir) / MANIFEST, manifest)
    return manifest


def model_card(manifest: dict) -> str:
    base = manifest["base_model"]
    lora = manifest["lora"]
    params = manifest["parameters"]
    plan = manifest.get("load_plan", {})
    targets = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in lora["target_modules"]}))
    return f"""# LoRA-ready {base['repo_id']}

Adapter-ready artifact made by lora-prep on {manifest['created_at']}.

| | |
|---|---|
| base model | `{base['repo_id']}` |
| revision requested | `{base['revision']}` |
| commit | `{base['commit_sha']}` |
| dtype / attention / placement | {plan.get('dtype')} / {plan.get('attn_implementation')} / {plan.get('device_map')} |
| LoRA | r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, init={lora['init_lora_weights']} |
| target modules | {targets} ({len(lora['target_modules'])} layers) |
| parameters | {params['total']:,} total, {params['trainable']:,} trainable ({100.0 * params['trainable'] / max(params['total'], 1):.3f}%) |

The base weights are not in this directory: they are fetched at the commit
above and checked against the sha256 list in `manifest.json`.

## Load it

```python
from lora_prep.tasks.artifact_load import load_adapter_ready

model, tokenizer, manifest = load_adapter_ready("path/to/this/directory", trainable=True)
```

or from the command line: `lora-prep load path/to/this/directory --json`.
"""

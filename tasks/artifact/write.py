"""The adapter-ready artifact: one directory another machine can load back.

    <name>/
      adapter/        PEFT save_pretrained output (safetensors), adapter only; adapter_config.json names
                      the Hub repo id and commit sha (or the local directory), never a cache path
      tokenizer/      the tokenizer as prepared (pad token included), without load-time arguments
      manifest.json   lora-prep/manifest@2 (tasks/records/manifest.py)
      README.md       a short model card

Written atomically: everything goes into a hidden temporary sibling
(".<name>.partial-<hex>", with an owner file naming host and pid) and the directory is renamed
into place last, so a crashed run leaves only a dot-directory that no reader takes for an
artifact; the next run in that parent directory removes the ones whose process is gone.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from lora_prep.tasks.common.files import sha256_file
from lora_prep.tasks.common.paths import default_artifacts_dir
from lora_prep.tasks.common.process import ProcessId
from lora_prep.tasks.errors import InvalidInput
from lora_prep.tasks.records.hub import SnapshotFile
from lora_prep.tasks.records.manifest import Manifest
from lora_prep.tasks.settings import OutputSettings

_VERSIONED = ("torch", "transformers", "peft", "accelerate", "huggingface_hub", "prefect", "mlflow", "safetensors", "lora-prep")
OWNER = ".owner.json"
# A partial directory without an owner file (a crash in its first milliseconds) is removed after this long.
ORPHAN_AGE_S = 3600


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


def artifact_name(name_or_path: str, pin: str) -> str:
    """Readable and unique: <org>--<name>--<sha12>--<UTC time>-<4 hex> (a local directory: its last two parts)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    if os.path.isabs(name_or_path):
        name_or_path = "/".join(Path(name_or_path).parts[-2:])
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name_or_path.replace("/", "--")).strip("-.") or "model"
    return f"{safe}--{pin[:12]}--{stamp}-{uuid.uuid4().hex[:4]}"


def artifact_parent(output: OutputSettings) -> Path:
    return Path(output.output_dir).expanduser() if output.output_dir else default_artifacts_dir()


def check_output_dir(output: OutputSettings, *, create: bool) -> Path:
    """The artifact's parent directory, checked before any download: a directory that can be written.

    create: make it (and check by writing a probe file); False (the dry run) checks the nearest
    existing ancestor instead and writes nothing.
    """
    parent = artifact_parent(output).absolute()
    field = "output.output_dir (--output-dir)"
    if parent.exists() and not parent.is_dir():
        raise InvalidInput(f"{field} {parent} is a file, not a directory: choose a directory.")
    if output.name and (parent / output.name).exists():
        raise InvalidInput(f"artifact directory {parent / output.name} already exists; choose another --name or --output-dir.")
    try:
        if create:
            parent.mkdir(parents=True, exist_ok=True)
            probe = parent / f".lora-prep-write-check-{uuid.uuid4().hex[:8]}"
            probe.write_bytes(b"")
            probe.unlink()
        else:
            ancestor = parent
            while not ancestor.exists():
                ancestor = ancestor.parent
            if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
                raise PermissionError(13, "not writable", str(ancestor))
    except OSError as exc:
        raise InvalidInput(
            f"{field} {parent} cannot be created or written ({exc.strerror or type(exc).__name__}): choose a directory you can write to."
        ) from None
    return parent


# --- writing ------------------------------------------------------------------------------------


def clean_stale_partials(parent: Path) -> list[str]:
    """Remove ``.<name>.partial-*`` directories left by runs that died (this host, process gone, pid reuse included)."""
    removed: list[str] = []
    if not parent.is_dir():
        return removed
    for tmp in parent.glob(".*.partial-*"):
        try:
            owner = json.loads((tmp / OWNER).read_text())
            dead = ProcessId(owner["host"], int(owner["pid"]), owner.get("process_started")).is_gone()
        except (OSError, ValueError, KeyError, TypeError):
            dead = time.time() - tmp.stat().st_mtime > ORPHAN_AGE_S
        if dead:
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp.name)
    return removed


def write_artifact(parent: Path, name: str, fill: Callable[[Path], Manifest], card: Callable[[Manifest], str]) -> Path:
    """Create ``parent/name`` atomically.

    ``fill(tmp_dir)`` writes adapter/ and tokenizer/ into the temporary directory and returns
    the Manifest; the manifest and the model card are written last, then the directory is
    renamed into place.
    """
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(parent)
    final = parent / name
    if final.exists():
        raise InvalidInput(f"artifact directory {final} already exists; choose another --output-dir or name.")
    tmp = parent / f".{name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        me = ProcessId.current()
        (tmp / OWNER).write_text(json.dumps({"host": me.host, "pid": me.pid, "process_started": me.started, "started": utc_now()}))
        manifest = fill(tmp)
        (tmp / "README.md").write_text(card(manifest))
        manifest.write(tmp)
        (tmp / OWNER).unlink()
        os.rename(tmp, final)  # atomic on one filesystem; fails if final appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def file_records(root: Path) -> list[SnapshotFile]:
    return [
        SnapshotFile(path=str(p.relative_to(root.parent)), size=p.stat().st_size, sha256=sha256_file(p))
        for p in sorted(root.rglob("*"))
        if p.is_file()
    ]

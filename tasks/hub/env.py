"""Where the Hugging Face cache is, whether we may go online, and the token: below resolve and download.

Read at call time from huggingface_hub's own constants (which honour HF_HUB_CACHE,
HUGGINGFACE_HUB_CACHE, HF_HOME and XDG_CACHE_HOME when it is imported), so lora-prep uses
the cache huggingface_hub and transformers use, never a second idea of where it is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lora_prep.tasks.errors import InvalidInput
from lora_prep.tasks.settings import SourceSettings

_TRUE = ("1", "ON", "YES", "TRUE")


def cache_dir_for(source: SourceSettings | None = None) -> str:
    """source.cache_dir, else huggingface_hub's HF_HUB_CACHE; absolute."""
    from huggingface_hub import constants

    path = (source.cache_dir if source else None) or constants.HF_HUB_CACHE
    return str(Path(path).expanduser().resolve())


def is_offline(source: SourceSettings | None = None) -> bool:
    """source.offline, or HF_HUB_OFFLINE as huggingface_hub read it at import or as set now."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in _TRUE
    return bool(source and source.offline) or constants.is_offline_mode() or env


def repo_cache_dir(cache_dir: str, repo_id: str) -> Path:
    """The repo's folder in the HF cache (models--org--name)."""
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")


def locks_dir(cache_dir: str, repo_id: str) -> Path:
    """Where huggingface_hub keeps its per-blob download locks for this repo (``<cache>/.locks/models--org--name``)."""
    from huggingface_hub.file_download import repo_folder_name

    return Path(cache_dir) / ".locks" / repo_folder_name(repo_id=repo_id, repo_type="model")


def get_token(source: SourceSettings) -> str | None:
    """The Hub token: the Prefect Secret block ``source.token_secret`` when set, else HF_TOKEN.

    None lets huggingface_hub use the token saved by ``hf auth login``. The value is never
    logged, never a task parameter and never part of a result.
    """
    if source.token_secret:
        from prefect.blocks.system import Secret

        # _sync=True makes Prefect's async_dispatch run the sync load; its annotations know neither the flag nor that.
        load_sync: Any = Secret.load
        try:
            secret: Secret[Any] = load_sync(source.token_secret, _sync=True)
        except ValueError:  # Prefect: "Unable to find block document named ..."
            raise InvalidInput(
                f"token_secret {source.token_secret!r}: no Prefect Secret block with that name; "
                f"create it with Secret(value=<token>).save({source.token_secret!r}) or unset token_secret to use HF_TOKEN."
            ) from None
        value = secret.get()
        return str(value) if value else None
    return os.environ.get("HF_TOKEN") or None

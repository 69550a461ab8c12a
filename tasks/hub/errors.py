"""Errors of the libraries lora-prep calls, turned into lora-prep's (tasks/errors.py): in one place, by type.

Never by message text: huggingface_hub's typed errors (``GatedRepoError`` before its parent
``RepositoryNotFoundError``), HTTP statuses, httpx2 transport errors; MLflow's and requests'
transport errors; Prefect's client errors. Each message is one line ending with what to do.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import httpx2
from huggingface_hub import constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from lora_prep.tasks.common.causes import causes
from lora_prep.tasks.errors import (
    EntryNotFound,
    GatedRepo,
    HubUnavailable,
    InvalidInput,
    LoraPrepError,
    OfflineCacheMiss,
    RepoNotFound,
    RevisionNotFound,
)

# HTTP statuses that can pass by waiting: request timeout, rate limit, server errors.
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})


# --- huggingface_hub, httpx2 ------------------------------------------------------------------


def _status(exc: HfHubHTTPError) -> int | None:
    response = getattr(exc, "response", None)
    return response.status_code if response is not None else None


def is_transient_hub_error(exc: BaseException) -> bool:
    """Connection trouble or a 408/429/5xx, here or anywhere in the cause chain."""
    return any(
        (isinstance(e, httpx2.TransportError) and not isinstance(e, httpx2.ProxyError))
        or (isinstance(e, HfHubHTTPError) and _status(e) in TRANSIENT_STATUS)
        for e in causes(exc)
    )


@contextmanager
def hub_errors(repo_id: str, revision: str, path: str | None = None) -> Iterator[None]:
    """Translate huggingface_hub/httpx2 errors into lora-prep's, each one line ending with the fix."""
    endpoint = constants.ENDPOINT
    where = f"{repo_id}@{revision}" + (f" {path}" if path else "")
    try:
        yield
    except LoraPrepError:
        raise
    except GatedRepoError as exc:  # a RepositoryNotFoundError: must come first
        raise GatedRepo(
            f"{repo_id} is gated: accept the terms on {endpoint}/{repo_id} and set HF_TOKEN "
            "(or source.token_secret) to a token with access.",
            repo_id=repo_id,
        ) from exc
    except RepositoryNotFoundError as exc:
        raise RepoNotFound(
            f"repo {repo_id!r} not found on {endpoint}: check the id, or it may be private: set HF_TOKEN.",
            repo_id=repo_id,
        ) from exc
    except RevisionNotFoundError as exc:
        raise RevisionNotFound(
            f"revision {revision!r} not found in {repo_id}: use an existing branch, tag or full 40-hex commit sha.",
            repo_id=repo_id,
            revision=revision,
        ) from exc
    except RemoteEntryNotFoundError as exc:
        raise EntryNotFound(
            f"{where}: file not found on the Hub: check the revision, or the repo lacks a file it lists.",
            repo_id=repo_id,
            revision=revision,
        ) from exc
    except LocalEntryNotFoundError as exc:  # an EntryNotFoundError too: before the generic case
        if is_transient_hub_error(exc):
            raise HubUnavailable(
                f"cannot reach the Hub at {endpoint} for {where} and the HF cache lacks it: "
                "check the network or HF_ENDPOINT; it is retried.",
                repo_id=repo_id,
            ) from exc
        raise OfflineCacheMiss(
            f"{where} is not complete in the HF cache and the Hub may not be used: "
            "run once with network access (without --offline / HF_HUB_OFFLINE).",
            repo_id=repo_id,
        ) from exc
    except OfflineModeIsEnabled as exc:
        raise OfflineCacheMiss(
            f"{where}: offline mode is on and the HF cache lacks it: unset HF_HUB_OFFLINE / --offline to download it.",
            repo_id=repo_id,
        ) from exc
    except EntryNotFoundError as exc:
        raise EntryNotFound(f"{where}: file not found: check the revision.", repo_id=repo_id) from exc
    except HfHubHTTPError as exc:
        status = _status(exc)
        if status in TRANSIENT_STATUS:
            raise HubUnavailable(
                f"the Hub at {endpoint} answered HTTP {status} for {where}: it is retried; "
                "if it persists, try later or use the cache with --offline.",
                repo_id=repo_id,
            ) from exc
        if status in (401, 403):
            raise GatedRepo(
                f"access to {repo_id} refused (HTTP {status}): set HF_TOKEN to a valid token with access to {endpoint}/{repo_id}.",
                repo_id=repo_id,
            ) from exc
        raise LoraPrepError(f"the Hub answered HTTP {status} for {where}: check the repo id and revision.") from exc
    except httpx2.TransportError as exc:
        raise HubUnavailable(
            f"cannot reach the Hub at {endpoint} ({type(exc).__name__}) for {where}: check the network or HF_ENDPOINT; it is retried.",
            repo_id=repo_id,
        ) from exc
    except HFValidationError as exc:
        raise InvalidInput(f"repo_id {repo_id!r} or revision {revision!r} is not valid on the Hub: use 'org/name'.") from exc


# --- at the top of the program: anything not ours yet ------------------------------------------

"""One error hierarchy for lora-prep, and the one mapping from errors to exit codes.

Every error carries its context and ends with what to do. ``str(err)`` is one line.

    LoraPrepError                     exit 1: our own failure, or one we cannot classify
    ├── InvalidInput (ValueError)     exit 2: a parameter is wrong; the message names field, value and fix
    │   └── UnknownTargetModule
    ├── NotFound (LookupError)        exit 2: the input names something that is not there
    │   ├── RepoNotFound, RevisionNotFound, EntryNotFound
    │   └── OfflineCacheMiss          offline, and the cache lacks it
    ├── Refusal                       exit 2: lora-prep will not do this as asked (safety, access, capacity)
    │   ├── GatedRepo, PickleRefused, RemoteCodeRefused
    │   └── DoesNotFit, NotEnoughDisk
    ├── BadRepo                       exit 2: the repo or mirror serves something malformed or hostile
    │   └── IntegrityError            bytes that do not match their recorded sha256
    └── TransientError                exit 1, retried by the tasks that talk to a server
        ├── HubUnavailable, TrackingUnavailable
        └── OrchestratorUnavailable   the Prefect API stopped answering

Library errors (huggingface_hub, httpx2, MLflow, Prefect) are turned into these by type in
``tasks/hub/errors.py``, never by message text.
"""

from __future__ import annotations

EXIT_OK, EXIT_FAILURE, EXIT_INVALID = 0, 1, 2


class LoraPrepError(Exception):
    """Root of all lora-prep errors. ``str(err)`` is one line ending with the fix."""

    exit_code = EXIT_FAILURE
    transient = False

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.context = {k: v for k, v in context.items() if v is not None}


# --- exit 2: the user can fix it by changing an argument or the input ------------------------


class InvalidInput(LoraPrepError, ValueError):
    """A parameter is wrong; the message names the field, the value and the fix."""

    exit_code = EXIT_INVALID


class UnknownTargetModule(InvalidInput):
    """A LoRA target, exclusion or pattern names no module of the model."""


class NotFound(LoraPrepError, LookupError):
    """The input names a repo, revision, file or cached snapshot that does not exist."""

    exit_code = EXIT_INVALID


class RepoNotFound(NotFound):
    pass


class RevisionNotFound(NotFound):
    pass


class EntryNotFound(NotFound):
    pass


class OfflineCacheMiss(NotFound):
    """Offline (by choice or because the Hub is unreachable) and the cache lacks what is needed."""


class Refusal(LoraPrepError):
    """lora-prep will not do this as asked (safety, access or capacity); the message says how to allow it."""

    exit_code = EXIT_INVALID


class GatedRepo(Refusal):
    pass


class PickleRefused(Refusal):
    pass


class RemoteCodeRefused(Refusal):
    pass


class DoesNotFit(Refusal):
    pass


class NotEnoughDisk(Refusal):
    pass


class BadRepo(LoraPrepError):
    """The repo (or the mirror serving it) holds something malformed or hostile: a corrupt header,
    an unparseable config, a path-like name or header that would write outside the cache."""

    exit_code = EXIT_INVALID


class IntegrityError(BadRepo):
    """A file's bytes do not match the sha256 recorded for it (download, local directory or manifest)."""


# --- exit 1, retried where a stage talks to a server ------------------------------------------


class TransientError(LoraPrepError):
    transient = True


class HubUnavailable(TransientError):
    pass


class TrackingUnavailable(TransientError):
    pass


class OrchestratorUnavailable(TransientError):
    """The Prefect API stopped answering."""


def is_transient(exc: BaseException) -> bool:
    """True when retrying could help (used by the retry policy in tasks/common/retry.py)."""
    return isinstance(exc, LoraPrepError) and exc.transient


def exit_code(exc: BaseException) -> int:
    """The process exit status for an error: the one mapping the CLI uses."""
    if isinstance(exc, LoraPrepError):
        return exc.exit_code
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):  # a settings model rejected a value: invalid input
        return EXIT_INVALID
    return EXIT_FAILURE

"""One error hierarchy for lora-prep.

Every error carries its context and ends with what to do. The CLI maps
``exit_code`` to the process exit status: 2 for invalid input and refusals
(the user can fix it by changing an argument), 1 for everything else.
Retry conditions use ``transient``: only errors that can go away by waiting
(connection errors, 429, 5xx) are retried.
"""

from __future__ import annotations


class LoraPrepError(Exception):
    """Root of all lora-prep errors. ``str(err)`` is one line ending with the fix."""

    exit_code = 1
    transient = False

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.context = {k: v for k, v in context.items() if v is not None}


# --- invalid input and refusals: exit code 2, never retried ----------------


class InvalidInput(LoraPrepError, ValueError):
    """A parameter is wrong; the message names the field, the value and the fix."""

    exit_code = 2


class Refusal(LoraPrepError):
    """lora-prep will not do this as asked (safety or capacity); the message says how to allow it."""

    exit_code = 2


class RepoNotFound(Refusal):
    pass


class GatedRepo(Refusal):
    pass


class RevisionNotFound(Refusal):
    pass


class EntryNotFound(Refusal):
    pass


class PickleRefused(Refusal):
    pass


class RemoteCodeRefused(Refusal):
    pass


class DoesNotFit(Refusal):
    pass


class NotEnoughDisk(Refusal):
    pass


class UnknownTargetModule(InvalidInput):
    pass


class OfflineCacheMiss(Refusal):
    """Offline (by choice or because the Hub is unreachable) and the cache lacks what is needed."""


class IntegrityError(LoraPrepError):
    """A file's bytes do not match the sha256 recorded for it (download or manifest)."""


# --- failures that may pass: retried where the stage talks to the network ----


class TransientError(LoraPrepError):
    transient = True


class HubUnavailable(TransientError):
    pass


class TrackingUnavailable(TransientError):
    pass


def is_transient(exc: BaseException) -> bool:
    """True when retrying could help. Used by Prefect ``retry_condition_fn``s."""
    return isinstance(exc, LoraPrepError) and exc.transient


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect retry_condition_fn. A plain ``def`` on purpose: Prefect silently never retries
    when given a functools.partial or a callable object (PITFALLS)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the failed run's exception is what we classify
        return is_transient(exc)
    return False

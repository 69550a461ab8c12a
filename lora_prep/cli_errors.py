"""What the CLI says when a run fails: any error as one of lora-prep's, in one line.

lora-prep's own errors pass as they are; a library's error that reached the top of the program is
turned into ours by type (never by message text): a settings model's ValidationError, Prefect's
client transport error (Prefect is the only httpx user here: huggingface_hub uses httpx2, MLflow
requests), MLflow's unreachable store. Anything else keeps its type name in the line.
"""

from __future__ import annotations

from lora_prep.tasks.errors import InvalidInput, LoraPrepError


def classify(exc: BaseException) -> BaseException:
    """The error the CLI reports: ours as is; a library's transport error turned into ours; else unchanged."""
    if isinstance(exc, LoraPrepError):
        return exc
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):  # a settings model or a flow parameter rejected a value
        return InvalidInput(f"invalid parameters: {' '.join(str(exc).split())}")
    import httpx

    if isinstance(exc, httpx.TransportError):  # Prefect's client (huggingface_hub uses httpx2, MLflow requests)
        from prefect.settings import PREFECT_API_URL

        from lora_prep.tasks.errors import OrchestratorUnavailable

        url = PREFECT_API_URL.value() or "the embedded server"
        return OrchestratorUnavailable(
            f"the Prefect API at {url} does not answer ({type(exc).__name__}): start it "
            "(prefect server start) or unset PREFECT_API_URL to use lora-prep's local server."
        )
    from lora_prep.tasks.tracking.store import is_connection_problem

    if is_connection_problem(exc):
        from lora_prep.tasks.errors import TrackingUnavailable

        return TrackingUnavailable(f"MLflow is unreachable ({type(exc).__name__}): start the tracking server or check --tracking-uri.")
    return exc


def one_line(exc: BaseException) -> str:
    """The line after ``lora-prep: error:``: the message on one line, with the type for errors that are not ours."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, LoraPrepError) else f"{type(exc).__name__}: {text}"

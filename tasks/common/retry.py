"""The one retry policy of lora-prep's Prefect tasks: only I/O, only transient errors.

    @task(name="download", **NETWORK.task_options())

A task retries when its exception is transient (``tasks/errors.py``: connection errors, 429,
5xx, an unreachable tracking server); invalid input, not-found, refusals and bad repos fail at
once. Delays grow exponentially with jitter so that several runs hitting the same outage do
not retry in step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lora_prep.tasks.errors import is_transient


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn. A plain ``def`` on purpose: Prefect silently never retries
    when given a functools.partial or a callable object (task_engine.py checks inspect.isfunction)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the failed run's exception is what we classify
        return is_transient(exc)
    return False


@dataclass(frozen=True)
class RetryPolicy:
    retries: int
    backoff_factor: float  # seconds: delays are factor * 2**attempt
    jitter: float = 0.5  # each delay varies by up to +-50%

    def delays(self) -> list[float]:
        return [self.backoff_factor * 2**attempt for attempt in range(self.retries)]

    def task_options(self) -> dict[str, Any]:
        """Keyword arguments for ``@task``: retries, delays, jitter and the transient-only condition."""
        return {
            "retries": self.retries,
            "retry_delay_seconds": self.delays(),
            "retry_jitter_factor": self.jitter,
            "retry_condition_fn": retry_if_transient,
        }


# Hub metadata and downloads: 2, 4, 8 s (14 s before the last attempt, which may fall back to the cache).
NETWORK = RetryPolicy(retries=3, backoff_factor=2)
# MLflow: 3, 6 s. Each attempt is itself bounded (tasks/tracking/store.py), so a dead server ends the task within a minute.
TRACKING = RetryPolicy(retries=2, backoff_factor=3)

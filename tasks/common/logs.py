"""The logger a stage writes to: Prefect's run logger inside a run (the UI shows it), else the module's."""

from __future__ import annotations

import logging


def run_logger(name: str = "lora_prep") -> logging.Logger | logging.LoggerAdapter:
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(name)

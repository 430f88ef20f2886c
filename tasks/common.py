"""What every task shares: a logger that works inside and outside a Prefect run."""

from __future__ import annotations

import logging

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger (shown in the UI) in a run; the module logger in `task.fn()` calls."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("saeflow")

"""What every task shares: a logger that works inside and outside a Prefect run, and progress
bars for a terminal."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from prefect.exceptions import MissingContextError
from prefect.logging import get_run_logger
from tqdm import tqdm


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger (shown in the UI) in a run; the module logger in `task.fn()` calls."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("saeflow")


T = TypeVar("T")


def progress_bar(total: int, desc: str, unit: str) -> tqdm | None:
    """A progress bar on stderr when it is a terminal (`saeflow run` in a shell); None in a
    served, piped or CI run, whose logs carry tokens/s and ETA instead."""
    if not sys.stderr.isatty():
        return None
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, leave=False, dynamic_ncols=True)


def with_progress(items: Iterable[T], total: int, desc: str, unit: str) -> Iterator[T]:
    """`items`, advancing a terminal progress bar (if any) by one per item."""
    bar = progress_bar(total, desc, unit)
    for item in items:
        yield item
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

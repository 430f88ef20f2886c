"""What every task shares: a logger that works inside and outside a Prefect run, and progress
for a terminal (a bar) and for the Prefect UI (a progress artifact)."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from prefect.artifacts import create_progress_artifact, update_progress_artifact
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
    """`items`, advancing a `Progress` (terminal bar, Prefect artifact) by one per item."""
    progress = Progress(desc, unit, total)
    for done, item in enumerate(items, 1):
        yield item
        progress(done)
    progress.close()


class Progress:
    """Progress of a long stage: a terminal bar (when stderr is a terminal) and, inside a
    Prefect flow or task run, a progress artifact the Prefect UI shows on the run (updated at
    most every PROGRESS_STEP percent). `progress(done, total)` sets it; `close()` finishes."""

    def __init__(self, desc: str, unit: str, total: int | None = None):
        self.desc, self.unit, self.total = desc, unit, total
        self.bar: tqdm | None = None
        self.artifact: Any = None
        self.shown = -PROGRESS_STEP
        self.started = False

    def _start(self) -> None:
        self.started = True
        self.bar = progress_bar(self.total or 0, self.desc, self.unit)
        if _in_run():
            try:
                self.artifact = create_progress_artifact(0.0, description=self.desc)
            except Exception:  # the UI's progress must never fail the work
                self.artifact = None

    def __call__(self, done: int, total: int | None = None) -> None:
        self.total = total or self.total
        if not self.started:
            self._start()
        if self.bar is not None:
            self.bar.total = self.total
            self.bar.update(done - self.bar.n)
        pct = 100.0 * done / max(self.total or 1, 1)
        if self.artifact is not None and pct - self.shown >= PROGRESS_STEP:
            self.shown = pct
            try:
                update_progress_artifact(self.artifact, min(pct, 100.0))
            except Exception:
                self.artifact = None

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.artifact is not None:
            with contextlib.suppress(Exception):
                update_progress_artifact(self.artifact, 100.0)


PROGRESS_STEP = 2.0
"""Percent between two updates of a Prefect progress artifact (each is an API call)."""


def _in_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None

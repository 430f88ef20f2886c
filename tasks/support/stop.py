"""A stop asked for (Ctrl-C, SIGTERM): tasks that have not started see it and do not start.

The CLI sets `STOP` in its signal handlers before unwinding; Prefect's thread pool would
otherwise run every queued task (192 cache shards after a Ctrl-C at shard 2, measured) before
the flow could end."""

from __future__ import annotations

import threading

STOP = threading.Event()


class Stopped(RuntimeError):
    """A task not started because saeflow is stopping."""


def check(what: str) -> None:
    """Raise Stopped, naming `what`, once a stop was asked for."""
    if STOP.is_set():
        raise Stopped(f"saeflow is stopping: {what} not started")

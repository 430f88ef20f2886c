"""Every fault test leaves no process behind: whatever children (saeflow commands, temporary
Prefect servers, Dask or Ray workers) a case started are gone when it ends."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest


def _children() -> dict[int, psutil.Process]:
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    before = set(_children())  # the session's own servers (e.g. the Prefect API) stay
    yield
    new = [p for pid, p in _children().items() if pid not in before]
    _, alive = psutil.wait_procs(new, timeout=30)
    left = []
    for p in alive:
        try:
            left.append(" ".join(p.cmdline())[:200])
        except psutil.Error:  # ended between the two calls
            continue
    assert not left, f"processes left behind: {left}"

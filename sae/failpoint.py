"""Failpoints: named places where a test kills the process as a preemption would (tests/faults/).

`SAEFLOW_FAILPOINT=name` (or `name:n`: the n-th time it is reached) sends SIGKILL to the process
there: no cleanup, no `finally`, no flush — what a preempted GPU or the OOM killer does. Unset,
a failpoint costs one environment lookup.
"""

from __future__ import annotations

import os
import signal
import threading

_reached: dict[str, int] = {}
_lock = threading.Lock()


def failpoint(name: str) -> None:
    spec = os.environ.get("SAEFLOW_FAILPOINT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    with _lock:
        _reached[name] = _reached.get(name, 0) + 1
        if _reached[name] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)

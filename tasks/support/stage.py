"""Prefect's cross-run task cache for saeflow's stages (DESIGN §3: a re-run reuses finished work).

A stage's cache key is a hash of what fixes its output — the content of its config section and
the keys of its inputs (`content(inputs)`), its task's source, and the data directory — never
the run or the MLflow parent it happens to be called from. A cached result is used only while
every file it names under the data directory still exists: delete a checkpoint and the stage
runs again. Results are stored as JSON (no pickles), under Prefect's local storage.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.results import get_result_store

from tasks.support.home import home

STAGES = ("cache", "train", "evaluate", "features")
"""Names `force=[...]` takes (and `all`): the stages a re-run would otherwise reuse."""

_GENERATIONS = 64


@dataclass
class Stage(CachePolicy):
    """Key = sha256(content(inputs), the task's source, $SAEFLOW_HOME) plus a generation: the
    first generation with no record, or whose recorded result still has all its files. No key
    (the task runs, uncached) when `content` returns None."""

    content: Callable[[dict[str, Any]], Any] = lambda inputs: inputs

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        content = self.content(inputs)
        if content is None:
            return None
        spec = [content, inspect.getsource(task_ctx.task.fn), str(home())]
        base = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()
        store = get_result_store()
        for generation in range(_GENERATIONS):
            key = f"{task_ctx.task.name}-{base[:32]}-{generation}"
            if not store.exists(key) or _intact(store.read(key).result):
                return key
        return None  # every generation went stale: run uncached rather than loop


def _intact(result: Any) -> bool:
    """Every path under the data directory named anywhere in `result` exists."""
    root = str(home())
    if isinstance(result, dict):
        return all(_intact(v) for v in result.values())
    if isinstance(result, list | tuple):
        return all(_intact(v) for v in result)
    if isinstance(result, str) and result.startswith(root):
        return Path(result).exists()
    return True


CACHED: dict[str, Any] = {"persist_result": True, "result_serializer": "json"}
"""@task(...) options that go with a `Stage` policy."""


def forced(force: list[str] | None) -> set[str]:
    """`force` as a set of stage names; raises naming a bad one and the valid choices."""
    names = set(force or [])
    if "all" in names:
        return set(STAGES)
    if bad := sorted(names - set(STAGES)):
        raise ValueError(f"force: unknown stage(s) {bad}; choose from {[*STAGES, 'all']}")
    return names

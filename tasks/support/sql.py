"""SQL over a study from Python: `sql("select … from features join runs using (run_id)")`."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from dashboards.sql import MEMORY_LIMIT, THREADS, TIMEOUT_S, connect, dashboard, query
from tasks.support.home import home
from tasks.support.tracking import metrics_table, runs_table


def sql(
    text: str,
    params: list[Any] | None = None,
    uri: str | None = None,
    *,
    timeout: float = TIMEOUT_S,
    memory_limit: str = MEMORY_LIMIT,
    threads: int = THREADS,
) -> pa.Table:
    """Run SQL (or a dashboards/*.sql name) over the views `features`, `examples`, `runs`,
    `metrics` of $SAEFLOW_HOME and the MLflow store at `uri` (default: the embedded one),
    stopped past `timeout` seconds or DuckDB's `memory_limit` (`dashboards/sql.py`)."""
    text = dashboard(text)
    metrics = metrics_table(uri) if "metrics" in text.lower() else None  # the slow one
    con = connect(home() / "features", runs_table(uri), metrics, memory_limit, threads)
    return query(con, text, params, timeout)

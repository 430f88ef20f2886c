"""DuckDB over what the pipeline wrote (DESIGN §7): views `features`, `examples`, `runs`,
`metrics`; and the ready queries in dashboards/*.sql.

`features` reads every run's `features/run_id=<id>/feature_stats.parquet` (hive-partitioned, so
`run_id` is a column); `examples` is one row per top example (run_id, feature_id, rank, text,
activation, seq_id, pos); `runs` and `metrics` are tables handed in from MLflow's API (DuckDB
cannot read MLflow's SQLite offline, STACK.md). `saeflow scaling` adds `scaling_points` (one row
per SAE: compute, loss, fvu, l0, whether it is on the frontier), `scaling_fits` (one row per
fitted quantity: exponent, interval, the value at the extrapolated budget) and `feature_splits`
(parent feature of the smaller SAE, child in the larger, cosine). The database is in memory:
Parquet stays the source. A dashboard query takes its parameters as $1, $2, … bound by DuckDB,
never pasted.
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

FEATURE_COLUMNS = (
    "run_id VARCHAR, feature_id INTEGER, freq DOUBLE, mean_act DOUBLE, "
    "max_act DOUBLE, decoder_norm DOUBLE, top_examples STRUCT(text VARCHAR, "
    "activation FLOAT, seq_id BIGINT, pos INTEGER)[], top_logits VARCHAR[], "
    "nearest_feature INTEGER, nearest_cos DOUBLE, act_p50 DOUBLE, act_p90 DOUBLE, "
    "act_p99 DOUBLE, cluster_id INTEGER"
)
EXAMPLE_COLUMNS = (
    "run_id VARCHAR, feature_id INTEGER, rank BIGINT, text VARCHAR, activation FLOAT, "
    "seq_id BIGINT, pos INTEGER"
)
SCALING_VIEWS = {
    "scaling_points": "points.parquet",
    "scaling_fits": "fits.parquet",
    "feature_splits": "splits.parquet",
}
"""Views over `saeflow scaling`'s tables in features/scaling/study=<parent run id>/."""
DASHBOARDS = Path(__file__).parent
"""Where the ready queries live: `<name>.sql`."""


TIMEOUT_S = 300.0
"""A query running longer is interrupted (`saeflow sql --timeout`)."""
MEMORY_LIMIT = "4GB"
"""DuckDB's memory_limit for a query (`saeflow sql --memory-limit`); past it DuckDB spills to
nothing (no temp directory: external access is off) and the query fails, saying so."""
THREADS = 2
"""DuckDB's worker threads (`saeflow sql --threads`)."""


def connect(
    features_root: Path,
    runs: pa.Table,
    metrics: pa.Table | None = None,
    memory_limit: str = MEMORY_LIMIT,
    threads: int = THREADS,
) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the views registered, bounded in memory and threads."""
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"SET memory_limit = '{_quote(memory_limit)}'")
        con.execute(f"SET threads = {int(threads)}")
    except duckdb.Error as e:
        limits = f"memory_limit={memory_limit!r}, threads={threads}"
        raise ValueError(f"bad SQL limits ({limits}): {e}") from None
    files = sorted(Path(features_root).glob("run_id=*/feature_stats.parquet"))
    if files:
        pattern = str(Path(features_root) / "run_id=*" / "feature_stats.parquet")
        con.execute(
            "CREATE VIEW features AS SELECT run_id, * EXCLUDE (run_id) FROM "
            f"read_parquet('{_quote(pattern)}', hive_partitioning = true, "
            "union_by_name = true)"
        )
    else:
        con.execute(f"CREATE TABLE features ({FEATURE_COLUMNS})")
    columns = {row[0] for row in con.execute("DESCRIBE features").fetchall()}
    if "top_examples" in columns:
        con.execute(
            "CREATE VIEW examples AS SELECT run_id, feature_id, "
            "unnest(range(1, len(top_examples) + 1)) AS rank, "
            "unnest(top_examples, recursive := true) FROM features"
        )
    else:  # feature tables written elsewhere without examples
        con.execute(f"CREATE TABLE examples ({EXAMPLE_COLUMNS})")
    for view, name in SCALING_VIEWS.items():  # a scaling study's tables, `study` a column
        pattern = Path(features_root) / "scaling" / "study=*" / name
        if sorted(pattern.parent.parent.glob(f"study=*/{name}")):
            con.execute(
                f"CREATE VIEW {view} AS SELECT study, * EXCLUDE (study) FROM "
                f"read_parquet('{_quote(str(pattern))}', hive_partitioning = true, "
                "union_by_name = true)"
            )
        else:
            con.execute(f"CREATE TABLE {view} (study VARCHAR)")
    con.register("_runs", runs)
    con.execute("CREATE VIEW runs AS SELECT * FROM _runs")
    if metrics is None:
        metrics = pa.table(
            {
                "run_id": pa.array([], pa.string()),
                "key": pa.array([], pa.string()),
                "step": pa.array([], pa.int64()),
                "value": pa.array([], pa.float64()),
                "timestamp": pa.array([], pa.int64()),
            }
        )
    con.register("_metrics", metrics)
    con.execute("CREATE VIEW metrics AS SELECT * FROM _metrics")
    # Read-only from here: files only under the feature tables, and no query can undo that.
    con.execute(f"SET allowed_directories = ['{_quote(str(Path(features_root).resolve()))}']")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")
    return con


def dashboard(name_or_sql: str) -> str:
    """The SQL of a ready query (`dead_features`, or a path to a .sql file), else the text."""
    if re.fullmatch(r"\w+", name_or_sql) and (DASHBOARDS / f"{name_or_sql}.sql").is_file():
        return (DASHBOARDS / f"{name_or_sql}.sql").read_text()
    if name_or_sql.endswith(".sql"):
        if not Path(name_or_sql).is_file():
            raise FileNotFoundError(f"no SQL file {name_or_sql}")
        return Path(name_or_sql).read_text()
    return name_or_sql


def dashboards() -> dict[str, str]:
    """Ready queries: name -> their first comment line."""
    return {
        p.stem: p.read_text().splitlines()[0].lstrip("- ").strip()
        for p in sorted(DASHBOARDS.glob("*.sql"))
    }


def _quote(s: str) -> str:
    return s.replace("'", "''")


READ_ONLY = {duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN}
"""Statements `query` runs (SELECT covers WITH, DESCRIBE, SHOW and SUMMARIZE)."""


class ReadOnlyError(PermissionError):
    """A statement that would write, attach, install or reconfigure."""


def query(
    con: duckdb.DuckDBPyConnection,
    sql: str,
    params: list[Any] | None = None,
    timeout: float = TIMEOUT_S,
) -> pa.Table:
    """Run one read-only statement, `?`/`$n` parameters bound (never pasted into the text),
    interrupted after `timeout` seconds (TimeoutError) or past the connection's memory_limit
    (MemoryError), each naming the bound and how to raise it."""
    statements = con.extract_statements(sql)
    if len(statements) != 1:
        raise ReadOnlyError(f"give exactly one SQL statement, got {len(statements)}")
    if statements[0].type not in READ_ONLY:
        kind = statements[0].type.name
        raise ReadOnlyError(
            f"saeflow sql is read-only: a {kind} statement is not allowed; "
            "use SELECT (or WITH, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN)"
        )
    timer = threading.Timer(timeout, con.interrupt)
    timer.start()
    try:
        return con.sql(sql, params=params or None).to_arrow_table()
    except duckdb.InterruptException:
        raise TimeoutError(
            f"the query ran past {timeout:g} s and was stopped (saeflow sql --timeout SECONDS)"
        ) from None
    except duckdb.OutOfMemoryException as e:
        limit = con.execute("SELECT current_setting('memory_limit')").fetchone()
        raise MemoryError(
            f"the query needs more memory than memory_limit={limit[0] if limit else '?'} "
            f"(saeflow sql --memory-limit SIZE): {str(e).splitlines()[0]}"
        ) from None
    finally:
        timer.cancel()


def render(table: pa.Table, fmt: str = "table", max_width: int = 60) -> str:
    """table (aligned text, long cells cut), csv or json."""
    rows = table.to_pylist()
    if fmt == "json":
        return json.dumps(rows, default=str, indent=1)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(table.column_names)
        w.writerows([[_cell(v, 10**9) for v in r.values()] for r in rows])
        return buf.getvalue()
    if fmt != "table":
        raise ValueError(f"format {fmt!r} is not one of table, csv, json")
    cells = [table.column_names] + [[_cell(v, max_width) for v in r.values()] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(table.column_names))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join([*lines, f"({table.num_rows} rows)"])


def _cell(v: Any, width: int) -> str:
    s = "" if v is None else (f"{v:.6g}" if isinstance(v, float) else str(v))
    s = s.replace("\n", "⏎")
    return s if len(s) <= width else s[: width - 1] + "…"

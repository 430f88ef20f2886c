"""HTML reports: one per SAE run, and a comparison of the experiment's runs (dashboards/report)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import Config
from dashboards.report import COMPARED, comparison, run_report
from sae.files import write_text
from tasks.support import tracking
from tasks.support.figures import close, front_figures, run_figures
from tasks.support.home import inside
from tasks.support.log import logger

CURVES = ("loss", "fvu", "l0", "dead_frac")
SHOWN = ("sae.arch", "sae.d_sae", "hook", "train.tokens", "train.lr", "cache.key")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, text, point="report.write")


@task(name="report", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def report(
    cfg: Config,
    trained: dict[str, Any],
    features: dict[str, Any],
    parent_run_id: str | None = None,
) -> dict[str, str]:
    """Write reports/<run_id>.html and reports/compare-<experiment id>.html under the data dir;
    log the first to the SAE's run and the second to `parent_run_id` (the study) if given."""
    uri = cfg.tracking.uri
    c = tracking.client(uri)
    run = c.get_run(trained["run_id"])
    metrics = {k[5:]: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    history = {
        name: [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, f"train/{name}")]
        for name in CURVES
    }
    shown = {"run_id": run.info.run_id, "run_name": run.info.run_name}
    shown |= {k: run.data.params[k] for k in SHOWN if k in run.data.params}
    table = pq.read_table(features["path"])
    page = run_report(shown, metrics, history, table)
    columns = ["feature_id", "freq", "max_act", "decoder_norm"]
    figures = run_figures(table.select(columns).to_pydict())
    tracking.log_figures(run.info.run_id, figures, "figures", uri)
    close(figures)
    path = inside("reports", f"{run.info.run_id}.html")
    _write(path, page)
    tracking.log_artifact(run.info.run_id, path, "report", uri)
    runs = [
        r
        for r in tracking.runs_table(uri).to_pylist()
        if r.get("experiment") == c.get_experiment(run.info.experiment_id).name
        and r.get("eval_l0") is not None
    ]
    compare = inside("reports", f"compare-{run.info.experiment_id}.html")
    _write(compare, comparison(runs))
    if parent_run_id:
        tracking.log_artifact(parent_run_id, compare, "report", uri)
    logger().info(f"report {path}; comparison of {len(runs)} runs {compare}")
    return {"report": str(path), "comparison": str(compare)}


@task(name="compare_sweep", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=[2, 10])
def compare_sweep(cfg: Config, parent_run_id: str, jobs: list[dict[str, Any]]) -> dict[str, str]:
    """The sweep's own runs side by side, on its parent run: `comparison/table.json` (an MLflow
    table: one row per SAE with its overrides and eval metrics) and `comparison/sweep-<parent>.html`
    (L0 vs explained variance and vs loss recovered). `jobs`: [{run_id, overrides}]."""
    uri = cfg.tracking.uri
    overrides = {j["run_id"]: " ".join(j["overrides"]) for j in jobs}
    rows = [
        r | {"overrides": overrides[r["run_id"]]}
        for r in tracking.runs_table(uri).to_pylist()
        if r["run_id"] in overrides
    ]
    rows.sort(key=lambda r: list(overrides).index(r["run_id"]))
    path = inside("reports", f"sweep-{parent_run_id}.html")
    _write(path, comparison(rows, f"Sweep {parent_run_id[:8]}", extra=("overrides",)))
    tracking.log_artifact(parent_run_id, path, "comparison", uri)
    table = {c: [r.get(c) for r in rows] for c in ("overrides", *COMPARED)}
    tracking.log_table(parent_run_id, table, "comparison/table.json", uri)
    figures = front_figures(rows)
    tracking.log_figures(parent_run_id, figures, "figures", uri)
    close(figures)
    logger().info(f"sweep comparison of {len(rows)} runs -> {path}")
    return {"comparison": str(path)}

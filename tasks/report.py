"""HTML reports: one per SAE run, and a comparison of the experiment's runs (dashboards/report)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import from_dict
from dashboards.report import comparison, run_report
from tasks import tracking
from tasks.common import logger
from tasks.home import home

CURVES = ("loss", "fvu", "l0", "dead_frac")
SHOWN = ("sae.arch", "sae.d_sae", "hook", "train.tokens", "train.lr", "cache.key")


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@task(name="report", cache_policy=NO_CACHE)
def report(
    cfg: dict[str, Any],
    trained: dict[str, Any],
    features: dict[str, Any],
    parent_run_id: str | None = None,
) -> dict[str, str]:
    """Write reports/<run_id>.html and reports/compare-<experiment id>.html under the data dir;
    log the first to the SAE's run and the second to `parent_run_id` (the study) if given."""
    uri = from_dict(cfg).tracking.uri
    c = tracking.client(uri)
    run = c.get_run(trained["run_id"])
    metrics = {k[5:]: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    history = {
        name: [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, f"train/{name}")]
        for name in CURVES
    }
    shown = {"run_id": run.info.run_id, "run_name": run.info.run_name}
    shown |= {k: run.data.params[k] for k in SHOWN if k in run.data.params}
    page = run_report(shown, metrics, history, pq.read_table(features["path"]))
    path = home() / "reports" / f"{run.info.run_id}.html"
    _write(path, page)
    tracking.log_artifact(run.info.run_id, path, "report", uri)
    runs = [
        r
        for r in tracking.runs_table(uri).to_pylist()
        if r.get("experiment") == c.get_experiment(run.info.experiment_id).name
        and r.get("eval_l0") is not None
    ]
    compare = home() / "reports" / f"compare-{run.info.experiment_id}.html"
    _write(compare, comparison(runs))
    if parent_run_id:
        tracking.log_artifact(parent_run_id, compare, "report", uri)
    logger().info(f"report {path}; comparison of {len(runs)} runs {compare}")
    return {"report": str(path), "comparison": str(compare)}

"""Export a trained (or imported) SAE in another tool's format (`export.format`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import Config
from sae.formats import saelens
from sae.models.base import CONFIG
from sae.models.registry import load_sae
from tasks.support import tracking
from tasks.support.home import inside, sae_dir
from tasks.support.log import logger


def dataset_path(c: Config) -> str:
    """What the SAE's activations were read from, as SAELens's `metadata.dataset_path` says it."""
    d = c.data
    if d.source == "hf":
        return d.hf_name
    return ",".join(d.paths) if d.source == "files" else "saeflow:stdlib"


@task(name="export_sae", cache_policy=NO_CACHE)
def export_sae(cfg: Config, trained: dict[str, str], dir: Path | None = None) -> dict[str, Any]:
    """Write the SAE of `trained` ({run_id, checkpoint}) as `export.format` into `dir`
    (default `export.dir`, else `$SAEFLOW_HOME/exports/<run_id>-<format>`); tag its MLflow run
    with where. With its feature table (`saeflow evaluate`), SAELens's `sparsity` is the log10
    firing frequency on the eval tokens."""
    c, run_id = cfg, trained["run_id"]
    checkpoint = Path(trained["checkpoint"])
    sae = load_sae(checkpoint)
    meta = json.loads((checkpoint / CONFIG).read_text()).get("meta") or {}
    out = dir or (Path(c.export.dir) if c.export.dir else None)
    out = out or inside("exports", f"{run_id}-{c.export.format}")
    stats = inside("features", f"run_id={run_id}", "feature_stats.parquet")
    freq = None
    if stats.is_file():
        table = pq.read_table(stats, columns=["feature_id", "freq"]).to_pydict()
        freq = torch.zeros(sae.d_sae, dtype=torch.float64)
        freq[torch.tensor(table["feature_id"])] = torch.tensor(table["freq"], dtype=torch.float64)
        freq = freq.clamp_min(1e-10).log10().float()
    model_name = c.model.path if c.model.source == "hub" else c.model.name
    written = saelens.export(
        sae,
        out,
        model_name=model_name,
        hook=meta.get("hook", c.hook),
        context_size=int(c.data.context_length or c.model.n_ctx),
        prepend_bos=c.data.prepend_bos,
        dataset_path=dataset_path(c),
        log10_frequency=freq,
    )
    tracking.set_tags(run_id, {f"saeflow.export.{c.export.format}": str(out)}, c.tracking.uri)
    logger().info(f"exported the SAE of run {run_id} as {c.export.format} -> {out}")
    return {"run_id": run_id, "format": c.export.format, "dir": str(out), "cfg": written}


def export_targets(cfg: Config) -> list[tuple[dict[str, str], Path]]:
    """Where `eval.run_id` is a sweep's or scaling study's parent run: each of its SAE runs and
    the directory it goes to, `<export.dir or $SAEFLOW_HOME/exports/<parent>>/<run_id>`;
    otherwise [] (one SAE: `find_sae`'s)."""
    c, parent = cfg, cfg.eval.run_id
    if parent is None:
        return []
    client = tracking.client(c.tracking.uri)
    try:
        experiment_id = client.get_run(parent).info.experiment_id
    except Exception:
        return []
    root = Path(c.export.dir) if c.export.dir else inside("exports", parent)
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return [
        ({"run_id": r.info.run_id, "checkpoint": str(sae_dir(r.info.run_id))}, root / r.info.run_id)
        for r in runs
        if (sae_dir(r.info.run_id) / "sae.safetensors").is_file()
    ]

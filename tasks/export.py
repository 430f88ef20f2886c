"""Export a trained (or imported) SAE in another tool's format (`export.format`)."""

from __future__ import annotations

import datetime
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE

from conf.schema import Config
from sae.activations.cache import sequences
from sae.formats import neuronpedia, saelens
from sae.formats.hooks import to_transformer_lens
from sae.lm.config import HOOK_RE
from sae.lm.hooks import load_lm
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
def export_sae(
    cfg: Config, trained: dict[str, str], model: dict[str, Any], dir: Path | None = None
) -> dict[str, Any]:
    """Write the SAE of `trained` ({run_id, checkpoint}) as `export.format` into `dir`
    (default `export.dir`, else `$SAEFLOW_HOME/exports/<run_id>-<format>`); tag its MLflow run
    with where. With its feature table (`saeflow evaluate`), SAELens's `sparsity` is the log10
    firing frequency on the eval tokens; Neuronpedia's layout needs that table."""
    c, run_id = cfg, trained["run_id"]
    checkpoint = Path(trained["checkpoint"])
    sae = load_sae(checkpoint)
    meta = json.loads((checkpoint / CONFIG).read_text()).get("meta") or {}
    out = dir or (Path(c.export.dir) if c.export.dir else None)
    out = out or inside("exports", f"{run_id}-{c.export.format}")
    stats = inside("features", f"run_id={run_id}", "feature_stats.parquet")
    if c.export.format == "neuronpedia":
        written = _neuronpedia(c, run_id, sae, meta.get("hook", c.hook), model, stats, out)
        tracking.set_tags(run_id, {"saeflow.export.neuronpedia": str(out)}, c.tracking.uri)
        logger().info(f"exported the SAE of run {run_id} as neuronpedia -> {out}")
        return {"run_id": run_id, "format": "neuronpedia", "dir": str(out), "cfg": written}
    freq = None
    if stats.is_file():
        table = pq.read_table(stats, columns=["feature_id", "freq"]).to_pydict()
        freq = torch.zeros(sae.d_sae, dtype=torch.float64)
        freq[torch.tensor(table["feature_id"])] = torch.tensor(table["freq"], dtype=torch.float64)
        freq = saelens.log10_frequency(freq)
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


def _neuronpedia(
    c: Config,
    run_id: str,
    sae: Any,
    hook: str,
    model: dict[str, Any],
    stats: Path,
    out: Path,
) -> dict[str, Any]:
    """The bulk-import layout (`sae/formats/neuronpedia.py`) from the feature table and the
    eval cache it was computed on."""
    if not stats.is_file():
        raise FileNotFoundError(
            f"run {run_id} has no feature table ({stats}): Neuronpedia's layout is built from "
            f"it; run saeflow evaluate eval.run_id={run_id} first"
        )
    tags = tracking.client(c.tracking.uri).get_run(run_id).data.tags
    eval_dir = inside("activations", tags.get("eval_cache_key", "-"))
    if not (eval_dir / "manifest.json").is_file():
        raise FileNotFoundError(
            f"the eval cache of run {run_id}'s feature table ({eval_dir}) is gone; run saeflow "
            f"evaluate eval.run_id={run_id} --force evaluate to rebuild both"
        )
    table = pq.read_table(stats).sort_by("feature_id").to_pydict()
    examples = table["top_examples"]
    found, nonzero = neuronpedia.scan(
        sae,
        sequences(eval_dir, hook, c.eval.batch_size),
        examples,
        c.eval.context_before,
        c.eval.context_after,
    )
    lm, tok = load_lm(model["path"], model["revision"], c.model.dtype, "cpu")
    unembed = lm.get_output_embeddings()
    vocab = lru_cache(maxsize=None)(lambda i: tok.decode([i]))
    m = HOOK_RE.match(hook)
    layer, site = int(m.group(1)), m.group(2)  # type: ignore[union-attr]
    model_id = (c.model.path if c.model.source == "hub" else c.model.name).lower()
    model_id = re.sub(r"[^a-z0-9-]+", "-", model_id.split("/")[-1])
    set_name = f"saeflow-{site.replace('_', '')}-{sae.arch}-{sae.d_sae}"
    source = neuronpedia.source_id(layer, set_name)
    out.mkdir(parents=True, exist_ok=True)
    creator = {"creatorName": "saeflow", "creatorId": "saeflow", "visibility": "PRIVATE"}
    release = f"saeflow-{run_id[:8]}"
    neuronpedia.write_jsonl(out / "release.jsonl", {
        "name": release, "description": f"saeflow run {run_id}", "descriptionShort": release,
        "urls": [], "creatorNameShort": "saeflow", "createdAt": _now(), **creator})  # fmt: skip
    neuronpedia.write_jsonl(out / "model.jsonl", {
        "id": model_id, "instruct": False, "displayName": model_id,
        "displayNameShort": model_id, "creatorId": "saeflow",
        "tlensId": model_id, "dimension": sae.d_in, "layers": c.model.n_layer,
        "neuronsPerLayer": sae.d_in})  # fmt: skip
    neuronpedia.write_jsonl(out / "sourceset.jsonl", {
        "modelId": model_id, "name": set_name, "releaseName": release,
        "description": f"{sae.arch} SAE, {sae.d_sae} latents, at {hook}",
        "hasDashboards": True, **creator})  # fmt: skip
    neuronpedia.write_jsonl(out / "source.jsonl", {
        "id": source, "modelId": model_id, "setName": set_name, "dataset": dataset_path(c),
        "num_prompts": len(set(e["seq_id"] for exs in examples for e in exs)),
        "num_tokens_in_prompt": int(c.data.context_length or 0),
        "hfRepoId": None, "hfFolderId": None, "saelensConfig": None, "saelensRelease": None,
        "saelensSaeId": None, **creator})  # fmt: skip
    hook_name = to_transformer_lens(hook)
    features = neuronpedia.write_batches(
        out / "features",
        neuronpedia.feature_records(
            sae,
            table,
            None if unembed is None else unembed.weight.detach(),
            vocab,
            lambda i: nonzero[i],
            model_id=model_id,
            source=source,
            hook_name=hook_name,
        ),
        key=lambda r: int(r["index"]),
    )
    activations = neuronpedia.write_batches(
        out / "activations",
        neuronpedia.activation_records(
            examples,
            found,
            vocab,
            model_id=model_id,
            source=source,
            data_source=dataset_path(c),
        ),
        key=lambda r: int(r["index"]),
    )
    return {"model": model_id, "source": source, "feature_files": features,
            "activation_files": activations}  # fmt: skip


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


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

"""Evaluate a trained SAE on held-out tokens (eval/* metrics) and write its feature table."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from prefect import task

from conf.schema import Config
from sae.activations.cache import Manifest, sequences
from sae.analysis.evaluate import ce_baselines, evaluate_saes
from sae.analysis.features import feature_stats
from sae.files import atomic_write, write_text
from sae.lm.hooks import HookPoint, load_lm, parse_hook
from sae.models.base import SAE
from sae.models.registry import load_sae
from tasks.model import lm_device
from tasks.support import tracking
from tasks.support.home import inside
from tasks.support.log import logger, with_progress
from tasks.support.stage import CACHED, Stage


def _load_sae(trained: dict[str, Any], eval_dir: Path, hook: str) -> SAE:
    """The SAE of `trained`, which must take the eval cache's activations at `hook`: one trained
    on another model's width would fail deep in a matrix product, naming neither."""
    sae = load_sae(Path(trained["checkpoint"]))
    d_in = Manifest.load(eval_dir).d_in(hook)
    if sae.d_in != d_in:
        raise ValueError(
            f"the SAE of run {trained['run_id']} takes d_in={sae.d_in}, but the activations at "
            f"{hook} have d_in={d_in} (eval cache {eval_dir}): it was trained on another "
            "model or hook; evaluate it with the model and hook it was trained on"
        )
    return sae


def _contexts(eval_dir: Path, hook: str, batch_size: int, protocol: str):
    """(token ids, excluded) per batch: saeflow's exclusions (special tokens and outlier rows),
    or for protocol saebench the special tokens alone, as SAELens masks them."""
    if protocol == "saebench":
        special = torch.tensor(Manifest.load(eval_dir).special_token_ids, dtype=torch.long)
        return [
            (ids, torch.isin(ids, special)) for ids, _, _ in sequences(eval_dir, hook, batch_size)
        ]
    return [(ids, excl) for ids, excl, _ in sequences(eval_dir, hook, batch_size)]


def _baselines(lm, hp: HookPoint, eval_dir: Path, contexts, protocol: str) -> dict[str, float]:
    """ce_clean / ce_zero depend on the model and the eval set only: computed once, kept beside
    the eval cache (the manifest ignores files it does not list)."""
    kind = "" if protocol == "saeflow" else f"-{protocol}"
    path = eval_dir / f"ce-baselines-v2{kind}-{hp.name}.json"  # v2: with ce_mean
    if path.is_file():
        return json.loads(path.read_text())
    out = ce_baselines(lm, hp, contexts, protocol)
    write_text(path, json.dumps(out))
    return out


def _evaluated(inputs: dict[str, Any]) -> Any:
    """What fixes eval/* and feature stats: the eval settings, model, hook, eval set, SAE runs."""
    cfg, trained = inputs["cfg"], inputs["trained"]
    runs = [t["run_id"] for t in (trained if isinstance(trained, list) else [trained])]
    spec = {"eval": asdict(cfg.eval), "model": asdict(cfg.model), "hook": cfg.hook}
    spec["uri"] = cfg.tracking.uri
    return [spec, inputs["model"].get("identity"), inputs["eval_cache"]["key"], runs]


@task(name="evaluate_saes", cache_policy=Stage(content=_evaluated), **CACHED)
def evaluate_many(
    cfg: Config,
    model: dict[str, Any],
    eval_cache: dict[str, Any],
    trained: list[dict[str, Any]],
) -> list[dict[str, float]]:
    """`evaluate` for SAEs at the same hook of the same model, in one pass over the contexts
    (the prefix to the hook and the clean logits shared: DESIGN §9's cost per SAE)."""
    c, log = cfg, logger()
    device = lm_device(c.model)
    eval_dir = Path(eval_cache["dir"])
    saes = [_load_sae(t, eval_dir, c.hook) for t in trained]  # before any forward pass
    lm, _ = load_lm(model["path"], model["revision"], c.model.dtype, device)  # SAEs follow it
    hp = parse_hook(lm, c.hook)
    protocol = c.eval.protocol
    contexts = _contexts(eval_dir, c.hook, c.eval.batch_size, protocol)
    baselines = _baselines(lm, hp, eval_dir, contexts, protocol)
    batches = with_progress(contexts, len(contexts), f"evaluating {len(saes)} SAE(s)", "batch")
    results = evaluate_saes(
        lm, hp, saes, batches, baselines, c.eval.dense_threshold, protocol=protocol
    )
    prefix = "eval" if protocol == "saeflow" else f"eval_{protocol}"
    for t, metrics in zip(trained, results, strict=True):
        metrics["dead_window_tokens"] = metrics.get("tokens", 0.0)
        tracking.log_metrics(
            t["run_id"], {f"{prefix}/{k}": v for k, v in metrics.items()}, uri=c.tracking.uri
        )
        tracking.set_tags(t["run_id"], {"eval_cache_key": eval_cache["key"]}, c.tracking.uri)
        manifest = str(eval_dir / "manifest.json")
        name = f"activations {c.hook} (held out)"
        tracking.log_dataset(
            t["run_id"], name, eval_cache["key"], manifest, "evaluation", c.tracking.uri
        )
        log.info(f"eval {t['run_id']}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return results


@task(name="feature_stats", cache_policy=Stage(content=_evaluated), **CACHED)
def features(
    cfg: Config, model: dict[str, Any], eval_cache: dict[str, Any], trained: dict[str, Any]
) -> dict[str, Any]:
    """One row per latent (DESIGN §6) as Parquet under features/run_id=<id>/, and as an artifact."""
    c = cfg
    sae = _load_sae(trained, Path(eval_cache["dir"]), c.hook).to(lm_device(c.model))
    # No forward pass here (the activations come from the eval cache): only the tokenizer and
    # the unembedding are read, on the CPU; the statistics are computed on the SAE's device.
    lm, tok = load_lm(model["path"], model["revision"], c.model.dtype, "cpu")
    unembed = lm.get_output_embeddings()
    table = feature_stats(
        sae,
        with_progress(
            sequences(Path(eval_cache["dir"]), c.hook, c.eval.batch_size),
            math.ceil(Manifest.load(Path(eval_cache["dir"])).n_sequences / c.eval.batch_size),
            "feature stats",
            "batch",
        ),
        decode=lambda ids: tok.decode(ids),
        vocab=lambda i: tok.decode([i]),
        unembed=None if unembed is None else unembed.weight.detach(),
        n_top=c.eval.top_examples,
        before=c.eval.context_before,
        after=c.eval.context_after,
    )
    out = inside("features", f"run_id={trained['run_id']}")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "feature_stats.parquet"
    atomic_write(path, lambda tmp: pq.write_table(table, tmp), point="features.write")
    tracking.log_artifact(trained["run_id"], path, "features", c.tracking.uri)
    logger().info(f"feature stats of {table.num_rows} latents -> {path}")
    return {"path": str(path), "n_features": table.num_rows}
